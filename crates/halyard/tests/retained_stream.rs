//! Retained messages streamed from the store (durability issue): a wildcard subscriber gets
//! every retained message exactly once, read from disk a page at a time, after a restart
//! and after `kill -9`; `$SYS` stays in memory. Real binary, real redb store.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use halyard_codec::{Packet, Publish, QoS};

/// A small queue limit: retained deliveries are not bounded by it [MQTT-3.3.1-6].
const CONFIG: &str = "max_queued_messages = 8\nmax_inflight = 16\n[storage]\nfsync = \"always\"\n";

const COUNT: usize = 3000;

fn topic(i: usize) -> String {
    format!("stream/{}/{i:05}", i % 7)
}

/// Publishes COUNT retained messages at QoS 1 and waits for every PUBACK: with fsync
/// "always" they are then on disk.
async fn publish_retained(addr: std::net::SocketAddr) {
    let mut publisher = RawClient::connect_v311(addr, "stream-pub", true).await;
    for i in 0..COUNT {
        publisher
            .send(&Packet::Publish(Publish {
                retain: true,
                qos: QoS::AtLeastOnce,
                packet_id: u16::try_from(i + 1).ok(),
                topic: topic(i),
                payload: Bytes::from(format!("v{i}")),
                ..Publish::default()
            }))
            .await;
    }
    for _ in 0..COUNT {
        assert!(matches!(publisher.recv().await, Packet::PubAck(_)));
    }
}

/// Receives retained PUBLISHes on `filter` at `qos` until COUNT distinct topics arrived,
/// acknowledging QoS 1; fails on a repeat or a PUBLISH without RETAIN=1.
async fn stream_all(addr: std::net::SocketAddr, id: &str, filter: &str, qos: QoS) {
    let mut client = RawClient::connect_v311(addr, id, true).await;
    client.subscribe(1, &[(filter, qos)]).await;
    let mut seen = BTreeSet::new();
    while seen.len() < COUNT {
        let publish = client.recv_publish().await;
        // [MQTT-3.3.1-8]: retained-on-subscribe carries RETAIN=1.
        assert!(publish.retain, "{}", publish.topic);
        assert_eq!(publish.qos, qos);
        client.ack(&publish).await;
        assert!(
            seen.insert(publish.topic.clone()),
            "{} twice",
            publish.topic
        );
    }
    client.expect_nothing(300).await;
    let expected: BTreeSet<String> = (0..COUNT).map(topic).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn wildcard_subscribers_stream_every_retained_message_once_after_kill_9() {
    let data_dir = unique_temp_path("retained-stream", "d");
    let mut broker = Broker::start_durable(&data_dir, CONFIG);
    publish_retained(broker.addr()).await;
    // [MQTT-3.3.1-5]: retained messages outlive the broker; they stay on disk.
    broker.kill9();
    let broker = Broker::start_durable(&data_dir, CONFIG);
    let addr = broker.addr();
    let qos0 = tokio::spawn(async move { stream_all(addr, "s0", "#", QoS::AtMostOnce).await });
    let qos1 =
        tokio::spawn(async move { stream_all(addr, "s1", "stream/#", QoS::AtLeastOnce).await });
    tokio::time::timeout(Duration::from_secs(60), async {
        qos0.await.expect("QoS 0 subscriber");
        qos1.await.expect("QoS 1 subscriber");
    })
    .await
    .expect("streams finished in time");

    // `$SYS` is retained in memory, and counts the retained messages on disk without
    // loading them. [MQTT-4.7.2-1]: the `#` streams above never got `$SYS` topics.
    let mut sys = RawClient::connect_v311(broker.addr(), "sys", true).await;
    sys.subscribe(1, &[("$SYS/#", QoS::AtMostOnce)]).await;
    let count = sys
        .recv_where(
            "retained count",
            |p| matches!(p, Packet::Publish(p) if p.topic == "$SYS/broker/retained messages/count"),
        )
        .await;
    let Packet::Publish(count) = count else {
        unreachable!("matched a PUBLISH")
    };
    assert!(count.retain);
    assert_eq!(count.payload, Bytes::from(COUNT.to_string()));
}

#[tokio::test]
async fn clearing_and_filters_work_on_the_stored_retained_messages() {
    let data_dir = unique_temp_path("retained-filters", "d");
    let broker = Broker::start_durable(&data_dir, CONFIG);
    publish_retained(broker.addr()).await;
    let mut publisher = RawClient::connect_v311(broker.addr(), "clearer", true).await;
    // [MQTT-3.3.1-10]: an empty retained payload clears the topic.
    publisher
        .send(&Packet::Publish(Publish {
            retain: true,
            qos: QoS::AtLeastOnce,
            packet_id: Some(1),
            topic: topic(14),
            ..Publish::default()
        }))
        .await;
    assert!(matches!(publisher.recv().await, Packet::PubAck(_)));

    let mut client = RawClient::connect_v311(broker.addr(), "filters", true).await;
    // `+` in the middle: every topic `stream/0/...` (i % 7 == 0), without the cleared one.
    client
        .subscribe(1, &[("stream/0/+", QoS::AtMostOnce)])
        .await;
    let expected: BTreeSet<String> = (0..COUNT)
        .filter(|i| i % 7 == 0 && *i != 14)
        .map(topic)
        .collect();
    let mut seen = BTreeSet::new();
    while seen.len() < expected.len() {
        let publish = client.recv_publish().await;
        assert!(seen.insert(publish.topic), "a topic twice");
    }
    assert_eq!(seen, expected);
    // An exact topic.
    client.subscribe(2, &[(&topic(21), QoS::AtMostOnce)]).await;
    let publish = client.recv_publish().await;
    assert_eq!(
        (publish.topic.as_str(), publish.retain),
        (topic(21).as_str(), true)
    );
    client.expect_nothing(300).await;
}
