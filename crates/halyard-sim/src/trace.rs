//! The run's trace: a digest of everything that happened, in order. Two runs of one seed
//! must end with the same digest.

use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};

/// Folds events into one digest. `DefaultHasher::new()` has fixed keys, so equal event
/// sequences give equal digests in every run of the same build.
pub struct Trace {
    hasher: DefaultHasher,
    events: u64,
    /// Print every event as it is recorded (to read a failing seed's run).
    print: bool,
}

impl Trace {
    pub fn new(print: bool) -> Self {
        Self {
            hasher: DefaultHasher::new(),
            events: 0,
            print,
        }
    }

    /// Records one event (anything hashable: a step number with what happened).
    pub fn record(&mut self, event: impl Hash + Debug) {
        if self.print {
            println!("  event {event:?}");
        }
        event.hash(&mut self.hasher);
        self.events += 1;
    }

    /// Events recorded so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The digest of every event so far.
    pub fn digest(&self) -> u64 {
        self.hasher.finish()
    }
}

/// The digest of one value, e.g. a node's route table.
pub fn digest_of(value: impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}
