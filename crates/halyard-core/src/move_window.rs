//! Publishes caught in flight while a session moves from one node to another.
//!
//! Every message carries the route version it was routed at (`routed_at`, see
//! [`Broker::set_route_version`]): the routing node had taken in every route and ownership
//! change up to that raft index, and none after. A session that came to this node with the
//! claim at index `c` takes from routing only messages routed at `c` or later
//! (`Session::routes_from`). Every earlier one was routed to the node that held the session
//! then, and reaches the session from there exactly once:
//! - that node queued it before it handed the session over, and the queue came along; or
//! - it took the message after the hand-over: it passes it on to the new owner, addressed
//!   to the session alone, for [`RELAY_WINDOW`] (the relay `fence` starts), or delivers it
//!   to the session itself if the session has come back meanwhile.
//!
//! A node takes a forward only once its own route version has reached the forward's
//! (`take_forward` answers [`ForwardOffer::Early`](crate::ForwardOffer::Early)), so a node
//! that held the session knows whether the message was routed to it for the session.
//!
//! While a claim that resumes a session is pending here (the session may be on its way
//! from another node), a copy of every QoS 1/2 message routed here, and of every message
//! addressed to the client id, is held. Once the claim is settled, the session gets the copies addressed to
//! it and those routed at or after its claim that match its subscriptions; the rest are
//! let go (at most [`MAX_HELD`] are held; beyond that they are dropped, counted in
//! `move_window_dropped`). A claim overtaken by a newer one before its session came was
//! still the owner for what was routed between the two: those copies follow the session,
//! addressed to it, to the newer claim's node, or stay held for the newer claim here
//! (`hand_held_on`).
//!
//! Held copies and relays are in memory only: a crash of either node inside the window can
//! lose what it held, although the sender's outbox has let it go.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_codec::topic::{matches, parse_shared_subscription};
use halyard_codec::QoS;

use crate::broker::Broker;
use crate::message::{Message, NodeId, OpenExchange, SessionKey};
use crate::output::Output;
use crate::publish::RouteOutcome;
use crate::router::RouteScope;
use crate::routing::Audience;
use crate::session::Delivery;
use crate::stats::DropReason;
use crate::store::{DeliveryState, StoredRelay};
use crate::time::ClockAnchor;
use crate::transfer::SessionState;

/// How long an old owner passes a moved session's messages on: far longer than nodes take
/// to apply the claim and deliver what they routed before it.
pub const RELAY_WINDOW: Duration = Duration::from_secs(30);

/// Most messages a new owner holds while claims are pending.
pub const MAX_HELD: usize = 10_000;

/// Relays of moved sessions and copies held for pending claims.
#[derive(Debug, Default)]
pub(crate) struct MoveWindow {
    /// In the order of their `to` (claims are applied in index order).
    relays: VecDeque<Relay>,
    held: VecDeque<Held>,
    /// Client ids whose claim here was pending while another node's claim (its index here)
    /// was applied: if that claim is the newer, messages routed from its index on are its
    /// node's.
    overtaken: Vec<(Arc<str>, u64)>,
    /// (client id, newer, older): a claim here overtaken by a newer claim here before the
    /// session came; the session the newer claim brings takes what is routed from the
    /// older on (see `join_overtaken_claim`).
    joined: Vec<(Arc<str>, u64, u64)>,
}

/// Most entries of [`MoveWindow::joined`]; the oldest go first.
const MAX_JOINED: usize = 1_024;

#[derive(Debug)]
struct Relay {
    /// The moved session's client id: no relay once it is back on this node.
    client_id: Arc<str>,
    node: NodeId,
    /// The moved session's filters (shared ones as their inner filter).
    filters: Vec<String>,
    /// Messages routed at versions `from..to` were this node's to deliver to the session.
    from: u64,
    to: u64,
    until: Instant,
}

#[derive(Debug)]
struct Held {
    message: Arc<Message>,
    routed_at: u64,
    /// A message addressed to this client id's session.
    for_session: Option<Arc<str>>,
    /// With `for_session`, the QoS 2 exchange of it its old owner had open with the client.
    exchange: Option<OpenExchange>,
    /// Client ids whose overtaken claim handed this copy on (see `hand_held_on`): their
    /// sessions have it, or it is on its way to them.
    handed_for: Vec<Arc<str>>,
}

impl Broker {
    /// The session `state`, which took messages routed at versions `from` up to the claim
    /// `to` that moved it to `node`, was handed over: for [`RELAY_WINDOW`], such messages
    /// that reach this node afterwards are passed on to `node`.
    pub(crate) fn start_relay(
        &mut self,
        now: Instant,
        node: NodeId,
        state: &SessionState,
        from: u64,
        to: u64,
    ) {
        let filters: Vec<String> = state
            .subscriptions
            .iter()
            .map(|(filter, _)| {
                parse_shared_subscription(filter)
                    .map_or(filter.as_str(), |(_, inner)| inner)
                    .to_owned()
            })
            .collect();
        if filters.is_empty() || from >= to {
            return;
        }
        self.drop_ended_relays(now);
        let relay = Relay {
            client_id: Arc::from(state.client_id.as_str()),
            node,
            filters,
            from,
            to,
            until: now + RELAY_WINDOW,
        };
        // In the commit that hands the session over: a restart within the window still
        // passes on what the peers' outboxes replay here (halyard-sim seeds 40, 165, 192
        // --no-partitions lost such messages with the relay).
        if let Some(journal) = self.out.journal.as_mut() {
            journal.store.put_relay(&StoredRelay {
                client_id: state.client_id.clone(),
                node,
                filters: relay.filters.clone(),
                from,
                to,
                until: journal.clock.to_wall(relay.until),
            });
        }
        self.insert_relay(relay);
    }

    fn insert_relay(&mut self, relay: Relay) {
        let relays = &mut self.move_window.relays;
        let at = relays.partition_point(|held| held.to <= relay.to);
        relays.insert(at, relay);
    }

    /// Drops the relays whose window has passed, here and in the store.
    fn drop_ended_relays(&mut self, now: Instant) {
        let relays = &mut self.move_window.relays;
        if relays.iter().all(|relay| relay.until > now) {
            return;
        }
        let mut ended = Vec::new();
        relays.retain(|relay| {
            let live = relay.until > now;
            if !live {
                ended.push((Arc::clone(&relay.client_id), relay.to));
            }
            live
        });
        if let Some(journal) = self.out.journal.as_mut() {
            for (client_id, to) in ended {
                journal.store.delete_relay(&client_id, to);
            }
        }
    }

    /// The relays loaded at start-up: those still in their window are followed again, the
    /// others are removed from the store.
    pub(crate) fn restore_relays(&mut self, clock: ClockAnchor, relays: Vec<StoredRelay>) {
        for stored in relays {
            let until = clock.to_instant(stored.until);
            if until <= clock.instant {
                if let Some(journal) = self.out.journal.as_mut() {
                    journal.store.delete_relay(&stored.client_id, stored.to);
                }
                continue;
            }
            self.insert_relay(Relay {
                client_id: Arc::from(stored.client_id),
                node: stored.node,
                filters: stored.filters,
                from: stored.from,
                to: stored.to,
                until,
            });
        }
    }

    /// Passes a message routed here at `routed_at` on to the new owners of sessions it was
    /// routed here for, addressed to each session; how many. A session that has come back
    /// here since gets it here, unless routing here gave it to it already.
    pub(crate) fn relay_stale(
        &mut self,
        now: Instant,
        message: &Arc<Message>,
        routed_at: u64,
    ) -> usize {
        if self.move_window.relays.is_empty() {
            return 0;
        }
        self.drop_ended_relays(now);
        let relays = &self.move_window.relays;
        let first = relays.partition_point(|relay| relay.to <= routed_at);
        let mut matching: Vec<(NodeId, Arc<str>)> = relays
            .range(first..)
            .filter(|relay| {
                relay.from <= routed_at
                    && relay
                        .filters
                        .iter()
                        .any(|filter| matches(filter, &message.topic))
            })
            .map(|relay| (relay.node, Arc::clone(&relay.client_id)))
            .collect();
        // Two windows of one client may overlap (a claim here overtaken while a session it
        // had resumed moved on): the session gets the message once, at its newest node.
        let mut targets: Vec<(NodeId, Arc<str>)> = Vec::with_capacity(matching.len());
        while let Some((node, client_id)) = matching.pop() {
            if !targets.iter().any(|(_, id)| *id == client_id) {
                targets.push((node, client_id));
            }
        }
        let relayed = targets.len();
        for (node, client_id) in targets {
            match self.client_ids.get(&*client_id).copied() {
                Some(key) => {
                    let routed_past = self
                        .sessions
                        .get(&key)
                        .is_some_and(|session| session.routes_from > routed_at);
                    if routed_past {
                        self.deliver_to_session(now, Arc::clone(message), false, key);
                    }
                }
                None => self.pass_on(node, message, client_id, None),
            }
        }
        relayed
    }

    /// A session handed over late, after it had moved on from here: its messages not yet
    /// completed follow it to the node it went to, addressed to it, each QoS 2 exchange the
    /// old owner had open under its packet id; how many. With no relay to follow (its window
    /// is over), they go to `owner` if there is one, else they are dropped, counted under
    /// `late_hand_over`.
    pub(crate) fn pass_late_session_on(
        &mut self,
        clock: ClockAnchor,
        state: SessionState,
        owner: Option<NodeId>,
    ) -> usize {
        let unsent = state
            .inflight
            .into_iter()
            .map(|(stored, at)| {
                let exchange = match at {
                    DeliveryState::AwaitingReceipt(id) if stored.qos == QoS::ExactlyOnce => {
                        Some(OpenExchange::Unreceived(id))
                    }
                    DeliveryState::AwaitingCompletion(id) => Some(OpenExchange::Received(id)),
                    _ => None,
                };
                (stored, exchange)
            })
            .chain(state.pending.into_iter().map(|stored| (stored, None)));
        let next = self
            .moved_on_to(clock.instant, &state.client_id)
            .or_else(|| owner.map(|node| (node, Arc::from(state.client_id.as_str()))));
        let Some((node, client_id)) = next else {
            for _ in unsent {
                self.out
                    .count_drop(&state.client_id, DropReason::LateHandOver);
            }
            return 0;
        };
        let mut passed = 0;
        for (stored, exchange) in unsent {
            let delivery = clock.delivery(0, stored);
            self.pass_on(node, &delivery.message, Arc::clone(&client_id), exchange);
            passed += 1;
        }
        passed
    }

    /// The node `client_id`'s session went to from here, by its newest relay still in its
    /// window.
    fn moved_on_to(&self, now: Instant, client_id: &str) -> Option<(NodeId, Arc<str>)> {
        self.move_window
            .relays
            .iter()
            .rev()
            .find(|relay| &*relay.client_id == client_id && relay.until > now)
            .map(|relay| (relay.node, Arc::clone(&relay.client_id)))
    }

    /// Sends `message` to `node`, addressed to `client_id`'s session, with the QoS 2
    /// exchange of it an old owner had open.
    fn pass_on(
        &mut self,
        node: NodeId,
        message: &Arc<Message>,
        client_id: Arc<str>,
        exchange: Option<OpenExchange>,
    ) {
        self.out.stats.forwarded += 1;
        let seq = (message.qos != QoS::AtMostOnce)
            .then(|| self.store_forward(node, message, &[], Some(&client_id), exchange));
        self.out.outputs.push_back(Output::Forward {
            node,
            message: Arc::clone(message),
            groups: Vec::new(),
            seq,
            routed_at: self.route_version,
            for_session: Some(client_id),
            exchange,
        });
    }

    /// Routes a forwarded message here, passes it on for moved sessions, and keeps a copy
    /// while a claim that resumes a session is pending (see the module documentation).
    /// With `atomic`, a QoS 1/2 message that a local subscriber has no room for goes
    /// nowhere (`QuotaExceeded`), so that it can be offered again (see `peer_flow`).
    pub(crate) fn route_forward(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        groups: &[Arc<str>],
        routed_at: u64,
        atomic: bool,
    ) -> RouteOutcome {
        let outcome = self.route_within(
            now,
            Arc::clone(&message),
            atomic,
            RouteScope::LocalFromPeer { groups },
            Audience::RoutedAt(routed_at),
        );
        if outcome == RouteOutcome::QuotaExceeded {
            return outcome;
        }
        let relayed = self.relay_stale(now, &message, routed_at);
        self.hold_while_moving(message, routed_at, None, None);
        match outcome {
            RouteOutcome::NoSubscribers if relayed > 0 => RouteOutcome::Delivered,
            other => other,
        }
    }

    /// A message a moved session's old owner passed on for `client_id` (with the QoS 2
    /// `exchange` of it that owner had open): to that session if it is here, on to its next
    /// node if it moved on, held if its claim is pending here.
    pub(crate) fn route_relayed(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        client_id: Arc<str>,
        exchange: Option<OpenExchange>,
        atomic: bool,
    ) -> RouteOutcome {
        if let Some(&key) = self.client_ids.get(&*client_id) {
            return match exchange {
                Some(exchange) => self.take_exchange_over(now, message, exchange, key),
                None => self.deliver_to_session(now, message, atomic, key),
            };
        }
        if let Some((node, client_id)) = self.moved_on_to(now, &client_id) {
            self.pass_on(node, &message, client_id, exchange);
            return RouteOutcome::Delivered;
        }
        if self.claim_pending_for(&client_id) {
            self.hold_while_moving(message, 0, Some(client_id), exchange);
            return RouteOutcome::Delivered;
        }
        self.out.count_drop(&client_id, DropReason::MoveWindow);
        RouteOutcome::NoSubscribers
    }

    /// Keeps a copy of a QoS 1/2 message routed here at `routed_at` (or addressed to
    /// `for_session`) while a claim that resumes a session is pending.
    pub(crate) fn hold_while_moving(
        &mut self,
        message: Arc<Message>,
        routed_at: u64,
        for_session: Option<Arc<str>>,
        exchange: Option<OpenExchange>,
    ) {
        if message.qos == QoS::AtMostOnce || !self.claims_pending() {
            return;
        }
        if self.move_window.held.len() >= MAX_HELD {
            self.out.stats.move_window_dropped += 1;
            return;
        }
        self.move_window.held.push_back(Held {
            message,
            routed_at,
            for_session,
            exchange,
            handed_for: Vec::new(),
        });
    }

    /// A claim of `client_id` under `epoch` by another node was applied while this node
    /// holds no session for it: if a claim here is pending and turns out older, the session
    /// it brings takes no held copy routed from `epoch` on (those went to the newer owner).
    pub(crate) fn note_overtaken(&mut self, client_id: &str, epoch: u64) {
        if !self.claim_pending_for(client_id) {
            return;
        }
        self.move_window
            .overtaken
            .push((Arc::from(client_id), epoch));
    }

    /// The claim of `client_id` was settled (granted under `epoch`, or refused): its
    /// session gets the copies held for it; copies no pending claim can want are let go.
    pub(crate) fn release_held(&mut self, now: Instant, client_id: &str, epoch: Option<u64>) {
        // Claims applied while this one was pending may be older than it, too.
        let until = epoch.map_or(u64::MAX, |epoch| self.window_end(client_id, epoch));
        // An older claim of this client still pending here has its window end at the
        // claims after it, this one included.
        let others_pending = self.claim_pending_for(client_id);
        let overtaken = &mut self.move_window.overtaken;
        if !others_pending {
            overtaken.retain(|(id, _)| &**id != client_id);
        } else if let Some(epoch) = epoch {
            overtaken.push((Arc::from(client_id), epoch));
        }
        // Only a session this claim brought here: one held here before got the copies
        // through routing already.
        let key = epoch.and_then(|epoch| {
            self.client_ids.get(client_id).copied().filter(|key| {
                self.sessions
                    .get(key)
                    .is_some_and(|s| s.epoch == epoch && s.routes_from == epoch)
            })
        });
        let held = std::mem::take(&mut self.move_window.held);
        let mut kept = VecDeque::new();
        // Any claim still pending may want them: one resuming a session from elsewhere, or
        // an older claim of a session that has come here since, which was the owner for
        // some of them and gives them to the session once overtaken (`hand_held_on`).
        let still_pending = self.claims_pending();
        for mut item in held {
            let for_this = match item.for_session.as_deref() {
                Some(addressed) => addressed == client_id,
                None => {
                    epoch.is_some_and(|epoch| (epoch..until).contains(&item.routed_at))
                        && !item.handed_for.iter().any(|id| &**id == client_id)
                }
            };
            let deliver_to = key.filter(|_| for_this);
            if let Some(key) = deliver_to {
                if item.for_session.is_none() {
                    item.handed_for.push(Arc::from(client_id));
                }
                let message = Arc::clone(&item.message);
                match item.exchange {
                    Some(exchange) => self.take_exchange_over(now, message, exchange, key),
                    None => self.deliver_to_session(now, message, false, key),
                };
            }
            let wanted = match item.for_session.as_deref() {
                Some(addressed) => deliver_to.is_none() && self.claim_pending_for(addressed),
                None => still_pending,
            };
            if wanted {
                kept.push_back(item);
            }
        }
        self.move_window.held = kept;
    }

    /// The claim of `client_id` under `epoch` was overtaken by the claim `newer` before the
    /// session reached it (see [`Broker::handle_superseded_claim`]): the copies routed here
    /// between the two go, addressed to the session, to `owner`'s node, or stay held for
    /// the claim pending here (`None`), or go to the session if it is here already. Each
    /// copy is handed on once per client id.
    pub(crate) fn hand_held_on(
        &mut self,
        now: Instant,
        client_id: &str,
        epoch: u64,
        newer: u64,
        owner: Option<NodeId>,
    ) {
        let until = self.window_end(client_id, epoch).min(newer);
        let client_id: Arc<str> = Arc::from(client_id);
        let mut ours = Vec::new();
        for item in &mut self.move_window.held {
            if item.for_session.is_none()
                && (epoch..until).contains(&item.routed_at)
                && !item.handed_for.contains(&client_id)
            {
                item.handed_for.push(Arc::clone(&client_id));
                ours.push((Arc::clone(&item.message), item.routed_at));
            }
        }
        if ours.is_empty() {
            return;
        }
        match owner {
            Some(node) => {
                for (message, _) in ours {
                    self.pass_on(node, &message, Arc::clone(&client_id), None);
                }
            }
            None => match self.client_ids.get(&*client_id).copied() {
                Some(key) => {
                    // Routing gave the session those routed from its own claim on.
                    let routes_from = self.sessions.get(&key).map_or(0, |s| s.routes_from);
                    let ours = ours.into_iter().filter(|(_, at)| *at < routes_from);
                    for (message, _) in ours {
                        self.deliver_to_session(now, message, false, key);
                    }
                }
                None => {
                    for (message, _) in ours {
                        self.move_window.held.push_back(Held {
                            message,
                            routed_at: epoch,
                            for_session: Some(Arc::clone(&client_id)),
                            exchange: None,
                            handed_for: Vec::new(),
                        });
                    }
                }
            },
        }
    }

    /// The claim of `client_id` under `epoch` was overtaken by this node's own claim
    /// `newer` before its session came: the copies held for it go to the session (see
    /// `hand_held_on`). With no other node's claim between the two, this node was the owner
    /// from `epoch` on, so the session also takes, through routing, what reaches it later
    /// routed from `epoch` on, and a later relay of it starts there (halyard-sim seeds 75,
    /// 143 --no-kills: such late forwards were dropped).
    pub(crate) fn join_overtaken_claim(
        &mut self,
        now: Instant,
        client_id: &str,
        epoch: u64,
        newer: u64,
    ) {
        self.hand_held_on(now, client_id, epoch, newer, None);
        if self.window_end(client_id, epoch) < newer {
            return;
        }
        let here = self.client_ids.get(client_id).copied();
        match here.and_then(|key| Some((key, self.sessions.get_mut(&key)?))) {
            Some((key, session)) if session.routes_from <= newer => {
                session.routes_from = session.routes_from.min(epoch);
                self.save_session_record(key);
            }
            Some(_) => {}
            None => {
                let joined = &mut self.move_window.joined;
                if joined.len() >= MAX_JOINED {
                    joined.remove(0);
                }
                joined.push((Arc::from(client_id), newer, epoch));
            }
        }
    }

    /// The claim of `client_id` under `epoch` was settled, after the copies held for it
    /// went to its session: a session it brought here takes, through routing, what is
    /// routed from the oldest claim it took over here on (see `join_overtaken_claim`).
    pub(crate) fn extend_to_joined_claims(&mut self, client_id: &str, epoch: u64) {
        let mut from = epoch;
        self.move_window.joined.retain(|(id, newer, older)| {
            let ours = &**id == client_id && *newer == epoch;
            if ours {
                from = from.min(*older);
            }
            !ours
        });
        let Some(&key) = self.client_ids.get(client_id) else {
            return;
        };
        if let Some(session) = self.sessions.get_mut(&key) {
            if session.routes_from == epoch {
                session.routes_from = from;
                self.save_session_record(key);
            }
        }
    }

    /// Where the window of `client_id`'s claim under `epoch` ends: at the first newer claim
    /// of it applied while it was pending (another node's, or one settled here), if any.
    pub(crate) fn window_end(&self, client_id: &str, epoch: u64) -> u64 {
        self.move_window
            .overtaken
            .iter()
            .filter(|(id, at)| &**id == client_id && *at > epoch)
            .map(|(_, at)| *at)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Routes `message` to the session at `key` alone (a relayed, held or addressed copy).
    fn deliver_to_session(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        atomic: bool,
        key: SessionKey,
    ) -> RouteOutcome {
        self.route_within(
            now,
            message,
            atomic,
            RouteScope::LocalFromPeer { groups: &[] },
            Audience::Session(key),
        )
    }

    /// Carries on, for the session at `key`, the QoS 2 `exchange` of `message` that the
    /// session's old owner had open with the client (see `Session::adopt_exchange`). If the
    /// packet id is taken here, an unreceived message is queued as a new one, and a
    /// received one needs nothing more.
    fn take_exchange_over(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        exchange: OpenExchange,
        key: SessionKey,
    ) -> RouteOutcome {
        let Some(session) = self.sessions.get_mut(&key) else {
            return RouteOutcome::NoSubscribers;
        };
        let subscription_ids = session
            .subscriptions
            .iter()
            .filter(|(filter, _)| {
                let filter = parse_shared_subscription(filter).map_or(filter.as_str(), |(_, f)| f);
                matches(filter, &message.topic)
            })
            .filter_map(|(_, entry)| entry.identifier)
            .collect();
        let delivery = Delivery {
            seq: 0,
            message: Arc::clone(&message),
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids,
        };
        if session.adopt_exchange(exchange, delivery, now, &mut self.out) {
            self.update_persistence(key);
            return RouteOutcome::Delivered;
        }
        match exchange {
            OpenExchange::Unreceived(_) => self.deliver_to_session(now, message, false, key),
            OpenExchange::Received(_) => RouteOutcome::Delivered,
        }
    }

    /// Whether a claim that resumes a session is pending here. Copies are held while one
    /// is: a claim that finds its session here (a reconnect) wants none of them, but may be
    /// the older of two claims of a session that arrives meanwhile.
    fn claims_pending(&self) -> bool {
        self.claims.values().any(|c| c.resumes_session())
    }

    fn claim_pending_for(&self, client_id: &str) -> bool {
        self.claims
            .values()
            .any(|c| c.resumes_session() && c.client_id() == client_id)
    }
}
