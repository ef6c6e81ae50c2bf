//! The broker-wide count of bytes that sessions hold in memory, queued and in flight, which
//! the server compares with its memory budget to pace publishers (issue 14).
//!
//! Each session queue is a [`MeteredQueue`]: it adds what it takes to the broker's
//! [`MemoryMeter`] and subtracts what it gives up, also when it is dropped with its session,
//! so no path that ends a session (expiry, takeover, clean start, transfer) can leave the
//! total behind. What it counts is the real footprint: each item's heap share (see
//! [`Weighed`] and `footprint.rs`) plus the queue's own buffer by its capacity, slack
//! included, since a queue that grew to a million entries keeps that buffer until it empties.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes and messages held by all session queues of one broker. Shared by its queues;
/// atomic only because the broker must be `Send` (one task uses it at a time).
#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryMeter(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    bytes: AtomicU64,
    items: AtomicU64,
}

impl MemoryMeter {
    /// The bytes held now.
    pub(crate) fn held(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }

    /// The messages held now, queued and in flight.
    pub(crate) fn messages(&self) -> u64 {
        self.0.items.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: u64) {
        self.0.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub(&self, bytes: u64) {
        self.0.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn add_items(&self, items: u64) {
        self.0.items.fetch_add(items, Ordering::Relaxed);
    }

    fn sub_items(&self, items: u64) {
        self.0.items.fetch_sub(items, Ordering::Relaxed);
    }
}

/// What a queued item costs in memory beyond its own slot in the queue's buffer (which the
/// queue counts itself).
pub(crate) trait Weighed {
    /// Heap bytes the item owns or keeps alive, counted the same way each time for the same
    /// item.
    fn weight(&self) -> u64;
}

/// A session queue whose contents count in the broker's [`MemoryMeter`].
#[derive(Debug, Default)]
pub(crate) struct MeteredQueue<T: Weighed> {
    items: VecDeque<T>,
    /// What `items` weigh, so a dropped queue gives back its total at once.
    weight: u64,
    /// Bytes of `items`' buffer as counted in the meter (its capacity).
    buffer: u64,
    meter: MemoryMeter,
}

impl<T: Weighed> MeteredQueue<T> {
    /// An empty queue counting in `meter`.
    pub(crate) fn new(meter: MemoryMeter) -> MeteredQueue<T> {
        MeteredQueue {
            items: VecDeque::new(),
            weight: 0,
            buffer: 0,
            meter,
        }
    }

    pub(crate) fn push_back(&mut self, item: T) {
        let weight = item.weight();
        self.weight += weight;
        self.meter.add(weight);
        self.meter.add_items(1);
        self.items.push_back(item);
        self.count_buffer();
    }

    /// Brings the meter's count of the buffer up to its capacity now (which changes only
    /// when it grows or is freed).
    fn count_buffer(&mut self) {
        let buffer = crate::footprint::vec_footprint::<T>(self.items.capacity()) as u64;
        if buffer > self.buffer {
            self.meter.add(buffer - self.buffer);
        } else {
            self.meter.sub(self.buffer - buffer);
        }
        self.buffer = buffer;
    }

    /// Bytes counted for this queue: its items and its buffer.
    #[cfg(test)]
    pub(crate) fn counted(&self) -> u64 {
        self.weight + self.buffer
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
        self.meter.sub_items(1);
        if self.items.is_empty() && self.items.capacity() > SHRINK_ABOVE {
            // A drained deep queue gives its buffer back instead of keeping it for good.
            self.items = VecDeque::new();
            self.count_buffer();
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
        self.meter.sub(self.weight + self.buffer);
        self.meter.sub_items(self.items.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::footprint::vec_footprint;

    struct Item(u64);

    impl Weighed for Item {
        fn weight(&self) -> u64 {
            self.0
        }
    }

    fn buffer_of(queue: &MeteredQueue<Item>) -> u64 {
        vec_footprint::<Item>(queue.items.capacity()) as u64
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
        assert!(buffer_of(&a) >= 3 * size_of::<Item>() as u64);
        assert_eq!(meter.held(), 2 * 1110 + buffer_of(&a) + buffer_of(&b));
        assert_eq!(meter.messages(), 6);
        assert_eq!(a.pop_front().map(|item| item.0), Some(10));
        assert_eq!(b.remove(1).map(|item| item.0), Some(100));
        assert_eq!(meter.held(), 1100 + 1010 + buffer_of(&a) + buffer_of(&b));
        drop(a);
        assert_eq!(meter.held(), 1010 + buffer_of(&b));
        assert_eq!(meter.messages(), 2);
        while b.pop_front().is_some() {}
        // A small emptied queue keeps its buffer, and the meter counts it.
        assert_eq!(meter.held(), buffer_of(&b));
        drop(b);
        assert_eq!(meter.held(), 0);
        assert_eq!(meter.messages(), 0);
    }

    #[test]
    fn a_deep_queue_counts_its_buffer_by_capacity_until_it_is_freed() {
        let meter = MemoryMeter::default();
        let mut queue = MeteredQueue::new(meter.clone());
        let deep = 3 * SHRINK_ABOVE;
        for _ in 0..deep {
            queue.push_back(Item(100));
        }
        let slots = queue.items.capacity();
        assert!(slots >= deep);
        assert_eq!(
            meter.held(),
            deep as u64 * 100 + vec_footprint::<Item>(slots) as u64
        );
        assert_eq!(meter.held(), queue.counted());
        // Half drained: the items go, the buffer stays as large as it grew.
        for _ in 0..deep / 2 {
            queue.pop_front();
        }
        assert_eq!(queue.items.capacity(), slots);
        assert_eq!(
            meter.held(),
            (deep - deep / 2) as u64 * 100 + vec_footprint::<Item>(slots) as u64
        );
        // Drained: the deep buffer is freed, and with it its count.
        while queue.pop_front().is_some() {}
        assert_eq!(queue.items.capacity(), 0);
        assert_eq!(meter.held(), 0);
    }
}
