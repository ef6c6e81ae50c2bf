//! Keep-alive. [MQTT-3.1.2-24] (3.1.1) = [MQTT-3.1.2-22] (5.0): close after 1.5 x keep-alive
//! of silence.

mod common;

use std::time::{Duration, Instant};

use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};

/// [MQTT-3.1.2-24] (3.1.1): a silent client with keep-alive 1 s is disconnected after 1.5 s
/// (asserted between 1.0 s and 2.2 s), and its will is published (3.1.2.5).
#[tokio::test]
async fn silent_client_closed_after_one_and_a_half_keepalive_with_will() {
    let broker = Broker::start();
    let mut w = RawClient::connect_v311(broker.addr(), "watcher", true).await;
    w.subscribe(1, &[("ka/will", QoS::AtMostOnce)]).await;
    let mut conn = connect_packet(ProtocolVersion::V3_1_1, "silent", true);
    conn.keep_alive = 1;
    conn.will = Some(will("ka/will", b"timed out", QoS::AtMostOnce, false));
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    let start = Instant::now();
    c.expect_closed_within(Duration::from_secs(4)).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1000),
        "closed too early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(2200),
        "closed too late: {took:?}"
    );
    let p = w.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"timed out");
}

/// [MQTT-3.1.2-22]: MQTT 5 keep-alive timeout; a DISCONNECT before the close, if any, has
/// reason 0x8D (Keep Alive timeout).
#[tokio::test]
async fn v5_silent_client_closed_with_keepalive_timeout() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V5, "silent5", true);
    conn.keep_alive = 1;
    let (mut c, _) = RawClient::handshake(broker.addr(), conn).await;
    let start = Instant::now();
    let reason = match c.try_recv(Duration::from_secs(4)).await {
        Err(RecvError::Closed) => None,
        Ok(Packet::Disconnect(d)) => {
            c.expect_closed().await;
            Some(d.reason)
        }
        other => panic!("expected close, got {other:?}"),
    };
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1000) && took <= Duration::from_millis(2200),
        "{took:?}"
    );
    if let Some(r) = reason {
        assert_eq!(r, ReasonCode::KEEP_ALIVE_TIMEOUT);
    }
}

/// [MQTT-3.1.2-24] (3.1.1) a contrario: any control packet resets the timer; a client that
/// sends PINGREQ every 500 ms with keep-alive 1 s stays connected for 2.5 s.
#[tokio::test]
async fn pings_keep_connection_alive() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V3_1_1, "pinger", true);
    conn.keep_alive = 1;
    let (mut c, _) = RawClient::handshake(broker.addr(), conn).await;
    for _ in 0..5 {
        sleep_ms(500).await;
        c.ping().await;
    }
}

/// Keep-alive 0 disables the mechanism: a silent client is not disconnected (checked for
/// 2 s, longer than 1.5 x 1 s).
#[tokio::test]
async fn keepalive_zero_never_times_out() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V3_1_1, "forever", true);
    conn.keep_alive = 0;
    let (mut c, _) = RawClient::handshake(broker.addr(), conn).await;
    c.expect_nothing(2000).await;
    c.ping().await;
}

/// [MQTT-3.2.2-21] / [MQTT-3.1.2-21]: with `max_keepalive = 10`, an MQTT 5 client asking 60
/// gets Server Keep Alive 10 in CONNACK.
#[tokio::test]
async fn v5_server_keep_alive_caps_requested_keepalive() {
    let broker = Broker::start_with_config("max_keepalive = 10\n");
    let mut conn = connect_packet(ProtocolVersion::V5, "ka60", true);
    conn.keep_alive = 60;
    let (_c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert_eq!(ack.properties.server_keep_alive, Some(10));
}

/// [MQTT-3.2.2-22]: a keep-alive within the maximum is used as is (no Server Keep Alive, or
/// one equal to the request).
#[tokio::test]
async fn v5_keepalive_within_max_is_kept() {
    let broker = Broker::start_with_config("max_keepalive = 10\n");
    let mut conn = connect_packet(ProtocolVersion::V5, "ka5", true);
    conn.keep_alive = 5;
    let (_c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert!(
        matches!(ack.properties.server_keep_alive, None | Some(5)),
        "{ack:?}"
    );
}

/// Config doc of `max_keepalive`: an MQTT 5 client asking for 0 (no keep-alive) is told the
/// maximum as Server Keep Alive.
#[tokio::test]
async fn v5_keepalive_zero_gets_server_keep_alive_max() {
    let broker = Broker::start_with_config("max_keepalive = 10\n");
    let mut conn = connect_packet(ProtocolVersion::V5, "ka0", true);
    conn.keep_alive = 0;
    let (_c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.properties.server_keep_alive, Some(10));
}

/// The server enforces the Server Keep Alive it announced: keep-alive 1 enforced on a client
/// that asked for 60 ([MQTT-3.2.2-21] seen from the server side).
#[tokio::test]
async fn v5_server_keep_alive_is_enforced() {
    let broker = Broker::start_with_config("max_keepalive = 1\n");
    let mut conn = connect_packet(ProtocolVersion::V5, "enforced", true);
    conn.keep_alive = 60;
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.properties.server_keep_alive, Some(1));
    let start = Instant::now();
    c.expect_closed_maybe_disconnect().await;
    assert!(
        start.elapsed() <= Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
}

/// 3.1.1 has no Server Keep Alive: a client asking more than `max_keepalive` is refused
/// with CONNACK 0x02 (identifier rejected), as Mosquitto does, then closed.
#[tokio::test]
async fn v311_keepalive_above_max_rejected_0x02() {
    let broker = Broker::start_with_config("max_keepalive = 10\n");
    let mut conn = connect_packet(ProtocolVersion::V3_1_1, "ka60", true);
    conn.keep_alive = 60;
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::V3_IDENTIFIER_REJECTED);
    c.expect_closed().await;
}

/// 3.1.1 client within the maximum is accepted.
#[tokio::test]
async fn v311_keepalive_within_max_accepted() {
    let broker = Broker::start_with_config("max_keepalive = 10\n");
    let mut conn = connect_packet(ProtocolVersion::V3_1_1, "ka10", true);
    conn.keep_alive = 10;
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    c.ping().await;
}
