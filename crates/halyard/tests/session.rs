//! Sessions: takeover, persistence while offline, clean start, MQTT 5 session expiry.

mod common;

use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};

/// [MQTT-3.1.4-2] (3.1.1): a second CONNECT with the same client id closes the first
/// connection; the new one works.
#[tokio::test]
async fn takeover_closes_first_connection_v311() {
    let broker = Broker::start();
    let mut first = RawClient::connect_v311(broker.addr(), "same", true).await;
    let mut second = RawClient::connect_v311(broker.addr(), "same", true).await;
    first.expect_closed().await;
    second.ping().await;
}

/// [MQTT-3.1.4-3]: MQTT 5: the existing connection gets DISCONNECT 0x8E (Session taken
/// over) and is closed.
#[tokio::test]
async fn takeover_sends_disconnect_0x8e_v5() {
    let broker = Broker::start();
    let mut first = RawClient::connect_v5(broker.addr(), "same5", true).await;
    let mut second = RawClient::connect_v5(broker.addr(), "same5", true).await;
    first
        .expect_disconnect(ReasonCode::SESSION_TAKEN_OVER)
        .await;
    second.ping().await;
}

/// [MQTT-3.1.4-3] / [MQTT-3.1.2-5]: after a takeover with clean start 0 the session
/// continues: Session Present 1 and the subscriptions are kept (3.1.1).
#[tokio::test]
async fn takeover_keeps_session_with_clean_start_0_v311() {
    let broker = Broker::start();
    let mut first = RawClient::connect_v311(broker.addr(), "keep", false).await;
    first.subscribe(1, &[("tk/t", QoS::AtLeastOnce)]).await;
    let (mut second, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "keep", false),
    )
    .await;
    assert!(ack.session_present);
    first.expect_closed().await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "tk/t",
        b"still",
        QoS::AtLeastOnce,
        false,
        Some(1),
    ))
    .await;
    assert_eq!(second.recv_publish_ack().await.payload.as_ref(), b"still");
}

/// Same for MQTT 5 (session expiry 60): session continues after takeover.
#[tokio::test]
async fn takeover_keeps_session_with_clean_start_0_v5() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V5, "keep5", false);
    conn.properties.session_expiry_interval = Some(60);
    let (mut first, _) = RawClient::handshake(broker.addr(), conn.clone()).await;
    first.subscribe(1, &[("tk/t", QoS::AtLeastOnce)]).await;
    let (mut second, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert!(ack.session_present);
    first
        .expect_disconnect(ReasonCode::SESSION_TAKEN_OVER)
        .await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "tk/t",
        b"still",
        QoS::AtLeastOnce,
        false,
        Some(1),
    ))
    .await;
    assert_eq!(second.recv_publish_ack().await.payload.as_ref(), b"still");
}

/// [MQTT-3.1.2-4] (3.1.1) / [MQTT-4.5.0-1]: subscriptions of a persistent session persist
/// while offline, QoS 1 and QoS 2 messages are queued and delivered on reconnect.
#[tokio::test]
async fn persistent_session_queues_qos1_and_qos2_while_offline() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "offline", false).await;
    c.subscribe(1, &[("off/#", QoS::ExactlyOnce)]).await;
    c.disconnect().await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "off/1",
        b"q1",
        QoS::AtLeastOnce,
        false,
        Some(1),
    ))
    .await;
    publ.publish(publish_packet(
        "off/2",
        b"q2",
        QoS::ExactlyOnce,
        false,
        Some(2),
    ))
    .await;
    let (mut c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "offline", false),
    )
    .await;
    assert!(ack.session_present);
    let a = c.recv_publish_ack().await;
    let b = c.recv_publish_ack().await;
    assert_eq!((a.topic.as_str(), a.qos), ("off/1", QoS::AtLeastOnce));
    assert_eq!((b.topic.as_str(), b.qos), ("off/2", QoS::ExactlyOnce));
}

/// The same flow with rumqttc 3.1.1 clients.
#[tokio::test]
async fn rumqttc_persistent_session_receives_queued_messages() {
    let broker = Broker::start();
    let (sub, _) = V4Client::connect(broker.addr(), "rpersist", false).await;
    sub.client
        .subscribe("rp/t", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut sub = sub;
    sub.wait_suback().await;
    sub.disconnect().await;
    let (mut publ, _) = V4Client::connect(broker.addr(), "rpub", true).await;
    for i in 0..3u8 {
        publ.client
            .publish("rp/t", rumqttc::QoS::AtLeastOnce, false, vec![i])
            .await
            .unwrap();
        publ.wait_pub_done().await;
    }
    let (mut sub, ack) = V4Client::connect(broker.addr(), "rpersist", false).await;
    assert!(ack.session_present);
    for i in 0..3u8 {
        assert_eq!(sub.next_publish().await.payload.as_ref(), &[i]);
    }
}

/// [MQTT-3.1.2-4]: clean start 1 discards the stored session: no queued messages, no
/// subscriptions.
#[tokio::test]
async fn clean_start_discards_session() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "wipe", false).await;
    c.subscribe(1, &[("wipe/t", QoS::AtLeastOnce)]).await;
    c.disconnect().await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "wipe/t",
        b"queued",
        QoS::AtLeastOnce,
        false,
        Some(1),
    ))
    .await;
    let (mut c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "wipe", true),
    )
    .await;
    assert!(!ack.session_present);
    c.expect_nothing(400).await;
    // The subscription is gone too.
    publ.publish(publish_packet(
        "wipe/t",
        b"new",
        QoS::AtLeastOnce,
        false,
        Some(2),
    ))
    .await;
    c.expect_nothing(300).await;
}

/// [MQTT-3.1.2-6] / 3.1.1 clean session 1 ends the session at disconnect: a later
/// clean-start-0 CONNECT finds none.
#[tokio::test]
async fn clean_session_not_kept_after_disconnect_v311() {
    let broker = Broker::start();
    let c = RawClient::connect_v311(broker.addr(), "transient", true).await;
    c.disconnect().await;
    sleep_ms(100).await;
    let (_c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "transient", false),
    )
    .await;
    assert!(!ack.session_present);
}

/// [MQTT-4.1.0-2] / [MQTT-3.1.2-23]: with Session Expiry Interval 1 s the session is kept
/// shortly after disconnect but gone after 2 s offline (Session Present 0, no subscriptions).
#[tokio::test]
async fn v5_session_expiry_discards_session_after_interval() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V5, "expiring", false);
    conn.properties.session_expiry_interval = Some(1);
    let (mut c, _) = RawClient::handshake(broker.addr(), conn.clone()).await;
    c.subscribe(1, &[("exp/t", QoS::AtLeastOnce)]).await;
    c.disconnect().await;
    sleep_ms(2000).await;
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert!(!ack.session_present, "session should have expired");
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    publ.send(&Packet::Publish(publish0("exp/t", b"x"))).await;
    c.expect_nothing(300).await;
}

/// [MQTT-3.1.2-23]: within the expiry interval the session is still there.
#[tokio::test]
async fn v5_session_kept_within_expiry_interval() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V5, "kept", false);
    conn.properties.session_expiry_interval = Some(10);
    let (mut c, _) = RawClient::handshake(broker.addr(), conn.clone()).await;
    c.subscribe(1, &[("kept/t", QoS::AtLeastOnce)]).await;
    c.disconnect().await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "kept/t",
        b"x",
        QoS::AtLeastOnce,
        false,
        Some(1),
    ))
    .await;
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert!(ack.session_present);
    assert_eq!(c.recv_publish_ack().await.payload.as_ref(), b"x");
}

/// [MQTT-3.1.2-23]: MQTT 5 DISCONNECT can set the Session Expiry Interval (from nonzero):
/// with 0 in DISCONNECT the session ends at once.
#[tokio::test]
async fn v5_disconnect_session_expiry_zero_ends_session() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V5, "ender", false);
    conn.properties.session_expiry_interval = Some(60);
    let (mut c, _) = RawClient::handshake(broker.addr(), conn.clone()).await;
    let mut d = halyard_codec::Disconnect::default();
    d.properties.session_expiry_interval = Some(0);
    c.send(&Packet::Disconnect(d)).await;
    c.expect_closed().await;
    let (_c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert!(!ack.session_present);
}

/// `max_session_expiry` caps the interval; the CONNACK tells the client the value used
/// (3.2.2.3.2 Session Expiry Interval in CONNACK).
#[tokio::test]
async fn v5_session_expiry_capped_by_config() {
    let broker = Broker::start_with_config("max_session_expiry = 5\n");
    let mut conn = connect_packet(ProtocolVersion::V5, "capped", false);
    conn.properties.session_expiry_interval = Some(3600);
    let (_c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.properties.session_expiry_interval, Some(5));
}
