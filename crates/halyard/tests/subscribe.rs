//! Topic matching, SUBSCRIBE / SUBACK, UNSUBSCRIBE / UNSUBACK, overlapping subscriptions.

mod common;

use std::collections::BTreeSet;

use common::*;
use halyard_codec::{Packet, QoS, ReasonCode, Subscribe};

/// Subscribes one client to `filter`, publishes every topic of `no` then every topic of `yes`
/// (payload = topic) from another client, and asserts the subscriber gets exactly `yes`.
async fn check_matching(filter: &str, yes: &[&str], no: &[&str]) {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v311(broker.addr(), "sub", true).await;
    assert_eq!(
        sub.subscribe(1, &[(filter, QoS::AtMostOnce)]).await,
        vec![ReasonCode::GRANTED_QOS_0]
    );
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    for t in no.iter().chain(yes.iter()) {
        publ.send(&Packet::Publish(publish0(t, t.as_bytes()))).await;
    }
    publ.ping().await;
    let mut got = BTreeSet::new();
    for _ in 0..yes.len() {
        let p = sub.recv_publish().await;
        assert_eq!(p.payload.as_ref(), p.topic.as_bytes());
        got.insert(p.topic);
    }
    let want: BTreeSet<String> = yes.iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want, "filter {filter:?}");
    sub.expect_nothing(300).await;
}

/// [MQTT-4.7.1-2]: `+` matches exactly one whole level, including an empty one.
#[tokio::test]
async fn single_level_wildcard_matches_one_level() {
    check_matching(
        "sport/+/player",
        &["sport/tennis/player", "sport//player"],
        &[
            "sport/tennis/x/player",
            "sport/player",
            "sport/tennis/player/x",
        ],
    )
    .await;
}

/// [MQTT-4.7.1-2]: `+` as the last level; `sport/+` does not match `sport` but matches `sport/`.
#[tokio::test]
async fn single_level_wildcard_last_level() {
    check_matching(
        "sport/+",
        &["sport/tennis", "sport/"],
        &["sport", "sport/tennis/x"],
    )
    .await;
}

/// [MQTT-4.7.1-1]: `#` matches the parent level and any number of child levels:
/// `sport/#` matches `sport`, `sport/tennis`, `sport/tennis/player1`, not `sports`.
#[tokio::test]
async fn multi_level_wildcard_matches_parent_and_children() {
    check_matching(
        "sport/#",
        &["sport", "sport/tennis", "sport/tennis/player1", "sport/"],
        &["sports", "sportx/tennis", "other/sport"],
    )
    .await;
}

/// [MQTT-4.7.3-4]: no normalization: matching is case sensitive and byte exact.
#[tokio::test]
async fn matching_is_case_sensitive() {
    check_matching(
        "Sport/Tennis",
        &["Sport/Tennis"],
        &["sport/tennis", "SPORT/TENNIS", "Sport/Tennis/"],
    )
    .await;
}

/// [MQTT-4.7.2-1]: filters starting with a wildcard (`#`, `+/x`) do not match topics
/// starting with `$`; an explicit `$...` filter does.
#[tokio::test]
async fn wildcards_do_not_match_dollar_topics() {
    let broker = Broker::start();
    let mut wild = RawClient::connect_v311(broker.addr(), "wild", true).await;
    wild.subscribe(1, &[("#", QoS::AtMostOnce), ("+/x", QoS::AtMostOnce)])
        .await;
    let mut dollar = RawClient::connect_v311(broker.addr(), "dollar", true).await;
    dollar
        .subscribe(1, &[("$internal/#", QoS::AtMostOnce)])
        .await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publ.send(&Packet::Publish(publish0("$internal/x", b"d")))
        .await;
    publ.send(&Packet::Publish(publish0("plain/x", b"p"))).await;
    publ.ping().await;
    // Proof that the $ message was routed at all.
    assert_eq!(dollar.recv_publish().await.topic, "$internal/x");
    // The wildcard subscriber sees the plain one (once per matching filter at most) and never
    // the $ one.
    let first = wild.recv_publish().await;
    assert_eq!(first.topic, "plain/x");
    loop {
        match wild.try_recv(std::time::Duration::from_millis(300)).await {
            Err(RecvError::Timeout) => break,
            Ok(Packet::Publish(p)) => assert_eq!(p.topic, "plain/x", "[MQTT-4.7.2-1] leaked {p:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// [MQTT-3.8.4-7] / [MQTT-3.9.3-1]: the SUBACK carries one granted QoS per filter, in order.
#[tokio::test]
async fn suback_grants_qos_per_filter_in_order() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "granted", true).await;
    let codes = c
        .subscribe(
            42,
            &[
                ("a/2", QoS::ExactlyOnce),
                ("a/0", QoS::AtMostOnce),
                ("a/1", QoS::AtLeastOnce),
            ],
        )
        .await;
    assert_eq!(
        codes,
        vec![
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::GRANTED_QOS_1
        ]
    );
}

/// [MQTT-3.8.4-1] / [MQTT-3.8.4-2]: byte-exact 3.1.1 SUBACK `90 03 00 07 01`.
#[tokio::test]
async fn suback_v311_byte_exact() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "subexact", true).await;
    // SUBSCRIBE id 7, "a/b" QoS 1
    let mut body = vec![0x00, 0x07];
    body.extend_from_slice(&raw_str(b"a/b"));
    body.push(0x01);
    c.send_bytes(&raw_packet(0x82, &body)).await;
    assert_eq!(
        c.recv_exact_bytes(5).await,
        vec![0x90, 0x03, 0x00, 0x07, 0x01]
    );
}

/// [MQTT-3.10.4-4] / [MQTT-3.10.4-5] / [MQTT-3.10.4-2]: UNSUBACK echoes the packet id and
/// no further messages are delivered for the removed filter.
#[tokio::test]
async fn unsubscribe_stops_delivery_and_is_acked() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "unsub", true).await;
    c.subscribe(1, &[("u/t", QoS::AtMostOnce)]).await;
    c.send(&Packet::Publish(publish0("u/t", b"before"))).await;
    assert_eq!(c.recv_publish().await.payload.as_ref(), b"before");
    c.send(&Packet::Unsubscribe(unsubscribe_packet(9, &["u/t"])))
        .await;
    match c.recv().await {
        Packet::UnsubAck(a) => assert_eq!(a.packet_id, 9),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    c.send(&Packet::Publish(publish0("u/t", b"after"))).await;
    c.ping().await;
    c.expect_nothing(300).await;
}

/// [MQTT-3.10.4-5]: UNSUBACK is sent even when nothing was subscribed; 3.1.1 byte exact
/// `b0 02 00 0b`.
#[tokio::test]
async fn unsuback_without_subscription_byte_exact() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "unsub0", true).await;
    let mut body = vec![0x00, 0x0b];
    body.extend_from_slice(&raw_str(b"never/subscribed"));
    c.send_bytes(&raw_packet(0xa2, &body)).await;
    assert_eq!(c.recv_exact_bytes(4).await, vec![0xb0, 0x02, 0x00, 0x0b]);
}

/// [MQTT-3.10.4-1]: UNSUBSCRIBE compares filters character by character: unsubscribing
/// `u/+` does not remove `u/#`.
#[tokio::test]
async fn unsubscribe_matches_filter_exactly() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "exactunsub", true).await;
    c.subscribe(1, &[("u/#", QoS::AtMostOnce)]).await;
    c.send(&Packet::Unsubscribe(unsubscribe_packet(2, &["u/+"])))
        .await;
    assert!(matches!(c.recv().await, Packet::UnsubAck(_)));
    c.send(&Packet::Publish(publish0("u/x", b"still"))).await;
    assert_eq!(c.recv_publish().await.payload.as_ref(), b"still");
}

/// [MQTT-3.11.3-1] / [MQTT-3.11.3-2]: MQTT 5 UNSUBACK has one reason per filter, in order:
/// 0x00 for a removed subscription, 0x11 (No subscription existed) otherwise.
#[tokio::test]
async fn v5_unsuback_reason_codes_per_filter() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "unsub5", true).await;
    c.subscribe(1, &[("a", QoS::AtMostOnce)]).await;
    c.send(&Packet::Unsubscribe(unsubscribe_packet(3, &["nope", "a"])))
        .await;
    match c.recv().await {
        Packet::UnsubAck(a) => {
            assert_eq!(a.packet_id, 3);
            assert_eq!(
                a.reasons,
                vec![ReasonCode::NO_SUBSCRIPTION_EXISTED, ReasonCode::SUCCESS]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
}

/// [MQTT-3.8.4-3]: subscribing again to an identical filter replaces the subscription (one
/// copy of each message, at the new QoS).
#[tokio::test]
async fn resubscribe_replaces_existing_subscription() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "resub", true).await;
    c.subscribe(1, &[("r/t", QoS::ExactlyOnce)]).await;
    c.subscribe(2, &[("r/t", QoS::AtMostOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "r/t",
        b"x",
        QoS::ExactlyOnce,
        false,
        Some(1),
    ))
    .await;
    let p = c.recv_publish().await;
    assert_eq!(p.qos, QoS::AtMostOnce, "new subscription QoS applies");
    c.expect_nothing(300).await;
}

/// [MQTT-3.8.4-5]: one SUBSCRIBE with several filters works like several SUBSCRIBEs with a
/// single SUBACK.
#[tokio::test]
async fn subscribe_with_multiple_filters() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "multi", true).await;
    let codes = c
        .subscribe(5, &[("m/a", QoS::AtMostOnce), ("m/b", QoS::AtMostOnce)])
        .await;
    assert_eq!(codes.len(), 2);
    c.send(&Packet::Publish(publish0("m/a", b"a"))).await;
    c.send(&Packet::Publish(publish0("m/b", b"b"))).await;
    let mut got = vec![c.recv_publish().await.topic, c.recv_publish().await.topic];
    got.sort();
    assert_eq!(got, vec!["m/a".to_string(), "m/b".to_string()]);
}

/// [MQTT-3.3.5-1] (3.1.1): overlapping subscriptions: the server delivers respecting the
/// maximum QoS of the matching subscriptions; one copy (at max QoS) or one per subscription.
#[tokio::test]
async fn overlapping_subscriptions_v311_max_qos() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "overlap", true).await;
    c.subscribe(1, &[("o/#", QoS::ExactlyOnce), ("o/+", QoS::AtLeastOnce)])
        .await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "o/x",
        b"ov",
        QoS::ExactlyOnce,
        false,
        Some(3),
    ))
    .await;
    let first = c.recv_publish_ack().await;
    let mut qos = vec![first.qos];
    if let Ok(Packet::Publish(second)) = c.try_recv(std::time::Duration::from_millis(500)).await {
        c.ack(&second).await;
        qos.push(second.qos);
    }
    qos.sort();
    assert!(
        qos == vec![QoS::ExactlyOnce] || qos == vec![QoS::AtLeastOnce, QoS::ExactlyOnce],
        "one copy at QoS 2 or one per subscription, got {qos:?}"
    );
    c.expect_nothing(200).await;
}

/// [MQTT-3.3.4-2] / [MQTT-3.3.4-3] / [MQTT-3.3.4-4]: MQTT 5 overlapping subscriptions: Halyard
/// sends one copy at the maximum QoS carrying the identifiers of all matching subscriptions.
#[tokio::test]
async fn v5_overlapping_subscriptions_single_copy_with_all_identifiers() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "overlap5", true).await;
    let mut s1: Subscribe = subscribe_opts(1, "o/#", sub_options(QoS::AtLeastOnce));
    s1.properties.subscription_identifiers = vec![11];
    let mut s2: Subscribe = subscribe_opts(2, "o/+", sub_options(QoS::ExactlyOnce));
    s2.properties.subscription_identifiers = vec![22];
    c.subscribe_with(s1).await;
    c.subscribe_with(s2).await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "o/x",
        b"ov",
        QoS::ExactlyOnce,
        false,
        Some(3),
    ))
    .await;
    let p = c.recv_publish_ack().await;
    assert_eq!(p.qos, QoS::ExactlyOnce);
    let mut ids = p.properties.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, vec![11, 22]);
    c.expect_nothing(300).await;
}

/// [MQTT-3.8.3-2] a contrario / [MQTT-4.7.1-1]: an invalid filter (`a/#/b`) is refused: a
/// failure code in SUBACK (0x80 in 3.1.1) or the connection is closed.
#[tokio::test]
async fn invalid_filter_refused_v311() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "badfilter", true).await;
    c.send(&Packet::Subscribe(subscribe_packet(
        1,
        &[("a/#/b", QoS::AtMostOnce)],
    )))
    .await;
    match c.try_recv(TIMEOUT).await {
        Ok(Packet::SubAck(a)) => assert_eq!(a.reasons, vec![ReasonCode::V3_SUBACK_FAILURE]),
        Err(RecvError::Closed) => {}
        other => panic!("expected SUBACK 0x80 or close, got {other:?}"),
    }
}

/// [MQTT-3.9.3-2]: MQTT 5 invalid filter -> SUBACK 0x8F (Topic Filter invalid) for that
/// filter, other filters still granted (or DISCONNECT/close as a malformed packet).
#[tokio::test]
async fn invalid_filter_refused_v5() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "badfilter5", true).await;
    c.send(&Packet::Subscribe(subscribe_packet(
        1,
        &[("ok/+", QoS::AtMostOnce), ("a/b#", QoS::AtMostOnce)],
    )))
    .await;
    match c.try_recv(TIMEOUT).await {
        Ok(Packet::SubAck(a)) => assert_eq!(
            a.reasons,
            vec![ReasonCode::GRANTED_QOS_0, ReasonCode::TOPIC_FILTER_INVALID]
        ),
        Ok(Packet::Disconnect(d)) => assert!(d.reason.is_error()),
        Err(RecvError::Closed) => {}
        other => panic!("expected SUBACK 0x8F or close, got {other:?}"),
    }
}

/// [MQTT-3.3.2-3]: the topic name the subscriber receives is the published one (matching its
/// filter), not the filter.
#[tokio::test]
async fn delivered_topic_is_the_published_topic() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "topicname", true).await;
    c.subscribe(1, &[("x/+/z", QoS::AtMostOnce)]).await;
    c.send(&Packet::Publish(publish0("x/y/z", b"1"))).await;
    assert_eq!(c.recv_publish().await.topic, "x/y/z");
}
