//! A queue read that fails is handled like a failed commit: counted, never a silent loss.
//! The queued messages stay on disk and arrive, in order, once reads work again.

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
use halyard_store::{FsyncPolicy, MemoryStore, RedbStore};

/// More than the broker keeps of a persistent queue in memory, so most are read from disk.
const QUEUED: usize = 300;
const SUB: ConnectionId = 1;
const PUB: ConnectionId = 2;
/// The subscriber's second connection.
const SUB_AGAIN: ConnectionId = 3;

/// A [`Store`] whose reads of queues and outboxes fail while `failing` is set.
struct FailingReads<S> {
    inner: S,
    failing: Arc<AtomicBool>,
}

impl<S: Store> Store for FailingReads<S> {
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
        if self.failing.load(Ordering::Relaxed) {
            return Err(StoreError::new("injected read failure"));
        }
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
        if self.failing.load(Ordering::Relaxed) {
            return Err(StoreError::new("injected read failure"));
        }
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
        self.inner.commit()
    }
}

/// A broker on a store with switchable read failures, driven without sockets.
struct Harness {
    broker: Broker,
    now: Instant,
    failing: Arc<AtomicBool>,
    /// Payloads the subscriber received, in order.
    received: Vec<Bytes>,
}

impl Harness {
    fn new(store: impl Store + 'static) -> Harness {
        let failing = Arc::new(AtomicBool::new(false));
        let store = FailingReads {
            inner: store,
            failing: Arc::clone(&failing),
        };
        let now = Instant::now();
        let broker = Broker::with_store(
            BrokerConfig::default(),
            Box::new(store),
            now,
            SystemTime::now(),
        )
        .expect("load");
        Harness {
            broker,
            now,
            failing,
            received: Vec::new(),
        }
    }

    /// Hands a packet in, commits, and acknowledges every QoS 1 message the subscriber gets
    /// (which makes the broker pump its queue again) until it sends nothing more.
    fn send(&mut self, conn: ConnectionId, packet: Packet) {
        let mut inbound = vec![(conn, packet)];
        while let Some((conn, packet)) = inbound.pop() {
            self.broker.handle_packet(self.now, conn, packet);
            self.broker.commit().expect("commit");
            while let Some(output) = self.broker.poll_output() {
                if let Output::Send {
                    conn: to @ (SUB | SUB_AGAIN),
                    packet: Packet::Publish(publish),
                } = output
                {
                    self.received.push(publish.payload);
                    let ack = PubResponse {
                        packet_id: publish.packet_id.expect("QoS 1 has a packet id"),
                        reason: ReasonCode::SUCCESS,
                        properties: Properties::default(),
                    };
                    inbound.insert(0, (to, Packet::PubAck(ack)));
                }
            }
        }
    }

    fn connect(&mut self, conn: ConnectionId, id: &str, clean: bool, expiry: u32) {
        let properties = Properties {
            session_expiry_interval: Some(expiry),
            ..Properties::default()
        };
        let connect = Connect {
            protocol: ProtocolVersion::V5,
            clean_start: clean,
            keep_alive: 0,
            client_id: id.into(),
            will: None,
            username: None,
            password: None,
            properties,
        };
        self.send(conn, Packet::Connect(Box::new(connect)));
    }

    /// A persistent subscriber goes offline and `QUEUED` QoS 1 messages are queued for it.
    fn queue_for_offline_subscriber(&mut self) {
        self.connect(SUB, "sub", true, 3600);
        let subscribe = Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: "t".into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Properties::default(),
        };
        self.send(SUB, Packet::Subscribe(subscribe));
        self.broker.connection_lost(self.now, SUB);
        self.connect(PUB, "pub", true, 0);
        for n in 0..QUEUED {
            self.publish(n);
        }
    }

    /// One more message for the subscriber, numbered `n`.
    fn publish(&mut self, n: usize) {
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "t".into(),
            packet_id: Some(u16::try_from(n % 60_000 + 1).expect("fits")),
            payload: Bytes::from(n.to_string()),
            properties: Properties::default(),
        };
        self.send(PUB, Packet::Publish(publish));
    }

    fn failures(&self) -> u64 {
        self.broker.stats().store_read_failures
    }

    /// Reads work again; the next message for the subscriber finds its queue stalled and
    /// reads it: every message arrives, in order, the new one last.
    fn recover(&mut self) {
        self.failing.store(false, Ordering::Relaxed);
        self.publish(QUEUED);
        let expected: Vec<Bytes> = (0..=QUEUED).map(|n| Bytes::from(n.to_string())).collect();
        assert_eq!(self.received, expected);
    }
}

fn redb() -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RedbStore::open(dir.path(), FsyncPolicy::Never).expect("open");
    (dir, store)
}

/// The subscriber returns while reads fail: it gets what was in memory, then waits; nothing
/// is dropped, and once reads work the rest follows in order.
fn refill_keeps_the_queue(store: impl Store + 'static) {
    let mut h = Harness::new(store);
    h.queue_for_offline_subscriber();
    h.failing.store(true, Ordering::Relaxed);
    h.connect(SUB_AGAIN, "sub", false, 3600);
    let before = h.received.len();
    assert!(before < QUEUED, "reads fail, yet all {before} arrived");
    assert!(h.failures() > 0, "the failed reads are counted");
    assert_eq!(h.broker.stats().sessions, 2);

    h.recover();
}

#[test]
fn failed_refill_keeps_the_queue_on_redb() {
    let (_dir, store) = redb();
    refill_keeps_the_queue(store);
}

#[test]
fn failed_refill_keeps_the_queue_in_memory() {
    refill_keeps_the_queue(MemoryStore::new());
}

/// The subscriber returns with Session Expiry 0 while reads fail: the session cannot take its
/// disk queue back into memory, so it stays in the store (instead of being deleted with the
/// queue) until a read works.
fn leaving_persistence_keeps_the_queue(store: impl Store + 'static) {
    let mut h = Harness::new(store);
    h.queue_for_offline_subscriber();
    h.failing.store(true, Ordering::Relaxed);
    h.connect(SUB_AGAIN, "sub", false, 0);
    assert!(h.received.len() < QUEUED);
    let failures = h.failures();
    assert!(
        failures >= 2,
        "update_persistence and refill both count: {failures}"
    );

    h.recover();
}

#[test]
fn failed_read_leaving_persistence_keeps_the_queue_on_redb() {
    let (_dir, store) = redb();
    leaving_persistence_keeps_the_queue(store);
}

#[test]
fn failed_read_leaving_persistence_keeps_the_queue_in_memory() {
    leaving_persistence_keeps_the_queue(MemoryStore::new());
}
