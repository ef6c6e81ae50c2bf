//! Per-client session state: what survives a disconnect (subscriptions, queued and in-flight
//! messages, QoS 2 ids) and, while connected, the [`Link`] to the live network connection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_codec::{
    Disconnect, Packet, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, Will,
};

use crate::broker::ConnectionId;
use crate::footprint::{message_footprint, vec_footprint};
use crate::lazy::{LazyMap, LazySet};
use crate::memory_meter::{MemoryMeter, MeteredQueue, Weighed};
use crate::message::{Message, OpenExchange};
use crate::output::Output;
use crate::packet_ids::PacketIds;
use crate::router::SubscriptionEntry;
use crate::store::{DeliveryState, Store};
use crate::time::ClockAnchor;

/// The store with the clock anchor that converts the broker's `Instant`s for it.
pub(crate) struct Journal {
    pub store: Box<dyn Store>,
    pub clock: ClockAnchor,
    /// Failed commits so far: a batch that failed was discarded, so what a session noted as
    /// written before the failure may not be in the store (see `Session::recorded`).
    pub failed_commits: u64,
}
use crate::stats::{BrokerStats, DropReason, DropReport};

/// How many queued messages of a persistent session are kept in memory ahead of the
/// in-flight window; the rest stay on disk until the client drains the queue.
const PENDING_IN_MEMORY: usize = 64;

/// Where the broker's side effects go: packets for the server, counters, and the durable
/// journal. Kept apart from the session table so a session can be borrowed mutably while
/// it writes to them.
#[derive(Default)]
pub(crate) struct Outbox {
    pub outputs: VecDeque<Output>,
    pub stats: BrokerStats,
    pub journal: Option<Journal>,
    /// Drops not yet reported (see `Broker::take_drop_report`).
    pub drops: DropReport,
}

impl Outbox {
    pub fn send(&mut self, conn: ConnectionId, packet: Packet) {
        self.outputs.push_back(Output::Send { conn, packet });
    }

    /// The journal, when the session is one whose state must be written down.
    pub fn journal(&mut self, persistent: bool) -> Option<&mut Journal> {
        self.journal.as_mut().filter(|_| persistent)
    }

    /// Counts a message dropped for `client_id` (its full queue, or a move), for metrics and
    /// the log.
    pub fn count_drop(&mut self, client_id: &str, reason: DropReason) {
        match reason {
            DropReason::Oldest => self.stats.dropped_oldest += 1,
            DropReason::New => self.stats.dropped_queue_full += 1,
            DropReason::Disconnected => self.stats.dropped_slow_disconnect += 1,
            DropReason::SlowConsumer => self.stats.dropped_slow_consumer += 1,
            DropReason::MoveWindow => self.stats.move_window_dropped += 1,
            DropReason::LateHandOver => self.stats.late_transfer_dropped += 1,
        }
        self.drops.note(client_id, reason);
    }
}

/// One message on its way to one session, with the per-subscriber form already decided.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    /// Position in the session's queue; the key of its stored copy.
    pub seq: u64,
    pub message: Arc<Message>,
    /// min(message QoS, subscription QoS).
    pub qos: QoS,
    /// RETAIN flag to send: 1 for retained-on-subscribe, else per retain-as-published.
    pub retain: bool,
    /// Identifiers of every subscription of this session that matched [MQTT-3.3.4-3].
    pub subscription_ids: Vec<u32>,
}

impl Delivery {
    /// What the delivery counts against `max_queued_bytes`: topic and payload.
    pub fn size(&self) -> u64 {
        (self.message.topic.len() + self.message.payload.len()) as u64
    }
}

impl Weighed for Delivery {
    /// The message's footprint (see [`message_footprint`]) and the subscription identifiers'
    /// buffer. The message is counted with every delivery of it, although its subscribers
    /// share it: an overestimate under fan-out, never an underestimate.
    fn weight(&self) -> u64 {
        (message_footprint(&self.message) + vec_footprint::<u32>(self.subscription_ids.capacity()))
            as u64
    }
}

/// Where an outbound QoS 1/2 message is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Awaiting {
    /// QoS 1: PUBACK.
    Ack,
    /// QoS 2 step 1: PUBREC.
    Receipt,
    /// QoS 2 step 3: PUBCOMP, after our PUBREL.
    Completion,
}

#[derive(Debug, Clone)]
pub(crate) struct Inflight {
    pub packet_id: u16,
    pub delivery: Delivery,
    pub state: Awaiting,
}

impl Weighed for Inflight {
    /// What its delivery holds: the rest of it lives in the queue's buffer.
    fn weight(&self) -> u64 {
        self.delivery.weight()
    }
}

impl Inflight {
    pub fn stored_state(&self) -> DeliveryState {
        match self.state {
            Awaiting::Ack => DeliveryState::AwaitingAck(self.packet_id),
            Awaiting::Receipt => DeliveryState::AwaitingReceipt(self.packet_id),
            Awaiting::Completion => DeliveryState::AwaitingCompletion(self.packet_id),
        }
    }
}

/// State of the live connection bound to a session; gone when the connection ends.
#[derive(Debug)]
pub(crate) struct Link {
    pub conn: ConnectionId,
    pub version: ProtocolVersion,
    /// 1.5 x the keep-alive in force; `None` when keep-alive is off [MQTT-3.1.2-22].
    pub keep_alive_grace: Option<Duration>,
    /// The instant after which a silent client is disconnected.
    pub deadline: Option<Instant>,
    /// MQTT 5 topic aliases the client set up towards us (lazy: most clients use none).
    pub inbound_aliases: LazyMap<u16, String>,
    /// Aliases we set up towards the client, at most `outbound_alias_max`.
    pub outbound_aliases: LazyMap<String, u16>,
    pub outbound_alias_max: u16,
    /// The client's Maximum Packet Size; larger messages are not sent to it [MQTT-3.1.2-25].
    pub max_packet_size: u32,
    /// Outbound in-flight window for this connection.
    pub window: usize,
    /// Will of this connection, published if it ends abnormally. Boxed: a `Will` is 400
    /// bytes, and every session of every idle connection would carry it inline.
    pub will: Option<Box<Will>>,
    /// The authenticated user name from CONNECT (`None`: anonymous), for authorization.
    pub username: Option<String>,
    /// Publishes this connection may still send now (`max_publish_rate`).
    pub publish_rate: crate::limits::RateBucket,
    /// The server found the connection's writer holding `max_outbound_buffer` unwritten,
    /// and it has not caught up since: QoS 0 messages are dropped here, before a packet is
    /// built for a socket that cannot take it (see `Broker::handle_congested`).
    pub congested: bool,
}

impl Link {
    /// Restarts the keep-alive clock after any packet from the client.
    pub fn touch(&mut self, now: Instant) {
        if let Some(grace) = self.keep_alive_grace {
            self.deadline = Some(now + grace);
        }
    }
}

/// A client's session.
#[derive(Debug)]
pub(crate) struct Session {
    pub client_id: String,
    /// Fencing epoch from the session registry, renewed on every connection; timers carry it
    /// so that a timer armed for an earlier connection does nothing.
    pub epoch: u64,
    /// The epoch under which this node took or started the session (0: started here for a
    /// client that asked to resume, so it continues any earlier claim here); later
    /// connections here renew `epoch` but not this. A session handed over late under an
    /// epoch from here on belongs to this session (see `merge_late_session`).
    pub held_since: u64,
    /// In a cluster, the route version from which this session takes messages through
    /// routing here: the claim that brought it here from another node (0 for one started
    /// or restored here). Messages routed earlier reach it from the node that held it then
    /// (see `move_window`).
    pub routes_from: u64,
    /// The first claim of this client applied elsewhere while the claim that brought the
    /// session here was pending (`u64::MAX`: none): messages routed from it on were that
    /// claim's node's, so a relay of this session ends there (see `move_window`).
    pub routes_until: u64,
    /// Seconds the session outlives its connection; 0 ends it on disconnect, u32::MAX never.
    pub expiry_interval: u32,
    pub link: Option<Link>,
    /// Filters as the client wrote them (shared ones with their `$share/` prefix).
    /// Lazy, like the other per-session collections: an idle session is small.
    pub subscriptions: LazyMap<String, SubscriptionEntry>,
    /// Unacknowledged outbound QoS 1/2 messages, in send order.
    pub inflight: MeteredQueue<Inflight>,
    /// Messages waiting for room in the in-flight window (or for the client to return). For
    /// a persistent session only the head of the queue is here; see `spilled`.
    pub pending: MeteredQueue<Delivery>,
    /// Pending messages of a persistent session that are only on disk, following those in
    /// `pending`, starting at sequence number `spill_from`.
    pub spilled: u64,
    pub spill_from: u64,
    /// Next queue sequence number.
    pub next_seq: u64,
    /// Topic and payload bytes of the messages in `pending` and `spilled` (those spilled
    /// before a restart are not counted: the store keeps no sizes).
    pub queued_bytes: u64,
    /// Messages dropped for this session because its queue was full (see
    /// `QueueFullPolicy`), for the admin API.
    pub dropped: u64,
    /// Whether this session's state is written to the store (Session Expiry Interval > 0
    /// and a store configured).
    pub persistent: bool,
    /// Inbound QoS 2 packet ids PUBRECed and awaiting PUBREL: a re-sent PUBLISH with one of
    /// these ids is not delivered again [MQTT-4.3.3-9].
    pub inbound_qos2: LazySet<u16>,
    /// The identifiers this session's current claim numbers its QoS 1/2 messages in.
    pub packet_ids: PacketIds,
    pub next_packet_id: u16,
    /// A will waiting out its Will Delay Interval after the connection ended.
    /// Boxed for the same reason as `Link::will`.
    pub delayed_will: Option<Box<(Instant, Will)>>,
    /// When an offline session expires.
    pub expires_at: Option<Instant>,
    /// Fingerprint of the session record last handed to the store (0: none), so that a
    /// record that did not change is not written again: a persistent session that never
    /// expires disconnects without a write, hence without a commit (an fsync).
    pub recorded: u64,
    /// User name of the last connection (`Some(None)`: anonymous), so messages queued
    /// while the client is offline are still authorized for it; `None` while unknown
    /// (restored from the store, not connected since the broker started).
    pub username: Option<Option<String>>,
    /// Retained messages being streamed to the client (see [`RetainedStreams`]).
    pub retained: Option<Box<RetainedStreams>>,
}

/// Retained messages on their way to a session after SUBSCRIBEs: each subscription's matches
/// are read from the retained store a page at a time (`Broker::pump`), so a `#` subscriber
/// of millions of retained messages never has more than one page in memory. Allocated only
/// while a stream runs: idle sessions carry one null pointer.
#[derive(Debug, Default)]
pub(crate) struct RetainedStreams {
    /// Subscriptions whose retained messages are still to be read, in SUBSCRIBE order.
    pub streams: VecDeque<RetainedStream>,
    /// Deliveries read from the first stream and not yet sent.
    pub ready: VecDeque<Delivery>,
    /// An [`Output::NotifyWritten`] is outstanding: the next page waits for the writer, so
    /// QoS 0 pages go out no faster than the network takes them.
    pub awaiting_write: bool,
}

/// One subscription's retained messages, read so far up to a cursor. Held in memory only: a
/// stream does not survive a broker restart (the client re-subscribes to get them again).
#[derive(Debug)]
pub(crate) struct RetainedStream {
    /// The filter (never a shared one: those get no retained messages [MQTT-3.8.4-3]).
    pub filter: String,
    /// The subscription's options and identifier when the stream started.
    pub entry: SubscriptionEntry,
    /// Where the next page starts; `None` before the first.
    pub after: Option<String>,
    /// The last page has been read.
    pub done: bool,
}

/// Limits a session needs when taking a message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub max_queued: usize,
    /// Bytes (topic and payload) queued per session; 0 = no byte bound.
    pub max_queued_bytes: usize,
}

impl Session {
    /// A session whose queues count in `meter` (the broker's [`MemoryMeter`]).
    pub fn new(
        client_id: String,
        epoch: u64,
        expiry_interval: u32,
        meter: &MemoryMeter,
    ) -> Session {
        Session {
            client_id,
            epoch,
            held_since: epoch,
            routes_from: 0,
            routes_until: u64::MAX,
            expiry_interval,
            link: None,
            subscriptions: LazyMap::default(),
            inflight: MeteredQueue::new(meter.clone()),
            pending: MeteredQueue::new(meter.clone()),
            spilled: 0,
            spill_from: 0,
            next_seq: 0,
            queued_bytes: 0,
            dropped: 0,
            persistent: false,
            inbound_qos2: LazySet::default(),
            packet_ids: PacketIds::ALL,
            next_packet_id: 1,
            delayed_will: None,
            expires_at: None,
            recorded: 0,
            username: None,
            retained: None,
        }
    }

    pub fn version(&self) -> Option<ProtocolVersion> {
        self.link.as_ref().map(|link| link.version)
    }

    pub fn is_v5(&self) -> bool {
        self.version().is_some_and(ProtocolVersion::is_v5)
    }

    /// Messages waiting beyond the in-flight window, in memory and on disk.
    pub fn queued(&self) -> u64 {
        self.pending.len() as u64 + self.spilled
    }

    /// Whether a QoS 1/2 delivery of `bytes` can be taken now without going over the
    /// queue's limits.
    pub fn has_room(&self, limits: QueueLimits, bytes: usize) -> bool {
        self.can_send_now()
            || (self.queued() < limits.max_queued as u64
                && (limits.max_queued_bytes == 0
                    || self.queued_bytes.saturating_add(bytes as u64)
                        <= limits.max_queued_bytes as u64))
    }

    /// Drops the oldest queued message to make room for a new one; false when nothing is
    /// queued to drop.
    pub fn evict_oldest(&mut self, out: &mut Outbox) -> bool {
        self.refill(out);
        let Some(oldest) = self.pending.pop_front() else {
            return false;
        };
        self.queued_bytes = self.queued_bytes.saturating_sub(oldest.size());
        if let Some(journal) = out.journal(self.persistent) {
            journal.store.delete_delivery(&self.client_id, oldest.seq);
        }
        true
    }

    fn can_send_now(&self) -> bool {
        self.link.as_ref().is_some_and(|link| {
            self.pending.is_empty() && self.spilled == 0 && self.inflight.len() < link.window
        })
    }

    /// Takes a delivery: sends it now if the window allows, queues it otherwise. Returns
    /// false when it could not be taken (queue full); QoS 0 to an offline session is not
    /// queued, as MQTT allows, and counts as taken.
    pub fn push(
        &mut self,
        mut delivery: Delivery,
        now: Instant,
        limits: QueueLimits,
        out: &mut Outbox,
    ) -> bool {
        if delivery.qos == QoS::AtMostOnce {
            if self.link.is_some() {
                self.transmit(&delivery, None, false, now, out);
            }
            return true;
        }
        if !self.has_room(limits, delivery.size() as usize) {
            return false;
        }
        delivery.seq = self.next_seq;
        self.next_seq += 1;
        if self.can_send_now() {
            self.start_inflight(delivery, now, out);
            return true;
        }
        self.queued_bytes += delivery.size();
        if let Some(journal) = out.journal(self.persistent) {
            journal.store.put_delivery(
                &self.client_id,
                delivery.seq,
                &journal.clock.stored_delivery(&delivery),
                DeliveryState::Pending,
            );
            if self.spilled > 0 || self.pending.len() >= PENDING_IN_MEMORY {
                if self.spilled == 0 {
                    self.spill_from = delivery.seq;
                }
                self.spilled += 1;
                if self.pending.is_empty() && self.inflight.is_empty() {
                    // Only a failed read leaves a connected queue stalled like this, with no
                    // acknowledgement to come that would pump it: retry the read now.
                    self.pump(now, out);
                }
                return true;
            }
        }
        self.pending.push_back(delivery);
        true
    }

    /// Brings the next page of on-disk pending messages into memory.
    fn refill(&mut self, out: &mut Outbox) {
        if self.spilled == 0 || !self.pending.is_empty() {
            return;
        }
        let Some(journal) = out.journal.as_mut() else {
            return;
        };
        match journal
            .store
            .read_pending(&self.client_id, self.spill_from, PENDING_IN_MEMORY)
        {
            Ok(page) if !page.is_empty() => {
                for (seq, stored) in page {
                    self.spill_from = seq + 1;
                    self.spilled = self.spilled.saturating_sub(1);
                    self.pending.push_back(journal.clock.delivery(seq, stored));
                }
            }
            // Nothing left on disk: the count was stale (undecodable records were skipped).
            Ok(_) => self.spilled = 0,
            // Like a failed commit, never a silent loss: the count and the rows stay, so the
            // next pump reads them again. The backend logs the error.
            Err(_) => out.stats.store_read_failures += 1,
        }
    }

    /// Moves queued messages into the in-flight window as far as it allows, skipping those
    /// that expired while they waited [MQTT-3.3.2-5].
    pub fn pump(&mut self, now: Instant, out: &mut Outbox) {
        while let Some(link) = &self.link {
            if self.inflight.len() >= link.window {
                break;
            }
            self.refill(out);
            let Some(delivery) = self.pending.pop_front() else {
                break;
            };
            self.queued_bytes = self.queued_bytes.saturating_sub(delivery.size());
            if delivery.message.is_expired(now) {
                if let Some(journal) = out.journal(self.persistent) {
                    journal.store.delete_delivery(&self.client_id, delivery.seq);
                }
                continue;
            }
            self.start_inflight(delivery, now, out);
        }
        self.pump_retained(now, out);
    }

    /// Sends retained deliveries already read, after everything queued: QoS 0 at once (the
    /// broker paces pages by the writer, see [`RetainedStreams::awaiting_write`]), QoS 1/2
    /// through the in-flight window like queued messages, so acknowledgements pace them.
    fn pump_retained(&mut self, now: Instant, out: &mut Outbox) {
        let Some(window) = self.link.as_ref().map(|link| link.window) else {
            return;
        };
        while let Some(streams) = self.retained.as_mut() {
            let Some(front) = streams.ready.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce
                && (!self.pending.is_empty() || self.spilled > 0 || self.inflight.len() >= window)
            {
                break;
            }
            let Some(mut delivery) = streams.ready.pop_front() else {
                break;
            };
            if delivery.message.is_expired(now) {
                continue;
            }
            if delivery.qos == QoS::AtMostOnce {
                self.transmit(&delivery, None, false, now, out);
            } else {
                delivery.seq = self.next_seq;
                self.next_seq += 1;
                self.start_inflight(delivery, now, out);
            }
        }
    }

    /// Whether the broker should read the next page of a retained stream: connected,
    /// nothing read is left to send, and no write notification is outstanding.
    pub fn wants_retained_page(&self) -> bool {
        self.link.is_some()
            && self.retained.as_ref().is_some_and(|streams| {
                streams.ready.is_empty() && !streams.awaiting_write && !streams.streams.is_empty()
            })
    }

    /// Stops the retained stream of `filter`, if one runs (UNSUBSCRIBE, or a SUBSCRIBE that
    /// replaces the subscription). Returns whether one did.
    pub fn stop_retained(&mut self, filter: &str) -> bool {
        let Some(streams) = self.retained.as_mut() else {
            return false;
        };
        let before = streams.streams.len();
        if streams.streams.front().is_some_and(|s| s.filter == filter) {
            // What was read belongs to the first stream.
            streams.ready.clear();
        }
        streams.streams.retain(|stream| stream.filter != filter);
        let stopped = streams.streams.len() != before;
        self.drop_finished_streams();
        stopped
    }

    /// Forgets streams read to the end whose deliveries are all sent, and frees the
    /// streams' state when nothing is left.
    pub fn drop_finished_streams(&mut self) {
        let Some(streams) = self.retained.as_mut() else {
            return;
        };
        while streams.ready.is_empty() && streams.streams.front().is_some_and(|s| s.done) {
            streams.streams.pop_front();
        }
        if streams.streams.is_empty() && streams.ready.is_empty() {
            self.retained = None;
        }
    }

    fn start_inflight(&mut self, delivery: Delivery, now: Instant, out: &mut Outbox) {
        let packet_id = self.allocate_packet_id();
        if !self.transmit(&delivery, Some(packet_id), false, now, out) {
            // Too large for the client: handled as if sent and acknowledged [MQTT-3.1.2-25].
            if let Some(journal) = out.journal(self.persistent) {
                journal.store.delete_delivery(&self.client_id, delivery.seq);
            }
            return;
        }
        let state = if delivery.qos == QoS::ExactlyOnce {
            Awaiting::Receipt
        } else {
            Awaiting::Ack
        };
        let inflight = Inflight {
            packet_id,
            delivery,
            state,
        };
        if let Some(journal) = out.journal(self.persistent) {
            journal.store.put_delivery(
                &self.client_id,
                inflight.delivery.seq,
                &journal.clock.stored_delivery(&inflight.delivery),
                inflight.stored_state(),
            );
        }
        self.inflight.push_back(inflight);
    }

    /// The next free identifier of the session's range (see `packet_ids`); one past a full
    /// range, of the whole space.
    fn allocate_packet_id(&mut self) -> u16 {
        let range = if self.inflight.len() >= self.packet_ids.len() {
            PacketIds::ALL
        } else {
            self.packet_ids
        };
        let mut candidate = if range.contains(self.next_packet_id) {
            self.next_packet_id
        } else {
            range.first()
        };
        loop {
            self.next_packet_id = range.after(candidate);
            if !self
                .inflight
                .iter()
                .any(|entry| entry.packet_id == candidate)
            {
                return candidate;
            }
            candidate = self.next_packet_id;
        }
    }

    /// A claim numbering in `range` takes the session: identifiers continue in its range.
    pub(crate) fn number_in(&mut self, range: PacketIds) {
        if self.packet_ids != range {
            self.packet_ids = range;
            self.next_packet_id = range.first();
        }
    }

    /// Re-sends the in-flight window on a new connection, in the original order, PUBLISH
    /// with DUP=1 or PUBREL where PUBREC was already received [MQTT-4.4.0-1].
    pub fn resend_inflight(&mut self, now: Instant, out: &mut Outbox) {
        let Some(conn) = self.link.as_ref().map(|link| link.conn) else {
            return;
        };
        let entries: Vec<Inflight> = self.inflight.iter().cloned().collect();
        for entry in entries {
            match entry.state {
                Awaiting::Completion => out.send(
                    conn,
                    Packet::PubRel(PubResponse {
                        packet_id: entry.packet_id,
                        ..Default::default()
                    }),
                ),
                Awaiting::Ack | Awaiting::Receipt => {
                    self.transmit(&entry.delivery, Some(entry.packet_id), true, now, out);
                }
            }
        }
    }

    /// Takes over a QoS 2 exchange another node had open with the client, under its packet
    /// id [MQTT-4.3.3-8]: the client may hold that id awaiting PUBREL. A message sent with
    /// no PUBREC back yet is sent again with DUP = 1 (and recognised), not as a new message;
    /// a received one (PUBREC came) gets its PUBREL and waits for PUBCOMP, so the client
    /// frees the id. False if the id is in use here: the caller queues an unreceived
    /// message as a new one.
    pub fn adopt_exchange(
        &mut self,
        exchange: OpenExchange,
        delivery: Delivery,
        now: Instant,
        out: &mut Outbox,
    ) -> bool {
        let (packet_id, state) = match exchange {
            OpenExchange::Unreceived(packet_id) => (packet_id, Awaiting::Receipt),
            OpenExchange::Received(packet_id) => (packet_id, Awaiting::Completion),
        };
        if self
            .inflight
            .iter()
            .any(|entry| entry.packet_id == packet_id)
        {
            return false;
        }
        if let Some(conn) = self.link.as_ref().map(|link| link.conn) {
            match exchange {
                OpenExchange::Unreceived(_) => {
                    self.transmit(&delivery, Some(packet_id), true, now, out);
                }
                OpenExchange::Received(_) => out.send(
                    conn,
                    Packet::PubRel(PubResponse {
                        packet_id,
                        ..Default::default()
                    }),
                ),
            }
        }
        self.inflight.push_back(Inflight {
            packet_id,
            delivery,
            state,
        });
        true
    }

    /// Writes one PUBLISH to the live connection. Returns false when the client's Maximum
    /// Packet Size forbids it.
    fn transmit(
        &mut self,
        delivery: &Delivery,
        packet_id: Option<u16>,
        dup: bool,
        now: Instant,
        out: &mut Outbox,
    ) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        let message = &delivery.message;
        let mut publish = Publish {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: message.topic.clone(),
            packet_id,
            payload: message.payload.clone(),
            properties: Default::default(),
        };
        if link.version.is_v5() {
            publish.properties = message.properties.as_deref().cloned().unwrap_or_default();
            publish.properties.message_expiry_interval = message.remaining_expiry(now);
            publish.properties.subscription_identifiers = delivery.subscription_ids.clone();
        }
        let mut packet = Packet::Publish(publish);
        // Measuring costs a walk over the packet; a client that set no maximum cannot be
        // sent anything too large for it.
        if link.max_packet_size != u32::MAX
            && halyard_codec::encoded_len(&packet, link.version) > link.max_packet_size as usize
        {
            out.stats.dropped_too_large += 1;
            return false;
        }
        if let Packet::Publish(publish) = &mut packet {
            if link.version.is_v5() && link.outbound_alias_max > 0 {
                match link.outbound_aliases.get(&publish.topic) {
                    Some(&alias) => {
                        publish.properties.topic_alias = Some(alias);
                        publish.topic.clear();
                    }
                    None => {
                        let used = link.outbound_aliases.len();
                        if let Ok(alias) = u16::try_from(used + 1) {
                            if alias <= link.outbound_alias_max {
                                link.outbound_aliases.insert(publish.topic.clone(), alias);
                                publish.properties.topic_alias = Some(alias);
                            }
                        }
                    }
                }
            }
        }
        out.stats.messages_sent += 1;
        out.send(link.conn, packet);
        true
    }

    /// PUBACK from the client: the QoS 1 message is done.
    pub fn on_puback(&mut self, packet_id: u16, out: &mut Outbox) -> bool {
        self.remove_inflight(packet_id, Awaiting::Ack, out)
    }

    /// PUBCOMP from the client: the QoS 2 message is done.
    pub fn on_pubcomp(&mut self, packet_id: u16, out: &mut Outbox) -> bool {
        self.remove_inflight(packet_id, Awaiting::Completion, out)
    }

    fn remove_inflight(&mut self, packet_id: u16, state: Awaiting, out: &mut Outbox) -> bool {
        let index = self
            .inflight
            .iter()
            .position(|entry| entry.packet_id == packet_id && entry.state == state);
        let Some(entry) = index.and_then(|index| self.inflight.remove(index)) else {
            return false;
        };
        if let Some(journal) = out.journal(self.persistent) {
            journal
                .store
                .delete_delivery(&self.client_id, entry.delivery.seq);
        }
        true
    }

    /// PUBREC from the client: answer PUBREL (or drop the message if the client refused it).
    pub fn on_pubrec(
        &mut self,
        packet_id: u16,
        reason: ReasonCode,
        out: &mut Outbox,
    ) -> Option<ReasonCode> {
        let index = self
            .inflight
            .iter()
            .position(|entry| entry.packet_id == packet_id && entry.state != Awaiting::Ack);
        match index {
            Some(index) if reason.is_error() => {
                let entry = self.inflight.remove(index)?;
                if let Some(journal) = out.journal(self.persistent) {
                    journal
                        .store
                        .delete_delivery(&self.client_id, entry.delivery.seq);
                }
                None
            }
            Some(index) => {
                let entry = self.inflight.get_mut(index)?;
                entry.state = Awaiting::Completion;
                let (seq, state) = (entry.delivery.seq, entry.stored_state());
                if let Some(journal) = out.journal(self.persistent) {
                    journal
                        .store
                        .set_delivery_state(&self.client_id, seq, state);
                }
                Some(ReasonCode::SUCCESS)
            }
            None => Some(ReasonCode::PACKET_IDENTIFIER_NOT_FOUND),
        }
    }

    /// Sends an MQTT 5 DISCONNECT with `reason` if the link speaks MQTT 5.
    pub fn send_disconnect(
        &self,
        reason: ReasonCode,
        reason_string: Option<&str>,
        out: &mut Outbox,
    ) {
        if let Some(link) = self.link.as_ref().filter(|link| link.version.is_v5()) {
            let mut disconnect = Disconnect {
                reason,
                ..Default::default()
            };
            disconnect.properties.reason_string = reason_string.map(str::to_owned);
            out.send(link.conn, Packet::Disconnect(disconnect));
        }
    }
}
