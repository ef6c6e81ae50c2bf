//! Property tests: every valid packet survives encode -> decode, also when its bytes arrive
//! in arbitrary pieces, and arbitrary bytes never make the decoder panic.

use bytes::{Bytes, BytesMut};
use halyard_codec::{
    decode, encode, encoded_len, Auth, ConnAck, Connect, DecodeContext, Disconnect, Packet,
    Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, SubAck, Subscribe,
    Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;

use ProtocolVersion::{V3_1, V3_1_1, V5};

// ---- strings, topics and filters ------------------------------------------------------------

/// Any UTF-8 string the decoder accepts: no U+0000, some multi-byte characters.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _./+#$é€😀-]{0,10}"
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-z0-9/$é]{1,12}"
}

fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("+".to_string()), "[a-z0-9é]{0,4}"];
    let plain = (vec(level, 1..4), any::<bool>()).prop_map(|(levels, hash)| {
        let mut filter = levels.join("/");
        if hash {
            filter.push_str(if filter.is_empty() { "#" } else { "/#" });
        }
        if filter.is_empty() {
            filter.push('a');
        }
        filter
    });
    (option::of("[a-z0-9]{1,4}"), plain).prop_map(|(group, filter)| match group {
        Some(group) => format!("$share/{group}/{filter}"),
        None => filter,
    })
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..16).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn reason(codes: &[u8]) -> impl Strategy<Value = ReasonCode> {
    select(codes.iter().map(|&c| ReasonCode(c)).collect::<Vec<_>>())
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    option::of(0..=1u8)
}

// ---- properties, one strategy per packet type ------------------------------------------------

fn user_properties() -> impl Strategy<Value = Vec<(String, String)>> {
    vec((text(), text()), 0..3)
}

fn subscription_identifier() -> impl Strategy<Value = u32> {
    1..=268_435_455u32
}

fn connect_properties() -> impl Strategy<Value = Properties> {
    (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(1..=u32::MAX),
        option::of(any::<u16>()),
        flag(),
        flag(),
        user_properties(),
        option::of((text(), option::of(binary()))),
    )
        .prop_map(
            |(session, receive, max_size, alias_max, rri, rpi, user, auth)| {
                let (authentication_method, authentication_data) = match auth {
                    Some((method, data)) => (Some(method), data),
                    None => (None, None),
                };
                Properties {
                    session_expiry_interval: session,
                    receive_maximum: receive,
                    maximum_packet_size: max_size,
                    topic_alias_maximum: alias_max,
                    request_response_information: rri,
                    request_problem_information: rpi,
                    user_properties: user,
                    authentication_method,
                    authentication_data,
                    ..Properties::default()
                }
            },
        )
}

fn will_properties() -> impl Strategy<Value = Properties> {
    (
        option::of(any::<u32>()),
        flag(),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(topic_name()),
        option::of(binary()),
        user_properties(),
    )
        .prop_map(
            |(delay, format, expiry, content, response, correlation, user)| Properties {
                will_delay_interval: delay,
                payload_format_indicator: format,
                message_expiry_interval: expiry,
                content_type: content,
                response_topic: response,
                correlation_data: correlation,
                user_properties: user,
                ..Properties::default()
            },
        )
}

fn connack_properties() -> impl Strategy<Value = Properties> {
    let limits = (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        flag(),
        flag(),
        option::of(1..=u32::MAX),
        option::of(text()),
        option::of(any::<u16>()),
    );
    let info = (
        option::of(text()),
        user_properties(),
        flag(),
        flag(),
        flag(),
        option::of(any::<u16>()),
        option::of(text()),
        option::of(text()),
        option::of((text(), option::of(binary()))),
    );
    (limits, info).prop_map(
        |(
            (session, receive, max_qos, retain, max_size, assigned, alias_max),
            (reason, user, wildcard, sub_ids, shared, keep_alive, response, reference, auth),
        )| {
            let (authentication_method, authentication_data) = match auth {
                Some((method, data)) => (Some(method), data),
                None => (None, None),
            };
            Properties {
                session_expiry_interval: session,
                receive_maximum: receive,
                maximum_qos: max_qos,
                retain_available: retain,
                maximum_packet_size: max_size,
                assigned_client_identifier: assigned,
                topic_alias_maximum: alias_max,
                reason_string: reason,
                user_properties: user,
                wildcard_subscription_available: wildcard,
                subscription_identifier_available: sub_ids,
                shared_subscription_available: shared,
                server_keep_alive: keep_alive,
                response_information: response,
                server_reference: reference,
                authentication_method,
                authentication_data,
                ..Properties::default()
            }
        },
    )
}

fn publish_properties() -> impl Strategy<Value = Properties> {
    (
        flag(),
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(topic_name()),
        option::of(binary()),
        user_properties(),
        vec(subscription_identifier(), 0..3),
        option::of(text()),
    )
        .prop_map(
            |(format, expiry, alias, response, correlation, user, sub_ids, content)| Properties {
                payload_format_indicator: format,
                message_expiry_interval: expiry,
                topic_alias: alias,
                response_topic: response,
                correlation_data: correlation,
                user_properties: user,
                subscription_identifiers: sub_ids,
                content_type: content,
                ..Properties::default()
            },
        )
}

fn ack_properties() -> impl Strategy<Value = Properties> {
    (option::of(text()), user_properties()).prop_map(|(reason, user)| Properties {
        reason_string: reason,
        user_properties: user,
        ..Properties::default()
    })
}

fn subscribe_properties() -> impl Strategy<Value = Properties> {
    (option::of(subscription_identifier()), user_properties()).prop_map(|(id, user)| Properties {
        subscription_identifiers: id.into_iter().collect(),
        user_properties: user,
        ..Properties::default()
    })
}

fn unsubscribe_properties() -> impl Strategy<Value = Properties> {
    user_properties().prop_map(|user| Properties {
        user_properties: user,
        ..Properties::default()
    })
}

fn disconnect_properties() -> impl Strategy<Value = Properties> {
    (
        option::of(any::<u32>()),
        option::of(text()),
        user_properties(),
        option::of(text()),
    )
        .prop_map(|(session, reason, user, reference)| Properties {
            session_expiry_interval: session,
            reason_string: reason,
            user_properties: user,
            server_reference: reference,
            ..Properties::default()
        })
}

fn auth_properties() -> impl Strategy<Value = Properties> {
    (
        option::of((text(), option::of(binary()))),
        option::of(text()),
        user_properties(),
    )
        .prop_map(|(auth, reason, user)| {
            let (authentication_method, authentication_data) = match auth {
                Some((method, data)) => (Some(method), data),
                None => (None, None),
            };
            Properties {
                authentication_method,
                authentication_data,
                reason_string: reason,
                user_properties: user,
                ..Properties::default()
            }
        })
}

/// `props` for MQTT 5, default (no properties) for 3.x.
fn props_for(
    version: ProtocolVersion,
    props: impl Strategy<Value = Properties> + 'static,
) -> BoxedStrategy<Properties> {
    if version.is_v5() {
        props.boxed()
    } else {
        Just(Properties::default()).boxed()
    }
}

// ---- packets -----------------------------------------------------------------------------

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

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let will = (
        topic_name(),
        binary(),
        qos(),
        any::<bool>(),
        props_for(version, will_properties()),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        option::of(will),
        option::of(text()),
        option::of(binary()),
        props_for(version, connect_properties()),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                // 3.x: a password needs a user name [MQTT-3.1.2-22 in 3.1.1].
                let password = if version.is_v5() || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Box::new(Connect {
                    protocol: version,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
}

fn connack(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let code = if version.is_v5() {
        reason(CONNACK_CODES).boxed()
    } else {
        (0..=5u8).prop_map(ReasonCode).boxed()
    };
    (
        any::<bool>(),
        code,
        props_for(version, connack_properties()),
    )
        .prop_map(|(session_present, code, properties)| {
            Packet::ConnAck(ConnAck {
                session_present,
                code,
                properties,
            })
        })
}

fn publish(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        binary(),
        props_for(version, publish_properties()),
        any::<bool>(),
    )
        .prop_map(
            move |(dup, qos, retain, topic, id, payload, properties, alias_only)| {
                // MQTT 5 may leave the topic empty when a topic alias stands for it.
                let topic = if alias_only && properties.topic_alias.is_some() {
                    String::new()
                } else {
                    topic
                };
                let qos0 = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic,
                    packet_id: (!qos0).then_some(id),
                    payload,
                    properties,
                })
            },
        )
}

fn pub_response(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let kind = 0..4u8;
    (
        kind,
        packet_id(),
        any::<prop::sample::Index>(),
        props_for(version, ack_properties()),
    )
        .prop_map(move |(kind, packet_id, index, properties)| {
            let codes = if kind < 2 { PUBACK_CODES } else { PUBREL_CODES };
            let reason = if version.is_v5() {
                ReasonCode(*index.get(codes))
            } else {
                ReasonCode::SUCCESS
            };
            let response = PubResponse {
                packet_id,
                reason,
                properties,
            };
            match kind {
                0 => Packet::PubAck(response),
                1 => Packet::PubRec(response),
                2 => Packet::PubRel(response),
                _ => Packet::PubComp(response),
            }
        })
}

fn subscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let subscription = (topic_filter(), qos(), any::<bool>(), any::<bool>(), 0..=2u8).prop_map(
        move |(filter, qos, no_local, retain_as_published, retain_handling)| {
            let options = if version.is_v5() {
                SubscriptionOptions {
                    qos,
                    // [MQTT-3.8.3-4]: no local is a protocol error on a shared subscription.
                    no_local: no_local && !filter.starts_with("$share/"),
                    retain_as_published,
                    retain_handling,
                }
            } else {
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                }
            };
            Subscription { filter, options }
        },
    );
    (
        packet_id(),
        vec(subscription, 1..4),
        props_for(version, subscribe_properties()),
    )
        .prop_map(|(packet_id, subscriptions, properties)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                subscriptions,
                properties,
            })
        })
}

fn suback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let codes: &[u8] = if version.is_v5() {
        SUBACK_CODES
    } else {
        &[0, 1, 2, 0x80]
    };
    (
        packet_id(),
        vec(reason(codes), 1..5),
        props_for(version, ack_properties()),
    )
        .prop_map(|(packet_id, reasons, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reasons,
                properties,
            })
        })
}

fn unsubscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        vec(topic_filter(), 1..4),
        props_for(version, unsubscribe_properties()),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn unsuback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let reasons = if version.is_v5() {
        vec(reason(UNSUBACK_CODES), 1..5).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (packet_id(), reasons, props_for(version, ack_properties())).prop_map(
        |(packet_id, reasons, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reasons,
                properties,
            })
        },
    )
}

fn disconnect(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    if version.is_v5() {
        (reason(DISCONNECT_CODES), disconnect_properties())
            .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
            .boxed()
    } else {
        Just(Packet::Disconnect(Disconnect::default())).boxed()
    }
}

fn auth() -> impl Strategy<Value = Packet> {
    (reason(AUTH_CODES), auth_properties())
        .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
}

/// Every packet type that exists at `version`.
fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let common = prop_oneof![
        connect(version),
        connack(version),
        publish(version),
        pub_response(version),
        subscribe(version),
        suback(version),
        unsubscribe(version),
        unsuback(version),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(version),
    ];
    if version.is_v5() {
        prop_oneof![10 => common, 1 => auth()].boxed()
    } else {
        common.boxed()
    }
}

fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    select(vec![V3_1, V3_1_1, V5]).prop_flat_map(|v| (Just(v), packet(v)))
}

/// The context a receiver of `packet` has: before CONNECT for a CONNECT, else the level.
fn ctx_for(packet: &Packet, version: ProtocolVersion) -> DecodeContext {
    DecodeContext {
        version: match packet {
            Packet::Connect(_) => None,
            _ => Some(version),
        },
        max_packet_size: u32::MAX,
    }
}

fn encode_to_vec(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).expect("valid packets encode");
    assert_eq!(buf.len(), encoded_len(packet, version));
    buf.to_vec()
}

// ---- the properties -------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip((version, packet) in versioned_packet()) {
        let bytes = encode_to_vec(&packet, version);
        let mut buf = BytesMut::from(&bytes[..]);
        let decoded = decode(&mut buf, &ctx_for(&packet, version));
        prop_assert_eq!(decoded, Ok(Some(packet)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn round_trip_in_chunks(
        (version, packet) in versioned_packet(),
        cuts in vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let bytes = encode_to_vec(&packet, version);
        let ctx = ctx_for(&packet, version);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len())).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        cuts.dedup();
        let mut buf = BytesMut::new();
        let mut fed = 0;
        for cut in cuts {
            buf.extend_from_slice(&bytes[fed..cut]);
            fed = cut;
            let result = decode(&mut buf, &ctx);
            if fed < bytes.len() {
                prop_assert_eq!(result, Ok(None));
                prop_assert_eq!(&buf[..], &bytes[..fed]);
            } else {
                prop_assert_eq!(result, Ok(Some(packet.clone())));
                prop_assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        data in vec(any::<u8>(), 0..300),
        version in select(vec![None, Some(V3_1), Some(V3_1_1), Some(V5)]),
        max_packet_size in select(vec![8u32, 64, 1 << 16, u32::MAX]),
    ) {
        let mut ctx = DecodeContext { version, max_packet_size };
        let mut buf = BytesMut::from(&data[..]);
        loop {
            let before = buf.clone();
            match decode(&mut buf, &ctx) {
                Ok(None) => {
                    prop_assert_eq!(&buf, &before);
                    break;
                }
                Err(_) => break,
                Ok(Some(packet)) => {
                    prop_assert!(buf.len() < before.len());
                    // Whatever decodes must re-encode and decode to the same packet.
                    let level = match (&packet, ctx.version) {
                        (Packet::Connect(c), _) => c.protocol,
                        (_, Some(level)) => level,
                        (_, None) => unreachable!("only CONNECT decodes before CONNECT"),
                    };
                    let bytes = encode_to_vec(&packet, level);
                    let mut again = BytesMut::from(&bytes[..]);
                    prop_assert_eq!(
                        decode(&mut again, &ctx_for(&packet, level)),
                        Ok(Some(packet.clone()))
                    );
                    // A server switches to the negotiated level after CONNECT.
                    if let Packet::Connect(c) = &packet {
                        ctx.version = Some(c.protocol);
                    }
                }
            }
        }
    }

    #[test]
    fn arbitrary_bodies_behind_valid_headers_never_panic(
        first in any::<u8>(),
        body in vec(any::<u8>(), 0..120),
        version in select(vec![V3_1, V3_1_1, V5]),
    ) {
        // Random bytes rarely form a plausible fixed header; this aims at the body parsers.
        let mut data = vec![first, body.len() as u8];
        data.extend_from_slice(&body);
        let ctx = DecodeContext { version: Some(version), max_packet_size: u32::MAX };
        let mut buf = BytesMut::from(&data[..]);
        if let Ok(Some(packet)) = decode(&mut buf, &ctx) {
            let bytes = encode_to_vec(&packet, version);
            let mut again = BytesMut::from(&bytes[..]);
            prop_assert_eq!(decode(&mut again, &ctx), Ok(Some(packet)));
        }
    }

    #[test]
    fn arbitrary_connect_bodies_never_panic(
        level in select(vec![(&b"MQIsdp"[..], 3u8), (&b"MQTT"[..], 4), (&b"MQTT"[..], 5)]),
        flags in any::<u8>(),
        body in vec(any::<u8>(), 0..100),
    ) {
        let (name, level) = level;
        let mut data = vec![0x10, 0, 0, name.len() as u8];
        data.extend_from_slice(name);
        data.extend_from_slice(&[level, flags, 0, 30]);
        data.extend_from_slice(&body);
        data[1] = (data.len() - 2) as u8;
        let ctx = DecodeContext { version: None, max_packet_size: u32::MAX };
        if let Ok(Some(packet)) = decode(&mut BytesMut::from(&data[..]), &ctx) {
            let Packet::Connect(c) = &packet else { unreachable!("only CONNECT before CONNECT") };
            let bytes = encode_to_vec(&packet, c.protocol);
            prop_assert_eq!(decode(&mut BytesMut::from(&bytes[..]), &ctx), Ok(Some(packet)));
        }
    }
}
