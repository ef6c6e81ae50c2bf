//! Publishes caught in flight while a session moves from one node to another.
//!
//! A move is decided in raft, and every node learns of it when it applies the claim. Until
//! then a node goes on forwarding the session's messages to the old owner, and the new
//! owner sees them before it has the session (it waits for the old owner's hand-over). Each
//! side bridges its half of that window:
//! - the old owner, once it has handed the session over, passes on what other nodes still
//!   forward to it for the session's subscriptions, and what is published on it before its
//!   routes point to the new owner, to the new owner, for [`RELAY_WINDOW`]
//!   ([`Broker::relay_moved_session`]);
//! - the new owner holds messages (forwarded or published here) that match no session here
//!   while a claim that resumes a session is pending, and routes them again once the claim is
//!   settled and the session imported (at most [`MAX_HELD`]; beyond that they are dropped,
//!   counted in `move_window_dropped`).
//!
//! Held messages are in memory only: a crash of the new owner inside the window can lose
//! them, although their sender's outbox has let them go.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_codec::topic::{matches, parse_shared_subscription};
use halyard_codec::QoS;

use crate::broker::Broker;
use crate::message::{Message, NodeId};
use crate::output::Output;
use crate::publish::RouteOutcome;
use crate::router::RouteScope;
use crate::transfer::SessionState;

/// How long an old owner passes a moved session's messages on: far longer than nodes take
/// to apply the claim and drain what they forwarded before it.
pub const RELAY_WINDOW: Duration = Duration::from_secs(10);

/// Most forwarded messages a new owner holds while claims are pending.
pub const MAX_HELD: usize = 10_000;

/// Relays of moved sessions and messages held for pending claims.
#[derive(Debug, Default)]
pub(crate) struct MoveWindow {
    relays: Vec<Relay>,
    held: VecDeque<Held>,
}

#[derive(Debug)]
struct Relay {
    /// The moved session's client id: no relay once it is back on this node.
    client_id: String,
    node: NodeId,
    /// The moved session's filters (shared ones as their inner filter).
    filters: Vec<String>,
    until: Instant,
}

#[derive(Debug)]
struct Held {
    message: Arc<Message>,
    groups: Vec<Arc<str>>,
}

impl Broker {
    /// The session `state` was handed over to `node`: for [`RELAY_WINDOW`], messages other
    /// nodes forward here that match its subscriptions are passed on to `node`.
    pub fn relay_moved_session(&mut self, now: Instant, node: NodeId, state: &SessionState) {
        let filters: Vec<String> = state
            .subscriptions
            .iter()
            .map(|(filter, _)| {
                parse_shared_subscription(filter)
                    .map_or(filter.as_str(), |(_, inner)| inner)
                    .to_owned()
            })
            .collect();
        if filters.is_empty() {
            return;
        }
        self.move_window.relays.retain(|relay| relay.until > now);
        self.move_window.relays.push(Relay {
            client_id: state.client_id.clone(),
            node,
            filters,
            until: now + RELAY_WINDOW,
        });
    }

    /// Passes a message published here on to the nodes moved sessions went to, except those
    /// the routes already forwarded it to; how many.
    pub(crate) fn relay_local(&mut self, now: Instant, message: &Arc<Message>) -> usize {
        if self.move_window.relays.is_empty() {
            return 0;
        }
        let already = std::mem::take(&mut self.forwarded_to);
        let relayed = self.relay_except(now, message, None, &already);
        self.forwarded_to = already;
        relayed
    }

    /// A message published here matched nothing while a resuming claim is pending: held.
    pub(crate) fn hold_local_while_moving(&mut self, message: Arc<Message>) {
        self.hold_while_moving(Held {
            message,
            groups: Vec::new(),
        });
    }

    /// Passes a message forwarded by `origin` on to the nodes moved sessions went to (never
    /// back to `origin`, so two nodes relaying to each other do not pass a message back and
    /// forth); how many.
    fn relay_forward(&mut self, now: Instant, origin: NodeId, message: &Arc<Message>) -> usize {
        self.relay_except(now, message, Some(origin), &[])
    }

    fn relay_except(
        &mut self,
        now: Instant,
        message: &Arc<Message>,
        origin: Option<NodeId>,
        except: &[NodeId],
    ) -> usize {
        // A session that came back here is served here: its relay ends.
        let client_ids = &self.client_ids;
        self.move_window
            .relays
            .retain(|relay| relay.until > now && !client_ids.contains_key(&relay.client_id));
        let mut nodes: Vec<NodeId> = self
            .move_window
            .relays
            .iter()
            .filter(|relay| {
                relay
                    .filters
                    .iter()
                    .any(|filter| matches(filter, &message.topic))
            })
            .map(|relay| relay.node)
            .filter(|node| !except.contains(node) && Some(*node) != origin)
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        for &node in &nodes {
            self.out.stats.forwarded += 1;
            let seq =
                (message.qos != QoS::AtMostOnce).then(|| self.store_forward(node, message, &[]));
            self.out.outputs.push_back(Output::Forward {
                node,
                message: Arc::clone(message),
                groups: Vec::new(),
                seq,
            });
        }
        nodes.len()
    }

    /// Routes a forwarded message here, passes it on for moved sessions, or holds it while
    /// a claim that resumes a session is pending (see the module documentation). With
    /// `atomic`, a QoS 1/2 message that a local subscriber has no room for goes nowhere
    /// (`QuotaExceeded`), so that it can be offered again (see `peer_flow`).
    pub(crate) fn route_forward(
        &mut self,
        now: Instant,
        origin: NodeId,
        message: Arc<Message>,
        groups: Vec<Arc<str>>,
        atomic: bool,
    ) -> RouteOutcome {
        let outcome = self.route_within(
            now,
            Arc::clone(&message),
            atomic,
            RouteScope::LocalFromPeer { groups: &groups },
        );
        if outcome == RouteOutcome::QuotaExceeded {
            return outcome;
        }
        let relayed = self.relay_forward(now, origin, &message);
        if relayed == 0 && matches!(outcome, RouteOutcome::NoSubscribers) {
            self.hold_while_moving(Held { message, groups });
        }
        outcome
    }

    fn hold_while_moving(&mut self, held: Held) {
        if held.message.qos == QoS::AtMostOnce || !self.claims.values().any(|c| c.resumes_session())
        {
            return;
        }
        if self.move_window.held.len() >= MAX_HELD {
            self.out.stats.move_window_dropped += 1;
            return;
        }
        self.move_window.held.push_back(held);
    }

    /// A claim was settled: held messages are routed again (and held again if they still
    /// match nothing while other such claims are pending).
    pub(crate) fn release_held(&mut self, now: Instant) {
        let held = std::mem::take(&mut self.move_window.held);
        for Held { message, groups } in held {
            let outcome = self.route_within(
                now,
                Arc::clone(&message),
                false,
                RouteScope::LocalFromPeer { groups: &groups },
            );
            if matches!(outcome, RouteOutcome::NoSubscribers) {
                self.hold_while_moving(Held { message, groups });
            }
        }
    }
}
