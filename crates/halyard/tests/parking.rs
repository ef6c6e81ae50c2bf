//! Parking of idle connections (`park_idle_after_ms`): a parked connection has no task and is
//! out of tokio's reactor, yet must behave exactly like an awake one. Each test parks its
//! clients (waiting for `halyard_connections_parked` on `/metrics`), then checks one way a
//! parked connection is woken: input from its peer, output from the broker (written directly,
//! or queued when the socket is full), keep-alive, the peer leaving, and shutdown.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use halyard_codec::{ProtocolVersion, QoS, ReasonCode};

/// Parks after 100 ms without input, so tests wait little.
const CONFIG: &str = "park_idle_after_ms = 100\n";

/// The current `halyard_connections_parked` gauge.
fn parked(http: SocketAddr) -> u64 {
    let mut stream = TcpStream::connect(http).expect("connect http");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
        .lines()
        .find_map(|line| line.strip_prefix("halyard_connections_parked "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no parked gauge in:\n{response}"))
}

/// Waits until exactly `n` connections are parked.
async fn until_parked(broker: &Broker, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = parked(broker.http_addr());
        if now == n {
            return;
        }
        assert!(Instant::now() < deadline, "{now} parked, expected {n}");
        sleep_ms(20).await;
    }
}

/// Parked publisher and subscriber: the publisher's PUBLISH wakes it, the delivery to the
/// parked subscriber is written to its socket while it stays parked, and its PUBACK wakes
/// it; both park again and do it again, at every QoS [MQTT-4.3.2-1] [MQTT-4.3.3-1].
#[tokio::test]
async fn parked_clients_publish_and_receive_at_every_qos() {
    let broker = Broker::start_with_config(CONFIG);
    let mut sub = RawClient::connect_v5(broker.addr(), "park-sub", true).await;
    sub.subscribe(1, &[("park/#", QoS::ExactlyOnce)]).await;
    let mut publisher = RawClient::connect_v311(broker.addr(), "park-pub", true).await;
    for (round, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        until_parked(&broker, 2).await;
        let payload = format!("round {round}");
        let id = (qos != QoS::AtMostOnce).then_some(10 + round as u16);
        let publish = publish_packet("park/t", payload.as_bytes(), qos, false, id);
        assert_eq!(publisher.publish(publish).await, ReasonCode::SUCCESS);
        let got = sub.recv_publish_ack().await;
        assert_eq!(got.payload.as_ref(), payload.as_bytes());
        assert_eq!(got.qos, qos);
    }
    // Both still answer after all this waking and parking.
    until_parked(&broker, 2).await;
    sub.ping().await;
    publisher.ping().await;
}

/// More than the socket takes at once for a parked subscriber that does not read: the rest
/// is queued and wakes the connection, whose writer delivers all of it, in order
/// [MQTT-4.6.0-6], once the subscriber reads, although the connection is asked to park again
/// while its writer waits.
#[tokio::test]
async fn output_beyond_the_socket_wakes_a_parked_subscriber() {
    let broker = Broker::start_with_config(CONFIG);
    let mut sub = RawClient::connect_v311(broker.addr(), "park-big-sub", true).await;
    sub.subscribe(1, &[("big/#", QoS::AtLeastOnce)]).await;
    let mut publisher = RawClient::connect_v311(broker.addr(), "park-big-pub", true).await;
    until_parked(&broker, 2).await;
    // 24 x 256 KiB = 6 MiB, more than a loopback socket buffers; within the in-flight window.
    let messages = 24u16;
    for n in 0..messages {
        let payload = vec![n as u8; 256 * 1024];
        let publish = publish_packet("big/t", &payload, QoS::AtLeastOnce, false, Some(n + 1));
        assert_eq!(publisher.publish(publish).await, ReasonCode::SUCCESS);
    }
    // The subscriber's writer is now blocked on a full socket while the sweep asks the idle
    // reader to park, period after period: parking must wait for the writer, or the bytes it
    // holds are lost and the stream is cut mid-packet.
    sleep_ms(500).await;
    for n in 0..messages {
        let got = sub.recv_publish_ack().await;
        assert_eq!(got.payload.len(), 256 * 1024);
        assert!(
            got.payload.iter().all(|b| *b == n as u8),
            "message {n} out of order"
        );
    }
    sub.ping().await;
}

/// Keep-alive holds while parked [MQTT-3.1.2-24]: a silent parked client is closed after
/// 1.5 x its keep-alive, and its will is published [MQTT-3.1.2-8].
#[tokio::test]
async fn keep_alive_closes_a_parked_client_and_publishes_its_will() {
    let broker = Broker::start_with_config(CONFIG);
    let mut watcher = RawClient::connect_v311(broker.addr(), "park-watcher", true).await;
    watcher
        .subscribe(1, &[("park/will", QoS::AtMostOnce)])
        .await;
    let mut connect = connect_packet(ProtocolVersion::V3_1_1, "park-silent", true);
    connect.keep_alive = 1;
    connect.will = Some(will("park/will", b"gone", QoS::AtMostOnce, false));
    let (mut silent, ack) = RawClient::handshake(broker.addr(), connect).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    let start = Instant::now();
    until_parked(&broker, 2).await;
    silent.expect_closed_within(Duration::from_secs(4)).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1000) && took <= Duration::from_millis(2200),
        "closed after {took:?}"
    );
    assert_eq!(watcher.recv_publish().await.payload.as_ref(), b"gone");
}

/// A parked client that goes away without DISCONNECT is noticed at once (its socket becomes
/// readable with EOF) and its will is published [MQTT-3.1.2-8].
#[tokio::test]
async fn a_parked_client_that_vanishes_is_lost_and_its_will_published() {
    let broker = Broker::start_with_config(CONFIG);
    let mut watcher = RawClient::connect_v311(broker.addr(), "park-watcher2", true).await;
    watcher
        .subscribe(1, &[("park/will2", QoS::AtMostOnce)])
        .await;
    let mut connect = connect_packet(ProtocolVersion::V5, "park-vanish", true);
    connect.will = Some(will("park/will2", b"vanished", QoS::AtMostOnce, false));
    let (client, _) = RawClient::handshake(broker.addr(), connect).await;
    until_parked(&broker, 2).await;
    client.drop_abruptly().await;
    assert_eq!(watcher.recv_publish().await.payload.as_ref(), b"vanished");
    until_parked(&broker, 1).await;
}

/// SIGTERM with parked connections: each is woken and closed, and the broker exits cleanly
/// and promptly.
#[tokio::test]
async fn shutdown_closes_parked_connections() {
    let mut broker = Broker::start_with_config(CONFIG);
    let mut a = RawClient::connect_v311(broker.addr(), "park-a", true).await;
    let mut b = RawClient::connect_v5(broker.addr(), "park-b", true).await;
    until_parked(&broker, 2).await;
    broker.sigterm();
    a.expect_closed_within(Duration::from_secs(5)).await;
    let reason = b.expect_closed_maybe_disconnect().await;
    assert!(
        reason.is_none() || reason == Some(ReasonCode::SERVER_SHUTTING_DOWN),
        "{reason:?}"
    );
    let status = broker
        .wait_exit(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// With `park_idle_after_ms = 0` nothing parks.
#[tokio::test]
async fn parking_can_be_turned_off() {
    let broker = Broker::start_with_config("park_idle_after_ms = 0\n");
    let mut client = RawClient::connect_v311(broker.addr(), "never-parks", true).await;
    sleep_ms(400).await;
    assert_eq!(parked(broker.http_addr()), 0);
    client.ping().await;
}

/// Session takeover of a parked client [MQTT-3.1.4-3]: the new connection's CONNECT wakes
/// the parked one to send it DISCONNECT 0x8E (Session taken over) and close it.
#[tokio::test]
async fn a_parked_client_is_taken_over() {
    let broker = Broker::start_with_config(CONFIG);
    let mut first = RawClient::connect_v5(broker.addr(), "park-twin", false).await;
    until_parked(&broker, 1).await;
    let mut second = RawClient::connect_v5(broker.addr(), "park-twin", false).await;
    first
        .expect_disconnect(ReasonCode::SESSION_TAKEN_OVER)
        .await;
    second.ping().await;
}
