//! Exact lost / duplicate accounting on the subscriber side.
//!
//! Every publisher numbers its messages densely from 0, so one bit per sequence number tells
//! whether a message was already seen. After the run, `lost = sent - unique received` for every
//! (subscriber, publisher) pair the subscriber should hear from.

/// Which sequence numbers of one publisher a subscriber has received.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    seen: Vec<u64>,
    unique: u64,
    duplicates: u64,
}

impl SeqTracker {
    /// Records sequence number `seq`; true if it is new, false if it is a duplicate.
    pub fn record(&mut self, seq: u64) -> bool {
        let Ok(word) = usize::try_from(seq / 64) else {
            // Not reachable in practice (more than 2^70 messages); count it as a duplicate
            // rather than allocating without bound.
            self.duplicates += 1;
            return false;
        };
        if word >= self.seen.len() {
            let new_len = (word + 1).max(self.seen.len() * 2).max(16);
            self.seen.resize(new_len, 0);
        }
        let bit = 1u64 << (seq % 64);
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            false
        } else {
            self.seen[word] |= bit;
            self.unique += 1;
            true
        }
    }

    /// Distinct sequence numbers seen.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Receptions of an already-seen sequence number.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// How many of the sequence numbers `0..sent` were never seen.
    ///
    /// Sequence numbers at or above `sent` (which a correct broker cannot deliver) are not
    /// subtracted, so a bogus message never hides a lost one.
    pub fn lost(&self, sent: u64) -> u64 {
        let full_words = usize::try_from(sent / 64).unwrap_or(usize::MAX);
        let mut seen_below: u64 = self
            .seen
            .iter()
            .take(full_words)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rest = sent % 64;
        if rest != 0 {
            if let Some(w) = self.seen.get(full_words) {
                seen_below += u64::from((w & ((1u64 << rest) - 1)).count_ones());
            }
        }
        sent - seen_below
    }
}

/// What one subscriber received, per publisher.
#[derive(Debug, Clone, Default)]
pub struct Deliveries {
    per_publisher: Vec<SeqTracker>,
    /// Every delivery, duplicates included.
    pub received: u64,
    /// Deliveries whose payload did not carry a benchmark header.
    pub foreign: u64,
}

impl Deliveries {
    /// Records one delivery of (`publisher`, `seq`); true if it is new.
    pub fn record(&mut self, publisher: u32, seq: u64) -> bool {
        self.received += 1;
        let index = publisher as usize;
        if index >= self.per_publisher.len() {
            self.per_publisher
                .resize_with(index + 1, SeqTracker::default);
        }
        self.per_publisher[index].record(seq)
    }

    /// The tracker of one publisher, if anything was received from it.
    pub fn publisher(&self, publisher: u32) -> Option<&SeqTracker> {
        self.per_publisher.get(publisher as usize)
    }

    /// Distinct messages received, over all publishers.
    pub fn unique(&self) -> u64 {
        self.per_publisher.iter().map(SeqTracker::unique).sum()
    }

    /// Duplicate receptions, over all publishers.
    pub fn duplicates(&self) -> u64 {
        self.per_publisher.iter().map(SeqTracker::duplicates).sum()
    }

    /// Messages lost from the given publishers, `sent[p]` being how many publisher `p` sent.
    pub fn lost_from(&self, publishers: &[u32], sent: &[u64]) -> u64 {
        publishers
            .iter()
            .map(|&p| {
                let sent = sent.get(p as usize).copied().unwrap_or(0);
                match self.publisher(p) {
                    Some(tracker) => tracker.lost(sent),
                    None => sent,
                }
            })
            .sum()
    }

    /// Deliveries from publishers not in `expected` (a routing error if non-zero).
    pub fn unexpected(&self, expected: &[u32]) -> u64 {
        self.per_publisher
            .iter()
            .enumerate()
            .filter(|(p, _)| !expected.iter().any(|&e| e as usize == *p))
            .map(|(_, t)| t.unique() + t.duplicates())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_unique_and_duplicates() {
        let mut t = SeqTracker::default();
        assert!(t.record(0));
        assert!(t.record(5));
        assert!(!t.record(5));
        assert!(t.record(1000));
        assert!(!t.record(0));
        assert_eq!(t.unique(), 3);
        assert_eq!(t.duplicates(), 2);
    }

    #[test]
    fn lost_counts_missing_sequence_numbers_below_sent() {
        let mut t = SeqTracker::default();
        for seq in 0..200 {
            if seq % 10 != 3 {
                t.record(seq);
            }
        }
        assert_eq!(t.lost(200), 20);
        assert_eq!(t.lost(64), 7); // 3, 13, ..., 63
        assert_eq!(t.lost(0), 0);
        // Seen numbers at or above `sent` never offset lost ones.
        t.record(500);
        assert_eq!(t.lost(200), 20);
        assert_eq!(SeqTracker::default().lost(77), 77);
    }

    #[test]
    fn duplicates_do_not_hide_losses() {
        let mut t = SeqTracker::default();
        t.record(0);
        t.record(0);
        t.record(2);
        // sent 3, received 3 deliveries, but seq 1 is missing.
        assert_eq!(t.lost(3), 1);
        assert_eq!(t.duplicates(), 1);
    }

    #[test]
    fn deliveries_account_per_publisher() {
        let mut d = Deliveries::default();
        for seq in 0..10 {
            d.record(0, seq);
        }
        for seq in 0..5 {
            d.record(2, seq);
        }
        d.record(2, 4);
        d.record(9, 0);
        assert_eq!(d.received, 17);
        assert_eq!(d.unique(), 16);
        assert_eq!(d.duplicates(), 1);
        let sent = [10, 3, 8];
        // Publisher 1 sent 3 and none arrived; publisher 2 sent 8 and 5 arrived.
        assert_eq!(d.lost_from(&[0, 1, 2], &sent), 3 + 3);
        assert_eq!(d.lost_from(&[0], &sent), 0);
        assert_eq!(d.unexpected(&[0, 1, 2]), 1);
        assert_eq!(d.unexpected(&[0, 2, 9]), 0);
    }
}
