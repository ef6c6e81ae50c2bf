//! MQTT 5 features: topic aliases, message expiry, subscription identifiers, no-local,
//! forwarded properties, reason codes on acks, flow control, maximum packet size, AUTH.

mod common;

use bytes::Bytes;
use common::*;
use halyard_codec::{Packet, Properties, ProtocolVersion, QoS, ReasonCode, SubscriptionOptions};

const V5: ProtocolVersion = ProtocolVersion::V5;

/// CONNACK advertises the configured limits: Receive Maximum, Topic Alias Maximum, Maximum
/// Packet Size ([MQTT-3.2.2-15] / [MQTT-3.2.2-17] rely on them).
#[tokio::test]
async fn connack_advertises_configured_limits() {
    let broker = Broker::start_with_config(
        "receive_maximum = 7\ntopic_alias_maximum = 3\nmax_packet_size = 5000\n",
    );
    let (_c, ack) = RawClient::handshake(broker.addr(), connect_packet(V5, "limits", true)).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert_eq!(ack.properties.receive_maximum, Some(7));
    assert_eq!(ack.properties.topic_alias_maximum, Some(3));
    assert_eq!(ack.properties.maximum_packet_size, Some(5000));
}

/// [MQTT-3.3.2-12]: the server accepts topic aliases 1..=Topic Alias Maximum: a PUBLISH sets
/// alias 1 for a topic, a later one uses the alias with an empty topic name.
#[tokio::test]
async fn inbound_topic_alias_set_then_used() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v5(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("ta/t", QoS::AtMostOnce)]).await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    let mut p1 = publish0("ta/t", b"one");
    p1.properties.topic_alias = Some(1);
    publ.send(&Packet::Publish(p1)).await;
    let mut p2 = publish0("", b"two");
    p2.properties.topic_alias = Some(1);
    publ.send(&Packet::Publish(p2)).await;
    let a = sub.recv_publish().await;
    let b = sub.recv_publish().await;
    assert_eq!(
        (a.topic.as_str(), a.payload.as_ref()),
        ("ta/t", &b"one"[..])
    );
    assert_eq!(
        (b.topic.as_str(), b.payload.as_ref()),
        ("ta/t", &b"two"[..])
    );
}

/// [MQTT-3.2.2-17] / 3.3.2.3.4: an alias above the Topic Alias Maximum is answered with
/// DISCONNECT 0x94 (Topic Alias invalid) and the connection is closed.
#[tokio::test]
async fn topic_alias_above_maximum_disconnect_0x94() {
    let broker = Broker::start_with_config("topic_alias_maximum = 2\n");
    let mut c = RawClient::connect_v5(broker.addr(), "alias", true).await;
    let mut p = publish0("ta/t", b"x");
    p.properties.topic_alias = Some(3);
    c.send(&Packet::Publish(p)).await;
    c.expect_disconnect(ReasonCode::TOPIC_ALIAS_INVALID).await;
}

/// [MQTT-3.3.2-8]: Topic Alias 0 is invalid: DISCONNECT 0x94.
#[tokio::test]
async fn topic_alias_zero_disconnect_0x94() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "alias0", true).await;
    // Hand-encoded: PUBLISH QoS 0, topic "t", properties: 0x23 0x0000.
    let mut body = raw_str(b"t");
    body.extend_from_slice(&[0x03, 0x23, 0x00, 0x00]);
    body.extend_from_slice(b"x");
    c.send_bytes(&raw_packet(0x30, &body)).await;
    c.expect_disconnect(ReasonCode::TOPIC_ALIAS_INVALID).await;
}

/// 3.3.2.3.4: an empty topic name with an alias that has no mapping is a Protocol Error.
#[tokio::test]
async fn unknown_topic_alias_with_empty_topic_is_an_error() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "alias?", true).await;
    let mut p = publish0("", b"x");
    p.properties.topic_alias = Some(1);
    c.send(&Packet::Publish(p)).await;
    let reason = c.expect_closed_maybe_disconnect().await;
    assert!(
        matches!(
            reason,
            None | Some(ReasonCode::PROTOCOL_ERROR) | Some(ReasonCode::TOPIC_ALIAS_INVALID)
        ),
        "{reason:?}"
    );
}

/// [MQTT-3.3.2-7]: topic alias mappings do not carry over to a new connection.
#[tokio::test]
async fn topic_alias_not_carried_to_new_connection() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "carry", false).await;
    let mut p = publish0("ta/t", b"x");
    p.properties.topic_alias = Some(1);
    c.send(&Packet::Publish(p)).await;
    c.ping().await;
    c.disconnect().await;
    let mut c = RawClient::connect_v5(broker.addr(), "carry", false).await;
    let mut p = publish0("", b"y");
    p.properties.topic_alias = Some(1);
    c.send(&Packet::Publish(p)).await;
    c.expect_closed_maybe_disconnect().await;
}

/// [MQTT-3.1.2-27]: a client that sent no Topic Alias Maximum never receives topic aliases.
#[tokio::test]
async fn server_sends_no_topic_alias_without_client_maximum() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "noalias", true).await;
    c.subscribe(1, &[("na/t", QoS::AtMostOnce)]).await;
    for i in 0..3u8 {
        c.send(&Packet::Publish(publish0("na/t", &[i]))).await;
    }
    for _ in 0..3 {
        let p = c.recv_publish().await;
        assert_eq!(p.topic, "na/t");
        assert_eq!(p.properties.topic_alias, None);
    }
}

/// Connects a persistent MQTT 5 subscriber on `filter` (session expiry 60) and disconnects it.
async fn offline_subscriber(broker: &Broker, id: &str, filter: &str) -> halyard_codec::Connect {
    let mut conn = connect_packet(V5, id, false);
    conn.properties.session_expiry_interval = Some(60);
    common::offline_subscriber(broker.addr(), conn.clone(), filter).await;
    conn
}

/// [MQTT-3.3.2-5]: a message whose expiry interval (1 s) passes while queued for an offline
/// subscriber is not delivered.
#[tokio::test]
async fn expired_message_not_delivered_to_offline_subscriber() {
    let broker = Broker::start();
    let conn = offline_subscriber(&broker, "offline", "exp/t").await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    let mut p = publish_packet("exp/t", b"stale", QoS::AtLeastOnce, false, Some(1));
    p.properties.message_expiry_interval = Some(1);
    publ.publish(p).await;
    let mut p = publish_packet("exp/t", b"fresh", QoS::AtLeastOnce, false, Some(2));
    p.properties.message_expiry_interval = Some(60);
    publ.publish(p).await;
    sleep_ms(2100).await;
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert!(ack.session_present);
    let got = c.recv_publish_ack().await;
    assert_eq!(
        got.payload.as_ref(),
        b"fresh",
        "the expired message must be dropped"
    );
    c.expect_nothing(300).await;
}

/// [MQTT-3.3.2-6]: a queued message is delivered with its expiry interval reduced by the
/// time it waited (<= 10, and > 5 after a short wait).
#[tokio::test]
async fn message_expiry_interval_reduced_by_waiting_time() {
    let broker = Broker::start();
    let conn = offline_subscriber(&broker, "offline", "exp/t").await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    let mut p = publish_packet("exp/t", b"x", QoS::AtLeastOnce, false, Some(1));
    p.properties.message_expiry_interval = Some(10);
    publ.publish(p).await;
    sleep_ms(1100).await;
    let (mut c, _) = RawClient::handshake(broker.addr(), conn).await;
    let got = c.recv_publish_ack().await;
    let left = got
        .properties
        .message_expiry_interval
        .expect("[MQTT-3.3.2-6] expiry interval forwarded");
    assert!(left <= 9 && left > 5, "remaining expiry {left}");
}

/// [MQTT-3.3.2-5] for retained messages: an expired retained message is not sent to a new
/// subscriber.
#[tokio::test]
async fn expired_retained_message_not_delivered() {
    let broker = Broker::start();
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    let mut p = publish_packet("exp/r", b"stale", QoS::AtLeastOnce, true, Some(1));
    p.properties.message_expiry_interval = Some(1);
    publ.publish(p).await;
    sleep_ms(2100).await;
    let mut c = RawClient::connect_v5(broker.addr(), "late", true).await;
    c.subscribe(1, &[("exp/r", QoS::AtLeastOnce)]).await;
    c.expect_nothing(300).await;
}

/// [MQTT-3.3.4-3]: a message matching a subscription made with a Subscription Identifier
/// carries that identifier; one without gets none.
#[tokio::test]
async fn subscription_identifier_sent_with_matching_messages() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "subid", true).await;
    let mut s = subscribe_opts(1, "sid/a", sub_options(QoS::AtMostOnce));
    s.properties.subscription_identifiers = vec![7];
    c.subscribe_with(s).await;
    c.subscribe(2, &[("sid/b", QoS::AtMostOnce)]).await;
    c.send(&Packet::Publish(publish0("sid/a", b"a"))).await;
    let a = c.recv_publish().await;
    assert_eq!(a.properties.subscription_identifiers, vec![7]);
    c.send(&Packet::Publish(publish0("sid/b", b"b"))).await;
    let b = c.recv_publish().await;
    assert!(b.properties.subscription_identifiers.is_empty());
}

/// [MQTT-3.8.3-3]: No Local: the client's own publications are not sent back to it, but
/// other subscribers still get them.
#[tokio::test]
async fn no_local_suppresses_own_messages() {
    let broker = Broker::start();
    let mut me = RawClient::connect_v5(broker.addr(), "me", true).await;
    me.subscribe_with(subscribe_opts(
        1,
        "nl/t",
        SubscriptionOptions {
            qos: QoS::AtMostOnce,
            no_local: true,
            ..Default::default()
        },
    ))
    .await;
    let mut other = RawClient::connect_v5(broker.addr(), "other", true).await;
    other.subscribe(1, &[("nl/t", QoS::AtMostOnce)]).await;
    me.send(&Packet::Publish(publish0("nl/t", b"mine"))).await;
    assert_eq!(other.recv_publish().await.payload.as_ref(), b"mine");
    me.expect_nothing(300).await;
    other
        .send(&Packet::Publish(publish0("nl/t", b"theirs")))
        .await;
    assert_eq!(me.recv_publish().await.payload.as_ref(), b"theirs");
}

/// Publishes one message with `props` from one client and returns the properties the
/// subscriber receives.
async fn forwarded(props: Properties) -> Properties {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v5(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("fw/t", QoS::AtLeastOnce)]).await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    let mut p = publish_packet("fw/t", b"payload", QoS::AtLeastOnce, false, Some(1));
    p.properties = props;
    publ.publish(p).await;
    sub.recv_publish_ack().await.properties
}

/// [MQTT-3.3.2-17] / [MQTT-3.3.2-18]: user properties forwarded unaltered and in order
/// (duplicates included).
#[tokio::test]
async fn user_properties_forwarded_in_order() {
    let ups = vec![
        ("z".to_string(), "1".to_string()),
        ("a".to_string(), "2".to_string()),
        ("z".to_string(), "3".to_string()),
    ];
    let got = forwarded(Properties {
        user_properties: ups.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(got.user_properties, ups);
}

/// [MQTT-3.3.2-20]: Content Type forwarded unaltered.
#[tokio::test]
async fn content_type_forwarded() {
    let got = forwarded(Properties {
        content_type: Some("text/plain; charset=utf-8".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        got.content_type.as_deref(),
        Some("text/plain; charset=utf-8")
    );
}

/// [MQTT-3.3.2-15]: Response Topic forwarded unaltered.
#[tokio::test]
async fn response_topic_forwarded() {
    let got = forwarded(Properties {
        response_topic: Some("reply/to/me".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(got.response_topic.as_deref(), Some("reply/to/me"));
}

/// [MQTT-3.3.2-16]: Correlation Data forwarded unaltered (binary).
#[tokio::test]
async fn correlation_data_forwarded() {
    let got = forwarded(Properties {
        correlation_data: Some(Bytes::from_static(&[0, 1, 0xff, 0x80])),
        ..Default::default()
    })
    .await;
    assert_eq!(
        got.correlation_data.as_deref(),
        Some(&[0u8, 1, 0xff, 0x80][..])
    );
}

/// [MQTT-3.3.2-4]: Payload Format Indicator forwarded unaltered.
#[tokio::test]
async fn payload_format_indicator_forwarded() {
    let got = forwarded(Properties {
        payload_format_indicator: Some(1),
        ..Default::default()
    })
    .await;
    assert_eq!(got.payload_format_indicator, Some(1));
}

/// 3.4.2.1: PUBACK reason 0x10 (No matching subscribers) when nobody subscribes.
#[tokio::test]
async fn puback_0x10_when_no_matching_subscribers() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "alone", true).await;
    let reason = c
        .publish(publish_packet(
            "no/one",
            b"x",
            QoS::AtLeastOnce,
            false,
            Some(1),
        ))
        .await;
    assert_eq!(reason, ReasonCode::NO_MATCHING_SUBSCRIBERS);
    let mut sub = RawClient::connect_v5(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("no/one", QoS::AtMostOnce)]).await;
    let reason = c
        .publish(publish_packet(
            "no/one",
            b"x",
            QoS::AtLeastOnce,
            false,
            Some(2),
        ))
        .await;
    assert_eq!(reason, ReasonCode::SUCCESS);
}

/// 3.5.2.1: PUBREC reason 0x10 (No matching subscribers) for QoS 2.
#[tokio::test]
async fn pubrec_0x10_when_no_matching_subscribers() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "alone2", true).await;
    let reason = c
        .publish(publish_packet(
            "no/one",
            b"x",
            QoS::ExactlyOnce,
            false,
            Some(1),
        ))
        .await;
    assert_eq!(reason, ReasonCode::NO_MATCHING_SUBSCRIBERS);
}

/// [MQTT-3.1.2-24] / [MQTT-3.1.2-25]: a message larger than the client's Maximum Packet Size
/// is not sent to it (and the next, smaller one is).
#[tokio::test]
async fn message_larger_than_client_maximum_packet_size_not_sent() {
    let broker = Broker::start();
    let mut conn = connect_packet(V5, "small", true);
    conn.properties.maximum_packet_size = Some(100);
    let (mut sub, _) = RawClient::handshake(broker.addr(), conn).await;
    sub.subscribe(1, &[("mps/t", QoS::AtLeastOnce)]).await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "mps/t",
        &[b'x'; 200],
        QoS::AtLeastOnce,
        false,
        Some(1),
    ))
    .await;
    publ.publish(publish_packet(
        "mps/t",
        b"small",
        QoS::AtLeastOnce,
        false,
        Some(2),
    ))
    .await;
    let got = sub.recv_publish_ack().await;
    assert_eq!(got.payload.as_ref(), b"small");
    sub.expect_nothing(300).await;
}

/// [MQTT-4.12.0-1]: an Authentication Method the server does not support (none configured)
/// gets CONNACK 0x8C (Bad authentication method) and the connection is closed.
#[tokio::test]
async fn authentication_method_without_auth_configured_0x8c() {
    let broker = Broker::start();
    let mut conn = connect_packet(V5, "auth", true);
    conn.properties.authentication_method = Some("SCRAM-SHA-1".into());
    conn.properties.authentication_data = Some(Bytes::from_static(b"client-first"));
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    assert!(!ack.session_present, "[MQTT-3.2.2-6]");
    c.expect_closed().await;
}

/// [MQTT-4.12.0-6]: without an Authentication Method in CONNECT the CONNACK has none.
#[tokio::test]
async fn no_authentication_method_in_connack_without_one_in_connect() {
    let broker = Broker::start();
    let (_c, ack) = RawClient::handshake(broker.addr(), connect_packet(V5, "plain", true)).await;
    assert_eq!(ack.properties.authentication_method, None);
}

/// [MQTT-3.1.2-29]: with Request Problem Information 0, a PUBACK carries no Reason String and
/// no User Properties.
#[tokio::test]
async fn request_problem_information_0_no_reason_string_on_puback() {
    let broker = Broker::start();
    let mut conn = connect_packet(V5, "quiet", true);
    conn.properties.request_problem_information = Some(0);
    let (mut c, _) = RawClient::handshake(broker.addr(), conn).await;
    c.send(&Packet::Publish(publish_packet(
        "no/one",
        b"x",
        QoS::AtLeastOnce,
        false,
        Some(1),
    )))
    .await;
    match c.recv().await {
        Packet::PubAck(a) => {
            assert_eq!(a.reason, ReasonCode::NO_MATCHING_SUBSCRIBERS);
            assert_eq!(a.properties.reason_string, None);
            assert!(a.properties.user_properties.is_empty());
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// [MQTT-3.1.2-28]: Request Response Information 0 (default) -> no Response Information.
#[tokio::test]
async fn no_response_information_unless_requested() {
    let broker = Broker::start();
    let (_c, ack) = RawClient::handshake(broker.addr(), connect_packet(V5, "rri", true)).await;
    assert_eq!(ack.properties.response_information, None);
}

/// [MQTT-3.3.4-9] / [MQTT-4.9.0-2]: the server sends at most Receive Maximum unacknowledged
/// QoS 1 PUBLISHes; an ack frees room for the next one.
#[tokio::test]
async fn server_respects_client_receive_maximum() {
    let broker = Broker::start();
    let mut conn = connect_packet(V5, "slow", true);
    conn.properties.receive_maximum = Some(2);
    let (mut sub, _) = RawClient::handshake(broker.addr(), conn).await;
    sub.subscribe(1, &[("rm/t", QoS::AtLeastOnce)]).await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    for i in 0..5u8 {
        publ.publish(publish_packet(
            "rm/t",
            &[i],
            QoS::AtLeastOnce,
            false,
            Some(1 + i as u16),
        ))
        .await;
    }
    let a = sub.recv_publish().await;
    let b = sub.recv_publish().await;
    assert_eq!((a.payload[0], b.payload[0]), (0, 1));
    sub.expect_nothing(400).await;
    sub.ack(&a).await;
    assert_eq!(sub.recv_publish().await.payload[0], 2);
    sub.expect_nothing(300).await;
    // [MQTT-4.9.0-3] / [MQTT-3.3.4-10]: other packets still flow with the quota at 0.
    sub.ping().await;
}

/// 3.3.4 (Receive Maximum): a client that exceeds the server's Receive Maximum (2 QoS 2
/// messages not completed) gets DISCONNECT 0x93 (Receive Maximum exceeded).
#[tokio::test]
async fn client_exceeding_server_receive_maximum_disconnect_0x93() {
    let broker = Broker::start_with_config("receive_maximum = 2\n");
    let mut c = RawClient::connect_v5(broker.addr(), "greedy", true).await;
    for id in 1..=3u16 {
        c.send(&Packet::Publish(publish_packet(
            "rm/in",
            b"x",
            QoS::ExactlyOnce,
            false,
            Some(id),
        )))
        .await;
    }
    // Up to two PUBRECs may arrive before the DISCONNECT.
    let mut pubrecs = 0;
    loop {
        match c.recv().await {
            Packet::PubRec(_) => pubrecs += 1,
            Packet::Disconnect(d) => {
                assert_eq!(d.reason, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pubrecs <= 2);
    c.expect_closed().await;
}

/// [MQTT-3.3.4-6]: a PUBLISH from a client with a Subscription Identifier is a Protocol
/// Error: the connection is closed (DISCONNECT 0x82 if any).
#[tokio::test]
async fn publish_with_subscription_identifier_from_client_is_error() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "sidpub", true).await;
    // Hand-encoded: PUBLISH QoS 0, topic "t", properties: 0x0B 0x05.
    let mut body = raw_str(b"t");
    body.extend_from_slice(&[0x02, 0x0b, 0x05]);
    body.extend_from_slice(b"x");
    c.send_bytes(&raw_packet(0x30, &body)).await;
    let reason = c.expect_closed_maybe_disconnect().await;
    assert!(
        matches!(
            reason,
            None | Some(ReasonCode::PROTOCOL_ERROR) | Some(ReasonCode::MALFORMED_PACKET)
        ),
        "{reason:?}"
    );
}

/// [MQTT-3.14.2-2]: a server DISCONNECT (here: session taken over) carries no Session Expiry
/// Interval.
#[tokio::test]
async fn server_disconnect_has_no_session_expiry_interval() {
    let broker = Broker::start();
    let mut first = RawClient::connect_v5(broker.addr(), "dup", true).await;
    let _second = RawClient::connect_v5(broker.addr(), "dup", true).await;
    match first.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.properties.session_expiry_interval, None),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

/// rumqttc MQTT 5 flow: user properties and content type survive a round trip through the
/// broker ([MQTT-3.3.2-17], [MQTT-3.3.2-20]).
#[tokio::test]
async fn rumqttc_v5_properties_round_trip() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as Q;
    let broker = Broker::start();
    let (mut sub, ack) = V5Client::connect(broker.addr(), "r5sub", true).await;
    assert_eq!(
        ack.code,
        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
    );
    sub.client.subscribe("r5/#", Q::AtLeastOnce).await.unwrap();
    sub.wait_suback().await;
    let (publ, _) = V5Client::connect(broker.addr(), "r5pub", true).await;
    let props = PublishProperties {
        content_type: Some("application/cbor".into()),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        ..Default::default()
    };
    publ.client
        .publish_with_properties("r5/x", Q::AtLeastOnce, false, "p", props)
        .await
        .unwrap();
    let p = sub.next_publish().await;
    assert_eq!(p.topic.as_ref(), b"r5/x");
    let got = p.properties.expect("properties forwarded");
    assert_eq!(got.content_type.as_deref(), Some("application/cbor"));
    assert_eq!(
        got.user_properties,
        vec![
            ("k".to_string(), "v".to_string()),
            ("k".to_string(), "w".to_string())
        ]
    );
}
