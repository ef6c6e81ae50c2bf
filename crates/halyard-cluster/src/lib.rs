//! Halyard's cluster: raft-replicated metadata and the publish peer link.
//!
//! What raft replicates (low rate, must agree): membership with each node's address and
//! incarnation; session ownership `client_id -> {node, epoch, expiry}` (the distributed lock,
//! the epoch being the log index that granted the claim, i.e. a fencing token); persistent
//! subscriptions, from which `apply` derives the route index (filter or share group -> nodes);
//! and retained messages under a byte cap. `apply` is pure: proposers stamp time and request
//! ids into the entries.

pub mod command;
pub mod error;
mod identity;
mod log_store;
mod raft_db;
mod raft_types;
pub mod state;
mod state_machine;
pub mod types;
