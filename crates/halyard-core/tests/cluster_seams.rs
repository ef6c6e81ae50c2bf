//! The seams a cluster plugs into, driven as a cluster driver would: remote routes and
//! forwards, two-phase claims, the fencing epoch in the store, and a session moved from one
//! core to another. Brokers run on real redb stores in temporary directories.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use halyard_codec::{
    Connect, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions, Will,
};
use halyard_core::{
    Broker, BrokerConfig, BrokerParts, ClaimOutcome, ClaimRequest, ConnectionId, DropReason,
    ForwardOffer, Message, OpenExchange, Output, PacketIds, PeerForward, SessionState,
    SubscriptionUpdate, RELAY_WINDOW,
};
use halyard_store::{FsyncPolicy, RedbStore};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// An `Output::Forward`: (node, message, share groups, outbox sequence number, the client
/// id it is addressed to, the QoS 2 exchange it carries on).
type Forwarded = (
    u64,
    Arc<Message>,
    Vec<Arc<str>>,
    Option<u64>,
    Option<Arc<str>>,
    Option<OpenExchange>,
);

/// A route version above every epoch these tests use: routed after every claim.
const LATEST: u64 = 1_000;

/// A forward from a peer, routed at [`LATEST`].
fn peer(stored_as: Option<(u64, u64)>, message: Message, groups: &[Arc<str>]) -> PeerForward {
    routed(stored_as, message, groups, LATEST)
}

/// A forward from a peer, routed at `routed_at`.
fn routed(
    stored_as: Option<(u64, u64)>,
    message: Message,
    groups: &[Arc<str>],
    routed_at: u64,
) -> PeerForward {
    PeerForward {
        stored_as,
        message,
        groups: groups.to_vec(),
        routed_at,
        for_session: None,
        exchange: None,
    }
}

/// One node's core on a real store, with what it emitted sorted by kind.
struct Node {
    broker: Broker,
    now: Instant,
    inbox: HashMap<ConnectionId, Vec<Packet>>,
    closed: Vec<ConnectionId>,
    claims: VecDeque<ClaimRequest>,
    forwards: Vec<Forwarded>,
    releases: Vec<(String, u64)>,
    replications: Vec<(Option<u64>, String, u64, Vec<SubscriptionUpdate>)>,
    retains: Vec<Arc<Message>>,
    /// `Output::SettleWill`s: (client id, epoch, publisher, will to publish if won).
    settled_wills: Vec<(String, u64, u64, Option<Will>)>,
    /// Whether route commits wait for the test; otherwise every ticket is committed at once.
    hold_routes: bool,
}

impl Node {
    /// A node whose routes are at [`LATEST`]: every message it routes is for every
    /// session it holds.
    fn open(dir: &std::path::Path, parts: BrokerParts, now: Instant) -> Node {
        let mut node = Node::open_at(dir, parts, now);
        node.broker.set_route_version(LATEST);
        node
    }

    /// A node at route version 0.
    fn open_at(dir: &std::path::Path, parts: BrokerParts, now: Instant) -> Node {
        let store = RedbStore::open(dir, FsyncPolicy::Always).expect("store opens");
        let broker = Broker::with_store_and_parts(
            BrokerConfig::default(),
            parts,
            Box::new(store),
            now,
            SystemTime::now(),
        )
        .expect("broker loads");
        Node {
            broker,
            now,
            inbox: HashMap::new(),
            closed: Vec::new(),
            claims: VecDeque::new(),
            forwards: Vec::new(),
            releases: Vec::new(),
            replications: Vec::new(),
            retains: Vec::new(),
            settled_wills: Vec::new(),
            hold_routes: false,
        }
    }

    fn drain(&mut self) {
        loop {
            self.drain_once();
            let tickets: Vec<u64> = self
                .replications
                .iter_mut()
                .filter_map(|(ticket, ..)| {
                    if self.hold_routes {
                        None
                    } else {
                        ticket.take()
                    }
                })
                .collect();
            if tickets.is_empty() {
                return;
            }
            for ticket in tickets {
                self.broker.handle_routes_committed(self.now, ticket, true);
            }
        }
    }

    fn drain_once(&mut self) {
        while let Some(output) = self.broker.poll_output() {
            match output {
                Output::Send { conn, packet } => self.inbox.entry(conn).or_default().push(packet),
                Output::Close { conn } => self.closed.push(conn),
                Output::Claim(request) => self.claims.push_back(request),
                Output::Forward {
                    node,
                    message,
                    groups,
                    seq,
                    for_session,
                    exchange,
                    ..
                } => self
                    .forwards
                    .push((node, message, groups, seq, for_session, exchange)),
                Output::Release { client_id, epoch } => self.releases.push((client_id, epoch)),
                Output::Subscriptions {
                    ticket,
                    client_id,
                    epoch,
                    changes,
                } => self.replications.push((ticket, client_id, epoch, changes)),
                Output::Retain { message } => self.retains.push(message),
                Output::SettleWill {
                    client_id,
                    epoch,
                    publisher,
                    will,
                } => self
                    .settled_wills
                    .push((client_id, epoch, publisher, will.map(|will| *will))),
                Output::Pause { .. } | Output::Resume { .. } | Output::NotifyWritten { .. } => {}
            }
        }
        self.broker.commit().expect("commit");
    }

    fn send(&mut self, conn: ConnectionId, packet: Packet) {
        self.broker.handle_packet(self.now, conn, packet);
        self.drain();
    }

    fn take(&mut self, conn: ConnectionId) -> Vec<Packet> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    fn settle(&mut self, conn: ConnectionId, outcome: ClaimOutcome) {
        self.broker
            .handle_claim(self.now, SystemTime::now(), conn, outcome);
        self.drain();
    }

    /// `state`'s client connects on `conn` and its claim under `epoch` is granted with what
    /// raft holds of the session (its subscriptions), as when no hand-over came in time.
    fn resume_from_raft(&mut self, conn: ConnectionId, state: &SessionState, epoch: u64) {
        self.send(conn, connect(V5, &state.client_id, false, Some(3600)));
        self.claims.pop_front().expect("claim");
        let from_raft = SessionState {
            inflight: Vec::new(),
            pending: Vec::new(),
            inbound_qos2: Vec::new(),
            delayed_will: None,
            ..state.clone()
        };
        self.settle(
            conn,
            ClaimOutcome::Granted {
                epoch,
                session: Some(Box::new(from_raft)),
                packet_ids: PacketIds::ALL,
            },
        );
    }

    /// Forwards from node 3 of QoS 1 messages on `topic`: (payload, routed at, stored seq).
    fn forwarded(&mut self, topic: &str, items: &[(&'static [u8], u64, u64)]) {
        for &(payload, routed_at, seq) in items {
            let message = message(topic, payload, QoS::AtLeastOnce);
            let forward = routed(Some((9, seq)), message, &[], routed_at);
            self.broker.handle_forward(self.now, 3, forward);
        }
        self.drain();
    }

    /// The claim on `conn` is granted under `epoch` with the session `state` handed over:
    /// CONNACK with session present, and the payloads delivered, sorted.
    fn granted_with(
        &mut self,
        conn: ConnectionId,
        epoch: u64,
        state: Box<SessionState>,
    ) -> Vec<Bytes> {
        self.settle(
            conn,
            ClaimOutcome::Granted {
                epoch,
                session: Some(state),
                packet_ids: PacketIds::ALL,
            },
        );
        let packets = self.take(conn);
        assert_eq!(connack(&packets), (true, ReasonCode::SUCCESS));
        sorted_payloads(&packets)
    }

    /// The client resumes from raft on `conn` under `epoch`, then the old owner's late
    /// hand-over of `state` comes and queues or passes on `merged` messages.
    fn resume_then_merge_late(
        &mut self,
        conn: ConnectionId,
        state: Box<SessionState>,
        epoch: u64,
        merged: usize,
    ) {
        self.resume_from_raft(conn, &state, epoch);
        self.take(conn);
        let count = self
            .broker
            .merge_late_session(self.now, SystemTime::now(), epoch, *state);
        assert_eq!(count, merged);
        self.drain();
    }

    /// The payloads this node forwarded since the last look, in order.
    fn passed_on(&mut self) -> Vec<Bytes> {
        self.forwards
            .drain(..)
            .map(|(_, message, _, _, _, _)| message.payload.clone())
            .collect()
    }

    fn granted(&mut self, conn: ConnectionId, epoch: u64) {
        self.settle(
            conn,
            ClaimOutcome::Granted {
                epoch,
                session: None,
                packet_ids: PacketIds::ALL,
            },
        );
    }
}

fn connect(version: ProtocolVersion, id: &str, clean: bool, expiry: Option<u32>) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: version,
        clean_start: clean,
        keep_alive: 0,
        client_id: id.to_string(),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            session_expiry_interval: expiry,
            ..Properties::default()
        },
    }))
}

fn subscribe(filter: &str, qos: QoS, packet_id: u16) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        subscriptions: vec![Subscription {
            filter: filter.to_string(),
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
        }],
        properties: Properties::default(),
    })
}

fn publish(topic: &str, payload: &'static [u8], qos: QoS, id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_string(),
        packet_id: (qos != QoS::AtMostOnce).then_some(id),
        payload: Bytes::from_static(payload),
        properties: Properties::default(),
    })
}

fn message(topic: &str, payload: &'static [u8], qos: QoS) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        properties: None,
        expires_at: None,
        publisher: None,
    }
}

/// The payloads of the PUBLISH packets among `packets`, sorted.
fn sorted_payloads(packets: &[Packet]) -> Vec<Bytes> {
    let mut payloads: Vec<Bytes> = publishes(packets)
        .into_iter()
        .map(|publish| publish.payload)
        .collect();
    payloads.sort();
    payloads
}

fn connack(packets: &[Packet]) -> (bool, ReasonCode) {
    match packets.first() {
        Some(Packet::ConnAck(ack)) => (ack.session_present, ack.code),
        other => panic!("expected CONNACK first, got {other:?}"),
    }
}

fn publishes(packets: &[Packet]) -> Vec<Publish> {
    packets
        .iter()
        .filter_map(|packet| match packet {
            Packet::Publish(publish) => Some(publish.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn connack_waits_for_the_claim_and_packets_sent_meanwhile_follow_it_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    node.hold_routes = true;
    node.send(1, connect(V5, "c", true, None));
    assert!(
        node.take(1).is_empty(),
        "no CONNACK before the claim settles"
    );
    let request = node.claims.pop_front().expect("a claim request");
    assert_eq!(
        (request.conn, request.client_id.as_str(), request.held_epoch),
        (1, "c", None)
    );
    node.send(1, subscribe("t", QoS::AtLeastOnce, 7));
    assert!(
        node.take(1).is_empty(),
        "the SUBSCRIBE waits behind the claim"
    );
    node.granted(1, 5);
    let packets = node.take(1);
    assert_eq!(connack(&packets), (false, ReasonCode::SUCCESS));
    assert_eq!(
        packets.len(),
        1,
        "the SUBACK waits for its routes: {packets:?}"
    );
    let (ticket, client_id, epoch, changes) = node.replications.remove(0);
    assert_eq!((client_id.as_str(), epoch), ("c", 5));
    assert!(matches!(&changes[..], [SubscriptionUpdate::Add { filter, .. }] if filter == "t"));
    node.broker
        .handle_routes_committed(node.now, ticket.expect("a SUBACK waits"), true);
    node.drain();
    assert!(
        matches!(&node.take(1)[..], [Packet::SubAck(ack)] if ack.packet_id == 7),
        "SUBACK once the routes are committed"
    );
}

#[test]
fn a_subscription_whose_routes_cannot_be_committed_fails_and_is_undone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    node.hold_routes = true;
    node.send(1, connect(V5, "c", true, None));
    node.granted(1, 1);
    node.take(1);
    node.send(1, subscribe("t", QoS::AtLeastOnce, 3));
    let ticket = node.replications.remove(0).0.expect("a SUBACK waits");
    node.broker.handle_routes_committed(node.now, ticket, false);
    node.drain();
    match &node.take(1)[..] {
        [Packet::SubAck(ack)] => assert_eq!(ack.reasons, vec![ReasonCode(0x80)]),
        other => panic!("expected a failing SUBACK, got {other:?}"),
    }
    assert_eq!(
        node.broker.stats().subscriptions,
        0,
        "the filter was removed"
    );
    // UNSUBSCRIBE replicates the removal without waiting.
    node.hold_routes = false;
    node.send(1, subscribe("u", QoS::AtMostOnce, 4));
    node.replications.clear();
    node.send(
        1,
        Packet::Unsubscribe(halyard_codec::Unsubscribe {
            packet_id: 5,
            filters: vec!["u".into()],
            properties: Properties::default(),
        }),
    );
    assert!(matches!(
        &node.replications[..],
        [(None, _, 1, changes)] if matches!(&changes[..], [SubscriptionUpdate::Remove { filter }] if filter == "u")
    ));
}

#[test]
fn retained_messages_are_replicated_and_applied_without_echo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    node.send(1, connect(V5, "pub", true, None));
    node.granted(1, 1);
    let mut retained = match publish("state/door", b"open", QoS::AtLeastOnce, 1) {
        Packet::Publish(p) => p,
        _ => unreachable!(),
    };
    retained.retain = true;
    node.send(1, Packet::Publish(retained));
    assert_eq!(node.retains.len(), 1);
    assert_eq!(node.retains[0].topic, "state/door");
    // Another node's retained message is stored here, and not replicated back.
    let mut other = message("state/window", b"shut", QoS::AtMostOnce);
    other.retain = true;
    node.broker.apply_retained(other);
    node.drain();
    assert_eq!(node.retains.len(), 1, "no echo");
    assert_eq!(node.broker.stats().retained_messages, 2);
    node.send(2, connect(V5, "sub", true, None));
    node.granted(2, 2);
    node.send(2, subscribe("state/#", QoS::AtMostOnce, 1));
    let topics: Vec<String> = publishes(&node.take(2))
        .into_iter()
        .map(|p| p.topic)
        .collect();
    assert_eq!(topics, vec!["state/door", "state/window"]);
}

#[test]
fn a_refused_claim_is_answered_server_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    node.send(1, connect(V5, "v5", false, Some(60)));
    node.send(2, connect(V3, "v3", false, None));
    node.settle(1, ClaimOutcome::Refused);
    node.settle(2, ClaimOutcome::Refused);
    // 0x88 Server unavailable in MQTT 5, 0x03 in 3.1.1 [MQTT-3.2.2-6].
    assert_eq!(
        connack(&node.take(1)),
        (false, ReasonCode::SERVER_UNAVAILABLE)
    );
    assert_eq!(
        connack(&node.take(2)),
        (false, ReasonCode::V3_SERVER_UNAVAILABLE)
    );
    assert_eq!(node.closed, vec![1, 2]);
    assert_eq!(node.broker.stats().claims_refused, 2);
    assert_eq!(node.broker.stats().sessions, 0);
}

#[test]
fn a_claim_that_lost_to_a_newer_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    let mut older = match connect(V5, "c", false, Some(60)) {
        Packet::Connect(connect) => connect,
        _ => unreachable!(),
    };
    older.will = Some(Will {
        topic: "wills/c".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    node.send(1, Packet::Connect(older));
    node.send(2, connect(V5, "c", false, Some(60)));
    node.granted(2, 9);
    node.granted(1, 8);
    assert_eq!(connack(&node.take(2)), (false, ReasonCode::SUCCESS));
    assert_eq!(
        connack(&node.take(1)),
        (false, ReasonCode::SERVER_UNAVAILABLE)
    );
    assert!(!node.closed.contains(&2), "the newer connection stays");
    assert_eq!(
        node.settled_wills,
        vec![("c".to_owned(), 8, 0, None)],
        "the refused connection's will, kept with its claim in raft, is discarded there"
    );
}

#[test]
fn the_epoch_is_stored_with_the_session_and_later_claims_exceed_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    {
        let mut node = Node::open(dir.path(), BrokerParts::replicated(), start);
        node.send(1, connect(V5, "c", false, Some(3600)));
        node.granted(1, 41);
        node.send(1, subscribe("t", QoS::AtLeastOnce, 1));
        assert_eq!(connack(&node.take(1)), (false, ReasonCode::SUCCESS));
    }
    // A single node restarted on the same store: its registry continues above the
    // stored epoch, so the resumed session's claim is newer than the one it was held by.
    let mut node = Node::open(dir.path(), BrokerParts::default(), start);
    node.send(2, connect(V5, "c", false, Some(3600)));
    assert_eq!(connack(&node.take(2)), (true, ReasonCode::SUCCESS));
    let state = node
        .broker
        .fence(node.now, SystemTime::now(), "c", 43, 2)
        .expect("held under an older epoch than 43");
    assert_eq!(state.epoch, 42, "one above the stored epoch 41");
    assert!(
        node.broker
            .fence(node.now, SystemTime::now(), "c", 44, 2)
            .is_none(),
        "a fenced session is gone"
    );
}

#[test]
fn publishes_go_once_to_each_remote_node_and_forwards_never_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    node.broker.add_remote_route(2, "plant/+/temp");
    node.broker.add_remote_route(2, "plant/#");
    node.broker.add_remote_route(3, "plant/line3/temp");
    node.send(1, connect(V5, "sub", true, None));
    node.granted(1, 1);
    node.send(1, subscribe("plant/#", QoS::AtLeastOnce, 1));
    node.send(4, connect(V5, "pub", true, None));
    node.granted(4, 2);
    node.take(1);
    node.take(4);

    node.send(4, publish("plant/line3/temp", b"21", QoS::AtLeastOnce, 10));
    let mut targets: Vec<u64> = node.forwards.iter().map(|(to, ..)| *to).collect();
    targets.sort_unstable();
    assert_eq!(
        targets,
        vec![2, 3],
        "one copy per node, however many filters match"
    );
    assert!(
        matches!(&node.take(4)[..], [Packet::PubAck(PubResponse { packet_id: 10, reason, .. })] if *reason == ReasonCode::SUCCESS)
    );
    assert_eq!(publishes(&node.take(1)).len(), 1);

    // A remote node alone counts as a subscriber: no 0x10 No matching subscribers.
    node.broker.add_remote_route(3, "only/remote");
    node.send(4, publish("only/remote", b"x", QoS::AtLeastOnce, 11));
    assert!(
        matches!(&node.take(4)[..], [Packet::PubAck(PubResponse { reason, .. })] if *reason == ReasonCode::SUCCESS)
    );

    node.forwards.clear();
    node.broker.handle_forward(
        node.now,
        2,
        peer(
            None,
            message("plant/line1/temp", b"19", QoS::AtLeastOnce),
            &[],
        ),
    );
    node.drain();
    assert!(
        node.forwards.is_empty(),
        "a forwarded message is never forwarded again"
    );
    let delivered = publishes(&node.take(1));
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].payload, Bytes::from_static(b"19"));

    assert!(node.broker.remove_remote_route(3, "plant/line3/temp"));
    node.send(4, publish("plant/line3/temp", b"22", QoS::AtMostOnce, 0));
    let targets: Vec<u64> = node.forwards.iter().map(|(to, ..)| *to).collect();
    assert_eq!(targets, vec![2]);
}

#[test]
fn a_share_group_across_nodes_gives_each_message_to_one_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    node.broker.add_remote_route(2, "$share/g/jobs");
    node.send(1, connect(V5, "worker", true, None));
    node.granted(1, 1);
    node.send(1, subscribe("$share/g/jobs", QoS::AtLeastOnce, 1));
    node.send(4, connect(V5, "pub", true, None));
    node.granted(4, 2);
    node.take(1);
    for id in 1..=4 {
        node.send(4, publish("jobs", b"j", QoS::AtLeastOnce, id));
    }
    let local = publishes(&node.take(1)).len();
    let remote: Vec<_> = node
        .forwards
        .iter()
        .filter(|(to, _, groups, ..)| *to == 2 && groups.iter().any(|g| &**g == "$share/g/jobs"))
        .collect();
    assert_eq!(
        local + remote.len(),
        4,
        "each message to exactly one member"
    );
    assert_eq!(
        (local, remote.len()),
        (2, 2),
        "round-robin across the nodes"
    );

    // On the receiving side the group is served only when the sender picked this node.
    node.broker.handle_forward(
        node.now,
        2,
        peer(None, message("jobs", b"a", QoS::AtLeastOnce), &[]),
    );
    node.drain();
    assert!(publishes(&node.take(1)).is_empty());
    let picked: Vec<Arc<str>> = vec!["$share/g/jobs".into()];
    node.broker.handle_forward(
        node.now,
        2,
        peer(None, message("jobs", b"b", QoS::AtLeastOnce), &picked),
    );
    node.drain();
    assert_eq!(publishes(&node.take(1)).len(), 1);
}

/// Node A holds a persistent session with a subscription, an unacknowledged QoS 1
/// delivery, queued messages on disk, a QoS 2 id awaiting PUBREL and a delayed will.
/// Node B's claim fences A; the state moves to B, whose client resumes with session
/// present = 1, gets the in-flight message again with DUP = 1 and the queue after it.
#[test]
fn a_session_moves_between_cores_with_queue_inflight_qos2_ids_and_will() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let now = Instant::now();
    let mut a = Node::open(dir_a.path(), BrokerParts::replicated(), now);
    let mut b = Node::open(dir_b.path(), BrokerParts::replicated(), now);

    let mut with_will = match connect(V5, "mover", false, Some(3600)) {
        Packet::Connect(connect) => connect,
        _ => unreachable!(),
    };
    with_will.will = Some(Will {
        topic: "wills/mover".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties {
            will_delay_interval: Some(600),
            ..Properties::default()
        },
    });
    a.send(1, Packet::Connect(with_will));
    a.granted(1, 10);
    a.send(1, subscribe("work/#", QoS::AtLeastOnce, 1));
    // An inbound QoS 2 publish PUBRECed, not yet released.
    a.send(1, publish("elsewhere", b"q2", QoS::ExactlyOnce, 77));
    a.send(2, connect(V5, "feeder", true, None));
    a.granted(2, 11);
    a.take(1);
    // 100 messages: 32 go in flight (unacknowledged), 68 queue behind the window, of
    // which those past the first 64 in memory spill to disk.
    for id in 1..=100u16 {
        a.send(2, publish("work/item", b"w", QoS::AtLeastOnce, id));
    }
    let first_sent = publishes(&a.take(1));
    assert_eq!(first_sent.len(), 32, "the in-flight window");
    let first_id = first_sent[0].packet_id;

    let state = a
        .broker
        .fence(a.now, SystemTime::now(), "mover", 12, 2)
        .expect("A held it under epoch 10");
    a.drain();
    let to_a = a.take(1);
    assert!(
        matches!(to_a.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::SESSION_TAKEN_OVER),
        "A's connection is told 0x8E: {to_a:?}"
    );
    assert!(a.closed.contains(&1));
    assert_eq!(a.broker.stats().sessions, 1, "only the feeder is left on A");
    assert_check_state(&state);

    b.send(5, connect(V5, "mover", false, Some(3600)));
    assert_eq!(
        b.claims.pop_front().map(|r| r.client_id),
        Some("mover".into())
    );
    b.settle(
        5,
        ClaimOutcome::Granted {
            epoch: 12,
            session: Some(state),
            packet_ids: PacketIds::ALL,
        },
    );
    let packets = b.take(5);
    assert_eq!(connack(&packets), (true, ReasonCode::SUCCESS));
    let resent = publishes(&packets);
    assert_eq!(resent.len(), 32);
    assert!(
        resent.iter().all(|p| p.dup),
        "in-flight re-sent with DUP = 1"
    );
    assert_eq!(resent[0].packet_id, first_id, "packet ids survive the move");
    // Acknowledging the window brings the queue, in order.
    let mut received = resent.len();
    let mut pending: Vec<Publish> = resent;
    while !pending.is_empty() {
        for publish in pending.drain(..) {
            b.send(
                5,
                Packet::PubAck(PubResponse {
                    packet_id: publish.packet_id.expect("QoS 1"),
                    reason: ReasonCode::SUCCESS,
                    properties: Properties::default(),
                }),
            );
        }
        pending = publishes(&b.take(5));
        received += pending.len();
    }
    assert_eq!(
        received, 100,
        "every acknowledged publish reaches the new owner"
    );
    // The QoS 2 id moved: a re-sent PUBLISH 77 is acknowledged, not delivered again.
    b.send(5, publish("work/dup", b"q2", QoS::ExactlyOnce, 77));
    assert!(publishes(&b.take(5)).is_empty());
    // The new connection came within the will delay: the will is not published.
    b.now += Duration::from_secs(700);
    b.broker.handle_timeout(b.now);
    b.drain();
    assert!(b.forwards.is_empty());

    // B's store holds the session under B's epoch.
    drop(b);
    let b = Node::open(dir_b.path(), BrokerParts::default(), now);
    assert_eq!(b.broker.stats().sessions, 1);
    let mut b = b;
    let state = b
        .broker
        .fence(b.now, SystemTime::now(), "mover", 13, 2)
        .expect("stored under epoch 12");
    assert_eq!(state.epoch, 12);
    assert_eq!(state.subscriptions.len(), 1);
}

fn assert_check_state(state: &SessionState) {
    assert_eq!(state.client_id, "mover");
    assert_eq!(state.epoch, 10);
    assert_eq!(state.expiry_interval, 3600);
    assert_eq!(
        state
            .subscriptions
            .iter()
            .map(|(f, _)| f.as_str())
            .collect::<Vec<_>>(),
        vec!["work/#"]
    );
    assert_eq!(state.inflight.len(), 32);
    assert_eq!(
        state.pending.len(),
        68,
        "queued in memory and spilled to disk"
    );
    assert_eq!(state.inbound_qos2, vec![77]);
    assert!(
        state
            .delayed_will
            .as_ref()
            .is_some_and(|(_, will)| will.topic == "wills/mover"),
        "the delayed will moves with the session"
    );
}

/// A QoS 1/2 publish bound for another node is put in that node's outbox in the commit that
/// lets its PUBACK out; it is read back after a restart and leaves only when the node
/// acknowledges it. QoS 0 is not stored. Sequence numbers keep rising across restarts.
#[test]
fn a_forward_stays_in_the_outbox_across_restarts_until_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seqs: Vec<Option<u64>> = {
        let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
        node.broker.add_remote_route(2, "t/#");
        node.send(4, connect(V5, "pub", true, None));
        node.granted(4, 1);
        node.take(4);
        node.send(4, publish("t/1", b"a", QoS::AtLeastOnce, 1));
        node.send(4, publish("t/2", b"b", QoS::ExactlyOnce, 2));
        node.send(4, publish("t/3", b"c", QoS::AtMostOnce, 0));
        let acks = node.take(4);
        assert_eq!(acks.len(), 2, "PUBACK and PUBREC: {acks:?}");
        let seqs: Vec<Option<u64>> = node.forwards.iter().map(|f| f.3).collect();
        node.broker.forwards_acked(2, seqs[0].expect("stored"));
        node.drain();
        seqs
    };
    let (first, second) = (seqs[0].expect("stored"), seqs[1].expect("stored"));
    assert_eq!(second, first + 1);
    assert_eq!(seqs[2], None, "QoS 0 is not stored");

    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    assert_eq!(node.broker.outbox_backlogs(), vec![(2, first)]);
    let pending = node.broker.read_forwards(2, first, 10).expect("reads");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].seq, second);
    assert_eq!(pending[0].message.payload, Bytes::from_static(b"b"));
    assert_eq!(pending[0].message.qos, QoS::ExactlyOnce);
    node.broker.forwards_acked(2, second);
    node.drain();
    drop(node);

    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    assert!(node.broker.outbox_backlogs().is_empty());
    assert!(node
        .broker
        .read_forwards(2, 0, 10)
        .expect("reads")
        .is_empty());
    node.broker.add_remote_route(2, "t/#");
    node.send(4, connect(V5, "pub", true, None));
    node.granted(4, 2);
    node.send(4, publish("t/4", b"d", QoS::AtLeastOnce, 3));
    let next = node.forwards.last().and_then(|f| f.3).expect("stored");
    assert!(next > second, "{next} continues above {second}");
}

/// The receiving side keeps the newest stored forward of each sender in the same commit as
/// what it delivered: a replay after a restart is dropped and counted, a newer forward and a
/// forward of a new incarnation (a sender that lost its disk) are delivered.
#[test]
fn a_replayed_forward_is_dropped_after_the_receiver_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let subscribe_persistent = |node: &mut Node, epoch: u64| {
        node.send(1, connect(V5, "logger", false, Some(3600)));
        node.granted(1, epoch);
        node.take(1);
    };
    {
        let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
        subscribe_persistent(&mut node, 1);
        node.send(1, subscribe("log/#", QoS::AtLeastOnce, 1));
        node.take(1);
        node.broker.handle_forward(
            node.now,
            2,
            peer(
                Some((7, 5)),
                message("log/a", b"first", QoS::AtLeastOnce),
                &[],
            ),
        );
        node.drain();
        assert_eq!(publishes(&node.take(1)).len(), 1);
    }
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    subscribe_persistent(&mut node, 2);
    let replays = [
        (Some((7, 5)), "replay", false),
        (Some((7, 4)), "older", false),
        (Some((7, 6)), "newer", true),
        (Some((8, 1)), "new incarnation", true),
        (None, "QoS 0 copy", true),
    ];
    for (stored_as, payload, delivered) in replays {
        node.broker.handle_forward(
            node.now,
            2,
            peer(
                stored_as,
                message("log/a", payload.as_bytes(), QoS::AtLeastOnce),
                &[],
            ),
        );
        node.drain();
        let got = publishes(&node.take(1));
        let got: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
        assert_eq!(
            got.contains(&payload.as_bytes()),
            delivered,
            "{payload}: {got:?}"
        );
    }
    assert_eq!(node.broker.stats().duplicate_forwards, 2);
}

/// Nodes A and B on real stores, with `client_id` (started clean or not) subscribed to
/// `filter` on A under claim 10, and a clean `feeder` connected to A on connection 2 under
/// claim 11.
fn subscriber_and_feeder(
    client_id: &str,
    clean: bool,
    filter: &str,
    qos: QoS,
) -> (tempfile::TempDir, tempfile::TempDir, Node, Node) {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let now = Instant::now();
    let mut a = Node::open(dir_a.path(), BrokerParts::replicated(), now);
    let b = Node::open(dir_b.path(), BrokerParts::replicated(), now);
    a.send(1, connect(V5, client_id, clean, Some(3600)));
    a.granted(1, 10);
    a.send(1, subscribe(filter, qos, 1));
    a.send(2, connect(V5, "feeder", true, None));
    a.granted(2, 11);
    (dir_a, dir_b, a, b)
}

/// A session handed over only after the new owner gave up waiting (the client resumed from
/// what raft holds) joins the live session: every message queued or unacknowledged on the
/// old owner reaches the client, once.
#[test]
fn a_session_handed_over_late_joins_the_resumed_session() {
    // Started clean under claim 10: the session it is begins there, wherever it moves.
    let (_dir_a, _dir_b, mut a, mut b) =
        subscriber_and_feeder("slowpoke", true, "work/#", QoS::AtLeastOnce);
    a.take(1);
    for id in 1..=40u16 {
        a.send(2, publish("work/item", b"w", QoS::AtLeastOnce, id));
    }
    assert_eq!(publishes(&a.take(1)).len(), 32, "the in-flight window");
    let state = a
        .broker
        .fence(a.now, SystemTime::now(), "slowpoke", 12, 2)
        .expect("A held it under epoch 10");

    // B resumed without the hand-over: only the subscription, as raft holds it.
    b.resume_from_raft(5, &state, 12);
    let packets = b.take(5);
    assert_eq!(connack(&packets), (true, ReasonCode::SUCCESS));
    assert!(publishes(&packets).is_empty());

    assert_eq!(state.since, 10);
    assert_eq!(
        b.broker
            .merge_late_session(b.now, SystemTime::now(), 9, (*state).clone()),
        0,
        "not for a claim before the session began"
    );
    assert_eq!(
        b.broker
            .merge_late_session(b.now, SystemTime::now(), 12, *state),
        40
    );
    b.drain();
    let mut received = 0;
    let mut batch = publishes(&b.take(5));
    while !batch.is_empty() {
        received += batch.len();
        for publish in batch.drain(..) {
            b.send(
                5,
                Packet::PubAck(PubResponse {
                    packet_id: publish.packet_id.expect("QoS 1"),
                    reason: ReasonCode::SUCCESS,
                    properties: Properties::default(),
                }),
            );
        }
        batch = publishes(&b.take(5));
    }
    assert_eq!(received, 40, "every message of the old owner, once");
}

/// A session that came here under a later claim is still the one an earlier claim of this
/// node waited for, when its client never started clean: a hand-over for the earlier claim
/// that comes only now joins it (its messages were lost before: simulation seed 56 of the
/// partition profile).
#[test]
fn a_late_hand_over_for_an_earlier_claim_joins_the_session_that_came_since() {
    let (_dir_a, _dir_b, mut a, mut b) =
        subscriber_and_feeder("returner", false, "work/#", QoS::AtLeastOnce);
    a.send(1, Packet::Disconnect(halyard_codec::Disconnect::default()));
    for id in 1..=3u16 {
        a.send(2, publish("work/item", b"w", QoS::AtLeastOnce, id));
    }
    let state = a
        .broker
        .fence(a.now, SystemTime::now(), "returner", 18, 2)
        .expect("A held it");
    assert_eq!(state.since, 0, "it never started clean");
    // B's claim 18 gave up; the client came back to B under claim 26, resumed from raft.
    b.resume_from_raft(5, &state, 26);
    assert_eq!(connack(&b.take(5)), (true, ReasonCode::SUCCESS));
    assert_eq!(
        b.broker
            .merge_late_session(b.now, SystemTime::now(), 18, *state),
        3
    );
    b.drain();
    assert_eq!(
        publishes(&b.take(5)).len(),
        3,
        "the queue of A, delivered here"
    );
}

/// A QoS 2 message the old owner sent and got no PUBREC for may be held by the client under
/// its packet id: the late hand-over sends it again under that id with DUP = 1, so the client
/// recognises it [MQTT-4.3.3-8]; a queued one goes out as a new message.
#[test]
fn a_late_hand_over_resends_an_unreceived_qos2_message_under_its_packet_id() {
    let (_dir_a, _dir_b, mut a, mut b) =
        subscriber_and_feeder("exact", false, "q2/#", QoS::ExactlyOnce);
    a.take(1);
    a.send(2, publish("q2/a", b"sent", QoS::ExactlyOnce, 1));
    let sent = publishes(&a.take(1));
    assert_eq!(sent.len(), 1);
    let sent_id = sent[0].packet_id.expect("QoS 2");
    let state = a
        .broker
        .fence(a.now, SystemTime::now(), "exact", 12, 2)
        .expect("A held it");

    b.resume_then_merge_late(5, state, 12, 1);
    let resent = publishes(&b.take(5));
    assert_eq!(resent.len(), 1, "{resent:?}");
    assert_eq!(
        resent[0].packet_id,
        Some(sent_id),
        "the id the client may hold"
    );
    assert!(resent[0].dup, "DUP = 1: it may have been received");
    assert_eq!(&resent[0].payload[..], b"sent");
}

/// The client resumed here from raft, then reconnected here again (a newer claim, the same
/// session) before the old owner's late hand-over came: its messages still join the session
/// (found by the simulation, halyard-sim seed 147). After a clean start they do not.
#[test]
fn a_late_hand_over_joins_the_session_resumed_again_here_but_not_a_clean_start() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let now = Instant::now();
    let mut a = Node::open(dir_a.path(), BrokerParts::replicated(), now);
    let mut b = Node::open(dir_b.path(), BrokerParts::replicated(), now);
    a.send(1, connect(V5, "roamer", false, Some(3600)));
    a.granted(1, 10);
    a.send(1, subscribe("late/#", QoS::AtLeastOnce, 1));
    a.send(2, connect(V5, "feeder", true, None));
    a.granted(2, 11);
    a.take(1);
    for id in 1..=5u16 {
        a.send(2, publish("late/item", b"w", QoS::AtLeastOnce, id));
    }
    let state = a
        .broker
        .fence(a.now, SystemTime::now(), "roamer", 12, 2)
        .expect("A held it under epoch 10");
    b.resume_from_raft(5, &state, 12);
    b.take(5);
    // The client reconnects to B: B's own claim, epoch 13, resumes the same session.
    b.send(6, connect(V5, "roamer", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    b.settle(
        6,
        ClaimOutcome::Granted {
            epoch: 13,
            session: None,
            packet_ids: PacketIds::ALL,
        },
    );
    assert_eq!(connack(&b.take(6)), (true, ReasonCode::SUCCESS));
    assert_eq!(
        b.broker
            .merge_late_session(b.now, SystemTime::now(), 12, (*state).clone()),
        5,
        "the session B took under epoch 12 is still the one it holds"
    );
    b.drain();
    assert_eq!(publishes(&b.take(6)).len(), 5);

    b.send(7, connect(V5, "roamer", true, Some(3600)));
    b.claims.pop_front().expect("claim");
    b.settle(
        7,
        ClaimOutcome::Granted {
            epoch: 14,
            session: None,
            packet_ids: PacketIds::ALL,
        },
    );
    assert_eq!(connack(&b.take(7)), (false, ReasonCode::SUCCESS));
    assert_eq!(
        b.broker
            .merge_late_session(b.now, SystemTime::now(), 12, *state),
        0,
        "a clean start began another session"
    );
}

/// A fenced cluster node drops every client: MQTT 5 ones hear the reason, persistent
/// sessions stay for a later resume or handover, and no will is published (as on shutdown).
#[test]
fn disconnect_all_closes_every_client_keeps_persistent_sessions_and_publishes_no_will() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    let mut with_will = match connect(V5, "persistent", false, Some(300)) {
        Packet::Connect(connect) => connect,
        _ => unreachable!(),
    };
    with_will.will = Some(Will {
        topic: "wills/persistent".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties::default(),
    });
    node.send(1, Packet::Connect(with_will));
    node.granted(1, 10);
    node.send(2, connect(V3, "passing", true, None));
    node.granted(2, 11);
    node.take(1);
    node.take(2);

    node.broker
        .disconnect_all(node.now, ReasonCode::USE_ANOTHER_SERVER, "fenced");
    node.drain();

    match node.take(1).as_slice() {
        [Packet::Disconnect(d)] => assert_eq!(d.reason, ReasonCode::USE_ANOTHER_SERVER),
        other => panic!("expected one DISCONNECT 0x9C, got {other:?}"),
    }
    assert!(node.take(2).is_empty(), "3.1.1 has no server DISCONNECT");
    node.closed.sort_unstable();
    assert_eq!(node.closed, vec![1, 2]);
    assert!(
        node.retains.is_empty(),
        "the retained will was not published"
    );
    assert_eq!(
        node.settled_wills,
        vec![("persistent".to_owned(), 10, 1, None)],
        "the will is discarded in raft too, so that no other node publishes it"
    );
    assert_eq!(
        node.broker.stats().sessions,
        1,
        "the persistent session stays"
    );
    assert_eq!(node.releases, vec![("passing".to_owned(), 11)]);
}

/// A session moved by the claim at index 12 gets every message once, whichever node
/// routed it and whenever it arrives: those routed before the claim through its old
/// owner (queued there, or passed on after the hand-over, addressed to the session),
/// those routed at or after it through its new owner (held while the claim is pending).
#[test]
fn a_moving_session_gets_each_message_once_whichever_node_routed_it() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let now = Instant::now();
    let mut a = Node::open_at(dir_a.path(), BrokerParts::replicated(), now);
    let mut b = Node::open_at(dir_b.path(), BrokerParts::replicated(), now);
    a.send(1, connect(V5, "traveller", false, Some(3600)));
    a.granted(1, 10);
    a.send(1, subscribe("mv/#", QoS::AtLeastOnce, 1));
    a.broker.set_route_version(11);
    b.broker.set_route_version(11);
    a.send(1, Packet::Disconnect(halyard_codec::Disconnect::default()));
    a.take(1);
    a.broker.handle_forward(
        a.now,
        3,
        routed(
            Some((9, 1)),
            message("mv/1", b"queued-on-a", QoS::AtLeastOnce),
            &[],
            11,
        ),
    );
    a.drain();

    // B's claim of the session is pending; what reaches B meanwhile is held.
    b.send(5, connect(V5, "traveller", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    let stale = routed(
        Some((9, 2)),
        message("mv/2", b"stale", QoS::AtLeastOnce),
        &[],
        11,
    );
    b.broker.handle_forward(b.now, 3, stale.clone());
    let fresh = routed(
        Some((9, 3)),
        message("mv/3", b"at-claim", QoS::AtLeastOnce),
        &[],
        12,
    );
    b.broker.handle_forward(b.now, 3, fresh);
    b.drain();
    assert!(b.take(5).is_empty(), "no CONNACK yet, nothing delivered");

    // The claim at 12 is applied on A: the session leaves with what was queued for it.
    let state = a
        .broker
        .fence(a.now, SystemTime::now(), "traveller", 12, 2)
        .expect("A held it");
    a.broker.set_route_version(12);
    assert_eq!(state.pending.len(), 1, "queued on A, carried along");
    a.forwards.clear();
    let ForwardOffer::Early(early) = a.broker.offer_forward(
        a.now,
        3,
        routed(
            Some((9, 4)),
            message("mv/4", b"later", QoS::AtLeastOnce),
            &[],
            13,
        ),
    ) else {
        panic!("a forward routed at a version not reached here waits");
    };
    assert_eq!(early.routed_at, 13);
    // Routed at 11 by node 3 (and by B itself) to A, where the session was then: passed on.
    a.broker.handle_forward(
        a.now,
        3,
        routed(Some((9, 5)), stale.message.clone(), &[], 11),
    );
    let from_b = routed(
        Some((8, 1)),
        message("mv/5", b"from-b", QoS::AtLeastOnce),
        &[],
        11,
    );
    a.broker.handle_forward(a.now, 2, from_b);
    // Routed at 12: node 3 sent it to B already.
    a.broker.handle_forward(
        a.now,
        3,
        routed(
            Some((9, 6)),
            message("mv/3", b"at-claim", QoS::AtLeastOnce),
            &[],
            12,
        ),
    );
    a.drain();
    let relayed: Vec<&Forwarded> = a.forwards.iter().collect();
    assert_eq!(
        relayed.len(),
        2,
        "the two routed before the claim: {relayed:?}"
    );
    for forward in &relayed {
        assert_eq!(forward.0, 2, "to the new owner");
        assert!(forward.3.is_some(), "through the outbox");
        assert_eq!(
            forward.4.as_deref(),
            Some("traveller"),
            "for the session alone"
        );
    }
    for (node, message, groups, _, for_session, exchange) in a.forwards.drain(..) {
        assert_eq!(node, 2);
        let forward = PeerForward {
            stored_as: None,
            message: (*message).clone(),
            groups,
            routed_at: 12,
            for_session,
            exchange,
        };
        b.broker.handle_forward(b.now, 1, forward);
    }
    b.drain();

    b.settle(
        5,
        ClaimOutcome::Granted {
            epoch: 12,
            session: Some(state),
            packet_ids: PacketIds::ALL,
        },
    );
    let packets = b.take(5);
    assert_eq!(connack(&packets), (true, ReasonCode::SUCCESS));
    assert_eq!(
        sorted_payloads(&packets),
        vec![
            Bytes::from_static(b"at-claim"),
            Bytes::from_static(b"from-b"),
            Bytes::from_static(b"queued-on-a"),
            Bytes::from_static(b"stale"),
        ],
        "each once: {packets:?}"
    );

    // Once the session is here, routing here gives it what was routed at 12 or later only.
    b.broker.handle_forward(
        b.now,
        3,
        routed(
            Some((9, 7)),
            message("mv/6", b"old-route", QoS::AtLeastOnce),
            &[],
            11,
        ),
    );
    b.broker.handle_forward(
        b.now,
        3,
        routed(
            Some((9, 8)),
            message("mv/7", b"new-route", QoS::AtLeastOnce),
            &[],
            12,
        ),
    );
    b.drain();
    let later: Vec<Bytes> = publishes(&b.take(5))
        .into_iter()
        .map(|publish| publish.payload)
        .collect();
    assert_eq!(later, vec![Bytes::from_static(b"new-route")]);

    // A relays only inside the window.
    a.now += RELAY_WINDOW + Duration::from_secs(1);
    a.broker.handle_forward(
        a.now,
        3,
        routed(
            Some((9, 9)),
            message("mv/8", b"x", QoS::AtLeastOnce),
            &[],
            11,
        ),
    );
    a.drain();
    assert!(a.forwards.is_empty(), "not after the relay window");
}

/// Nodes A and B on real stores, and the session of `client_id` (subscribed to `mv/#`) that
/// A held under claim 10 and hands over for B's claim `to`.
fn moved_session(
    client_id: &str,
    to: u64,
) -> (
    tempfile::TempDir,
    tempfile::TempDir,
    Node,
    Box<SessionState>,
) {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let now = Instant::now();
    let mut a = Node::open_at(dir_a.path(), BrokerParts::replicated(), now);
    let b = Node::open_at(dir_b.path(), BrokerParts::replicated(), now);
    a.send(1, connect(V5, client_id, false, Some(3600)));
    a.granted(1, 10);
    a.send(1, subscribe("mv/#", QoS::AtLeastOnce, 1));
    let state = a
        .broker
        .fence(a.now, SystemTime::now(), client_id, to, 2)
        .expect("A held it");
    (dir_a, dir_b, b, state)
}

/// Two claims of one client id pending on a node (the client gave up on the first and
/// connected again): what was routed to the node under the first claim reaches the session
/// once, when the second claim brings it; a claim overtaken by another node's hands the
/// copies routed for it to that node, addressed to the session.
#[test]
fn an_overtaken_claim_hands_what_was_routed_for_it_on_once() {
    let (_dir_a, _dir_b, mut b, state) = moved_session("roamer", 12);
    b.broker.set_route_version(11);
    b.send(5, connect(V5, "roamer", false, Some(3600)));
    b.claims.pop_front().expect("first claim");
    b.send(6, connect(V5, "roamer", false, Some(3600)));
    b.claims.pop_front().expect("second claim");
    b.broker.set_route_version(14);
    b.forwarded(
        "mv/x",
        &[
            (b"before-both", 11, 1),
            (b"for-first", 12, 2),
            (b"also-first", 13, 3),
            (b"for-second", 14, 4),
        ],
    );

    // The first claim (12) was overtaken by the second (14), on this node.
    b.broker
        .handle_superseded_claim(b.now, SystemTime::now(), 5, 12, 14, None);
    b.drain();
    assert_eq!(connack(&b.take(5)), (false, ReasonCode::SERVER_UNAVAILABLE));
    assert!(b.forwards.is_empty(), "the newer claim is this node's");
    assert_eq!(
        b.granted_with(6, 14, state),
        vec![
            Bytes::from_static(b"also-first"),
            Bytes::from_static(b"for-first"),
            Bytes::from_static(b"for-second"),
        ],
        "each once, and nothing routed before the first claim (A had it)"
    );

    // Overtaken by another node's claim: the copies routed for it go there, addressed.
    b.send(7, connect(V5, "wanderer", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    b.broker.set_route_version(20);
    b.forwarded(
        "elsewhere/x",
        &[(b"mine", 20, 5), (b"newer-owner's", 22, 6)],
    );
    b.forwards.clear();
    b.broker
        .handle_superseded_claim(b.now, SystemTime::now(), 7, 20, 22, Some(3));
    b.drain();
    let passed: Vec<(u64, Bytes, Option<Arc<str>>)> = b
        .forwards
        .drain(..)
        .map(|(node, message, _, _, for_session, _)| (node, message.payload.clone(), for_session))
        .collect();
    assert_eq!(
        passed,
        vec![(3, Bytes::from_static(b"mine"), Some(Arc::from("wanderer")))],
        "only what was routed between the two claims"
    );
}

/// The newer of two pending claims gets the session first: what was routed under the older
/// claim waits, and reaches the session once the older claim is overtaken; what the newer
/// claim delivered is not delivered again.
#[test]
fn an_older_claim_overtaken_after_the_newer_got_the_session_adds_only_its_own_copies() {
    let (_dir_a, _dir_b, mut b, state) = moved_session("roamer", 14);
    b.send(5, connect(V5, "roamer", false, Some(3600)));
    b.claims.pop_front().expect("older claim");
    b.send(6, connect(V5, "roamer", false, Some(3600)));
    b.claims.pop_front().expect("newer claim");
    b.broker.set_route_version(14);
    b.forwarded("mv/x", &[(b"under-older", 12, 1), (b"under-newer", 14, 2)]);
    assert_eq!(
        b.granted_with(6, 14, state),
        vec![Bytes::from_static(b"under-newer")]
    );
    // Another client's claim settles meanwhile: the copies still wait for the older claim.
    b.send(8, connect(V5, "bystander", false, Some(3600)));
    b.claims.pop_front().expect("bystander's claim");
    b.granted(8, 15);
    b.broker
        .handle_superseded_claim(b.now, SystemTime::now(), 5, 12, 14, None);
    b.drain();
    let later: Vec<Bytes> = publishes(&b.take(6))
        .into_iter()
        .map(|p| p.payload)
        .collect();
    assert_eq!(
        later,
        vec![Bytes::from_static(b"under-older")],
        "the older claim's copy, once; the newer's not again"
    );
}

/// In a cluster a due will is not published at once: it is first taken out of raft, where
/// the claim keeps it for the survivors, and published only by the node that won it
/// [MQTT-3.1.2-8]; a DISCONNECT 0x00 discards it there [MQTT-3.1.2-10].
#[test]
fn a_cluster_node_publishes_a_will_only_after_winning_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    node.send(1, connect(V5, "watcher", true, None));
    node.granted(1, 1);
    node.send(
        1,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: "wills/#".into(),
                options: SubscriptionOptions::default(),
            }],
            properties: Properties::default(),
        }),
    );
    node.take(1);
    let will = Will {
        topic: "wills/lost".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    };
    let mut with_will = match connect(V5, "lost", true, None) {
        Packet::Connect(connect) => connect,
        _ => unreachable!(),
    };
    with_will.will = Some(will.clone());
    node.send(2, Packet::Connect(with_will.clone()));
    let claim = node.claims.pop_back().expect("a claim");
    assert_eq!(
        claim.will.as_deref(),
        Some(&will),
        "the claim carries the will"
    );
    node.granted(2, 5);

    node.broker.connection_lost(node.now, 2);
    node.drain();
    assert!(node.take(1).is_empty(), "not published before it is won");
    let (client_id, epoch, publisher, won) = node.settled_wills.pop().expect("settled");
    assert_eq!((client_id.as_str(), epoch), ("lost", 5));
    let won = won.expect("a will to publish");
    node.broker.publish_settled_will(node.now, publisher, won);
    node.drain();
    match node.take(1).as_slice() {
        [Packet::Publish(p)] => assert_eq!(&p.payload[..], b"gone"),
        other => panic!("expected the will, got {other:?}"),
    }

    node.send(3, Packet::Connect(with_will));
    node.granted(3, 6);
    node.send(
        3,
        Packet::Disconnect(halyard_codec::Disconnect {
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }),
    );
    let discarded: Vec<_> = node
        .settled_wills
        .iter()
        .map(|(client_id, epoch, _, will)| (client_id.as_str(), *epoch, will.is_some()))
        .collect();
    assert_eq!(
        discarded,
        vec![("lost", 6, false)],
        "DISCONNECT 0x00 discards it in raft"
    );
}

/// A claim that brought a session here after another node's claim overtook it was the
/// owner only up to that claim: when the session moves on, what reaches this node routed
/// from the overtaking claim on is not passed on (it went to that claim's node); and two
/// windows of one client that overlap pass a message on once (halyard-sim seeds 56, 80).
#[test]
fn a_relay_ends_at_the_claim_that_overtook_it_and_passes_each_message_on_once() {
    let (_dir_a, _dir_b, mut b, state) = moved_session("roamer", 12);
    b.send(5, connect(V5, "roamer", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    assert!(
        b.broker
            .fence(b.now, SystemTime::now(), "roamer", 14, 3)
            .is_none(),
        "nothing held here yet"
    );
    b.granted_with(5, 12, state);
    let moved_on = b
        .broker
        .fence(b.now, SystemTime::now(), "roamer", 16, 3)
        .expect("held here");
    b.broker.set_route_version(16);
    b.forwards.clear();
    b.forwarded("mv/x", &[(b"ours", 13, 1), (b"the-overtaker's", 14, 2)]);
    let passed = b.passed_on();
    assert_eq!(passed, vec![Bytes::from_static(b"ours")]);

    // Two claims of one client resume here one after the other and each moves on: their
    // windows overlap from the second claim on.
    b.send(6, connect(V5, "roamer", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    b.send(7, connect(V5, "roamer", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    b.granted_with(6, 18, moved_on.clone());
    b.broker
        .fence(b.now, SystemTime::now(), "roamer", 30, 3)
        .expect("held here");
    b.granted_with(7, 20, moved_on);
    b.broker
        .fence(b.now, SystemTime::now(), "roamer", 30, 3)
        .expect("held here");
    b.broker.set_route_version(30);
    b.forwards.clear();
    b.forwarded("mv/x", &[(b"in-both", 21, 3), (b"in-first", 19, 4)]);
    let passed = b.passed_on();
    assert_eq!(
        passed,
        vec![
            Bytes::from_static(b"in-both"),
            Bytes::from_static(b"in-first")
        ]
    );
}

/// A's QoS 2 subscriber `exact` got `received` and sent PUBREC for it and, with
/// `unreceived`, also got `unreceived` and sent nothing, before claim 12 (B's) fenced it: node
/// B, the session A hands over, and the two packet ids.
fn open_qos2_exchanges(
    unreceived: bool,
) -> (
    tempfile::TempDir,
    tempfile::TempDir,
    Node,
    Box<SessionState>,
    u16,
    Option<u16>,
) {
    let (dir_a, dir_b, mut a, b) = subscriber_and_feeder("exact", false, "q2/#", QoS::ExactlyOnce);
    a.take(1);
    a.send(2, publish("q2/a", b"received", QoS::ExactlyOnce, 1));
    if unreceived {
        a.send(2, publish("q2/b", b"unreceived", QoS::ExactlyOnce, 2));
    }
    let sent = publishes(&a.take(1));
    assert_eq!(sent.len(), 1 + usize::from(unreceived));
    let received_id = sent[0].packet_id.expect("QoS 2");
    a.send(
        1,
        Packet::PubRec(PubResponse {
            packet_id: received_id,
            ..Default::default()
        }),
    );
    let state = a
        .broker
        .fence(a.now, SystemTime::now(), "exact", 12, 2)
        .expect("A held it");
    let unreceived_id = sent.get(1).and_then(|publish| publish.packet_id);
    (dir_a, dir_b, b, state, received_id, unreceived_id)
}

/// A late hand-over for a session that has moved on since passes its open QoS 2 exchanges
/// on under their packet ids: the next node sends the unreceived message again under its id
/// with DUP = 1 and the received one's PUBREL, so the client neither loses nor repeats a
/// message and frees every id it holds [MQTT-4.3.3-8] (halyard-sim seeds 2, 189, 199, 237,
/// 294: they were passed on as new messages, under new ids).
#[test]
fn a_late_hand_over_passed_on_carries_its_open_qos2_exchanges_under_their_ids() {
    let (_dir_a, _dir_b, mut b, late, received_id, unreceived_id) = open_qos2_exchanges(true);
    let unreceived_id = unreceived_id.expect("sent");

    // B resumed from raft, and the session moved on to node 3 before A's hand-over came.
    b.resume_from_raft(5, &late, 12);
    b.take(5);
    let moved_on = b
        .broker
        .fence(b.now, SystemTime::now(), "exact", 14, 3)
        .expect("B held it");
    b.forwards.clear();
    assert_eq!(
        b.broker
            .merge_late_session(b.now, SystemTime::now(), 12, *late),
        2
    );
    b.drain();
    let passed: Vec<(u64, Bytes, Option<OpenExchange>)> = b
        .forwards
        .iter()
        .map(|(node, message, _, _, _, exchange)| (*node, message.payload.clone(), *exchange))
        .collect();
    assert_eq!(
        passed,
        vec![
            (
                3,
                Bytes::from_static(b"received"),
                Some(OpenExchange::Received(received_id))
            ),
            (
                3,
                Bytes::from_static(b"unreceived"),
                Some(OpenExchange::Unreceived(unreceived_id))
            ),
        ]
    );

    let dir_c = tempfile::tempdir().expect("tempdir");
    let mut c = Node::open(dir_c.path(), BrokerParts::replicated(), b.now);
    c.send(9, connect(V5, "exact", false, Some(3600)));
    c.claims.pop_front().expect("claim");
    assert!(c.granted_with(9, 14, moved_on).is_empty());
    for (_, message, groups, seq, for_session, exchange) in b.forwards.drain(..) {
        let forward = PeerForward {
            stored_as: seq.map(|seq| (8, seq)),
            message: (*message).clone(),
            groups,
            routed_at: 14,
            for_session,
            exchange,
        };
        c.broker.handle_forward(c.now, 2, forward);
    }
    c.drain();
    let packets = c.take(9);
    assert!(
        packets.iter().any(|packet| matches!(
            packet,
            Packet::PubRel(rel) if rel.packet_id == received_id
        )),
        "the received one's PUBREL: {packets:?}"
    );
    let resent = publishes(&packets);
    assert_eq!(resent.len(), 1, "only the unreceived one: {resent:?}");
    assert_eq!(resent[0].packet_id, Some(unreceived_id));
    assert!(resent[0].dup);
    assert_eq!(&resent[0].payload[..], b"unreceived");
}

/// A QoS 2 message the client received from the old owner (PUBREC sent, no PUBCOMP yet)
/// is not sent again by a late hand-over, but gets its PUBREL under its id: without it the
/// client would hold the id for good, and take a later message under it for a resend
/// (halyard-sim seed 18 --no-kills lost one so).
#[test]
fn a_late_hand_over_releases_a_qos2_message_the_client_received() {
    let (_dir_a, _dir_b, mut b, state, received_id, _) = open_qos2_exchanges(false);
    b.resume_then_merge_late(5, state, 12, 1);
    let packets = b.take(5);
    assert!(
        publishes(&packets).is_empty(),
        "not sent again: {packets:?}"
    );
    assert!(
        packets.iter().any(|packet| matches!(
            packet,
            Packet::PubRel(rel) if rel.packet_id == received_id
        )),
        "its PUBREL: {packets:?}"
    );
    b.send(
        5,
        Packet::PubComp(PubResponse {
            packet_id: received_id,
            ..Default::default()
        }),
    );
    assert!(b.take(5).is_empty(), "complete");
}

/// A client connects to one node twice while its first claim waits, and the newer claim
/// gets the session: with no other node's claim between the two, this node was the owner
/// from the older claim on, so a forward routed in between that reaches it only now still
/// goes to the session, whichever of the two claims settles first (halyard-sim seeds 48,
/// 75, 143 --no-kills dropped such forwards).
#[test]
fn a_newer_claim_here_takes_what_is_routed_under_the_older_one_later() {
    for older_settles_first in [false, true] {
        let (_dir_a, _dir_b, mut b, state) = moved_session("twice", 12);
        b.send(5, connect(V5, "twice", false, Some(3600)));
        b.claims.pop_front().expect("older claim");
        b.send(6, connect(V5, "twice", false, Some(3600)));
        b.claims.pop_front().expect("newer claim");
        b.broker.set_route_version(14);
        if older_settles_first {
            b.broker
                .handle_superseded_claim(b.now, SystemTime::now(), 5, 12, 14, None);
            b.drain();
            assert!(b.granted_with(6, 14, state).is_empty());
        } else {
            assert!(b.granted_with(6, 14, state).is_empty());
            // The driver's raft state did not show the newer claim yet: a plain grant.
            b.granted(5, 12);
            b.take(5);
        }
        b.forwarded(
            "mv/x",
            &[
                (b"before-both", 11, 1),
                (b"under-older", 12, 2),
                (b"under-newer", 14, 3),
            ],
        );
        assert_eq!(
            sorted_payloads(&b.take(6)),
            vec![
                Bytes::from_static(b"under-newer"),
                Bytes::from_static(b"under-older"),
            ],
            "older settles first: {older_settles_first}"
        );
    }
}

/// A moved session's message that reaches a node with neither the session, a relay to
/// follow it, nor a claim waiting for it is dropped, and the drop is counted and reported
/// with the client id, like any other (`halyard_messages_dropped_total{reason="move_window"}`).
#[test]
fn a_moved_sessions_message_with_nowhere_to_go_is_counted_as_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::open(dir.path(), BrokerParts::replicated(), Instant::now());
    let forward = PeerForward {
        for_session: Some(Arc::from("gone")),
        ..routed(
            Some((9, 1)),
            message("mv/x", b"orphan", QoS::AtLeastOnce),
            &[],
            5,
        )
    };
    node.broker.handle_forward(node.now, 3, forward);
    node.drain();
    assert_eq!(node.broker.stats().move_window_dropped, 1);
    let report = node.broker.take_drop_report();
    assert_eq!(
        report.clients,
        vec![("gone".to_owned(), DropReason::MoveWindow, 1)]
    );
}

/// B's claim of `exact` under epoch 12, granted with `session` and numbering in the slice
/// of `generation`; then a QoS 2 message published on B: the packets `exact` got.
fn granted_in_generation_then_published(
    b: &mut Node,
    session: SessionState,
    generation: u32,
) -> Vec<Packet> {
    b.send(5, connect(V5, "exact", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    b.settle(
        5,
        ClaimOutcome::Granted {
            epoch: 12,
            session: Some(Box::new(session)),
            packet_ids: PacketIds::for_generation(generation),
        },
    );
    b.send(6, connect(V5, "feeder", true, None));
    b.granted(6, 13);
    b.send(6, publish("q2/c", b"after", QoS::ExactlyOnce, 1));
    b.take(5)
}

/// A node that resumes a session from raft (its owner was lost while the client held a QoS 2
/// exchange open) numbers in its own claim's slice. The client takes a PUBLISH under an
/// identifier it holds as a resend and does not deliver it [MQTT-4.3.3-9], so reusing the
/// lost owner's identifiers lost messages (halyard-sim seeds 11, 88, 100, 141, 222 of the
/// full profile: the new owner numbered from 1 again).
#[test]
fn a_session_resumed_from_raft_numbers_apart_from_the_lost_owner() {
    let (_dir_a, _dir_b, mut b, state, received_id, _) = open_qos2_exchanges(false);
    let from_raft = SessionState {
        inflight: Vec::new(),
        pending: Vec::new(),
        inbound_qos2: Vec::new(),
        delayed_will: None,
        ..*state
    };
    let packets = granted_in_generation_then_published(&mut b, from_raft, 1);
    assert_eq!(connack(&packets), (true, ReasonCode::SUCCESS));
    let sent = publishes(&packets);
    assert_eq!(sent.len(), 1, "{packets:?}");
    let id = sent[0].packet_id.expect("QoS 2");
    assert_ne!(id, received_id, "the id the client still holds");
    assert!(PacketIds::for_generation(1).contains(id), "id {id}");
}

/// A session handed over keeps its open exchanges under their identifiers and numbers what
/// it sends from then on in the new claim's slice.
#[test]
fn a_session_handed_over_keeps_its_ids_and_numbers_new_messages_in_its_claims_slice() {
    let (_dir_a, _dir_b, mut b, state, received_id, unreceived_id) = open_qos2_exchanges(true);
    let unreceived_id = unreceived_id.expect("sent");
    let packets = granted_in_generation_then_published(&mut b, *state, 1);
    assert!(packets
        .iter()
        .any(|packet| matches!(packet, Packet::PubRel(rel) if rel.packet_id == received_id)));
    let ids: Vec<(u16, bool)> = publishes(&packets)
        .iter()
        .map(|publish| (publish.packet_id.expect("QoS 2"), publish.dup))
        .collect();
    assert_eq!(
        ids,
        vec![
            (unreceived_id, true),
            (PacketIds::for_generation(1).first(), false)
        ]
    );
}

/// A claim refused here because raft's answer was lost, whose entry committed after all,
/// leaves this node the owner of record: the session is held here without a connection
/// (as raft holds it), so what is routed here for it and the old owner's hand-over are kept
/// and go with it to the next owner (halyard-sim seeds 167, 212, 282 --no-partitions
/// dropped both).
#[test]
fn a_claim_that_committed_after_it_was_refused_holds_its_session_without_a_connection() {
    let (_dir_a, _dir_b, mut b, state) = moved_session("orphan", 12);
    b.broker.set_route_version(12);
    b.send(5, connect(V5, "orphan", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    b.settle(5, ClaimOutcome::Refused);
    assert_eq!(connack(&b.take(5)), (false, ReasonCode::SERVER_UNAVAILABLE));

    let from_raft = SessionState {
        inflight: Vec::new(),
        pending: Vec::new(),
        ..(*state).clone()
    };
    assert!(b
        .broker
        .adopt_orphaned_claim(b.now, SystemTime::now(), 12, from_raft.clone()));
    assert!(
        !b.broker
            .adopt_orphaned_claim(b.now, SystemTime::now(), 12, from_raft),
        "held already"
    );
    b.drain();
    b.forwarded("mv/x", &[(b"routed-here", 12, 1)]);
    b.broker
        .merge_late_session(b.now, SystemTime::now(), 12, *state);
    b.drain();

    let moved = b
        .broker
        .fence(b.now, SystemTime::now(), "orphan", 14, 3)
        .expect("held here");
    assert_eq!(moved.subscriptions.len(), 1, "raft's subscription");
    let payloads: Vec<&[u8]> = moved
        .pending
        .iter()
        .map(|delivery| delivery.message.payload.as_ref())
        .collect();
    assert_eq!(payloads, vec![&b"routed-here"[..]]);
}

/// The relay a hand-over starts is stored in the hand-over's commit: a node restarted within
/// the relay window still passes on, addressed to the session, what its peers' outboxes
/// replay to it for the session that moved (halyard-sim seeds 40, 165, 192 --no-partitions
/// lost such messages with the relay when the node was killed).
#[test]
fn a_relay_outlives_a_restart_within_its_window() {
    let dir_b = tempfile::tempdir().expect("tempdir");
    let (_dir_a, _unused, mut b, state) = moved_session("roamer", 12);
    drop(b);
    b = Node::open(dir_b.path(), BrokerParts::replicated(), Instant::now());
    b.send(5, connect(V5, "roamer", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    b.granted_with(5, 12, state);
    b.broker
        .fence(b.now, SystemTime::now(), "roamer", 16, 3)
        .expect("held here");
    b.drain();
    drop(b);

    let mut restarted = Node::open(dir_b.path(), BrokerParts::replicated(), Instant::now());
    restarted.forwarded("mv/x", &[(b"replayed", 13, 1), (b"not-ours", 16, 2)]);
    let forwards: Vec<(u64, Bytes, Option<Arc<str>>)> = restarted
        .forwards
        .drain(..)
        .map(|(node, message, _, _, for_session, _)| (node, message.payload.clone(), for_session))
        .collect();
    assert_eq!(
        forwards,
        vec![(
            3,
            Bytes::from_static(b"replayed"),
            Some(Arc::from("roamer"))
        )]
    );
}

/// A node cut off while its client's session moved on still holds the session under its
/// old claim and queues what is routed to it there. When a claim here later brings the
/// session back from the other node, the connection of the old claim is taken over and
/// its messages join the session that arrives (halyard-sim seed 227 --no-kills dropped
/// them with the old session).
#[test]
fn a_session_arriving_over_an_older_one_held_here_keeps_what_the_older_one_took() {
    let (_dir_a, _dir_b, mut b, state) = moved_session("stale", 12);
    b.broker.set_route_version(LATEST);
    b.send(1, connect(V5, "stale", false, Some(3600)));
    b.granted(1, 8);
    b.send(1, subscribe("mv/#", QoS::AtLeastOnce, 1));
    b.forwarded("mv/x", &[(b"taken-under-8", 9, 1)]);
    assert_eq!(publishes(&b.take(1)).len(), 1, "sent, not acknowledged");

    b.send(5, connect(V5, "stale", false, Some(3600)));
    b.claims.pop_front().expect("claim");
    let delivered = b.granted_with(5, 14, state);
    assert_eq!(delivered, vec![Bytes::from_static(b"taken-under-8")]);
    assert!(
        b.closed.contains(&1),
        "the old claim's connection is taken over"
    );
}
