//! Halyard's cluster: raft-replicated metadata and the publish peer link.
//!
//! What raft replicates (low rate, must agree): membership with each node's address and
//! incarnation; session ownership `client_id -> {node, epoch, expiry}` (the distributed lock,
//! the epoch being the log index that granted the claim, i.e. a fencing token); persistent
//! subscriptions, from which `apply` derives the route index (filter or share group -> nodes);
//! retained messages under a byte cap; and the wills of connected clients, kept with the
//! claim that brought them until their owner (or, for a lost node, the leader) settles them.
//! `apply` is pure: proposers stamp time and request ids into the entries.
//!
//! Design: openraft 0.9 with log and state machine in one redb file (`raft.redb`) per node;
//! the state machine lives in memory and is rebuilt from the last snapshot plus the committed
//! log. One TCP port per node carries length-delimited postcard frames; a hello names the
//! channel (raft RPCs, or the peer link). Writes go through a batcher that merges concurrent
//! commands into one entry and through a proposer that forwards them to the leader. openraft
//! stays inside the crate: the [`Coordinator`] speaks only this crate's plain types.

#![forbid(unsafe_code)]

mod acceptor;
mod announcer;
mod applied_everywhere;
mod batcher;
mod command;
mod config;
mod consumption;
mod coordinator;
mod dial;
mod error;
mod frame;
mod identity;
mod lease;
mod log_store;
mod membership;
mod metrics;
mod peer_client;
mod peer_link;
mod proposer;
mod raft_db;
mod raft_network;
mod raft_types;
mod state;
mod state_machine;
mod status;
mod transport;
mod types;
mod will_sweep;

pub use command::{ClaimOutcome, SubscriptionChange};
pub use config::{ClusterConfig, Listen};
pub use coordinator::{ClaimRequest, Coordinator, MAX_REPLICATED_WILL_BYTES};
pub use error::ClusterError;
pub use metrics::Metrics;
pub use peer_link::{Acked, Delivery, LinkReceivers, PeerLink};
pub use raft_db::RAFT_FILE;
pub use status::{Commit, LinkStatus, MemberStatus, MirrorState, Role, Status};
pub use transport::{
    BoxFuture, BoxStream, Incoming, PeerStream, TcpIncoming, TcpTransport, Transport,
};
pub use types::{
    Applied, Change, ClientId, FiredWill, NodeId, Owner, RetainedMessage, RouteKey, Subscription,
    WillRecord,
};
