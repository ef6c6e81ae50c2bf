//! The byte bound of the connection -> broker event channel (issue 14).
//!
//! The channel's count bound says nothing about memory: a 2-byte PINGREQ costs an event of
//! about 400 bytes, and one event may carry a packet of `max_packet_size`. So each
//! connection takes its event's weight (see [`event_weight`]) from a broker-wide budget
//! before it sends it, and the broker task gives it back when it has handled the event. A
//! connection also stops reading while its own events outstanding exceed its share of the
//! budget (at most [`MAX_CONNECTION_SHARE`]): one flooding connection waits for the broker,
//! the others keep their turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use halyard_codec::Packet;
use tokio::sync::Semaphore;

use crate::event::Event;
use crate::link::Shared;

/// Default of [`InboundBudget::total`]: 16 MiB holds about 40,000 small events, or 4,000
/// full 4 KiB reads, far more than the broker task handles between two wake-ups.
pub const DEFAULT_EVENT_QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// One connection may have at most this fraction of the budget outstanding.
const CONNECTION_SHARE: usize = 16;

/// The largest per-connection share, whatever the budget: the broker task handles events in
/// the order they came, so an unrelated client's packet waits behind everything a flooding
/// connection has outstanding. At 1/16 of 16 MiB (1 MiB, about 700 events of 1 KB
/// publishes to 100 stalled subscribers) a QoS 1 pair beside such a flood saw p99 18 ms; at
/// 64 KiB it is 2-3 ms, and a lone publisher's throughput is unchanged (BENCHMARKS.md).
const MAX_CONNECTION_SHARE: usize = 64 * 1024;

/// The smallest per-connection share, so a tiny budget still lets a connection send a
/// read's worth of packets before it waits.
const MIN_CONNECTION_SHARE: usize = 16 * 1024;

/// Bytes of events sent to the broker task and not handled yet, bounded broker-wide and per
/// connection.
#[derive(Debug)]
pub(crate) struct InboundBudget {
    /// Bytes not taken; a permit is one byte.
    free: Arc<Semaphore>,
    /// The whole budget.
    total: usize,
    /// What one connection may have outstanding before its reader waits.
    per_connection: usize,
    /// Bytes taken and not given back, for metrics and tests.
    held: AtomicUsize,
}

impl Default for InboundBudget {
    fn default() -> Self {
        InboundBudget::new(DEFAULT_EVENT_QUEUE_BYTES)
    }
}

impl InboundBudget {
    /// A budget of `total` bytes (at least one per-connection share).
    pub(crate) fn new(total: usize) -> InboundBudget {
        let total = total.clamp(MIN_CONNECTION_SHARE, Semaphore::MAX_PERMITS);
        InboundBudget {
            free: Arc::new(Semaphore::new(total)),
            total,
            per_connection: (total / CONNECTION_SHARE)
                .clamp(MIN_CONNECTION_SHARE, MAX_CONNECTION_SHARE),
            held: AtomicUsize::new(0),
        }
    }

    /// Bytes of events outstanding now, over all connections.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The whole budget.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// What one connection may have outstanding before its reader waits.
    pub(crate) fn per_connection(&self) -> usize {
        self.per_connection
    }

    /// Takes `weight` bytes for an event of `shared`'s connection, waiting while the
    /// broker-wide budget has no room. An event larger than the whole budget takes all of
    /// it. Returns what was taken, to be given back with [`InboundBudget::release`].
    pub(crate) async fn take(&self, shared: &Shared, weight: usize) -> u32 {
        let weight = weight.min(self.total).min(u32::MAX as usize) as u32;
        match self.free.try_acquire_many(weight) {
            Ok(permit) => permit.forget(),
            // On the heap: the wait is rare, and inline it would size every reader's future.
            Err(_) => match Box::pin(self.free.acquire_many(weight)).await {
                Ok(permit) => permit.forget(),
                // Never closed; without a budget there is nothing to give back.
                Err(_) => return 0,
            },
        }
        self.held.fetch_add(weight as usize, Ordering::Relaxed);
        shared.add_event_bytes(weight);
        weight
    }

    /// Gives back what [`InboundBudget::take`] took for an event the broker task has
    /// handled (or dropped), waking the connection's reader if it waited for its share.
    pub(crate) fn release(&self, shared: Option<&Shared>, weight: u32) {
        if weight == 0 {
            return;
        }
        self.free.add_permits(weight as usize);
        self.held.fetch_sub(weight as usize, Ordering::Relaxed);
        if let Some(shared) = shared {
            shared.sub_event_bytes(weight, self.per_connection);
        }
    }
}

/// What an event of `packets`, decoded from `read` bytes of input, holds in memory: the
/// event and packet values themselves plus the input their payloads point into.
pub(crate) fn event_weight(packets: &[Packet], read: usize) -> usize {
    size_of::<Event>() + std::mem::size_of_val(packets) + read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_is_taken_is_given_back_and_a_connection_over_its_share_must_wait() {
        let budget = InboundBudget::new(1024 * 1024);
        let shared = Shared::default();
        let share = budget.per_connection();
        let mut taken = Vec::new();
        while !shared.over_event_share(share) {
            taken.push(budget.take(&shared, 4096).await);
        }
        assert!(budget.held() > share);
        assert!(budget.held() <= share + 4096);
        for weight in taken {
            budget.release(Some(&shared), weight);
        }
        assert_eq!(budget.held(), 0);
        assert!(!shared.over_event_share(share));
        assert_eq!(budget.free.available_permits(), budget.total);
    }

    #[test]
    fn a_pingreq_weighs_what_its_event_costs_not_its_two_bytes() {
        let weight = event_weight(&[Packet::PingReq], 2);
        assert!(weight > 2 + size_of::<Packet>(), "{weight}");
    }
}
