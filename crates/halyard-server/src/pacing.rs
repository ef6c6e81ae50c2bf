//! The broker-wide memory budget (issue 14): past it, publishers are paced, not refused.
//!
//! The core counts what its sessions hold in memory ([`Broker::held_bytes`]). The budget
//! covers that, the event channel (`event_queue_bytes`: publishes already decoded are still
//! taken after pacing begins) and a sixteenth of it for what nobody counts (the process's own
//! memory, connection buffers, the allocator's spare pages), so that the broker's resident
//! set stays under it: publishers are paced once the sessions hold more than the budget less
//! those two. When a connection's event carried a PUBLISH while
//! the total is over that mark, its reads stop (TCP flow control then slows the client)
//! until the total is back under the low-water mark. A connection with deliveries in flight
//! is not paced: its acknowledgements may be what frees the memory, and pausing its reads
//! would stall them.

use std::time::Instant;

use halyard_core::{Broker, ConnectionId};
use prometheus_client::metrics::counter::Counter;

use crate::link::Shared;

/// The part of the budget set aside for memory the meter does not see is 1/this.
const UNCOUNTED_SHARE: u64 = 16;

/// The low-water mark is this fraction of the pacing mark: pacing ends only with some room,
/// so publishers are not paused and resumed for every message, but not much, so that they
/// do not all come back at once with a burst of a quarter of the budget, which the broker
/// spent its turns on while the subscribers waited (issue 14: deep/shallow delivery 0.61x
/// in one run with 3/4).
const LOW_WATER_NUMERATOR: u64 = 15;
const LOW_WATER_DENOMINATOR: u64 = 16;

/// Which publishers are paced, and since when.
#[derive(Debug, Default)]
pub(crate) struct Pacing {
    /// Bytes the sessions may hold before publishers are paced: the budget less what the
    /// event channel may hold and the uncounted share (together at most half of it); 0 = no
    /// budget.
    pace_above: u64,
    /// Connections paced now, with their state; each is paced at most once (its `paced`
    /// flag says whether it is).
    paced: Vec<(ConnectionId, std::sync::Arc<Shared>)>,
    /// When the current pacing began.
    since: Option<Instant>,
    /// Seconds publishers were paced, summed over connections (`Metrics::paced_seconds`).
    paced_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl Pacing {
    /// Pacing under a budget of `budget` bytes (0: none) of which the event channel may hold
    /// `event_queue_bytes`, counting its time in `paced_seconds`.
    pub(crate) fn new(
        budget: usize,
        event_queue_bytes: usize,
        paced_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    ) -> Pacing {
        let budget = budget as u64;
        Pacing {
            pace_above: budget
                - (event_queue_bytes as u64 + budget / UNCOUNTED_SHARE).min(budget / 2),
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
        if self.pace_above == 0
            || broker.held_bytes() <= self.pace_above
            || broker.has_inflight(conn)
        {
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
        if self.paced.is_empty()
            || held > self.pace_above / LOW_WATER_DENOMINATOR * LOW_WATER_NUMERATOR
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
        let mut pacing = Pacing::new(1, 0, Counter::default());
        let shared = Arc::new(Shared::default());
        let now = Instant::now();
        // Nothing is held: under the budget, nobody is paced.
        pacing.after_publish(&broker, 1, &shared, now);
        assert_eq!(pacing.paced(), 0);
        assert!(!shared.must_wait(usize::MAX));

        // 1600 of which the event channel may hold 200 and 100 are not counted: paced above
        // 1300, until 1215.
        let mut pacing = Pacing::new(1600, 200, Counter::default());
        assert_eq!(pacing.pace_above, 1300);
        pacing.paced.push((1, Arc::clone(&shared)));
        shared.set_paced(true);
        pacing.since = Some(now);
        pacing.update(1216, now);
        assert_eq!(pacing.paced(), 1, "above the low-water mark");
        assert!(shared.must_wait(usize::MAX));
        pacing.update(1215, now + std::time::Duration::from_secs(2));
        assert_eq!(pacing.paced(), 0);
        assert!(!shared.must_wait(usize::MAX));
        assert!((pacing.paced_seconds.get() - 2.0).abs() < 1e-9);
        // An event channel as large as the budget leaves the sessions half of it.
        assert_eq!(Pacing::new(1600, 4000, Counter::default()).pace_above, 800);
    }
}
