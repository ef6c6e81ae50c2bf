//! Running the broker as one node of a cluster (`halyard-cluster`): the driver that
//! connects the broker task (whose core is built with `BrokerParts::replicated`) to the
//! coordinator and the peer link.

mod clock;
mod drain;
mod driver;
mod event;
mod held_forwards;
mod own_claims;
mod status;
mod transfers;
mod wire;

pub use clock::{DriverClock, SystemClock};
pub(crate) use drain::drain;
pub use drain::DRAIN_TIMEOUT;
pub use driver::{ClusterDriver, TRANSFER_TIMEOUT};
pub use event::{ClusterEvent, OwnClaim};
pub(crate) use status::{fenced, joined, registry, status_json};
pub use wire::{Clocks, WireError};
