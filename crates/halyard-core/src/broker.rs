//! The broker state machine: connections, sessions, routing, retained messages, wills and
//! timers, driven by packets and `now` from the server.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use halyard_codec::{
    ConnAck, Connect, DecodeError, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS,
    ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe, Will,
};

use crate::authz::{Access, AllowAll, Authorizer, ClientInfo};
use crate::config::BrokerConfig;
use crate::message::{boxed_properties, Message, SessionKey};
use crate::pushback::{PendingPublish, Pushback, QueueFullPolicy};
use crate::registry::{LocalSessionRegistry, SessionRegistry};
use crate::retained::{is_sys_filter, MemoryRetained, RetainedPage, RetainedStore};
use crate::router::{FilterRef, LocalRouter, RouteMatch, Router, SubscriptionEntry};
use crate::session::{
    Awaiting, Delivery, Inflight, Journal, Link, Outbox, QueueLimits, RetainedStream, Session,
};
use crate::store::{DeliveryState, LoadedSession, SessionRecord, Store, StoreError};
use crate::time::ClockAnchor;
use crate::FastMap;

/// Opaque id the server gives each accepted network connection; never reused in a process.
pub type ConnectionId = u64;

/// What the broker wants the server to do.
// `Send` is far larger than `Close`, but outputs are moved straight into the server's
// per-connection batches; boxing every packet would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Encode `packet` with the protocol version of the connection's CONNECT (3.1.1 if the
    /// connection never completed a CONNECT) and write it.
    Send {
        /// Target connection.
        conn: ConnectionId,
        /// Packet to write.
        packet: Packet,
    },
    /// Flush everything sent so far to this connection, then close it. The broker has
    /// already forgotten the connection; anything more from it is ignored.
    Close {
        /// Connection to close.
        conn: ConnectionId,
    },
    /// Stop reading from this connection: a QoS 1/2 publish from it is waiting for room in
    /// a subscriber's queue (backpressure; see `QueueFullPolicy`). Packets from it that
    /// were already read may still be handed in; the broker holds them in order.
    Pause {
        /// Connection to stop reading from.
        conn: ConnectionId,
    },
    /// Read from this connection again after an [`Output::Pause`].
    Resume {
        /// Connection to read from again.
        conn: ConnectionId,
    },
    /// Call [`Broker::handle_written`] for this connection once the network has taken
    /// what was sent to it so far (the server reports when its writer takes these packets,
    /// which it does only after writing the ones before). Retained messages streamed at
    /// QoS 0 have no acknowledgement to pace them, so their next page waits for this; only
    /// retained streams ask for it, never ordinary messages.
    NotifyWritten {
        /// Connection whose writer should report.
        conn: ConnectionId,
    },
}

/// Counters for metrics and the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Connections that completed CONNECT and are open.
    pub connected_clients: usize,
    /// Sessions held, connected or not.
    pub sessions: usize,
    /// Subscriptions across all sessions.
    pub subscriptions: usize,
    /// Retained messages stored.
    pub retained_messages: usize,
    /// PUBLISH packets received from clients.
    pub messages_received: u64,
    /// PUBLISH packets sent to clients.
    pub messages_sent: u64,
    /// QoS 0 messages not delivered because the session's queue was full.
    pub dropped_qos0: u64,
    /// Messages not sent because they exceed the client's Maximum Packet Size.
    pub dropped_too_large: u64,
    /// Will and retained-on-subscribe deliveries lost to a full queue (no publisher to tell).
    pub dropped_queue_full: u64,
    /// QoS 1/2 publishes refused (MQTT 5 reason 0x97, or 3.x connection closed unacknowledged)
    /// because a subscriber's queue was full.
    pub refused_quota: u64,
    /// Times a publisher was paused because a subscriber's queue had no room for its
    /// QoS 1/2 publish (backpressure instead of refusing it).
    pub pushback_pauses: u64,
    /// Paused publishers closed unacknowledged because the pause outlasted
    /// `PUSHBACK_TIMEOUT`.
    pub pushback_timeouts: u64,
    /// PUBLISH packets the authorizer refused (MQTT 5: answered 0x87; MQTT 3.x:
    /// acknowledged and dropped, as the 3.1.1 spec allows).
    pub denied_publish: u64,
    /// Of `denied_publish`, those to `$SYS/` topics without an explicit ACL grant.
    pub denied_sys_publish: u64,
    /// SUBSCRIBE filters the authorizer refused (SUBACK 0x80 / 0x87).
    pub denied_subscribe: u64,
    /// Deliveries withheld because the subscriber may not read the topic.
    pub denied_delivery: u64,
    /// Connections closed for publishing faster than `max_publish_rate` (MQTT 5: 0x96).
    pub refused_publish_rate: u64,
    /// SUBSCRIBE filters refused by `max_subscriptions_per_client` (0x97 / 0x80).
    pub refused_subscription_quota: u64,
}

/// Retained messages read per page of a retained stream: what one session may hold read
/// ahead, and what goes out per write notification at QoS 0.
const RETAINED_PAGE: usize = 256;

/// Deadlines the broker must act on. Each carries enough to tell whether it is still
/// current when it fires; stale entries are skipped rather than removed from the heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    KeepAlive(ConnectionId),
    /// Bound on how long a connection stays paused by backpressure.
    Pushback(ConnectionId),
    Will(SessionKey, u64),
    SessionExpiry(SessionKey, u64),
}

/// How a publish fared when routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteOutcome {
    Delivered,
    NoSubscribers,
    QuotaExceeded,
}

/// Why a connection is being closed by the broker or the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseKind {
    /// DISCONNECT from the client without a will request: the will is discarded.
    Normal,
    /// DISCONNECT 0x04 from an MQTT 5 client: close normally but publish the will.
    NormalWithWill,
    /// Network failure, keep-alive or protocol error: the will is published, and an MQTT 5
    /// client is first told `reason` where one is given.
    Abnormal(Option<ReasonCode>),
    /// Another connection claimed the client id [MQTT-3.1.4-3]: like `Abnormal`, but the
    /// session is left for the new connection's CONNECT to resume or discard.
    TakenOver,
}

/// The whole broker. One instance per node; the server drives it from a single task.
/// Fields are crate-visible so that concerns living in their own modules (admin queries,
/// authorization) can extend `Broker` with `impl` blocks of their own.
pub struct Broker {
    pub(crate) config: BrokerConfig,
    /// Boxed: a map of inline sessions would hold up to twice the live sessions' size in
    /// empty slots (hash table growth), which counts in memory per idle connection.
    pub(crate) sessions: FastMap<SessionKey, Box<Session>>,
    pub(crate) client_ids: FastMap<String, SessionKey>,
    pub(crate) conns: FastMap<ConnectionId, SessionKey>,
    pub(crate) router: Box<dyn Router>,
    /// Retained messages kept in memory: all of them without a store, only `$SYS` ones
    /// with one (the rest live in the store and are read in pages, see `read_retained`).
    pub(crate) retained: Box<dyn RetainedStore>,
    pub(crate) registry: Box<dyn SessionRegistry>,
    pub(crate) timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    pub(crate) out: Outbox,
    pub(crate) next_session_key: SessionKey,
    pub(crate) next_assigned_id: u64,
    pub(crate) subscription_count: usize,
    pub(crate) route_scratch: Vec<RouteMatch>,
    /// Publishers paused because a subscriber's queue is full (see `pushback`).
    pub(crate) pushback: Pushback,
    /// Topic access rules; [`AllowAll`] unless the server installs others (see `authz`).
    pub(crate) authorizer: Arc<dyn Authorizer>,
}

impl Broker {
    /// A single-node broker with in-memory state.
    pub fn new(config: BrokerConfig) -> Broker {
        Broker::with_parts(
            config,
            Box::new(LocalRouter::new()),
            Box::new(MemoryRetained::new()),
            Box::new(LocalSessionRegistry::default()),
        )
    }

    /// A broker with its routing, retained storage and session ownership supplied by the
    /// caller: the seams the durable store and the cluster plug into.
    pub fn with_parts(
        config: BrokerConfig,
        router: Box<dyn Router>,
        retained: Box<dyn RetainedStore>,
        registry: Box<dyn SessionRegistry>,
    ) -> Broker {
        Broker {
            config,
            sessions: FastMap::default(),
            client_ids: FastMap::default(),
            conns: FastMap::default(),
            router,
            retained,
            registry,
            timers: BinaryHeap::new(),
            out: Outbox::default(),
            next_session_key: 1,
            next_assigned_id: 1,
            subscription_count: 0,
            route_scratch: Vec::new(),
            pushback: Pushback::default(),
            authorizer: Arc::new(AllowAll),
        }
    }

    /// A single-node broker whose persistent sessions and retained messages live in
    /// `store`: sessions are loaded now; queued and retained messages stay in the store and
    /// are read in pages as they are needed. `now` and `wall` are the same moment on the
    /// monotonic and the wall clock, to convert stored expiry times.
    pub fn with_store(
        config: BrokerConfig,
        mut store: Box<dyn Store>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Broker, StoreError> {
        let loaded = store.load()?;
        let clock = ClockAnchor { instant: now, wall };
        let mut broker = Broker::new(config);
        broker.out.journal = Some(Journal { store, clock });
        for session in loaded.sessions {
            broker.restore_session(now, session);
        }
        Ok(broker)
    }

    pub(crate) fn restore_session(&mut self, now: Instant, loaded: LoadedSession) {
        let Some(clock) = self.out.journal.as_ref().map(|journal| journal.clock) else {
            return;
        };
        let key = self.next_session_key;
        self.next_session_key += 1;
        let record = loaded.record;
        let epoch = self.registry.claim(&record.client_id);
        let mut session = Session::new(record.client_id.clone(), epoch, record.expiry_interval);
        session.persistent = true;
        session.next_seq = loaded.next_seq;
        session.spilled = loaded.pending_count;
        session.spill_from = loaded.first_pending.unwrap_or(loaded.next_seq);
        session.inbound_qos2 = loaded.inbound_qos2.into_iter().collect();
        for (seq, stored, state) in loaded.inflight {
            let (packet_id, awaiting) = match state {
                DeliveryState::Pending => continue,
                DeliveryState::AwaitingAck(id) => (id, Awaiting::Ack),
                DeliveryState::AwaitingReceipt(id) => (id, Awaiting::Receipt),
                DeliveryState::AwaitingCompletion(id) => (id, Awaiting::Completion),
            };
            session.inflight.push_back(Inflight {
                packet_id,
                delivery: clock.delivery(seq, stored),
                state: awaiting,
            });
        }
        if let Some(last) = session.inflight.iter().map(|entry| entry.packet_id).max() {
            session.next_packet_id = last.checked_add(1).unwrap_or(1);
        }
        for (filter, entry) in loaded.subscriptions {
            if self.router.subscribe(key, FilterRef::parse(&filter), entry) {
                self.subscription_count += 1;
            }
            session.subscriptions.insert(filter, entry);
        }
        // A session that was connected when the broker stopped starts its expiry now.
        let expires_at = match record.expires_at {
            Some(at) => Some(clock.to_instant(at)),
            None if record.expiry_interval == u32::MAX => None,
            None => Some(now + Duration::from_secs(u64::from(record.expiry_interval))),
        };
        session.expires_at = expires_at;
        if let Some(at) = expires_at {
            self.timers
                .push(Reverse((at, Timer::SessionExpiry(key, epoch))));
        }
        if let Some((due, will)) = record.delayed_will {
            let due = clock.to_instant(due);
            session.delayed_will = Some(Box::new((due, will)));
            self.timers.push(Reverse((due, Timer::Will(key, epoch))));
        }
        self.client_ids.insert(record.client_id, key);
        self.sessions.insert(key, Box::new(session));
    }

    /// Makes the state changes of the events handled so far durable. The server calls this
    /// before it writes the packets those events produced, so no acknowledgement goes out
    /// for a message that is not yet stored. Without a store it does nothing.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        match self.out.journal.as_mut() {
            Some(journal) => journal.store.commit(),
            None => Ok(()),
        }
    }

    /// Whether [`Broker::commit`] could block on I/O now (see [`Store::commit_may_block`]);
    /// the server runs only such commits where blocking is allowed, since handing the
    /// async worker over costs a thread wake-up per batch of events.
    pub fn commit_may_block(&self) -> bool {
        self.out
            .journal
            .as_ref()
            .is_some_and(|journal| journal.store.commit_may_block())
    }

    /// Writes the session-level record of a persistent session.
    pub(crate) fn save_session_record(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get(&key) else {
            return;
        };
        let Some(journal) = self.out.journal(session.persistent) else {
            return;
        };
        let record = SessionRecord {
            client_id: session.client_id.clone(),
            expiry_interval: session.expiry_interval,
            expires_at: session.expires_at.map(|at| journal.clock.to_wall(at)),
            delayed_will: session
                .delayed_will
                .as_deref()
                .map(|(due, will)| (journal.clock.to_wall(*due), will.clone())),
        };
        journal.store.put_session(&record);
    }

    /// Decides whether a session is written to the store, after its expiry interval was
    /// (re)set. A session that becomes persistent is written in full; one that stops being
    /// persistent takes its on-disk queue back into memory and is deleted from the store.
    pub(crate) fn update_persistence(&mut self, key: SessionKey) {
        let has_store = self.out.journal.is_some();
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let persistent = has_store && session.expiry_interval > 0;
        if persistent == session.persistent {
            self.save_session_record(key);
            return;
        }
        let Some(journal) = self.out.journal.as_mut() else {
            return;
        };
        if persistent {
            session.persistent = true;
            for (filter, entry) in &session.subscriptions {
                journal
                    .store
                    .put_subscription(&session.client_id, filter, entry);
            }
            for packet_id in &session.inbound_qos2 {
                journal
                    .store
                    .put_inbound_qos2(&session.client_id, *packet_id);
            }
            for entry in &session.inflight {
                journal.store.put_delivery(
                    &session.client_id,
                    entry.delivery.seq,
                    &journal.clock.stored_delivery(&entry.delivery),
                    entry.stored_state(),
                );
            }
            for delivery in &session.pending {
                journal.store.put_delivery(
                    &session.client_id,
                    delivery.seq,
                    &journal.clock.stored_delivery(delivery),
                    DeliveryState::Pending,
                );
            }
            self.save_session_record(key);
        } else {
            if session.spilled > 0 {
                let spilled = usize::try_from(session.spilled).unwrap_or(usize::MAX);
                if let Ok(page) =
                    journal
                        .store
                        .read_pending(&session.client_id, session.spill_from, spilled)
                {
                    for (seq, stored) in page {
                        session
                            .pending
                            .push_back(journal.clock.delivery(seq, stored));
                    }
                }
                session.spilled = 0;
            }
            journal.store.delete_session(&session.client_id);
            session.persistent = false;
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Current counters.
    pub fn stats(&self) -> BrokerStats {
        BrokerStats {
            connected_clients: self.conns.len(),
            sessions: self.sessions.len(),
            subscriptions: self.subscription_count,
            retained_messages: self.retained.len()
                + self
                    .out
                    .journal
                    .as_ref()
                    .map_or(0, |journal| journal.store.retained_len()),
            ..self.out.stats
        }
    }

    /// Next thing for the server to do, in order; `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.outputs.pop_front()
    }

    /// Hands `handle` everything [`Broker::poll_output`] would return, in order, as one
    /// slice, then forgets it: for a server that only reads the outputs (it encodes them),
    /// this saves moving each out of the queue, and a `Send` is about 400 bytes.
    pub fn take_outputs_with(&mut self, handle: impl FnOnce(&[Output])) {
        handle(self.out.outputs.make_contiguous());
        self.out.outputs.clear();
    }

    /// The earliest instant at which [`Broker::handle_timeout`] may have work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// A packet decoded from `conn`. The first must be CONNECT.
    pub fn handle_packet(&mut self, now: Instant, conn: ConnectionId, packet: Packet) {
        if self.pushback.is_empty() {
            return self.handle_unheld(now, conn, packet);
        }
        if let Some(packet) = self.hold_if_paused(conn, packet) {
            self.handle_unheld(now, conn, packet);
        }
        self.retry_paused(now);
    }

    /// [`Broker::handle_packet`] for a packet that does not (or no longer) wait behind a
    /// paused publish.
    pub(crate) fn handle_unheld(&mut self, now: Instant, conn: ConnectionId, packet: Packet) {
        if !matches!(
            packet,
            Packet::Publish(_) | Packet::PingReq | Packet::PubRel(_)
        ) {
            // Acknowledgements, a returning subscriber, an UNSUBSCRIBE, a DISCONNECT: any
            // of these may make room a paused publisher waits for.
            self.pushback.note_maybe_room();
        }
        let Some(&key) = self.conns.get(&conn) else {
            match packet {
                Packet::Connect(connect) => self.on_connect(now, conn, *connect),
                // [MQTT-3.1.0-1]: the first packet must be CONNECT.
                _ => self.out.outputs.push_back(Output::Close { conn }),
            }
            return;
        };
        if let Some(link) = self.link_mut(key) {
            link.touch(now);
        }
        match packet {
            Packet::Publish(publish) => self.on_publish(now, key, publish),
            Packet::PubAck(ack) => {
                if let Some(session) = self.sessions.get_mut(&key) {
                    session.on_puback(ack.packet_id, &mut self.out);
                    self.pump(now, key);
                }
            }
            Packet::PubRec(rec) => self.on_pubrec(now, key, rec),
            Packet::PubRel(rel) => self.on_pubrel(key, rel),
            Packet::PubComp(comp) => {
                if let Some(session) = self.sessions.get_mut(&key) {
                    session.on_pubcomp(comp.packet_id, &mut self.out);
                    self.pump(now, key);
                }
            }
            Packet::Subscribe(subscribe) => self.on_subscribe(now, key, subscribe),
            Packet::Unsubscribe(unsubscribe) => self.on_unsubscribe(now, key, unsubscribe),
            Packet::PingReq => self.out.send(conn, Packet::PingResp),
            Packet::Disconnect(disconnect) => self.on_disconnect(now, key, disconnect),
            // [MQTT-3.1.0-2]: a second CONNECT is a protocol error.
            Packet::Connect(_) => self.protocol_error(now, key, "second CONNECT"),
            Packet::Auth(_) => {
                self.protocol_error(now, key, "AUTH without an authentication method in CONNECT")
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.protocol_error(now, key, "packet type only a server sends")
            }
        }
    }

    /// The decoder rejected bytes from `conn`: the broker answers (CONNACK or DISCONNECT with
    /// the error's reason code, where the protocol allows), publishes the will, and closes.
    pub fn handle_decode_error(&mut self, now: Instant, conn: ConnectionId, error: &DecodeError) {
        let code = error.reason_code();
        match self.conns.get(&conn) {
            Some(&key) => self.close_link(now, key, CloseKind::Abnormal(Some(code))),
            None => {
                if matches!(error, DecodeError::UnsupportedProtocolVersion { .. }) {
                    // The level is unknown, so answer in the 3.1.1 form every client parses
                    // [MQTT-3.1.2-2].
                    self.out.send(
                        conn,
                        Packet::ConnAck(ConnAck {
                            code: ReasonCode::V3_UNACCEPTABLE_PROTOCOL_VERSION,
                            ..Default::default()
                        }),
                    );
                }
                self.out.outputs.push_back(Output::Close { conn });
            }
        }
    }

    /// The socket of `conn` closed or failed without a DISCONNECT: the will is published.
    pub fn connection_lost(&mut self, now: Instant, conn: ConnectionId) {
        if let Some(&key) = self.conns.get(&conn) {
            self.close_link(now, key, CloseKind::Abnormal(None));
        }
        self.retry_paused(now);
    }

    /// Time has passed: keep-alive deadlines, will delays and session expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((at, timer))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::KeepAlive(conn) => self.check_keep_alive(now, conn),
                Timer::Pushback(conn) => self.check_pushback(now, conn),
                Timer::Will(key, epoch) => {
                    let Some(session) = self.sessions.get_mut(&key) else {
                        continue;
                    };
                    if session.epoch != epoch {
                        continue;
                    }
                    if let Some((due, will)) = session.delayed_will.take().map(|b| *b) {
                        if due <= now {
                            self.save_session_record(key);
                            self.publish_will(now, key, will);
                        } else {
                            session.delayed_will = Some(Box::new((due, will)));
                        }
                    }
                }
                Timer::SessionExpiry(key, epoch) => {
                    let expired = self.sessions.get(&key).is_some_and(|session| {
                        session.epoch == epoch
                            && session.link.is_none()
                            && session.expires_at.is_some_and(|at| at <= now)
                    });
                    if expired {
                        self.end_session(now, key);
                    }
                }
            }
        }
        self.retry_paused(now);
    }

    /// Graceful shutdown: MQTT 5 clients get DISCONNECT 0x8B, every connection is closed.
    /// Wills are not published: the clients did nothing wrong.
    pub fn shutdown(&mut self, _now: Instant) {
        let conns: Vec<(ConnectionId, SessionKey)> = self.conns.drain().collect();
        self.pushback = Pushback::default();
        for (conn, key) in conns {
            if let Some(session) = self.sessions.get_mut(&key) {
                session.send_disconnect(ReasonCode::SERVER_SHUTTING_DOWN, None, &mut self.out);
                session.link = None;
            }
            self.out.outputs.push_back(Output::Close { conn });
        }
    }

    pub(crate) fn link_mut(&mut self, key: SessionKey) -> Option<&mut Link> {
        self.sessions.get_mut(&key).and_then(|s| s.link.as_mut())
    }

    pub(crate) fn limits(&self) -> QueueLimits {
        QueueLimits {
            max_queued: self.config.max_queued_messages,
        }
    }

    pub(crate) fn check_keep_alive(&mut self, now: Instant, conn: ConnectionId) {
        let Some(&key) = self.conns.get(&conn) else {
            return;
        };
        let Some(deadline) = self.link_mut(key).and_then(|link| link.deadline) else {
            return;
        };
        if deadline <= now && self.pushback.is_paused(conn) {
            // Silent because the server stopped reading it, not because it is gone.
            if let Some(link) = self.link_mut(key) {
                link.touch(now);
                if let Some(deadline) = link.deadline {
                    self.timers
                        .push(Reverse((deadline, Timer::KeepAlive(conn))));
                }
            }
            return;
        }
        if deadline <= now {
            // [MQTT-3.1.2-22]: silent for 1.5 x keep-alive.
            self.close_link(
                now,
                key,
                CloseKind::Abnormal(Some(ReasonCode::KEEP_ALIVE_TIMEOUT)),
            );
        } else {
            self.timers
                .push(Reverse((deadline, Timer::KeepAlive(conn))));
        }
    }

    pub(crate) fn reject_connect(
        &mut self,
        conn: ConnectionId,
        version: ProtocolVersion,
        v5: ReasonCode,
        v3: ReasonCode,
    ) {
        let code = if version.is_v5() { v5 } else { v3 };
        self.out.send(
            conn,
            Packet::ConnAck(ConnAck {
                session_present: false,
                code,
                properties: Properties::default(),
            }),
        );
        self.out.outputs.push_back(Output::Close { conn });
    }

    pub(crate) fn topic_within_limits(&self, topic: &str) -> bool {
        topic.len() <= self.config.max_topic_length
            && topic.split('/').count() <= self.config.max_topic_levels
    }

    pub(crate) fn on_connect(&mut self, now: Instant, conn: ConnectionId, connect: Connect) {
        let version = connect.protocol;
        let v5 = version.is_v5();
        let method = connect.properties.authentication_method.as_deref();
        if v5 && method.is_some_and(|method| !self.authorizer.server_authenticates(method)) {
            // Not a method the server completed before forwarding the CONNECT [MQTT-4.12.0-1].
            return self.reject_connect(
                conn,
                version,
                ReasonCode::BAD_AUTHENTICATION_METHOD,
                ReasonCode::V3_NOT_AUTHORIZED,
            );
        }

        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        let max_keepalive = self.config.max_keepalive;
        if max_keepalive > 0 && (keep_alive == 0 || keep_alive > max_keepalive) {
            if v5 {
                keep_alive = max_keepalive;
                server_keep_alive = Some(max_keepalive);
            } else if keep_alive > max_keepalive {
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    ReasonCode::V3_IDENTIFIER_REJECTED,
                );
            }
        }

        let mut client_id = connect.client_id;
        let mut assigned_client_id = None;
        if client_id.is_empty() {
            let allowed = self.config.allow_zero_length_client_id
                && match version {
                    ProtocolVersion::V3_1 => false,
                    // [MQTT-3.1.3-8]
                    ProtocolVersion::V3_1_1 => connect.clean_start,
                    ProtocolVersion::V5 => true,
                };
            if !allowed {
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    ReasonCode::V3_IDENTIFIER_REJECTED,
                );
            }
            client_id = format!("halyard-{}-{}", self.next_assigned_id, conn);
            self.next_assigned_id += 1;
            if v5 {
                // [MQTT-3.2.2-16]
                assigned_client_id = Some(client_id.clone());
            }
        }

        if let Some(will) = &connect.will {
            if !self.topic_within_limits(&will.topic) {
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::TOPIC_NAME_INVALID,
                    ReasonCode::V3_SERVER_UNAVAILABLE,
                );
            }
            if will.retain && !self.config.retain_available {
                // [MQTT-3.2.2-13]
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::RETAIN_NOT_SUPPORTED,
                    ReasonCode::V3_SERVER_UNAVAILABLE,
                );
            }
        }

        if let Some(will) = &connect.will {
            let client = ClientInfo {
                client_id: &client_id,
                username: connect.username.as_deref(),
            };
            if !crate::broker_topics::may_publish(&*self.authorizer, &client, &will.topic) {
                // A will the client could not publish itself is refused up front, as
                // Mosquitto does.
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::NOT_AUTHORIZED,
                    ReasonCode::V3_NOT_AUTHORIZED,
                );
            }
        }

        let requested_expiry = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry_interval = requested_expiry.min(self.config.max_session_expiry);

        // Takeover: end the existing connection first [MQTT-3.1.4-3].
        if let Some(&old_key) = self.client_ids.get(&client_id) {
            if self
                .sessions
                .get(&old_key)
                .is_some_and(|s| s.link.is_some())
            {
                self.close_link(now, old_key, CloseKind::TakenOver);
            }
        }

        let epoch = self.registry.claim(&client_id);
        let existing = self.client_ids.get(&client_id).copied();
        let (key, session_present) = match existing {
            Some(old_key) if !connect.clean_start => (old_key, true),
            _ => {
                if let Some(old_key) = existing {
                    self.end_session(now, old_key);
                }
                let key = self.next_session_key;
                self.next_session_key += 1;
                self.sessions.insert(
                    key,
                    Box::new(Session::new(client_id.clone(), epoch, expiry_interval)),
                );
                self.client_ids.insert(client_id.clone(), key);
                (key, false)
            }
        };

        let window = usize::from(
            connect
                .properties
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(self.config.max_inflight)
                .max(1),
        );
        let keep_alive_grace =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let link = Link {
            conn,
            version,
            keep_alive_grace,
            deadline: keep_alive_grace.map(|grace| now + grace),
            inbound_aliases: Default::default(),
            outbound_aliases: Default::default(),
            outbound_alias_max: connect.properties.topic_alias_maximum.unwrap_or(0),
            max_packet_size: connect.properties.maximum_packet_size.unwrap_or(u32::MAX),
            window,
            will: connect.will.map(Box::new),
            username: connect.username,
            publish_rate: crate::limits::RateBucket::new(self.config.max_publish_rate, now),
        };
        if let Some(deadline) = link.deadline {
            self.timers
                .push(Reverse((deadline, Timer::KeepAlive(conn))));
        }
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        session.epoch = epoch;
        session.expiry_interval = expiry_interval;
        session.expires_at = None;
        // A new connection before the will delay passed cancels the will [MQTT-3.1.3-9].
        session.delayed_will = None;
        session.username = Some(link.username.clone());
        session.link = Some(link);
        self.conns.insert(conn, key);
        self.update_persistence(key);
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };

        let mut properties = Properties::default();
        if v5 {
            properties.assigned_client_identifier = assigned_client_id;
            properties.server_keep_alive = server_keep_alive;
            if expiry_interval != requested_expiry {
                properties.session_expiry_interval = Some(expiry_interval);
            }
            if self.config.receive_maximum != u16::MAX {
                properties.receive_maximum = Some(self.config.receive_maximum);
            }
            properties.maximum_packet_size = Some(self.config.max_packet_size);
            if self.config.topic_alias_maximum > 0 {
                properties.topic_alias_maximum = Some(self.config.topic_alias_maximum);
            }
            if !self.config.retain_available {
                properties.retain_available = Some(0);
            }
            // The server's final data of the exchange it completed [MQTT-4.12.0-5]: the same
            // method, and the CONNECT's Authentication Data as the server replaced it.
            properties.authentication_method = connect.properties.authentication_method;
            properties.authentication_data = connect.properties.authentication_data;
        }
        self.out.send(
            conn,
            Packet::ConnAck(ConnAck {
                session_present,
                code: ReasonCode::SUCCESS,
                properties,
            }),
        );
        if session_present {
            session.resend_inflight(now, &mut self.out);
            if let Some(streams) = session.retained.as_deref_mut() {
                // A notification asked of the previous connection will not come.
                streams.awaiting_write = false;
            }
            self.pump(now, key);
        }
    }

    pub(crate) fn protocol_error(&mut self, now: Instant, key: SessionKey, why: &str) {
        self.close_with(now, key, ReasonCode::PROTOCOL_ERROR, why);
    }

    /// Closes an MQTT 5 connection with a DISCONNECT carrying `reason` and a reason string.
    pub(crate) fn close_with(
        &mut self,
        now: Instant,
        key: SessionKey,
        reason: ReasonCode,
        why: &str,
    ) {
        if let Some(session) = self.sessions.get(&key) {
            session.send_disconnect(reason, Some(why), &mut self.out);
        }
        self.close_link(now, key, CloseKind::Abnormal(None));
    }

    pub(crate) fn close_link(&mut self, now: Instant, key: SessionKey, kind: CloseKind) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        match kind {
            CloseKind::Abnormal(Some(reason)) => {
                session.send_disconnect(reason, None, &mut self.out)
            }
            CloseKind::TakenOver => {
                session.send_disconnect(ReasonCode::SESSION_TAKEN_OVER, None, &mut self.out)
            }
            _ => {}
        }
        let Some(mut link) = session.link.take() else {
            return;
        };
        self.conns.remove(&link.conn);
        self.pushback.forget(link.conn);
        self.pushback.note_maybe_room();
        self.out
            .outputs
            .push_back(Output::Close { conn: link.conn });
        let will = match kind {
            CloseKind::Normal => None,
            CloseKind::NormalWithWill | CloseKind::Abnormal(_) | CloseKind::TakenOver => {
                link.will.take().map(|will| *will)
            }
        };
        if kind == CloseKind::TakenOver {
            if let Some(will) = will {
                self.schedule_will(now, key, will);
            }
            return;
        }
        let ends_now = session.expiry_interval == 0;
        if let Some(will) = will {
            if ends_now {
                self.publish_will(now, key, will);
            } else {
                self.schedule_will(now, key, will);
            }
        }
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        if ends_now {
            self.end_session(now, key);
            return;
        }
        if session.expiry_interval != u32::MAX {
            let at = now + Duration::from_secs(u64::from(session.expiry_interval));
            session.expires_at = Some(at);
            self.timers
                .push(Reverse((at, Timer::SessionExpiry(key, session.epoch))));
        }
        self.save_session_record(key);
    }

    /// Publishes `will` now, or after its Will Delay Interval unless a new connection to
    /// the session comes first [MQTT-3.1.3-9].
    pub(crate) fn schedule_will(&mut self, now: Instant, key: SessionKey, will: Will) {
        let delay = will.properties.will_delay_interval.unwrap_or(0);
        match self.sessions.get_mut(&key) {
            Some(session) if delay > 0 => {
                let due = now + Duration::from_secs(u64::from(delay));
                session.delayed_will = Some(Box::new((due, will)));
                self.timers
                    .push(Reverse((due, Timer::Will(key, session.epoch))));
                self.save_session_record(key);
            }
            _ => self.publish_will(now, key, will),
        }
    }

    /// Discards a session: its subscriptions leave the router and a will still waiting out
    /// its delay is published now, since the session ended first [MQTT-3.1.3-9].
    pub(crate) fn end_session(&mut self, now: Instant, key: SessionKey) {
        let Some(session) = self.sessions.remove(&key) else {
            return;
        };
        if self.client_ids.get(&session.client_id) == Some(&key) {
            self.client_ids.remove(&session.client_id);
        }
        if let Some(link) = &session.link {
            self.conns.remove(&link.conn);
            self.pushback.forget(link.conn);
        }
        self.pushback.note_maybe_room();
        for filter in session.subscriptions.keys() {
            if self.router.unsubscribe(key, FilterRef::parse(filter)) {
                self.subscription_count -= 1;
            }
        }
        self.registry.release(&session.client_id, session.epoch);
        if let Some(journal) = self.out.journal(session.persistent) {
            journal.store.delete_session(&session.client_id);
        }
        if let Some((_, will)) = session.delayed_will.map(|b| *b) {
            self.publish_will(now, key, will);
        }
    }

    pub(crate) fn publish_will(&mut self, now: Instant, key: SessionKey, will: Will) {
        let mut properties = will.properties;
        let expiry = properties.message_expiry_interval.take();
        properties.will_delay_interval = None;
        let message = Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties: boxed_properties(properties),
            expires_at: expiry.map(|secs| now + Duration::from_secs(u64::from(secs))),
            publisher: Some(key),
        };
        self.route(now, Arc::new(message), false);
    }

    pub(crate) fn on_publish(&mut self, now: Instant, key: SessionKey, mut publish: Publish) {
        self.out.stats.messages_received += 1;
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(link) = session.link.as_mut() else {
            return;
        };
        let conn = link.conn;
        let v5 = link.version.is_v5();

        if !link.publish_rate.take(now) {
            self.out.stats.refused_publish_rate += 1;
            return self.close_with(
                now,
                key,
                ReasonCode::MESSAGE_RATE_TOO_HIGH,
                "publish rate above max_publish_rate",
            );
        }
        if !publish.properties.subscription_identifiers.is_empty() {
            // [MQTT-3.3.4-6]
            return self.protocol_error(now, key, "Subscription Identifier in a client PUBLISH");
        }
        if let Some(alias) = publish.properties.topic_alias.take() {
            if alias == 0 || alias > self.config.topic_alias_maximum {
                // [MQTT-3.3.2-9], [MQTT-3.3.2-10]
                return self.close_with(
                    now,
                    key,
                    ReasonCode::TOPIC_ALIAS_INVALID,
                    "topic alias out of range",
                );
            }
            if publish.topic.is_empty() {
                match link.inbound_aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return self.protocol_error(now, key, "topic alias not yet defined"),
                }
            } else {
                link.inbound_aliases.insert(alias, publish.topic.clone());
            }
        } else if publish.topic.is_empty() {
            return self.protocol_error(now, key, "empty topic without a topic alias");
        }

        if !self.topic_within_limits(&publish.topic) {
            return self.close_with(
                now,
                key,
                ReasonCode::TOPIC_NAME_INVALID,
                "topic exceeds the configured length or level limit",
            );
        }
        if publish.retain && !self.config.retain_available {
            // [MQTT-3.3.1-19]
            return self.close_with(
                now,
                key,
                ReasonCode::RETAIN_NOT_SUPPORTED,
                "retain is not available",
            );
        }

        let packet_id = publish.packet_id.unwrap_or(0);
        if !self.may_publish(key, &publish.topic) {
            return self.deny_publish(conn, v5, publish.qos, packet_id);
        }
        if publish.qos == QoS::ExactlyOnce {
            let Some(session) = self.sessions.get_mut(&key) else {
                return;
            };
            if session.inbound_qos2.contains(&packet_id) {
                // Re-sent before PUBREL: acknowledged again, not delivered again [MQTT-4.3.3-9].
                self.out
                    .send(conn, pub_response(packet_id, ReasonCode::SUCCESS));
                return;
            }
            if session.inbound_qos2.len() >= usize::from(self.config.receive_maximum) {
                // [MQTT-3.3.4-9]
                return self.close_with(
                    now,
                    key,
                    ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                    "more unacknowledged QoS 2 messages than Receive Maximum",
                );
            }
        }

        let mut properties = publish.properties;
        let expiry = properties.message_expiry_interval.take();
        // A retained message can outlive the read buffer its payload was cut from by hours;
        // copying it lets that buffer be freed instead of pinned.
        let payload = if publish.retain {
            bytes::Bytes::copy_from_slice(&publish.payload)
        } else {
            publish.payload
        };
        let message = Message {
            topic: publish.topic,
            payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: boxed_properties(properties),
            expires_at: expiry.map(|secs| now + Duration::from_secs(u64::from(secs))),
            publisher: Some(key),
        };
        let publish = PendingPublish {
            message: Arc::new(message),
            qos: publish.qos,
            packet_id,
            v5,
        };
        self.finish_publish(now, key, conn, publish);
    }

    /// Routes a validated publish and acknowledges it, or, when a subscriber's queue has no
    /// room for it, pushes the publisher back (MQTT 3.x, or MQTT 5 with
    /// `queue_full_policy = "pushback"`) or refuses it with 0x97 (MQTT 5 by default).
    pub(crate) fn finish_publish(
        &mut self,
        now: Instant,
        key: SessionKey,
        conn: ConnectionId,
        publish: PendingPublish,
    ) {
        let (qos, packet_id, v5) = (publish.qos, publish.packet_id, publish.v5);
        let outcome = self.route(now, Arc::clone(&publish.message), true);
        let blocked_by = self.pushback.blocked_by.take();
        if outcome == RouteOutcome::QuotaExceeded && qos != QoS::AtMostOnce {
            let push_back = !v5 || self.config.queue_full_policy == QueueFullPolicy::Pushback;
            match blocked_by {
                Some(waiting_on) if push_back && waiting_on != key => {
                    // Not refused after all: it waits (see `pushback`).
                    self.out.stats.refused_quota = self.out.stats.refused_quota.saturating_sub(1);
                    return self.push_back_publish(now, conn, publish, waiting_on);
                }
                // The publisher's own queue is full: pausing it would stop us reading the
                // PUBACKs that empty that queue. MQTT 3.x cannot refuse a publish: withhold
                // the acknowledgement and close, so the client sends it again on reconnect
                // instead of believing it delivered.
                _ if !v5 => return self.close_link(now, key, CloseKind::Abnormal(None)),
                _ => {}
            }
        }
        let reason = match outcome {
            RouteOutcome::Delivered => ReasonCode::SUCCESS,
            RouteOutcome::NoSubscribers if v5 => ReasonCode::NO_MATCHING_SUBSCRIBERS,
            RouteOutcome::NoSubscribers => ReasonCode::SUCCESS,
            RouteOutcome::QuotaExceeded => ReasonCode::QUOTA_EXCEEDED,
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.out.send(
                conn,
                Packet::PubAck(PubResponse {
                    packet_id,
                    reason,
                    properties: Properties::default(),
                }),
            ),
            QoS::ExactlyOnce => {
                if outcome != RouteOutcome::QuotaExceeded {
                    if let Some(session) = self.sessions.get_mut(&key) {
                        session.inbound_qos2.insert(packet_id);
                        if let Some(journal) = self.out.journal(session.persistent) {
                            journal
                                .store
                                .put_inbound_qos2(&session.client_id, packet_id);
                        }
                    }
                }
                self.out.send(conn, pub_response(packet_id, reason));
            }
        }
    }

    pub(crate) fn on_pubrec(&mut self, now: Instant, key: SessionKey, rec: PubResponse) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(conn) = session.link.as_ref().map(|link| link.conn) else {
            return;
        };
        match session.on_pubrec(rec.packet_id, rec.reason, &mut self.out) {
            Some(reason) => {
                let reason = if session.is_v5() {
                    reason
                } else {
                    ReasonCode::SUCCESS
                };
                self.out.send(
                    conn,
                    Packet::PubRel(PubResponse {
                        packet_id: rec.packet_id,
                        reason,
                        properties: Properties::default(),
                    }),
                );
            }
            None => self.pump(now, key),
        }
    }

    pub(crate) fn on_pubrel(&mut self, key: SessionKey, rel: PubResponse) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(conn) = session.link.as_ref().map(|link| link.conn) else {
            return;
        };
        let known = session.inbound_qos2.remove(&rel.packet_id);
        if known {
            if let Some(journal) = self.out.journal(session.persistent) {
                journal
                    .store
                    .delete_inbound_qos2(&session.client_id, rel.packet_id);
            }
        }
        let reason = if known || !session.is_v5() {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        };
        self.out.send(
            conn,
            Packet::PubComp(PubResponse {
                packet_id: rel.packet_id,
                reason,
                properties: Properties::default(),
            }),
        );
    }

    pub(crate) fn on_subscribe(&mut self, now: Instant, key: SessionKey, subscribe: Subscribe) {
        let identifier = subscribe
            .properties
            .subscription_identifiers
            .first()
            .copied();
        let Some(v5) = self.sessions.get(&key).map(|s| s.is_v5()) else {
            return;
        };
        if subscribe
            .subscriptions
            .iter()
            .any(|sub| sub.options.no_local && FilterRef::parse(&sub.filter).group.is_some())
        {
            // [MQTT-3.8.3-4]
            return self.protocol_error(now, key, "No Local on a shared subscription");
        }
        let mut reasons = Vec::with_capacity(subscribe.subscriptions.len());
        let mut retained_requests = Vec::new();
        for subscription in subscribe.subscriptions {
            if !self.topic_within_limits(&subscription.filter) {
                reasons.push(if v5 {
                    ReasonCode::TOPIC_FILTER_INVALID
                } else {
                    ReasonCode::V3_SUBACK_FAILURE
                });
                continue;
            }
            let inner = FilterRef::parse(&subscription.filter).filter;
            if !self.authorized(key, Access::Subscribe, inner) {
                self.out.stats.denied_subscribe += 1;
                reasons.push(if v5 {
                    ReasonCode::NOT_AUTHORIZED
                } else {
                    ReasonCode::V3_SUBACK_FAILURE
                });
                continue;
            }
            if !self.subscription_quota_allows(key, &subscription.filter) {
                reasons.push(if v5 {
                    ReasonCode::QUOTA_EXCEEDED
                } else {
                    ReasonCode::V3_SUBACK_FAILURE
                });
                continue;
            }
            let entry = SubscriptionEntry {
                options: subscription.options,
                identifier,
            };
            let filter = FilterRef::parse(&subscription.filter);
            let is_new = self.router.subscribe(key, filter, entry);
            if is_new {
                self.subscription_count += 1;
            }
            let send_retained = filter.group.is_none()
                && match subscription.options.retain_handling {
                    0 => true,
                    1 => is_new,
                    _ => false,
                };
            if send_retained {
                retained_requests.push((filter.filter.to_owned(), entry));
            }
            if let Some(session) = self.sessions.get_mut(&key) {
                // The subscription is replaced: a stream of its retained messages still
                // running starts over if they are to be sent again [MQTT-3.8.4-3].
                if filter.group.is_none() {
                    session.stop_retained(filter.filter);
                }
                if let Some(journal) = self.out.journal(session.persistent) {
                    journal.store.put_subscription(
                        &session.client_id,
                        &subscription.filter,
                        &entry,
                    );
                }
                session.subscriptions.insert(subscription.filter, entry);
            }
            reasons.push(ReasonCode(subscription.options.qos as u8));
        }
        let Some(conn) = self
            .sessions
            .get(&key)
            .and_then(|s| s.link.as_ref())
            .map(|link| link.conn)
        else {
            return;
        };
        self.out.send(
            conn,
            Packet::SubAck(SubAck {
                packet_id: subscribe.packet_id,
                reasons,
                properties: Properties::default(),
            }),
        );
        self.send_retained(now, key, retained_requests);
    }

    /// Retained messages for new subscriptions, with RETAIN=1 [MQTT-3.3.1-8]: each request
    /// starts a stream that `pump` reads a page at a time. Not bounded by the session's queue
    /// limit: a wildcard subscriber gets every retained message, not only the first
    /// `max_queued_messages`; the stream's page is the bound on memory.
    pub(crate) fn send_retained(
        &mut self,
        now: Instant,
        key: SessionKey,
        requests: Vec<(String, SubscriptionEntry)>,
    ) {
        if requests.is_empty() {
            return;
        }
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let streams = session.retained.get_or_insert_with(Box::default);
        for (filter, entry) in requests {
            streams.streams.push_back(RetainedStream {
                filter,
                entry,
                after: None,
                done: false,
            });
        }
        self.pump(now, key);
    }

    /// Moves a session's queued messages into its in-flight window, then continues its
    /// retained streams: when everything read has been sent, the next page is read (one per
    /// call, so a long stream never holds the broker task). After a page is sent the next
    /// waits for acknowledgements (QoS 1/2 in the window) or for [`Broker::handle_written`]
    /// (QoS 0, or a page with nothing to send).
    pub(crate) fn pump(&mut self, now: Instant, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        session.pump(now, &mut self.out);
        session.drop_finished_streams();
        if !session.wants_retained_page() {
            return;
        }
        let Some((filter, entry, after)) = session
            .retained
            .as_ref()
            .and_then(|streams| streams.streams.front())
            .map(|stream| (stream.filter.clone(), stream.entry, stream.after.clone()))
        else {
            return;
        };
        let page = self.read_retained(now, &filter, after.as_deref(), RETAINED_PAGE);
        let mut deliveries = Vec::with_capacity(page.messages.len());
        for message in page.messages {
            if !self.authorized(key, Access::Receive, &message.topic) {
                self.out.stats.denied_delivery += 1;
                continue;
            }
            deliveries.push(Delivery {
                seq: 0,
                qos: message.qos.min(entry.options.qos),
                retain: true,
                subscription_ids: entry.identifier.into_iter().collect(),
                message,
            });
        }
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(streams) = session.retained.as_deref_mut() else {
            return;
        };
        if let Some(stream) = streams.streams.front_mut() {
            stream.done = page.next.is_none();
            stream.after = page.next;
        }
        streams.ready.extend(deliveries);
        session.pump(now, &mut self.out);
        session.drop_finished_streams();
        let conn = session.link.as_ref().map(|link| link.conn);
        if let (Some(streams), Some(conn)) = (session.retained.as_deref_mut(), conn) {
            if streams.ready.is_empty() {
                streams.awaiting_write = true;
                self.out.outputs.push_back(Output::NotifyWritten { conn });
            }
        }
    }

    /// Everything written to `conn` up to an [`Output::NotifyWritten`] has reached its
    /// socket: the session's retained stream continues with its next page.
    pub fn handle_written(&mut self, now: Instant, conn: ConnectionId) {
        let Some(&key) = self.conns.get(&conn) else {
            return;
        };
        let Some(streams) = self
            .sessions
            .get_mut(&key)
            .and_then(|session| session.retained.as_deref_mut())
        else {
            return;
        };
        streams.awaiting_write = false;
        self.pump(now, key);
    }

    /// One page of retained messages matching `filter` after the cursor `after`: from the
    /// store when there is one, except `$SYS` topics, which are kept in memory only (see
    /// `set_retained`). Expired messages met are removed and left out.
    pub(crate) fn read_retained(
        &mut self,
        now: Instant,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> RetainedPage<Arc<Message>> {
        let mut page = match self.out.journal.as_mut().filter(|_| !is_sys_filter(filter)) {
            Some(journal) => match journal.store.read_retained(filter, after, limit) {
                Ok(page) => RetainedPage {
                    messages: page
                        .messages
                        .into_iter()
                        .map(|stored| Arc::new(journal.clock.message(stored)))
                        .collect(),
                    next: page.next,
                },
                // The store logged it; a stream that cannot be read ends, like a queue.
                Err(_) => RetainedPage {
                    messages: Vec::new(),
                    next: None,
                },
            },
            None => self.retained.read(filter, after, limit),
        };
        if page.messages.iter().any(|message| message.is_expired(now)) {
            let (expired, live) = page
                .messages
                .into_iter()
                .partition(|message| message.is_expired(now));
            page.messages = live;
            let expired: Vec<Arc<Message>> = expired;
            for message in expired {
                self.remove_retained(&message.topic);
            }
        }
        page
    }

    /// Stores `message` as its topic's retained message: in the store when there is one,
    /// except `$SYS` topics, which are stale after a restart and stay in memory.
    pub(crate) fn set_retained(&mut self, message: &Arc<Message>) {
        match self
            .out
            .journal
            .as_mut()
            .filter(|_| !is_sys_filter(&message.topic))
        {
            Some(journal) => journal
                .store
                .put_retained(&journal.clock.stored_message(message)),
            None => self.retained.set(Arc::clone(message)),
        }
    }

    /// Clears the retained message of `topic`, wherever `set_retained` put it.
    pub(crate) fn remove_retained(&mut self, topic: &str) {
        match self.out.journal.as_mut().filter(|_| !is_sys_filter(topic)) {
            Some(journal) => journal.store.delete_retained(topic),
            None => {
                self.retained.remove(topic);
            }
        }
    }

    pub(crate) fn on_unsubscribe(
        &mut self,
        now: Instant,
        key: SessionKey,
        unsubscribe: Unsubscribe,
    ) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(link) = session.link.as_ref() else {
            return;
        };
        let conn = link.conn;
        let v5 = link.version.is_v5();
        let mut reasons = Vec::new();
        let mut stopped = false;
        for filter in &unsubscribe.filters {
            stopped |= session.stop_retained(filter);
            let existed = session.subscriptions.remove(filter).is_some();
            if existed {
                if let Some(journal) = self.out.journal(session.persistent) {
                    journal
                        .store
                        .delete_subscription(&session.client_id, filter);
                }
            }
            if existed && self.router.unsubscribe(key, FilterRef::parse(filter)) {
                self.subscription_count -= 1;
            }
            if v5 {
                reasons.push(if existed {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::NO_SUBSCRIPTION_EXISTED
                });
            }
        }
        self.out.send(
            conn,
            Packet::UnsubAck(UnsubAck {
                packet_id: unsubscribe.packet_id,
                reasons,
                properties: Properties::default(),
            }),
        );
        if stopped {
            // The stream being read may have been the one stopped: the next one starts.
            self.pump(now, key);
        }
    }

    pub(crate) fn on_disconnect(
        &mut self,
        now: Instant,
        key: SessionKey,
        disconnect: halyard_codec::Disconnect,
    ) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        if let Some(expiry) = disconnect.properties.session_expiry_interval {
            if session.expiry_interval == 0 && expiry != 0 {
                // [MQTT-3.14.2-2]
                return self.protocol_error(
                    now,
                    key,
                    "session expiry set on DISCONNECT after 0 in CONNECT",
                );
            }
            session.expiry_interval = expiry.min(self.config.max_session_expiry);
        }
        let kind = if disconnect.reason == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE {
            CloseKind::NormalWithWill
        } else {
            // [MQTT-3.1.2-10]: the will is discarded on a normal DISCONNECT.
            CloseKind::Normal
        };
        self.close_link(now, key, kind);
    }

    /// Routes one message to every matching session. With `atomic`, a QoS 1/2 message
    /// that some subscriber has no room for is delivered to nobody, so the publisher can be
    /// told (0x97) and retry without creating duplicates elsewhere.
    pub(crate) fn route(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        atomic: bool,
    ) -> RouteOutcome {
        let mut matches = std::mem::take(&mut self.route_scratch);
        matches.clear();
        let sessions = &self.sessions;
        self.router.route(
            &message.topic,
            &|key| sessions.get(&key).is_some_and(|s| s.link.is_some()),
            &mut matches,
        );
        matches.retain(|m| !(m.entry.options.no_local && message.publisher == Some(m.session)));
        if !self.authorizer.allows_everything() {
            let before = matches.len();
            matches.retain(|m| self.authorized(m.session, Access::Receive, &message.topic));
            self.out.stats.denied_delivery += (before - matches.len()) as u64;
        }
        // Overlapping subscriptions of one session give one copy, at the highest QoS, with
        // every subscription identifier [MQTT-3.3.4-3] .. [MQTT-3.3.4-5].
        matches.sort_by_key(|m| (m.session, m.shared));
        let mut deliveries: Vec<(SessionKey, Delivery)> = Vec::with_capacity(matches.len());
        for m in &matches {
            let retain = m.entry.options.retain_as_published && message.retain;
            let qos = message.qos.min(m.entry.options.qos);
            match deliveries.last_mut() {
                Some((session, delivery)) if *session == m.session && !m.shared => {
                    delivery.qos = delivery.qos.max(qos);
                    delivery.retain |= retain;
                    delivery.subscription_ids.extend(m.entry.identifier);
                }
                _ => deliveries.push((
                    m.session,
                    Delivery {
                        seq: 0,
                        message: Arc::clone(&message),
                        qos,
                        retain,
                        subscription_ids: m.entry.identifier.into_iter().collect(),
                    },
                )),
            }
        }
        self.route_scratch = matches;

        let limits = self.limits();
        if atomic {
            let blocked = deliveries.iter().find(|(key, delivery)| {
                delivery.qos != QoS::AtMostOnce
                    && self.sessions.get(key).is_some_and(|s| !s.has_room(limits))
            });
            if let Some(&(blocked_by, _)) = blocked {
                self.pushback.blocked_by = Some(blocked_by);
                if message.qos == QoS::AtMostOnce {
                    self.out.stats.dropped_qos0 += 1;
                } else {
                    self.out.stats.refused_quota += 1;
                }
                return RouteOutcome::QuotaExceeded;
            }
        }
        if message.retain {
            if message.payload.is_empty() {
                // [MQTT-3.3.1-10], [MQTT-3.3.1-11]
                self.remove_retained(&message.topic);
            } else {
                // [MQTT-3.3.1-5]
                self.set_retained(&message);
            }
        }
        if deliveries.is_empty() {
            return RouteOutcome::NoSubscribers;
        }
        for (key, delivery) in deliveries {
            let Some(session) = self.sessions.get_mut(&key) else {
                continue;
            };
            let qos = delivery.qos;
            if !session.push(delivery, now, limits, &mut self.out) {
                if qos == QoS::AtMostOnce {
                    self.out.stats.dropped_qos0 += 1;
                } else {
                    self.out.stats.dropped_queue_full += 1;
                }
            }
        }
        RouteOutcome::Delivered
    }
}

impl Broker {
    /// Answers a PUBLISH the authorizer refused: MQTT 5 gets PUBACK/PUBREC 0x87 Not
    /// authorized; MQTT 3.x cannot be told, so the message is acknowledged as usual and
    /// dropped ([MQTT-3.3.5-2] allows this). Either way nothing is routed or retained.
    pub(crate) fn deny_publish(&mut self, conn: ConnectionId, v5: bool, qos: QoS, packet_id: u16) {
        self.out.stats.denied_publish += 1;
        let reason = if v5 {
            ReasonCode::NOT_AUTHORIZED
        } else {
            ReasonCode::SUCCESS
        };
        let response = PubResponse {
            packet_id,
            reason,
            properties: Properties::default(),
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.out.send(conn, Packet::PubAck(response)),
            // 3.x: the client's PUBREL for this id is answered with PUBCOMP like any other.
            QoS::ExactlyOnce => self.out.send(conn, Packet::PubRec(response)),
        }
    }
}

fn pub_response(packet_id: u16, reason: ReasonCode) -> Packet {
    Packet::PubRec(PubResponse {
        packet_id,
        reason,
        properties: Properties::default(),
    })
}
