//! Configured limits: queue size, packet size, topic length / levels, in-flight window.

mod common;

use std::time::Duration;

use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};

/// Issue 14, the default: a persistent subscriber whose queue of 5 is full costs only
/// itself. The publisher gets PUBACK 0x00 for all 60, the oldest queued messages make room
/// for the newest, and every drop is counted in `/metrics` and per client in the admin API.
#[tokio::test]
async fn full_queue_drops_the_subscribers_oldest_by_default() {
    let broker = Broker::start_with_config("max_queued_messages = 5\n");
    let mut conn = connect_packet(ProtocolVersion::V5, "offline", false);
    conn.properties.session_expiry_interval = Some(60);
    let (mut c, _) = RawClient::handshake(broker.addr(), conn.clone()).await;
    c.subscribe(1, &[("q/t", QoS::AtLeastOnce)]).await;
    c.disconnect().await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    for i in 0..60u16 {
        let packet = publish_packet(
            "q/t",
            &i.to_be_bytes(),
            QoS::AtLeastOnce,
            false,
            Some(i + 1),
        );
        assert_eq!(
            publ.publish(packet).await,
            ReasonCode::SUCCESS,
            "message {i}"
        );
    }
    let text = metrics(broker.http_addr());
    assert_eq!(
        sample(
            &text,
            "halyard_messages_dropped_total{reason=\"queue_full_oldest\"}"
        ),
        55.0
    );
    let (status, body) = http(
        broker.http_addr(),
        "GET",
        "/api/v1/clients/offline",
        None,
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"dropped\":55"), "{body}");
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert!(ack.session_present);
    for i in 55..60u16 {
        let p = c.recv_publish_ack().await;
        assert_eq!(
            p.payload.as_ref(),
            &i.to_be_bytes(),
            "the newest five, in order"
        );
    }
    c.expect_nothing(300).await;
    assert!(
        broker.logs().contains("messages dropped for a full queue"),
        "dropping is logged with the client id"
    );
}

/// DESIGN 3 ("never PUBACK then drop silently") / 3.4.2.1 0x97: with
/// `queue_full_policy = "reject"`, max_queued_messages = 5 and a persistent offline MQTT 5
/// subscriber, the publisher eventually gets PUBACK 0x97 (Quota exceeded); every message
/// acknowledged with success is delivered on reconnect.
#[tokio::test]
async fn full_queue_refuses_with_puback_0x97() {
    let broker =
        Broker::start_with_config("max_queued_messages = 5\nqueue_full_policy = \"reject\"\n");
    let mut conn = connect_packet(ProtocolVersion::V5, "offline", false);
    conn.properties.session_expiry_interval = Some(60);
    let (mut c, _) = RawClient::handshake(broker.addr(), conn.clone()).await;
    c.subscribe(1, &[("q/t", QoS::AtLeastOnce)]).await;
    c.disconnect().await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..60u16 {
        let r = publ
            .publish(publish_packet(
                "q/t",
                &i.to_be_bytes(),
                QoS::AtLeastOnce,
                false,
                Some(i + 1),
            ))
            .await;
        if r == ReasonCode::QUOTA_EXCEEDED {
            refused += 1;
        } else {
            assert_eq!(r, ReasonCode::SUCCESS, "message {i}");
            assert_eq!(refused, 0, "accepted {i} after a refusal");
            accepted.push(i);
        }
    }
    assert!(
        refused > 0,
        "queue of 5 never reported full (accepted {})",
        accepted.len()
    );
    assert!(accepted.len() >= 5, "accepted only {}", accepted.len());
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert!(ack.session_present);
    for i in &accepted {
        let p = c.recv_publish_ack().await;
        assert_eq!(
            p.payload.as_ref(),
            &i.to_be_bytes(),
            "accepted messages delivered in order"
        );
    }
    c.expect_nothing(300).await;
}

/// [MQTT-3.2.2-15] server side / 4.13: a packet larger than max_packet_size -> MQTT 5
/// DISCONNECT 0x95 (Packet too large) then close.
#[tokio::test]
async fn v5_packet_larger_than_max_packet_size_disconnect_0x95() {
    let broker = Broker::start_with_config("max_packet_size = 1000\n");
    let mut c = RawClient::connect_v5(broker.addr(), "big", true).await;
    c.send(&Packet::Publish(publish_packet(
        "big/t",
        &[0u8; 2000],
        QoS::AtMostOnce,
        false,
        None,
    )))
    .await;
    c.expect_disconnect(ReasonCode::PACKET_TOO_LARGE).await;
}

/// 3.1.1: an oversized packet closes the connection; other clients are unaffected.
#[tokio::test]
async fn v311_packet_larger_than_max_packet_size_closes() {
    let broker = Broker::start_with_config("max_packet_size = 1000\n");
    let mut other = RawClient::connect_v311(broker.addr(), "other", true).await;
    let mut c = RawClient::connect_v311(broker.addr(), "big", true).await;
    c.send(&Packet::Publish(publish_packet(
        "big/t",
        &[0u8; 2000],
        QoS::AtMostOnce,
        false,
        None,
    )))
    .await;
    c.expect_closed().await;
    other.ping().await;
}

/// A packet just under the limit is accepted and delivered.
#[tokio::test]
async fn packet_within_max_packet_size_accepted() {
    let broker = Broker::start_with_config("max_packet_size = 1000\n");
    let mut c = RawClient::connect_v5(broker.addr(), "fits", true).await;
    c.subscribe(1, &[("fit/t", QoS::AtMostOnce)]).await;
    c.send(&Packet::Publish(publish_packet(
        "fit/t",
        &[7u8; 900],
        QoS::AtMostOnce,
        false,
        None,
    )))
    .await;
    assert_eq!(c.recv_publish().await.payload.len(), 900);
}

/// max_topic_length = 16: a PUBLISH to a longer topic is rejected (PUBACK or DISCONNECT with
/// 0x90 Topic Name invalid) and not delivered.
#[tokio::test]
async fn topic_longer_than_max_topic_length_rejected() {
    let broker = Broker::start_with_config("max_topic_length = 16\n");
    let mut sub = RawClient::connect_v5(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("#", QoS::AtMostOnce)]).await;
    let mut c = RawClient::connect_v5(broker.addr(), "long", true).await;
    let topic = "a/very/long/topic/name"; // 22 bytes
    c.send(&Packet::Publish(publish_packet(
        topic,
        b"x",
        QoS::AtLeastOnce,
        false,
        Some(1),
    )))
    .await;
    match c.recv().await {
        Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::TOPIC_NAME_INVALID),
        Packet::Disconnect(d) => assert_eq!(d.reason, ReasonCode::TOPIC_NAME_INVALID),
        other => panic!("expected a refusal, got {other:?}"),
    }
    sub.expect_nothing(300).await;
}

/// max_topic_length = 16: a longer filter is refused in SUBACK (0x8F) or closes.
#[tokio::test]
async fn filter_longer_than_max_topic_length_refused() {
    let broker = Broker::start_with_config("max_topic_length = 16\n");
    let mut c = RawClient::connect_v5(broker.addr(), "longf", true).await;
    c.send(&Packet::Subscribe(subscribe_packet(
        1,
        &[
            ("ok/#", QoS::AtMostOnce),
            ("a/very/long/filter/#", QoS::AtMostOnce),
        ],
    )))
    .await;
    match c.try_recv(TIMEOUT).await {
        Ok(Packet::SubAck(a)) => assert_eq!(
            a.reasons,
            vec![ReasonCode::GRANTED_QOS_0, ReasonCode::TOPIC_FILTER_INVALID]
        ),
        Ok(Packet::Disconnect(d)) => assert!(d.reason.is_error()),
        Err(RecvError::Closed) => {}
        other => panic!("expected refusal, got {other:?}"),
    }
}

/// max_topic_levels = 3: a 4-level topic is rejected and not delivered.
#[tokio::test]
async fn topic_with_too_many_levels_rejected() {
    let broker = Broker::start_with_config("max_topic_levels = 3\n");
    let mut sub = RawClient::connect_v5(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("#", QoS::AtMostOnce)]).await;
    let mut c = RawClient::connect_v5(broker.addr(), "deep", true).await;
    c.send(&Packet::Publish(publish_packet(
        "a/b/c/d",
        b"x",
        QoS::AtLeastOnce,
        false,
        Some(1),
    )))
    .await;
    match c.recv().await {
        Packet::PubAck(a) => assert!(a.reason.is_error(), "{a:?}"),
        Packet::Disconnect(d) => assert!(d.reason.is_error(), "{d:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    sub.expect_nothing(300).await;
}

/// max_inflight = 2: a 3.1.1 subscriber that does not acknowledge has at most 2 QoS 1
/// messages in flight; acknowledging releases the next one.
#[tokio::test]
async fn outbound_inflight_window_limited_by_max_inflight() {
    let broker = Broker::start_with_config("max_inflight = 2\n");
    let mut sub = RawClient::connect_v311(broker.addr(), "slow", true).await;
    sub.subscribe(1, &[("if/t", QoS::AtLeastOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    for i in 0..5u8 {
        publ.publish(publish_packet(
            "if/t",
            &[i],
            QoS::AtLeastOnce,
            false,
            Some(1 + i as u16),
        ))
        .await;
    }
    let a = sub.recv_publish().await;
    let _b = sub.recv_publish().await;
    sub.expect_nothing(400).await;
    sub.ack(&a).await;
    let c = sub.try_recv(Duration::from_secs(2)).await;
    assert!(
        matches!(c, Ok(Packet::Publish(ref p)) if p.payload.as_ref() == [2]),
        "{c:?}"
    );
}

/// Publishes `count` QoS 0 messages of `size` bytes whose payload starts with their index,
/// to a subscriber that reads nothing until they are all sent; then returns the indices it
/// receives, in arrival order, until the broker has been quiet for a second.
async fn flood_a_stalled_subscriber(config: &str, count: u32, size: usize) -> Vec<u32> {
    let broker = Broker::start_with_config(config);
    let mut sub = RawClient::connect_v311(broker.addr(), "stalled", true).await;
    sub.subscribe(1, &[("flood/t", QoS::AtMostOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "flooder", true).await;
    for i in 0..count {
        let mut payload = vec![0u8; size];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        publ.publish(publish_packet(
            "flood/t",
            &payload,
            QoS::AtMostOnce,
            false,
            None,
        ))
        .await;
    }
    // A PINGRESP means the broker has read (and routed) every publish before it.
    publ.send(&Packet::PingReq).await;
    assert!(matches!(
        publ.try_recv(Duration::from_secs(10)).await,
        Ok(Packet::PingResp)
    ));
    let mut received = Vec::new();
    while let Ok(packet) = sub.try_recv(Duration::from_secs(1)).await {
        let Packet::Publish(publish) = packet else {
            panic!("expected PUBLISH, got {packet:?}");
        };
        let index: [u8; 4] = publish.payload[..4].try_into().expect("index");
        received.push(u32::from_be_bytes(index));
    }
    received
}

/// Bytes the socket did not take at once wait in the connection's writer, and later packets
/// queue behind them: with room for all of it (`max_outbound_buffer`), a subscriber that
/// stalls through 12 MB of QoS 0 traffic gets every message, in publish order
/// [MQTT-4.6.0-6].
#[tokio::test]
async fn a_stalled_subscriber_gets_everything_in_order_within_the_outbound_limit() {
    let received =
        flood_a_stalled_subscriber("max_outbound_buffer = 67108864\n", 400, 30_000).await;
    assert_eq!(received, (0..400).collect::<Vec<u32>>());
}

/// DESIGN 3 (slow consumers): beyond `max_outbound_buffer` QoS 0 messages to the stalled
/// subscriber are dropped, never reordered: what arrives is in publish order, and the
/// broker's memory for it stays bounded.
#[tokio::test]
async fn a_stalled_subscriber_loses_qos0_beyond_the_outbound_limit_but_never_order() {
    let received = flood_a_stalled_subscriber("", 400, 30_000).await;
    assert!(!received.is_empty(), "the first messages get through");
    assert!(received.len() < 400, "12 MB do not fit a 1 MiB limit");
    assert!(
        received.windows(2).all(|pair| pair[0] < pair[1]),
        "in publish order: {received:?}"
    );
}
