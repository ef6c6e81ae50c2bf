//! Will messages. [MQTT-3.1.2-8] is worded the same way in 3.1.1 and 5.0.

mod common;

use std::time::{Duration, Instant};

use common::*;
use halyard_codec::{Disconnect, Packet, ProtocolVersion, QoS, ReasonCode};

/// A subscriber on `will/#` at QoS 2.
async fn watcher(broker: &Broker) -> RawClient {
    let mut w = RawClient::connect_v311(broker.addr(), "watcher", true).await;
    w.subscribe(1, &[("will/#", QoS::ExactlyOnce)]).await;
    w
}

async fn connect_with_will(broker: &Broker, version: ProtocolVersion, id: &str) -> RawClient {
    let mut conn = connect_packet(version, id, true);
    conn.will = Some(will("will/t", b"gone", QoS::AtMostOnce, false));
    let (c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    c
}

/// [MQTT-3.1.2-8]: the will is published when the network connection closes without a
/// DISCONNECT.
#[tokio::test]
async fn will_published_on_socket_close_without_disconnect() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let c = connect_with_will(&broker, ProtocolVersion::V3_1_1, "dying").await;
    c.drop_abruptly().await;
    let p = w.recv_publish().await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_ref()),
        ("will/t", &b"gone"[..])
    );
}

/// [MQTT-3.1.2-10] / [MQTT-3.14.4-3]: after a normal DISCONNECT the will is discarded.
#[tokio::test]
async fn no_will_after_normal_disconnect() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let c = connect_with_will(&broker, ProtocolVersion::V3_1_1, "polite").await;
    c.disconnect().await;
    w.expect_nothing(700).await;
}

/// [MQTT-3.1.2-10] for MQTT 5: DISCONNECT 0x00 discards the will.
#[tokio::test]
async fn v5_no_will_after_disconnect_0x00() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let c = connect_with_will(&broker, ProtocolVersion::V5, "polite5").await;
    c.disconnect().await;
    w.expect_nothing(700).await;
}

/// MQTT 5 DISCONNECT with reason 0x04 (Disconnect with Will Message) publishes the will
/// (3.14.2.1; [MQTT-3.1.2-8]).
#[tokio::test]
async fn v5_disconnect_0x04_publishes_will() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let mut c = connect_with_will(&broker, ProtocolVersion::V5, "willing").await;
    c.send(&Packet::Disconnect(Disconnect {
        reason: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
        properties: Default::default(),
    }))
    .await;
    let p = w.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"gone");
}

/// 3.1.2.5 (3.1.1) / 3.1.2-8: a protocol error (malformed packet: PUBLISH with QoS 3)
/// closes the connection and publishes the will.
#[tokio::test]
async fn will_published_on_protocol_error() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let mut c = connect_with_will(&broker, ProtocolVersion::V3_1_1, "broken").await;
    let mut body = raw_str(b"x");
    body.extend_from_slice(&[0x00, 0x01, b'p']);
    c.send_bytes(&raw_packet(0x36, &body)).await; // QoS bits = 3
    c.expect_closed().await;
    let p = w.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"gone");
}

/// [MQTT-3.1.2-14]: will retain 0 -> published as a non-retained message (a later subscriber
/// gets nothing); will QoS honoured as min(will QoS, subscription QoS).
#[tokio::test]
async fn will_qos_honoured_and_not_retained() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let mut conn = connect_packet(ProtocolVersion::V3_1_1, "q1will", true);
    conn.will = Some(will("will/q", b"q1", QoS::AtLeastOnce, false));
    let (c, _) = RawClient::handshake(broker.addr(), conn).await;
    c.drop_abruptly().await;
    let p = w.recv_publish_ack().await;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert!(!p.retain);
    let mut late = RawClient::connect_v311(broker.addr(), "late", true).await;
    late.subscribe(1, &[("will/q", QoS::AtLeastOnce)]).await;
    late.expect_nothing(300).await;
}

/// [MQTT-3.1.2-15]: will retain 1 -> published as a retained message.
#[tokio::test]
async fn will_retain_honoured() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V3_1_1, "rwill", true);
    conn.will = Some(will("will/r", b"retained-will", QoS::ExactlyOnce, true));
    let (c, _) = RawClient::handshake(broker.addr(), conn).await;
    c.drop_abruptly().await;
    sleep_ms(300).await;
    let mut late = RawClient::connect_v311(broker.addr(), "late", true).await;
    late.subscribe(1, &[("will/r", QoS::ExactlyOnce)]).await;
    let p = late.recv_publish_ack().await;
    assert!(p.retain);
    assert_eq!(p.qos, QoS::ExactlyOnce);
    assert_eq!(p.payload.as_ref(), b"retained-will");
}

fn delayed_will_connect(id: &str, delay: u32) -> halyard_codec::Connect {
    let mut conn = connect_packet(ProtocolVersion::V5, id, false);
    // The session must outlive the delay, otherwise the will goes when the session ends.
    conn.properties.session_expiry_interval = Some(30);
    let mut w = will("will/d", b"delayed", QoS::AtMostOnce, false);
    w.properties.will_delay_interval = Some(delay);
    conn.will = Some(w);
    conn
}

/// [MQTT-3.1.2-8] with Will Delay Interval 1 s: not sent before the delay, sent after it.
#[tokio::test]
async fn v5_will_delay_interval_delays_will() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let (c, ack) = RawClient::handshake(broker.addr(), delayed_will_connect("delayed", 1)).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    let closed_at = Instant::now();
    c.drop_abruptly().await;
    w.expect_nothing(600).await;
    let p = w.recv_publish().await;
    let after = closed_at.elapsed();
    assert_eq!(p.payload.as_ref(), b"delayed");
    assert!(after >= Duration::from_millis(900), "sent after {after:?}");
    assert!(after <= Duration::from_millis(3000), "sent after {after:?}");
}

/// [MQTT-3.1.3-9]: if the client reconnects before the Will Delay Interval passes, the will
/// is not sent.
#[tokio::test]
async fn v5_will_not_sent_if_client_reconnects_within_delay() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let (c, _) = RawClient::handshake(broker.addr(), delayed_will_connect("back", 1)).await;
    c.drop_abruptly().await;
    sleep_ms(300).await;
    let mut again = connect_packet(ProtocolVersion::V5, "back", false);
    again.properties.session_expiry_interval = Some(30);
    let (mut c2, ack) = RawClient::handshake(broker.addr(), again).await;
    assert!(ack.session_present);
    w.expect_nothing(1500).await;
    c2.ping().await;
}

/// [MQTT-3.1.2-8]: the will is sent when the session ends, even before the Will Delay
/// Interval (session expiry 1 s < will delay 30 s).
#[tokio::test]
async fn v5_will_sent_at_session_end_before_delay() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let mut conn = delayed_will_connect("shortsession", 30);
    conn.properties.session_expiry_interval = Some(1);
    let (c, _) = RawClient::handshake(broker.addr(), conn).await;
    c.drop_abruptly().await;
    let p = w.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"delayed");
}

/// [MQTT-3.1.3-10] / [MQTT-3.3.2-17]: MQTT 5 will properties (user properties in order,
/// content type) are forwarded with the will message.
#[tokio::test]
async fn v5_will_properties_forwarded() {
    let broker = Broker::start();
    let mut w = RawClient::connect_v5(broker.addr(), "watcher5", true).await;
    w.subscribe(1, &[("will/#", QoS::AtMostOnce)]).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "props", true);
    let mut wl = will("will/p", b"{}", QoS::AtMostOnce, false);
    wl.properties.content_type = Some("application/json".into());
    wl.properties.user_properties = vec![("b".into(), "2".into()), ("a".into(), "1".into())];
    conn.will = Some(wl);
    let (c, _) = RawClient::handshake(broker.addr(), conn).await;
    c.drop_abruptly().await;
    let p = w.recv_publish().await;
    assert_eq!(
        p.properties.content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(
        p.properties.user_properties,
        vec![
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "1".to_string())
        ]
    );
}

/// [MQTT-3.1.4-3] with wills: when a session is taken over by a connection with clean start
/// 1, the old connection's will is published (the old session ends).
#[tokio::test]
async fn v5_will_published_on_takeover_with_clean_start() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let _old = connect_with_will(&broker, ProtocolVersion::V5, "twin").await;
    let _new = RawClient::connect_v5(broker.addr(), "twin", true).await;
    let p = w.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"gone");
}
