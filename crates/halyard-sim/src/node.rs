//! One simulated node: the real coordinator (openraft on redb) and the real broker core on a
//! real store, joined by the production cluster driver, on the simulated network and clock.
//! The node's step is the server's broker task in miniature: hand in the cluster's events,
//! fire due timers, drain the outputs, commit the store, and only then let the clients see
//! what was sent to them (a PUBACK means stored).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_cluster::{ClusterConfig, Coordinator, Listen, NodeId};
use halyard_core::{Broker, BrokerConfig, BrokerParts, ConnectionId, Output};
use halyard_server::cluster::{ClusterDriver, ClusterEvent, DriverClock};
use halyard_store::{FsyncPolicy, RedbStore};
use tokio::sync::mpsc;

use crate::clock::SimClock;
use crate::network::{address, SimNetwork};

/// Cluster events buffered between two steps of a node.
const EVENT_BUFFER: usize = 4096;

/// How long a killed node's tasks get to let go of its coordinator.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// A running node.
pub struct Running {
    /// The node's id, for the span its log lines carry (`--log`).
    id: NodeId,
    pub coordinator: Arc<Coordinator>,
    pub broker: Broker,
    driver: ClusterDriver<ClusterEvent>,
    events: mpsc::Receiver<ClusterEvent>,
    /// Connections whose writes the broker asked to hear about.
    written: Vec<ConnectionId>,
}

/// Why a node could not start.
#[derive(Debug)]
pub struct StartError(pub String);

/// The raft timings of node `id`: fixed per node (openraft draws the election timeout from
/// `min..max`, so `max = min + 1` removes its randomness) and staggered, so that elections
/// rarely tie.
fn sim_config(
    id: NodeId,
    size: u64,
    dir: &Path,
    network: &SimNetwork,
    entropy: u64,
) -> ClusterConfig {
    let (incoming, transport) = network.attach(id);
    let peers = (1..=size).map(address).collect();
    let mut config = ClusterConfig::new(id, Listen::Incoming(incoming), peers, dir.join("raft"));
    config.heartbeat_interval = Duration::from_millis(50);
    config.election_timeout_min = Duration::from_millis(200 + 70 * id);
    config.election_timeout_max = config.election_timeout_min + Duration::from_millis(1);
    config.proposal_timeout = Duration::from_secs(3);
    config.snapshot_every_entries = 300;
    config.transport = transport;
    config.entropy = Some(entropy);
    config
}

impl Running {
    /// Starts node `id` of `size` on its data directory `dir`.
    pub async fn start(
        id: NodeId,
        size: u64,
        dir: &Path,
        network: &SimNetwork,
        clock: SimClock,
        entropy: u64,
    ) -> Result<Running, StartError> {
        let config = sim_config(id, size, dir, network, entropy);
        let coordinator = Coordinator::start(config)
            .await
            .map_err(|e| StartError(format!("coordinator: {e}")))?;
        let coordinator = Arc::new(coordinator);
        let store = RedbStore::open(&dir.join("store"), FsyncPolicy::Always)
            .map_err(|e| StartError(format!("store: {e}")))?;
        let clocks = clock.clocks();
        let mut broker = Broker::with_store_and_parts(
            BrokerConfig::default(),
            BrokerParts::replicated(),
            Box::new(store),
            clocks.now,
            clocks.wall,
        )
        .map_err(|e| StartError(format!("broker: {e}")))?;
        let (sender, events) = mpsc::channel(EVENT_BUFFER);
        let driver =
            ClusterDriver::start(coordinator.clone(), sender, Arc::new(clock), &mut broker);
        Ok(Running {
            id,
            coordinator,
            broker,
            driver,
            events,
            written: Vec::new(),
        })
    }

    /// One step of the node's broker task; returns what its clients are sent, once durable.
    pub fn step(&mut self, now: Instant) -> Vec<Output> {
        let _span = tracing::debug_span!("node", id = self.id).entered();
        for conn in std::mem::take(&mut self.written) {
            self.broker.handle_written(now, conn);
        }
        while let Ok(event) = self.events.try_recv() {
            self.driver.handle_event(&mut self.broker, event);
        }
        if self.broker.poll_timeout().is_some_and(|at| at <= now) {
            self.broker.handle_timeout(now);
        }
        let mut outputs = Vec::new();
        while let Some(output) = self.broker.poll_output() {
            outputs.push(output);
        }
        // The core's maps iterate in a per-process random order: put what one step emitted
        // in a canonical order (stable, so each target keeps its own order).
        outputs.sort_by_cached_key(canonical_key);
        let mut to_clients = Vec::new();
        for output in outputs {
            match output {
                Output::NotifyWritten { conn } => self.written.push(conn),
                Output::Send { .. } | Output::Close { .. } => to_clients.push(output),
                Output::Pause { .. } | Output::Resume { .. } => {}
                cluster => {
                    if let Output::Forward {
                        node,
                        message,
                        routed_at,
                        for_session,
                        exchange,
                        ..
                    } = &cluster
                    {
                        let id = <[u8; 8]>::try_from(&message.payload[..]).map(u64::from_be_bytes);
                        tracing::debug!(
                            to = node,
                            topic = message.topic,
                            message = id.ok(),
                            routed_at,
                            for_session = for_session.as_deref(),
                            exchange = ?exchange,
                            "forward"
                        );
                    }
                    self.driver.handle_output(&cluster)
                }
            }
        }
        if let Err(error) = self.broker.commit() {
            // Nothing of this step is acknowledged: the clients see none of it.
            eprintln!("store commit failed: {error}");
            return Vec::new();
        }
        self.driver.committed(&mut self.broker);
        to_clients
    }

    /// Kills the node: every task stops and every byte of memory is lost; what its store
    /// and `raft.redb` committed stays on disk.
    pub async fn kill(self) {
        let Running {
            coordinator,
            broker,
            driver,
            events,
            ..
        } = self;
        driver.stop();
        drop(driver);
        drop(events);
        drop(broker);
        let mut coordinator = coordinator;
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        loop {
            match Arc::try_unwrap(coordinator) {
                Ok(owned) => return owned.shutdown().await,
                Err(shared) if tokio::time::Instant::now() < deadline => {
                    coordinator = shared;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(_) => {
                    eprintln!("a killed node's coordinator is still shared; leaked");
                    return;
                }
            }
        }
    }
}

/// Sort key of an output: client-bound ones by connection, cluster ones by what they are
/// about, so that outputs for one target keep their order.
fn canonical_key(output: &Output) -> (u8, String) {
    match output {
        Output::Send { conn, .. }
        | Output::Close { conn }
        | Output::Pause { conn }
        | Output::Resume { conn }
        | Output::NotifyWritten { conn } => (0, format!("{conn:020}")),
        Output::Claim(request) => (1, request.client_id.clone()),
        Output::Release { client_id, .. }
        | Output::Subscriptions { client_id, .. }
        | Output::SettleWill { client_id, .. } => (1, client_id.clone()),
        Output::Forward { node, .. } => (2, format!("{node:020}")),
        Output::Retain { message } => (3, message.topic.clone()),
    }
}

/// A node's data directory, on tmpfs where there is one (fsync is then nearly free).
pub fn data_root() -> std::io::Result<tempfile::TempDir> {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("halyard-sim")
            .tempdir_in(shm)
    } else {
        tempfile::Builder::new().prefix("halyard-sim").tempdir()
    }
}
