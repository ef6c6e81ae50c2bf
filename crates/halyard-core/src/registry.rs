//! Who owns a client's session.
//!
//! A single node owns every session, but the cluster will need a distributed lock with a
//! fencing epoch per claim. The broker already tags session state and its timers with the
//! epoch it got from [`SessionRegistry::claim`], so a stale owner can be fenced later without
//! the broker changing shape.

/// The seam for session ownership.
pub trait SessionRegistry: Send {
    /// Claims `client_id` for this node and returns a fencing epoch larger than any earlier
    /// claim of the same client id.
    fn claim(&mut self, client_id: &str) -> u64;
    /// Gives up ownership of `client_id` claimed at `epoch` (the session ended).
    fn release(&mut self, client_id: &str, epoch: u64);
}

/// Single-node registry: every claim succeeds with a process-wide increasing epoch.
#[derive(Debug, Default)]
pub struct LocalSessionRegistry {
    last_epoch: u64,
}

impl SessionRegistry for LocalSessionRegistry {
    fn claim(&mut self, _client_id: &str) -> u64 {
        self.last_epoch += 1;
        self.last_epoch
    }

    fn release(&mut self, _client_id: &str, _epoch: u64) {}
}
