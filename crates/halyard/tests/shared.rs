//! Shared subscriptions `$share/{group}/{filter}` (MQTT 5 section 4.8.2; also accepted from
//! 3.1.1 clients, as Mosquitto does).

mod common;

use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode, SubscriptionOptions};

/// Two members of one group and a plain subscriber; 10 QoS 1 messages. Each message goes to
/// exactly one member, both members get some (round robin), the plain subscriber gets all.
async fn shared_round_robin(version: ProtocolVersion) {
    let broker = Broker::start();
    let mut members = Vec::new();
    for id in ["m1", "m2"] {
        let (mut m, ack) =
            RawClient::handshake(broker.addr(), connect_packet(version, id, true)).await;
        assert_eq!(ack.code, ReasonCode::SUCCESS);
        assert_eq!(
            m.subscribe(1, &[("$share/g/sh/t", QoS::AtLeastOnce)]).await,
            vec![ReasonCode::GRANTED_QOS_1]
        );
        members.push(m);
    }
    let (mut plain, _) =
        RawClient::handshake(broker.addr(), connect_packet(version, "plain", true)).await;
    plain.subscribe(1, &[("sh/t", QoS::AtLeastOnce)]).await;
    let (mut publ, _) =
        RawClient::handshake(broker.addr(), connect_packet(version, "pub", true)).await;
    for i in 0..10u8 {
        publ.publish(publish_packet(
            "sh/t",
            &[i],
            QoS::AtLeastOnce,
            false,
            Some(1 + i as u16),
        ))
        .await;
    }
    for i in 0..10u8 {
        let p = plain.recv_publish_ack().await;
        assert_eq!(
            p.payload.as_ref(),
            &[i],
            "the plain subscriber gets every message"
        );
    }
    let mut seen = Vec::new();
    let mut per_member = Vec::new();
    for m in members.iter_mut() {
        let mut n = 0;
        while let Ok(Packet::Publish(p)) = m.try_recv(std::time::Duration::from_millis(500)).await {
            assert_eq!(p.topic, "sh/t", "topic without the $share prefix");
            m.ack(&p).await;
            seen.push(p.payload[0]);
            n += 1;
        }
        per_member.push(n);
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..10).collect::<Vec<u8>>(),
        "each message to exactly one member"
    );
    assert!(
        per_member.iter().all(|&n| n > 0),
        "both members get some: {per_member:?}"
    );
}

/// [MQTT-4.8.2-1] / [MQTT-4.8.2-2] / 4.8.2: MQTT 5 shared subscription, one member per message.
#[tokio::test]
async fn v5_shared_subscription_each_message_to_one_member() {
    shared_round_robin(ProtocolVersion::V5).await;
}

/// Shared subscriptions from MQTT 3.1.1 clients work the same way.
#[tokio::test]
async fn v311_shared_subscription_each_message_to_one_member() {
    shared_round_robin(ProtocolVersion::V3_1_1).await;
}

/// Different share groups each get every message (one member per group).
#[tokio::test]
async fn each_share_group_gets_every_message() {
    let broker = Broker::start();
    let mut a = RawClient::connect_v5(broker.addr(), "a", true).await;
    a.subscribe(1, &[("$share/ga/grp/t", QoS::AtMostOnce)])
        .await;
    let mut b = RawClient::connect_v5(broker.addr(), "b", true).await;
    b.subscribe(1, &[("$share/gb/grp/t", QoS::AtMostOnce)])
        .await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    for i in 0..3u8 {
        publ.send(&Packet::Publish(publish0("grp/t", &[i]))).await;
    }
    for i in 0..3u8 {
        assert_eq!(a.recv_publish().await.payload.as_ref(), &[i]);
        assert_eq!(b.recv_publish().await.payload.as_ref(), &[i]);
    }
}

/// 4.8.2 / [MQTT-4.8.2-3]: a wildcard filter inside a share works and the granted QoS of
/// the member is respected.
#[tokio::test]
async fn shared_subscription_with_wildcard_respects_granted_qos() {
    let broker = Broker::start();
    let mut m = RawClient::connect_v5(broker.addr(), "m", true).await;
    m.subscribe(1, &[("$share/g/wq/#", QoS::AtMostOnce)]).await;
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "wq/x/y",
        b"x",
        QoS::ExactlyOnce,
        false,
        Some(1),
    ))
    .await;
    let p = m.recv_publish().await;
    assert_eq!(p.topic, "wq/x/y");
    assert_eq!(p.qos, QoS::AtMostOnce);
}

/// [MQTT-3.8.3-4]: No Local on a shared subscription is a Protocol Error: the connection is
/// closed (DISCONNECT 0x82 if any).
#[tokio::test]
async fn no_local_on_shared_subscription_is_protocol_error() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "nl", true).await;
    c.send(&Packet::Subscribe(subscribe_opts(
        1,
        "$share/g/t",
        SubscriptionOptions {
            qos: QoS::AtMostOnce,
            no_local: true,
            ..Default::default()
        },
    )))
    .await;
    let reason = c.expect_closed_maybe_disconnect().await;
    assert!(
        matches!(reason, None | Some(ReasonCode::PROTOCOL_ERROR)),
        "{reason:?}"
    );
}

/// [MQTT-4.8.2-1] / [MQTT-4.8.2-2]: `$share/g` without a filter, or a share name with a
/// wildcard, is not a valid shared subscription (SUBACK 0x8F, or the connection closed).
#[tokio::test]
async fn invalid_share_filter_refused() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "badshare", true).await;
    c.send(&Packet::Subscribe(subscribe_packet(
        1,
        &[
            ("$share/g", QoS::AtMostOnce),
            ("$share/g+/t", QoS::AtMostOnce),
        ],
    )))
    .await;
    match c.try_recv(TIMEOUT).await {
        Ok(Packet::SubAck(a)) => {
            assert_eq!(a.reasons.len(), 2);
            assert!(a.reasons.iter().all(|r| r.is_error()), "{a:?}");
        }
        Ok(Packet::Disconnect(d)) => assert!(d.reason.is_error()),
        Err(RecvError::Closed) => {}
        other => panic!("expected SUBACK failures or close, got {other:?}"),
    }
}

/// Unsubscribing a member removes it from the group: the remaining member gets everything.
#[tokio::test]
async fn unsubscribed_member_leaves_group() {
    let broker = Broker::start();
    let mut m1 = RawClient::connect_v5(broker.addr(), "m1", true).await;
    m1.subscribe(1, &[("$share/g/u/t", QoS::AtMostOnce)]).await;
    let mut m2 = RawClient::connect_v5(broker.addr(), "m2", true).await;
    m2.subscribe(1, &[("$share/g/u/t", QoS::AtMostOnce)]).await;
    m2.send(&Packet::Unsubscribe(unsubscribe_packet(
        2,
        &["$share/g/u/t"],
    )))
    .await;
    match m2.recv().await {
        Packet::UnsubAck(a) => assert_eq!(a.reasons, vec![ReasonCode::SUCCESS]),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let mut publ = RawClient::connect_v5(broker.addr(), "pub", true).await;
    for i in 0..4u8 {
        publ.send(&Packet::Publish(publish0("u/t", &[i]))).await;
    }
    for i in 0..4u8 {
        assert_eq!(m1.recv_publish().await.payload.as_ref(), &[i]);
    }
    m2.expect_nothing(200).await;
}
