//! The broker task's end of the cluster: it carries the core's cluster outputs (claims,
//! releases, subscription changes, retained messages, forwards) to the coordinator and the
//! peer link, and brings back what they decide as [`ClusterEvent`]s, which the broker task
//! hands to the core between packets, like any other event.
//!
//! Raft calls run in tasks of their own, so the broker task never waits on the network.
//! The driver is generic over the event type it sends (the server's broker-task event, or a
//! simulation's) and reads time through a [`DriverClock`], so that the deterministic
//! simulation (`halyard-sim`) runs this same glue.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use halyard_cluster::{Change, ClaimOutcome as RaftClaim, Coordinator, RouteKey};
use halyard_core::{
    Broker, ClaimOutcome, ClaimRequest, ConnectionId, Message, NodeId, Output, SessionState,
    SubscriptionUpdate,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::cluster::clock::DriverClock;
use crate::cluster::wire::{self, Clocks, Received};

/// How long a node that won a claim waits for the previous owner to hand the session over
/// before it resumes with what raft holds (the subscriptions of a persistent session).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a SUBACK waits for its routes to be applied by every reachable node once
/// committed, so that a publish made after it on any node reaches the subscriber.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the cluster tells the broker task.
#[derive(Debug)]
pub enum ClusterEvent {
    /// A claim emitted as `Output::Claim` was decided.
    ClaimSettled {
        /// The waiting connection.
        conn: ConnectionId,
        /// The client id it claimed.
        client_id: String,
        /// The outcome.
        outcome: ClaimOutcome,
    },
    /// Routes a SUBACK waits for were committed, or could not be.
    RoutesCommitted {
        /// The core's ticket.
        ticket: u64,
        /// Whether they were.
        committed: bool,
    },
    /// Another node gained or lost subscribers to a filter (`$share/...` for a group).
    Route {
        /// The node.
        node: NodeId,
        /// The filter as subscribed.
        filter: String,
        /// Added (true) or removed.
        added: bool,
    },
    /// A claim of `client_id` by `new_owner` under `epoch` was committed.
    Claimed {
        /// The client id.
        client_id: String,
        /// The new owner's epoch.
        epoch: u64,
        /// The new owner.
        new_owner: NodeId,
    },
    /// A publish another node forwarded here.
    Forwarded {
        /// The sender, to acknowledge once stored.
        origin: NodeId,
        /// Its sequence number on the link.
        seq: u64,
        /// The message.
        message: Message,
        /// Share groups this node serves for it.
        groups: Vec<Arc<str>>,
    },
    /// A retained message set or cleared through raft (possibly by this node).
    Retained(Message),
}

/// Sessions handed over by a previous owner, and claims waiting for them; whichever
/// comes second completes the pair.
#[derive(Default)]
struct Transfers {
    /// Sessions that came before their claim's outcome, with when they came.
    arrived: HashMap<(String, u64), (Instant, Box<SessionState>)>,
    waiting: HashMap<(String, u64), oneshot::Sender<Box<SessionState>>>,
}

impl Transfers {
    /// Keeps a session until its claim asks for it. One whose claim gave up waiting
    /// (`TRANSFER_TIMEOUT`) is dropped after twice that, with a warning: the client resumed
    /// without what it had queued on the old owner.
    fn arrive(&mut self, now: Instant, key: (String, u64), state: Box<SessionState>) {
        if let Some(waiter) = self.waiting.remove(&key) {
            let _ = waiter.send(state);
            return;
        }
        self.arrived.retain(|(client_id, _), (at, state)| {
            let keep = now.duration_since(*at) < 2 * TRANSFER_TIMEOUT;
            if !keep {
                warn!(
                    %client_id,
                    queued = state.pending.len() + state.inflight.len(),
                    "a session handed over after its claim stopped waiting was dropped"
                );
            }
            keep
        });
        self.arrived.insert(key, (now, state));
    }
}

type SharedTransfers = Arc<Mutex<Transfers>>;

fn lock(transfers: &SharedTransfers) -> std::sync::MutexGuard<'_, Transfers> {
    transfers.lock().unwrap_or_else(PoisonError::into_inner)
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
    /// Next peer-link sequence number per destination. Seeded from the wall clock in
    /// microseconds, so that a restarted node (same incarnation) continues above what its
    /// previous run sent and receivers do not take its frames for duplicates.
    next_seq: HashMap<NodeId, u64>,
    seq_base: u64,
    transfers: SharedTransfers,
    /// Forwards handed to the core since the last commit: acknowledged to their senders
    /// once it is durable.
    to_ack: Vec<(NodeId, u64)>,
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
    /// Starts following the coordinator's change feed and peer link, feeding `events`.
    pub fn start(
        coordinator: Arc<Coordinator>,
        events: mpsc::Sender<E>,
        clock: Arc<dyn DriverClock>,
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
                    Arc::clone(&coordinator),
                    receivers.deliveries,
                    events.clone(),
                    Arc::clone(&transfers),
                    clock.clone(),
                ),
            );
            spawn_until(&stop, drain_acks(receivers.acked));
        }
        let seq_base = clock
            .clocks()
            .wall
            .duration_since(UNIX_EPOCH)
            .map_or(1, |since| u64::try_from(since.as_micros()).unwrap_or(1));
        ClusterDriver {
            coordinator,
            events,
            clock,
            stop,
            node,
            next_seq: HashMap::new(),
            seq_base,
            transfers,
            to_ack: Vec::new(),
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
            Output::Claim(request) => self.claim(request.clone()),
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
            Output::Forward {
                node,
                message,
                groups,
            } => match wire::encode_forward(message, groups, self.clock.clocks()) {
                Ok(payload) => {
                    let seq = self.seq_for(*node);
                    if let Err(error) = self.coordinator.link().send(*node, seq, payload) {
                        warn!(node, %error, topic = %message.topic, "forward not sent");
                    }
                }
                Err(error) => warn!(%error, topic = %message.topic, "forward not encoded"),
            },
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
                let current = self.coordinator.owner(&client_id).map(|owner| owner.epoch);
                let outcome = if superseded(&outcome, current) {
                    debug!(%client_id, "a newer claim was applied before this grant; refused");
                    ClaimOutcome::Refused
                } else {
                    outcome
                };
                broker.handle_claim(clocks.now, clocks.wall, conn, outcome)
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
            } => {
                if let Some(state) = broker.fence(clocks.now, clocks.wall, &client_id, epoch) {
                    debug!(%client_id, new_owner, "session moves to another node");
                    match wire::encode_session(epoch, &state) {
                        Ok(payload) => {
                            let seq = self.seq_for(new_owner);
                            if let Err(error) =
                                self.coordinator.link().send(new_owner, seq, payload)
                            {
                                warn!(%client_id, %error, "session not handed over");
                            }
                        }
                        Err(error) => warn!(%client_id, %error, "session not encoded"),
                    }
                }
            }
            ClusterEvent::Forwarded {
                origin,
                seq,
                message,
                groups,
            } => {
                broker.handle_forward(clocks.now, origin, message, &groups);
                self.to_ack.push((origin, seq));
            }
            ClusterEvent::Retained(message) => broker.apply_retained(message),
        }
    }

    /// The broker's state is durable: acknowledge the forwards it took.
    pub fn committed(&mut self) {
        for (origin, seq) in self.to_ack.drain(..) {
            self.coordinator.link().ack(origin, seq);
        }
    }

    fn claim(&self, request: ClaimRequest) {
        let coordinator = Arc::clone(&self.coordinator);
        let events = self.events.clone();
        let transfers = Arc::clone(&self.transfers);
        let node = self.node;
        let now_ms = wall_ms(self.clock.clocks().wall);
        spawn_until(&self.stop, async move {
            let raft_request = halyard_cluster::ClaimRequest {
                client_id: request.client_id.clone(),
                expected_epoch: None,
                session_expiry_secs: request.expiry_interval,
                persistent: request.expiry_interval > 0,
                clean_start: request.clean_start,
                now_ms,
            };
            let outcome = match coordinator.claim(raft_request).await {
                Ok(commit) => match commit.value {
                    RaftClaim::Granted { epoch, previous } => {
                        // A clean start waits for the hand-over too, and drops it: the
                        // hand-over says the previous owner has fenced its connection, so
                        // the client never has live connections on two nodes (found by
                        // the simulation, halyard-sim).
                        let moved = match previous {
                            Some((from, _)) if from != node => {
                                let state =
                                    wait_for_transfer(&transfers, &request.client_id, epoch).await;
                                if state.is_none() {
                                    warn!(
                                        client_id = %request.client_id,
                                        from,
                                        "previous owner handed no session over in time"
                                    );
                                }
                                state.filter(|_| !request.clean_start)
                            }
                            _ => None,
                        };
                        ClaimOutcome::Granted {
                            epoch,
                            session: moved,
                        }
                    }
                    RaftClaim::Conflict { .. } => ClaimOutcome::Refused,
                },
                Err(error) => {
                    warn!(client_id = %request.client_id, %error, "claim refused");
                    ClaimOutcome::Refused
                }
            };
            let event = ClusterEvent::ClaimSettled {
                conn: request.conn,
                client_id: request.client_id,
                outcome,
            };
            let _ = events.send(E::from(event)).await;
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

async fn wait_for_transfer(
    transfers: &SharedTransfers,
    client_id: &str,
    epoch: u64,
) -> Option<Box<SessionState>> {
    let key = (client_id.to_owned(), epoch);
    let receiver = {
        let mut transfers = lock(transfers);
        if let Some((_, state)) = transfers.arrived.remove(&key) {
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
    lock(transfers).waiting.remove(&key);
    state
}

impl<E> Drop for ClusterDriver<E> {
    fn drop(&mut self) {
        self.stop.cancel();
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
        for (key, nodes) in &mirror.routes {
            for &other in nodes.iter().filter(|&&other| other != node) {
                let event = ClusterEvent::Route {
                    node: other,
                    filter: raw_filter(key),
                    added: true,
                };
                if events.send(E::from(event)).await.is_err() {
                    return;
                }
            }
        }
        for (client_id, owner) in &mirror.owners {
            if owner.node != node {
                let event = ClusterEvent::Claimed {
                    client_id: client_id.clone(),
                    epoch: owner.epoch,
                    new_owner: owner.node,
                };
                if events.send(E::from(event)).await.is_err() {
                    return;
                }
            }
        }
        while let Some(applied) = feed.recv().await {
            for change in applied.changes {
                let Some(event) = cluster_event(&coordinator, node, change, clock.clocks()) else {
                    continue;
                };
                if events.send(E::from(event)).await.is_err() {
                    return;
                }
            }
        }
        // The feed ended (it fell behind, or a snapshot was installed): resync from the
        // mirror. Re-adding a known route is harmless.
        debug!("cluster change feed ended; resyncing");
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
            ..
        } if new_owner != node => Some(ClusterEvent::Claimed {
            client_id,
            epoch,
            new_owner,
        }),
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
async fn follow_link<E: From<ClusterEvent>>(
    coordinator: Arc<Coordinator>,
    mut deliveries: mpsc::Receiver<halyard_cluster::Delivery>,
    events: mpsc::Sender<E>,
    transfers: SharedTransfers,
    clock: Arc<dyn DriverClock>,
) {
    while let Some(delivery) = deliveries.recv().await {
        let clocks = clock.clocks();
        match wire::decode_peer(&delivery.payload, clocks) {
            Ok(Received::Forward { message, groups }) => {
                let event = ClusterEvent::Forwarded {
                    origin: delivery.origin,
                    seq: delivery.seq,
                    message,
                    groups,
                };
                if events.send(E::from(event)).await.is_err() {
                    return;
                }
            }
            Ok(Received::Session { epoch, state }) => {
                lock(&transfers).arrive(clocks.now, (state.client_id.clone(), epoch), state);
                coordinator.link().ack(delivery.origin, delivery.seq);
            }
            Err(error) => {
                warn!(origin = delivery.origin, %error, "undecodable frame from a peer; dropped");
                coordinator.link().ack(delivery.origin, delivery.seq);
            }
        }
    }
}

/// Acknowledged forwards: nothing is held for them yet beyond the link's own queue.
async fn drain_acks(mut acked: mpsc::Receiver<halyard_cluster::Acked>) {
    while acked.recv().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(epoch: u64) -> ClaimOutcome {
        ClaimOutcome::Granted {
            epoch,
            session: None,
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
