//! The durability seam: what the broker writes down so sessions, queues, in-flight state and
//! retained messages survive a restart or `kill -9`.
//!
//! The broker calls the write methods synchronously as its state changes; a backend gathers
//! them into one transaction and makes them durable in [`Store::commit`]. The server calls
//! `commit` after each batch of events and only then releases the packets the batch produced,
//! so a PUBACK or PUBREC never reaches a publisher before the message it acknowledges is on
//! disk, and many messages share one fsync (group commit). Reads see the writes of the open
//! transaction. Only persistent sessions (Session Expiry Interval > 0) are written.
//!
//! Times are wall-clock (`SystemTime`) here because they must mean the same after a restart;
//! the broker converts from its `Instant`s with an anchor taken when it was built.

use std::time::SystemTime;

use bytes::Bytes;
use halyard_codec::{Properties, QoS, Will};

use crate::message::{NodeId, OpenExchange};
pub use crate::retained::RetainedPage;
use crate::router::SubscriptionEntry;

/// A message as written to disk (retained, queued or in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Topic name.
    pub topic: String,
    /// Application data.
    pub payload: Bytes,
    /// QoS as published.
    pub qos: QoS,
    /// RETAIN as published.
    pub retain: bool,
    /// Forwarded properties.
    pub properties: Properties,
    /// Wall-clock expiry, if the message has a Message Expiry Interval.
    pub expires_at: Option<SystemTime>,
}

/// One message on its way to one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    /// The message.
    pub message: StoredMessage,
    /// QoS of this delivery.
    pub qos: QoS,
    /// RETAIN flag of this delivery.
    pub retain: bool,
    /// Subscription identifiers to send with it.
    pub subscription_ids: Vec<u32>,
}

/// Where a stored delivery is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Queued, not yet sent.
    Pending,
    /// Sent as QoS 1 with this packet id, awaiting PUBACK.
    AwaitingAck(u16),
    /// Sent as QoS 2 with this packet id, awaiting PUBREC.
    AwaitingReceipt(u16),
    /// PUBREC received and PUBREL sent for this packet id, awaiting PUBCOMP.
    AwaitingCompletion(u16),
}

/// Session-level facts that change rarely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Client identifier (the key).
    pub client_id: String,
    /// Fencing epoch of the claim this node holds the session under; kept so that a
    /// restarted node resumes its sessions under the claims it had, and a claim newer than
    /// it (another node's) fences it.
    pub epoch: u64,
    /// The session's `held_since` (see `Session`): late hand-overs from that claim on join it.
    pub held_since: u64,
    /// The session's `routes_from` (see `Session`): forwards routed before it are not its
    /// own here, however late they come after a restart.
    pub routes_from: u64,
    /// Session Expiry Interval in seconds (u32::MAX: never).
    pub expiry_interval: u32,
    /// When the session expires if it is offline.
    pub expires_at: Option<SystemTime>,
    /// A will waiting out its delay, and when it is due.
    pub delayed_will: Option<(SystemTime, Will)>,
}

/// A session as loaded at start-up. Queued (pending) deliveries are not loaded: the broker
/// reads them in pages with [`Store::read_pending`] as the client drains them, so a queue of
/// millions costs no memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedSession {
    /// Session-level facts.
    pub record: SessionRecord,
    /// Subscriptions by filter as the client wrote it.
    pub subscriptions: Vec<(String, SubscriptionEntry)>,
    /// Inbound QoS 2 packet ids PUBRECed and awaiting PUBREL.
    pub inbound_qos2: Vec<u16>,
    /// Deliveries in flight, by sequence number.
    pub inflight: Vec<(u64, StoredDelivery, DeliveryState)>,
    /// Lowest sequence number of a pending delivery, if any.
    pub first_pending: Option<u64>,
    /// Number of pending deliveries.
    pub pending_count: u64,
    /// Next sequence number to use (larger than any stored).
    pub next_seq: u64,
}

impl LoadedSession {
    /// A session with only its record: what a backend starts from before it adds the
    /// subscriptions, QoS 2 ids and deliveries it finds for the client.
    pub fn from_record(record: SessionRecord) -> LoadedSession {
        LoadedSession {
            record,
            subscriptions: Vec::new(),
            inbound_qos2: Vec::new(),
            inflight: Vec::new(),
            first_pending: None,
            pending_count: 0,
            next_seq: 0,
        }
    }
}

/// A QoS 1/2 publish on its way to another node of a cluster, kept in that node's outbox
/// from before the publisher's acknowledgement until the node has stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredForward {
    /// The message as published.
    pub message: StoredMessage,
    /// Share groups (`$share/{group}/{filter}`) the destination was picked to serve.
    pub groups: Vec<String>,
    /// The route version it was routed at (0 in records from before it was kept).
    pub routed_at: u64,
    /// The client id whose session alone gets it, for a moved session's message.
    pub for_session: Option<String>,
    /// With `for_session`, the QoS 2 exchange of it the old owner had open with the client.
    pub exchange: Option<OpenExchange>,
}

/// One destination's outbox as found at start-up: its forwards stay on disk and are read
/// with [`Store::read_forwards`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadedOutbox {
    /// Every forward up to this sequence number was acknowledged by the destination.
    pub acked_through: u64,
    /// The highest sequence number stored (0 if none).
    pub last_seq: u64,
    /// Forwards waiting.
    pub pending: u64,
}

/// The newest forward from `origin`, under its `incarnation`, that this node has stored:
/// the receiving side's duplicate filter, kept in the same commit as what the forward
/// delivered so that a replay after a crash on either side delivers nothing twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerMark {
    /// The sending node.
    pub origin: NodeId,
    /// Its incarnation (a node that lost its disk comes back as a new one).
    pub incarnation: u64,
    /// Its outbox sequence number.
    pub seq: u64,
}

/// A relay `fence` started (see `move_window`): messages routed here at versions
/// `from..to` that match `filters` were this node's to deliver to `client_id`'s session,
/// which moved to `node`; until `until` they are passed on to it. Stored so that a node
/// restarted within the window still passes on what its peers' outboxes replay to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRelay {
    /// The moved session's client id.
    pub client_id: String,
    /// Where it went.
    pub node: NodeId,
    /// Its filters (shared ones as their inner filter).
    pub filters: Vec<String>,
    /// First route version of the window.
    pub from: u64,
    /// The claim that moved it: the window ends before it; with the client id, the key.
    pub to: u64,
    /// When the relay ends.
    pub until: SystemTime,
}

/// Everything loaded at start-up. Retained messages are not loaded: the broker reads them
/// in pages with [`Store::read_retained`] as subscribers need them, so millions of them cost
/// no memory.
#[derive(Debug, Default)]
pub struct LoadedState {
    /// Persistent sessions.
    pub sessions: Vec<LoadedSession>,
    /// Forward outboxes by destination node (only nodes with an outbox record).
    pub outboxes: std::collections::BTreeMap<NodeId, LoadedOutbox>,
    /// Duplicate filters of the nodes that forwarded to this one.
    pub peer_marks: Vec<PeerMark>,
    /// Relays of sessions that moved on (expired ones too: the broker drops them).
    pub relays: Vec<StoredRelay>,
}

/// A storage failure. Either way the server releases no acknowledgement of the failed
/// batch, so nothing is acknowledged that is not durable. A [`StoreErrorKind::NoSpace`]
/// failure puts the broker in degraded mode until a [`Store::probe`] succeeds (see
/// `disk_full`); any other failed commit stops the broker.
#[derive(Debug, thiserror::Error)]
#[error("storage error: {message}")]
pub struct StoreError {
    /// What failed, for the log.
    pub message: String,
    /// Whether waiting can cure it.
    pub kind: StoreErrorKind,
}

/// What kind of storage failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The file system is full or the quota is used up (ENOSPC, EDQUOT): it passes when
    /// space is freed, without a restart.
    NoSpace,
    /// Anything else.
    Other,
}

impl StoreError {
    /// A failure of kind [`StoreErrorKind::Other`].
    pub fn new(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
            kind: StoreErrorKind::Other,
        }
    }

    /// A failure of kind [`StoreErrorKind::NoSpace`].
    pub fn no_space(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
            kind: StoreErrorKind::NoSpace,
        }
    }

    /// Whether the file system is out of space (or quota).
    pub fn is_no_space(&self) -> bool {
        self.kind == StoreErrorKind::NoSpace
    }
}

/// Whether an I/O error means "out of space": ENOSPC or EDQUOT.
pub fn io_is_no_space(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// A durable backend.
pub trait Store: Send {
    /// Reads everything back at start-up.
    fn load(&mut self) -> Result<LoadedState, StoreError>;
    /// Creates or updates a session record.
    fn put_session(&mut self, record: &SessionRecord);
    /// Deletes a session with its subscriptions, queue and QoS 2 state.
    fn delete_session(&mut self, client_id: &str);
    /// Adds or replaces a subscription.
    fn put_subscription(&mut self, client_id: &str, filter: &str, entry: &SubscriptionEntry);
    /// Removes a subscription.
    fn delete_subscription(&mut self, client_id: &str, filter: &str);
    /// Records an inbound QoS 2 packet id PUBRECed.
    fn put_inbound_qos2(&mut self, client_id: &str, packet_id: u16);
    /// Forgets an inbound QoS 2 packet id (PUBREL received).
    fn delete_inbound_qos2(&mut self, client_id: &str, packet_id: u16);
    /// Adds a delivery at `seq`, or updates its state.
    fn put_delivery(
        &mut self,
        client_id: &str,
        seq: u64,
        delivery: &StoredDelivery,
        state: DeliveryState,
    );
    /// Updates only the state of the delivery at `seq` (cheaper than rewriting it).
    fn set_delivery_state(&mut self, client_id: &str, seq: u64, state: DeliveryState);
    /// Removes the delivery at `seq` (acknowledged, expired or dropped).
    fn delete_delivery(&mut self, client_id: &str, seq: u64);
    /// Up to `limit` pending deliveries with sequence numbers >= `from`, in order. A backend
    /// logs a failure; the broker counts it (`BrokerStats::store_read_failures`), keeps the
    /// deliveries queued and reads them again later, so an error never loses a message.
    fn read_pending(
        &mut self,
        client_id: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredDelivery)>, StoreError>;
    /// Stores a retained message (replacing the topic's previous one).
    fn put_retained(&mut self, message: &StoredMessage);
    /// Removes the retained message of `topic`.
    fn delete_retained(&mut self, topic: &str);
    /// Up to `limit` retained messages matching `filter` (a valid, non-shared filter) after
    /// the cursor `after`, in [`retained_key`](crate::retained::retained_key) order, visiting
    /// at most [`RETAINED_SCAN_BUDGET`](crate::retained::RETAINED_SCAN_BUDGET) rows; like
    /// [`Store::read_pending`] it sees the open transaction's writes. Undecodable records met
    /// are logged and removed. Continue with [`RetainedPage::next`] until it is `None`.
    fn read_retained(
        &mut self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RetainedPage<StoredMessage>, StoreError>;
    /// Number of retained messages stored (for statistics; must not read the messages).
    fn retained_len(&self) -> usize;
    /// Puts a forward in the outbox of node `dest` at `seq` (increasing per destination).
    fn put_forward(&mut self, dest: NodeId, seq: u64, forward: &StoredForward);
    /// Node `dest` has stored every forward up to `through`: removes them and remembers
    /// `through`, so sequence numbers keep rising after a restart with an empty outbox.
    fn ack_forwards(&mut self, dest: NodeId, through: u64);
    /// Up to `limit` forwards for `dest` with sequence numbers > `after`, in order. Like
    /// [`Store::read_pending`], a failure is logged by the backend and the caller tries again
    /// later; undecodable records are logged and removed.
    fn read_forwards(
        &mut self,
        dest: NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredForward)>, StoreError>;
    /// Records the newest forward stored from a node (replacing its previous mark).
    fn put_peer_mark(&mut self, mark: &PeerMark);
    /// Stores a relay under (client id, `to`), replacing one stored there.
    fn put_relay(&mut self, relay: &StoredRelay);
    /// Removes the relay stored under (`client_id`, `to`), if any.
    fn delete_relay(&mut self, client_id: &str, to: u64);
    /// Makes every write so far durable (per the backend's fsync policy).
    fn commit(&mut self) -> Result<(), StoreError>;
    /// After a [`StoreErrorKind::NoSpace`] failure: tries a small durable write and returns
    /// `Ok` once the store takes writes again. Until then a backend may refuse writes and
    /// reads cheaply (its commits failing with `NoSpace` at once), since a full disk fails
    /// them anyway. The default commits.
    fn probe(&mut self) -> Result<(), StoreError> {
        self.commit()
    }
    /// Whether [`Store::commit`] could do I/O now (write or fsync), so that an async caller
    /// should run it where blocking is allowed. `false` promises a commit that returns at
    /// once; the default is the safe answer.
    fn commit_may_block(&self) -> bool {
        true
    }
}
