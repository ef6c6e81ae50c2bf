//! Per-client limits of the broker core with a fake clock: publish rate (DISCONNECT 0x96)
//! and subscriptions per client (SUBACK 0x97 / 0x80).

use std::time::{Duration, Instant};

use bytes::Bytes;
use halyard_codec::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions,
};
use halyard_core::{Broker, BrokerConfig, ConnectionId, Output};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

struct Harness {
    broker: Broker,
    now: Instant,
}

impl Harness {
    fn new(config: BrokerConfig) -> Harness {
        Harness {
            broker: Broker::new(config),
            now: Instant::now(),
        }
    }

    /// Handles `packet` and returns (packets sent to `conn`, whether `conn` was closed).
    fn send(&mut self, conn: ConnectionId, packet: Packet) -> (Vec<Packet>, bool) {
        self.broker.handle_packet(self.now, conn, packet);
        let mut packets = Vec::new();
        let mut closed = false;
        while let Some(output) = self.broker.poll_output() {
            match output {
                Output::Send { conn: to, packet } if to == conn => packets.push(packet),
                Output::Close { conn: to } if to == conn => closed = true,
                _ => {}
            }
        }
        (packets, closed)
    }

    fn connect(&mut self, conn: ConnectionId, version: ProtocolVersion) {
        let connect = Connect {
            protocol: version,
            clean_start: true,
            keep_alive: 0,
            client_id: format!("c{conn}"),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        let (packets, _) = self.send(conn, Packet::Connect(Box::new(connect)));
        assert!(matches!(&packets[..], [Packet::ConnAck(ack)] if ack.code == ReasonCode::SUCCESS));
    }

    fn publish(&mut self, conn: ConnectionId) -> (Vec<Packet>, bool) {
        self.send(
            conn,
            Packet::Publish(Publish {
                qos: QoS::AtMostOnce,
                topic: "t".to_owned(),
                payload: Bytes::from_static(b"x"),
                ..Publish::default()
            }),
        )
    }

    fn subscribe(&mut self, conn: ConnectionId, filter: &str) -> ReasonCode {
        let (packets, _) = self.send(
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: filter.to_owned(),
                    options: SubscriptionOptions::default(),
                }],
                properties: Properties::default(),
            }),
        );
        match packets.first() {
            Some(Packet::SubAck(ack)) => ack.reasons[0],
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

#[test]
fn publishing_faster_than_max_publish_rate_disconnects_with_0x96() {
    let mut h = Harness::new(BrokerConfig {
        max_publish_rate: 5,
        ..BrokerConfig::default()
    });
    h.connect(1, V5);
    h.connect(2, V3);
    // A one-second burst is allowed...
    for _ in 0..5 {
        assert!(!h.publish(1).1);
    }
    // ... and tokens come back at the rate.
    h.now += Duration::from_millis(200);
    assert!(!h.publish(1).1);
    let (packets, closed) = h.publish(1);
    assert!(closed, "over the rate");
    assert!(
        matches!(&packets[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::MESSAGE_RATE_TOO_HIGH),
        "{packets:?}"
    );
    // MQTT 3.x has no DISCONNECT from the server: the connection is closed.
    for _ in 0..5 {
        assert!(!h.publish(2).1);
    }
    let (packets, closed) = h.publish(2);
    assert!(closed && packets.is_empty(), "{packets:?}");
    assert_eq!(h.broker.stats().refused_publish_rate, 2);
}

#[test]
fn unlimited_publish_rate_by_default() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, V5);
    assert!((0..10_000).all(|_| !h.publish(1).1));
}

#[test]
fn subscriptions_beyond_the_quota_are_refused() {
    let mut h = Harness::new(BrokerConfig {
        max_subscriptions_per_client: 2,
        ..BrokerConfig::default()
    });
    h.connect(1, V5);
    h.connect(2, V3);
    for conn in [1, 2] {
        assert_eq!(h.subscribe(conn, "a"), ReasonCode::GRANTED_QOS_0);
        assert_eq!(h.subscribe(conn, "b"), ReasonCode::GRANTED_QOS_0);
        // Re-subscribing replaces, so it is not a new subscription.
        assert_eq!(h.subscribe(conn, "a"), ReasonCode::GRANTED_QOS_0);
    }
    assert_eq!(h.subscribe(1, "c"), ReasonCode::QUOTA_EXCEEDED);
    assert_eq!(h.subscribe(2, "c"), ReasonCode::V3_SUBACK_FAILURE);
    assert_eq!(h.broker.stats().refused_subscription_quota, 2);
    assert_eq!(h.broker.stats().subscriptions, 4);
}
