//! What the tests that drive a core as a cluster driver would share.

use halyard_core::{
    BrokerParts, ClaimPoll, ClaimRequest, LocalRouter, MemoryRetained, SessionRegistry,
};

/// A registry that leaves every claim to the test, as a cluster's does.
#[derive(Default)]
pub struct DeferredRegistry;

impl SessionRegistry for DeferredRegistry {
    fn claim(&mut self, _request: &ClaimRequest) -> ClaimPoll {
        ClaimPoll::Pending
    }

    fn release(&mut self, _client_id: &str, _epoch: u64) -> bool {
        true
    }

    fn restored(&mut self, _epoch: u64) {}
}

/// A cluster node's parts: local routing, deferred claims, replicated state.
pub fn cluster_parts() -> BrokerParts {
    BrokerParts {
        router: Box::new(LocalRouter::new()),
        retained: Box::new(MemoryRetained::new()),
        registry: Box::new(DeferredRegistry),
        replicated: true,
    }
}
