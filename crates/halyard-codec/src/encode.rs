//! Encoding: [`Packet`]s into bytes for one protocol level.
//!
//! One function walks each packet against a [`Sink`]: first a [`Counter`] (which also
//! validates, so a refused packet writes nothing), then a [`Writer`]. Fields a level does not
//! have (properties and ack reasons before MQTT 5) are left out, and where MQTT 5 allows a
//! short form (success without properties) it is used, since that is what clients expect byte
//! for byte.

use bytes::BytesMut;

use crate::decode::{
    AUTH, CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC,
    PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
};
use crate::properties::{self, Rules};
use crate::wire::{put_binary, put_string, vbi_len, Counter, Sink, Writer, MAX_VBI};
use crate::{
    Auth, ConnAck, Connect, Disconnect, EncodeError, Packet, ProtocolVersion, PubResponse, Publish,
    QoS, ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe,
};

/// Appends the encoding of `packet` for protocol level `version` to `buf`.
///
/// On error nothing is appended. For MQTT 3.x, properties are ignored, ack reasons are
/// dropped, a 3.x CONNACK with an MQTT 5 error code (0x80 and above) is sent as the nearest
/// 3.x return code, and a 3.x SUBACK failure code becomes 0x80. For MQTT 5, only the
/// properties the packet type allows are written.
///
/// # Errors
///
/// [`EncodeError`] when no valid encoding exists: AUTH before MQTT 5, a field or the whole
/// packet too long for its length prefix, or a rule the packet itself breaks (see the
/// variants).
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let mut counter = Counter::default();
    body(&mut counter, packet, version)?;
    let remaining = counter.0;
    if remaining > MAX_VBI {
        return Err(EncodeError::PacketTooLarge { size: remaining });
    }
    buf.reserve(1 + vbi_len(remaining) + remaining);
    let mut writer = Writer(buf);
    writer.u8(first_byte(packet));
    writer.vbi(remaining);
    let start = writer.0.len();
    body(&mut writer, packet, version)?;
    debug_assert_eq!(writer.0.len() - start, remaining);
    Ok(())
}

/// Size in bytes of the whole encoded packet (fixed header included), computed without
/// encoding, so the broker can honour a client's Maximum Packet Size cheaply. A packet that
/// [`encode`] would refuse reports `usize::MAX`, i.e. larger than any limit.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let mut counter = Counter::default();
    match body(&mut counter, packet, version) {
        Ok(()) if counter.0 <= MAX_VBI => 1 + vbi_len(counter.0) + counter.0,
        _ => usize::MAX,
    }
}

/// Where the topic name sits in an encoded PUBLISH (`None` for any other packet or bytes too
/// short to hold it).
fn publish_topic_span(encoded: &[u8]) -> Option<std::ops::Range<usize>> {
    if *encoded.first()? >> 4 != PUBLISH {
        return None;
    }
    let length_bytes = encoded
        .iter()
        .skip(1)
        .take(4)
        .position(|byte| byte & 0x80 == 0)?
        + 1;
    let topic_at = 1 + length_bytes + 2;
    let topic_len = u16::from_be_bytes([*encoded.get(topic_at - 2)?, *encoded.get(topic_at - 1)?]);
    let span = topic_at..topic_at + usize::from(topic_len);
    (encoded.len() >= span.end).then_some(span)
}

/// The topic name of an encoded PUBLISH, as bytes. Fan-out uses it to tell whether an
/// encoding it already holds is the one a delivery needs.
pub fn encoded_publish_topic(encoded: &[u8]) -> Option<&[u8]> {
    encoded.get(publish_topic_span(encoded)?)
}

/// Where the packet identifier sits in an encoded QoS 1/2 PUBLISH (`None` for any other
/// packet, a QoS 0 PUBLISH, or bytes too short to hold one). Fan-out encodes a message once
/// and gives every subscriber a copy with only these two bytes changed; the offset is the
/// same for MQTT 3.x and 5 because the identifier directly follows the topic.
pub fn publish_packet_id_offset(encoded: &[u8]) -> Option<usize> {
    if (*encoded.first()? >> 1) & 0b11 == 0 {
        return None;
    }
    let offset = publish_topic_span(encoded)?.end;
    (encoded.len() >= offset + 2).then_some(offset)
}

fn first_byte(packet: &Packet) -> u8 {
    let (packet_type, flags) = match packet {
        Packet::Connect(_) => (CONNECT, 0),
        Packet::ConnAck(_) => (CONNACK, 0),
        Packet::Publish(p) => (
            PUBLISH,
            u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain),
        ),
        Packet::PubAck(_) => (PUBACK, 0),
        Packet::PubRec(_) => (PUBREC, 0),
        Packet::PubRel(_) => (PUBREL, 0b0010),
        Packet::PubComp(_) => (PUBCOMP, 0),
        Packet::Subscribe(_) => (SUBSCRIBE, 0b0010),
        Packet::SubAck(_) => (SUBACK, 0),
        Packet::Unsubscribe(_) => (UNSUBSCRIBE, 0b0010),
        Packet::UnsubAck(_) => (UNSUBACK, 0),
        Packet::PingReq => (PINGREQ, 0),
        Packet::PingResp => (PINGRESP, 0),
        Packet::Disconnect(_) => (DISCONNECT, 0),
        Packet::Auth(_) => (AUTH, 0),
    };
    packet_type << 4 | flags
}

fn body<S: Sink>(s: &mut S, packet: &Packet, version: ProtocolVersion) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => connect(s, c, version),
        Packet::ConnAck(c) => connack(s, c, version),
        Packet::Publish(p) => publish(s, p, version),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            pub_response(s, r, version)
        }
        Packet::Subscribe(sub) => subscribe(s, sub, version),
        Packet::SubAck(a) => suback(s, a, version),
        Packet::Unsubscribe(u) => unsubscribe(s, u, version),
        Packet::UnsubAck(a) => unsuback(s, a, version),
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => disconnect(s, d, version),
        Packet::Auth(a) => auth(s, a, version),
    }
}

fn packet_id<S: Sink>(s: &mut S, id: u16) -> Result<(), EncodeError> {
    if id == 0 {
        return Err(EncodeError::InvalidPacket(
            "packet identifier 0 [MQTT-2.2.1-3]",
        ));
    }
    s.u16(id);
    Ok(())
}

fn props<S: Sink>(
    s: &mut S,
    props: &crate::Properties,
    version: ProtocolVersion,
    rules: Rules,
) -> Result<(), EncodeError> {
    if version.is_v5() {
        properties::encode(s, props, rules)?;
    }
    Ok(())
}

fn connect<S: Sink>(s: &mut S, c: &Connect, version: ProtocolVersion) -> Result<(), EncodeError> {
    if c.protocol != version {
        return Err(EncodeError::InvalidPacket(
            "CONNECT protocol differs from the encoding level",
        ));
    }
    if !version.is_v5() && c.password.is_some() && c.username.is_none() {
        return Err(EncodeError::InvalidPacket(
            "MQTT 3.x password without user name [MQTT-3.1.2-22]",
        ));
    }
    let name: &[u8] = if version == ProtocolVersion::V3_1 {
        b"MQIsdp"
    } else {
        b"MQTT"
    };
    put_binary(s, "protocol name", name)?;
    s.u8(version.level());
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(will) = &c.will {
        flags |= 0b100 | (will.qos as u8) << 3 | u8::from(will.retain) << 5;
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    s.u8(flags);
    s.u16(c.keep_alive);
    props(s, &c.properties, version, properties::CONNECT)?;
    put_string(s, "client identifier", &c.client_id)?;
    if let Some(will) = &c.will {
        props(s, &will.properties, version, properties::WILL)?;
        put_string(s, "will topic", &will.topic)?;
        put_binary(s, "will payload", &will.payload)?;
    }
    if let Some(username) = &c.username {
        put_string(s, "user name", username)?;
    }
    if let Some(password) = &c.password {
        put_binary(s, "password", password)?;
    }
    Ok(())
}

/// The MQTT 3.x CONNACK return code nearest to an MQTT 5 reason code. Codes below 0x80 pass
/// through, so the 3.x constants (0x00-0x05) are written as given.
fn v3_connack_code(code: ReasonCode) -> u8 {
    match code {
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => 0x01,
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => 0x02,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD => 0x04,
        ReasonCode::NOT_AUTHORIZED | ReasonCode::BANNED | ReasonCode::BAD_AUTHENTICATION_METHOD => {
            0x05
        }
        ReasonCode(code) if code < 0x80 => code,
        _ => 0x03,
    }
}

fn connack<S: Sink>(s: &mut S, c: &ConnAck, version: ProtocolVersion) -> Result<(), EncodeError> {
    s.u8(u8::from(c.session_present));
    if version.is_v5() {
        s.u8(c.code.0);
    } else {
        s.u8(v3_connack_code(c.code));
    }
    props(s, &c.properties, version, properties::CONNACK)
}

fn publish<S: Sink>(s: &mut S, p: &Publish, version: ProtocolVersion) -> Result<(), EncodeError> {
    if p.dup && p.qos == QoS::AtMostOnce {
        return Err(EncodeError::InvalidPacket(
            "DUP set on a QoS 0 PUBLISH [MQTT-3.3.1-2]",
        ));
    }
    put_string(s, "topic name", &p.topic)?;
    if p.qos != QoS::AtMostOnce {
        let id = p.packet_id.ok_or(EncodeError::InvalidPacket(
            "QoS 1/2 PUBLISH without a packet identifier",
        ))?;
        packet_id(s, id)?;
    }
    props(s, &p.properties, version, properties::PUBLISH)?;
    s.bytes(&p.payload);
    Ok(())
}

/// Reason and properties for PUBACK & co, DISCONNECT and AUTH: nothing for success without
/// properties (the short form every client expects), otherwise the reason followed by the
/// property length even when it is 0. Omitting a zero property length is also legal, but
/// some clients (rumqttc 0.25 for DISCONNECT) then wait for a byte that never comes.
fn reason_and_props<S: Sink>(
    s: &mut S,
    reason: ReasonCode,
    p: &crate::Properties,
    rules: Rules,
) -> Result<(), EncodeError> {
    let no_props = properties::is_empty(p, rules)?;
    if reason == ReasonCode::SUCCESS && no_props {
        return Ok(());
    }
    s.u8(reason.0);
    properties::encode(s, p, rules)
}

fn pub_response<S: Sink>(
    s: &mut S,
    r: &PubResponse,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    packet_id(s, r.packet_id)?;
    if version.is_v5() {
        reason_and_props(s, r.reason, &r.properties, properties::ACK)?;
    }
    Ok(())
}

fn subscribe<S: Sink>(
    s: &mut S,
    sub: &Subscribe,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    packet_id(s, sub.packet_id)?;
    props(s, &sub.properties, version, properties::SUBSCRIBE)?;
    for subscription in &sub.subscriptions {
        put_string(s, "topic filter", &subscription.filter)?;
        let o = subscription.options;
        let mut byte = o.qos as u8;
        if version.is_v5() {
            if o.retain_handling > 2 {
                return Err(EncodeError::InvalidPacket("retain handling above 2"));
            }
            byte |= u8::from(o.no_local) << 2
                | u8::from(o.retain_as_published) << 3
                | o.retain_handling << 4;
        }
        s.u8(byte);
    }
    Ok(())
}

fn suback<S: Sink>(s: &mut S, a: &SubAck, version: ProtocolVersion) -> Result<(), EncodeError> {
    packet_id(s, a.packet_id)?;
    props(s, &a.properties, version, properties::ACK)?;
    for &code in &a.reasons {
        if version.is_v5() || !code.is_error() {
            s.u8(code.0);
        } else {
            s.u8(ReasonCode::V3_SUBACK_FAILURE.0);
        }
    }
    Ok(())
}

fn unsubscribe<S: Sink>(
    s: &mut S,
    u: &Unsubscribe,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    packet_id(s, u.packet_id)?;
    props(s, &u.properties, version, properties::UNSUBSCRIBE)?;
    for filter in &u.filters {
        put_string(s, "topic filter", filter)?;
    }
    Ok(())
}

fn unsuback<S: Sink>(s: &mut S, a: &UnsubAck, version: ProtocolVersion) -> Result<(), EncodeError> {
    packet_id(s, a.packet_id)?;
    if version.is_v5() {
        properties::encode(s, &a.properties, properties::ACK)?;
        for code in &a.reasons {
            s.u8(code.0);
        }
    }
    Ok(())
}

fn disconnect<S: Sink>(
    s: &mut S,
    d: &Disconnect,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    if version.is_v5() {
        reason_and_props(s, d.reason, &d.properties, properties::DISCONNECT)?;
    }
    Ok(())
}

fn auth<S: Sink>(s: &mut S, a: &Auth, version: ProtocolVersion) -> Result<(), EncodeError> {
    if !version.is_v5() {
        return Err(EncodeError::InvalidPacketForVersion {
            packet: "AUTH",
            version,
        });
    }
    reason_and_props(s, a.reason, &a.properties, properties::AUTH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, DecodeContext, Properties, Subscription, SubscriptionOptions, Will};
    use bytes::Bytes;
    use ProtocolVersion::{V3_1, V3_1_1, V5};

    fn enc(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode(packet, version, &mut buf).expect("encodable");
        assert_eq!(encoded_len(packet, version), buf.len());
        // Everything we encode must decode back to the same packet.
        let ctx = DecodeContext {
            version: match packet {
                Packet::Connect(_) => None,
                _ => Some(version),
            },
            max_packet_size: u32::MAX,
        };
        let mut copy = buf.clone();
        assert_eq!(decode(&mut copy, &ctx).as_ref(), Ok(&Some(packet.clone())));
        buf.to_vec()
    }

    fn ack(packet_id: u16, reason: u8) -> PubResponse {
        PubResponse {
            packet_id,
            reason: ReasonCode(reason),
            properties: Properties::default(),
        }
    }

    #[test]
    fn connack_3_1_1() {
        assert_eq!(
            enc(&Packet::ConnAck(ConnAck::default()), V3_1_1),
            [0x20, 0x02, 0x00, 0x00]
        );
        let refused = ConnAck {
            code: ReasonCode::V3_NOT_AUTHORIZED,
            ..ConnAck::default()
        };
        assert_eq!(
            enc(&Packet::ConnAck(refused), V3_1_1),
            [0x20, 0x02, 0x00, 0x05]
        );
    }

    #[test]
    fn connack_v5_codes_map_to_3x_return_codes() {
        for (v5, v3) in [
            (0x84, 0x01),
            (0x85, 0x02),
            (0x88, 0x03),
            (0x89, 0x03),
            (0x86, 0x04),
            (0x87, 0x05),
            (0x80, 0x03),
        ] {
            let packet = Packet::ConnAck(ConnAck {
                code: ReasonCode(v5),
                ..ConnAck::default()
            });
            let mut buf = BytesMut::new();
            encode(&packet, V3_1_1, &mut buf).unwrap();
            assert_eq!(&buf[..], &[0x20, 0x02, 0x00, v3], "{v5:#x}");
        }
    }

    #[test]
    fn connack_v5() {
        assert_eq!(
            enc(&Packet::ConnAck(ConnAck::default()), V5),
            [0x20, 0x03, 0x00, 0x00, 0x00]
        );
        let packet = Packet::ConnAck(ConnAck {
            session_present: true,
            code: ReasonCode::SUCCESS,
            properties: Properties {
                receive_maximum: Some(20),
                ..Properties::default()
            },
        });
        assert_eq!(
            enc(&packet, V5),
            [0x20, 0x06, 0x01, 0x00, 0x03, 0x21, 0x00, 0x14]
        );
    }

    #[test]
    fn packet_id_offset_points_at_the_identifier() {
        for version in [V3_1_1, V5] {
            for topic in ["t", "a/much/longer/topic/name"] {
                let publish = Packet::Publish(Publish {
                    qos: QoS::AtLeastOnce,
                    topic: topic.into(),
                    packet_id: Some(0x1234),
                    payload: bytes::Bytes::from_static(b"payload"),
                    ..Publish::default()
                });
                let bytes = enc(&publish, version);
                let at = publish_packet_id_offset(&bytes).expect("QoS 1 has an id");
                assert_eq!(&bytes[at..at + 2], &[0x12, 0x34]);
            }
        }
        let qos0 = Packet::Publish(Publish {
            topic: "t".into(),
            ..Publish::default()
        });
        assert_eq!(publish_packet_id_offset(&enc(&qos0, V3_1_1)), None);
        assert_eq!(encoded_publish_topic(&enc(&qos0, V3_1_1)), Some(&b"t"[..]));
        assert_eq!(encoded_publish_topic(&enc(&Packet::PingReq, V3_1_1)), None);
        assert_eq!(
            publish_packet_id_offset(&enc(&Packet::PingReq, V3_1_1)),
            None
        );
        assert_eq!(publish_packet_id_offset(&[0x32, 0x05, 0x00]), None);
    }

    #[test]
    fn puback_forms() {
        assert_eq!(
            enc(&Packet::PubAck(ack(1, 0)), V5),
            [0x40, 0x02, 0x00, 0x01]
        );
        assert_eq!(
            enc(&Packet::PubAck(ack(1, 0x10)), V5),
            [0x40, 0x04, 0x00, 0x01, 0x10, 0x00]
        );
        let with_reason_string = PubResponse {
            properties: Properties {
                reason_string: Some("x".into()),
                ..Properties::default()
            },
            ..ack(1, 0)
        };
        assert_eq!(
            enc(&Packet::PubAck(with_reason_string), V5),
            [0x40, 0x08, 0x00, 0x01, 0x00, 0x04, 0x1F, 0x00, 0x01, b'x']
        );
        // 3.x has no reason: always the two-byte form.
        let mut buf = BytesMut::new();
        encode(&Packet::PubAck(ack(1, 0x80)), V3_1_1, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x40, 0x02, 0x00, 0x01]);
    }

    #[test]
    fn pubrec_pubrel_pubcomp() {
        assert_eq!(
            enc(&Packet::PubRec(ack(7, 0)), V3_1_1),
            [0x50, 0x02, 0x00, 0x07]
        );
        assert_eq!(
            enc(&Packet::PubRel(ack(7, 0)), V3_1),
            [0x62, 0x02, 0x00, 0x07]
        );
        assert_eq!(
            enc(&Packet::PubComp(ack(7, 0x92)), V5),
            [0x70, 0x04, 0x00, 0x07, 0x92, 0x00]
        );
    }

    #[test]
    fn suback_v3_return_codes() {
        let packet = Packet::SubAck(SubAck {
            packet_id: 10,
            reasons: vec![
                ReasonCode::GRANTED_QOS_0,
                ReasonCode::GRANTED_QOS_1,
                ReasonCode::GRANTED_QOS_2,
                ReasonCode::V3_SUBACK_FAILURE,
            ],
            properties: Properties::default(),
        });
        assert_eq!(
            enc(&packet, V3_1_1),
            [0x90, 0x06, 0x00, 0x0A, 0x00, 0x01, 0x02, 0x80]
        );
        // An MQTT 5 failure code becomes the 3.x failure code.
        let packet = Packet::SubAck(SubAck {
            packet_id: 10,
            reasons: vec![ReasonCode::NOT_AUTHORIZED],
            properties: Properties::default(),
        });
        let mut buf = BytesMut::new();
        encode(&packet, V3_1, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x90, 0x03, 0x00, 0x0A, 0x80]);
        assert_eq!(enc(&packet, V5), [0x90, 0x04, 0x00, 0x0A, 0x00, 0x87]);
    }

    #[test]
    fn unsuback() {
        let packet = Packet::UnsubAck(UnsubAck {
            packet_id: 1,
            reasons: vec![],
            properties: Properties::default(),
        });
        assert_eq!(enc(&packet, V3_1_1), [0xB0, 0x02, 0x00, 0x01]);
        let packet = Packet::UnsubAck(UnsubAck {
            packet_id: 1,
            reasons: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
            properties: Properties::default(),
        });
        assert_eq!(enc(&packet, V5), [0xB0, 0x05, 0x00, 0x01, 0x00, 0x00, 0x11]);
    }

    #[test]
    fn ping_disconnect_auth() {
        for v in [V3_1, V3_1_1, V5] {
            assert_eq!(enc(&Packet::PingReq, v), [0xC0, 0x00]);
            assert_eq!(enc(&Packet::PingResp, v), [0xD0, 0x00]);
            assert_eq!(
                enc(&Packet::Disconnect(Disconnect::default()), v),
                [0xE0, 0x00]
            );
        }
        let taken_over = Packet::Disconnect(Disconnect {
            reason: ReasonCode::SESSION_TAKEN_OVER,
            ..Disconnect::default()
        });
        assert_eq!(enc(&taken_over, V5), [0xE0, 0x02, 0x8E, 0x00]);
        assert_eq!(enc(&Packet::Auth(Auth::default()), V5), [0xF0, 0x00]);
        let mut buf = BytesMut::new();
        assert_eq!(
            encode(&Packet::Auth(Auth::default()), V3_1_1, &mut buf),
            Err(EncodeError::InvalidPacketForVersion {
                packet: "AUTH",
                version: V3_1_1
            })
        );
        assert!(buf.is_empty());
        assert_eq!(
            encoded_len(&Packet::Auth(Auth::default()), V3_1),
            usize::MAX
        );
    }

    #[test]
    fn publish() {
        let packet = Packet::Publish(Publish {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hi"),
            ..Publish::default()
        });
        assert_eq!(
            enc(&packet, V3_1_1),
            [0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i']
        );
        let packet = Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "a/b".into(),
            packet_id: Some(1),
            payload: Bytes::from_static(b"hi"),
            properties: Properties::default(),
        });
        assert_eq!(
            enc(&packet, V5),
            [0x3B, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, 0x00, b'h', b'i']
        );
    }

    #[test]
    fn publish_refusals_write_nothing() {
        let mut buf = BytesMut::new();
        let no_id = Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            topic: "a".into(),
            ..Publish::default()
        });
        assert!(matches!(
            encode(&no_id, V5, &mut buf),
            Err(EncodeError::InvalidPacket(_))
        ));
        let zero_id = Packet::Publish(Publish {
            qos: QoS::ExactlyOnce,
            topic: "a".into(),
            packet_id: Some(0),
            ..Publish::default()
        });
        assert!(matches!(
            encode(&zero_id, V5, &mut buf),
            Err(EncodeError::InvalidPacket(_))
        ));
        // [MQTT-3.3.1-2]
        let dup_qos0 = Packet::Publish(Publish {
            dup: true,
            topic: "a".into(),
            ..Publish::default()
        });
        assert!(matches!(
            encode(&dup_qos0, V3_1_1, &mut buf),
            Err(EncodeError::InvalidPacket(_))
        ));
        let long_topic = Packet::Publish(Publish {
            topic: "a".repeat(65_536),
            ..Publish::default()
        });
        assert_eq!(
            encode(&long_topic, V3_1_1, &mut buf),
            Err(EncodeError::FieldTooLong {
                field: "topic name",
                len: 65_536
            })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn remaining_length_above_268435455_is_refused() {
        // Zeroed allocations this large are lazily mapped: the encoder only reads the length.
        let payload = Bytes::from(vec![0u8; MAX_VBI]);
        let packet = Packet::Publish(Publish {
            topic: "a".into(),
            payload,
            ..Publish::default()
        });
        let mut buf = BytesMut::new();
        assert_eq!(
            encode(&packet, V3_1_1, &mut buf),
            Err(EncodeError::PacketTooLarge { size: MAX_VBI + 3 })
        );
        assert!(buf.is_empty());
        assert_eq!(encoded_len(&packet, V3_1_1), usize::MAX);
    }

    fn connect(protocol: ProtocolVersion) -> Connect {
        Connect {
            protocol,
            clean_start: true,
            keep_alive: 60,
            client_id: "c".into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }
    }

    #[test]
    fn connect_per_level() {
        let packet = Packet::Connect(Box::new(connect(V3_1_1)));
        assert_eq!(
            enc(&packet, V3_1_1),
            [
                0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x01,
                b'c'
            ]
        );
        let packet = Packet::Connect(Box::new(connect(V3_1)));
        assert_eq!(
            enc(&packet, V3_1),
            [
                0x10, 0x0F, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C,
                0x00, 0x01, b'c'
            ]
        );
        let packet = Packet::Connect(Box::new(connect(V5)));
        assert_eq!(
            enc(&packet, V5),
            [
                0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00,
                0x01, b'c'
            ]
        );
        let mut buf = BytesMut::new();
        assert!(matches!(
            encode(&packet, V3_1_1, &mut buf),
            Err(EncodeError::InvalidPacket(_))
        ));
    }

    #[test]
    fn connect_with_will_and_credentials() {
        let mut c = connect(V5);
        c.will = Some(Will {
            topic: "w".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties {
                will_delay_interval: Some(5),
                ..Properties::default()
            },
        });
        c.username = Some("u".into());
        c.password = Some(Bytes::from_static(b"p"));
        let bytes = enc(&Packet::Connect(Box::new(c)), V5);
        // Flags: user name, password, will retain, will QoS 1, will, clean start.
        assert_eq!(bytes[9], 0b1110_1110);
        let mut v3 = connect(V3_1_1);
        v3.password = Some(Bytes::from_static(b"p"));
        let mut buf = BytesMut::new();
        assert!(matches!(
            encode(&Packet::Connect(Box::new(v3)), V3_1_1, &mut buf),
            Err(EncodeError::InvalidPacket(_))
        ));
    }

    #[test]
    fn subscribe_and_unsubscribe() {
        let packet = Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: "a/b".into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Properties::default(),
        });
        assert_eq!(
            enc(&packet, V3_1_1),
            [0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01]
        );
        let packet = Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: "a".into(),
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 1,
                },
            }],
            properties: Properties {
                subscription_identifiers: vec![300],
                ..Properties::default()
            },
        });
        assert_eq!(
            enc(&packet, V5),
            [0x82, 0x0A, 0x00, 0x01, 0x03, 0x0B, 0xAC, 0x02, 0x00, 0x01, b'a', 0x1E]
        );
        let packet = Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            filters: vec!["a/#".into()],
            properties: Properties::default(),
        });
        assert_eq!(
            enc(&packet, V3_1_1),
            [0xA2, 0x07, 0x00, 0x02, 0x00, 0x03, b'a', b'/', b'#']
        );
        assert_eq!(
            enc(&packet, V5),
            [0xA2, 0x08, 0x00, 0x02, 0x00, 0x00, 0x03, b'a', b'/', b'#']
        );
    }

    #[test]
    fn properties_are_not_written_before_mqtt_5() {
        let packet = Packet::Publish(Publish {
            topic: "a".into(),
            properties: Properties {
                message_expiry_interval: Some(1),
                ..Properties::default()
            },
            ..Publish::default()
        });
        let mut buf = BytesMut::new();
        encode(&packet, V3_1_1, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x30, 0x03, 0x00, 0x01, b'a']);
    }
}
