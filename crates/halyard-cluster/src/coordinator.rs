//! The cluster's only public face: start a node, write through raft, read the applied state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::{ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::acceptor::{self, Acceptor};
use crate::applied_everywhere::{wait_applied, AppliedEverywhere};
use crate::batcher::{Batcher, Pending};
use crate::command::{Claim, ClaimOutcome, Command, Response, SubscriptionChange};
use crate::config::{peer_addr, ClusterConfig, Listen};
use crate::consumption::Consumption;
use crate::error::ClusterError;
use crate::frame::MembershipChange;
use crate::identity;
use crate::lease::Lease;
use crate::log_store::LogStore;
use crate::metrics::{bump, Counters, Metrics};
use crate::peer_client::LocalNode;
use crate::peer_link::{LinkReceivers, PeerLink};
use crate::proposer::Proposer;
use crate::raft_db::RaftDb;
use crate::raft_network::NetworkFactory;
use crate::raft_types::{NodeInfo, Raft};
use crate::state_machine::{lock, SharedApplier, StateMachineStore};
use crate::status::{Commit, MemberStatus, MirrorState, Role, Status};
use crate::transport::{Incoming, TcpIncoming, Transport};
use crate::types::{
    Applied, ClientId, FiredWill, NodeId, Owner, RetainedMessage, RouteKey, Subscription,
    WillRecord,
};
use crate::will_sweep::{WillSweep, LOST_NODE_MARGIN};

/// How long a membership change may take: adding a learner waits until it has caught up.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `shutdown` waits for raft's tasks to drop their handles on `raft.redb`.
const DB_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The largest will (as the app encodes it) a claim carries into raft. A batch holds up to
/// `max_batch` claims, so this keeps a reconnect storm's entry within a few megabytes; a
/// larger will stays on its node only (and is lost with it).
pub const MAX_REPLICATED_WILL_BYTES: usize = 16 * 1024;

/// How many fired wills wait for the app.
const FIRED_WILLS_QUEUED: usize = 1024;

/// What a session claim asks for; the coordinator adds its node, a request id and sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub client_id: ClientId,
    /// `Some(e)`: only if the current epoch is `e` (0 = no owner); `None`: take over.
    pub expected_epoch: Option<u64>,
    pub session_expiry_secs: u32,
    pub persistent: bool,
    /// MQTT clean start: the client's existing subscriptions (and routes) are dropped
    /// instead of moving to this node.
    pub clean_start: bool,
    /// The caller's clock, stamped into the entry.
    pub now_ms: u64,
}

/// One running cluster node.
pub struct Coordinator {
    local: LocalNode,
    raft: Raft,
    applier: SharedApplier,
    counters: Arc<Counters>,
    committed_index: Arc<AtomicU64>,
    proposals: mpsc::Sender<Pending>,
    /// Unique per proposal from this node; random start so a restart does not reuse ids.
    next_request_id: AtomicU64,
    change_feed_capacity: usize,
    tasks: Vec<AbortHandle>,
    /// Kept so that `shutdown` can drop the last handle itself, once raft's tasks have let
    /// go: the file is closed (and its clean-shutdown write done) when `shutdown` returns.
    db: Option<Arc<RaftDb>>,
    link: Arc<PeerLink>,
    /// The voters' addresses as configured (members added later are found in the membership).
    peers: Vec<String>,
    /// How this node dials its peers (for membership requests to the leader).
    transport: Arc<dyn Transport>,
    link_receivers: Mutex<Option<LinkReceivers>>,
    applied_everywhere: AppliedEverywhere,
    consumption: Consumption,
    lease: Arc<Lease>,
    /// This process's run, random per start (see [`WillRecord::run`]).
    run: u64,
    /// Whether the data directory was empty at this start (see
    /// [`Coordinator::incarnation_since_ms`]).
    started_empty: bool,
    fired_wills: Mutex<Option<mpsc::Receiver<FiredWill>>>,
}

impl Coordinator {
    /// Opens the data directory, starts raft and the cluster port, and initializes the
    /// cluster with the full voter set if this node has never been initialized.
    pub async fn start(config: ClusterConfig) -> Result<Coordinator, ClusterError> {
        config.validate()?;
        let listener = bind(config.listen).await?;
        let db = crate::raft_db::open(&config.data_dir, config.fsync)
            .map_err(|e| ClusterError::Storage(e.to_string()))?;
        let started_empty = identity::stored(&db)?.is_none();
        let identity = identity::load_or_create(&db, config.node_id, config.entropy)?;
        let local = LocalNode {
            id: identity.node_id,
            incarnation: identity.incarnation,
        };
        let counters = Arc::new(Counters::default());
        let db_handle = db.clone();
        let log_store = LogStore::new(db.clone());
        let committed_index = log_store.committed_index();
        let state_machine = StateMachineStore::open(db, config.retained_cap_bytes)
            .map_err(|e| ClusterError::Storage(e.to_string()))?;
        let applier = state_machine.applier();
        let consumption = lock(&applier).consumption.clone();

        let raft_config = openraft::Config {
            cluster_name: "halyard".into(),
            heartbeat_interval: millis(config.heartbeat_interval),
            election_timeout_min: millis(config.election_timeout_min),
            election_timeout_max: millis(config.election_timeout_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
            max_in_snapshot_log_to_keep: config.snapshot_every_entries / 2,
            // Entries can be batches of up to `max_batch` commands: keep an AppendEntries
            // frame well under the frame cap.
            max_payload_entries: 64,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| ClusterError::Config(e.to_string()))?;
        let lease = Arc::new(Lease::new(config.lease, config.peers.len()));
        let network = NetworkFactory {
            local,
            peers: config.peers.clone(),
            counters: counters.clone(),
            transport: config.transport.clone(),
            lease: lease.clone(),
        };
        let raft = Raft::new(
            local.id,
            Arc::new(raft_config),
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;

        let (link, link_receivers) = PeerLink::start(
            local,
            &config.peers,
            config.peer_queue_capacity,
            counters.clone(),
            config.transport.clone(),
        );
        let link = Arc::new(link);
        let mut tasks = Vec::new();
        let acceptor = Arc::new(Acceptor {
            local,
            raft: Some(raft.clone()),
            link: Some(link.inbound()),
            counters: counters.clone(),
            consumption: consumption.clone(),
            lease: lease.clone(),
        });
        tasks.push(tokio::spawn(acceptor::run(listener, acceptor)).abort_handle());

        let initialized = raft
            .is_initialized()
            .await
            .map_err(|_| ClusterError::Shutdown)?;
        let founder = config.node_id <= config.peers.len() as u64;
        if !initialized && founder {
            let voters: BTreeMap<NodeId, NodeInfo> = (1..)
                .zip(&config.peers)
                .map(|(id, addr)| {
                    let info = NodeInfo {
                        addr: addr.clone(),
                        incarnation: 0,
                    };
                    (id, info)
                })
                .collect();
            // Another node's initialization may have reached us first: that is fine, the
            // voter set is the same on every node.
            if let Err(error) = raft.initialize(voters).await {
                tracing::info!(%error, "cluster already initialized");
            }
        }

        let (proposals, inbox) = mpsc::channel(config.max_batch * 4);
        let proposer = Proposer {
            raft: raft.clone(),
            local,
            peers: config.peers.clone(),
            counters: counters.clone(),
            timeout: config.proposal_timeout,
            quorum_silence: config.election_timeout_max * 2,
            clients: BTreeMap::new(),
            transport: config.transport.clone(),
        };
        let batcher = Batcher {
            inbox,
            proposer,
            window: config.batch_window,
            max_batch: config.max_batch,
            counters: counters.clone(),
        };
        tasks.push(tokio::spawn(batcher.run()).abort_handle());
        let run = match config.entropy {
            Some(seed) => seed.rotate_left(17),
            None => random_u64()?,
        };
        let (fired, fired_wills) = mpsc::channel(FIRED_WILLS_QUEUED);
        let sweep = WillSweep {
            node: local.id,
            run,
            raft: raft.clone(),
            applier: applier.clone(),
            lease: lease.clone(),
            proposals: proposals.clone(),
            fired,
            lost_after: config.lease + LOST_NODE_MARGIN,
        };
        tasks.push(tokio::spawn(sweep.run()).abort_handle());
        tasks.push(
            tokio::spawn(crate::announcer::run(
                raft.clone(),
                local,
                config.peers.clone(),
                counters.clone(),
                config.transport.clone(),
            ))
            .abort_handle(),
        );
        tasks.push(
            tokio::spawn(count_leader_changes(raft.clone(), counters.clone())).abort_handle(),
        );
        tasks.push(
            tokio::spawn(follow_membership(
                raft.clone(),
                link.clone(),
                config.peers.clone(),
            ))
            .abort_handle(),
        );
        let applied_everywhere = AppliedEverywhere::new(
            local,
            &config.peers,
            config.lease,
            raft.clone(),
            consumption.clone(),
            counters.clone(),
            config.transport.clone(),
        );

        Ok(Coordinator {
            local,
            raft,
            applier,
            counters,
            committed_index,
            proposals,
            next_request_id: AtomicU64::new(match config.entropy {
                Some(seed) => seed >> 1,
                None => random_u64()? >> 1,
            }),
            change_feed_capacity: config.change_feed_capacity,
            tasks,
            db: Some(db_handle),
            link,
            peers: config.peers,
            transport: config.transport,
            link_receivers: Mutex::new(Some(link_receivers)),
            applied_everywhere,
            consumption,
            lease,
            run,
            started_empty,
            fired_wills: Mutex::new(Some(fired_wills)),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.local.id
    }

    /// Whether this node has heard from a quorum within its lease, and so may serve the
    /// sessions it owns; see the lease module for why that is safe.
    pub fn lease_held(&self) -> bool {
        self.lease.held(tokio::time::Instant::now())
    }

    /// When this node's incarnation began, on the clock claims are stamped with
    /// ([`ClaimRequest::now_ms`]): `now_ms` if this start found the data directory empty,
    /// the time recorded then on later starts, 0 for a directory from before it was
    /// recorded. A claim of this node stamped earlier belongs to an earlier incarnation,
    /// whose sessions left no state here.
    pub fn incarnation_since_ms(&self, now_ms: u64) -> Result<u64, ClusterError> {
        let Some(db) = self.db.as_deref() else {
            return Err(ClusterError::Shutdown);
        };
        identity::incarnation_since(db, self.started_empty, now_ms)
    }

    /// This node's incarnation (kept in the data directory).
    pub fn incarnation(&self) -> u64 {
        self.local.incarnation
    }

    async fn write(&self, command: Command) -> Result<Commit<Response>, ClusterError> {
        let (reply, answer) = oneshot::channel();
        self.proposals
            .send(Pending { command, reply })
            .await
            .map_err(|_| ClusterError::Shutdown)?;
        answer.await.map_err(|_| ClusterError::Shutdown)?
    }

    /// Claims session ownership for this node (the distributed lock, see [`ClaimOutcome`]).
    pub async fn claim(&self, request: ClaimRequest) -> Result<Commit<ClaimOutcome>, ClusterError> {
        self.claim_with_will(request, None).await
    }

    /// Claims like [`Coordinator::claim`], keeping `will` (the app's encoding, at most
    /// [`MAX_REPLICATED_WILL_BYTES`], with its delay in seconds) with the owner record if
    /// granted: from then on the will is published only by whoever wins
    /// [`Coordinator::settle_will`] for it, and by the survivors if this node is lost.
    pub async fn claim_with_will(
        &self,
        request: ClaimRequest,
        will: Option<(Bytes, u32)>,
    ) -> Result<Commit<ClaimOutcome>, ClusterError> {
        let claim = Claim {
            client_id: request.client_id,
            node: self.local.id,
            request_id: self.next_request_id.fetch_add(1, Ordering::Relaxed),
            expected_epoch: request.expected_epoch,
            session_expiry_secs: request.session_expiry_secs,
            persistent: request.persistent,
            now_ms: request.now_ms,
            clean_start: request.clean_start,
        };
        let command = match will {
            Some((will, delay_secs)) if will.len() <= MAX_REPLICATED_WILL_BYTES => {
                let will = WillRecord {
                    node: self.local.id,
                    run: self.run,
                    delay_secs,
                    will,
                };
                Command::ClaimWithWill { claim, will }
            }
            _ => Command::Claim(claim),
        };
        let commit = self.write(command).await?;
        match commit.value {
            Response::Claim(outcome) => {
                let counter = match outcome {
                    ClaimOutcome::Granted { .. } | ClaimOutcome::LegacyGranted { .. } => {
                        &self.counters.claims_committed
                    }
                    ClaimOutcome::Conflict { .. } => &self.counters.claims_refused,
                };
                bump(counter);
                Ok(Commit {
                    index: commit.index,
                    value: outcome,
                })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Releases this node's ownership if `epoch` is still current; drops the subscriptions.
    pub async fn release(&self, client_id: &str, epoch: u64) -> Result<Commit<bool>, ClusterError> {
        let command = Command::Release {
            client_id: client_id.to_owned(),
            node: self.local.id,
            epoch,
        };
        match self.write(command).await? {
            Commit {
                index,
                value: Response::Released(released),
            } => Ok(Commit {
                index,
                value: released,
            }),
            Commit { value, .. } => Err(unexpected(value)),
        }
    }

    /// Takes the will of `client_id` under `epoch` out of raft, to publish or discard it:
    /// true if this call removed it (publish it then), false if it was gone already
    /// (published elsewhere, or cancelled by a newer connection).
    pub async fn settle_will(
        &self,
        client_id: &str,
        epoch: u64,
    ) -> Result<Commit<bool>, ClusterError> {
        let command = Command::SettleWill {
            client_id: client_id.to_owned(),
            epoch,
        };
        match self.write(command).await? {
            Commit {
                index,
                value: Response::WillSettled(settled),
            } => Ok(Commit {
                index,
                value: settled,
            }),
            Commit { value, .. } => Err(unexpected(value)),
        }
    }

    /// The wills this node won for connections no live process holds (a lost node's, or
    /// this node's previous process's), to publish; `Some` only on the first call.
    pub fn take_fired_wills(&self) -> Option<mpsc::Receiver<FiredWill>> {
        self.fired_wills
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Adds and removes subscriptions of a client; `false` when `epoch` is not the owner's.
    pub async fn update_subscriptions(
        &self,
        client_id: &str,
        epoch: u64,
        changes: Vec<SubscriptionChange>,
    ) -> Result<Commit<bool>, ClusterError> {
        for change in &changes {
            let filter = match change {
                SubscriptionChange::Add { filter, .. } | SubscriptionChange::Remove { filter } => {
                    filter
                }
            };
            if !halyard_codec::topic::is_valid_topic_filter(filter) {
                return Err(ClusterError::InvalidFilter(filter.clone()));
            }
        }
        let command = Command::Subscriptions {
            client_id: client_id.to_owned(),
            epoch,
            changes,
        };
        match self.write(command).await? {
            Commit {
                index,
                value: Response::SubscriptionsApplied(applied),
            } => Ok(Commit {
                index,
                value: applied,
            }),
            Commit { value, .. } => Err(unexpected(value)),
        }
    }

    /// Stores a retained message; `false` when the cluster's byte cap refused it.
    pub async fn set_retained(
        &self,
        topic: &str,
        payload: Bytes,
        now_ms: u64,
    ) -> Result<Commit<bool>, ClusterError> {
        if !halyard_codec::topic::is_valid_topic_name(topic) {
            return Err(ClusterError::InvalidTopic(topic.to_owned()));
        }
        let command = Command::SetRetained {
            topic: topic.to_owned(),
            payload,
            now_ms,
        };
        match self.write(command).await? {
            Commit {
                index,
                value: Response::RetainedStored(stored),
            } => Ok(Commit {
                index,
                value: stored,
            }),
            Commit { value, .. } => Err(unexpected(value)),
        }
    }

    /// Deletes a retained message (an empty payload, as in MQTT).
    pub async fn delete_retained(
        &self,
        topic: &str,
        now_ms: u64,
    ) -> Result<Commit<bool>, ClusterError> {
        self.set_retained(topic, Bytes::new(), now_ms).await
    }

    /// The owner of a client id as applied on this node.
    pub fn owner(&self, client_id: &str) -> Option<Owner> {
        lock(&self.applier).state.owner(client_id).cloned()
    }

    /// How many persistent sessions this node owns, as applied here.
    pub fn persistent_sessions_owned(&self) -> usize {
        lock(&self.applier)
            .state
            .owners()
            .values()
            .filter(|owner| owner.node == self.local.id && owner.persistent)
            .count()
    }

    /// A client's subscriptions (filter as written) as applied on this node.
    pub fn subscriptions(&self, client_id: &str) -> BTreeMap<String, Subscription> {
        lock(&self.applier)
            .state
            .subscriptions(client_id)
            .cloned()
            .unwrap_or_default()
    }

    /// The route index as applied on this node.
    pub fn routes(&self) -> BTreeMap<RouteKey, BTreeSet<NodeId>> {
        lock(&self.applier).state.routes()
    }

    /// The applied index and the route index at it, read together (a simulation compares
    /// nodes' route tables at equal indexes).
    pub fn applied_routes(&self) -> (u64, BTreeMap<RouteKey, BTreeSet<NodeId>>) {
        let applier = lock(&self.applier);
        let index = applier.last_applied.map_or(0, |id| id.index);
        (index, applier.state.routes())
    }

    /// Retained messages matching a (non-shared) topic filter.
    pub fn retained(&self, filter: &str) -> Vec<(String, RetainedMessage)> {
        lock(&self.applier).state.retained_matching(filter)
    }

    /// The applied state to mirror plus a feed of every later applied entry with changes,
    /// in log order. A subscriber that falls `change_feed_capacity` entries behind (or a
    /// snapshot install) ends its feed; it calls `changes` again to resync.
    pub fn changes(&self) -> (MirrorState, mpsc::Receiver<Applied>) {
        let (sender, receiver) = mpsc::channel(self.change_feed_capacity);
        let mut applier = lock(&self.applier);
        applier.add_feed(sender);
        let mirror = MirrorState {
            applied_index: applier.last_applied.map_or(0, |id| id.index),
            owners: applier.state.owners().clone(),
            routes: applier.state.routes(),
        };
        (mirror, receiver)
    }

    /// Waits until this node has applied `index` (e.g. a commit made through another node).
    pub async fn wait_applied(&self, index: u64, limit: Duration) -> Result<(), ClusterError> {
        wait_applied(&self.raft, &self.consumption, index, limit).await
    }

    /// The app has handled every change of the feed up to `index` (or resynced from a mirror
    /// of that index). From the first report on, the applied-index waits here and on other
    /// nodes count an entry as applied on this node only once its changes are consumed, so a
    /// SUBACK waits until every broker routes the new subscription, not merely every raft.
    pub fn consumed(&self, index: u64) {
        self.consumption.consumed(index);
    }

    /// Waits until this node and every reachable voter have applied `index`, so that what
    /// the entry changed is seen on every node that can still serve clients. A voter out of
    /// contact for longer than its lease (plus a margin), and so fenced, is skipped (counted in
    /// [`Metrics::unreachable_peers_skipped`]); `Timeout` when this node or a reachable
    /// voter has not applied `index` within `limit`.
    pub async fn wait_applied_everywhere(
        &self,
        index: u64,
        limit: Duration,
    ) -> Result<(), ClusterError> {
        self.applied_everywhere.wait(index, limit).await
    }

    /// Adds node `node` with its cluster port at `addr` (`host:port`) as a learner, which
    /// replicates the log and receives routes and forwards; with `voter`, then promotes it
    /// (also for a node that already is a learner). Done by the leader, wherever it is asked.
    pub async fn add_member(
        &self,
        node: NodeId,
        addr: String,
        voter: bool,
    ) -> Result<(), ClusterError> {
        if !crate::dial::is_host_port(&addr) {
            return Err(ClusterError::Config(format!("{addr:?} is not host:port")));
        }
        let change = MembershipChange::Add { node, addr, voter };
        self.change_membership(change).await
    }

    /// Removes node `node` from the membership, demoting it first if it is a voter, so that
    /// the voter set shrinks before the node's data is deleted. Its id may join again later,
    /// with a new data directory.
    pub async fn remove_member(&self, node: NodeId) -> Result<(), ClusterError> {
        self.change_membership(MembershipChange::Remove { node })
            .await
    }

    async fn change_membership(&self, change: MembershipChange) -> Result<(), ClusterError> {
        crate::membership::request(
            &self.raft,
            self.local,
            &self.peers,
            &self.counters,
            &self.transport,
            change,
            MEMBERSHIP_TIMEOUT,
        )
        .await
    }

    /// The publish peer link (send, ack, seed).
    pub fn link(&self) -> &PeerLink {
        &self.link
    }

    /// The app's ends of the peer link; `Some` only on the first call.
    pub fn take_link_receivers(&self) -> Option<LinkReceivers> {
        self.link_receivers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Members, leader, term, indexes and links.
    pub fn status(&self) -> Status {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| MemberStatus {
                id: *id,
                addr: node.addr.clone(),
                incarnation: node.incarnation,
                voter: voters.contains(id),
                matched_index: metrics
                    .replication
                    .as_ref()
                    .and_then(|replication| replication.get(id))
                    .and_then(|matched| matched.map(|log_id| log_id.index)),
            })
            .collect();
        let role = match metrics.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        Status {
            node_id: self.local.id,
            incarnation: self.local.incarnation,
            role,
            leader: metrics.current_leader,
            current_term: metrics.current_term,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            commit_index: self.committed_index.load(Ordering::Relaxed),
            applied_index: metrics.last_applied.map_or(0, |id| id.index),
            members,
            links: self.link.status(),
            fenced: self.counters.fenced(),
        }
    }

    /// Counters and raft figures.
    pub fn metrics(&self) -> Metrics {
        let mut snapshot = self.counters.snapshot();
        {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            snapshot.current_term = metrics.current_term;
            snapshot.applied_index = metrics.last_applied.map_or(0, |id| id.index);
        }
        snapshot.commit_index = self.committed_index.load(Ordering::Relaxed);
        {
            let applier = lock(&self.applier);
            snapshot.entries_applied = applier.entries_applied;
            snapshot.snapshots_installed = applier.snapshots_installed;
            snapshot.retained_bytes = applier.state.retained_bytes();
        }
        snapshot
    }

    /// Stops raft, the cluster port and every task; when it returns, `raft.redb` is closed
    /// (unless a raft task failed to end within a few seconds) and can be reopened.
    pub async fn shutdown(mut self) {
        self.stop_tasks();
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "raft did not shut down cleanly");
        }
        let Some(db) = self.db.take() else {
            return;
        };
        let released = tokio::time::timeout(DB_CLOSE_WAIT, async {
            while Arc::strong_count(&db) > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        if released.await.is_err() {
            tracing::warn!("raft.redb still open after shutdown");
        }
        drop(db);
    }

    fn stop_tasks(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.link.stop();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

fn unexpected(response: Response) -> ClusterError {
    ClusterError::Raft(format!("unexpected response {response:?}"))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn random_u64() -> Result<u64, ClusterError> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(|e| ClusterError::Storage(e.to_string()))?;
    Ok(u64::from_le_bytes(bytes))
}

async fn bind(listen: Listen) -> Result<Box<dyn Incoming>, ClusterError> {
    let io = |e: std::io::Error| ClusterError::Io(e.to_string());
    let listener = match listen {
        Listen::Addr(addr) => TcpListener::bind(addr).await.map_err(io)?,
        Listen::Bound(listener) => {
            listener.set_nonblocking(true).map_err(io)?;
            TcpListener::from_std(listener).map_err(io)?
        }
        Listen::Incoming(incoming) => return Ok(incoming),
    };
    Ok(Box::new(TcpIncoming(listener)))
}

async fn count_leader_changes(raft: Raft, counters: Arc<Counters>) {
    let mut metrics = raft.metrics();
    let mut leader = None;
    loop {
        let current = metrics.borrow_and_update().current_leader;
        if current.is_some() && current != leader {
            bump(&counters.leader_changes);
        }
        leader = current;
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps the peer link's destinations equal to the members (voters and learners) once the
/// membership is known here: a node added at run time gets forwards, a removed one no more.
async fn follow_membership(raft: Raft, link: Arc<PeerLink>, peers: Vec<String>) {
    let mut metrics = raft.metrics();
    let mut seen = None;
    loop {
        // A node named in this node's own `peers` is reached where that list says (as raft
        // dials it); only nodes added at run time at the address the membership records.
        let members: BTreeMap<NodeId, String> = metrics
            .borrow_and_update()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, info)| {
                let addr = peer_addr(&peers, *id).unwrap_or(&info.addr);
                (*id, addr.clone())
            })
            .collect();
        if !members.is_empty() && seen.as_ref() != Some(&members) {
            link.set_destinations(members.clone());
            seen = Some(members);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
