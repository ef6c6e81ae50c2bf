//! Running the broker as one node of a cluster (`halyard-cluster`): the core's parts for a
//! node whose claims, subscriptions and retained messages are decided by raft, and the
//! driver that connects the broker task to the coordinator and the peer link.

mod clock;
mod drain;
mod driver;
mod event;
mod held_forwards;
mod registry;
mod status;
mod transfers;
mod wire;

pub use clock::{DriverClock, SystemClock};
pub(crate) use drain::drain;
pub use drain::DRAIN_TIMEOUT;
pub use driver::{ClusterDriver, TRANSFER_TIMEOUT};
pub use event::ClusterEvent;
pub use registry::{cluster_parts, ClusterRegistry};
pub(crate) use status::{fenced, joined, registry, status_json};
pub use wire::{Clocks, WireError};
