//! Retained messages. Ids marked "(3.1.1)" are OASIS MQTT 3.1.1 numbering; the retain
//! handling / retain-as-published ids are MQTT 5.0.

mod common;

use common::*;
use halyard_codec::{Packet, QoS, SubscriptionOptions};

async fn publish_retained(broker: &Broker, topic: &str, payload: &[u8]) {
    let mut p = RawClient::connect_v311(broker.addr(), "retainer", true).await;
    p.publish(publish_packet(
        topic,
        payload,
        QoS::AtLeastOnce,
        true,
        Some(1),
    ))
    .await;
    p.disconnect().await;
}

/// [MQTT-3.3.1-6] / [MQTT-3.3.1-8] (3.1.1): a new subscription gets the retained message with
/// RETAIN=1.
#[tokio::test]
async fn retained_delivered_on_subscribe_with_retain_flag() {
    let broker = Broker::start();
    publish_retained(&broker, "r/a", b"kept").await;
    let mut c = RawClient::connect_v311(broker.addr(), "late", true).await;
    c.subscribe(1, &[("r/a", QoS::AtLeastOnce)]).await;
    let p = c.recv_publish_ack().await;
    assert_eq!(p.topic, "r/a");
    assert_eq!(p.payload.as_ref(), b"kept");
    assert!(p.retain);
}

/// [MQTT-3.3.1-6] (3.1.1): retained messages are delivered to wildcard subscriptions too,
/// one per matching topic.
#[tokio::test]
async fn retained_delivered_via_wildcards() {
    let broker = Broker::start();
    publish_retained(&broker, "w/1/x", b"one").await;
    publish_retained(&broker, "w/2/x", b"two").await;
    publish_retained(&broker, "w/2/y", b"not").await;
    let mut c = RawClient::connect_v311(broker.addr(), "wild", true).await;
    c.subscribe(1, &[("w/+/x", QoS::AtMostOnce)]).await;
    let mut got = [c.recv_publish().await, c.recv_publish().await];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got[0].topic, "w/1/x");
    assert_eq!(got[1].topic, "w/2/x");
    assert!(got.iter().all(|p| p.retain));
    c.expect_nothing(300).await;
    let mut all = RawClient::connect_v311(broker.addr(), "all", true).await;
    all.subscribe(1, &[("#", QoS::AtMostOnce)]).await;
    let mut n = 0;
    while let Ok(Packet::Publish(p)) = all.try_recv(std::time::Duration::from_millis(500)).await {
        assert!(p.retain);
        n += 1;
    }
    assert_eq!(n, 3, "`#` gets every retained message");
}

/// [MQTT-3.3.1-9] (3.1.1): a message forwarded to an existing subscription has RETAIN=0,
/// even if it was published with RETAIN=1.
#[tokio::test]
async fn live_retained_publish_forwarded_with_retain_0_v311() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "early", true).await;
    c.subscribe(1, &[("r/live", QoS::AtMostOnce)]).await;
    publish_retained(&broker, "r/live", b"now").await;
    let p = c.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"now");
    assert!(!p.retain, "[MQTT-3.3.1-9] (3.1.1)");
}

/// [MQTT-3.3.1-10] / [MQTT-3.3.1-11] (3.1.1): a retained PUBLISH with an empty payload is
/// forwarded normally and clears the retained message; later subscribers get nothing.
#[tokio::test]
async fn empty_retained_payload_clears_retained() {
    let broker = Broker::start();
    publish_retained(&broker, "r/clear", b"old").await;
    publish_retained(&broker, "r/clear", b"").await;
    let mut c = RawClient::connect_v311(broker.addr(), "late", true).await;
    c.subscribe(1, &[("r/clear", QoS::AtMostOnce)]).await;
    c.expect_nothing(400).await;
}

/// [MQTT-3.3.1-10] (3.1.1): the zero-byte retained PUBLISH itself is still delivered to
/// current subscribers.
#[tokio::test]
async fn empty_retained_payload_forwarded_to_current_subscribers() {
    let broker = Broker::start();
    let mut live = RawClient::connect_v311(broker.addr(), "live", true).await;
    live.subscribe(1, &[("r/clear", QoS::AtMostOnce)]).await;
    publish_retained(&broker, "r/clear", b"").await;
    let p = live.recv_publish().await;
    assert_eq!(p.topic, "r/clear");
    assert!(p.payload.is_empty());
}

/// [MQTT-3.3.1-5] / [MQTT-3.3.1-7] (3.1.1): a new retained message replaces the previous
/// one for that topic.
#[tokio::test]
async fn new_retained_replaces_old() {
    let broker = Broker::start();
    publish_retained(&broker, "r/rep", b"first").await;
    publish_retained(&broker, "r/rep", b"second").await;
    let mut c = RawClient::connect_v311(broker.addr(), "late", true).await;
    c.subscribe(1, &[("r/rep", QoS::AtMostOnce)]).await;
    assert_eq!(c.recv_publish().await.payload.as_ref(), b"second");
    c.expect_nothing(300).await;
}

/// [MQTT-3.3.1-12] (3.1.1) / [MQTT-3.3.1-8] (5.0): a RETAIN=0 publish neither stores nor
/// replaces nor removes the retained message.
#[tokio::test]
async fn non_retained_publish_does_not_replace_retained() {
    let broker = Broker::start();
    publish_retained(&broker, "r/keep", b"retained").await;
    let mut p = RawClient::connect_v311(broker.addr(), "pub", true).await;
    p.publish(publish_packet(
        "r/keep",
        b"plain",
        QoS::AtLeastOnce,
        false,
        Some(2),
    ))
    .await;
    p.publish(publish_packet(
        "r/none",
        b"plain",
        QoS::AtLeastOnce,
        false,
        Some(3),
    ))
    .await;
    p.publish(publish_packet(
        "r/keep",
        b"",
        QoS::AtLeastOnce,
        false,
        Some(4),
    ))
    .await;
    let mut c = RawClient::connect_v311(broker.addr(), "late", true).await;
    c.subscribe(1, &[("r/#", QoS::AtMostOnce)]).await;
    let got = c.recv_publish().await;
    assert_eq!(
        (got.topic.as_str(), got.payload.as_ref()),
        ("r/keep", &b"retained"[..])
    );
    c.expect_nothing(300).await;
}

/// [MQTT-3.8.4-8]: a retained message is delivered at min(its QoS, granted QoS).
#[tokio::test]
async fn retained_delivered_at_min_qos() {
    let broker = Broker::start();
    let mut p = RawClient::connect_v311(broker.addr(), "pub", true).await;
    p.publish(publish_packet(
        "r/q",
        b"q2",
        QoS::ExactlyOnce,
        true,
        Some(1),
    ))
    .await;
    let mut c = RawClient::connect_v311(broker.addr(), "late", true).await;
    c.subscribe(1, &[("r/q", QoS::AtLeastOnce)]).await;
    let got = c.recv_publish_ack().await;
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert!(got.retain);
}

fn v5_opts(qos: QoS, retain_handling: u8, retain_as_published: bool) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        no_local: false,
        retain_as_published,
        retain_handling,
    }
}

/// [MQTT-3.3.1-9] / [MQTT-3.8.4-4] (5.0): Retain Handling 0 sends the retained messages on
/// every SUBSCRIBE, also when the subscription already exists.
#[tokio::test]
async fn v5_retain_handling_0_sends_on_every_subscribe() {
    let broker = Broker::start();
    publish_retained(&broker, "rh/0", b"r").await;
    let mut c = RawClient::connect_v5(broker.addr(), "rh0", true).await;
    c.subscribe_with(subscribe_opts(
        1,
        "rh/0",
        v5_opts(QoS::AtMostOnce, 0, false),
    ))
    .await;
    assert!(c.recv_publish().await.retain);
    c.subscribe_with(subscribe_opts(
        2,
        "rh/0",
        v5_opts(QoS::AtMostOnce, 0, false),
    ))
    .await;
    assert!(
        c.recv_publish().await.retain,
        "re-sent on the repeated SUBSCRIBE"
    );
}

/// [MQTT-3.3.1-10] (5.0): Retain Handling 1 sends retained messages only if the subscription
/// did not exist.
#[tokio::test]
async fn v5_retain_handling_1_only_for_new_subscription() {
    let broker = Broker::start();
    publish_retained(&broker, "rh/1", b"r").await;
    let mut c = RawClient::connect_v5(broker.addr(), "rh1", true).await;
    c.subscribe_with(subscribe_opts(
        1,
        "rh/1",
        v5_opts(QoS::AtMostOnce, 1, false),
    ))
    .await;
    assert!(c.recv_publish().await.retain);
    c.subscribe_with(subscribe_opts(
        2,
        "rh/1",
        v5_opts(QoS::AtMostOnce, 1, false),
    ))
    .await;
    c.expect_nothing(400).await;
}

/// [MQTT-3.3.1-11] (5.0): Retain Handling 2 never sends retained messages on subscribe.
#[tokio::test]
async fn v5_retain_handling_2_never_sends() {
    let broker = Broker::start();
    publish_retained(&broker, "rh/2", b"r").await;
    let mut c = RawClient::connect_v5(broker.addr(), "rh2", true).await;
    c.subscribe_with(subscribe_opts(
        1,
        "rh/2",
        v5_opts(QoS::AtMostOnce, 2, false),
    ))
    .await;
    c.expect_nothing(400).await;
    // The subscription itself works.
    let mut p = RawClient::connect_v5(broker.addr(), "pub", true).await;
    p.send(&Packet::Publish(publish0("rh/2", b"live"))).await;
    assert_eq!(c.recv_publish().await.payload.as_ref(), b"live");
}

/// [MQTT-3.3.1-13] (5.0): Retain As Published 1 keeps RETAIN=1 on a forwarded live message.
#[tokio::test]
async fn v5_retain_as_published_1_keeps_flag() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "rap1", true).await;
    c.subscribe_with(subscribe_opts(
        1,
        "rap/t",
        v5_opts(QoS::AtMostOnce, 0, true),
    ))
    .await;
    publish_retained(&broker, "rap/t", b"x").await;
    assert!(c.recv_publish().await.retain);
}

/// [MQTT-3.3.1-12] (5.0): Retain As Published 0 clears RETAIN on a forwarded live message.
#[tokio::test]
async fn v5_retain_as_published_0_clears_flag() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "rap0", true).await;
    c.subscribe_with(subscribe_opts(
        1,
        "rap/t",
        v5_opts(QoS::AtMostOnce, 0, false),
    ))
    .await;
    publish_retained(&broker, "rap/t", b"x").await;
    assert!(!c.recv_publish().await.retain);
}

/// [MQTT-3.2.2-14] context: with `retain_available = false` an MQTT 5 CONNACK says Retain
/// Available 0, and a retained PUBLISH is not stored (DISCONNECT 0x9A per 3.3.1.3, or at
/// least not retained for later subscribers).
#[tokio::test]
async fn v5_retain_not_available_when_disabled() {
    let broker = Broker::start_with_config("retain_available = false\n");
    let (mut c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(halyard_codec::ProtocolVersion::V5, "nr", true),
    )
    .await;
    assert_eq!(ack.properties.retain_available, Some(0));
    c.send(&Packet::Publish(publish_packet(
        "nr/t",
        b"x",
        QoS::AtMostOnce,
        true,
        None,
    )))
    .await;
    if let Some(reason) = c.expect_closed_maybe_disconnect().await {
        assert_eq!(reason, halyard_codec::ReasonCode::RETAIN_NOT_SUPPORTED);
    }
    let mut late = RawClient::connect_v5(broker.addr(), "late", true).await;
    late.subscribe(1, &[("nr/t", QoS::AtMostOnce)]).await;
    late.expect_nothing(300).await;
}
