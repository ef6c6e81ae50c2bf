//! Backpressure for publishers whose QoS 1/2 message a subscriber has no room for.
//!
//! MQTT 3.x cannot refuse a PUBLISH, and acknowledging one and then dropping it would break
//! the at-least-once promise. So instead of closing such a publisher (which made it reconnect
//! and resend everything in flight), the broker keeps the publish *pending*: unacknowledged
//! and not routed. It tells the server to stop reading from the connection
//! ([`Output::Pause`]), so TCP flow control slows the client down, and holds every later
//! packet that was already decoded, in order, behind the pending one. Acknowledgements and
//! PINGREQ are not held: they never reorder publishes, and the publisher's own PUBACKs may be
//! what frees the room it waits for. When room appears (a subscriber acknowledges, leaves
//! or expires) the held packets are handled in order and, once none is left, reading
//! resumes ([`Output::Resume`]).
//!
//! This applies only where `queue_full_policy` refuses the publisher: MQTT 5 publishers get
//! the same treatment with `"pushback"` and are told 0x97 Quota exceeded with `"reject"`.
//! Under the default drop policies a full queue costs only its own subscriber (see
//! [`QueueFullPolicy`]).
//!
//! A pause is bounded by [`PUSHBACK_TIMEOUT`]: two clients that each subscribe to what the
//! other publishes could otherwise wait on each other forever (neither one's PUBACKs are read
//! while it is paused). After the timeout the publisher is closed without acknowledgement,
//! the old behaviour, so it resends on reconnect.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_codec::{Packet, QoS};

use crate::broker::{Broker, ConnectionId};
use crate::close::CloseKind;
use crate::message::{Message, NodeId, SessionKey};
use crate::output::Output;
use crate::timers::Timer;

/// Longest time a publisher stays paused before it is closed unacknowledged (see the module
/// documentation for why a bound is needed). Long enough for a slow but working subscriber
/// to drain a full queue of `max_queued_messages`.
pub const PUSHBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What happens when a subscriber's queue (`max_queued_messages` / `max_queued_bytes`) has
/// no room for a QoS 1/2 message. The first three make the slow subscriber pay alone: the
/// publisher is acknowledged and every other subscriber gets the message. The last two
/// refuse the publisher instead, for pipelines that would rather slow down than lose.
/// Every drop is counted, per reason and per client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueFullPolicy {
    /// Drop the subscriber's oldest queued message to make room: telemetry wants the
    /// latest readings, and a backlog of stale ones helps nobody. The default.
    #[default]
    DropOldest,
    /// Drop the new message for that subscriber; its queue keeps the oldest.
    DropNew,
    /// Disconnect the slow subscriber (MQTT 5: DISCONNECT 0x97 Quota exceeded); a
    /// persistent session keeps what it has queued, and messages beyond it are dropped
    /// while it is away.
    Disconnect,
    /// Refuse the publish for everyone: MQTT 5 publishers get PUBACK/PUBREC 0x97, MQTT 3.x
    /// publishers are pushed back (3.x cannot be told).
    Reject,
    /// Keep the publish pending and stop reading from the publisher until there is room.
    Pushback,
}

impl QueueFullPolicy {
    /// Whether a full queue refuses the publisher rather than dropping for the subscriber.
    pub fn refuses_publisher(self) -> bool {
        matches!(self, QueueFullPolicy::Reject | QueueFullPolicy::Pushback)
    }
}

impl std::str::FromStr for QueueFullPolicy {
    type Err = String;

    /// Parses the configuration spelling, for environment overrides.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "drop_oldest" => Ok(QueueFullPolicy::DropOldest),
            "drop_new" => Ok(QueueFullPolicy::DropNew),
            "disconnect" => Ok(QueueFullPolicy::Disconnect),
            "reject" => Ok(QueueFullPolicy::Reject),
            "pushback" => Ok(QueueFullPolicy::Pushback),
            other => Err(format!(
                "expected \"drop_oldest\", \"drop_new\", \"disconnect\", \"reject\" or \"pushback\", got {other:?}"
            )),
        }
    }
}

/// A publish that was validated and found no room; routed as soon as there is.
#[derive(Debug)]
pub(crate) struct PendingPublish {
    pub(crate) message: Arc<Message>,
    pub(crate) qos: QoS,
    pub(crate) packet_id: u16,
    pub(crate) v5: bool,
}

/// One item a paused connection has waiting, in arrival order.
// Held packets exist only while a publisher is paused; boxing each would cost an allocation
// per held packet for no saving.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Held {
    /// The publish that found no room (always at the front).
    Publish(PendingPublish),
    /// A packet that arrived after it, not looked at yet.
    Packet(Packet),
}

/// What a paused publish waits for; a retry is only worth routing once it is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitingFor {
    /// Room in this session's full queue (or the session gone).
    Room(SessionKey),
    /// Space on the disk (see `disk_full`).
    Disk,
    /// This node's forward lane to another node catching up (see `peer_flow`).
    Node(NodeId),
}

/// One paused connection.
#[derive(Debug)]
struct Paused {
    held: VecDeque<Held>,
    waiting_on: WaitingFor,
    since: Instant,
}

/// Paused publishers; empty (and never allocating) while nobody is pushed back.
#[derive(Debug, Default)]
pub(crate) struct Pushback {
    paused: HashMap<ConnectionId, Paused>,
    /// Paused connections in the order they get the next chance (round robin); entries of
    /// connections no longer paused are skipped.
    order: VecDeque<ConnectionId>,
    /// Set when something happened that may have made room; cleared by a retry.
    maybe_room: bool,
    /// Set whenever something may have made room, paused publishers or not; taken by the
    /// cluster driver, which holds forwards that waited for room (see `peer_flow`).
    pub(crate) freed: bool,
    /// Set by an atomic route that found no room: the first session (or node lane) that
    /// had none.
    pub(crate) blocked_by: Option<WaitingFor>,
}

impl Pushback {
    /// Whether any publisher is paused (the only check on the hot path when none is).
    pub(crate) fn is_empty(&self) -> bool {
        self.paused.is_empty()
    }

    pub(crate) fn is_paused(&self, conn: ConnectionId) -> bool {
        !self.paused.is_empty() && self.paused.contains_key(&conn)
    }

    /// Forgets what a closing connection had held: none of it was acknowledged, so the
    /// client sends it again if its session survives.
    pub(crate) fn forget(&mut self, conn: ConnectionId) {
        if !self.paused.is_empty() && self.paused.remove(&conn).is_some() {
            self.maybe_room = true;
        }
    }

    /// Notes that room may have appeared (an acknowledgement, a session ended, ...).
    pub(crate) fn note_maybe_room(&mut self) {
        self.freed = true;
        if !self.paused.is_empty() {
            self.maybe_room = true;
        }
    }
}

/// Whether a packet from a paused connection waits behind its pending publish: everything
/// but acknowledgements and PINGREQ, which cannot reorder publishes and may be needed to
/// make room.
fn must_wait(packet: &Packet) -> bool {
    !matches!(
        packet,
        Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::PingReq
    )
}

impl Broker {
    /// Holds `packet` if `conn` is paused and the packet must wait; returns it otherwise.
    pub(crate) fn hold_if_paused(&mut self, conn: ConnectionId, packet: Packet) -> Option<Packet> {
        if self.pushback.paused.is_empty() || !must_wait(&packet) {
            return Some(packet);
        }
        match self.pushback.paused.get_mut(&conn) {
            Some(paused) => {
                paused.held.push_back(Held::Packet(packet));
                None
            }
            None => Some(packet),
        }
    }

    /// Makes `publish` the front of `conn`'s held packets, pausing the connection if it was
    /// not paused yet, until `waiting_on` is there.
    pub(crate) fn push_back_publish(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        publish: PendingPublish,
        waiting_on: WaitingFor,
    ) {
        if let Some(paused) = self.pushback.paused.get_mut(&conn) {
            // Re-blocked while its held packets were being replayed.
            paused.held.push_front(Held::Publish(publish));
            paused.waiting_on = waiting_on;
            return;
        }
        let mut held = VecDeque::with_capacity(4);
        held.push_back(Held::Publish(publish));
        self.pushback.paused.insert(
            conn,
            Paused {
                held,
                waiting_on,
                since: now,
            },
        );
        self.pushback.order.push_back(conn);
        self.out.stats.pushback_pauses += 1;
        self.out.outputs.push_back(Output::Pause { conn });
        self.timers
            .arm(now + PUSHBACK_TIMEOUT, Timer::Pushback(conn));
    }

    /// A pushback timer fired: a connection paused for [`PUSHBACK_TIMEOUT`] is closed
    /// without acknowledging what it holds.
    pub(crate) fn check_pushback(&mut self, now: Instant, conn: ConnectionId) {
        let Some(paused) = self.pushback.paused.get(&conn) else {
            return;
        };
        if paused.since + PUSHBACK_TIMEOUT > now {
            // Paused again since this timer was armed; that pause armed its own.
            return;
        }
        self.out.stats.pushback_timeouts += 1;
        if let Some(&key) = self.conns.get(&conn) {
            self.close_link(now, key, CloseKind::Abnormal(None));
        }
        self.pushback.forget(conn);
    }

    /// Gives paused publishers whose blocking session has room the chance to go on, round
    /// robin, each until it blocks again or has nothing held (then it is resumed).
    pub(crate) fn retry_paused(&mut self, now: Instant) {
        if !std::mem::take(&mut self.pushback.maybe_room) || self.pushback.paused.is_empty() {
            return;
        }
        let limits = self.limits();
        for _ in 0..self.pushback.order.len() {
            let Some(conn) = self.pushback.order.pop_front() else {
                break;
            };
            let Some(paused) = self.pushback.paused.get(&conn) else {
                continue; // closed meanwhile
            };
            let still_waiting = match paused.waiting_on {
                WaitingFor::Room(waiting_on) => self
                    .sessions
                    .get(&waiting_on)
                    .is_some_and(|session| !session.has_room(limits, 0)),
                WaitingFor::Disk => self.disk_full.is_some(),
                WaitingFor::Node(node) => self.congested_nodes.contains(&node),
            };
            if still_waiting {
                self.pushback.order.push_back(conn);
                continue;
            }
            self.replay_held(now, conn);
            if self.pushback.paused.contains_key(&conn) {
                self.pushback.order.push_back(conn);
            }
        }
    }

    /// Handles `conn`'s held packets in order until one blocks again or none is left.
    fn replay_held(&mut self, now: Instant, conn: ConnectionId) {
        loop {
            let Some(paused) = self.pushback.paused.get_mut(&conn) else {
                return; // closed by one of its own packets
            };
            let Some(item) = paused.held.pop_front() else {
                self.pushback.paused.remove(&conn);
                if self.conns.contains_key(&conn) {
                    self.out.outputs.push_back(Output::Resume { conn });
                }
                return;
            };
            match item {
                Held::Publish(publish) => {
                    let Some(&key) = self.conns.get(&conn) else {
                        self.pushback.paused.remove(&conn);
                        return;
                    };
                    self.finish_publish(now, key, conn, publish);
                }
                Held::Packet(packet) => self.handle_unheld(now, conn, packet),
            }
            if self
                .pushback
                .paused
                .get(&conn)
                .is_some_and(|paused| matches!(paused.held.front(), Some(Held::Publish(_))))
            {
                return; // blocked again
            }
        }
    }
}
