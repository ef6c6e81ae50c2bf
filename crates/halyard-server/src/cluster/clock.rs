//! The cluster driver's clock: where it reads `now` on the monotonic and the wall clock.
//! Production reads the system's; a simulation supplies its own, so that a seed replays.

use std::fmt::Debug;
use std::time::{Instant, SystemTime};

use crate::cluster::wire::Clocks;

/// A source of the current time on both clocks.
pub trait DriverClock: Debug + Send + Sync + 'static {
    /// `now`, taken once on both clocks.
    fn clocks(&self) -> Clocks;
}

/// The system's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl DriverClock for SystemClock {
    fn clocks(&self) -> Clocks {
        Clocks {
            now: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}
