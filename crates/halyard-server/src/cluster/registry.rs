//! The session registry of a cluster node.

use halyard_core::{
    BrokerParts, ClaimPoll, ClaimRequest, LocalRouter, MemoryRetained, SessionRegistry,
};

/// Leaves every claim to raft: the core emits it as `Output::Claim` and waits, and every
/// release leaves as `Output::Release`. Epochs come from raft (the log index of the claim),
/// so nothing is counted here.
#[derive(Debug, Default)]
pub struct ClusterRegistry;

impl SessionRegistry for ClusterRegistry {
    fn claim(&mut self, _request: &ClaimRequest) -> ClaimPoll {
        ClaimPoll::Pending
    }

    fn release(&mut self, _client_id: &str, _epoch: u64) -> bool {
        true
    }

    fn restored(&mut self, _epoch: u64) {}
}

/// The core's parts for a cluster node: the local trie (which also holds the other nodes'
/// routes), retained messages in memory unless a store holds them, the cluster registry,
/// and replication of subscriptions and retained messages.
pub fn cluster_parts() -> BrokerParts {
    BrokerParts {
        router: Box::new(LocalRouter::new()),
        retained: Box::new(MemoryRetained::new()),
        registry: Box::new(ClusterRegistry),
        replicated: true,
    }
}
