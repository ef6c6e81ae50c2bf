//! The broker-wide count of bytes that sessions hold in memory, queued and in flight, which
//! the server compares with its memory budget to pace publishers (issue 14).
//!
//! Each session queue is a [`MeteredQueue`]: it adds what it takes to the broker's
//! [`MemoryMeter`] and subtracts what it gives up, also when it is dropped with its session,
//! so no path that ends a session (expiry, takeover, clean start, transfer) can leave the
//! total behind.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes held by all session queues of one broker. Shared by its queues; atomic only
/// because the broker must be `Send` (one task uses it at a time).
#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryMeter(Arc<AtomicU64>);

impl MemoryMeter {
    /// The total now.
    pub(crate) fn held(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub(&self, bytes: u64) {
        self.0.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// What a queued item costs in memory.
pub(crate) trait Weighed {
    /// Bytes, counted the same way each time for the same item.
    fn weight(&self) -> u64;
}

/// A session queue whose contents count in the broker's [`MemoryMeter`].
#[derive(Debug, Default)]
pub(crate) struct MeteredQueue<T: Weighed> {
    items: VecDeque<T>,
    /// What `items` weigh, so a dropped queue gives back its total at once.
    weight: u64,
    meter: MemoryMeter,
}

impl<T: Weighed> MeteredQueue<T> {
    /// An empty queue counting in `meter`.
    pub(crate) fn new(meter: MemoryMeter) -> MeteredQueue<T> {
        MeteredQueue {
            items: VecDeque::new(),
            weight: 0,
            meter,
        }
    }

    pub(crate) fn push_back(&mut self, item: T) {
        let weight = item.weight();
        self.weight += weight;
        self.meter.add(weight);
        self.items.push_back(item);
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        self.forget(&item);
        Some(item)
    }

    pub(crate) fn remove(&mut self, index: usize) -> Option<T> {
        let item = self.items.remove(index)?;
        self.forget(&item);
        Some(item)
    }

    fn forget(&mut self, item: &T) {
        let weight = item.weight();
        self.weight -= weight;
        self.meter.sub(weight);
        if self.items.is_empty() && self.items.capacity() > SHRINK_ABOVE {
            // A drained deep queue gives its buffer back instead of keeping it for good.
            self.items = VecDeque::new();
        }
    }

    /// The item at `index`, to change in ways that keep its weight (a QoS 2 state).
    pub(crate) fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.items.get_mut(index)
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn iter(&self) -> std::collections::vec_deque::Iter<'_, T> {
        self.items.iter()
    }
}

/// Capacity (in items) above which an emptied queue frees its buffer.
const SHRINK_ABOVE: usize = 1024;

impl<'a, T: Weighed> IntoIterator for &'a MeteredQueue<T> {
    type Item = &'a T;
    type IntoIter = std::collections::vec_deque::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

impl<T: Weighed> Drop for MeteredQueue<T> {
    fn drop(&mut self) {
        self.meter.sub(self.weight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Item(u64);

    impl Weighed for Item {
        fn weight(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn the_meter_follows_pushes_pops_removals_and_drops() {
        let meter = MemoryMeter::default();
        let mut a = MeteredQueue::new(meter.clone());
        let mut b = MeteredQueue::new(meter.clone());
        for size in [10, 100, 1000] {
            a.push_back(Item(size));
            b.push_back(Item(size));
        }
        assert_eq!(meter.held(), 2 * 1110);
        assert_eq!(a.pop_front().map(|item| item.0), Some(10));
        assert_eq!(b.remove(1).map(|item| item.0), Some(100));
        assert_eq!(meter.held(), 1100 + 1010);
        drop(a);
        assert_eq!(meter.held(), 1010);
        while b.pop_front().is_some() {}
        assert_eq!(meter.held(), 0);
    }
}
