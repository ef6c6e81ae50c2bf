//! Authorization rules of the broker core (SUBSCRIBE, PUBLISH, delivery, retained, will),
//! driven with a fake clock and no sockets, using Mosquitto-syntax ACLs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use halyard_codec::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions, Will,
};
use halyard_core::{Acl, Broker, BrokerConfig, ConnectionId, Output};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

struct Harness {
    broker: Broker,
    now: Instant,
    inbox: HashMap<ConnectionId, Vec<Packet>>,
    closed: Vec<ConnectionId>,
}

impl Harness {
    fn with_acl(text: &str) -> Harness {
        let mut broker = Broker::new(BrokerConfig::default());
        broker.set_authorizer(Arc::new(Acl::parse(text).expect("valid ACL")));
        Harness {
            broker,
            now: Instant::now(),
            inbox: HashMap::new(),
            closed: Vec::new(),
        }
    }

    fn send(&mut self, conn: ConnectionId, packet: Packet) -> Vec<Packet> {
        self.broker.handle_packet(self.now, conn, packet);
        while let Some(output) = self.broker.poll_output() {
            match output {
                Output::Send { conn, packet } => self.inbox.entry(conn).or_default().push(packet),
                Output::Close { conn } => self.closed.push(conn),
                Output::Pause { .. } | Output::Resume { .. } | Output::NotifyWritten { .. } => {}
                other => panic!("a single node emits no cluster output: {other:?}"),
            }
        }
        self.inbox.remove(&conn).unwrap_or_default()
    }

    fn take(&mut self, conn: ConnectionId) -> Vec<Packet> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    fn connect(
        &mut self,
        conn: ConnectionId,
        version: ProtocolVersion,
        id: &str,
        user: Option<&str>,
    ) -> ReasonCode {
        self.connect_with(conn, connect(version, id, user))
    }

    fn connect_with(&mut self, conn: ConnectionId, connect: Connect) -> ReasonCode {
        match self.send(conn, Packet::Connect(Box::new(connect))).first() {
            Some(Packet::ConnAck(ack)) => ack.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn subscribe(&mut self, conn: ConnectionId, filter: &str) -> (ReasonCode, Vec<Packet>) {
        let packets = self.send(
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: filter.to_owned(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                }],
                properties: Properties::default(),
            }),
        );
        match packets.split_first() {
            Some((Packet::SubAck(ack), rest)) => (ack.reasons[0], rest.to_vec()),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    fn publish(&mut self, conn: ConnectionId, topic: &str, qos: QoS, retain: bool) -> Vec<Packet> {
        self.send(
            conn,
            Packet::Publish(Publish {
                qos,
                retain,
                topic: topic.to_owned(),
                packet_id: (qos != QoS::AtMostOnce).then_some(7),
                payload: Bytes::from_static(b"x"),
                ..Publish::default()
            }),
        )
    }
}

fn connect(version: ProtocolVersion, id: &str, user: Option<&str>) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 0,
        client_id: id.to_owned(),
        will: None,
        username: user.map(str::to_owned),
        password: None,
        properties: Properties::default(),
    }
}

fn topics(packets: &[Packet]) -> Vec<String> {
    packets
        .iter()
        .filter_map(|packet| match packet {
            Packet::Publish(publish) => Some(publish.topic.clone()),
            _ => None,
        })
        .collect()
}

const PAHO: &str = "topic readwrite #\ntopic deny test/nosubscribe\n";

#[test]
fn paho_subscribe_failure_is_0x80_for_v3_and_0x87_for_v5() {
    let mut h = Harness::with_acl(PAHO);
    assert_eq!(h.connect(1, V3, "v3", None), ReasonCode::SUCCESS);
    assert_eq!(h.subscribe(1, "test/nosubscribe").0, ReasonCode(0x80));
    assert_eq!(h.subscribe(1, "test/ok").0, ReasonCode::GRANTED_QOS_1);
    assert_eq!(h.connect(2, V5, "v5", None), ReasonCode::SUCCESS);
    assert_eq!(h.subscribe(2, "test/nosubscribe").0, ReasonCode(0x87));
    assert_eq!(h.broker.stats().denied_subscribe, 2);
    assert_eq!(
        h.broker.stats().subscriptions,
        1,
        "refused filters are not stored"
    );
}

#[test]
fn denied_publish_v5_gets_0x87_and_v3_is_acknowledged_and_dropped() {
    let mut h = Harness::with_acl("topic read #\ntopic write allowed/#\n");
    h.connect(1, V5, "sub", None);
    h.subscribe(1, "#");
    h.connect(2, V5, "pub5", None);
    h.connect(3, V3, "pub3", None);

    let acks = h.publish(2, "secret", QoS::AtLeastOnce, false);
    assert!(
        matches!(&acks[..], [Packet::PubAck(ack)] if ack.reason == ReasonCode::NOT_AUTHORIZED),
        "{acks:?}"
    );
    let recs = h.publish(2, "secret", QoS::ExactlyOnce, false);
    assert!(
        matches!(&recs[..], [Packet::PubRec(rec)] if rec.reason == ReasonCode::NOT_AUTHORIZED),
        "{recs:?}"
    );
    // [MQTT-3.3.5-2]: a 3.1.1 server may acknowledge and discard.
    let acks = h.publish(3, "secret", QoS::AtLeastOnce, false);
    assert!(
        matches!(&acks[..], [Packet::PubAck(ack)] if ack.reason == ReasonCode::SUCCESS),
        "{acks:?}"
    );
    h.publish(3, "secret", QoS::AtMostOnce, false);
    assert!(
        topics(&h.take(1)).is_empty(),
        "nothing denied was delivered"
    );
    assert_eq!(h.broker.stats().denied_publish, 4);
    assert!(!h.closed.contains(&3), "the 3.x publisher stays connected");

    h.publish(3, "allowed/x", QoS::AtMostOnce, false);
    assert_eq!(topics(&h.take(1)), ["allowed/x"]);
}

#[test]
fn delivery_and_retained_skip_topics_the_subscriber_may_not_read() {
    let acl = "topic readwrite #\ntopic deny private/#\nuser boss\ntopic readwrite #\n";
    let mut h = Harness::with_acl(acl);
    h.connect(1, V3, "boss", Some("boss"));
    h.publish(1, "private/plan", QoS::AtMostOnce, true);
    h.publish(1, "public/news", QoS::AtMostOnce, true);

    h.connect(2, V3, "anon", None);
    let (code, retained) = h.subscribe(2, "#");
    assert_eq!(code, ReasonCode::GRANTED_QOS_1);
    assert_eq!(topics(&retained), ["public/news"], "retained filtered too");
    let (_, retained) = h.subscribe(1, "#");
    let mut seen = topics(&retained);
    seen.sort();
    assert_eq!(seen, ["private/plan", "public/news"]);

    // The publisher's own copies come back in the replies to its publishes.
    let mut own = h.publish(1, "private/plan", QoS::AtMostOnce, false);
    own.extend(h.publish(1, "public/news", QoS::AtMostOnce, false));
    assert_eq!(topics(&h.take(2)), ["public/news"]);
    assert_eq!(topics(&own), ["private/plan", "public/news"]);
    assert!(h.broker.stats().denied_delivery >= 2);
}

#[test]
fn user_sections_and_patterns_use_the_connect_user_name() {
    let acl = "pattern readwrite devices/%c/#\nuser alice\ntopic read alerts/#\n";
    let mut h = Harness::with_acl(acl);
    h.connect(1, V5, "dev1", Some("alice"));
    assert_eq!(h.subscribe(1, "alerts/#").0, ReasonCode::GRANTED_QOS_1);
    assert_eq!(
        h.subscribe(1, "devices/dev1/#").0,
        ReasonCode::GRANTED_QOS_1
    );
    assert_eq!(
        h.subscribe(1, "devices/dev2/#").0,
        ReasonCode::NOT_AUTHORIZED
    );
    h.connect(2, V5, "dev2", None);
    assert_eq!(h.subscribe(2, "alerts/#").0, ReasonCode::NOT_AUTHORIZED);
}

#[test]
fn will_to_a_forbidden_topic_is_refused_at_connect() {
    let mut h = Harness::with_acl("topic readwrite ok/#\n");
    for (conn, version, expected) in [
        (1, V3, ReasonCode::V3_NOT_AUTHORIZED),
        (2, V5, ReasonCode::NOT_AUTHORIZED),
    ] {
        let mut c = connect(version, "w", None);
        c.will = Some(Will {
            topic: "forbidden".to_owned(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        assert_eq!(h.connect_with(conn, c), expected);
        assert!(h.closed.contains(&conn));
    }
}

#[test]
fn sys_publishes_need_an_explicit_grant() {
    // Open broker (no ACL): `$SYS/` is still the broker's own.
    let mut h = Harness {
        broker: Broker::new(BrokerConfig::default()),
        now: Instant::now(),
        inbox: HashMap::new(),
        closed: Vec::new(),
    };
    h.connect(1, V5, "sub", None);
    h.subscribe(1, "$SYS/#");
    h.connect(2, V5, "pub5", None);
    h.connect(3, V3, "pub3", None);
    let acks = h.publish(2, "$SYS/broker/version", QoS::AtLeastOnce, true);
    assert!(
        matches!(&acks[..], [Packet::PubAck(ack)] if ack.reason == ReasonCode::NOT_AUTHORIZED),
        "{acks:?}"
    );
    let acks = h.publish(3, "$SYS/broker/custom/x", QoS::AtLeastOnce, true);
    assert!(
        matches!(&acks[..], [Packet::PubAck(ack)] if ack.reason == ReasonCode::SUCCESS),
        "3.x is acknowledged and dropped: {acks:?}"
    );
    assert!(topics(&h.take(1)).is_empty(), "nothing reached $SYS");
    let (_, retained) = h.subscribe(1, "$SYS/#");
    assert!(
        topics(&retained).is_empty(),
        "nothing retained: {retained:?}"
    );
    assert_eq!(h.broker.stats().denied_sys_publish, 2);
    assert_eq!(h.broker.stats().denied_publish, 2);

    // A will to `$SYS/` is a client publish too.
    let mut with_will = connect(V5, "will", None);
    with_will.will = Some(Will {
        topic: "$SYS/broker/clients/connected".to_owned(),
        payload: Bytes::from_static(b"999999"),
        qos: QoS::AtMostOnce,
        retain: true,
        properties: Properties::default(),
    });
    assert_eq!(h.connect_with(4, with_will), ReasonCode::NOT_AUTHORIZED);

    // A rule naming the `$SYS` topic grants it; `#` does not [MQTT-4.7.2-1].
    let mut h = Harness::with_acl(
        "topic readwrite #\ntopic write $SYS/broker/custom/#\ntopic read $SYS/#\n",
    );
    h.connect(1, V5, "sub", None);
    h.subscribe(1, "$SYS/broker/#");
    h.connect(2, V5, "pub", None);
    let acks = h.publish(2, "$SYS/broker/version", QoS::AtLeastOnce, false);
    assert!(
        matches!(&acks[..], [Packet::PubAck(ack)] if ack.reason == ReasonCode::NOT_AUTHORIZED),
        "{acks:?}"
    );
    h.publish(2, "$SYS/broker/custom/x", QoS::AtMostOnce, false);
    assert_eq!(topics(&h.take(1)), ["$SYS/broker/custom/x"]);
}
