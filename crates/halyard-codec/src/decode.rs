//! Decoding: bytes from a caller-owned buffer into [`Packet`]s.
//!
//! The fixed header is checked first (packet type, flags, remaining length and the size
//! limit), so a bad or oversized packet fails before its body is buffered. The body is then
//! split off the buffer without copying and parsed by a bounded [`Reader`]: a field that runs
//! past the declared remaining length is malformed, never a panic or a wait for more bytes.

use bytes::{Buf, BytesMut};

use crate::properties::{self, Rules};
use crate::topic::{is_valid_topic_filter, is_valid_topic_name, parse_shared_subscription};
use crate::wire::{peek_vbi, Reader};
use crate::{
    Auth, ConnAck, Connect, DecodeError, Disconnect, Packet, ProtocolVersion, PubResponse, Publish,
    QoS, ReasonCode, SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe,
    Will,
};

pub(crate) const CONNECT: u8 = 1;
pub(crate) const CONNACK: u8 = 2;
pub(crate) const PUBLISH: u8 = 3;
pub(crate) const PUBACK: u8 = 4;
pub(crate) const PUBREC: u8 = 5;
pub(crate) const PUBREL: u8 = 6;
pub(crate) const PUBCOMP: u8 = 7;
pub(crate) const SUBSCRIBE: u8 = 8;
pub(crate) const SUBACK: u8 = 9;
pub(crate) const UNSUBSCRIBE: u8 = 10;
pub(crate) const UNSUBACK: u8 = 11;
pub(crate) const PINGREQ: u8 = 12;
pub(crate) const PINGRESP: u8 = 13;
pub(crate) const DISCONNECT: u8 = 14;
pub(crate) const AUTH: u8 = 15;

/// Context the decoder needs: which protocol level the connection speaks, and the largest
/// packet this side accepts.
///
/// `version` is `None` before CONNECT: then only CONNECT is accepted and any other first
/// packet is a Protocol Error [MQTT-3.1.0-1]. Once it is `Some`, a CONNECT is a Protocol Error
/// (a second CONNECT, [MQTT-3.1.0-2]). `max_packet_size` counts the whole packet, fixed
/// header included.
#[derive(Debug, Clone, Copy)]
pub struct DecodeContext {
    /// The connection's protocol level, `None` until CONNECT has been decoded.
    pub version: Option<ProtocolVersion>,
    /// Largest whole packet accepted; larger ones fail with [`DecodeError::PacketTooLarge`].
    pub max_packet_size: u32,
}

/// Decodes one packet from the front of `buf`.
///
/// `Ok(None)`: more bytes are needed and `buf` is untouched. `Ok(Some(packet))`: exactly that
/// packet's bytes were consumed. `Err`: the connection must be closed, the error says why (and
/// `buf` is left in an unspecified state). Payloads and binary fields share `buf`'s memory.
/// The decoder does not reserve space in `buf`: growing it is the caller's job, bounded by
/// `max_packet_size`.
///
/// # Errors
///
/// Any [`DecodeError`]: the packet breaks the grammar or a protocol rule, or is larger than
/// `ctx.max_packet_size` (reported from the fixed header alone).
pub fn decode(buf: &mut BytesMut, ctx: &DecodeContext) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet_type = check_first_byte(first, ctx.version)?;
    let Some((remaining, len_bytes)) = peek_vbi(buf.get(1..).unwrap_or_default())? else {
        return Ok(None);
    };
    let header = 1 + len_bytes;
    // Cannot overflow: `remaining` is at most 268,435,455 and `header` at most 5.
    let size = header + remaining;
    if size > ctx.max_packet_size as usize {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: ctx.max_packet_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut body = buf.split_to(size).freeze();
    body.advance(header);
    let mut r = Reader::new(body);
    let flags = first & 0x0F;
    let packet = match (packet_type, ctx.version) {
        (CONNECT, _) => decode_connect(&mut r)?,
        (_, Some(version)) => decode_other(packet_type, flags, version, &mut r)?,
        (_, None) => return Err(FIRST_NOT_CONNECT),
    };
    r.finish()?;
    Ok(Some(packet))
}

const FIRST_NOT_CONNECT: DecodeError =
    DecodeError::ProtocolError("first packet must be CONNECT [MQTT-3.1.0-1]");

/// Checks what the first byte alone can tell: packet type, reserved flags, PUBLISH QoS/DUP.
fn check_first_byte(first: u8, version: Option<ProtocolVersion>) -> Result<u8, DecodeError> {
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    if packet_type == 0 {
        return Err(DecodeError::MalformedPacket("reserved packet type 0"));
    }
    let version = match (packet_type, version) {
        (CONNECT, None) => None,
        (CONNECT, Some(_)) => {
            return Err(DecodeError::ProtocolError("second CONNECT [MQTT-3.1.0-2]"))
        }
        (_, None) => return Err(FIRST_NOT_CONNECT),
        (_, Some(version)) => Some(version),
    };
    if packet_type == AUTH && version.is_some_and(|v| !v.is_v5()) {
        return Err(DecodeError::MalformedPacket(
            "reserved packet type 15 (AUTH exists only in MQTT 5)",
        ));
    }
    if packet_type == PUBLISH {
        let qos = (flags >> 1) & 0b11;
        if qos == 3 {
            return Err(DecodeError::MalformedPacket("PUBLISH QoS 3 [MQTT-3.3.1-4]"));
        }
        if qos == 0 && flags & 0b1000 != 0 {
            return Err(DecodeError::MalformedPacket(
                "DUP set on a QoS 0 PUBLISH [MQTT-3.3.1-2]",
            ));
        }
        return Ok(packet_type);
    }
    // MQTT 3.1 put DUP/QoS bits on PUBREL, SUBSCRIBE and UNSUBSCRIBE (and its clients set DUP
    // on retries), so like Mosquitto we only enforce reserved flags from 3.1.1 on. CONNECT is
    // always checked, since the level is not known yet.
    if version == Some(ProtocolVersion::V3_1) {
        return Ok(packet_type);
    }
    let expected = match packet_type {
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(DecodeError::MalformedPacket(
            "reserved fixed header flags [MQTT-2.1.3-1]",
        ));
    }
    Ok(packet_type)
}

fn decode_other(
    packet_type: u8,
    flags: u8,
    version: ProtocolVersion,
    r: &mut Reader,
) -> Result<Packet, DecodeError> {
    Ok(match packet_type {
        CONNACK => Packet::ConnAck(decode_connack(version, r)?),
        PUBLISH => Packet::Publish(decode_publish(flags, version, r)?),
        PUBACK => Packet::PubAck(decode_pub_response(version, r, PUBACK_CODES)?),
        PUBREC => Packet::PubRec(decode_pub_response(version, r, PUBACK_CODES)?),
        PUBREL => Packet::PubRel(decode_pub_response(version, r, PUBREL_CODES)?),
        PUBCOMP => Packet::PubComp(decode_pub_response(version, r, PUBREL_CODES)?),
        SUBSCRIBE => Packet::Subscribe(decode_subscribe(version, r)?),
        SUBACK => Packet::SubAck(decode_suback(version, r)?),
        UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(version, r)?),
        UNSUBACK => Packet::UnsubAck(decode_unsuback(version, r)?),
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect(decode_disconnect(version, r)?),
        // `check_first_byte` let AUTH through only for MQTT 5 and rejected type 0.
        _ => Packet::Auth(decode_auth(r)?),
    })
}

// Reason codes each MQTT 5 packet type may carry (sections 3.2.2.2, 3.4.2.1, 3.6.2.1,
// 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1). Anything else is malformed.
const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];
/// MQTT 3.x CONNACK return codes 0-5 and SUBACK return codes.
const V3_CONNACK_CODES: &[u8] = &[0, 1, 2, 3, 4, 5];
const V3_SUBACK_CODES: &[u8] = &[0, 1, 2, 0x80];

fn reason(r: &mut Reader, allowed: &[u8]) -> Result<ReasonCode, DecodeError> {
    let code = r.u8()?;
    if allowed.contains(&code) {
        Ok(ReasonCode(code))
    } else {
        Err(DecodeError::MalformedPacket(
            "reason code not allowed for this packet type",
        ))
    }
}

/// A packet identifier where one is required: never 0 [MQTT-2.2.1-3].
fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::ProtocolError(
            "packet identifier 0 [MQTT-2.2.1-3]",
        )),
        id => Ok(id),
    }
}

fn props(
    version: ProtocolVersion,
    r: &mut Reader,
    rules: Rules,
) -> Result<crate::Properties, DecodeError> {
    if version.is_v5() {
        properties::decode(r, rules)
    } else {
        Ok(crate::Properties::default())
    }
}

fn decode_connect(r: &mut Reader) -> Result<Packet, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 4) => ProtocolVersion::V3_1_1,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", 3) => ProtocolVersion::V3_1,
        (b"MQTT" | b"MQIsdp", _) => return Err(DecodeError::UnsupportedProtocolVersion { level }),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let flags = r.u8()?;
    if flags & 0b0000_0001 != 0 {
        return Err(DecodeError::MalformedPacket(
            "CONNECT reserved flag set [MQTT-3.1.2-3]",
        ));
    }
    let clean_start = flags & 0b0000_0010 != 0;
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    let has_password = flags & 0b0100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if !will_flag && will_qos != 0 {
        return Err(DecodeError::MalformedPacket(
            "will QoS without will flag [MQTT-3.1.2-11]",
        ));
    }
    if !will_flag && will_retain {
        return Err(DecodeError::MalformedPacket(
            "will retain without will flag [MQTT-3.1.2-13]",
        ));
    }
    let will_qos =
        QoS::from_u8(will_qos).ok_or(DecodeError::MalformedPacket("will QoS 3 [MQTT-3.1.2-12]"))?;
    if !protocol.is_v5() && has_password && !has_username {
        return Err(DecodeError::MalformedPacket(
            "password without user name (MQTT 3.1.1 [MQTT-3.1.2-22])",
        ));
    }
    let keep_alive = r.u16()?;
    let properties = props(protocol, r, properties::CONNECT)?;
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = props(protocol, r, properties::WILL)?;
        let topic = r.string()?;
        check_topic_name(&topic)?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Packet::Connect(Box::new(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })))
}

/// A non-empty topic name without wildcards (will topic, or PUBLISH without an alias).
fn check_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.is_empty() {
        Err(DecodeError::MalformedPacket(
            "empty topic name [MQTT-4.7.3-1]",
        ))
    } else if !is_valid_topic_name(topic) {
        Err(DecodeError::TopicNameInvalid(
            "wildcard in topic name [MQTT-3.3.2-2]",
        ))
    } else {
        Ok(())
    }
}

fn decode_connack(version: ProtocolVersion, r: &mut Reader) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0b1111_1110 != 0 {
        return Err(DecodeError::MalformedPacket(
            "CONNACK reserved flags set [MQTT-3.2.2-1]",
        ));
    }
    let codes = if version.is_v5() {
        CONNACK_CODES
    } else {
        V3_CONNACK_CODES
    };
    let code = reason(r, codes)?;
    let properties = props(version, r, properties::CONNACK)?;
    Ok(ConnAck {
        session_present: flags & 1 != 0,
        code,
        properties,
    })
}

fn decode_publish(
    flags: u8,
    version: ProtocolVersion,
    r: &mut Reader,
) -> Result<Publish, DecodeError> {
    // `check_first_byte` already rejected QoS 3.
    let qos = QoS::from_u8((flags >> 1) & 0b11).unwrap_or_default();
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(packet_id(r)?)
    };
    let properties = props(version, r, properties::PUBLISH)?;
    if properties.topic_alias == Some(0) {
        return Err(DecodeError::TopicAliasInvalid(
            "topic alias 0 [MQTT-3.3.2-8]",
        ));
    }
    if topic.is_empty() && version.is_v5() {
        // In MQTT 5 an empty topic stands for the one the alias maps to; the core resolves it.
        if properties.topic_alias.is_none() {
            return Err(DecodeError::ProtocolError(
                "empty topic name without a topic alias",
            ));
        }
    } else {
        check_topic_name(&topic)?;
    }
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        payload: r.rest(),
        properties,
    })
}

fn decode_pub_response(
    version: ProtocolVersion,
    r: &mut Reader,
    codes: &[u8],
) -> Result<PubResponse, DecodeError> {
    let packet_id = packet_id(r)?;
    let mut response = PubResponse {
        packet_id,
        ..PubResponse::default()
    };
    // MQTT 5: remaining length 2 = success without properties, 3 = a reason without
    // properties (3.4.2.1). MQTT 3.x has nothing more; `finish` rejects trailing bytes.
    if version.is_v5() && !r.is_empty() {
        response.reason = reason(r, codes)?;
        if !r.is_empty() {
            response.properties = properties::decode(r, properties::ACK)?;
        }
    }
    Ok(response)
}

fn decode_subscribe(version: ProtocolVersion, r: &mut Reader) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = props(version, r, properties::SUBSCRIBE)?;
    let mut subscriptions = Vec::new();
    while !r.is_empty() {
        let filter = topic_filter(r)?;
        let byte = r.u8()?;
        let options = subscription_options(version, byte)?;
        if options.no_local && parse_shared_subscription(&filter).is_some() {
            return Err(DecodeError::ProtocolError(
                "no local on a shared subscription [MQTT-3.8.3-4]",
            ));
        }
        subscriptions.push(Subscription { filter, options });
    }
    if subscriptions.is_empty() {
        return Err(DecodeError::ProtocolError(
            "SUBSCRIBE without topic filters [MQTT-3.8.3-2]",
        ));
    }
    Ok(Subscribe {
        packet_id,
        subscriptions,
        properties,
    })
}

/// A syntactically invalid filter is a Malformed Packet (4.7.1 / 4.7.3), not a per-filter
/// 0x8F: the broker answers 0x8F itself for filters it merely refuses.
fn topic_filter(r: &mut Reader) -> Result<String, DecodeError> {
    let filter = r.string()?;
    if is_valid_topic_filter(&filter) {
        Ok(filter)
    } else {
        Err(DecodeError::MalformedPacket(
            "invalid topic filter [MQTT-4.7.1-1] [MQTT-4.7.1-2] [MQTT-4.7.3-1] [MQTT-4.8.2-2]",
        ))
    }
}

fn subscription_options(
    version: ProtocolVersion,
    byte: u8,
) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = if version.is_v5() {
        0b1100_0000
    } else {
        0b1111_1100
    };
    if byte & reserved != 0 {
        return Err(DecodeError::MalformedPacket(
            "subscription options reserved bits set [MQTT-3.8.3-5]",
        ));
    }
    let qos =
        QoS::from_u8(byte & 0b11).ok_or(DecodeError::MalformedPacket("subscription QoS 3"))?;
    let retain_handling = (byte >> 4) & 0b11;
    if retain_handling == 3 {
        return Err(DecodeError::MalformedPacket("retain handling 3"));
    }
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & 0b0000_0100 != 0,
        retain_as_published: byte & 0b0000_1000 != 0,
        retain_handling,
    })
}

fn decode_suback(version: ProtocolVersion, r: &mut Reader) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = props(version, r, properties::ACK)?;
    let codes = if version.is_v5() {
        SUBACK_CODES
    } else {
        V3_SUBACK_CODES
    };
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        reasons.push(reason(r, codes)?);
    }
    if reasons.is_empty() {
        return Err(DecodeError::ProtocolError(
            "SUBACK without reason codes [MQTT-3.8.4-6]",
        ));
    }
    Ok(SubAck {
        packet_id,
        reasons,
        properties,
    })
}

fn decode_unsubscribe(
    version: ProtocolVersion,
    r: &mut Reader,
) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = props(version, r, properties::UNSUBSCRIBE)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(topic_filter(r)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::ProtocolError(
            "UNSUBSCRIBE without topic filters [MQTT-3.10.3-2]",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_unsuback(version: ProtocolVersion, r: &mut Reader) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let mut unsuback = UnsubAck {
        packet_id,
        reasons: Vec::new(),
        properties: crate::Properties::default(),
    };
    // MQTT 3.x UNSUBACK is only the packet id; `finish` rejects anything after it.
    if version.is_v5() {
        unsuback.properties = properties::decode(r, properties::ACK)?;
        unsuback.reasons.reserve(r.remaining());
        while !r.is_empty() {
            unsuback.reasons.push(reason(r, UNSUBACK_CODES)?);
        }
        if unsuback.reasons.is_empty() {
            return Err(DecodeError::ProtocolError(
                "UNSUBACK without reason codes [MQTT-3.11.3-2]",
            ));
        }
    }
    Ok(unsuback)
}

fn decode_disconnect(version: ProtocolVersion, r: &mut Reader) -> Result<Disconnect, DecodeError> {
    let mut disconnect = Disconnect::default();
    // MQTT 5: remaining length 0 = normal disconnection, 1 = a reason without properties.
    // MQTT 3.x DISCONNECT is empty; `finish` rejects anything in it.
    if version.is_v5() && !r.is_empty() {
        disconnect.reason = reason(r, DISCONNECT_CODES)?;
        if !r.is_empty() {
            disconnect.properties = properties::decode(r, properties::DISCONNECT)?;
        }
    }
    Ok(disconnect)
}

fn decode_auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let mut auth = Auth::default();
    // Remaining length 0 = success without properties (3.15.2.1).
    if !r.is_empty() {
        auth.reason = reason(r, AUTH_CODES)?;
        if !r.is_empty() {
            auth.properties = properties::decode(r, properties::AUTH)?;
        }
    }
    Ok(auth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Properties;
    use ProtocolVersion::{V3_1, V3_1_1, V5};

    const ALL: [ProtocolVersion; 3] = [V3_1, V3_1_1, V5];

    fn ctx(version: Option<ProtocolVersion>) -> DecodeContext {
        DecodeContext {
            version,
            max_packet_size: 1 << 20,
        }
    }

    fn dec(version: ProtocolVersion, bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(bytes), &ctx(Some(version)))
    }

    fn dec_connect(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(bytes), &ctx(None))
    }

    fn ok(version: ProtocolVersion, bytes: &[u8]) -> Packet {
        let mut buf = BytesMut::from(bytes);
        let packet = decode(&mut buf, &ctx(Some(version)))
            .expect("valid packet")
            .expect("complete packet");
        assert!(buf.is_empty(), "whole packet consumed");
        packet
    }

    #[track_caller]
    fn malformed(result: Result<Option<Packet>, DecodeError>) {
        assert!(
            matches!(result, Err(DecodeError::MalformedPacket(_))),
            "{result:?}"
        );
    }

    #[track_caller]
    fn protocol_error(result: Result<Option<Packet>, DecodeError>) {
        assert!(
            matches!(result, Err(DecodeError::ProtocolError(_))),
            "{result:?}"
        );
    }

    // ---- fixed header -------------------------------------------------------------------

    #[test]
    fn reserved_packet_type_0_is_malformed() {
        for v in ALL {
            malformed(dec(v, &[0x00, 0x00]));
        }
        malformed(dec_connect(&[0x00, 0x00]));
    }

    #[test]
    fn packet_type_15_is_malformed_before_mqtt_5() {
        malformed(dec(V3_1_1, &[0xF0, 0x00]));
        malformed(dec(V3_1, &[0xF0, 0x00]));
        assert_eq!(ok(V5, &[0xF0, 0x00]), Packet::Auth(Auth::default()));
    }

    #[test]
    fn pubrel_subscribe_unsubscribe_flags_must_be_0010() {
        // [MQTT-3.6.1-1] [MQTT-3.8.1-1] [MQTT-3.10.1-1]
        for v in [V3_1_1, V5] {
            malformed(dec(v, &[0x60, 0x02, 0x00, 0x01]));
            malformed(dec(v, &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00]));
            malformed(dec(v, &[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a']));
            assert!(matches!(
                ok(v, &[0x62, 0x02, 0x00, 0x01]),
                Packet::PubRel(_)
            ));
        }
    }

    #[test]
    fn other_flags_must_be_zero() {
        // [MQTT-2.1.3-1] [MQTT-3.15.1-1] [MQTT-3.14.1-1]
        for v in [V3_1_1, V5] {
            malformed(dec(v, &[0x41, 0x02, 0x00, 0x01]));
            malformed(dec(v, &[0xC1, 0x00]));
            malformed(dec(v, &[0xE2, 0x00]));
        }
        malformed(dec(V5, &[0xF1, 0x00]));
        malformed(dec_connect(&[0x11, 0x00]));
    }

    #[test]
    fn mqtt_3_1_tolerates_dup_and_qos_bits_on_subscribe() {
        // 3.1 clients set DUP on a retried SUBSCRIBE; Mosquitto accepts it too.
        let packet = ok(V3_1, &[0x8A, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x01]);
        assert!(matches!(packet, Packet::Subscribe(_)));
    }

    #[test]
    fn publish_qos_3_is_malformed() {
        // [MQTT-3.3.1-4]
        for v in ALL {
            malformed(dec(v, &[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]));
        }
    }

    #[test]
    fn publish_qos_0_with_dup_is_malformed() {
        // [MQTT-3.3.1-2]
        for v in ALL {
            malformed(dec(v, &[0x38, 0x03, 0x00, 0x01, b'a']));
        }
    }

    #[test]
    fn first_packet_must_be_connect() {
        // [MQTT-3.1.0-1]
        protocol_error(dec_connect(&[0xC0, 0x00]));
        protocol_error(dec_connect(&[0x30]));
    }

    #[test]
    fn second_connect_is_a_protocol_error() {
        // [MQTT-3.1.0-2]
        protocol_error(dec(V3_1_1, &[0x10]));
    }

    // ---- remaining length and size limit ------------------------------------------------

    #[test]
    fn remaining_length_of_five_bytes_is_malformed() {
        malformed(dec(V5, &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]));
        // Already decided on the fourth length byte.
        malformed(dec(V5, &[0x30, 0x80, 0x80, 0x80, 0x80]));
    }

    #[test]
    fn incomplete_input_needs_more_bytes_and_leaves_buffer_alone() {
        let whole = [0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'];
        for len in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..len]);
            assert_eq!(decode(&mut buf, &ctx(Some(V5))), Ok(None), "{len}");
            assert_eq!(&buf[..], &whole[..len]);
        }
        assert!(matches!(ok(V3_1_1, &whole), Packet::Publish(_)));
        // A length whose continuation byte has not arrived yet.
        assert_eq!(dec(V5, &[0x30, 0x80, 0x80]), Ok(None));
    }

    #[test]
    fn huge_declared_size_fails_fast_before_the_body() {
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        let ctx = DecodeContext {
            version: Some(V5),
            max_packet_size: 1024,
        };
        assert_eq!(
            decode(&mut buf, &ctx),
            Err(DecodeError::PacketTooLarge {
                size: 268_435_460,
                max: 1024
            })
        );
        // Also before CONNECT.
        let mut buf = BytesMut::from(&[0x10, 0xFF, 0xFF, 0x7F][..]);
        let ctx = DecodeContext {
            version: None,
            max_packet_size: 1024,
        };
        assert!(matches!(
            decode(&mut buf, &ctx),
            Err(DecodeError::PacketTooLarge { .. })
        ));
    }

    #[test]
    fn max_packet_size_counts_the_fixed_header() {
        let bytes = [0xC0, 0x00];
        let exact = DecodeContext {
            version: Some(V5),
            max_packet_size: 2,
        };
        assert_eq!(
            decode(&mut BytesMut::from(&bytes[..]), &exact),
            Ok(Some(Packet::PingReq))
        );
        let smaller = DecodeContext {
            max_packet_size: 1,
            ..exact
        };
        assert_eq!(
            decode(&mut BytesMut::from(&bytes[..]), &smaller),
            Err(DecodeError::PacketTooLarge { size: 2, max: 1 })
        );
    }

    #[test]
    fn consecutive_packets_in_one_buffer() {
        let mut buf = BytesMut::from(&[0xC0, 0x00, 0x40, 0x02, 0x00, 0x07, 0xD0][..]);
        let ctx = ctx(Some(V3_1_1));
        assert_eq!(decode(&mut buf, &ctx), Ok(Some(Packet::PingReq)));
        assert!(matches!(
            decode(&mut buf, &ctx),
            Ok(Some(Packet::PubAck(_)))
        ));
        assert_eq!(decode(&mut buf, &ctx), Ok(None));
        assert_eq!(&buf[..], &[0xD0]);
    }

    #[test]
    fn ping_must_be_empty() {
        for v in ALL {
            malformed(dec(v, &[0xC0, 0x01, 0x00]));
            malformed(dec(v, &[0xD0, 0x01, 0x00]));
            assert_eq!(ok(v, &[0xD0, 0x00]), Packet::PingResp);
        }
    }

    // ---- PUBLISH --------------------------------------------------------------------------

    #[test]
    fn publish_payload_is_the_rest_of_the_packet() {
        let packet = ok(
            V5,
            &[
                0x3B, 0x09, 0x00, 0x01, b'a', 0x12, 0x34, 0x00, b'x', b'y', b'z',
            ],
        );
        assert_eq!(
            packet,
            Packet::Publish(Publish {
                dup: true,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: "a".into(),
                packet_id: Some(0x1234),
                payload: bytes::Bytes::from_static(b"xyz"),
                properties: Properties::default(),
            })
        );
    }

    #[test]
    fn publish_topic_with_wildcards_is_invalid() {
        // [MQTT-3.3.2-2]
        for v in ALL {
            for topic in [b"a/+", b"a/#"] {
                let mut bytes = vec![0x30, 5, 0, 3];
                bytes.extend_from_slice(topic);
                if v.is_v5() {
                    bytes[1] = 6;
                    bytes.push(0);
                }
                assert!(
                    matches!(dec(v, &bytes), Err(DecodeError::TopicNameInvalid(_))),
                    "{v:?}"
                );
            }
        }
    }

    #[test]
    fn publish_topic_must_be_valid_utf8_without_nul() {
        // [MQTT-1.5.4-1] [MQTT-1.5.4-2] [MQTT-4.7.3-2]
        malformed(dec(V3_1_1, &[0x30, 0x04, 0x00, 0x02, 0xC3, 0x28]));
        malformed(dec(V3_1_1, &[0x30, 0x04, 0x00, 0x02, b'a', 0x00]));
    }

    #[test]
    fn empty_publish_topic_is_malformed_in_3x() {
        // [MQTT-4.7.3-1]
        malformed(dec(V3_1_1, &[0x30, 0x02, 0x00, 0x00]));
        malformed(dec(V3_1, &[0x30, 0x02, 0x00, 0x00]));
    }

    #[test]
    fn empty_publish_topic_needs_a_topic_alias_in_v5() {
        protocol_error(dec(V5, &[0x30, 0x03, 0x00, 0x00, 0x00]));
        let packet = ok(V5, &[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x05]);
        let Packet::Publish(publish) = packet else {
            panic!("not a publish")
        };
        assert_eq!(publish.topic, "");
        assert_eq!(publish.properties.topic_alias, Some(5));
    }

    #[test]
    fn topic_alias_0_is_invalid() {
        // [MQTT-3.3.2-8]
        assert!(matches!(
            dec(V5, &[0x30, 0x07, 0x00, 0x01, b'a', 0x03, 0x23, 0x00, 0x00]),
            Err(DecodeError::TopicAliasInvalid(_))
        ));
    }

    #[test]
    fn publish_property_not_allowed_is_a_protocol_error() {
        // Session Expiry Interval belongs to CONNECT/CONNACK/DISCONNECT.
        protocol_error(dec(
            V5,
            &[0x30, 0x09, 0x00, 0x01, b'a', 0x05, 0x11, 0, 0, 0, 1],
        ));
    }

    #[test]
    fn publish_property_length_beyond_packet_is_malformed() {
        malformed(dec(V5, &[0x30, 0x05, 0x00, 0x01, b'a', 0x09, 0x01]));
    }

    // ---- packet identifiers -----------------------------------------------------------------

    #[test]
    fn packet_identifier_0_is_rejected() {
        // [MQTT-2.2.1-3]
        for v in ALL {
            protocol_error(dec(v, &[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00]));
            protocol_error(dec(v, &[0x40, 0x02, 0x00, 0x00]));
            protocol_error(dec(v, &[0x50, 0x02, 0x00, 0x00]));
            protocol_error(dec(v, &[0x62, 0x02, 0x00, 0x00]));
            protocol_error(dec(v, &[0x70, 0x02, 0x00, 0x00]));
            protocol_error(dec(v, &[0xB0, 0x02, 0x00, 0x00]));
        }
        protocol_error(dec(
            V3_1_1,
            &[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00],
        ));
        protocol_error(dec(V3_1_1, &[0xA2, 0x05, 0x00, 0x00, 0x00, 0x01, b'a']));
        protocol_error(dec(V3_1_1, &[0x90, 0x03, 0x00, 0x00, 0x00]));
    }

    // ---- PUBACK, PUBREC, PUBREL, PUBCOMP ----------------------------------------------------

    #[test]
    fn v5_acks_short_forms() {
        let success = PubResponse {
            packet_id: 1,
            ..PubResponse::default()
        };
        // Remaining length 2: success, no properties.
        assert_eq!(
            ok(V5, &[0x40, 0x02, 0x00, 0x01]),
            Packet::PubAck(success.clone())
        );
        // Remaining length 3: a reason, no properties.
        assert_eq!(
            ok(V5, &[0x50, 0x03, 0x00, 0x01, 0x10]),
            Packet::PubRec(PubResponse {
                reason: ReasonCode::NO_MATCHING_SUBSCRIBERS,
                ..success.clone()
            })
        );
        // Full form with an empty property block.
        assert_eq!(
            ok(V5, &[0x70, 0x04, 0x00, 0x01, 0x00, 0x00]),
            Packet::PubComp(success)
        );
    }

    #[test]
    fn v5_ack_reason_codes_are_checked() {
        // [MQTT-3.4.2-1] [MQTT-3.6.2-1]
        malformed(dec(V5, &[0x40, 0x03, 0x00, 0x01, 0x92]));
        malformed(dec(V5, &[0x62, 0x03, 0x00, 0x01, 0x10]));
        assert!(matches!(
            ok(V5, &[0x62, 0x03, 0x00, 0x01, 0x92]),
            Packet::PubRel(PubResponse {
                reason: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                ..
            })
        ));
    }

    #[test]
    fn v3_acks_are_exactly_two_bytes() {
        for v in [V3_1, V3_1_1] {
            malformed(dec(v, &[0x40, 0x03, 0x00, 0x01, 0x00]));
            malformed(dec(v, &[0x40, 0x01, 0x00]));
            assert!(matches!(
                ok(v, &[0x70, 0x02, 0x00, 0x01]),
                Packet::PubComp(_)
            ));
        }
    }

    // ---- SUBSCRIBE / UNSUBSCRIBE ------------------------------------------------------------

    #[test]
    fn subscribe_needs_a_filter() {
        // [MQTT-3.8.3-2]
        protocol_error(dec(V3_1_1, &[0x82, 0x02, 0x00, 0x01]));
        protocol_error(dec(V5, &[0x82, 0x03, 0x00, 0x01, 0x00]));
    }

    #[test]
    fn subscribe_invalid_filter_is_malformed() {
        // [MQTT-4.7.1-1]: '#' not last; we choose Malformed over a per-filter 0x8F.
        for v in ALL {
            let mut bytes = vec![0x82, 0x00, 0x00, 0x01];
            if v.is_v5() {
                bytes.push(0);
            }
            bytes.extend_from_slice(&[0x00, 0x03, b'#', b'/', b'a', 0x00]);
            bytes[1] = (bytes.len() - 2) as u8;
            malformed(dec(v, &bytes));
        }
        // [MQTT-4.7.3-1]: empty filter.
        malformed(dec(V3_1_1, &[0x82, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00]));
        // Shared subscription without a filter [MQTT-4.8.2-2].
        let mut bytes = vec![0x82, 0x00, 0x00, 0x01, 0x00, 0x00, 0x08];
        bytes.extend_from_slice(b"$share/g");
        bytes.push(0);
        bytes[1] = (bytes.len() - 2) as u8;
        malformed(dec(V5, &bytes));
    }

    #[test]
    fn subscribe_options_v5() {
        let sub = |options: u8| {
            dec(
                V5,
                &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', options],
            )
        };
        // [MQTT-3.8.3-5]: reserved bits.
        malformed(sub(0b0100_0000));
        malformed(sub(0b1000_0000));
        malformed(sub(0b0000_0011)); // QoS 3
        malformed(sub(0b0011_0000)); // retain handling 3
        let Ok(Some(Packet::Subscribe(s))) = sub(0b0010_1110) else {
            panic!("valid options rejected")
        };
        assert_eq!(
            s.subscriptions[0].options,
            SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            }
        );
    }

    #[test]
    fn subscribe_options_v3_only_qos() {
        for v in [V3_1, V3_1_1] {
            let sub = |options: u8| dec(v, &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', options]);
            malformed(sub(0b0000_0100));
            malformed(sub(0b1000_0000));
            malformed(sub(0b0000_0011));
            assert!(matches!(sub(0b0000_0010), Ok(Some(Packet::Subscribe(_)))));
        }
    }

    #[test]
    fn no_local_on_shared_subscription_is_a_protocol_error() {
        // [MQTT-3.8.3-4]
        let mut bytes = vec![0x82, 0x00, 0x00, 0x01, 0x00, 0x00, 0x0A];
        bytes.extend_from_slice(b"$share/g/a");
        bytes.push(0b0000_0100);
        bytes[1] = (bytes.len() - 2) as u8;
        protocol_error(dec(V5, &bytes));
    }

    #[test]
    fn subscribe_allows_one_subscription_identifier() {
        let packet = ok(
            V5,
            &[
                0x82, 0x09, 0x00, 0x01, 0x02, 0x0B, 0x07, 0x00, 0x01, b'a', 0x00,
            ],
        );
        let Packet::Subscribe(s) = packet else {
            panic!("not a subscribe")
        };
        assert_eq!(s.properties.subscription_identifiers, vec![7]);
        // Subscription Identifier 0 is a protocol error.
        protocol_error(dec(
            V5,
            &[
                0x82, 0x09, 0x00, 0x01, 0x02, 0x0B, 0x00, 0x00, 0x01, b'a', 0x00,
            ],
        ));
    }

    #[test]
    fn unsubscribe_needs_a_valid_filter() {
        // [MQTT-3.10.3-2]
        protocol_error(dec(V3_1_1, &[0xA2, 0x02, 0x00, 0x01]));
        protocol_error(dec(V5, &[0xA2, 0x03, 0x00, 0x01, 0x00]));
        malformed(dec(
            V3_1_1,
            &[0xA2, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x00],
        ));
        malformed(dec(
            V3_1_1,
            &[0xA2, 0x06, 0x00, 0x01, 0x00, 0x02, b'a', b'#'],
        ));
        assert!(matches!(
            ok(V3_1_1, &[0xA2, 0x05, 0x00, 0x01, 0x00, 0x01, b'#']),
            Packet::Unsubscribe(_)
        ));
    }

    // ---- SUBACK / UNSUBACK --------------------------------------------------------------------

    #[test]
    fn v3_suback_return_codes() {
        assert_eq!(
            ok(V3_1_1, &[0x90, 0x06, 0x00, 0x01, 0x00, 0x01, 0x02, 0x80]),
            Packet::SubAck(SubAck {
                packet_id: 1,
                reasons: vec![
                    ReasonCode::GRANTED_QOS_0,
                    ReasonCode::GRANTED_QOS_1,
                    ReasonCode::GRANTED_QOS_2,
                    ReasonCode::V3_SUBACK_FAILURE,
                ],
                properties: Properties::default(),
            })
        );
        malformed(dec(V3_1_1, &[0x90, 0x03, 0x00, 0x01, 0x03]));
        malformed(dec(V3_1_1, &[0x90, 0x03, 0x00, 0x01, 0x87]));
        protocol_error(dec(V3_1_1, &[0x90, 0x02, 0x00, 0x01]));
    }

    #[test]
    fn v5_suback_and_unsuback_reason_codes() {
        assert!(matches!(
            ok(V5, &[0x90, 0x05, 0x00, 0x01, 0x00, 0x87, 0xA2]),
            Packet::SubAck(_)
        ));
        // [MQTT-3.9.3-2] [MQTT-3.11.3-2]
        malformed(dec(V5, &[0x90, 0x04, 0x00, 0x01, 0x00, 0x11]));
        assert!(matches!(
            ok(V5, &[0xB0, 0x04, 0x00, 0x01, 0x00, 0x11]),
            Packet::UnsubAck(_)
        ));
        malformed(dec(V5, &[0xB0, 0x04, 0x00, 0x01, 0x00, 0x02]));
        protocol_error(dec(V5, &[0xB0, 0x03, 0x00, 0x01, 0x00]));
    }

    #[test]
    fn v3_unsuback_is_only_the_packet_id() {
        assert_eq!(
            ok(V3_1_1, &[0xB0, 0x02, 0x00, 0x09]),
            Packet::UnsubAck(UnsubAck {
                packet_id: 9,
                reasons: vec![],
                properties: Properties::default(),
            })
        );
        malformed(dec(V3_1_1, &[0xB0, 0x03, 0x00, 0x09, 0x00]));
    }

    // ---- CONNACK, DISCONNECT, AUTH ------------------------------------------------------------

    #[test]
    fn connack_reserved_flags_are_malformed() {
        // [MQTT-3.2.2-1]
        malformed(dec(V3_1_1, &[0x20, 0x02, 0x02, 0x00]));
        malformed(dec(V5, &[0x20, 0x03, 0x80, 0x00, 0x00]));
        assert_eq!(
            ok(V3_1_1, &[0x20, 0x02, 0x01, 0x00]),
            Packet::ConnAck(ConnAck {
                session_present: true,
                ..ConnAck::default()
            })
        );
    }

    #[test]
    fn connack_codes_are_checked() {
        malformed(dec(V3_1_1, &[0x20, 0x02, 0x00, 0x06]));
        // [MQTT-3.2.2-8]: v5 CONNACK reason codes only.
        malformed(dec(V5, &[0x20, 0x03, 0x00, 0x01, 0x00]));
        // [MQTT-2.2.2-1]: the property length is not optional in CONNACK.
        malformed(dec(V5, &[0x20, 0x02, 0x00, 0x00]));
        assert!(matches!(
            ok(V5, &[0x20, 0x03, 0x00, 0x9F, 0x00]),
            Packet::ConnAck(_)
        ));
    }

    #[test]
    fn disconnect_forms() {
        assert_eq!(
            ok(V5, &[0xE0, 0x00]),
            Packet::Disconnect(Disconnect::default())
        );
        assert_eq!(
            ok(V5, &[0xE0, 0x01, 0x04]),
            Packet::Disconnect(Disconnect {
                reason: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
                ..Disconnect::default()
            })
        );
        // [MQTT-3.14.2-1]
        malformed(dec(V5, &[0xE0, 0x01, 0x05]));
        malformed(dec(V3_1_1, &[0xE0, 0x01, 0x00]));
        assert_eq!(
            ok(V3_1_1, &[0xE0, 0x00]),
            Packet::Disconnect(Disconnect::default())
        );
    }

    #[test]
    fn auth_forms() {
        assert_eq!(ok(V5, &[0xF0, 0x00]), Packet::Auth(Auth::default()));
        // [MQTT-3.15.2-1]
        malformed(dec(V5, &[0xF0, 0x01, 0x01]));
        let Packet::Auth(auth) = ok(
            V5,
            &[0xF0, 0x08, 0x18, 0x06, 0x15, 0x00, 0x03, b'a', b'b', b'c'],
        ) else {
            panic!("not auth")
        };
        assert_eq!(auth.reason, ReasonCode::CONTINUE_AUTHENTICATION);
        assert_eq!(
            auth.properties.authentication_method.as_deref(),
            Some("abc")
        );
    }

    // ---- CONNECT ------------------------------------------------------------------------------

    /// CONNECT with the given name, level and flags, keep alive 60, client id "c", and
    /// whatever `rest` adds (properties for v5 must be in `rest`).
    fn connect_bytes(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
        let mut body = vec![0, name.len() as u8];
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, flags, 0, 60]);
        body.extend_from_slice(rest);
        let mut bytes = vec![0x10, body.len() as u8];
        bytes.extend_from_slice(&body);
        bytes
    }

    #[test]
    fn connect_each_level() {
        let cases: [(&[u8], u8, &[u8], ProtocolVersion); 3] = [
            (b"MQIsdp", 3, &[0, 1, b'c'], V3_1),
            (b"MQTT", 4, &[0, 1, b'c'], V3_1_1),
            (b"MQTT", 5, &[0, 0, 1, b'c'], V5),
        ];
        for (name, level, rest, version) in cases {
            let bytes = connect_bytes(name, level, 0b10, rest);
            assert_eq!(
                dec_connect(&bytes),
                Ok(Some(Packet::Connect(Box::new(Connect {
                    protocol: version,
                    clean_start: true,
                    keep_alive: 60,
                    client_id: "c".into(),
                    will: None,
                    username: None,
                    password: None,
                    properties: Properties::default(),
                }))))
            );
        }
    }

    #[test]
    fn connect_protocol_name_and_level() {
        // [MQTT-3.1.2-1]
        assert_eq!(
            dec_connect(&connect_bytes(b"MQTX", 4, 0, &[0, 1, b'c'])),
            Err(DecodeError::InvalidProtocolName)
        );
        assert_eq!(
            dec_connect(&connect_bytes(b"MQIsdp", 4, 0, &[0, 1, b'c'])),
            Err(DecodeError::UnsupportedProtocolVersion { level: 4 })
        );
        // [MQTT-3.1.2-2]
        for level in [3, 6, 0x84] {
            assert_eq!(
                dec_connect(&connect_bytes(b"MQTT", level, 0, &[0, 1, b'c'])),
                Err(DecodeError::UnsupportedProtocolVersion { level })
            );
        }
    }

    #[test]
    fn connect_reserved_flag_is_malformed() {
        // [MQTT-3.1.2-3]
        malformed(dec_connect(&connect_bytes(b"MQTT", 4, 0b1, &[0, 1, b'c'])));
    }

    #[test]
    fn connect_will_flags() {
        // [MQTT-3.1.2-11]: will QoS without will flag.
        malformed(dec_connect(&connect_bytes(
            b"MQTT",
            4,
            0b0000_1000,
            &[0, 1, b'c'],
        )));
        // [MQTT-3.1.2-13]: will retain without will flag.
        malformed(dec_connect(&connect_bytes(
            b"MQTT",
            4,
            0b0010_0000,
            &[0, 1, b'c'],
        )));
        // [MQTT-3.1.2-12]: will QoS 3.
        let will = [0, 1, b'c', 0, 1, b't', 0, 0];
        malformed(dec_connect(&connect_bytes(b"MQTT", 4, 0b0001_1100, &will)));
        let Ok(Some(Packet::Connect(c))) =
            dec_connect(&connect_bytes(b"MQTT", 4, 0b0011_0100, &will))
        else {
            panic!("valid will rejected")
        };
        let will = c.will.expect("will");
        assert_eq!((will.qos, will.retain), (QoS::ExactlyOnce, true));
        assert_eq!(will.topic, "t");
    }

    #[test]
    fn connect_will_topic_must_be_a_valid_name() {
        // [MQTT-3.3.2-2] applies to the will topic too.
        let will = [0, 1, b'c', 0, 1, b'#', 0, 0];
        assert!(matches!(
            dec_connect(&connect_bytes(b"MQTT", 4, 0b0000_0100, &will)),
            Err(DecodeError::TopicNameInvalid(_))
        ));
        let will = [0, 1, b'c', 0, 0, 0, 0];
        malformed(dec_connect(&connect_bytes(b"MQTT", 4, 0b0000_0100, &will)));
    }

    #[test]
    fn connect_password_without_user_name() {
        // MQTT 3.1.1 [MQTT-3.1.2-22]: malformed. MQTT 5 allows it.
        let rest = [0, 1, b'c', 0, 2, 0xFF, 0x00];
        malformed(dec_connect(&connect_bytes(b"MQTT", 4, 0b0100_0000, &rest)));
        let rest = [0, 0, 1, b'c', 0, 2, 0xFF, 0x00];
        let Ok(Some(Packet::Connect(c))) =
            dec_connect(&connect_bytes(b"MQTT", 5, 0b0100_0000, &rest))
        else {
            panic!("v5 password without user name rejected")
        };
        assert_eq!(c.password.as_deref(), Some(&[0xFF, 0x00][..]));
        assert_eq!(c.username, None);
    }

    #[test]
    fn connect_v3_password_is_binary() {
        let rest = [0, 1, b'c', 0, 1, b'u', 0, 2, 0xC3, 0x28];
        let Ok(Some(Packet::Connect(c))) =
            dec_connect(&connect_bytes(b"MQTT", 4, 0b1100_0000, &rest))
        else {
            panic!("binary password rejected")
        };
        assert_eq!(c.password.as_deref(), Some(&[0xC3, 0x28][..]));
    }

    #[test]
    fn connect_v5_properties() {
        // Receive Maximum 0 is a protocol error.
        protocol_error(dec_connect(&connect_bytes(
            b"MQTT",
            5,
            0,
            &[3, 0x21, 0, 0, 0, 1, b'c'],
        )));
        // Topic Alias is not a CONNECT property.
        protocol_error(dec_connect(&connect_bytes(
            b"MQTT",
            5,
            0,
            &[3, 0x23, 0, 1, 0, 1, b'c'],
        )));
        let Ok(Some(Packet::Connect(c))) = dec_connect(&connect_bytes(
            b"MQTT",
            5,
            0,
            &[5, 0x11, 0, 0, 0, 30, 0, 1, b'c'],
        )) else {
            panic!("valid properties rejected")
        };
        assert_eq!(c.properties.session_expiry_interval, Some(30));
    }

    #[test]
    fn connect_trailing_bytes_are_malformed() {
        malformed(dec_connect(&connect_bytes(b"MQTT", 4, 0, &[0, 1, b'c', 0])));
        // And a field cut short.
        malformed(dec_connect(&connect_bytes(b"MQTT", 4, 0, &[0, 2, b'c'])));
    }

    // ---- reason codes ---------------------------------------------------------------------

    #[test]
    fn errors_map_to_reason_codes() {
        let cases = [
            (DecodeError::MalformedPacket("x"), 0x81),
            (DecodeError::ProtocolError("x"), 0x82),
            (DecodeError::PacketTooLarge { size: 9, max: 8 }, 0x95),
            (DecodeError::UnsupportedProtocolVersion { level: 6 }, 0x84),
            (DecodeError::InvalidProtocolName, 0x84),
            (DecodeError::TopicNameInvalid("x"), 0x90),
            (DecodeError::TopicAliasInvalid("x"), 0x94),
        ];
        for (error, code) in cases {
            assert_eq!(error.reason_code(), ReasonCode(code), "{error}");
        }
    }
}
