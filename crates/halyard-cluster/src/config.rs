//! What a [`crate::Coordinator`] needs to start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::ClusterError;
use crate::transport::{Incoming, TcpTransport, Transport};
use crate::types::NodeId;

/// Where the cluster port listens.
#[derive(Debug)]
pub enum Listen {
    /// Bind this address.
    Addr(SocketAddr),
    /// Use a listener the caller bound (tests bind port 0 to learn the port first).
    Bound(std::net::TcpListener),
    /// Take connections from this source instead of a TCP port (a simulated network).
    Incoming(Box<dyn Incoming>),
}

/// Configuration of one cluster node. Every voter must be given the same nodes in `peers`
/// (in the same order) and the same `retained_cap_bytes`; the addresses are where this node
/// reaches each peer and may differ from node to node (a proxy, NAT).
#[derive(Debug)]
pub struct ClusterConfig {
    /// This node's 1-based position in `peers`; a larger id is a node that joins a running
    /// cluster at run time ([`crate::Coordinator::add_member`]) and never initializes one.
    pub node_id: NodeId,
    pub listen: Listen,
    /// Every voter's cluster address (`host:port`, the host a name or an IP), this node
    /// included; names are resolved on every connection attempt.
    pub peers: Vec<String>,
    /// Holds `raft.redb` (log, snapshot, identity).
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// How long a write may wait for a leader and a commit before it fails.
    pub proposal_timeout: Duration,
    /// How long the batcher waits for more commands after the first of a batch.
    pub batch_window: Duration,
    /// Most commands in one raft entry.
    pub max_batch: usize,
    /// Total bytes (topic + payload) of retained messages the cluster stores.
    pub retained_cap_bytes: u64,
    /// Peer link: unacknowledged frames held per destination before `send` says `QueueFull`.
    pub peer_queue_capacity: usize,
    /// Change feed: applied entries buffered per subscriber before it is dropped.
    pub change_feed_capacity: usize,
    /// Raft entries between snapshots (the log is purged up to the snapshot).
    pub snapshot_every_entries: u64,
    /// fsync every raft.redb commit; turn off only in tests.
    pub fsync: bool,
    /// How this node connects to its peers' addresses (TCP unless simulated).
    pub transport: Arc<dyn Transport>,
    /// Seeds the incarnation id of a new data directory and the proposal ids instead of the
    /// OS's randomness; only a simulation sets it, so that a seed replays.
    pub entropy: Option<u64>,
    /// How long this node keeps serving its sessions without hearing from a quorum (see
    /// the lease module); must stay below the takeover timeout with a margin.
    pub lease: Duration,
}

impl ClusterConfig {
    /// A configuration with the defaults: 100 ms heartbeat, 500-1000 ms elections, 5 s
    /// proposal timeout, 1 ms batch window, 64 MiB retained cap, 10,000 frames per peer,
    /// 1.5 s lease.
    pub fn new(node_id: NodeId, listen: Listen, peers: Vec<String>, data_dir: PathBuf) -> Self {
        Self {
            node_id,
            listen,
            peers,
            data_dir,
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(500),
            election_timeout_max: Duration::from_millis(1000),
            proposal_timeout: Duration::from_secs(5),
            batch_window: Duration::from_millis(1),
            max_batch: 1024,
            retained_cap_bytes: 64 * 1024 * 1024,
            peer_queue_capacity: 10_000,
            change_feed_capacity: 4096,
            snapshot_every_entries: 5000,
            fsync: true,
            transport: Arc::new(TcpTransport),
            entropy: None,
            lease: Duration::from_millis(1500),
        }
    }

    /// Checks what openraft, the node-id rules and the peer addresses need (also done by
    /// [`crate::Coordinator::start`]).
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |why: &str| Err(ClusterError::Config(why.to_owned()));
        if self.peers.is_empty() {
            return bad("peers must list every voter, this node included");
        }
        if let Some(peer) = self
            .peers
            .iter()
            .find(|peer| !crate::dial::is_host_port(peer))
        {
            return Err(ClusterError::Config(format!(
                "peer {peer:?} is not host:port (a name or an IP, and a port)"
            )));
        }
        if self.node_id == 0 {
            return bad("node ids start at 1 (a voter's 1-based position in peers)");
        }
        if self.election_timeout_min <= self.heartbeat_interval
            || self.election_timeout_max <= self.election_timeout_min
        {
            return bad("need heartbeat < election timeout min < election timeout max");
        }
        if self.lease <= self.heartbeat_interval {
            return bad("the lease must be longer than the heartbeat interval");
        }
        if self.max_batch == 0 || self.peer_queue_capacity == 0 || self.change_feed_capacity == 0 {
            return bad("max_batch, peer_queue_capacity and change_feed_capacity must be positive");
        }
        Ok(())
    }
}

/// The address of a node id in a `peers` list (ids are 1-based positions).
pub(crate) fn peer_addr(peers: &[String], node: NodeId) -> Option<&String> {
    peers.get(usize::try_from(node.checked_sub(1)?).ok()?)
}
