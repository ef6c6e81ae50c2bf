//! The broker task's end of the cluster: it carries the core's cluster outputs (claims,
//! releases, subscription changes, retained messages, forwards) to the coordinator and the
//! peer link, and brings back what they decide as [`ClusterEvent`]s, which the broker task
//! hands to the core between packets, like any other event.
//!
//! Raft calls run in tasks of their own, so the broker task never waits on the network.
//! The driver is generic over the event type it sends (the server's broker-task event, or a
//! simulation's) and reads time through a [`DriverClock`], so that the deterministic
//! simulation (`halyard-sim`) runs this same glue.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use halyard_cluster::{
    Change, ClaimOutcome as RaftClaim, Coordinator, FiredWill, RouteKey, MAX_REPLICATED_WILL_BYTES,
};
use halyard_codec::{ReasonCode, Will};
use halyard_core::{
    Broker, ClaimOutcome, ClaimRequest, ConnectionId, Message, NodeId, Output, PacketIds,
    PeerForward, SessionState, SubscriptionUpdate,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::clock::DriverClock;
use crate::cluster::event::{ClusterEvent, OwnClaim};
use crate::cluster::held_forwards::{HeldForwards, PeerFrame};
use crate::cluster::own_claims::OwnClaims;
use crate::cluster::transfers::{lock, Arrival, SharedTransfers};
use crate::cluster::wire::{self, Clocks, ForwardTags, Received};

/// How long a node that won a claim waits for the previous owner to hand the session over
/// before it resumes with what raft holds (the subscriptions of a persistent session). The
/// cluster lease must be shorter, with a margin (see `halyard_cluster`'s lease module).
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the lease is checked: the lease plus this bounds how long a node cut off from
/// the quorum keeps its clients.
const LEASE_POLL: Duration = Duration::from_millis(50);

/// Why a fenced node drops its clients. 0x9C (Use another server) says that this node
/// cannot serve now but the cluster can; without a Server Reference the client picks
/// another address from its own list.
const FENCED_REASON: ReasonCode = ReasonCode::USE_ANOTHER_SERVER;

/// The Reason String sent with [`FENCED_REASON`].
const FENCED_WHY: &str = "this cluster node lost contact with the quorum";

/// Stored forwards read from the store at a time when a destination's lane catches up.
const REFILL_BATCH: usize = 256;

/// How long a SUBACK waits for its routes to be applied by every reachable node once
/// committed, so that a publish made after it on any node reaches the subscriber.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a will is offered to raft before it is given up (a node without a quorum
/// cannot settle it; if it stays cut off, the survivors publish it instead).
const WILL_SETTLE_ATTEMPTS: u32 = 10;

/// The pause between two attempts to settle a will.
const WILL_SETTLE_RETRY: Duration = Duration::from_millis(500);

/// One destination's stored forwards on their way through the peer link.
#[derive(Debug, Default)]
struct Lane {
    /// (link sequence number, outbox sequence number) of the stored forwards in the link's
    /// queue, oldest first: an ack of the first number acknowledges the second.
    in_link: VecDeque<(u64, u64)>,
    /// The highest outbox sequence number handed to the link (or acknowledged).
    sent_through: u64,
    /// Stored forwards above `sent_through` wait in the store, because the link's queue was
    /// full or the node has just started; they are read back in order as room returns, and
    /// newer ones are not sent ahead of them.
    behind: bool,
}

/// The cluster as the broker task uses it; `E` is the broker task's event type.
pub struct ClusterDriver<E> {
    coordinator: Arc<Coordinator>,
    events: mpsc::Sender<E>,
    clock: Arc<dyn DriverClock>,
    /// Ends every task the driver spawned when it stops or is dropped, so that they let go
    /// of the coordinator (a simulated node that is killed shuts its coordinator down).
    stop: CancellationToken,
    node: NodeId,
    /// Next peer-link sequence number per destination. Seeded from the (driver's) wall clock in
    /// microseconds, so that a restarted node (same incarnation) continues above what its
    /// previous run sent and receivers do not take its frames for duplicates.
    next_seq: HashMap<NodeId, u64>,
    seq_base: u64,
    transfers: SharedTransfers,
    /// Forwards handed to the core since the last commit: acknowledged to their senders
    /// once it is durable.
    to_ack: Vec<(NodeId, u64)>,
    /// Per destination, the stored forwards in flight (see [`Lane`]).
    lanes: BTreeMap<NodeId, Lane>,
    /// Forwards from peers that waited for room here (see `held_forwards`).
    held: HeldForwards,
    /// Destinations the broker was told are congested (their lanes behind).
    told_congested: BTreeSet<NodeId>,
    /// Set when held forwards may have room or a lane changed; cleared by [`ClusterEvent::Wake`].
    wake_due: bool,
    /// A [`ClusterEvent::Wake`] is on its way.
    wake_queued: bool,
    /// This node's claims, to find one that committed after it was refused here.
    own_claims: OwnClaims,
    /// When this node's incarnation began (see `Coordinator::incarnation_since_ms`).
    incarnation_since_ms: u64,
}

impl<E> std::fmt::Debug for ClusterDriver<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterDriver")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn wall_ms(wall: SystemTime) -> u64 {
    wall.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

/// Runs `task` until it ends or `stop` is cancelled.
fn spawn_until(stop: &CancellationToken, task: impl Future<Output = ()> + Send + 'static) {
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            biased;
            () = stop.cancelled() => {}
            () = task => {}
        }
    });
}

fn raw_filter(key: &RouteKey) -> String {
    match &key.group {
        Some(group) => format!("$share/{group}/{}", key.filter),
        None => key.filter.clone(),
    }
}

impl<E: From<ClusterEvent> + Send + 'static> ClusterDriver<E> {
    /// Starts following the coordinator's change feed and peer link, feeding `events`, and
    /// resumes sending what `broker`'s outboxes hold.
    pub fn start(
        coordinator: Arc<Coordinator>,
        events: mpsc::Sender<E>,
        clock: Arc<dyn DriverClock>,
        broker: &mut Broker,
    ) -> Self {
        let node = coordinator.node_id();
        let transfers = SharedTransfers::default();
        let stop = CancellationToken::new();
        spawn_until(
            &stop,
            follow_changes(Arc::clone(&coordinator), events.clone(), clock.clone()),
        );
        if let Some(receivers) = coordinator.take_link_receivers() {
            spawn_until(
                &stop,
                follow_link(
                    receivers.deliveries,
                    events.clone(),
                    Arc::clone(&transfers),
                    clock.clone(),
                    stop.clone(),
                ),
            );
            spawn_until(&stop, follow_acks(receivers.acked, events.clone()));
        }
        spawn_until(&stop, watch_lease(Arc::clone(&coordinator), events.clone()));
        if let Some(fired) = coordinator.take_fired_wills() {
            spawn_until(&stop, follow_fired_wills(fired, events.clone()));
        }
        let seq_base = clock
            .clocks()
            .wall
            .duration_since(UNIX_EPOCH)
            .map_or(1, |since| u64::try_from(since.as_micros()).unwrap_or(1));
        broker.set_forward_seq_floor(seq_base);
        let incarnation_since_ms = coordinator
            .incarnation_since_ms(wall_ms(clock.clocks().wall))
            .unwrap_or_else(|error| {
                // Unknown: no claim of this node found without a session is taken up.
                warn!(%error, "cannot read when this node's incarnation began");
                u64::MAX
            });
        let lanes = broker
            .outbox_backlogs()
            .into_iter()
            .map(|(dest, acked)| {
                let lane = Lane {
                    in_link: VecDeque::new(),
                    sent_through: acked,
                    behind: true,
                };
                (dest, lane)
            })
            .collect();
        let mut driver = ClusterDriver {
            coordinator,
            events,
            clock,
            stop,
            node,
            next_seq: HashMap::new(),
            seq_base,
            transfers,
            to_ack: Vec::new(),
            lanes,
            held: HeldForwards::default(),
            told_congested: BTreeSet::new(),
            wake_due: false,
            wake_queued: false,
            own_claims: OwnClaims::default(),
            incarnation_since_ms,
        };
        driver.refill(broker);
        driver
    }

    /// Sends stored forwards of the destinations that are behind, in order, while their
    /// link queues have room.
    fn refill(&mut self, broker: &mut Broker) {
        let behind: Vec<NodeId> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.behind)
            .map(|(dest, _)| *dest)
            .collect();
        for dest in behind {
            while self.coordinator.link().has_room(dest) {
                let after = self.lanes.get(&dest).map_or(0, |lane| lane.sent_through);
                // A failed read is counted by the core; the lane stays behind and tries again.
                let Some(batch) = broker.read_forwards(dest, after, REFILL_BATCH) else {
                    break;
                };
                let exhausted = batch.len() < REFILL_BATCH;
                let mut all_sent = true;
                for forward in batch {
                    let tags = ForwardTags {
                        groups: &forward.groups,
                        stored_as: Some(forward.seq),
                        routed_at: forward.routed_at,
                        for_session: forward.for_session.as_deref(),
                        exchange: forward.exchange,
                    };
                    if !self.send_stored(dest, &forward.message, tags) {
                        all_sent = false;
                        break;
                    }
                }
                if !all_sent {
                    break;
                }
                if exhausted {
                    if let Some(lane) = self.lanes.get_mut(&dest) {
                        lane.behind = false;
                    }
                    break;
                }
            }
        }
    }

    /// Hands a stored forward to the link if its queue has room; otherwise the lane falls
    /// behind and the forward waits in the store. True if sent.
    fn send_stored(&mut self, dest: NodeId, message: &Message, tags: ForwardTags<'_>) -> bool {
        let stored_seq = tags.stored_as.unwrap_or_default();
        if !self.coordinator.link().has_room(dest) {
            self.lanes.entry(dest).or_default().behind = true;
            return false;
        }
        let payload = match wire::encode_forward(message, tags, self.clock.clocks()) {
            Ok(payload) => payload,
            Err(error) => {
                // Not encodable now is not encodable later: skip it, loudly.
                warn!(dest, %error, topic = %message.topic, "stored forward not encodable; skipped");
                self.lanes.entry(dest).or_default().sent_through = stored_seq;
                return true;
            }
        };
        let link_seq = self.seq_for(dest);
        let lane = self.lanes.entry(dest).or_default();
        match self.coordinator.link().send(dest, link_seq, payload) {
            Ok(()) => {
                lane.in_link.push_back((link_seq, stored_seq));
                lane.sent_through = stored_seq;
                true
            }
            Err(error) => {
                debug!(dest, %error, "stored forward waits in the outbox");
                lane.behind = true;
                false
            }
        }
    }

    fn seq_for(&mut self, dest: NodeId) -> u64 {
        let next = self.next_seq.entry(dest).or_insert(self.seq_base);
        *next += 1;
        *next
    }

    /// Ends the tasks the driver spawned (also done when it is dropped).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Takes one of the core's cluster outputs.
    pub fn handle_output(&mut self, output: &Output) {
        match output {
            Output::Claim(request) => {
                self.own_claims.started(&request.client_id);
                self.claim(request.clone())
            }
            Output::Release { client_id, epoch } => {
                let coordinator = Arc::clone(&self.coordinator);
                let (client_id, epoch) = (client_id.clone(), *epoch);
                spawn_until(&self.stop, async move {
                    if let Err(error) = coordinator.release(&client_id, epoch).await {
                        warn!(%client_id, %error, "cannot release the session's claim");
                    }
                });
            }
            Output::Subscriptions {
                ticket,
                client_id,
                epoch,
                changes,
            } => self.replicate_subscriptions(*ticket, client_id.clone(), *epoch, changes),
            Output::Retain { message } => self.replicate_retained(message),
            Output::SettleWill {
                client_id,
                epoch,
                publisher,
                will,
            } => self.settle_will(client_id.clone(), *epoch, *publisher, will.clone()),
            Output::Forward {
                node,
                message,
                groups,
                seq: Some(stored_seq),
                routed_at,
                for_session,
                exchange,
            } => {
                let lane = self.lanes.entry(*node).or_default();
                // Behind, it is read back from the store in its turn; at or below
                // `sent_through`, a refill already sent it.
                if !lane.behind && *stored_seq > lane.sent_through {
                    let tags = ForwardTags {
                        groups,
                        stored_as: Some(*stored_seq),
                        routed_at: *routed_at,
                        for_session: for_session.as_deref(),
                        exchange: *exchange,
                    };
                    self.send_stored(*node, message, tags);
                }
            }
            Output::Forward {
                node,
                message,
                groups,
                seq: None,
                routed_at,
                for_session,
                exchange,
            } => {
                let tags = ForwardTags {
                    groups,
                    stored_as: None,
                    routed_at: *routed_at,
                    for_session: for_session.as_deref(),
                    exchange: *exchange,
                };
                match wire::encode_forward(message, tags, self.clock.clocks()) {
                    Ok(payload) => {
                        let seq = self.seq_for(*node);
                        if let Err(error) = self.coordinator.link().send(*node, seq, payload) {
                            debug!(node, %error, topic = %message.topic, "QoS 0 forward dropped");
                        }
                    }
                    Err(error) => warn!(%error, topic = %message.topic, "forward not encoded"),
                }
            }
            _ => {}
        }
    }

    /// Hands a cluster event to the core.
    pub fn handle_event(&mut self, broker: &mut Broker, event: ClusterEvent) {
        let clocks = self.clock.clocks();
        match event {
            ClusterEvent::ClaimSettled {
                conn,
                client_id,
                outcome,
            } => {
                let granted = match &outcome {
                    ClaimOutcome::Granted { epoch, .. } => Some(*epoch),
                    ClaimOutcome::Refused => None,
                };
                let orphaned = self.own_claims.settled(&client_id, granted);
                self.claim_settled(broker, clocks, conn, client_id.clone(), outcome);
                if let Some(claim) = orphaned {
                    self.adopt_orphaned_claim(broker, clocks, &client_id, claim);
                }
            }
            ClusterEvent::ClaimedHere { client_id, claim } => {
                if self.own_claims.applied(&client_id, claim) {
                    self.adopt_orphaned_claim(broker, clocks, &client_id, claim);
                }
            }
            ClusterEvent::RoutesCommitted { ticket, committed } => {
                broker.handle_routes_committed(clocks.now, ticket, committed)
            }
            ClusterEvent::Route {
                node,
                filter,
                added,
            } => {
                if added {
                    broker.add_remote_route(node, &filter);
                } else {
                    broker.remove_remote_route(node, &filter);
                }
            }
            ClusterEvent::Claimed {
                client_id,
                epoch,
                new_owner,
            } => self.hand_over(broker, clocks, &client_id, epoch, new_owner),
            ClusterEvent::Forwarded {
                origin,
                seq,
                forward,
            } => {
                let frame = PeerFrame::Forward { seq, forward };
                self.held
                    .take(broker, clocks.now, origin, frame, &mut self.to_ack);
            }
            ClusterEvent::FrameTaken { origin, seq } => {
                let frame = PeerFrame::Ack(seq);
                self.held
                    .take(broker, clocks.now, origin, frame, &mut self.to_ack);
            }
            ClusterEvent::Wake => {
                self.wake_queued = false;
                self.wake_due = false;
                self.tell_congestion(broker, clocks.now);
                self.held.retry(broker, clocks.now, &mut self.to_ack);
            }
            ClusterEvent::Applied { index, changes } => {
                for change in changes {
                    self.handle_event(broker, change);
                }
                broker.set_route_version(index);
                self.coordinator.consumed(index);
                // Forwards routed at this version may wait for it (see the core's
                // `move_window`).
                self.wake_due |= !self.held.is_empty();
            }
            ClusterEvent::Acked { dest, seq } => {
                let lane = self.lanes.entry(dest).or_default();
                let mut stored_through = None;
                while let Some(&(link_seq, stored_seq)) = lane.in_link.front() {
                    if link_seq > seq {
                        break;
                    }
                    stored_through = Some(stored_seq);
                    lane.in_link.pop_front();
                }
                if let Some(through) = stored_through {
                    broker.forwards_acked(dest, through);
                }
            }
            ClusterEvent::Retained(message) => broker.apply_retained(message),
            ClusterEvent::EndedSession(state) => {
                let client_id = state.client_id.clone();
                if broker.end_moved_session(clocks.now, *state) {
                    debug!(%client_id, "the will of a session ended by a clean start was published");
                }
            }
            ClusterEvent::LateSession { epoch, state } => {
                let client_id = state.client_id.clone();
                let carried = state.pending.len() + state.inflight.len();
                let current = self.coordinator.owner(&client_id);
                if let Some(owner) = current
                    .as_ref()
                    .filter(|owner| owner.node == self.node && owner.epoch == epoch)
                    .filter(|_| !self.own_claims.in_flight(&client_id))
                {
                    // A claim of this node that no session took here (see
                    // `adopt_orphaned_claim`): its previous owner has handed over now.
                    let claim = OwnClaim {
                        epoch,
                        expiry_secs: owner.session_expiry_secs,
                        claimed_ms: owner.claimed_ms,
                        previous_elsewhere: false,
                    };
                    self.adopt_orphaned_claim(broker, clocks, &client_id, claim);
                }
                let owner = current
                    .map(|owner| owner.node)
                    .filter(|&node| node != self.node);
                let queued = broker.merge_late_session_or_pass_on(
                    clocks.now,
                    clocks.wall,
                    epoch,
                    *state,
                    owner,
                );
                if queued > 0 {
                    info!(%client_id, queued, "a session handed over late joined the resumed session");
                } else if carried > 0 {
                    warn!(%client_id, epoch, carried, "a session handed over late found no session held under its claim here; its messages are dropped");
                }
            }
            ClusterEvent::HandOverKept { client_id, epoch } => {
                // With no claim of the client out here, none will ask for it: it is merged
                // now, not after `merge_if_unclaimed`'s wait (halyard-sim seeds 11, 167, 281
                // --no-kills: an orphaned claim waited 4 s for the hand-over it had).
                if !self.own_claims.in_flight(&client_id) {
                    let kept = lock(&self.transfers).take_all_arrived(&(client_id, epoch));
                    for state in kept {
                        let state = Box::new(state);
                        self.handle_event(broker, ClusterEvent::LateSession { epoch, state });
                    }
                }
            }
            ClusterEvent::Fenced => broker.disconnect_all(clocks.now, FENCED_REASON, FENCED_WHY),
            ClusterEvent::WillWon { publisher, will } => {
                broker.publish_settled_will(clocks.now, publisher, *will)
            }
        }
    }

    /// A claim task's answer, handed to the core.
    fn claim_settled(
        &mut self,
        broker: &mut Broker,
        clocks: Clocks,
        conn: ConnectionId,
        client_id: String,
        outcome: ClaimOutcome,
    ) {
        let owner = self.coordinator.owner(&client_id);
        let current = owner.as_ref().map(|owner| owner.epoch);
        let lost = superseded(&outcome, current);
        let carries_session = matches!(
            outcome,
            ClaimOutcome::Granted {
                session: Some(_),
                ..
            }
        );
        if let Some(owner) = owner.filter(|o| lost && carries_session && o.node != self.node) {
            // A newer claim on another node won while this one waited for the
            // session: the session passes through here (so that what was routed
            // here for it meanwhile goes with it) on to that node, whose claim
            // waits for it from this one.
            debug!(%client_id, new_owner = owner.node, "a newer claim elsewhere won; the session goes on");
            broker.handle_claim(clocks.now, clocks.wall, conn, outcome);
            self.hand_over(broker, clocks, &client_id, owner.epoch, owner.node);
            return;
        }
        let outcome = match (lost, outcome) {
            (true, ClaimOutcome::Granted { epoch, session, .. }) => {
                return self.superseded_here(broker, clocks, conn, &client_id, epoch, session);
            }
            (_, outcome) => outcome,
        };
        let granted = matches!(outcome, ClaimOutcome::Granted { .. });
        broker.handle_claim(clocks.now, clocks.wall, conn, outcome);
        if granted && !self.coordinator.lease_held() {
            // The lease lapsed while the claim was out: the session (and what its
            // old owner handed over) is kept here, but no connection is served.
            debug!(%client_id, "the lease lapsed before this grant; disconnecting");
            broker.disconnect_all(clocks.now, FENCED_REASON, FENCED_WHY);
        }
    }

    /// A grant under `epoch` that a newer claim overtook before it was answered: its
    /// connection is refused, and what it took goes to the newer claim.
    fn superseded_here(
        &mut self,
        broker: &mut Broker,
        clocks: Clocks,
        conn: ConnectionId,
        client_id: &str,
        epoch: u64,
        session: Option<Box<SessionState>>,
    ) {
        let owner = self.coordinator.owner(client_id);
        let current = owner.as_ref().map(|owner| owner.epoch);
        let newer_node = owner.as_ref().map(|o| o.node).filter(|&n| n != self.node);
        debug!(%client_id, "a newer claim was applied before this grant; refused");
        // The connection is refused, so its will (if the claim brought one) must never be
        // published.
        self.settle_will(client_id.to_owned(), epoch, 0, None);
        // What was routed here for the session under this claim follows it.
        let newer = current.unwrap_or(u64::MAX);
        broker.handle_superseded_claim(clocks.now, clocks.wall, conn, epoch, newer, newer_node);
        // The newer claim is this node's: the session this one took goes to it.
        if let (Some(state), None) = (session, newer_node) {
            self.hand_to_newer_claim_here(broker, clocks, newer, state);
        }
    }

    /// A session a claim of this node took after a newer claim here overtook it goes to the
    /// newer claim as if handed over to it: taken if it waits, merged if it has its session
    /// already, kept for it otherwise (halyard-sim seed 280 --no-partitions dropped it).
    fn hand_to_newer_claim_here(
        &mut self,
        broker: &mut Broker,
        clocks: Clocks,
        newer: u64,
        state: Box<SessionState>,
    ) {
        let key = (state.client_id.clone(), newer);
        let arrival = lock(&self.transfers).arrive(key.clone(), state);
        match arrival {
            Arrival::Taken => {}
            Arrival::Late(state) => {
                broker.merge_late_session(clocks.now, clocks.wall, newer, *state);
            }
            Arrival::Ended(state) => {
                broker.end_moved_session(clocks.now, *state);
            }
            Arrival::Kept => spawn_until(
                &self.stop,
                merge_if_unclaimed(Arc::clone(&self.transfers), key, self.events.clone()),
            ),
        }
    }

    /// Holds the session of this node's `claim` of `client_id`, which committed after the
    /// node refused its connection (see `own_claims`). The refused connection's will is
    /// never published. A newer claim raft applied since (this node caught up late) then
    /// moves the session on like any other, with what was handed over or routed here for
    /// it (halyard-sim seeds 167, 281 --no-kills dropped both).
    fn adopt_orphaned_claim(
        &mut self,
        broker: &mut Broker,
        clocks: Clocks,
        client_id: &str,
        claim: OwnClaim,
    ) {
        // A claim of an earlier incarnation of this node (its data directory was emptied
        // since) left nothing here, not even what its clients completed: holding its session
        // again would deliver replayed forwards twice (halyard-sim seed 257 --ci). It waits
        // for its client's next claim.
        if claim.claimed_ms < self.incarnation_since_ms {
            return;
        }
        // Another node may still serve the client until it hands the session over (or its
        // lease lapses): held here now, the session could move on at once to a newer claim
        // while that node still has the client's connection (halyard-sim seed 296). It is
        // held when that hand-over comes (see `ClusterEvent::LateSession`).
        if claim.previous_elsewhere {
            return;
        }
        let epoch = claim.epoch;
        let state = raft_session(&self.coordinator, client_id, claim.expiry_secs, epoch);
        if !broker.adopt_orphaned_claim(clocks.now, clocks.wall, epoch, state) {
            return;
        }
        info!(%client_id, epoch, "a claim refused here committed after all; its session is held here without a connection");
        self.settle_will(client_id.to_owned(), epoch, 0, None);
        let kept = lock(&self.transfers).resumed(clocks.now, (client_id.to_owned(), epoch));
        for state in kept {
            broker.merge_late_session(clocks.now, clocks.wall, epoch, state);
        }
    }

    /// Another node's claim of `client_id` under `epoch` was committed: a session held here
    /// under an older claim is fenced and handed over to `new_owner`.
    fn hand_over(
        &mut self,
        broker: &mut Broker,
        clocks: Clocks,
        client_id: &str,
        epoch: u64,
        new_owner: NodeId,
    ) {
        let Some(state) = broker.fence(clocks.now, clocks.wall, client_id, epoch, new_owner) else {
            return;
        };
        debug!(%client_id, new_owner, "session moves to another node");
        match wire::encode_session(epoch, &state) {
            Ok(payload) => {
                let seq = self.seq_for(new_owner);
                if let Err(error) = self.coordinator.link().send(new_owner, seq, payload) {
                    warn!(%client_id, %error, "session not handed over");
                }
            }
            Err(error) => warn!(%client_id, %error, "session not encoded"),
        }
    }

    /// The broker's state is durable: acknowledge the forwards it took, and send stored
    /// forwards that waited for room in the link.
    pub fn committed(&mut self, broker: &mut Broker) {
        for (origin, seq) in self.to_ack.drain(..) {
            self.coordinator.link().ack(origin, seq);
        }
        self.refill(broker);
        let now = self.clock.clocks().now;
        let freed = broker.take_room_freed();
        if !self.held.is_empty() && (freed || self.held.overdue(now)) {
            self.wake_due = true;
        }
        if self
            .lanes
            .keys()
            .any(|dest| self.congested(*dest) != self.told_congested.contains(dest))
        {
            self.wake_due = true;
        }
        // Sent, not acted on here: what the wake-up routes must be committed before its
        // acknowledgements leave. A full channel means more events, so a later commit
        // tries again.
        if self.wake_due
            && !self.wake_queued
            && self.events.try_send(E::from(ClusterEvent::Wake)).is_ok()
        {
            self.wake_queued = true;
        }
    }

    /// Tells the broker which destinations' lanes are behind, so that under a refusing
    /// policy publishes bound there wait (see the core's `peer_flow`).
    fn tell_congestion(&mut self, broker: &mut Broker, now: Instant) {
        let dests: Vec<NodeId> = self.lanes.keys().copied().collect();
        for dest in dests {
            let congested = self.congested(dest);
            if congested != self.told_congested.contains(&dest) {
                broker.set_node_congested(now, dest, congested);
                if congested {
                    self.told_congested.insert(dest);
                } else {
                    self.told_congested.remove(&dest);
                }
            }
        }
    }

    /// A lane is congested while it is behind with its peer connected: the peer is slow to
    /// take what it is sent. A peer that is down is not waited for: the outbox keeps its
    /// forwards, and publishers bound for live nodes go on (issue 13's node loss).
    fn congested(&self, dest: NodeId) -> bool {
        self.lanes.get(&dest).is_some_and(|lane| lane.behind)
            && self.coordinator.link().is_connected(dest)
    }

    fn claim(&self, request: ClaimRequest) {
        let coordinator = Arc::clone(&self.coordinator);
        let events = self.events.clone();
        let transfers = Arc::clone(&self.transfers);
        let node = self.node;
        let clock = Arc::clone(&self.clock);
        let now_ms = wall_ms(clock.clocks().wall);
        spawn_until(&self.stop, async move {
            // The lease itself, not the watcher's last look at it, so that claims and
            // `/readyz` agree.
            if !coordinator.lease_held() {
                // Refused without asking raft: a node cut off from the quorum takes no
                // sessions (CONNACK 0x88 / 0x03).
                let event = ClusterEvent::ClaimSettled {
                    conn: request.conn,
                    client_id: request.client_id,
                    outcome: ClaimOutcome::Refused,
                };
                let _ = events.send(E::from(event)).await;
                return;
            }
            let raft_request = halyard_cluster::ClaimRequest {
                client_id: request.client_id.clone(),
                expected_epoch: None,
                session_expiry_secs: request.expiry_interval,
                persistent: request.expiry_interval > 0,
                clean_start: request.clean_start,
                now_ms,
            };
            let will = request
                .will
                .as_deref()
                .and_then(|will| replicated_will(will, request.expiry_interval));
            let outcome = match coordinator.claim_with_will(raft_request, will).await {
                Ok(commit) => match commit.value {
                    RaftClaim::Granted {
                        epoch,
                        previous,
                        generation,
                    } => {
                        let waits = waits_for_handover(&transfers, &request, node, previous);
                        let moved = match previous {
                            Some((from, previous_epoch)) if waits && !request.clean_start => {
                                let waited =
                                    wait_for_transfer(&transfers, &clock, &request, epoch).await;
                                match waited {
                                    Some(state) => Some(state),
                                    None => {
                                        warn!(
                                            client_id = %request.client_id,
                                            from,
                                            "previous owner handed no session over in time; resuming from raft"
                                        );
                                        let _ = coordinator
                                            .wait_applied(commit.index, APPLY_TIMEOUT)
                                            .await;
                                        session_from_raft(&coordinator, &request, previous_epoch)
                                    }
                                }
                            }
                            // A clean start waits for the hand-over too: it says the previous
                            // owner has fenced its connection, so the client never has live
                            // connections on two nodes (found by the simulation, halyard-sim).
                            // The session it brings is over (its delayed will published).
                            Some((from, _)) if waits => {
                                let waited =
                                    wait_for_transfer(&transfers, &clock, &request, epoch).await;
                                if let Some(state) = waited {
                                    let _ = events
                                        .send(E::from(ClusterEvent::EndedSession(state)))
                                        .await;
                                } else {
                                    warn!(
                                        client_id = %request.client_id,
                                        from,
                                        "previous owner handed no session over in time; starting clean"
                                    );
                                }
                                None
                            }
                            _ => None,
                        };
                        ClaimOutcome::Granted {
                            epoch,
                            session: moved,
                            packet_ids: PacketIds::for_generation(generation),
                        }
                    }
                    // Never answered by the state machine (it answers such a retry as a
                    // grant of generation 0); refused rather than guessed at.
                    RaftClaim::LegacyGranted { .. } | RaftClaim::Conflict { .. } => {
                        ClaimOutcome::Refused
                    }
                },
                Err(error) => {
                    warn!(client_id = %request.client_id, %error, "claim refused");
                    ClaimOutcome::Refused
                }
            };
            // A session that resumes here: hand-overs for its claim that come after the
            // one it took join it as late ones, behind its settlement on the channel, and
            // at once rather than after `merge_if_unclaimed`'s wait (halyard-sim seed 89
            // --no-kills delivered such a session's messages only 4 s later).
            let resumed = match &outcome {
                ClaimOutcome::Granted {
                    epoch,
                    session: Some(_),
                    ..
                } if !request.clean_start => Some((request.client_id.clone(), *epoch)),
                _ => None,
            };
            let event = ClusterEvent::ClaimSettled {
                conn: request.conn,
                client_id: request.client_id,
                outcome,
            };
            if events.send(E::from(event)).await.is_err() {
                return;
            }
            if let Some(key) = resumed {
                let kept = lock(&transfers).resumed(clock.clocks().now, key.clone());
                merge_late(&events, key.1, kept).await;
            }
        });
    }

    /// Takes a will out of raft (see `Output::SettleWill`) and, if this node won it and it is
    /// due, publishes it. A will too large for raft was never put there: it is published at
    /// once, as on a single node.
    fn settle_will(&self, client_id: String, epoch: u64, publisher: u64, will: Option<Box<Will>>) {
        let coordinator = Arc::clone(&self.coordinator);
        let events = self.events.clone();
        spawn_until(&self.stop, async move {
            let in_raft = will
                .as_deref()
                .is_none_or(|will| replicated_will(will, 0).is_some());
            let won = !in_raft || won_in_raft(&coordinator, &client_id, epoch).await;
            if won {
                if let Some(will) = will {
                    let _ = events
                        .send(E::from(ClusterEvent::WillWon { publisher, will }))
                        .await;
                }
            }
        });
    }

    fn replicate_subscriptions(
        &self,
        ticket: Option<u64>,
        client_id: String,
        epoch: u64,
        changes: &[SubscriptionUpdate],
    ) {
        let mut raft_changes = Vec::with_capacity(changes.len());
        for change in changes {
            raft_changes.push(match change {
                SubscriptionUpdate::Add { filter, entry } => match wire::encode_entry(entry) {
                    Ok(options) => halyard_cluster::SubscriptionChange::Add {
                        filter: filter.clone(),
                        options,
                    },
                    Err(error) => {
                        warn!(%client_id, %error, "subscription not encoded");
                        continue;
                    }
                },
                SubscriptionUpdate::Remove { filter } => {
                    halyard_cluster::SubscriptionChange::Remove {
                        filter: filter.clone(),
                    }
                }
            });
        }
        let coordinator = Arc::clone(&self.coordinator);
        let events = self.events.clone();
        spawn_until(&self.stop, async move {
            let committed = match coordinator
                .update_subscriptions(&client_id, epoch, raft_changes)
                .await
            {
                Ok(commit) if commit.value => coordinator
                    .wait_applied_everywhere(commit.index, APPLY_TIMEOUT)
                    .await
                    .is_ok(),
                Ok(_) => {
                    warn!(%client_id, epoch, "subscriptions fenced: a newer claim holds the session");
                    false
                }
                Err(error) => {
                    warn!(%client_id, %error, "subscriptions not replicated");
                    false
                }
            };
            if let Some(ticket) = ticket {
                let event = ClusterEvent::RoutesCommitted { ticket, committed };
                let _ = events.send(E::from(event)).await;
            }
        });
    }

    fn replicate_retained(&self, message: &Message) {
        let clocks = self.clock.clocks();
        let blob = match wire::encode_retained(message, clocks) {
            Ok(blob) => blob,
            Err(error) => return warn!(%error, topic = %message.topic, "retained not encoded"),
        };
        let coordinator = Arc::clone(&self.coordinator);
        let topic = message.topic.clone();
        let clear = message.payload.is_empty();
        let now_ms = wall_ms(clocks.wall);
        spawn_until(&self.stop, async move {
            let stored = if clear {
                coordinator.delete_retained(&topic, now_ms).await
            } else {
                coordinator.set_retained(&topic, blob, now_ms).await
            };
            match stored {
                Ok(commit) if commit.value => {}
                Ok(_) => warn!(%topic, "retained message over the cluster's retained cap"),
                Err(error) => warn!(%topic, %error, "retained message not replicated"),
            }
        });
    }
}

impl<E> Drop for ClusterDriver<E> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The will as raft keeps it with the claim (its encoding and when it is due after its
/// connection is lost, in seconds: its delay, or the session's end if that comes first), or
/// `None` when it does not fit [`MAX_REPLICATED_WILL_BYTES`] or does not encode.
fn replicated_will(will: &Will, expiry_interval: u32) -> Option<(bytes::Bytes, u32)> {
    let blob = match wire::encode_will(will) {
        Ok(blob) => blob,
        Err(error) => {
            warn!(%error, topic = %will.topic, "will not encoded; kept on this node only");
            return None;
        }
    };
    if blob.len() > MAX_REPLICATED_WILL_BYTES {
        debug!(topic = %will.topic, bytes = blob.len(), "will too large for raft; kept on this node only");
        return None;
    }
    let delay = will.properties.will_delay_interval.unwrap_or(0);
    Some((blob, delay.min(expiry_interval)))
}

/// Settles the will of `client_id` under `epoch` in raft, retrying while the cluster cannot
/// commit. True if this call took it out (it is this node's to publish); false if it was
/// gone already (published elsewhere, or cancelled) or could not be settled.
async fn won_in_raft(coordinator: &Coordinator, client_id: &str, epoch: u64) -> bool {
    for _ in 0..WILL_SETTLE_ATTEMPTS {
        match coordinator.settle_will(client_id, epoch).await {
            Ok(commit) => return commit.value,
            Err(error) => {
                debug!(%client_id, %error, "will not settled yet; retrying");
                tokio::time::sleep(WILL_SETTLE_RETRY).await;
            }
        }
    }
    warn!(%client_id, epoch, "will not settled: no quorum; the survivors publish it if this node stays cut off");
    false
}

/// Wills the coordinator won for connections no live process holds (a lost node's clients,
/// or this node's previous process's), for the broker task to publish.
async fn follow_fired_wills<E: From<ClusterEvent>>(
    mut fired: mpsc::Receiver<FiredWill>,
    events: mpsc::Sender<E>,
) {
    while let Some(fired) = fired.recv().await {
        let will = match wire::decode_will(&fired.will) {
            Ok(will) => will,
            Err(error) => {
                warn!(client_id = %fired.client_id, epoch = fired.epoch, %error, "undecodable will in raft; dropped");
                continue;
            }
        };
        let event = ClusterEvent::WillWon {
            publisher: 0,
            will: Box::new(will),
        };
        if events.send(E::from(event)).await.is_err() {
            return;
        }
    }
}

/// Whether a grant lost to a newer claim that this node already applied. Its
/// `OwnerChanged` found no session to fence (the connection was still waiting for this
/// grant), so taking the grant would leave two live connections for one client id. A newer
/// claim applied after this check still fences it: its event follows this one.
fn superseded(outcome: &ClaimOutcome, current_epoch: Option<u64>) -> bool {
    match outcome {
        ClaimOutcome::Granted { epoch, .. } => {
            current_epoch.is_some_and(|current| current > *epoch)
        }
        ClaimOutcome::Refused => false,
    }
}

/// The session as raft holds it, for a claim whose previous owner handed nothing over (it
/// is down or cut off): the subscriptions, without the messages queued on the old owner
/// (those follow if it comes back, see `merge_if_unclaimed`). `None` when raft holds no
/// subscription for the client id (nothing to resume).
fn session_from_raft(
    coordinator: &Coordinator,
    request: &ClaimRequest,
    previous_epoch: u64,
) -> Option<Box<SessionState>> {
    let state = raft_session(
        coordinator,
        &request.client_id,
        request.expiry_interval,
        previous_epoch,
    );
    (!state.subscriptions.is_empty()).then(|| Box::new(state))
}

/// The session of `client_id` as raft holds it (its subscriptions), held under `epoch`.
fn raft_session(
    coordinator: &Coordinator,
    client_id: &str,
    expiry_interval: u32,
    epoch: u64,
) -> SessionState {
    let mut subscriptions = Vec::new();
    for (filter, subscription) in coordinator.subscriptions(client_id) {
        match wire::decode_entry(&subscription.options) {
            Ok(entry) => subscriptions.push((filter, entry)),
            Err(error) => {
                warn!(%client_id, %filter, %error, "undecodable subscription in raft; skipped")
            }
        }
    }
    SessionState {
        client_id: client_id.to_owned(),
        epoch,
        // Whatever the client had before: it continues.
        since: 0,
        expiry_interval,
        subscriptions,
        inflight: Vec::new(),
        pending: Vec::new(),
        inbound_qos2: Vec::new(),
        delayed_will: None,
        username: None,
    }
}

/// Whether a grant must wait for a hand-over before it serves the client: when the session
/// was another node's, and also when it was this node's own earlier claim that still waits
/// for another node's hand-over (the client connected again meanwhile), because that node
/// may still serve the client until such a wait ends (found by the simulation, halyard-sim
/// seed 18: the second CONNECT was served at once while the cut-off owner still held its
/// lease and the client's connection). Only that earlier claim itself counts, not an older
/// one still waiting: when the previous claim got its session, the session is here, and a
/// grant that waited for another would resume from raft over it and drop its queue (seed 42
/// of the kill profile).
fn waits_for_handover(
    transfers: &SharedTransfers,
    request: &ClaimRequest,
    node: NodeId,
    previous: Option<(NodeId, u64)>,
) -> bool {
    match previous {
        Some((from, _)) if from != node => true,
        Some((_, previous_epoch)) => lock(transfers)
            .newest_waiting(&request.client_id)
            .is_some_and(|waiting| waiting >= previous_epoch),
        None => false,
    }
}

/// Waits for the previous owner to hand the session of `request`'s claim under `epoch` over.
/// One that comes too late is merged into the resumed session, or ended if the claim
/// started clean.
async fn wait_for_transfer(
    transfers: &SharedTransfers,
    clock: &Arc<dyn DriverClock>,
    request: &ClaimRequest,
    epoch: u64,
) -> Option<Box<SessionState>> {
    let key = (request.client_id.clone(), epoch);
    let receiver = {
        let mut transfers = lock(transfers);
        if let Some(state) = transfers.take_arrived(&key) {
            return Some(state);
        }
        let (sender, receiver) = oneshot::channel();
        transfers.waiting.insert(key.clone(), sender);
        receiver
    };
    let state = tokio::time::timeout(TRANSFER_TIMEOUT, receiver)
        .await
        .ok()
        .and_then(Result::ok);
    let mut transfers = lock(transfers);
    transfers.waiting.remove(&key);
    if state.is_none() {
        let now = clock.clocks().now;
        if request.clean_start {
            transfers.end(now, key);
        } else {
            transfers.give_up(now, key);
        }
    }
    state
}

/// A session kept for a claim that has not asked for it: if none has after twice the time a
/// claim waits, it goes to the broker as a late hand-over, which joins the session this node
/// holds under that claim (a node that restarts hands over the queues of the sessions that
/// moved while it was down, long after their clients resumed here).
async fn merge_if_unclaimed<E: From<ClusterEvent>>(
    transfers: SharedTransfers,
    key: (String, u64),
    events: mpsc::Sender<E>,
) {
    tokio::time::sleep(2 * TRANSFER_TIMEOUT).await;
    let kept = lock(&transfers).take_all_arrived(&key);
    merge_late(&events, key.1, kept).await;
}

/// Gives the broker sessions kept for this node's claim under `epoch`, to join the session
/// that claim holds as late hand-overs, in the order they came.
async fn merge_late<E: From<ClusterEvent>>(
    events: &mpsc::Sender<E>,
    epoch: u64,
    kept: Vec<SessionState>,
) {
    for state in kept {
        let event = ClusterEvent::LateSession {
            epoch,
            state: Box::new(state),
        };
        if events.send(E::from(event)).await.is_err() {
            return;
        }
    }
}

/// Follows the lease: when it lapses the node drops its clients (claims are refused while
/// it lacks the lease, see `claim`), and says so again when it has it back.
async fn watch_lease<E: From<ClusterEvent>>(
    coordinator: Arc<Coordinator>,
    events: mpsc::Sender<E>,
) {
    let mut ticker = tokio::time::interval(LEASE_POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fenced = true;
    loop {
        ticker.tick().await;
        let held = coordinator.lease_held();
        let was_fenced = std::mem::replace(&mut fenced, !held);
        if !held && !was_fenced {
            warn!("cluster lease lapsed: no quorum contact; clients disconnected, claims refused");
            if events.send(E::from(ClusterEvent::Fenced)).await.is_err() {
                return;
            }
        } else if held && was_fenced {
            info!("cluster lease held: serving sessions");
        }
    }
}

/// Mirrors the route index and ownership changes into broker-task events.
async fn follow_changes<E: From<ClusterEvent>>(
    coordinator: Arc<Coordinator>,
    events: mpsc::Sender<E>,
    clock: Arc<dyn DriverClock>,
) {
    let node = coordinator.node_id();
    loop {
        let (mirror, mut feed) = coordinator.changes();
        let mut changes = Vec::new();
        for (key, nodes) in &mirror.routes {
            for &other in nodes.iter().filter(|&&other| other != node) {
                changes.push(ClusterEvent::Route {
                    node: other,
                    filter: raw_filter(key),
                    added: true,
                });
            }
        }
        for (client_id, owner) in &mirror.owners {
            let claim = OwnClaim {
                epoch: owner.epoch,
                expiry_secs: owner.session_expiry_secs,
                claimed_ms: owner.claimed_ms,
                // The mirror does not say.
                previous_elsewhere: true,
            };
            changes.push(claimed(client_id.clone(), claim, owner.node, node));
        }
        let resync = ClusterEvent::Applied {
            index: mirror.applied_index,
            changes,
        };
        if events.send(E::from(resync)).await.is_err() {
            return;
        }
        while let Some(applied) = feed.recv().await {
            let changes = applied
                .changes
                .into_iter()
                .filter_map(|change| cluster_event(&coordinator, node, change, clock.clocks()))
                .collect();
            let event = ClusterEvent::Applied {
                index: applied.index,
                changes,
            };
            if events.send(E::from(event)).await.is_err() {
                return;
            }
        }
        // The feed ended (it fell behind, or a snapshot was installed): resync from the
        // mirror. Re-adding a known route is harmless.
        debug!("cluster change feed ended; resyncing");
    }
}

/// The event for `claim` of `client_id` by `owner`, as `node` sees it.
fn claimed(client_id: String, claim: OwnClaim, owner: NodeId, node: NodeId) -> ClusterEvent {
    if owner == node {
        ClusterEvent::ClaimedHere { client_id, claim }
    } else {
        ClusterEvent::Claimed {
            client_id,
            epoch: claim.epoch,
            new_owner: owner,
        }
    }
}

fn cluster_event(
    coordinator: &Coordinator,
    node: NodeId,
    change: Change,
    clocks: Clocks,
) -> Option<ClusterEvent> {
    let added = matches!(change, Change::RouteAdded { .. });
    match change {
        Change::RouteAdded {
            filter,
            group,
            node: other,
        }
        | Change::RouteRemoved {
            filter,
            group,
            node: other,
        } if other != node => Some(ClusterEvent::Route {
            node: other,
            filter: raw_filter(&RouteKey { filter, group }),
            added,
        }),
        Change::OwnerChanged {
            client_id,
            node: Some(new_owner),
            epoch,
            previous,
            session_expiry_secs,
            claimed_ms,
        } => {
            let claim = OwnClaim {
                epoch,
                expiry_secs: session_expiry_secs,
                claimed_ms,
                previous_elsewhere: previous.is_some_and(|(owner, _)| owner != node),
            };
            Some(claimed(client_id, claim, new_owner, node))
        }
        Change::RetainedSet { topic } => {
            let stored = coordinator
                .retained(&topic)
                .into_iter()
                .find(|(name, _)| *name == topic)?;
            match wire::decode_retained(&stored.1.payload, clocks) {
                Ok(message) => Some(ClusterEvent::Retained(message)),
                Err(error) => {
                    warn!(%topic, %error, "undecodable retained message in raft");
                    None
                }
            }
        }
        Change::RetainedDeleted { topic } => Some(ClusterEvent::Retained(Message {
            topic,
            payload: bytes::Bytes::new(),
            qos: halyard_codec::QoS::AtMostOnce,
            retain: true,
            properties: None,
            expires_at: None,
            publisher: None,
        })),
        _ => None,
    }
}

/// Decodes what peers send: forwards go to the broker task, sessions to the claims
/// waiting for them.
async fn follow_link<E: From<ClusterEvent> + Send + 'static>(
    mut deliveries: mpsc::Receiver<halyard_cluster::Delivery>,
    events: mpsc::Sender<E>,
    transfers: SharedTransfers,
    clock: Arc<dyn DriverClock>,
    stop: CancellationToken,
) {
    while let Some(delivery) = deliveries.recv().await {
        match wire::decode_peer(&delivery.payload, clock.clocks()) {
            Ok(Received::Forward {
                message,
                groups,
                stored_as,
                routed_at,
                for_session,
                exchange,
            }) => {
                let event = ClusterEvent::Forwarded {
                    origin: delivery.origin,
                    seq: delivery.seq,
                    forward: PeerForward {
                        stored_as: stored_as.map(|seq| (delivery.origin_incarnation, seq)),
                        message,
                        groups,
                        routed_at,
                        for_session,
                        exchange,
                    },
                };
                if events.send(E::from(event)).await.is_err() {
                    return;
                }
            }
            Ok(Received::Session { epoch, state }) => {
                let key = (state.client_id.clone(), epoch);
                let arrival = lock(&transfers).arrive(key.clone(), state);
                let taken = ClusterEvent::FrameTaken {
                    origin: delivery.origin,
                    seq: delivery.seq,
                };
                if events.send(E::from(taken)).await.is_err() {
                    return;
                }
                let event = match arrival {
                    Arrival::Late(state) => ClusterEvent::LateSession { epoch, state },
                    Arrival::Ended(state) => ClusterEvent::EndedSession(state),
                    Arrival::Kept => {
                        spawn_until(
                            &stop,
                            merge_if_unclaimed(Arc::clone(&transfers), key.clone(), events.clone()),
                        );
                        ClusterEvent::HandOverKept {
                            client_id: key.0,
                            epoch,
                        }
                    }
                    Arrival::Taken => continue,
                };
                if events.send(E::from(event)).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                warn!(origin = delivery.origin, %error, "undecodable frame from a peer; dropped");
                let taken = ClusterEvent::FrameTaken {
                    origin: delivery.origin,
                    seq: delivery.seq,
                };
                if events.send(E::from(taken)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Acknowledgements of what this node sent, for the broker task: stored forwards leave
/// their outbox.
async fn follow_acks<E: From<ClusterEvent>>(
    mut acked: mpsc::Receiver<halyard_cluster::Acked>,
    events: mpsc::Sender<E>,
) {
    while let Some(ack) = acked.recv().await {
        let event = ClusterEvent::Acked {
            dest: ack.dest,
            seq: ack.seq,
        };
        if events.send(E::from(event)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(epoch: u64) -> ClaimOutcome {
        ClaimOutcome::Granted {
            epoch,
            session: None,
            packet_ids: PacketIds::ALL,
        }
    }

    #[test]
    fn a_grant_behind_a_newer_applied_claim_is_superseded() {
        assert!(superseded(&granted(5), Some(9)));
        assert!(!superseded(&granted(5), Some(5)), "its own claim");
        assert!(!superseded(&granted(5), None), "not applied here yet");
        assert!(!superseded(&ClaimOutcome::Refused, Some(9)));
    }
}
