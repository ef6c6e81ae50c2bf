//! A store whose commits fail with "no space" degrades the broker instead of stopping it:
//! nothing unstored is acknowledged, QoS 1/2 publishes and new persistent sessions are
//! refused, QoS 0 and clean sessions are served, and a successful probe ends it all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use halyard_codec::{
    Connect, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions,
};
use halyard_core::store::{
    DeliveryState, LoadedState, PeerMark, RetainedPage, SessionRecord, Store, StoreError,
    StoredDelivery, StoredForward, StoredMessage, StoredRelay,
};
use halyard_core::{Broker, BrokerConfig, ConnectionId, NodeId, Output, SubscriptionEntry};
use halyard_store::MemoryStore;

const SUB: ConnectionId = 1;
const PUB5: ConnectionId = 2;
const PUB3: ConnectionId = 3;
const NEW_PERSISTENT: ConnectionId = 4;
const NEW_PERSISTENT_V3: ConnectionId = 5;
const CLEAN: ConnectionId = 6;

/// A [`Store`] whose commits and probes fail with a no-space error while `full` is set.
struct FillableStore {
    inner: MemoryStore,
    full: Arc<AtomicBool>,
}

impl FillableStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.full.load(Ordering::Relaxed) {
            return Err(StoreError::no_space(
                "committing: No space left on device (os error 28)",
            ));
        }
        Ok(())
    }
}

impl Store for FillableStore {
    fn load(&mut self) -> Result<LoadedState, StoreError> {
        self.inner.load()
    }
    fn put_session(&mut self, record: &SessionRecord) {
        self.inner.put_session(record);
    }
    fn delete_session(&mut self, client_id: &str) {
        self.inner.delete_session(client_id);
    }
    fn put_subscription(&mut self, client_id: &str, filter: &str, entry: &SubscriptionEntry) {
        self.inner.put_subscription(client_id, filter, entry);
    }
    fn delete_subscription(&mut self, client_id: &str, filter: &str) {
        self.inner.delete_subscription(client_id, filter);
    }
    fn put_inbound_qos2(&mut self, client_id: &str, packet_id: u16) {
        self.inner.put_inbound_qos2(client_id, packet_id);
    }
    fn delete_inbound_qos2(&mut self, client_id: &str, packet_id: u16) {
        self.inner.delete_inbound_qos2(client_id, packet_id);
    }
    fn put_delivery(
        &mut self,
        client_id: &str,
        seq: u64,
        delivery: &StoredDelivery,
        state: DeliveryState,
    ) {
        self.inner.put_delivery(client_id, seq, delivery, state);
    }
    fn set_delivery_state(&mut self, client_id: &str, seq: u64, state: DeliveryState) {
        self.inner.set_delivery_state(client_id, seq, state);
    }
    fn delete_delivery(&mut self, client_id: &str, seq: u64) {
        self.inner.delete_delivery(client_id, seq);
    }
    fn read_pending(
        &mut self,
        client_id: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredDelivery)>, StoreError> {
        self.inner.read_pending(client_id, from, limit)
    }
    fn put_retained(&mut self, message: &StoredMessage) {
        self.inner.put_retained(message);
    }
    fn delete_retained(&mut self, topic: &str) {
        self.inner.delete_retained(topic);
    }
    fn read_retained(
        &mut self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RetainedPage<StoredMessage>, StoreError> {
        self.inner.read_retained(filter, after, limit)
    }
    fn retained_len(&self) -> usize {
        self.inner.retained_len()
    }
    fn put_forward(&mut self, dest: NodeId, seq: u64, forward: &StoredForward) {
        self.inner.put_forward(dest, seq, forward);
    }
    fn ack_forwards(&mut self, dest: NodeId, through: u64) {
        self.inner.ack_forwards(dest, through);
    }
    fn read_forwards(
        &mut self,
        dest: NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredForward)>, StoreError> {
        self.check()?;
        self.inner.read_forwards(dest, after, limit)
    }
    fn put_peer_mark(&mut self, mark: &PeerMark) {
        self.inner.put_peer_mark(mark);
    }

    fn put_relay(&mut self, relay: &StoredRelay) {
        self.inner.put_relay(relay);
    }

    fn delete_relay(&mut self, client_id: &str, to: u64) {
        self.inner.delete_relay(client_id, to);
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.commit()
    }
}

/// A broker on a fillable store, driven without sockets the way the server drives it:
/// handle, commit (degrading on no space), then release the outputs.
struct Harness {
    broker: Broker,
    now: Instant,
    full: Arc<AtomicBool>,
}

impl Harness {
    fn new() -> Harness {
        let full = Arc::new(AtomicBool::new(false));
        let store = FillableStore {
            inner: MemoryStore::new(),
            full: Arc::clone(&full),
        };
        let now = Instant::now();
        let broker = Broker::with_store(
            BrokerConfig::default(),
            Box::new(store),
            now,
            SystemTime::now(),
        )
        .expect("load");
        Harness { broker, now, full }
    }

    /// Commits as the server does and returns the released outputs.
    fn release(&mut self) -> Vec<Output> {
        if let Err(error) = self.broker.commit() {
            assert!(error.is_no_space(), "only no-space failures are injected");
            self.broker.handle_disk_full(self.now);
        }
        std::iter::from_fn(|| self.broker.poll_output()).collect()
    }

    fn send(&mut self, conn: ConnectionId, packet: Packet) -> Vec<Output> {
        self.broker.handle_packet(self.now, conn, packet);
        self.release()
    }

    fn connect(&mut self, conn: ConnectionId, id: &str, version: ProtocolVersion, expiry: u32) {
        let connect = connect_packet(id, version, expiry);
        let outputs = self.send(conn, connect);
        assert_eq!(connack_code(&outputs, conn), Some(ReasonCode::SUCCESS));
    }

    fn publish(
        &mut self,
        conn: ConnectionId,
        qos: QoS,
        packet_id: u16,
        payload: &str,
    ) -> Vec<Output> {
        let publish = Publish {
            dup: false,
            qos,
            retain: false,
            topic: "t".into(),
            packet_id: (qos != QoS::AtMostOnce).then_some(packet_id),
            payload: Bytes::from(payload.to_owned()),
            properties: Properties::default(),
        };
        self.send(conn, Packet::Publish(publish))
    }
}

fn connect_packet(id: &str, version: ProtocolVersion, expiry: u32) -> Packet {
    let v5 = version == ProtocolVersion::V5;
    Packet::Connect(Box::new(Connect {
        protocol: version,
        // 3.1.1: a session that outlives the connection is asked for with clean session 0.
        clean_start: v5 || expiry == 0,
        keep_alive: 0,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            session_expiry_interval: v5.then_some(expiry),
            ..Properties::default()
        },
    }))
}

fn connack_code(outputs: &[Output], to: ConnectionId) -> Option<ReasonCode> {
    outputs.iter().find_map(|output| match output {
        Output::Send {
            conn,
            packet: Packet::ConnAck(ack),
        } if *conn == to => Some(ack.code),
        _ => None,
    })
}

/// The reason codes of the PUBACKs and PUBRECs sent to `to`.
fn acks(outputs: &[Output], to: ConnectionId) -> Vec<ReasonCode> {
    outputs
        .iter()
        .filter_map(|output| match output {
            Output::Send {
                conn,
                packet: Packet::PubAck(ack) | Packet::PubRec(ack),
            } if *conn == to => Some(ack.reason),
            _ => None,
        })
        .collect()
}

/// Payloads delivered to the subscriber.
fn delivered(outputs: &[Output]) -> Vec<Bytes> {
    outputs
        .iter()
        .filter_map(|output| match output {
            Output::Send {
                conn: SUB,
                packet: Packet::Publish(publish),
            } => Some(publish.payload.clone()),
            _ => None,
        })
        .collect()
}

fn subscribe(h: &mut Harness) {
    let subscribe = Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: "t".into(),
            options: SubscriptionOptions {
                qos: QoS::AtMostOnce,
                ..SubscriptionOptions::default()
            },
        }],
        properties: Properties::default(),
    };
    h.send(SUB, Packet::Subscribe(subscribe));
}

#[test]
fn a_full_store_degrades_then_recovers() {
    let mut h = Harness::new();
    h.connect(SUB, "sub", ProtocolVersion::V5, 0);
    subscribe(&mut h);
    h.connect(PUB5, "pub5", ProtocolVersion::V5, 0);
    h.connect(PUB3, "pub3", ProtocolVersion::V3_1_1, 0);
    let ok = h.publish(PUB5, QoS::AtLeastOnce, 1, "stored");
    assert_eq!(acks(&ok, PUB5), vec![ReasonCode::SUCCESS]);

    h.full.store(true, Ordering::Relaxed);
    // The batch whose commit fails: routed in memory, but its PUBACK becomes 0x97.
    let failed = h.publish(PUB5, QoS::AtLeastOnce, 2, "unstored");
    assert!(h.broker.is_disk_full());
    assert_eq!(acks(&failed, PUB5), vec![ReasonCode::QUOTA_EXCEEDED]);
    assert_eq!(delivered(&failed), vec![Bytes::from("unstored")]);
    // Degraded: refused up front, not routed.
    let refused = h.publish(PUB5, QoS::ExactlyOnce, 3, "qos2");
    assert_eq!(acks(&refused, PUB5), vec![ReasonCode::QUOTA_EXCEEDED]);
    assert!(delivered(&refused).is_empty());
    // QoS 0 needs no disk.
    let qos0 = h.publish(PUB5, QoS::AtMostOnce, 0, "qos0");
    assert_eq!(delivered(&qos0), vec![Bytes::from("qos0")]);
    // 3.1.1 cannot be told: no acknowledgement, reading pauses.
    let paused = h.publish(PUB3, QoS::AtLeastOnce, 7, "from 3.1.1");
    assert!(acks(&paused, PUB3).is_empty());
    assert!(paused.contains(&Output::Pause { conn: PUB3 }));
    assert!(delivered(&paused).is_empty());
    // New persistent sessions are refused; clean ones are served.
    let outputs = h.send(
        NEW_PERSISTENT,
        connect_packet("new", ProtocolVersion::V5, 3600),
    );
    assert_eq!(
        connack_code(&outputs, NEW_PERSISTENT),
        Some(ReasonCode::SERVER_UNAVAILABLE)
    );
    assert!(outputs.contains(&Output::Close {
        conn: NEW_PERSISTENT
    }));
    let outputs = h.send(
        NEW_PERSISTENT_V3,
        connect_packet("new3", ProtocolVersion::V3_1_1, 3600),
    );
    assert_eq!(
        connack_code(&outputs, NEW_PERSISTENT_V3),
        Some(ReasonCode::V3_SERVER_UNAVAILABLE)
    );
    h.connect(CLEAN, "clean", ProtocolVersion::V5, 0);
    let stats = h.broker.stats();
    assert!(stats.disk_full);
    assert_eq!(stats.disk_full_refusals, 5);

    // Still full: a probe fails and nothing changes.
    assert!(!h.broker.probe_store(h.now).expect("probe"));
    assert!(h.broker.is_disk_full());

    h.full.store(false, Ordering::Relaxed);
    assert!(h.broker.probe_store(h.now).expect("probe"));
    assert!(!h.broker.is_disk_full());
    // The paused 3.1.1 publish goes on: routed, acknowledged, and reading resumes.
    let resumed = h.release();
    assert_eq!(acks(&resumed, PUB3), vec![ReasonCode::SUCCESS]);
    assert_eq!(delivered(&resumed), vec![Bytes::from("from 3.1.1")]);
    assert!(resumed.contains(&Output::Resume { conn: PUB3 }));
    let accepted = h.publish(PUB5, QoS::AtLeastOnce, 4, "after");
    assert_eq!(acks(&accepted, PUB5), vec![ReasonCode::SUCCESS]);
    assert_eq!(delivered(&accepted), vec![Bytes::from("after")]);
    assert!(!h.broker.stats().disk_full);
}

/// A 3.1.1 publisher whose acknowledgement was in the failed batch loses it and its
/// connection, so it sends the message again on reconnect [MQTT-4.4.0-1].
#[test]
fn a_v3_ack_of_the_failed_batch_is_withheld_and_the_connection_closed() {
    let mut h = Harness::new();
    h.connect(PUB3, "pub3", ProtocolVersion::V3_1_1, 0);
    h.full.store(true, Ordering::Relaxed);
    let failed = h.publish(PUB3, QoS::AtLeastOnce, 1, "unstored");
    assert!(acks(&failed, PUB3).is_empty());
    assert!(failed.contains(&Output::Close { conn: PUB3 }));
    assert_eq!(h.broker.stats().disk_full_refusals, 1);
}

/// A QoS 2 publish refused in the failed batch is forgotten: the same packet id is then a
/// new message [MQTT-4.3.3-9], routed and acknowledged once space is back.
#[test]
fn a_refused_qos2_packet_id_is_released() {
    let mut h = Harness::new();
    h.connect(SUB, "sub", ProtocolVersion::V5, 0);
    subscribe(&mut h);
    h.connect(PUB5, "pub5", ProtocolVersion::V5, 0);
    h.full.store(true, Ordering::Relaxed);
    let failed = h.publish(PUB5, QoS::ExactlyOnce, 9, "first");
    assert_eq!(acks(&failed, PUB5), vec![ReasonCode::QUOTA_EXCEEDED]);
    h.full.store(false, Ordering::Relaxed);
    assert!(h.broker.probe_store(h.now).expect("probe"));
    let again = h.publish(PUB5, QoS::ExactlyOnce, 9, "second");
    assert_eq!(acks(&again, PUB5), vec![ReasonCode::SUCCESS]);
    assert_eq!(delivered(&again), vec![Bytes::from("second")]);
    let release = PubResponse {
        packet_id: 9,
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    };
    let outputs = h.send(PUB5, Packet::PubRel(release));
    assert!(outputs.iter().any(|output| matches!(
        output,
        Output::Send { conn: PUB5, packet: Packet::PubComp(comp) } if comp.reason == ReasonCode::SUCCESS
    )));
}
