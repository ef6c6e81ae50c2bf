//! The broker-wide memory budget (issue 14): past it, publishers are paced, not refused.
//!
//! The core counts what its sessions hold in memory ([`Broker::held_bytes`]). When a
//! connection's event carried a PUBLISH while the total is over the budget, its reads stop
//! (TCP flow control then slows the client) until the total is back under the low-water
//! mark. A connection with deliveries in flight is not paced: its acknowledgements may be
//! what frees the memory, and pausing its reads would stall them.

use std::time::Instant;

use halyard_core::{Broker, ConnectionId};
use prometheus_client::metrics::counter::Counter;

use crate::link::Shared;

/// The low-water mark is this fraction of the budget: pacing ends only with some room, so
/// publishers are not paused and resumed for every message.
const LOW_WATER_NUMERATOR: u64 = 3;
const LOW_WATER_DENOMINATOR: u64 = 4;

/// Which publishers are paced, and since when.
#[derive(Debug, Default)]
pub(crate) struct Pacing {
    /// Bytes above which publishers are paced; 0 = no budget.
    budget: u64,
    /// Connections paced now, with their state; each is paced at most once (its `paced`
    /// flag says whether it is).
    paced: Vec<(ConnectionId, std::sync::Arc<Shared>)>,
    /// When the current pacing began.
    since: Option<Instant>,
    /// Seconds publishers were paced, summed over connections (`Metrics::paced_seconds`).
    paced_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl Pacing {
    /// Pacing under a budget of `budget` bytes (0: none), counting its time in
    /// `paced_seconds`.
    pub(crate) fn new(
        budget: usize,
        paced_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    ) -> Pacing {
        Pacing {
            budget: budget as u64,
            paced: Vec::new(),
            since: None,
            paced_seconds,
        }
    }

    /// Paces `conn` after it published, if the budget is exceeded and nothing it must read
    /// relieves it.
    pub(crate) fn after_publish(
        &mut self,
        broker: &Broker,
        conn: ConnectionId,
        shared: &std::sync::Arc<Shared>,
        now: Instant,
    ) {
        if self.budget == 0 || broker.held_bytes() <= self.budget || broker.has_inflight(conn) {
            return;
        }
        if shared.is_paced() {
            return;
        }
        shared.set_paced(true);
        self.paced.push((conn, std::sync::Arc::clone(shared)));
        self.since.get_or_insert(now);
    }

    /// Ends pacing once the total is under the low-water mark.
    pub(crate) fn update(&mut self, held: u64, now: Instant) {
        if self.paced.is_empty() || held > self.budget / LOW_WATER_DENOMINATOR * LOW_WATER_NUMERATOR
        {
            return;
        }
        if let Some(since) = self.since.take() {
            let seconds = now.saturating_duration_since(since).as_secs_f64();
            self.paced_seconds.inc_by(seconds * self.paced.len() as f64);
        }
        for (_, shared) in self.paced.drain(..) {
            shared.set_paced(false);
        }
    }

    /// Connections paced now.
    pub(crate) fn paced(&self) -> usize {
        self.paced.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pacing_ends_under_the_low_water_mark_and_counts_its_time() {
        let broker = Broker::new(halyard_core::BrokerConfig::default());
        let mut pacing = Pacing::new(1, Counter::default());
        let shared = Arc::new(Shared::default());
        let now = Instant::now();
        // Nothing is held: under the budget, nobody is paced.
        pacing.after_publish(&broker, 1, &shared, now);
        assert_eq!(pacing.paced(), 0);
        assert!(!shared.must_wait(usize::MAX));

        let mut pacing = Pacing::new(1000, Counter::default());
        pacing.paced.push((1, Arc::clone(&shared)));
        shared.set_paced(true);
        pacing.since = Some(now);
        pacing.update(751, now);
        assert_eq!(pacing.paced(), 1, "above the low-water mark");
        assert!(shared.must_wait(usize::MAX));
        pacing.update(750, now + std::time::Duration::from_secs(2));
        assert_eq!(pacing.paced(), 0);
        assert!(!shared.must_wait(usize::MAX));
        assert!((pacing.paced_seconds.get() - 2.0).abs() < 1e-9);
    }
}
