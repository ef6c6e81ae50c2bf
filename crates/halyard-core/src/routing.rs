//! Routing one message to every matching session.

use std::sync::Arc;
use std::time::Instant;

use halyard_codec::{QoS, ReasonCode};

use crate::authz::Access;
use crate::broker::Broker;
use crate::message::{Message, NodeId, SessionKey};
use crate::output::Output;
use crate::peer_flow::{ForwardOffer, PeerForward};
use crate::publish::RouteOutcome;
use crate::pushback::{QueueFullPolicy, WaitingFor};
use crate::retained::is_sys_filter;
use crate::router::{FilterRef, RouteScope, RouteTarget};
use crate::session::{Delivery, Session};
use crate::stats::DropReason;

/// Which of the matching local sessions a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audience {
    /// Every session that takes messages routed at this route version (in a cluster, a
    /// session moved here takes earlier ones from its old owner, see `move_window`).
    RoutedAt(u64),
    /// This session alone.
    Session(SessionKey),
}

impl Broker {
    /// Routes one message published on this node to every matching session and node. With
    /// `atomic`, a QoS 1/2 message that some local subscriber has no room for is delivered
    /// to nobody, so the publisher can be told (0x97) and retry without creating duplicates
    /// elsewhere. While a claim that resumes a session is pending, a copy is kept for it
    /// (see `move_window`).
    pub(crate) fn route(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        atomic: bool,
    ) -> RouteOutcome {
        let routed_at = self.route_version;
        let outcome = self.route_within(
            now,
            Arc::clone(&message),
            atomic,
            RouteScope::Everywhere,
            Audience::RoutedAt(routed_at),
        );
        if outcome != RouteOutcome::QuotaExceeded {
            self.hold_while_moving(message, routed_at, None, None);
        }
        outcome
    }

    /// The route version of a cluster node: the raft index up to which the route and
    /// ownership changes were handed to this core (each entry's changes at once, then its
    /// index). Messages routed here carry it, so that a moving session gets each exactly
    /// once (see `move_window`). It never goes back.
    pub fn set_route_version(&mut self, index: u64) {
        self.route_version = self.route_version.max(index);
    }

    /// A message another node forwarded here: it goes to this node's matching sessions (and
    /// to the share groups the sender picked this node for), and never to another node
    /// (except to pass on a moved session's messages, see `move_window`). Retained state is
    /// not touched: the node that took the publish keeps it.
    ///
    /// A QoS 1/2 forward at or below the newest already stored from the sender's
    /// incarnation is a replay and is dropped (counted in `duplicate_forwards`); the newest
    /// is written with the deliveries, in the same commit. This takes the forward whatever
    /// the route version: [`Broker::offer_forward`] waits for it.
    pub fn handle_forward(&mut self, now: Instant, origin: NodeId, forward: PeerForward) {
        self.take_forward(now, origin, forward, false, false);
    }

    /// [`Broker::handle_forward`]'s work. With `atomic`, a QoS 1/2 message that a local
    /// subscriber has no room for goes nowhere and is given back (see `peer_flow`); with
    /// `in_version`, so is one routed at a route version this node has not reached.
    pub(crate) fn take_forward(
        &mut self,
        now: Instant,
        origin: NodeId,
        mut forward: PeerForward,
        atomic: bool,
        in_version: bool,
    ) -> ForwardOffer {
        if let Some((incarnation, seq)) = forward.stored_as {
            if self.outboxes.is_duplicate(origin, incarnation, seq) {
                self.out.stats.duplicate_forwards += 1;
                return ForwardOffer::Taken;
            }
        }
        if in_version && forward.for_session.is_none() && forward.routed_at > self.route_version {
            return ForwardOffer::Early(forward);
        }
        forward.message.publisher = None;
        let message = Arc::new(forward.message);
        let outcome = match forward.for_session.clone() {
            Some(client_id) => self.route_relayed(
                now,
                Arc::clone(&message),
                client_id,
                forward.exchange,
                atomic,
            ),
            None => self.route_forward(
                now,
                Arc::clone(&message),
                &forward.groups,
                forward.routed_at,
                atomic,
            ),
        };
        if outcome == RouteOutcome::QuotaExceeded {
            // Not refused: it waits, so the refusal count set by the route is taken back.
            self.out.stats.refused_quota = self.out.stats.refused_quota.saturating_sub(1);
            self.pushback.blocked_by = None;
            let message = Arc::try_unwrap(message).unwrap_or_else(|shared| (*shared).clone());
            return ForwardOffer::NoRoom(PeerForward { message, ..forward });
        }
        if let Some((incarnation, seq)) = forward.stored_as {
            self.outboxes.note_received(origin, incarnation, seq);
        }
        ForwardOffer::Taken
    }

    /// Another node has subscribers to `filter` (a share group's as `$share/{group}/...`):
    /// messages published here that match it get one copy for that node. True if new.
    pub fn add_remote_route(&mut self, node: NodeId, filter: &str) -> bool {
        self.router.add_node(node, FilterRef::parse(filter))
    }

    /// `node` has no more subscribers to `filter`; true if it had.
    pub fn remove_remote_route(&mut self, node: NodeId, filter: &str) -> bool {
        self.router.remove_node(node, FilterRef::parse(filter))
    }

    pub(crate) fn route_within(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        atomic: bool,
        scope: RouteScope<'_>,
        audience: Audience,
    ) -> RouteOutcome {
        let from_peer = matches!(scope, RouteScope::LocalFromPeer { .. });
        let mut matches = std::mem::take(&mut self.route_scratch);
        matches.clear();
        let sessions = &self.sessions;
        let limits = self.limits();
        let size = message.topic.len() + message.payload.len();
        let queued = message.qos != QoS::AtMostOnce;
        let replicated = self.replicated;
        let admits = |key: SessionKey, session: &Session| match audience {
            Audience::RoutedAt(routed_at) => !replicated || session.routes_from <= routed_at,
            Audience::Session(only) => key == only,
        };
        // A share group passes over members that are offline or, for QoS 1/2, full.
        self.router.route(
            &message.topic,
            scope,
            &|key| {
                sessions.get(&key).is_some_and(|s| {
                    admits(key, s) && s.link.is_some() && (!queued || s.has_room(limits, size))
                })
            },
            &mut matches,
        );
        let mut forwards: Vec<(NodeId, Vec<Arc<str>>)> = Vec::new();
        matches.retain(|m| match m.target {
            RouteTarget::Session(session) => {
                !(m.entry.options.no_local && message.publisher == Some(session))
                    && match audience {
                        // A single node admits everyone: no lookup per delivery.
                        Audience::RoutedAt(_) if !replicated => true,
                        _ => sessions.get(&session).is_some_and(|s| admits(session, s)),
                    }
            }
            RouteTarget::Node(node) => {
                let groups = match forwards.iter_mut().find(|(to, _)| *to == node) {
                    Some((_, groups)) => groups,
                    None => {
                        forwards.push((node, Vec::new()));
                        &mut forwards.last_mut().expect("just pushed").1
                    }
                };
                groups.extend(m.share.clone());
                false
            }
        });
        if !self.authorizer.allows_everything() {
            let before = matches.len();
            matches.retain(|m| {
                m.session()
                    .is_some_and(|key| self.authorized(key, Access::Receive, &message.topic))
            });
            self.out.stats.denied_delivery += (before - matches.len()) as u64;
        }
        // Overlapping subscriptions of one session give one copy, at the highest QoS, with
        // every subscription identifier [MQTT-3.3.4-3] .. [MQTT-3.3.4-5].
        matches.sort_by_key(|m| (m.session(), m.share.is_some()));
        let mut deliveries: Vec<(SessionKey, Delivery)> = Vec::with_capacity(matches.len());
        for m in &matches {
            let Some(key) = m.session() else { continue };
            let retain = m.entry.options.retain_as_published && message.retain;
            let qos = message.qos.min(m.entry.options.qos);
            match deliveries.last_mut() {
                Some((session, delivery)) if *session == key && m.share.is_none() => {
                    delivery.qos = delivery.qos.max(qos);
                    delivery.retain |= retain;
                    delivery.subscription_ids.extend(m.entry.identifier);
                }
                _ => deliveries.push((
                    key,
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

        let policy = self.config.queue_full_policy;
        if atomic && policy.refuses_publisher() {
            let blocked = deliveries.iter().find(|(key, delivery)| {
                delivery.qos != QoS::AtMostOnce
                    && self
                        .sessions
                        .get(key)
                        .is_some_and(|s| !s.has_room(limits, size))
            });
            let blocked = blocked.map(|&(key, _)| WaitingFor::Room(key)).or_else(|| {
                (message.qos != QoS::AtMostOnce)
                    .then(|| {
                        forwards
                            .iter()
                            .find(|(node, _)| self.congested_nodes.contains(node))
                            .map(|&(node, _)| WaitingFor::Node(node))
                    })
                    .flatten()
            });
            if let Some(blocked_by) = blocked {
                self.pushback.blocked_by = Some(blocked_by);
                if message.qos == QoS::AtMostOnce {
                    self.out.stats.dropped_qos0 += 1;
                } else {
                    self.out.stats.refused_quota += 1;
                }
                return RouteOutcome::QuotaExceeded;
            }
        }
        if message.retain && !from_peer {
            if message.payload.is_empty() {
                // [MQTT-3.3.1-10], [MQTT-3.3.1-11]
                self.remove_retained(&message.topic);
            } else {
                // [MQTT-3.3.1-5]
                self.set_retained(&message);
            }
            if self.replicated && !is_sys_filter(&message.topic) {
                self.out.outputs.push_back(Output::Retain {
                    message: Arc::clone(&message),
                });
            }
        }
        if deliveries.is_empty() && forwards.is_empty() {
            return RouteOutcome::NoSubscribers;
        }
        for (node, groups) in forwards {
            self.out.stats.forwarded += 1;
            let seq = queued.then(|| self.store_forward(node, &message, &groups, None, None));
            self.out.outputs.push_back(Output::Forward {
                node,
                message: Arc::clone(&message),
                groups,
                seq,
                routed_at: self.route_version,
                for_session: None,
                exchange: None,
            });
        }
        let mut too_slow = Vec::new();
        for (key, delivery) in deliveries {
            let Some(session) = self.sessions.get_mut(&key) else {
                continue;
            };
            let qos = delivery.qos;
            if qos == QoS::AtMostOnce {
                if session.link.as_ref().is_some_and(|link| link.congested) {
                    session.dropped += 1;
                    self.out
                        .count_drop(&session.client_id, DropReason::SlowConsumer);
                    continue;
                }
                if !session.push(delivery, now, limits, &mut self.out) {
                    self.out.stats.dropped_qos0 += 1;
                }
                continue;
            }
            if session.has_room(limits, size) {
                session.push(delivery, now, limits, &mut self.out);
                continue;
            }
            let reason = match policy {
                QueueFullPolicy::DropOldest if session.evict_oldest(&mut self.out) => {
                    session.push(delivery, now, limits, &mut self.out);
                    DropReason::Oldest
                }
                QueueFullPolicy::Disconnect if session.link.is_some() => {
                    too_slow.push(key);
                    DropReason::Disconnected
                }
                // Will and retained-on-subscribe messages, and forwards from a peer, meet
                // a full queue under the refusing policies too: there is nobody to refuse.
                // A subscriber disconnected for its full queue drops the rest while away.
                _ => DropReason::New,
            };
            session.dropped += 1;
            self.out.count_drop(&session.client_id, reason);
        }
        for key in too_slow {
            self.close_with(
                now,
                key,
                ReasonCode::QUOTA_EXCEEDED,
                "queue full (queue_full_policy = \"disconnect\")",
            );
        }
        RouteOutcome::Delivered
    }
}
