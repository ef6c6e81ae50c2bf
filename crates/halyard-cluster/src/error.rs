//! The crate's one error type.

use crate::types::NodeId;

/// Why a cluster operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// No leader with a reachable quorum within the proposal timeout.
    #[error("no quorum: the cluster cannot commit")]
    NoQuorum,
    /// A leader exists but the proposal was not committed in time.
    #[error("timed out waiting for the cluster")]
    Timeout,
    /// The coordinator is shutting down.
    #[error("cluster coordinator shut down")]
    Shutdown,
    /// The data directory belongs to another node id.
    #[error("data directory belongs to node {stored}, configured as node {configured}")]
    IdentityMismatch { stored: NodeId, configured: NodeId },
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    #[error("cluster storage: {0}")]
    Storage(String),
    #[error("cluster network: {0}")]
    Io(String),
    #[error("invalid topic filter {0:?}")]
    InvalidFilter(String),
    #[error("invalid topic name {0:?}")]
    InvalidTopic(String),
    /// The peer link's unacknowledged queue for this node is full.
    #[error("peer link queue to node {0} is full")]
    QueueFull(NodeId),
    /// Peer link seqs must increase per destination.
    #[error("peer link seq {seq} to node {dest} is not above the last one")]
    SeqNotIncreasing { dest: NodeId, seq: u64 },
    /// The leader refused a membership change (`halyard cluster join|leave`).
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// openraft refused the request for another reason.
    #[error("raft: {0}")]
    Raft(String),
}
