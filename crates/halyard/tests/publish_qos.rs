//! PUBLISH and the QoS 0/1/2 flows, in both directions.

mod common;

use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};

fn rq(q: QoS) -> rumqttc::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

/// [MQTT-3.8.4-8]: the delivered QoS is min(published QoS, granted QoS), for all 9
/// combinations (rumqttc 3.1.1 clients).
#[tokio::test]
async fn delivery_qos_is_min_of_publish_and_subscription() {
    let broker = Broker::start();
    let levels = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    let mut subs = Vec::new();
    for (i, sq) in levels.iter().enumerate() {
        let (mut s, _) = V4Client::connect(broker.addr(), &format!("sub{i}"), true).await;
        s.client.subscribe("qos/t", rq(*sq)).await.unwrap();
        s.wait_suback().await;
        subs.push(s);
    }
    let (mut publ, _) = V4Client::connect(broker.addr(), "pub", true).await;
    for pq in levels {
        publ.client
            .publish("qos/t", rq(pq), false, vec![pq as u8])
            .await
            .unwrap();
        if pq != QoS::AtMostOnce {
            publ.wait_pub_done().await;
        }
    }
    for (sq, s) in levels.iter().zip(subs.iter_mut()) {
        let mut got = Vec::new();
        for _ in 0..3 {
            let p = s.next_publish().await;
            got.push((p.payload[0], p.qos as u8));
        }
        got.sort();
        let want: Vec<(u8, u8)> = levels
            .iter()
            .map(|pq| (*pq as u8, (*pq).min(*sq) as u8))
            .collect();
        assert_eq!(got, want, "subscription QoS {sq:?}");
        s.expect_no_publish(100).await;
    }
}

/// [MQTT-4.3.2-4]: a QoS 1 PUBLISH is answered with PUBACK carrying its packet id; 3.1.1
/// byte exact `40 02 00 07`.
#[tokio::test]
async fn qos1_publish_gets_puback_byte_exact() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "q1", true).await;
    // PUBLISH QoS 1, topic "a", id 7, payload "x"
    let mut body = raw_str(b"a");
    body.extend_from_slice(&[0x00, 0x07, b'x']);
    c.send_bytes(&raw_packet(0x32, &body)).await;
    assert_eq!(c.recv_exact_bytes(4).await, vec![0x40, 0x02, 0x00, 0x07]);
}

/// [MQTT-4.3.3-8] / [MQTT-4.3.3-11]: QoS 2 inbound: PUBREC with the id, then PUBCOMP for the
/// PUBREL; 3.1.1 byte exact `50 02 00 09` and `70 02 00 09`.
#[tokio::test]
async fn qos2_publish_gets_pubrec_then_pubcomp_byte_exact() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "q2", true).await;
    let mut body = raw_str(b"a");
    body.extend_from_slice(&[0x00, 0x09, b'x']);
    c.send_bytes(&raw_packet(0x34, &body)).await;
    assert_eq!(c.recv_exact_bytes(4).await, vec![0x50, 0x02, 0x00, 0x09]);
    c.send_bytes(&[0x62, 0x02, 0x00, 0x09]).await; // PUBREL
    assert_eq!(c.recv_exact_bytes(4).await, vec![0x70, 0x02, 0x00, 0x09]);
}

/// [MQTT-4.3.3-10]: until PUBREL, a re-sent QoS 2 PUBLISH (DUP=1, same id) is acknowledged
/// with PUBREC again but not delivered again: the subscriber receives it exactly once.
#[tokio::test]
async fn qos2_inbound_duplicate_before_pubrel_delivered_once() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v311(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("eo/t", QoS::ExactlyOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    let mut p = publish_packet("eo/t", b"once", QoS::ExactlyOnce, false, Some(5));
    publ.send(&Packet::Publish(p.clone())).await;
    match publ.recv().await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 5),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    p.dup = true;
    publ.send(&Packet::Publish(p)).await;
    match publ.recv().await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 5, "[MQTT-4.3.3-10] PUBREC again"),
        other => panic!("expected PUBREC for the duplicate, got {other:?}"),
    }
    publ.send(&Packet::PubRel(pub_response(5))).await;
    match publ.recv().await {
        Packet::PubComp(c) => assert_eq!(c.packet_id, 5),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    let got = sub.recv_publish_ack().await;
    assert_eq!(got.payload.as_ref(), b"once");
    sub.expect_nothing(500).await;
}

/// [MQTT-4.3.3-12]: after PUBCOMP, a PUBLISH reusing the packet id is a new message.
#[tokio::test]
async fn qos2_packet_id_reuse_after_pubcomp_is_new_message() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v311(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("eo/t", QoS::ExactlyOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "eo/t",
        b"one",
        QoS::ExactlyOnce,
        false,
        Some(5),
    ))
    .await;
    publ.publish(publish_packet(
        "eo/t",
        b"two",
        QoS::ExactlyOnce,
        false,
        Some(5),
    ))
    .await;
    assert_eq!(sub.recv_publish_ack().await.payload.as_ref(), b"one");
    assert_eq!(sub.recv_publish_ack().await.payload.as_ref(), b"two");
}

/// [MQTT-4.3.2-5]: after PUBACK, a QoS 1 PUBLISH reusing the packet id is a new message.
#[tokio::test]
async fn qos1_packet_id_reuse_after_puback_is_new_message() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v311(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("al/t", QoS::AtLeastOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "al/t",
        b"one",
        QoS::AtLeastOnce,
        false,
        Some(3),
    ))
    .await;
    publ.publish(publish_packet(
        "al/t",
        b"two",
        QoS::AtLeastOnce,
        false,
        Some(3),
    ))
    .await;
    assert_eq!(sub.recv_publish_ack().await.payload.as_ref(), b"one");
    assert_eq!(sub.recv_publish_ack().await.payload.as_ref(), b"two");
}

/// [MQTT-2.2.1-4] / [MQTT-4.3.2-2]: outgoing QoS 1 PUBLISHes carry non-zero, distinct packet
/// ids while unacknowledged, with DUP 0 on first delivery.
#[tokio::test]
async fn outgoing_packet_ids_nonzero_and_unique() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v311(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("ids/t", QoS::AtLeastOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    for i in 0..5u16 {
        publ.publish(publish_packet(
            "ids/t",
            &[i as u8],
            QoS::AtLeastOnce,
            false,
            Some(100 + i),
        ))
        .await;
    }
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let p = sub.recv_publish().await;
        assert!(!p.dup, "[MQTT-4.3.2-2] first delivery has DUP 0");
        let id = p.packet_id.expect("QoS 1 has a packet id");
        assert_ne!(id, 0);
        assert!(ids.insert(id), "packet id {id} reused while unacknowledged");
    }
}

/// [MQTT-3.3.1-2] / [MQTT-4.3.1-1]: outgoing QoS 0 messages have DUP 0 and no packet id, even
/// if the incoming PUBLISH had DUP 1 ([MQTT-3.3.1-3]).
#[tokio::test]
async fn qos0_delivery_has_dup_0() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v311(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("d/t", QoS::AtLeastOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    let mut p = publish_packet("d/t", b"dup-in", QoS::AtLeastOnce, false, Some(4));
    p.dup = true; // a re-sent incoming message
    publ.publish(p).await;
    let got = sub.recv_publish_ack().await;
    assert!(!got.dup, "[MQTT-3.3.1-3] outgoing DUP is set independently");
    publ.send(&Packet::Publish(publish0("d/t", b"zero"))).await;
    let got = sub.recv_publish().await;
    assert_eq!(got.qos, QoS::AtMostOnce);
    assert!(!got.dup);
    assert_eq!(got.packet_id, None);
}

/// [MQTT-4.6.0-5] / [MQTT-4.6.0-6]: messages from one publisher on one topic reach a
/// subscriber in order.
#[tokio::test]
async fn messages_delivered_in_publish_order() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v311(broker.addr(), "sub", true).await;
    sub.subscribe(1, &[("ord/t", QoS::AtLeastOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    for i in 0..20u8 {
        let qos = if i % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let id = (qos != QoS::AtMostOnce).then_some(i as u16 + 1);
        publ.publish(publish_packet("ord/t", &[i], qos, false, id))
            .await;
    }
    for i in 0..20u8 {
        let p = sub.recv_publish_ack().await;
        assert_eq!(p.payload.as_ref(), &[i]);
    }
}

/// [MQTT-4.4.0-1] / [MQTT-3.3.1-1] (and [MQTT-4.6.0-1] ordering): unacknowledged outgoing
/// QoS 1 messages of a persistent session are re-sent on reconnect with DUP 1, the original
/// packet ids, in the original order.
#[tokio::test]
async fn unacked_qos1_resent_with_dup_on_reconnect_in_order() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v311(broker.addr(), "persist", false).await;
    sub.subscribe(1, &[("re/t", QoS::AtLeastOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    for i in 0..3u8 {
        publ.publish(publish_packet(
            "re/t",
            &[i],
            QoS::AtLeastOnce,
            false,
            Some(10 + i as u16),
        ))
        .await;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        let p = sub.recv_publish().await; // deliberately not acknowledged
        first.push((p.packet_id, p.payload.clone()));
    }
    sub.drop_abruptly().await;
    sleep_ms(100).await;
    let (mut sub, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "persist", false),
    )
    .await;
    assert!(ack.session_present);
    for (id, payload) in first {
        let p = sub.recv_publish().await;
        assert!(p.dup, "[MQTT-3.3.1-1] re-delivery has DUP 1: {p:?}");
        assert_eq!(p.packet_id, id, "original packet id");
        assert_eq!(p.payload, payload, "original order");
        sub.ack(&p).await;
    }
    sub.ping().await;
}

/// [MQTT-4.4.0-1]: a PUBREL the server sent but that was not completed (no PUBCOMP) is
/// re-sent after reconnect, with the original packet id, and no PUBLISH is re-sent
/// ([MQTT-4.3.3-6]).
#[tokio::test]
async fn unacked_pubrel_resent_on_reconnect() {
    let broker = Broker::start();
    let mut sub = RawClient::connect_v311(broker.addr(), "persist2", false).await;
    sub.subscribe(1, &[("re/t", QoS::ExactlyOnce)]).await;
    let mut publ = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publ.publish(publish_packet(
        "re/t",
        b"q2",
        QoS::ExactlyOnce,
        false,
        Some(1),
    ))
    .await;
    let p = sub.recv_publish().await;
    let id = p.packet_id.unwrap();
    sub.send(&Packet::PubRec(pub_response(id))).await;
    match sub.recv().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.drop_abruptly().await; // no PUBCOMP
    sleep_ms(100).await;
    let (mut sub, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "persist2", false),
    )
    .await;
    assert!(ack.session_present);
    match sub.recv().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, id),
        other => panic!("expected the PUBREL to be re-sent, got {other:?}"),
    }
    sub.send(&Packet::PubComp(pub_response(id))).await;
    sub.ping().await;
}

/// [MQTT-4.3.2-3] / [MQTT-4.3.3-3]: with rumqttc: QoS 1 and QoS 2 publishes are acknowledged
/// and delivered to a QoS 2 subscriber.
#[tokio::test]
async fn rumqttc_qos1_and_qos2_round_trip() {
    let broker = Broker::start();
    let (mut sub, _) = V4Client::connect(broker.addr(), "rsub", true).await;
    sub.client
        .subscribe("rt/#", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    sub.wait_suback().await;
    let (mut publ, _) = V4Client::connect(broker.addr(), "rpub", true).await;
    publ.client
        .publish("rt/1", rumqttc::QoS::AtLeastOnce, false, "one")
        .await
        .unwrap();
    publ.wait_pub_done().await;
    publ.client
        .publish("rt/2", rumqttc::QoS::ExactlyOnce, false, "two")
        .await
        .unwrap();
    publ.wait_pub_done().await;
    let a = sub.next_publish().await;
    let b = sub.next_publish().await;
    assert_eq!(
        (a.topic.as_str(), a.qos),
        ("rt/1", rumqttc::QoS::AtLeastOnce)
    );
    assert_eq!(
        (b.topic.as_str(), b.qos),
        ("rt/2", rumqttc::QoS::ExactlyOnce)
    );
    sub.expect_no_publish(200).await;
}

/// [MQTT-4.3.3-13] context: a QoS 2 exchange is answered even when nobody subscribes
/// (PUBREC success in 3.1.1; no subscribers is not an error).
#[tokio::test]
async fn qos2_without_subscribers_completes() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "lonely", true).await;
    let reason = c
        .publish(publish_packet(
            "nobody/here",
            b"x",
            QoS::ExactlyOnce,
            false,
            Some(1),
        ))
        .await;
    assert_eq!(reason, ReasonCode::SUCCESS);
}
