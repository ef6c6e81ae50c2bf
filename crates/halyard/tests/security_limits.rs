//! Admission limits and abuse resistance, end to end: connection caps (CONNACK 0x97 /
//! 0x03), connection rate per IP (0x9F), publish rate (DISCONNECT 0x96), and a slowloris
//! trickle and a connect flood that must not stop a well-behaved client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

#[tokio::test]
async fn max_connections_refuses_with_quota_exceeded_and_frees_slots() {
    let broker = Broker::start_with_config("max_connections = 2\n");
    let a = RawClient::connect_v5(broker.addr(), "a", true).await;
    let _b = RawClient::connect_v311(broker.addr(), "b", true).await;
    let (mut c, ack) = RawClient::handshake(broker.addr(), connect_packet(V5, "c", true)).await;
    assert_eq!(ack.code, ReasonCode::QUOTA_EXCEEDED);
    c.expect_closed().await;
    let (mut d, ack) = RawClient::handshake(broker.addr(), connect_packet(V3, "d", true)).await;
    assert_eq!(ack.code, ReasonCode::V3_SERVER_UNAVAILABLE);
    d.expect_closed().await;
    a.disconnect().await;
    // The slot is released when the connection task ends.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (client, ack) =
            RawClient::handshake(broker.addr(), connect_packet(V5, "e", true)).await;
        if ack.code == ReasonCode::SUCCESS {
            client.disconnect().await;
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        sleep_ms(50).await;
    }
}

#[tokio::test]
async fn connection_rate_per_ip_refuses_with_0x9f() {
    let broker = Broker::start_with_config("max_connection_rate_per_ip = 3\n");
    let mut codes = Vec::new();
    let mut clients = Vec::new();
    for i in 0..6 {
        let (client, ack) =
            RawClient::handshake(broker.addr(), connect_packet(V5, &format!("r{i}"), true)).await;
        codes.push(ack.code);
        clients.push(client);
    }
    let refused = codes
        .iter()
        .filter(|code| **code == ReasonCode::CONNECTION_RATE_EXCEEDED)
        .count();
    assert!(refused >= 2, "{codes:?}");
    assert_eq!(codes[0], ReasonCode::SUCCESS);
    // A second later the address may connect again.
    sleep_ms(1100).await;
    let client = RawClient::connect_v5(broker.addr(), "later", true).await;
    client.disconnect().await;
}

#[tokio::test]
async fn publish_rate_limit_disconnects_with_0x96() {
    let broker = Broker::start_with_config("max_publish_rate = 20\n");
    let mut client = RawClient::connect_v5(broker.addr(), "fast", true).await;
    for _ in 0..200 {
        client.send(&Packet::Publish(publish0("flood", b"x"))).await;
    }
    client
        .expect_disconnect(ReasonCode::MESSAGE_RATE_TOO_HIGH)
        .await;
    // Others are not affected.
    let mut calm = RawClient::connect_v5(broker.addr(), "calm", true).await;
    calm.ping().await;
}

#[tokio::test]
async fn subscription_quota_is_enforced_end_to_end() {
    let broker = Broker::start_with_config("max_subscriptions_per_client = 1\n");
    let mut client = RawClient::connect_v5(broker.addr(), "subs", true).await;
    let codes = client
        .subscribe(1, &[("a", QoS::AtMostOnce), ("b", QoS::AtMostOnce)])
        .await;
    assert_eq!(
        codes,
        [ReasonCode::GRANTED_QOS_0, ReasonCode::QUOTA_EXCEEDED]
    );
}

/// Subscribes, publishes and checks the round trip finishes quickly.
async fn well_behaved_round_trip(broker: &Broker, id: &str) -> Duration {
    let started = Instant::now();
    let mut sub = RawClient::connect_v5(broker.addr(), &format!("{id}-sub"), true).await;
    sub.subscribe(1, &[("ok/#", QoS::AtLeastOnce)]).await;
    let mut publisher = RawClient::connect_v311(broker.addr(), &format!("{id}-pub"), true).await;
    publisher.publish(publish0("ok/1", b"fine")).await;
    let publish = sub.recv_publish().await;
    assert_eq!(publish.topic, "ok/1");
    started.elapsed()
}

#[tokio::test]
async fn slowloris_trickle_is_cut_at_the_connect_timeout_and_others_are_served() {
    let broker = Broker::start_with_config("connect_timeout_ms = 700\n");
    let connect = encode_packet(
        &Packet::Connect(Box::new(connect_packet(V3, "slow", true))),
        V3,
    );
    let mut trickles = Vec::new();
    for _ in 0..50 {
        let stream = TcpStream::connect(broker.addr()).await.expect("connect");
        let bytes = connect.to_vec();
        trickles.push(tokio::spawn(async move {
            // One byte every 100 ms: the CONNECT would take seconds to arrive.
            let started = Instant::now();
            let mut stream = stream;
            for byte in bytes {
                if stream.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            started.elapsed()
        }));
    }
    sleep_ms(100).await;
    let elapsed = well_behaved_round_trip(&broker, "during-slowloris").await;
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    for trickle in trickles {
        let lasted = trickle.await.expect("trickle task");
        // Cut off at the 0.7 s connect timeout (a write fails a little after the close).
        assert!(lasted < Duration::from_millis(2500), "lasted {lasted:?}");
    }
}

#[tokio::test]
async fn connect_flood_does_not_stop_a_well_behaved_client() {
    let broker = Broker::start_with_config("connect_timeout_ms = 3000\n");
    let mut flood = Vec::with_capacity(1000);
    let started = Instant::now();
    for _ in 0..1000 {
        match TcpStream::connect(broker.addr()).await {
            Ok(stream) => flood.push(stream),
            Err(_) => break,
        }
    }
    assert!(flood.len() >= 900, "only {} sockets opened", flood.len());
    let elapsed = well_behaved_round_trip(&broker, "during-flood").await;
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    drop(flood);
}
