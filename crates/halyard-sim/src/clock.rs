//! The simulation's clock: tokio's paused clock, which only moves when every task waits, and
//! a wall clock that starts at a fixed date and moves with it.

use std::time::{Duration, UNIX_EPOCH};

use halyard_server::cluster::{Clocks, DriverClock};

/// The simulated wall clock's start: 2026-01-01T00:00:00Z.
const WALL_START_SECS: u64 = 1_767_225_600;

/// Both clocks of a simulation run (create it inside the run's runtime).
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    start: tokio::time::Instant,
}

impl SimClock {
    /// A clock whose wall time starts now at [`WALL_START_SECS`].
    pub fn start() -> Self {
        Self {
            start: tokio::time::Instant::now(),
        }
    }

    /// Simulated time since the run began.
    pub fn elapsed(&self) -> Duration {
        tokio::time::Instant::now() - self.start
    }
}

impl DriverClock for SimClock {
    fn clocks(&self) -> Clocks {
        Clocks {
            now: tokio::time::Instant::now().into_std(),
            wall: UNIX_EPOCH + Duration::from_secs(WALL_START_SECS) + self.elapsed(),
        }
    }
}
