//! What a reconnect to a persistent session writes to the store (issue 14, reconnect cost):
//! with the default `storage.fsync = "always"` every batch that writes costs an fsync, so a
//! session record that did not change must not be written again. A session that never
//! expires (MQTT 5 expiry 0xFFFFFFFF, MQTT 3.x clean session 0) disconnects without a write;
//! one with a finite expiry writes when it expires. After a failed commit, the record is
//! written again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use halyard_codec::{Connect, Disconnect, Packet, Properties, ProtocolVersion};
use halyard_core::store::{
    DeliveryState, LoadedState, PeerMark, RetainedPage, SessionRecord, Store, StoreError,
    StoredDelivery, StoredForward, StoredMessage, StoredRelay,
};
use halyard_core::{Broker, BrokerConfig, ConnectionId, NodeId, Output, SubscriptionEntry};
use halyard_store::MemoryStore;

/// A [`MemoryStore`] that counts session records written and can fail its next commit.
struct Counting {
    inner: MemoryStore,
    session_writes: Arc<AtomicUsize>,
    fail_next_commit: Arc<AtomicBool>,
}

impl Store for Counting {
    fn load(&mut self) -> Result<LoadedState, StoreError> {
        self.inner.load()
    }
    fn put_session(&mut self, record: &SessionRecord) {
        self.session_writes.fetch_add(1, Ordering::Relaxed);
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
        if self.fail_next_commit.swap(false, Ordering::Relaxed) {
            return Err(StoreError::new("injected commit failure"));
        }
        self.inner.commit()
    }
}

struct Harness {
    broker: Broker,
    now: Instant,
    session_writes: Arc<AtomicUsize>,
    fail_next_commit: Arc<AtomicBool>,
    next_conn: ConnectionId,
}

impl Harness {
    fn new() -> Harness {
        let session_writes = Arc::new(AtomicUsize::new(0));
        let fail_next_commit = Arc::new(AtomicBool::new(false));
        let store = Counting {
            inner: MemoryStore::default(),
            session_writes: Arc::clone(&session_writes),
            fail_next_commit: Arc::clone(&fail_next_commit),
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
            session_writes,
            fail_next_commit,
            next_conn: 1,
        }
    }

    fn writes(&self) -> usize {
        self.session_writes.load(Ordering::Relaxed)
    }

    /// Hands `packet` in and commits it; returns whether the commit succeeded.
    fn send(&mut self, conn: ConnectionId, packet: Packet) -> bool {
        self.broker.handle_packet(self.now, conn, packet);
        let committed = self.broker.commit().is_ok();
        while self.broker.poll_output().is_some() {}
        committed
    }

    /// CONNECT (clean start 0, `expiry`) and CONNACK on a new connection; returns it.
    fn connect(&mut self, expiry: u32) -> ConnectionId {
        let conn = self.next_conn;
        self.next_conn += 1;
        let connect = Connect {
            protocol: ProtocolVersion::V5,
            clean_start: false,
            keep_alive: 0,
            client_id: "looping".into(),
            will: None,
            username: None,
            password: None,
            properties: Properties {
                session_expiry_interval: Some(expiry),
                ..Properties::default()
            },
        };
        self.broker
            .handle_packet(self.now, conn, Packet::Connect(Box::new(connect)));
        self.broker.commit().expect("commit");
        let mut connack = None;
        while let Some(output) = self.broker.poll_output() {
            if let Output::Send {
                packet: Packet::ConnAck(ack),
                ..
            } = output
            {
                connack = Some(ack.code);
            }
        }
        assert_eq!(connack.map(|c| c.0), Some(0), "CONNACK success");
        conn
    }

    fn disconnect(&mut self, conn: ConnectionId) -> bool {
        let committed = self.send(conn, Packet::Disconnect(Disconnect::default()));
        self.broker.connection_lost(self.now, conn);
        committed
    }
}

#[test]
fn a_session_that_never_expires_disconnects_without_writing_its_record() {
    let mut h = Harness::new();
    let conn = h.connect(u32::MAX);
    h.disconnect(conn);
    let after_first = h.writes();
    for _ in 0..10 {
        let before = h.writes();
        let conn = h.connect(u32::MAX);
        assert_eq!(
            h.writes(),
            before + 1,
            "the CONNECT writes the new fencing epoch"
        );
        h.disconnect(conn);
        assert_eq!(
            h.writes(),
            before + 1,
            "the DISCONNECT changes nothing in the record"
        );
    }
    assert_eq!(h.writes(), after_first + 10);
}

#[test]
fn a_session_with_an_expiry_writes_when_it_expires_at_each_disconnect() {
    let mut h = Harness::new();
    for _ in 0..5 {
        let before = h.writes();
        let conn = h.connect(86_400);
        h.disconnect(conn);
        assert_eq!(
            h.writes(),
            before + 2,
            "CONNECT (epoch) and DISCONNECT (expires-at) each write the record"
        );
    }
}

#[test]
fn after_a_failed_commit_the_unchanged_record_is_written_again() {
    let mut h = Harness::new();
    let conn = h.connect(u32::MAX);
    h.disconnect(conn);
    let conn = h.connect(u32::MAX);
    let before = h.writes();
    // A batch that failed was discarded: the store may not hold what was written before.
    h.fail_next_commit.store(true, Ordering::Relaxed);
    assert!(!h.send(conn, Packet::PingReq), "the injected failure");
    h.disconnect(conn);
    assert_eq!(
        h.writes(),
        before + 1,
        "the record is written again after the failure"
    );
}
