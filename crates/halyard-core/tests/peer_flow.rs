//! Flow control across nodes under `queue_full_policy = "pushback"`, driven as the cluster
//! driver drives it: a forward that a full local subscriber has no room for is given back
//! (and taken once there is room), and a publish bound for a node whose lane is congested
//! waits unacknowledged until the lane has caught up.

use std::time::{Instant, SystemTime};

use bytes::Bytes;
use halyard_codec::{
    Connect, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions,
};
use halyard_core::{
    Broker, BrokerConfig, BrokerParts, ClaimOutcome, ConnectionId, ForwardOffer, Message, Output,
    PacketIds, PeerForward, QueueFullPolicy,
};

/// A cluster node's core with `pushback`, one in-flight message and a queue of two.
fn pushback_broker() -> Broker {
    let config = BrokerConfig {
        queue_full_policy: QueueFullPolicy::Pushback,
        max_inflight: 1,
        max_queued_messages: 2,
        ..BrokerConfig::default()
    };
    let mut broker = Broker::with_parts(config, BrokerParts::replicated());
    broker.set_route_version(ROUTE_VERSION);
    broker
}

/// The route version of every test here: after every claim they make.
const ROUTE_VERSION: u64 = 1_000;

/// What the broker emitted: packets per connection, pauses and resumes, commits applied.
#[derive(Default)]
struct Emitted {
    packets: Vec<(ConnectionId, Packet)>,
    paused: Vec<ConnectionId>,
    resumed: Vec<ConnectionId>,
}

fn drain(broker: &mut Broker, now: Instant) -> Emitted {
    let mut emitted = Emitted::default();
    loop {
        let mut tickets = Vec::new();
        while let Some(output) = broker.poll_output() {
            match output {
                Output::Send { conn, packet } => emitted.packets.push((conn, packet)),
                Output::Pause { conn } => emitted.paused.push(conn),
                Output::Resume { conn } => emitted.resumed.push(conn),
                Output::Subscriptions {
                    ticket: Some(ticket),
                    ..
                } => tickets.push(ticket),
                _ => {}
            }
        }
        if tickets.is_empty() {
            return emitted;
        }
        for ticket in tickets {
            broker.handle_routes_committed(now, ticket, true);
        }
    }
}

fn connect(broker: &mut Broker, now: Instant, conn: ConnectionId, id: &str) {
    let connect = Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_start: true,
        keep_alive: 0,
        client_id: id.to_owned(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    broker.handle_packet(now, conn, Packet::Connect(Box::new(connect)));
    drain(broker, now);
    broker.handle_claim(
        now,
        SystemTime::now(),
        conn,
        ClaimOutcome::Granted {
            epoch: conn,
            session: None,
            packet_ids: PacketIds::ALL,
        },
    );
    drain(broker, now);
}

fn subscribe(broker: &mut Broker, now: Instant, conn: ConnectionId, filter: &str) {
    let subscribe = Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: filter.to_owned(),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..SubscriptionOptions::default()
            },
        }],
        properties: Properties::default(),
    };
    broker.handle_packet(now, conn, Packet::Subscribe(subscribe));
    drain(broker, now);
}

fn publish(id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t/x".to_owned(),
        packet_id: Some(id),
        payload: Bytes::from(format!("m-{id}")),
        properties: Properties::default(),
    })
}

/// A forward from node 2, routed at [`ROUTE_VERSION`].
fn peer(stored_as: Option<(u64, u64)>, message: Message) -> PeerForward {
    PeerForward {
        stored_as,
        message,
        groups: Vec::new(),
        routed_at: ROUTE_VERSION,
        for_session: None,
        exchange: None,
    }
}

fn forward(n: u16) -> Message {
    Message {
        topic: "t/x".to_owned(),
        payload: Bytes::from(format!("f-{n}")),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: None,
        expires_at: None,
        publisher: None,
    }
}

fn pubacks(emitted: &Emitted, conn: ConnectionId) -> Vec<u16> {
    emitted
        .packets
        .iter()
        .filter_map(|(to, packet)| match packet {
            Packet::PubAck(ack) if *to == conn => Some(ack.packet_id),
            _ => None,
        })
        .collect()
}

fn delivered(emitted: &Emitted, conn: ConnectionId) -> Vec<(u16, Bytes)> {
    emitted
        .packets
        .iter()
        .filter_map(|(to, packet)| match packet {
            Packet::Publish(publish) if *to == conn => {
                Some((publish.packet_id.unwrap_or(0), publish.payload.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_forward_a_full_subscriber_has_no_room_for_is_given_back_and_taken_once_there_is_room() {
    let now = Instant::now();
    let mut broker = pushback_broker();
    connect(&mut broker, now, 1, "slow");
    subscribe(&mut broker, now, 1, "t/#");
    // One in flight and two queued fill the subscriber.
    for n in 0..3 {
        let offer = broker.offer_forward(now, 2, peer(Some((9, u64::from(n) + 1)), forward(n)));
        assert!(matches!(offer, ForwardOffer::Taken), "forward {n} fits");
    }
    let ForwardOffer::NoRoom(back) = broker.offer_forward(now, 2, peer(Some((9, 4)), forward(3)))
    else {
        panic!("a fourth forward finds the subscriber full");
    };
    assert_eq!(
        back.message.payload,
        Bytes::from("f-3"),
        "given back untouched"
    );
    let stats = broker.stats();
    assert_eq!(
        (stats.dropped_queue_full, stats.refused_quota),
        (0, 0),
        "waiting for room is neither a drop nor a refusal"
    );
    let first = delivered(&drain(&mut broker, now), 1);
    assert_eq!(first.len(), 1, "one in flight: {first:?}");
    // The subscriber's PUBACK makes room: the driver offers the forward again.
    broker.handle_packet(
        now,
        1,
        Packet::PubAck(PubResponse {
            packet_id: first[0].0,
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }),
    );
    assert!(broker.take_room_freed(), "the PUBACK is a hint to retry");
    let offer = broker.offer_forward(now, 2, back);
    assert!(matches!(offer, ForwardOffer::Taken));
    // A replay of a forward already taken is dropped, not delivered twice.
    let replay = broker.offer_forward(now, 2, peer(Some((9, 4)), forward(3)));
    assert!(matches!(replay, ForwardOffer::Taken));
    assert_eq!(broker.stats().duplicate_forwards, 1);
}

#[test]
fn a_publish_bound_for_a_congested_node_waits_until_its_lane_has_caught_up() {
    let now = Instant::now();
    let mut broker = pushback_broker();
    broker.add_remote_route(2, "t/#");
    connect(&mut broker, now, 1, "publisher");
    broker.handle_packet(now, 1, publish(1));
    assert_eq!(
        pubacks(&drain(&mut broker, now), 1),
        vec![1],
        "lane clear: acknowledged"
    );
    broker.set_node_congested(now, 2, true);
    broker.handle_packet(now, 1, publish(2));
    let emitted = drain(&mut broker, now);
    assert!(
        pubacks(&emitted, 1).is_empty(),
        "bound for a congested node: not acknowledged yet"
    );
    assert_eq!(emitted.paused, vec![1], "reads from the publisher pause");
    broker.set_node_congested(now, 2, false);
    let emitted = drain(&mut broker, now);
    assert_eq!(pubacks(&emitted, 1), vec![2], "acknowledged once caught up");
    assert_eq!(emitted.resumed, vec![1]);
}
