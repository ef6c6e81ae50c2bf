//! The broker state machine's node-level state and its entry point for packets.
//!
//! Each concern lives in a module of its own that extends [`Broker`] with an `impl` block:
//! `connect` (CONNECT, claims, takeover), `close` (disconnects, wills, session end),
//! `publish` (inbound PUBLISH and QoS handshakes), `routing` (fan-out to sessions and
//! nodes), `forward_outbox` (what other nodes have yet to store), `subscribe`,
//! `retained_delivery`, `timers` and `persistence`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use halyard_codec::Packet;

use crate::authz::{AllowAll, Authorizer};
use crate::config::BrokerConfig;
use crate::connect::AdmittedConnect;
use crate::forward_outbox::ForwardOutboxes;
use crate::memory_meter::MemoryMeter;
use crate::message::SessionKey;
use crate::move_window::MoveWindow;
use crate::output::Output;
use crate::pushback::Pushback;
use crate::registry::{DeferredSessionRegistry, LocalSessionRegistry, SessionRegistry};
use crate::retained::{MemoryRetained, RetainedStore};
use crate::router::{LocalRouter, RouteMatch, Router};
use crate::session::{Link, Outbox, QueueLimits, Session};
use crate::stats::{BrokerStats, DropReport};
use crate::subscribe::RouteWait;
use crate::timer_queue::TimerQueue;
use crate::FastMap;

/// Opaque id the server gives each accepted network connection; never reused in a process.
pub type ConnectionId = u64;

/// The replaceable parts of a broker. The default is a single node's: a local trie, retained
/// messages in memory (unless a store holds them) and a registry that grants every claim.
pub struct BrokerParts {
    /// Who subscribes to what, here and on other nodes.
    pub router: Box<dyn Router>,
    /// Retained messages kept in memory.
    pub retained: Box<dyn RetainedStore>,
    /// Who owns each client id's session.
    pub registry: Box<dyn SessionRegistry>,
    /// Whether subscriptions and retained messages are replicated to other nodes: the
    /// core then emits `Output::Subscriptions` and `Output::Retain`, and a SUBACK waits
    /// for its routes to be committed.
    pub replicated: bool,
}

impl BrokerParts {
    /// A cluster node's parts: the local trie (which also holds the other nodes' routes),
    /// retained messages in memory unless a store holds them, claims left to the driver
    /// ([`DeferredSessionRegistry`]), and replication of subscriptions and retained
    /// messages.
    pub fn replicated() -> Self {
        BrokerParts {
            router: Box::new(LocalRouter::new()),
            retained: Box::new(MemoryRetained::new()),
            registry: Box::new(DeferredSessionRegistry),
            replicated: true,
        }
    }
}

impl Default for BrokerParts {
    fn default() -> Self {
        BrokerParts {
            router: Box::new(LocalRouter::new()),
            retained: Box::new(MemoryRetained::new()),
            registry: Box::new(LocalSessionRegistry::default()),
            replicated: false,
        }
    }
}

/// The whole broker. One instance per node; the server drives it from a single task.
/// Fields are crate-visible so that concerns living in their own modules (admin queries,
/// authorization) can extend `Broker` with `impl` blocks of their own.
pub struct Broker {
    pub(crate) config: BrokerConfig,
    /// Boxed: a map of inline sessions would hold up to twice the live sessions' size in
    /// empty slots (hash table growth), which counts in memory per idle connection.
    pub(crate) sessions: FastMap<SessionKey, Box<Session>>,
    /// Sessions by client id, in order: the admin API pages through it without sorting
    /// (lookups happen per CONNECT, never per message).
    pub(crate) client_ids: BTreeMap<String, SessionKey>,
    pub(crate) conns: FastMap<ConnectionId, SessionKey>,
    pub(crate) router: Box<dyn Router>,
    /// Retained messages kept in memory: all of them without a store, only `$SYS` ones
    /// with one (the rest live in the store and are read in pages, see `read_retained`).
    pub(crate) retained: Box<dyn RetainedStore>,
    pub(crate) registry: Box<dyn SessionRegistry>,
    /// CONNECTs waiting for the outcome of their claim, by connection.
    pub(crate) claims: FastMap<ConnectionId, Box<AdmittedConnect>>,
    /// See [`BrokerParts::replicated`].
    pub(crate) replicated: bool,
    /// SUBACKs waiting for their routes to be committed, by ticket.
    pub(crate) route_waits: FastMap<u64, RouteWait>,
    pub(crate) next_ticket: u64,
    pub(crate) timers: TimerQueue,
    pub(crate) out: Outbox,
    pub(crate) next_session_key: SessionKey,
    pub(crate) next_assigned_id: u64,
    pub(crate) subscription_count: usize,
    pub(crate) route_scratch: Vec<RouteMatch>,
    /// Publishers paused because a subscriber's queue is full (see `pushback`).
    pub(crate) pushback: Pushback,
    /// Since when the store has been out of space (degraded mode, see `disk_full`).
    pub(crate) disk_full: Option<Instant>,
    /// Topic access rules; [`AllowAll`] unless the server installs others (see `authz`).
    pub(crate) authorizer: Arc<dyn Authorizer>,
    /// Forwards to other nodes kept until they are stored there (see `forward_outbox`).
    pub(crate) outboxes: ForwardOutboxes,
    /// Messages caught while sessions move between nodes (see `move_window`).
    pub(crate) move_window: MoveWindow,
    /// See [`Broker::set_route_version`]; 0 on a single node.
    pub(crate) route_version: u64,
    /// Bytes the sessions' queues and in-flight windows hold in memory.
    pub(crate) memory: MemoryMeter,
    /// Nodes whose forward lane is behind (see `peer_flow`).
    pub(crate) congested_nodes: Vec<crate::message::NodeId>,
}

impl Broker {
    /// A single-node broker with in-memory state.
    pub fn new(config: BrokerConfig) -> Broker {
        Broker::with_parts(config, BrokerParts::default())
    }

    /// A broker with its routing, retained storage and session ownership supplied by the
    /// caller: the seams a cluster plugs into.
    pub fn with_parts(config: BrokerConfig, parts: BrokerParts) -> Broker {
        let BrokerParts {
            router,
            retained,
            registry,
            replicated,
        } = parts;
        Broker {
            config,
            sessions: FastMap::default(),
            client_ids: BTreeMap::new(),
            conns: FastMap::default(),
            router,
            retained,
            registry,
            claims: FastMap::default(),
            replicated,
            route_waits: FastMap::default(),
            next_ticket: 1,
            timers: TimerQueue::default(),
            out: Outbox::default(),
            next_session_key: 1,
            next_assigned_id: 1,
            subscription_count: 0,
            route_scratch: Vec::new(),
            pushback: Pushback::default(),
            disk_full: None,
            authorizer: Arc::new(AllowAll),
            outboxes: ForwardOutboxes::default(),
            move_window: MoveWindow::default(),
            route_version: 0,
            memory: MemoryMeter::default(),
            congested_nodes: Vec::new(),
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
            // What users retained: `$SYS` topics are the broker's own.
            retained_messages: self.retained.len() - self.retained.sys_len()
                + self
                    .out
                    .journal
                    .as_ref()
                    .map_or(0, |journal| journal.store.retained_len()),
            disk_full: self.disk_full.is_some(),
            ..self.out.stats
        }
    }

    /// Whether messages were dropped for full queues since the last report.
    pub fn has_drops_to_report(&self) -> bool {
        !self.out.drops.is_empty()
    }

    /// The messages dropped for full queues since the last call, per client: the server
    /// logs them once per interval, so a flood costs one line per client, not per message.
    pub fn take_drop_report(&mut self) -> DropReport {
        std::mem::take(&mut self.out.drops)
    }

    /// Deadlines armed (keep-alive, pushback, will delay, session expiry): at most two per
    /// live connection and two per session, whatever clients do.
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Bytes of messages all sessions hold in memory, queued beyond their in-flight windows
    /// and in flight: each message's footprint (its allocations, topic, payload and the read
    /// buffer around it, properties) per delivery, and the queues' buffers; a persistent
    /// session's messages on disk are not counted. What the server's memory budget bounds.
    pub fn held_bytes(&self) -> u64 {
        self.memory.held()
    }

    /// QoS 1/2 deliveries all sessions hold in memory, queued and in flight: while there are
    /// any, deliveries wait on acknowledgements, and the server keeps its turns short.
    pub fn held_messages(&self) -> u64 {
        self.memory.messages()
    }

    /// Whether `conn` has outbound QoS 1/2 messages in flight: its acknowledgements free
    /// memory, so pacing it as a publisher could stall the very thing that relieves the
    /// budget.
    pub fn has_inflight(&self, conn: ConnectionId) -> bool {
        self.conns
            .get(&conn)
            .and_then(|key| self.sessions.get(key))
            .is_some_and(|session| !session.inflight.is_empty())
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
        self.timers.peek().map(|(at, _)| at)
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
            let Some(packet) = self.hold_while_claiming(conn, packet) else {
                return;
            };
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

    pub(crate) fn link_mut(&mut self, key: SessionKey) -> Option<&mut Link> {
        self.sessions.get_mut(&key).and_then(|s| s.link.as_mut())
    }

    pub(crate) fn limits(&self) -> QueueLimits {
        QueueLimits {
            max_queued: self.config.max_queued_messages,
            max_queued_bytes: self.config.max_queued_bytes,
        }
    }

    pub(crate) fn topic_within_limits(&self, topic: &str) -> bool {
        topic.len() <= self.config.max_topic_length
            && topic.split('/').count() <= self.config.max_topic_levels
    }
}
