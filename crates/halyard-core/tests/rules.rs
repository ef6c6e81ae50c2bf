//! Rule tests of the broker state machine, driven with a fake clock and no sockets.
//! Each test names the normative statement it checks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use halyard_codec::{
    Connect, Disconnect, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS,
    ReasonCode, Subscribe, Subscription, SubscriptionOptions, Unsubscribe, Will,
};
use halyard_core::{Broker, BrokerConfig, ConnectionId, Output, QueueFullPolicy, PUSHBACK_TIMEOUT};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// A broker plus a fake clock and per-connection inboxes of what it sent.
struct Harness {
    broker: Broker,
    now: Instant,
    inbox: HashMap<ConnectionId, Vec<Packet>>,
    closed: Vec<ConnectionId>,
    /// Connections the broker told to stop reading (backpressure), until resumed.
    paused: Vec<ConnectionId>,
    /// Write notifications asked for and not yet answered (see `hold_writes`).
    written: Vec<ConnectionId>,
    /// Whether `drain` leaves write notifications for the test to answer; otherwise the
    /// fake network writes everything at once and answers them itself.
    hold_writes: bool,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_config(BrokerConfig::default())
    }

    fn with_config(config: BrokerConfig) -> Harness {
        Harness {
            broker: Broker::new(config),
            now: Instant::now(),
            inbox: HashMap::new(),
            closed: Vec::new(),
            paused: Vec::new(),
            written: Vec::new(),
            hold_writes: false,
        }
    }

    fn drain(&mut self) {
        loop {
            while let Some(output) = self.broker.poll_output() {
                match output {
                    Output::Send { conn, packet } => {
                        self.inbox.entry(conn).or_default().push(packet)
                    }
                    Output::Close { conn } => self.closed.push(conn),
                    Output::Pause { conn } => self.paused.push(conn),
                    Output::Resume { conn } => self.paused.retain(|&c| c != conn),
                    Output::NotifyWritten { conn } => self.written.push(conn),
                    other => panic!("a single node emits no cluster output: {other:?}"),
                }
            }
            if self.hold_writes || self.written.is_empty() {
                return;
            }
            for conn in std::mem::take(&mut self.written) {
                self.broker.handle_written(self.now, conn);
            }
        }
    }

    /// Answers the write notifications asked for so far, as the server does once the
    /// connection's writer has flushed; returns how many there were.
    fn answer_written(&mut self) -> usize {
        let written = std::mem::take(&mut self.written);
        for &conn in &written {
            self.broker.handle_written(self.now, conn);
        }
        self.drain();
        written.len()
    }

    fn send(&mut self, conn: ConnectionId, packet: Packet) {
        self.broker.handle_packet(self.now, conn, packet);
        self.drain();
    }

    fn take(&mut self, conn: ConnectionId) -> Vec<Packet> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    fn publishes(&mut self, conn: ConnectionId) -> Vec<Publish> {
        self.take(conn)
            .into_iter()
            .filter_map(|packet| match packet {
                Packet::Publish(publish) => Some(publish),
                _ => None,
            })
            .collect()
    }

    fn is_closed(&self, conn: ConnectionId) -> bool {
        self.closed.contains(&conn)
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.broker.handle_timeout(self.now);
        self.drain();
    }

    fn connect_with(&mut self, conn: ConnectionId, connect: Connect) -> halyard_codec::ConnAck {
        self.send(conn, Packet::Connect(Box::new(connect)));
        let inbox = self.inbox.entry(conn).or_default();
        match (!inbox.is_empty()).then(|| inbox.remove(0)) {
            Some(Packet::ConnAck(ack)) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn connect(
        &mut self,
        conn: ConnectionId,
        version: ProtocolVersion,
        id: &str,
        clean: bool,
    ) -> halyard_codec::ConnAck {
        self.connect_with(conn, connect(version, id, clean))
    }

    fn subscribe(&mut self, conn: ConnectionId, filter: &str, qos: QoS) {
        self.subscribe_with(conn, filter, options(qos), None);
    }

    fn subscribe_with(
        &mut self,
        conn: ConnectionId,
        filter: &str,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    ) -> Vec<Packet> {
        let mut properties = Properties::default();
        properties.subscription_identifiers.extend(identifier);
        self.send(
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: filter.to_string(),
                    options,
                }],
                properties,
            }),
        );
        let mut packets = self.take(conn);
        assert!(
            matches!(packets.first(), Some(Packet::SubAck(_))),
            "expected SUBACK first, got {packets:?}"
        );
        packets.remove(0);
        packets
    }

    fn publish(
        &mut self,
        conn: ConnectionId,
        topic: &str,
        payload: &'static [u8],
        qos: QoS,
        retain: bool,
        id: u16,
    ) {
        self.send(
            conn,
            Packet::Publish(publish(topic, payload, qos, retain, id)),
        );
    }
}

fn connect(version: ProtocolVersion, id: &str, clean: bool) -> Connect {
    Connect {
        protocol: version,
        clean_start: clean,
        keep_alive: 0,
        client_id: id.to_string(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

fn options(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..Default::default()
    }
}

fn publish(topic: &str, payload: &'static [u8], qos: QoS, retain: bool, id: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain,
        topic: topic.to_string(),
        packet_id: (qos != QoS::AtMostOnce).then_some(id),
        payload: Bytes::from_static(payload),
        properties: Properties::default(),
    }
}

fn will(topic: &str, delay: Option<u32>) -> Will {
    let properties = Properties {
        will_delay_interval: delay,
        ..Default::default()
    };
    Will {
        topic: topic.to_string(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties,
    }
}

fn ack(id: u16) -> PubResponse {
    PubResponse {
        packet_id: id,
        ..Default::default()
    }
}

#[test]
fn first_packet_must_be_connect() {
    // [MQTT-3.1.0-1]
    let mut h = Harness::new();
    h.send(1, Packet::PingReq);
    assert!(h.is_closed(1));
    assert!(h.take(1).is_empty());
}

#[test]
fn second_connect_is_a_protocol_error() {
    // [MQTT-3.1.0-2]
    let mut h = Harness::new();
    h.connect(1, V5, "a", true);
    h.send(1, Packet::Connect(Box::new(connect(V5, "a", true))));
    assert!(
        matches!(h.take(1).as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::PROTOCOL_ERROR)
    );
    assert!(h.is_closed(1));
}

#[test]
fn zero_length_client_id_rules() {
    let mut h = Harness::new();
    // [MQTT-3.1.3-8]: 3.1.1 with clean session 0 is rejected with 0x02.
    let ack = h.connect(1, V3, "", false);
    assert_eq!(ack.code, ReasonCode::V3_IDENTIFIER_REJECTED);
    assert!(h.is_closed(1));
    // [MQTT-3.1.3-6]: with clean session 1 the server assigns one.
    assert_eq!(h.connect(2, V3, "", true).code, ReasonCode::SUCCESS);
    // [MQTT-3.2.2-16]: MQTT 5 gets the Assigned Client Identifier.
    let ack = h.connect(3, V5, "", true);
    assert!(ack
        .properties
        .assigned_client_identifier
        .is_some_and(|id| !id.is_empty()));
}

#[test]
fn delivery_qos_is_the_minimum_of_publish_and_subscription() {
    // [MQTT-3.8.4-8]
    for sub_qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        for pub_qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let mut h = Harness::new();
            h.connect(1, V3, "sub", true);
            h.subscribe(1, "t", sub_qos);
            h.connect(2, V3, "pub", true);
            h.publish(2, "t", b"x", pub_qos, false, 7);
            let got = h.publishes(1);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].qos, sub_qos.min(pub_qos));
        }
    }
}

#[test]
fn inbound_qos2_is_delivered_exactly_once() {
    // [MQTT-4.3.3-9]: a re-sent PUBLISH before PUBREL is not delivered again.
    let mut h = Harness::new();
    h.connect(1, V3, "sub", true);
    h.subscribe(1, "t", QoS::ExactlyOnce);
    h.connect(2, V3, "pub", true);
    h.publish(2, "t", b"once", QoS::ExactlyOnce, false, 9);
    assert!(matches!(h.take(2).as_slice(), [Packet::PubRec(r)] if r.packet_id == 9));
    let mut again = publish("t", b"once", QoS::ExactlyOnce, false, 9);
    again.dup = true;
    h.send(2, Packet::Publish(again));
    assert!(matches!(h.take(2).as_slice(), [Packet::PubRec(r)] if r.packet_id == 9));
    h.send(2, Packet::PubRel(ack(9)));
    assert!(matches!(h.take(2).as_slice(), [Packet::PubComp(c)] if c.packet_id == 9));
    assert_eq!(h.publishes(1).len(), 1);
    // After PUBCOMP the id is free again and a new message with it is delivered.
    h.publish(2, "t", b"next", QoS::ExactlyOnce, false, 9);
    assert_eq!(h.publishes(1).len(), 1);
}

#[test]
fn outbound_qos2_handshake() {
    let mut h = Harness::new();
    h.connect(1, V5, "sub", true);
    h.subscribe(1, "t", QoS::ExactlyOnce);
    h.connect(2, V5, "pub", true);
    h.publish(2, "t", b"x", QoS::ExactlyOnce, false, 1);
    let got = h.publishes(1);
    let id = got[0].packet_id.expect("QoS 2 has an id");
    h.send(1, Packet::PubRec(ack(id)));
    assert!(matches!(h.take(1).as_slice(), [Packet::PubRel(r)] if r.packet_id == id));
    h.send(1, Packet::PubComp(ack(id)));
    assert!(h.take(1).is_empty());
}

#[test]
fn retained_messages_on_subscribe_and_live() {
    let mut h = Harness::new();
    h.connect(1, V3, "pub", true);
    h.publish(1, "a/b", b"r", QoS::AtLeastOnce, true, 1);
    h.connect(2, V3, "sub", true);
    // [MQTT-3.3.1-6], [MQTT-3.3.1-8]: sent on subscribe, through wildcards, with RETAIN=1.
    let retained = h.subscribe_with(2, "a/+", options(QoS::AtLeastOnce), None);
    assert!(matches!(retained.as_slice(), [Packet::Publish(p)] if p.retain && p.payload == "r"));
    // [MQTT-3.3.1-9] (3.1.1): live copies go out with RETAIN=0.
    h.publish(1, "a/b", b"live", QoS::AtMostOnce, true, 0);
    let live = h.publishes(2);
    assert_eq!(live.len(), 1);
    assert!(!live[0].retain);
    // [MQTT-3.3.1-12]: RETAIN=0 never replaces the retained message.
    h.publish(1, "a/b", b"plain", QoS::AtMostOnce, false, 0);
    h.connect(3, V3, "late", true);
    let retained = h.subscribe_with(3, "a/b", options(QoS::AtMostOnce), None);
    assert!(matches!(retained.as_slice(), [Packet::Publish(p)] if p.payload == "live"));
    // [MQTT-3.3.1-10], [MQTT-3.3.1-11]: an empty retained payload clears it.
    h.publish(1, "a/b", b"", QoS::AtMostOnce, true, 0);
    h.connect(4, V3, "later", true);
    assert!(h
        .subscribe_with(4, "a/b", options(QoS::AtMostOnce), None)
        .is_empty());
    assert_eq!(h.broker.stats().retained_messages, 0);
}

#[test]
fn retain_handling_and_retain_as_published() {
    let mut h = Harness::new();
    h.connect(1, V5, "pub", true);
    h.publish(1, "t", b"r", QoS::AtMostOnce, true, 0);
    h.connect(2, V5, "sub", true);
    let never = SubscriptionOptions {
        retain_handling: 2,
        ..options(QoS::AtMostOnce)
    };
    // [MQTT-3.3.1-11] (5.0): retain handling 2 sends no retained messages.
    assert!(h.subscribe_with(2, "t", never, None).is_empty());
    let if_new = SubscriptionOptions {
        retain_handling: 1,
        retain_as_published: true,
        ..options(QoS::AtMostOnce)
    };
    // [MQTT-3.3.1-10] (5.0): retain handling 1 sends them only for a new subscription.
    assert!(h.subscribe_with(2, "u", if_new, None).is_empty());
    assert!(h.subscribe_with(2, "t", if_new, None).is_empty());
    h.connect(3, V5, "sub2", true);
    assert_eq!(h.subscribe_with(3, "t", if_new, None).len(), 1);
    // [MQTT-3.3.1-13]: retain as published keeps RETAIN=1 on live messages.
    h.connect(4, V5, "plain", true);
    assert_eq!(
        h.subscribe_with(4, "t", options(QoS::AtMostOnce), None)
            .len(),
        1
    );
    h.publish(1, "t", b"again", QoS::AtMostOnce, true, 0);
    assert!(h.publishes(3)[0].retain);
    assert!(!h.publishes(4)[0].retain);
}

#[test]
fn keep_alive_closes_silent_client_at_one_and_a_half_times() {
    // [MQTT-3.1.2-22]
    let mut h = Harness::new();
    h.connect(9, V3, "watch", true);
    h.subscribe(9, "will/#", QoS::AtLeastOnce);
    let mut c = connect(V5, "silent", true);
    c.keep_alive = 2;
    c.will = Some(will("will/silent", None));
    h.connect_with(1, c);
    h.advance(Duration::from_millis(2900));
    assert!(!h.is_closed(1));
    h.send(1, Packet::PingReq);
    assert!(matches!(h.take(1).as_slice(), [Packet::PingResp]));
    h.advance(Duration::from_millis(2900));
    assert!(!h.is_closed(1));
    h.advance(Duration::from_millis(200));
    assert!(h.is_closed(1));
    assert!(
        matches!(h.take(1).as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::KEEP_ALIVE_TIMEOUT)
    );
    // The will goes out on a keep-alive timeout [MQTT-3.1.2-8].
    assert_eq!(h.publishes(9).len(), 1);
}

#[test]
fn server_keep_alive_and_v3_limit() {
    let mut h = Harness::with_config(BrokerConfig {
        max_keepalive: 60,
        ..Default::default()
    });
    let mut c = connect(V5, "a", true);
    c.keep_alive = 600;
    // [MQTT-3.2.2-21]
    assert_eq!(h.connect_with(1, c).properties.server_keep_alive, Some(60));
    let mut c = connect(V3, "b", true);
    c.keep_alive = 600;
    assert_eq!(
        h.connect_with(2, c).code,
        ReasonCode::V3_IDENTIFIER_REJECTED
    );
}

#[test]
fn will_not_sent_after_normal_disconnect_but_sent_with_0x04() {
    let mut h = Harness::new();
    h.connect(9, V3, "watch", true);
    h.subscribe(9, "will/#", QoS::AtLeastOnce);
    let mut c = connect(V5, "polite", true);
    c.will = Some(will("will/polite", None));
    h.connect_with(1, c.clone());
    // [MQTT-3.1.2-10]
    h.send(1, Packet::Disconnect(Disconnect::default()));
    assert!(h.is_closed(1));
    assert!(h.publishes(9).is_empty());
    h.connect_with(2, c);
    h.send(
        2,
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
            ..Default::default()
        }),
    );
    assert_eq!(h.publishes(9).len(), 1);
}

#[test]
fn will_delay_waits_and_reconnect_cancels() {
    // [MQTT-3.1.3-9]
    let mut h = Harness::new();
    h.connect(9, V3, "watch", true);
    h.subscribe(9, "will/#", QoS::AtLeastOnce);
    let mut c = connect(V5, "delayed", false);
    c.properties.session_expiry_interval = Some(100);
    c.will = Some(will("will/delayed", Some(2)));
    h.connect_with(1, c.clone());
    h.broker.connection_lost(h.now, 1);
    h.drain();
    h.advance(Duration::from_millis(1900));
    assert!(h.publishes(9).is_empty());
    h.advance(Duration::from_millis(200));
    assert_eq!(h.publishes(9).len(), 1);

    h.connect_with(2, c.clone());
    h.broker.connection_lost(h.now, 2);
    h.drain();
    h.advance(Duration::from_secs(1));
    h.connect_with(3, c);
    h.advance(Duration::from_secs(5));
    assert!(h.publishes(9).is_empty());
}

#[test]
fn will_published_when_session_ends_before_delay() {
    // [MQTT-3.1.2-8]: the will is sent when the session ends, even before the delay.
    let mut h = Harness::new();
    h.connect(9, V3, "watch", true);
    h.subscribe(9, "will/#", QoS::AtLeastOnce);
    let mut c = connect(V5, "short", true);
    c.will = Some(will("will/short", Some(60)));
    h.connect_with(1, c);
    h.broker.connection_lost(h.now, 1);
    h.drain();
    assert_eq!(h.publishes(9).len(), 1);
}

#[test]
fn takeover_disconnects_old_connection_and_keeps_session() {
    // [MQTT-3.1.4-3]
    let mut h = Harness::new();
    h.connect(1, V5, "dup", false);
    h.subscribe(1, "t", QoS::AtLeastOnce);
    let ack = h.connect(2, V5, "dup", false);
    assert!(ack.session_present);
    assert!(
        matches!(h.take(1).as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::SESSION_TAKEN_OVER)
    );
    assert!(h.is_closed(1));
    h.connect(3, V5, "pub", true);
    h.publish(3, "t", b"x", QoS::AtLeastOnce, false, 1);
    assert_eq!(h.publishes(2).len(), 1);
    // Packets from the old connection are no longer the session's.
    h.send(1, Packet::PingReq);
    assert!(h.take(1).is_empty());
}

#[test]
fn persistent_session_queues_offline_and_resends_inflight_with_dup() {
    // [MQTT-3.2.2-3], [MQTT-4.4.0-1]
    let mut h = Harness::new();
    assert!(!h.connect(1, V3, "p", false).session_present);
    h.subscribe(1, "t", QoS::AtLeastOnce);
    h.connect(2, V3, "pub", true);
    h.publish(2, "t", b"1", QoS::AtLeastOnce, false, 1);
    let first = h.publishes(1);
    assert_eq!(first.len(), 1);
    h.broker.connection_lost(h.now, 1);
    h.drain();
    h.publish(2, "t", b"2", QoS::AtLeastOnce, false, 2);
    h.publish(2, "t", b"3", QoS::AtMostOnce, false, 0);
    let ack = h.connect(3, V3, "p", false);
    assert!(ack.session_present);
    let got = h.publishes(3);
    let payloads: Vec<&[u8]> = got.iter().map(|p| p.payload.as_ref()).collect();
    assert_eq!(payloads, vec![&b"1"[..], &b"2"[..]]);
    assert!(got[0].dup);
    assert_eq!(got[0].packet_id, first[0].packet_id);
    assert!(!got[1].dup);
    // Clean session discards it [MQTT-3.1.2-6].
    h.broker.connection_lost(h.now, 3);
    h.drain();
    assert!(!h.connect(4, V3, "p", true).session_present);
}

#[test]
fn inflight_window_limits_unacknowledged_messages() {
    let mut h = Harness::with_config(BrokerConfig {
        max_inflight: 2,
        ..Default::default()
    });
    h.connect(1, V3, "sub", true);
    h.subscribe(1, "t", QoS::AtLeastOnce);
    h.connect(2, V3, "pub", true);
    for id in 1..=4 {
        h.publish(2, "t", b"x", QoS::AtLeastOnce, false, id);
    }
    let sent = h.publishes(1);
    assert_eq!(sent.len(), 2);
    h.send(
        1,
        Packet::PubAck(ack(sent[0].packet_id.unwrap_or_default())),
    );
    assert_eq!(h.publishes(1).len(), 1);
}

#[test]
fn full_queue_refuses_v5_publisher_with_quota_exceeded() {
    let mut h = Harness::with_config(BrokerConfig {
        max_queued_messages: 2,
        queue_full_policy: QueueFullPolicy::Reject,
        ..Default::default()
    });
    let mut c = connect(V5, "offline", false);
    c.properties.session_expiry_interval = Some(600);
    h.connect_with(1, c);
    h.subscribe(1, "t", QoS::AtLeastOnce);
    h.broker.connection_lost(h.now, 1);
    h.drain();
    h.connect(2, V5, "pub", true);
    for id in 1..=3 {
        h.publish(2, "t", b"x", QoS::AtLeastOnce, false, id);
    }
    let acks: Vec<ReasonCode> = h
        .take(2)
        .into_iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        vec![
            ReasonCode::SUCCESS,
            ReasonCode::SUCCESS,
            ReasonCode::QUOTA_EXCEEDED
        ]
    );
    assert_eq!(h.broker.stats().refused_quota, 1);
    // A 3.1.1 publisher is never acknowledged for a message that was not taken: it is
    // pushed back instead (see the pushback tests below).
    h.connect(3, V3, "pub3", true);
    h.publish(3, "t", b"x", QoS::AtLeastOnce, false, 1);
    assert!(h.take(3).is_empty());
    assert!(!h.is_closed(3));
    assert_eq!(h.paused, vec![3]);
    assert_eq!(h.broker.stats().refused_quota, 1);
}

/// Backpressure (DESIGN 3, "stop reading from the publisher"): a persistent subscriber
/// with a full queue of 2 and a 3.1.1 QoS 1 publisher.
fn pushback_setup(policy: QueueFullPolicy) -> Harness {
    let mut h = Harness::with_config(BrokerConfig {
        max_queued_messages: 2,
        max_inflight: 1,
        queue_full_policy: policy,
        ..Default::default()
    });
    h.connect(1, V3, "slow", false);
    h.subscribe(1, "t/#", QoS::AtLeastOnce);
    h.broker.connection_lost(h.now, 1);
    h.drain();
    h
}

fn acks(packets: &[Packet]) -> Vec<(u16, ReasonCode)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) | Packet::PubRec(a) => Some((a.packet_id, a.reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn full_queue_pushes_back_v3_publisher_and_resumes_in_order() {
    let mut h = pushback_setup(QueueFullPolicy::Reject);
    h.connect(2, V3, "pub", true);
    for (id, payload) in [(1, b"1"), (2, b"2"), (3, b"3"), (4, b"4")] {
        h.publish(2, "t/a", payload, QoS::AtLeastOnce, false, id);
    }
    // Two fit the queue; the third waits unacknowledged, the fourth (and a QoS 0 and a
    // SUBSCRIBE) wait behind it; the connection is paused, not closed.
    h.publish(2, "t/b", b"5", QoS::AtMostOnce, false, 0);
    assert_eq!(
        acks(&h.take(2)),
        vec![(1, ReasonCode::SUCCESS), (2, ReasonCode::SUCCESS)]
    );
    assert_eq!(h.paused, vec![2]);
    assert!(!h.is_closed(2));
    assert_eq!(h.broker.stats().pushback_pauses, 1);
    assert_eq!(h.broker.stats().refused_quota, 0);
    // Acknowledgement-free packets that cannot reorder publishes are answered at once.
    h.send(2, Packet::PingReq);
    assert_eq!(h.take(2), vec![Packet::PingResp]);

    // The subscriber returns: its queue moves into the window, room appears, the held
    // packets are handled in order, and the publisher is resumed once none is left.
    assert!(h.connect(1, V3, "slow", false).session_present);
    let mut got = Vec::new();
    for _ in 0..10 {
        let publishes = h.publishes(1);
        if publishes.is_empty() {
            break;
        }
        for p in publishes {
            got.push(p.payload.clone());
            if let Some(id) = p.packet_id {
                h.send(1, Packet::PubAck(ack(id)));
            }
        }
    }
    // QoS 1 in publish order; the QoS 0 one (routed after 3 and 4, once they were queued)
    // is sent at once rather than queued, as QoS 0 always is.
    let qos1: Vec<&[u8]> = got
        .iter()
        .map(|b| b.as_ref())
        .filter(|b| *b != b"5")
        .collect();
    assert_eq!(qos1, vec![&b"1"[..], b"2", b"3", b"4"]);
    assert_eq!(got.len(), 5);
    assert_eq!(
        acks(&h.take(2)),
        vec![(3, ReasonCode::SUCCESS), (4, ReasonCode::SUCCESS)]
    );
    assert!(h.paused.is_empty(), "resumed");
    assert!(!h.is_closed(2));
}

#[test]
fn pushed_back_qos2_publish_is_received_exactly_once() {
    let mut h = pushback_setup(QueueFullPolicy::Reject);
    h.connect(2, V3, "pub", true);
    for id in 1..=3 {
        h.publish(2, "t/a", b"x", QoS::ExactlyOnce, false, id);
    }
    assert_eq!(acks(&h.take(2)).len(), 2, "PUBREC only for the two taken");
    assert_eq!(h.paused, vec![2]);
    h.connect(1, V3, "slow", false);
    let mut delivered = 0;
    for _ in 0..10 {
        let publishes = h.publishes(1);
        if publishes.is_empty() {
            break;
        }
        for p in publishes {
            delivered += 1;
            h.send(1, Packet::PubAck(ack(p.packet_id.expect("QoS 1"))));
        }
    }
    assert_eq!(delivered, 3);
    assert_eq!(acks(&h.take(2)), vec![(3, ReasonCode::SUCCESS)]);
    // The held one is now a normal inbound QoS 2 message: a resend is not delivered again.
    h.publish(2, "t/a", b"x", QoS::ExactlyOnce, false, 3);
    assert_eq!(acks(&h.take(2)), vec![(3, ReasonCode::SUCCESS)]);
    assert!(h.publishes(1).is_empty());
}

#[test]
fn v5_publisher_is_pushed_back_with_the_pushback_policy() {
    let mut h = pushback_setup(QueueFullPolicy::Pushback);
    h.connect(2, V5, "pub", true);
    for id in 1..=3 {
        h.publish(2, "t/a", b"x", QoS::AtLeastOnce, false, id);
    }
    assert_eq!(
        acks(&h.take(2)),
        vec![(1, ReasonCode::SUCCESS), (2, ReasonCode::SUCCESS)],
        "no 0x97"
    );
    assert_eq!(h.paused, vec![2]);
}

#[test]
fn paused_publisher_outlives_keep_alive_but_not_the_pushback_timeout() {
    let mut h = pushback_setup(QueueFullPolicy::Reject);
    let mut c = connect(V3, "pub", true);
    c.keep_alive = 2;
    h.connect_with(2, c);
    for id in 1..=3 {
        h.publish(2, "t/a", b"x", QoS::AtLeastOnce, false, id);
    }
    h.take(2);
    assert_eq!(h.paused, vec![2]);
    // Silent for longer than 1.5 x keep-alive: the server stopped reading it, so it stays.
    h.advance(Duration::from_secs(4));
    assert!(!h.is_closed(2));
    // A pause is bounded: afterwards it is closed without the acknowledgement.
    h.advance(PUSHBACK_TIMEOUT);
    assert!(h.is_closed(2));
    assert!(acks(&h.take(2)).is_empty());
    assert_eq!(h.broker.stats().pushback_timeouts, 1);
}

#[test]
fn publisher_blocked_by_its_own_queue_is_closed_not_paused() {
    // Pausing it would stop the broker reading the PUBACKs that empty its own queue.
    let mut h = Harness::with_config(BrokerConfig {
        max_queued_messages: 1,
        max_inflight: 1,
        queue_full_policy: QueueFullPolicy::Reject,
        ..Default::default()
    });
    h.connect(1, V3, "self", true);
    h.subscribe(1, "t", QoS::AtLeastOnce);
    for id in 1..=3 {
        h.publish(1, "t", b"x", QoS::AtLeastOnce, false, id);
    }
    assert!(h.paused.is_empty());
    assert!(h.is_closed(1));
}

#[test]
fn lost_paused_publisher_drops_its_held_packets() {
    let mut h = pushback_setup(QueueFullPolicy::Reject);
    h.connect(2, V3, "pub", true);
    for id in 1..=4 {
        h.publish(2, "t/a", b"x", QoS::AtLeastOnce, false, id);
    }
    h.take(2);
    h.broker.connection_lost(h.now, 2);
    h.drain();
    h.connect(1, V3, "slow", false);
    let publishes = h.publishes(1);
    assert_eq!(
        publishes.len(),
        1,
        "window of 1; 2 queued, nothing of the held"
    );
    h.send(
        1,
        Packet::PubAck(ack(publishes[0].packet_id.expect("QoS 1"))),
    );
    assert_eq!(h.publishes(1).len(), 1);
    assert!(h.take(2).is_empty());
}

#[test]
fn no_matching_subscribers_reason() {
    let mut h = Harness::new();
    h.connect(1, V5, "pub", true);
    h.publish(1, "nobody", b"x", QoS::AtLeastOnce, false, 1);
    assert!(
        matches!(h.take(1).as_slice(), [Packet::PubAck(a)] if a.reason == ReasonCode::NO_MATCHING_SUBSCRIBERS)
    );
}

#[test]
fn session_expiry_discards_offline_session() {
    // [MQTT-3.1.2-23]
    let mut h = Harness::new();
    let mut c = connect(V5, "brief", false);
    c.properties.session_expiry_interval = Some(2);
    h.connect_with(1, c.clone());
    h.broker.connection_lost(h.now, 1);
    h.drain();
    h.advance(Duration::from_secs(1));
    assert!(h.connect_with(2, c.clone()).session_present);
    h.broker.connection_lost(h.now, 2);
    h.drain();
    h.advance(Duration::from_secs(3));
    assert!(!h.connect_with(3, c).session_present);
}

#[test]
fn expired_messages_are_not_delivered_and_expiry_counts_down() {
    // [MQTT-3.3.2-5], [MQTT-3.3.2-6]
    let mut h = Harness::new();
    let mut c = connect(V5, "later", false);
    c.properties.session_expiry_interval = Some(600);
    h.connect_with(1, c.clone());
    h.subscribe(1, "t", QoS::AtLeastOnce);
    h.broker.connection_lost(h.now, 1);
    h.drain();
    h.connect(2, V5, "pub", true);
    let mut short = publish("t", b"short", QoS::AtLeastOnce, false, 1);
    short.properties.message_expiry_interval = Some(1);
    let mut long = publish("t", b"long", QoS::AtLeastOnce, false, 2);
    long.properties.message_expiry_interval = Some(10);
    h.send(2, Packet::Publish(short));
    h.send(2, Packet::Publish(long));
    h.advance(Duration::from_secs(3));
    h.connect_with(3, c);
    let got = h.publishes(3);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, "long");
    assert_eq!(got[0].properties.message_expiry_interval, Some(7));
}

#[test]
fn overlapping_subscriptions_give_one_copy_with_all_identifiers() {
    // [MQTT-3.3.4-3] .. [MQTT-3.3.4-5]
    let mut h = Harness::new();
    h.connect(1, V5, "sub", true);
    h.subscribe_with(1, "a/+", options(QoS::AtMostOnce), Some(1));
    h.subscribe_with(1, "a/#", options(QoS::AtLeastOnce), Some(2));
    h.connect(2, V5, "pub", true);
    h.publish(2, "a/b", b"x", QoS::ExactlyOnce, false, 1);
    let got = h.publishes(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    let mut ids = got[0].properties.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);
}

#[test]
fn no_local_skips_own_messages() {
    // [MQTT-3.8.3-3]
    let mut h = Harness::new();
    h.connect(1, V5, "me", true);
    let no_local = SubscriptionOptions {
        no_local: true,
        ..options(QoS::AtMostOnce)
    };
    h.subscribe_with(1, "t", no_local, None);
    h.publish(1, "t", b"x", QoS::AtMostOnce, false, 0);
    assert!(h.publishes(1).is_empty());
}

#[test]
fn shared_subscription_delivers_each_message_to_one_member() {
    // [MQTT-4.8.2-2]
    let mut h = Harness::new();
    h.connect(1, V3, "m1", true);
    h.connect(2, V5, "m2", true);
    h.subscribe(1, "$share/g/t", QoS::AtLeastOnce);
    h.subscribe(2, "$share/g/t", QoS::AtLeastOnce);
    h.connect(3, V5, "pub", true);
    for id in 1..=10 {
        h.publish(3, "t", b"x", QoS::AtMostOnce, false, id);
    }
    let (a, b) = (h.publishes(1).len(), h.publishes(2).len());
    assert_eq!(a + b, 10);
    assert_eq!((a, b), (5, 5));
}

#[test]
fn shared_subscription_with_no_local_is_a_protocol_error() {
    // [MQTT-3.8.3-4]
    let mut h = Harness::new();
    h.connect(1, V5, "m1", true);
    h.send(
        1,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: "$share/g/t".into(),
                options: SubscriptionOptions {
                    no_local: true,
                    ..Default::default()
                },
            }],
            properties: Properties::default(),
        }),
    );
    assert!(h.is_closed(1));
}

#[test]
fn topic_aliases_inbound_and_outbound() {
    // [MQTT-3.3.2-12]
    let mut h = Harness::new();
    let mut c = connect(V5, "sub", true);
    c.properties.topic_alias_maximum = Some(5);
    h.connect_with(1, c);
    h.subscribe(1, "long/topic", QoS::AtMostOnce);
    h.connect(2, V5, "pub", true);
    let mut first = publish("long/topic", b"1", QoS::AtMostOnce, false, 0);
    first.properties.topic_alias = Some(3);
    h.send(2, Packet::Publish(first));
    let mut second = publish("", b"2", QoS::AtMostOnce, false, 0);
    second.properties.topic_alias = Some(3);
    h.send(2, Packet::Publish(second));
    let got = h.publishes(1);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].topic, "long/topic");
    assert_eq!(got[0].properties.topic_alias, Some(1));
    assert_eq!(got[1].topic, "");
    assert_eq!(got[1].properties.topic_alias, Some(1));
    // [MQTT-3.3.2-9]: an alias above Topic Alias Maximum ends the connection with 0x94.
    let mut bad = publish("x", b"3", QoS::AtMostOnce, false, 0);
    bad.properties.topic_alias = Some(1000);
    h.send(2, Packet::Publish(bad));
    assert!(
        matches!(h.take(2).as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::TOPIC_ALIAS_INVALID)
    );
    assert!(h.is_closed(2));
}

#[test]
fn message_larger_than_client_maximum_is_not_sent() {
    // [MQTT-3.1.2-25]
    let mut h = Harness::new();
    let mut c = connect(V5, "small", true);
    c.properties.maximum_packet_size = Some(64);
    h.connect_with(1, c);
    h.subscribe(1, "t", QoS::AtLeastOnce);
    h.connect(2, V5, "pub", true);
    h.send(
        2,
        Packet::Publish(publish("t", &[b'x'; 100], QoS::AtLeastOnce, false, 1)),
    );
    h.publish(2, "t", b"fits", QoS::AtLeastOnce, false, 2);
    let got = h.publishes(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, "fits");
}

#[test]
fn authentication_method_without_configured_auth_is_refused() {
    // [MQTT-4.12.0-1]
    let mut h = Harness::new();
    let mut c = connect(V5, "auth", true);
    c.properties.authentication_method = Some("SCRAM-SHA-256".into());
    assert_eq!(
        h.connect_with(1, c).code,
        ReasonCode::BAD_AUTHENTICATION_METHOD
    );
    assert!(h.is_closed(1));
}

#[test]
fn unsubscribe_reports_per_filter() {
    let mut h = Harness::new();
    h.connect(1, V5, "u", true);
    h.subscribe(1, "a", QoS::AtMostOnce);
    h.send(
        1,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 4,
            filters: vec!["a".into(), "b".into()],
            properties: Properties::default(),
        }),
    );
    match h.take(1).as_slice() {
        [Packet::UnsubAck(ack)] => {
            assert_eq!(ack.packet_id, 4);
            assert_eq!(
                ack.reasons,
                vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    assert_eq!(h.broker.stats().subscriptions, 0);
}

#[test]
fn shutdown_tells_v5_clients_server_shutting_down() {
    let mut h = Harness::new();
    h.connect(1, V5, "five", true);
    h.connect(2, V3, "three", true);
    h.broker.shutdown(h.now);
    h.drain();
    assert!(
        matches!(h.take(1).as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::SERVER_SHUTTING_DOWN)
    );
    assert!(h.take(2).is_empty());
    assert!(h.is_closed(1) && h.is_closed(2));
}

#[test]
fn every_retained_message_reaches_a_wildcard_subscriber_beyond_the_queue_limit() {
    // [MQTT-3.3.1-6]: all matching retained messages are sent on subscribe.
    let mut h = Harness::with_config(BrokerConfig {
        max_queued_messages: 3,
        max_inflight: 2,
        ..Default::default()
    });
    h.connect(1, V3, "pub", true);
    let topics: Vec<String> = (0..10).map(|i| format!("r/{i}")).collect();
    for topic in &topics {
        h.send(
            1,
            Packet::Publish(publish(topic, b"x", QoS::AtLeastOnce, true, 1)),
        );
    }
    h.connect(2, V3, "sub", true);
    let mut batch: Vec<Publish> = h
        .subscribe_with(2, "r/#", options(QoS::AtLeastOnce), None)
        .into_iter()
        .filter_map(|packet| match packet {
            Packet::Publish(publish) => Some(publish),
            _ => None,
        })
        .collect();
    let mut received = Vec::new();
    while !batch.is_empty() {
        assert!(batch.len() <= 2, "in-flight window exceeded");
        for publish in &batch {
            assert!(publish.retain);
            received.push(publish.topic.clone());
            h.send(
                2,
                Packet::PubAck(ack(publish.packet_id.unwrap_or_default())),
            );
        }
        batch = h.publishes(2);
    }
    received.sort();
    let mut expected = topics.clone();
    expected.sort();
    assert_eq!(received, expected);
    assert_eq!(h.broker.stats().dropped_queue_full, 0);
}

/// `n` retained messages `t/0000`.. published by connection 1 at QoS 1.
fn retained_topics(h: &mut Harness, n: usize) -> Vec<String> {
    h.connect(1, V5, "pub", true);
    let topics: Vec<String> = (0..n).map(|i| format!("t/{i:04}")).collect();
    for topic in &topics {
        h.publish(1, topic, b"x", QoS::AtLeastOnce, true, 1);
    }
    h.take(1);
    topics
}

#[test]
fn retained_stream_at_qos0_is_paced_by_write_notifications() {
    // [MQTT-3.3.1-6]: every matching retained message, with RETAIN=1 [MQTT-3.3.1-8], a page
    // per write notification instead of all at once.
    let mut h = Harness::new();
    let topics = retained_topics(&mut h, 600);
    h.hold_writes = true;
    h.connect(2, V3, "sub", true);
    let mut first = Some(h.subscribe_with(2, "#", options(QoS::AtMostOnce), None));
    let mut pages = Vec::new();
    let mut received = Vec::new();
    loop {
        let page: Vec<Publish> = match first.take() {
            Some(packets) => packets
                .into_iter()
                .filter_map(|packet| match packet {
                    Packet::Publish(p) => Some(p),
                    _ => None,
                })
                .collect(),
            None => h.publishes(2),
        };
        assert!(page.iter().all(|p| p.retain && p.qos == QoS::AtMostOnce));
        pages.push(page.len());
        received.extend(page.into_iter().map(|p| p.topic));
        if h.answer_written() == 0 {
            break;
        }
    }
    assert_eq!(pages, [256, 256, 88]);
    assert_eq!(received, topics, "each once, in topic order");
    assert!(
        h.written.is_empty(),
        "no notification once the stream ended"
    );
}

#[test]
fn retained_stream_at_qos1_goes_through_the_window_and_survives_a_disconnect() {
    let mut h = Harness::with_config(BrokerConfig {
        max_inflight: 4,
        max_queued_messages: 1,
        ..Default::default()
    });
    let topics = retained_topics(&mut h, 700);
    let mut subscribe = connect(V5, "sub", false);
    subscribe.properties.session_expiry_interval = Some(600);
    h.connect_with(2, subscribe.clone());
    let mut batch = h.subscribe_with(2, "t/#", options(QoS::AtLeastOnce), Some(9));
    let mut received = Vec::new();
    let mut conn = 2;
    while !batch.is_empty() {
        let publishes: Vec<Publish> = batch
            .into_iter()
            .filter_map(|packet| match packet {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .collect();
        assert!(publishes.len() <= 4, "in-flight window exceeded");
        for p in &publishes {
            assert!(p.retain);
            assert_eq!(p.properties.subscription_identifiers, [9]);
            if !p.dup {
                received.push(p.topic.clone());
            }
        }
        if received.len() == 300 && conn == 2 {
            // Gone mid-stream without acknowledging: the stream waits for the session's
            // next connection, which gets the unacknowledged ones again with DUP=1.
            h.broker.connection_lost(h.now, 2);
            h.drain();
            conn = 3;
            h.connect_with(3, subscribe.clone());
            batch = h.take(3);
            continue;
        }
        for p in &publishes {
            h.broker
                .handle_packet(h.now, conn, Packet::PubAck(ack(p.packet_id.unwrap_or(0))));
        }
        h.drain();
        batch = h.take(conn);
    }
    assert_eq!(received, topics, "each once, in topic order");
}

#[test]
fn resubscribe_restarts_and_unsubscribe_stops_a_retained_stream() {
    let mut h = Harness::new();
    let topics = retained_topics(&mut h, 600);
    h.hold_writes = true;
    h.connect(2, V5, "sub", true);
    let first = h.subscribe_with(2, "t/#", options(QoS::AtMostOnce), None);
    assert_eq!(first.len(), 256);
    // [MQTT-3.8.4-3]: a repeated SUBSCRIBE re-sends the retained messages from the start.
    let again = h.subscribe_with(2, "t/#", options(QoS::AtMostOnce), None);
    let first = match again.first() {
        Some(Packet::Publish(p)) => p.topic.clone(),
        other => panic!("expected the stream to restart, got {other:?}"),
    };
    assert_eq!(first, topics[0]);
    assert_eq!(again.len(), 256);
    h.send(
        2,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            filters: vec!["t/#".into()],
            properties: Properties::default(),
        }),
    );
    h.take(2);
    h.answer_written();
    assert!(
        h.publishes(2).is_empty(),
        "the stream stopped with its subscription"
    );
}

#[test]
fn retained_messages_expired_or_cleared_mid_stream_are_not_sent() {
    let mut h = Harness::new();
    let mut topics = retained_topics(&mut h, 600);
    // [MQTT-3.3.2-5]: t/0300..t/0309 expire after 10 s.
    for i in 300..310 {
        let mut p = publish(&format!("t/{i:04}"), b"short", QoS::AtMostOnce, true, 0);
        p.properties.message_expiry_interval = Some(10);
        h.send(1, Packet::Publish(p));
    }
    h.hold_writes = true;
    h.connect(2, V5, "sub", true);
    let mut received: Vec<String> = h
        .subscribe_with(2, "t/#", options(QoS::AtMostOnce), None)
        .into_iter()
        .filter_map(|packet| match packet {
            Packet::Publish(p) => Some(p.topic),
            _ => None,
        })
        .collect();
    assert_eq!(received.len(), 256);
    h.advance(Duration::from_secs(20));
    // [MQTT-3.3.1-10]: cleared while the stream runs.
    h.publish(1, "t/0400", b"", QoS::AtMostOnce, true, 0);
    loop {
        // The clearing publish itself is delivered live, with RETAIN=0.
        let publishes = h.publishes(2).into_iter().filter(|p| p.retain);
        received.extend(publishes.map(|p| p.topic));
        if h.answer_written() == 0 {
            break;
        }
    }
    topics.retain(|t| !(("t/0300".."t/0310").contains(&t.as_str()) || t == "t/0400"));
    assert_eq!(received, topics);
    assert_eq!(
        h.broker.stats().retained_messages,
        589,
        "expired ones removed when met"
    );
}

/// Issue 14: a stuck QoS 1 subscriber (connected, never acknowledging, window 1, queue 2),
/// a healthy one, and an MQTT 5 publisher sending `count` QoS 1 messages on `t/{n}`.
/// Returns the publisher's acknowledgement codes and the topics the healthy one received.
fn flood_with_stuck_subscriber(
    policy: QueueFullPolicy,
    count: u16,
) -> (Harness, Vec<ReasonCode>, Vec<String>) {
    let mut h = Harness::with_config(BrokerConfig {
        max_queued_messages: 2,
        max_inflight: 1,
        queue_full_policy: policy,
        ..Default::default()
    });
    let mut stuck = connect(V5, "stuck", false);
    stuck.properties.session_expiry_interval = Some(600);
    h.connect_with(1, stuck);
    h.subscribe(1, "t/#", QoS::AtLeastOnce);
    h.connect(2, V5, "healthy", true);
    h.subscribe(2, "t/#", QoS::AtLeastOnce);
    h.connect(3, V5, "pub", true);
    let mut codes = Vec::new();
    let mut healthy = Vec::new();
    for id in 1..=count {
        h.publish(3, &format!("t/{id}"), b"x", QoS::AtLeastOnce, false, id);
        codes.extend(acks(&h.take(3)).into_iter().map(|(_, code)| code));
        for delivery in h.publishes(2) {
            let packet_id = delivery.packet_id.expect("QoS 1");
            healthy.push(delivery.topic);
            h.send(2, Packet::PubAck(ack(packet_id)));
        }
    }
    (h, codes, healthy)
}

#[test]
fn slow_subscriber_drops_its_oldest_and_the_others_flow_by_default() {
    assert_eq!(QueueFullPolicy::default(), QueueFullPolicy::DropOldest);
    let (mut h, codes, healthy) = flood_with_stuck_subscriber(QueueFullPolicy::default(), 50);
    assert_eq!(
        codes,
        vec![ReasonCode::SUCCESS; 50],
        "the publisher is never refused"
    );
    assert_eq!(healthy.len(), 50, "the healthy subscriber gets everything");
    // 1 in flight + 2 queued held for the stuck one: 47 oldest dropped, counted.
    let stats = h.broker.stats();
    assert_eq!(stats.dropped_oldest, 47);
    assert_eq!((stats.refused_quota, stats.pushback_pauses), (0, 0));
    let report = h.broker.take_drop_report();
    assert_eq!(
        report.clients,
        vec![("stuck".to_string(), halyard_core::DropReason::Oldest, 47)]
    );
    assert!(h.broker.take_drop_report().is_empty(), "reported once");
    let page = h.broker.admin_clients(0, 10);
    let stuck = page
        .items
        .iter()
        .find(|c| c.client_id == "stuck")
        .expect("listed");
    assert_eq!((stuck.dropped, stuck.queued), (47, 2));
    // What it gets when it catches up is the newest: t/1 was in flight, then t/49, t/50.
    let first = h.publishes(1);
    assert_eq!(first.len(), 1);
    h.send(1, Packet::PubAck(ack(first[0].packet_id.expect("QoS 1"))));
    let next = h.publishes(1);
    assert_eq!(next[0].topic, "t/49");
}

#[test]
fn slow_subscriber_drops_the_new_message_under_drop_new() {
    let (mut h, codes, healthy) = flood_with_stuck_subscriber(QueueFullPolicy::DropNew, 20);
    assert_eq!(codes, vec![ReasonCode::SUCCESS; 20]);
    assert_eq!(healthy.len(), 20);
    assert_eq!(h.broker.stats().dropped_queue_full, 17);
    let first = h.publishes(1);
    h.send(1, Packet::PubAck(ack(first[0].packet_id.expect("QoS 1"))));
    assert_eq!(h.publishes(1)[0].topic, "t/2", "the queue kept the oldest");
}

#[test]
fn slow_subscriber_is_disconnected_with_quota_exceeded_and_keeps_its_queue() {
    let (mut h, codes, healthy) = flood_with_stuck_subscriber(QueueFullPolicy::Disconnect, 20);
    assert_eq!(codes, vec![ReasonCode::SUCCESS; 20]);
    assert_eq!(healthy.len(), 20);
    assert!(h.is_closed(1));
    let to_stuck = h.take(1);
    assert!(
        to_stuck
            .iter()
            .any(|p| matches!(p, Packet::Disconnect(d) if d.reason == ReasonCode::QUOTA_EXCEEDED)),
        "MQTT 5 DISCONNECT 0x97: {to_stuck:?}"
    );
    assert_eq!(h.broker.stats().dropped_slow_disconnect, 1);
    assert!(
        h.broker.stats().dropped_queue_full > 0,
        "later ones dropped while away"
    );
    // Its persistent session kept the in-flight message and the queue.
    let mut back = connect(V5, "stuck", false);
    back.properties.session_expiry_interval = Some(600);
    assert!(h.connect_with(4, back).session_present);
    let resent = h.publishes(4);
    assert_eq!(resent[0].topic, "t/1");
    assert!(resent[0].dup);
}

#[test]
fn offline_wildcard_logger_with_a_full_queue_stalls_nobody() {
    // The worst case of issue 14: a persistent `#` subscriber goes offline and fills up.
    let mut h = Harness::with_config(BrokerConfig {
        max_queued_messages: 5,
        ..Default::default()
    });
    h.connect(1, V3, "logger", false);
    h.subscribe(1, "#", QoS::AtLeastOnce);
    h.broker.connection_lost(h.now, 1);
    h.drain();
    h.connect(2, V3, "unrelated", true);
    h.subscribe(2, "alerts", QoS::AtLeastOnce);
    h.connect(3, V3, "pub", true);
    for id in 1..=21 {
        h.publish(3, "alerts", b"a", QoS::AtLeastOnce, false, id);
    }
    assert_eq!(
        acks(&h.take(3)).len(),
        21,
        "3.1.1 publisher acknowledged, not paused"
    );
    assert!(h.paused.is_empty());
    assert_eq!(
        h.publishes(2).len(),
        21,
        "21 of 21 to the unrelated subscriber"
    );
    assert_eq!(h.broker.stats().dropped_oldest, 16);
}

#[test]
fn share_group_skips_a_member_whose_queue_is_full() {
    let mut h = Harness::with_config(BrokerConfig {
        max_queued_messages: 1,
        max_inflight: 1,
        ..Default::default()
    });
    h.connect(1, V5, "stuck-worker", true);
    h.subscribe(1, "$share/g/jobs", QoS::AtLeastOnce);
    h.connect(2, V5, "worker", true);
    h.subscribe(2, "$share/g/jobs", QoS::AtLeastOnce);
    h.connect(3, V5, "pub", true);
    let mut to_worker = 0;
    for id in 1..=10 {
        h.publish(3, "jobs", b"j", QoS::AtLeastOnce, false, id);
        for delivery in h.publishes(2) {
            to_worker += 1;
            h.send(2, Packet::PubAck(ack(delivery.packet_id.expect("QoS 1"))));
        }
    }
    // The stuck member takes one in flight and one queued, then is passed over.
    assert_eq!(h.publishes(1).len(), 1);
    assert_eq!(to_worker, 8);
    let stats = h.broker.stats();
    assert_eq!((stats.dropped_oldest, stats.dropped_queue_full), (0, 0));
}

#[test]
fn queue_is_bounded_in_bytes_too() {
    let mut h = Harness::with_config(BrokerConfig {
        max_queued_messages: 1000,
        max_queued_bytes: 100,
        queue_full_policy: QueueFullPolicy::DropNew,
        ..Default::default()
    });
    h.connect(1, V3, "offline", false);
    h.subscribe(1, "t", QoS::AtLeastOnce);
    h.broker.connection_lost(h.now, 1);
    h.drain();
    h.connect(2, V3, "pub", true);
    // Each message is 1 (topic) + 20 (payload) = 21 bytes: four fit in 100.
    for id in 1..=10 {
        h.publish(2, "t", b"01234567890123456789", QoS::AtLeastOnce, false, id);
    }
    assert_eq!(h.broker.stats().dropped_queue_full, 6);
    let page = h.broker.admin_clients(0, 10);
    assert_eq!(page.items[0].queued, 4);
}

/// Issue 14: a client reconnecting in a loop with keep-alive 65535 and a session expiry
/// leaves the broker's deadlines as they were after its first round: one slot per
/// connection and session, not one entry per CONNECT until its deadline.
#[test]
fn reconnect_loop_leaves_the_timer_state_bounded() {
    let mut h = Harness::new();
    let round = |h: &mut Harness, conn: ConnectionId| {
        let mut c = connect(V5, "looper", false);
        c.keep_alive = 65535;
        c.properties.session_expiry_interval = Some(86_400);
        h.connect_with(conn, c);
        h.broker.connection_lost(h.now, conn);
        h.drain();
    };
    round(&mut h, 1);
    let after_one = h.broker.timer_count();
    assert_eq!(after_one, 1, "the offline session's expiry");
    for conn in 2..=100_001 {
        round(&mut h, conn);
    }
    assert_eq!(h.broker.timer_count(), after_one);
}

/// Issue 14: the memory sessions hold in queues and in flight is counted broker-wide (the
/// server's memory budget compares it): each message's footprint, far more than its topic
/// and payload, while it is held, and the queues' buffers while the session lives. The count
/// goes back down however the messages leave, acknowledged or dropped with their session.
#[test]
fn held_memory_is_counted_and_returns_to_zero() {
    let mut h = Harness::new();
    assert_eq!(h.broker.held_bytes(), 0);
    h.connect(1, V3, "sub", true);
    h.subscribe(1, "t", QoS::AtLeastOnce);
    h.connect(2, V3, "pub", true);
    for id in 1..=50 {
        h.publish(2, "t", b"0123456789", QoS::AtLeastOnce, false, id);
    }
    let held = h.broker.held_bytes();
    assert!(
        held >= 50 * 200,
        "bookkeeping counted, not only topic and payload: {held}"
    );
    loop {
        let delivered = h.publishes(1);
        if delivered.is_empty() {
            break;
        }
        for publish in delivered {
            let packet_id = publish.packet_id.expect("QoS 1 has an id");
            h.send(
                1,
                Packet::PubAck(PubResponse {
                    packet_id,
                    ..Default::default()
                }),
            );
        }
    }
    let buffers = h.broker.held_bytes();
    assert!(
        buffers > 0 && buffers < held / 2,
        "everything acknowledged, the queues' buffers are left: {buffers} of {held}"
    );
    for id in 1..=50 {
        h.publish(2, "t", b"0123456789", QoS::AtLeastOnce, false, id);
    }
    assert_eq!(h.broker.held_bytes(), held);
    // The clean subscriber leaves: its session ends with what it held.
    h.broker.connection_lost(h.now, 1);
    h.drain();
    assert_eq!(h.broker.held_bytes(), 0, "dropped with the session");
}

#[test]
fn a_congested_connection_loses_only_its_own_qos0_counted_until_its_writer_catches_up() {
    let mut h = Harness::new();
    h.connect(1, V5, "stalled", true);
    h.subscribe(1, "t", QoS::AtLeastOnce);
    h.connect(2, V5, "healthy", true);
    h.subscribe(2, "t", QoS::AtMostOnce);
    h.connect(3, V5, "pub", true);
    // The server found connection 1's writer full.
    h.broker.handle_congested(1);
    for _ in 0..3 {
        h.publish(3, "t", b"q0", QoS::AtMostOnce, false, 0);
    }
    h.publish(3, "t", b"q1", QoS::AtLeastOnce, false, 7);
    assert_eq!(
        h.publishes(2).len(),
        4,
        "the healthy subscriber gets everything"
    );
    let stalled = h.publishes(1);
    assert_eq!(
        stalled.iter().map(|p| p.qos).collect::<Vec<_>>(),
        vec![QoS::AtLeastOnce],
        "no QoS 0 packet is built for a congested writer; QoS 1 still is"
    );
    assert_eq!(h.broker.stats().dropped_slow_consumer, 3);
    let report = h.broker.take_drop_report();
    assert_eq!(
        report.clients,
        vec![(
            "stalled".to_string(),
            halyard_core::DropReason::SlowConsumer,
            3
        )]
    );
    let page = h.broker.admin_clients(0, 10);
    let listed = page.items.iter().find(|c| c.client_id == "stalled");
    assert_eq!(listed.map(|c| c.dropped), Some(3), "counted per client");
    // The writer took the notice queued with the first drop: QoS 0 flows again.
    h.broker.handle_written(h.now, 1);
    h.publish(3, "t", b"q0", QoS::AtMostOnce, false, 0);
    assert_eq!(h.publishes(1).len(), 1);
    assert_eq!(h.broker.stats().dropped_slow_consumer, 3);
}
