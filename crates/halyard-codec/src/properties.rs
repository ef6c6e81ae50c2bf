//! MQTT 5 properties: which packet may carry which property, and their wire form.
//!
//! One table ([`Rules`]) per packet type drives both directions: the decoder rejects a
//! property the packet type does not allow, and the encoder writes only the allowed fields
//! of the flat [`Properties`] struct, so a stray field set by the broker never reaches the
//! wire as a protocol error for the peer.

use crate::topic::is_valid_topic_name;
use crate::wire::{put_binary, put_string, put_vbi, Counter, Reader, Sink, MAX_VBI};
use crate::{DecodeError, EncodeError, Properties};

const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
const SERVER_KEEP_ALIVE: u8 = 0x13;
const AUTHENTICATION_METHOD: u8 = 0x15;
const AUTHENTICATION_DATA: u8 = 0x16;
const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
const WILL_DELAY_INTERVAL: u8 = 0x18;
const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
const RESPONSE_INFORMATION: u8 = 0x1A;
const SERVER_REFERENCE: u8 = 0x1C;
const REASON_STRING: u8 = 0x1F;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const TOPIC_ALIAS: u8 = 0x23;
const MAXIMUM_QOS: u8 = 0x24;
const RETAIN_AVAILABLE: u8 = 0x25;
const USER_PROPERTY: u8 = 0x26;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;
const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

const fn mask(ids: &[u8]) -> u64 {
    let mut bits = 0u64;
    let mut i = 0;
    while i < ids.len() {
        bits |= 1 << ids[i];
        i += 1;
    }
    bits
}

/// Every property identifier MQTT 5 defines; anything else is malformed.
const KNOWN: u64 = mask(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    SUBSCRIPTION_IDENTIFIER,
    SESSION_EXPIRY_INTERVAL,
    ASSIGNED_CLIENT_IDENTIFIER,
    SERVER_KEEP_ALIVE,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REQUEST_PROBLEM_INFORMATION,
    WILL_DELAY_INTERVAL,
    REQUEST_RESPONSE_INFORMATION,
    RESPONSE_INFORMATION,
    SERVER_REFERENCE,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    TOPIC_ALIAS_MAXIMUM,
    TOPIC_ALIAS,
    MAXIMUM_QOS,
    RETAIN_AVAILABLE,
    USER_PROPERTY,
    MAXIMUM_PACKET_SIZE,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    SHARED_SUBSCRIPTION_AVAILABLE,
]);

/// Which properties one packet type allows, and which of those may appear more than once.
#[derive(Clone, Copy)]
pub(crate) struct Rules {
    allowed: u64,
    repeatable: u64,
}

impl Rules {
    const fn new(allowed: &[u8], repeatable: &[u8]) -> Rules {
        Rules {
            allowed: mask(allowed),
            repeatable: mask(repeatable),
        }
    }

    fn allows(self, id: u8) -> bool {
        self.allowed & (1 << id) != 0
    }

    fn repeats(self, id: u8) -> bool {
        self.repeatable & (1 << id) != 0
    }
}

pub(crate) const CONNECT: Rules = Rules::new(
    &[
        SESSION_EXPIRY_INTERVAL,
        RECEIVE_MAXIMUM,
        MAXIMUM_PACKET_SIZE,
        TOPIC_ALIAS_MAXIMUM,
        REQUEST_RESPONSE_INFORMATION,
        REQUEST_PROBLEM_INFORMATION,
        USER_PROPERTY,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
    ],
    &[USER_PROPERTY],
);

pub(crate) const WILL: Rules = Rules::new(
    &[
        WILL_DELAY_INTERVAL,
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
    ],
    &[USER_PROPERTY],
);

pub(crate) const CONNACK: Rules = Rules::new(
    &[
        SESSION_EXPIRY_INTERVAL,
        RECEIVE_MAXIMUM,
        MAXIMUM_QOS,
        RETAIN_AVAILABLE,
        MAXIMUM_PACKET_SIZE,
        ASSIGNED_CLIENT_IDENTIFIER,
        TOPIC_ALIAS_MAXIMUM,
        REASON_STRING,
        USER_PROPERTY,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        SHARED_SUBSCRIPTION_AVAILABLE,
        SERVER_KEEP_ALIVE,
        RESPONSE_INFORMATION,
        SERVER_REFERENCE,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
    ],
    &[USER_PROPERTY],
);

pub(crate) const PUBLISH: Rules = Rules::new(
    &[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        TOPIC_ALIAS,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
        SUBSCRIPTION_IDENTIFIER,
        CONTENT_TYPE,
    ],
    &[USER_PROPERTY, SUBSCRIPTION_IDENTIFIER],
);

/// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
pub(crate) const ACK: Rules = Rules::new(&[REASON_STRING, USER_PROPERTY], &[USER_PROPERTY]);

pub(crate) const SUBSCRIBE: Rules =
    Rules::new(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY], &[USER_PROPERTY]);

pub(crate) const UNSUBSCRIBE: Rules = Rules::new(&[USER_PROPERTY], &[USER_PROPERTY]);

pub(crate) const DISCONNECT: Rules = Rules::new(
    &[
        SESSION_EXPIRY_INTERVAL,
        REASON_STRING,
        USER_PROPERTY,
        SERVER_REFERENCE,
    ],
    &[USER_PROPERTY],
);

pub(crate) const AUTH: Rules = Rules::new(
    &[
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        REASON_STRING,
        USER_PROPERTY,
    ],
    &[USER_PROPERTY],
);

fn protocol_error(why: &'static str) -> DecodeError {
    DecodeError::ProtocolError(why)
}

/// A one-byte property whose only legal values are 0 and 1.
fn flag(r: &mut Reader, why: &'static str) -> Result<u8, DecodeError> {
    match r.u8()? {
        value @ (0 | 1) => Ok(value),
        _ => Err(protocol_error(why)),
    }
}

/// Reads a property length and the properties it covers, enforcing `rules`.
pub(crate) fn decode(r: &mut Reader, rules: Rules) -> Result<Properties, DecodeError> {
    let len = r.vbi()?;
    let mut r = Reader::new(r.take(len)?);
    let mut props = Properties::default();
    let mut seen = 0u64;
    while !r.is_empty() {
        // The identifier is formally a Variable Byte Integer; every defined one fits a byte.
        let id = match u8::try_from(r.vbi()?) {
            Ok(id) if id < 64 && KNOWN & (1 << id) != 0 => id,
            _ => return Err(DecodeError::MalformedPacket("unknown property identifier")),
        };
        if !rules.allows(id) {
            return Err(protocol_error("property not allowed in this packet type"));
        }
        if seen & (1 << id) != 0 && !rules.repeats(id) {
            return Err(protocol_error("property included more than once"));
        }
        seen |= 1 << id;
        match id {
            PAYLOAD_FORMAT_INDICATOR => {
                props.payload_format_indicator =
                    Some(flag(&mut r, "payload format indicator must be 0 or 1")?);
            }
            MESSAGE_EXPIRY_INTERVAL => props.message_expiry_interval = Some(r.u32()?),
            CONTENT_TYPE => props.content_type = Some(r.string()?),
            RESPONSE_TOPIC => {
                let topic = r.string()?;
                if !is_valid_topic_name(&topic) {
                    return Err(protocol_error(
                        "response topic must be a non-empty name without wildcards [MQTT-3.3.2-14]",
                    ));
                }
                props.response_topic = Some(topic);
            }
            CORRELATION_DATA => props.correlation_data = Some(r.binary()?),
            SUBSCRIPTION_IDENTIFIER => {
                let value = r.vbi()?;
                let value = u32::try_from(value)
                    .ok()
                    .filter(|&v| v != 0)
                    .ok_or(protocol_error("subscription identifier 0"))?;
                props.subscription_identifiers.push(value);
            }
            SESSION_EXPIRY_INTERVAL => props.session_expiry_interval = Some(r.u32()?),
            ASSIGNED_CLIENT_IDENTIFIER => props.assigned_client_identifier = Some(r.string()?),
            SERVER_KEEP_ALIVE => props.server_keep_alive = Some(r.u16()?),
            AUTHENTICATION_METHOD => props.authentication_method = Some(r.string()?),
            AUTHENTICATION_DATA => props.authentication_data = Some(r.binary()?),
            REQUEST_PROBLEM_INFORMATION => {
                props.request_problem_information =
                    Some(flag(&mut r, "request problem information must be 0 or 1")?);
            }
            WILL_DELAY_INTERVAL => props.will_delay_interval = Some(r.u32()?),
            REQUEST_RESPONSE_INFORMATION => {
                props.request_response_information =
                    Some(flag(&mut r, "request response information must be 0 or 1")?);
            }
            RESPONSE_INFORMATION => props.response_information = Some(r.string()?),
            SERVER_REFERENCE => props.server_reference = Some(r.string()?),
            REASON_STRING => props.reason_string = Some(r.string()?),
            RECEIVE_MAXIMUM => match r.u16()? {
                0 => return Err(protocol_error("receive maximum 0")),
                value => props.receive_maximum = Some(value),
            },
            TOPIC_ALIAS_MAXIMUM => props.topic_alias_maximum = Some(r.u16()?),
            TOPIC_ALIAS => props.topic_alias = Some(r.u16()?),
            MAXIMUM_QOS => props.maximum_qos = Some(flag(&mut r, "maximum QoS must be 0 or 1")?),
            RETAIN_AVAILABLE => {
                props.retain_available = Some(flag(&mut r, "retain available must be 0 or 1")?);
            }
            USER_PROPERTY => {
                let key = r.string()?;
                let value = r.string()?;
                props.user_properties.push((key, value));
            }
            MAXIMUM_PACKET_SIZE => match r.u32()? {
                0 => return Err(protocol_error("maximum packet size 0")),
                value => props.maximum_packet_size = Some(value),
            },
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                props.wildcard_subscription_available = Some(flag(
                    &mut r,
                    "wildcard subscription available must be 0 or 1",
                )?);
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                props.subscription_identifier_available = Some(flag(
                    &mut r,
                    "subscription identifier available must be 0 or 1",
                )?);
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                props.shared_subscription_available = Some(flag(
                    &mut r,
                    "shared subscription available must be 0 or 1",
                )?);
            }
            _ => return Err(DecodeError::MalformedPacket("unknown property identifier")),
        }
    }
    if props.authentication_data.is_some() && props.authentication_method.is_none() {
        return Err(protocol_error(
            "authentication data without authentication method",
        ));
    }
    Ok(props)
}

/// True when `rules` lets `props` put nothing on the wire, which allows the short forms of
/// PUBACK & co, DISCONNECT and AUTH.
pub(crate) fn is_empty(props: &Properties, rules: Rules) -> Result<bool, EncodeError> {
    let mut counter = Counter::default();
    fields(&mut counter, props, rules)?;
    Ok(counter.0 == 0)
}

/// Writes the property length and then the properties `rules` allows.
pub(crate) fn encode<S: Sink>(
    sink: &mut S,
    props: &Properties,
    rules: Rules,
) -> Result<(), EncodeError> {
    let mut counter = Counter::default();
    fields(&mut counter, props, rules)?;
    put_vbi(sink, counter.0)?;
    fields(sink, props, rules)
}

fn fields<S: Sink>(sink: &mut S, p: &Properties, rules: Rules) -> Result<(), EncodeError> {
    fn byte<S: Sink>(sink: &mut S, rules: Rules, id: u8, value: Option<u8>) {
        if let (Some(value), true) = (value, rules.allows(id)) {
            sink.u8(id);
            sink.u8(value);
        }
    }
    fn two<S: Sink>(sink: &mut S, rules: Rules, id: u8, value: Option<u16>) {
        if let (Some(value), true) = (value, rules.allows(id)) {
            sink.u8(id);
            sink.u16(value);
        }
    }
    fn four<S: Sink>(sink: &mut S, rules: Rules, id: u8, value: Option<u32>) {
        if let (Some(value), true) = (value, rules.allows(id)) {
            sink.u8(id);
            sink.u32(value);
        }
    }
    fn string<S: Sink>(
        sink: &mut S,
        rules: Rules,
        id: u8,
        field: &'static str,
        value: &Option<String>,
    ) -> Result<(), EncodeError> {
        if let (Some(value), true) = (value, rules.allows(id)) {
            sink.u8(id);
            put_string(sink, field, value)?;
        }
        Ok(())
    }
    fn binary<S: Sink>(
        sink: &mut S,
        rules: Rules,
        id: u8,
        field: &'static str,
        value: &Option<bytes::Bytes>,
    ) -> Result<(), EncodeError> {
        if let (Some(value), true) = (value, rules.allows(id)) {
            sink.u8(id);
            put_binary(sink, field, value)?;
        }
        Ok(())
    }

    byte(
        sink,
        rules,
        PAYLOAD_FORMAT_INDICATOR,
        p.payload_format_indicator,
    );
    four(
        sink,
        rules,
        MESSAGE_EXPIRY_INTERVAL,
        p.message_expiry_interval,
    );
    string(sink, rules, CONTENT_TYPE, "content type", &p.content_type)?;
    string(
        sink,
        rules,
        RESPONSE_TOPIC,
        "response topic",
        &p.response_topic,
    )?;
    binary(
        sink,
        rules,
        CORRELATION_DATA,
        "correlation data",
        &p.correlation_data,
    )?;
    if rules.allows(SUBSCRIPTION_IDENTIFIER) {
        // SUBSCRIBE carries at most one identifier; PUBLISH one per matching subscription.
        let count = if rules.repeats(SUBSCRIPTION_IDENTIFIER) {
            p.subscription_identifiers.len()
        } else {
            1
        };
        for &id in p.subscription_identifiers.iter().take(count) {
            if id == 0 || id as usize > MAX_VBI {
                return Err(EncodeError::InvalidPacket(
                    "subscription identifier must be 1..=268435455",
                ));
            }
            sink.u8(SUBSCRIPTION_IDENTIFIER);
            sink.vbi(id as usize);
        }
    }
    four(
        sink,
        rules,
        SESSION_EXPIRY_INTERVAL,
        p.session_expiry_interval,
    );
    string(
        sink,
        rules,
        ASSIGNED_CLIENT_IDENTIFIER,
        "assigned client identifier",
        &p.assigned_client_identifier,
    )?;
    two(sink, rules, SERVER_KEEP_ALIVE, p.server_keep_alive);
    string(
        sink,
        rules,
        AUTHENTICATION_METHOD,
        "authentication method",
        &p.authentication_method,
    )?;
    binary(
        sink,
        rules,
        AUTHENTICATION_DATA,
        "authentication data",
        &p.authentication_data,
    )?;
    byte(
        sink,
        rules,
        REQUEST_PROBLEM_INFORMATION,
        p.request_problem_information,
    );
    four(sink, rules, WILL_DELAY_INTERVAL, p.will_delay_interval);
    byte(
        sink,
        rules,
        REQUEST_RESPONSE_INFORMATION,
        p.request_response_information,
    );
    string(
        sink,
        rules,
        RESPONSE_INFORMATION,
        "response information",
        &p.response_information,
    )?;
    string(
        sink,
        rules,
        SERVER_REFERENCE,
        "server reference",
        &p.server_reference,
    )?;
    string(
        sink,
        rules,
        REASON_STRING,
        "reason string",
        &p.reason_string,
    )?;
    two(sink, rules, RECEIVE_MAXIMUM, p.receive_maximum);
    two(sink, rules, TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    two(sink, rules, TOPIC_ALIAS, p.topic_alias);
    byte(sink, rules, MAXIMUM_QOS, p.maximum_qos);
    byte(sink, rules, RETAIN_AVAILABLE, p.retain_available);
    if rules.allows(USER_PROPERTY) {
        for (key, value) in &p.user_properties {
            sink.u8(USER_PROPERTY);
            put_string(sink, "user property name", key)?;
            put_string(sink, "user property value", value)?;
        }
    }
    four(sink, rules, MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    byte(
        sink,
        rules,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available,
    );
    byte(
        sink,
        rules,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        p.subscription_identifier_available,
    );
    byte(
        sink,
        rules,
        SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};

    fn decode_bytes(bytes: &'static [u8], rules: Rules) -> Result<Properties, DecodeError> {
        let mut r = Reader::new(Bytes::from_static(bytes));
        let props = decode(&mut r, rules)?;
        r.finish()?;
        Ok(props)
    }

    #[test]
    fn every_property_round_trips() {
        let all = Rules {
            allowed: KNOWN,
            repeatable: mask(&[USER_PROPERTY, SUBSCRIPTION_IDENTIFIER]),
        };
        let props = Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(7),
            content_type: Some("text/plain".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            subscription_identifiers: vec![1, 268_435_455],
            session_expiry_interval: Some(u32::MAX),
            assigned_client_identifier: Some("auto-1".into()),
            server_keep_alive: Some(30),
            authentication_method: Some("SCRAM".into()),
            authentication_data: Some(Bytes::from_static(b"data")),
            request_problem_information: Some(0),
            will_delay_interval: Some(5),
            request_response_information: Some(1),
            response_information: Some("resp".into()),
            server_reference: Some("other:1883".into()),
            reason_string: Some("why".into()),
            receive_maximum: Some(10),
            topic_alias_maximum: Some(0),
            topic_alias: Some(3),
            maximum_qos: Some(1),
            retain_available: Some(0),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            maximum_packet_size: Some(1024),
            wildcard_subscription_available: Some(1),
            subscription_identifier_available: Some(0),
            shared_subscription_available: Some(1),
        };
        let mut buf = BytesMut::new();
        encode(&mut crate::wire::Writer(&mut buf), &props, all).unwrap();
        let mut r = Reader::new(buf.freeze());
        assert_eq!(decode(&mut r, all).unwrap(), props);
        assert!(r.is_empty());
    }

    #[test]
    fn unknown_property_is_malformed() {
        assert!(matches!(
            decode_bytes(&[2, 0x04, 0], PUBLISH),
            Err(DecodeError::MalformedPacket(_))
        ));
    }

    #[test]
    fn property_not_allowed_is_protocol_error() {
        // Session Expiry Interval in PUBLISH.
        assert!(matches!(
            decode_bytes(&[5, 0x11, 0, 0, 0, 1], PUBLISH),
            Err(DecodeError::ProtocolError(_))
        ));
    }

    #[test]
    fn duplicate_property_is_protocol_error() {
        assert!(matches!(
            decode_bytes(&[4, 0x01, 0, 0x01, 1], PUBLISH),
            Err(DecodeError::ProtocolError(_))
        ));
        // Subscription Identifier may repeat in PUBLISH but not in SUBSCRIBE.
        assert_eq!(
            decode_bytes(&[4, 0x0B, 1, 0x0B, 2], PUBLISH)
                .unwrap()
                .subscription_identifiers,
            vec![1, 2]
        );
        assert!(matches!(
            decode_bytes(&[4, 0x0B, 1, 0x0B, 2], SUBSCRIBE),
            Err(DecodeError::ProtocolError(_))
        ));
        // User Property may always repeat.
        let props =
            decode_bytes(&[12, 0x26, 0, 1, b'a', 0, 0, 0x26, 0, 1, b'a', 0, 0], ACK).unwrap();
        assert_eq!(props.user_properties.len(), 2);
    }

    #[test]
    fn out_of_range_values_are_protocol_errors() {
        for bytes in [
            &[2, 0x01, 2][..],                // payload format indicator 2
            &[2, 0x0B, 0][..],                // subscription identifier 0
            &[3, 0x21, 0, 0][..],             // receive maximum 0
            &[5, 0x27, 0, 0, 0, 0][..],       // maximum packet size 0
            &[2, 0x17, 2][..],                // request problem information 2
            &[2, 0x19, 2][..],                // request response information 2
            &[2, 0x24, 2][..],                // maximum QoS 2
            &[2, 0x25, 2][..],                // retain available 2
            &[5, 0x08, 0, 2, b'a', b'#'][..], // wildcard response topic [MQTT-3.3.2-14]
            &[4, 0x16, 0, 1, 0][..],          // authentication data without method
        ] {
            let all = Rules {
                allowed: KNOWN,
                repeatable: 0,
            };
            let mut r = Reader::new(Bytes::copy_from_slice(bytes));
            assert!(
                matches!(decode(&mut r, all), Err(DecodeError::ProtocolError(_))),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn property_length_beyond_packet_is_malformed() {
        assert!(matches!(
            decode_bytes(&[9, 0x01, 0], PUBLISH),
            Err(DecodeError::MalformedPacket(_))
        ));
        // A property whose value runs past the property length.
        assert!(matches!(
            decode_bytes(&[2, 0x02, 0, 0, 0, 1], PUBLISH),
            Err(DecodeError::MalformedPacket(_))
        ));
    }

    #[test]
    fn encoder_writes_only_allowed_properties() {
        let props = Properties {
            session_expiry_interval: Some(9),
            reason_string: Some("r".into()),
            ..Properties::default()
        };
        let mut buf = BytesMut::new();
        encode(&mut crate::wire::Writer(&mut buf), &props, ACK).unwrap();
        assert_eq!(&buf[..], &[4, 0x1F, 0, 1, b'r']);
        assert!(is_empty(&Properties::default(), ACK).unwrap());
        let only_session = Properties {
            session_expiry_interval: Some(9),
            ..Properties::default()
        };
        assert!(is_empty(&only_session, ACK).unwrap());
    }
}
