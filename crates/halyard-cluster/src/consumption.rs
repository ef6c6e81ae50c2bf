//! How far the app has taken in the change feed.
//!
//! An entry applied by raft is not yet seen by the app: its changes travel through the feed
//! to the app's own loop (the broker task), which takes them between packets. A SUBACK waits
//! until every node has *applied* its route; on a node whose broker lags, a publish made
//! right after that SUBACK would still miss the route. So once the app reports what it has
//! consumed ([`Consumption::consumed`]), "applied" for the waits of `applied_everywhere`
//! means applied by raft and taken in by the app: no entry with changes at or below the
//! index is still in the feed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// Shared between the state machine (which publishes), the app (which consumes) and the
/// applied-index waits.
#[derive(Clone, Default)]
pub(crate) struct Consumption {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Set by the app's first report; until then nothing is tracked and every applied
    /// entry counts as seen (an app that does not report is not waited for).
    tracked: bool,
    /// Indexes of entries published to the feed and not yet reported consumed.
    unconsumed: BTreeSet<u64>,
}

impl Consumption {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// An entry with changes went to the feed.
    pub(crate) fn published(&self, index: u64) {
        let mut state = self.lock();
        if state.tracked {
            state.unconsumed.insert(index);
        }
    }

    /// The app has handled every feed entry up to `through` (or resynced from a mirror of
    /// that index).
    pub(crate) fn consumed(&self, through: u64) {
        {
            let mut state = self.lock();
            state.tracked = true;
            state.unconsumed.retain(|&index| index > through);
        }
        self.inner.changed.notify_waiters();
    }

    /// Whether nothing at or below `index` waits in the feed.
    pub(crate) fn caught_up(&self, index: u64) -> bool {
        self.lock()
            .unconsumed
            .first()
            .is_none_or(|&first| first > index)
    }

    /// Waits until [`Consumption::caught_up`] for `index`, at most `limit`; true if so.
    pub(crate) async fn wait_caught_up(&self, index: u64, limit: Duration) -> bool {
        let wait = async {
            loop {
                let changed = self.inner.changed.notified();
                if self.caught_up(index) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_count_as_seen_once_the_app_has_consumed_them() {
        let consumption = Consumption::default();
        consumption.published(3);
        assert!(consumption.caught_up(3), "untracked until the app reports");
        consumption.consumed(2);
        consumption.published(5);
        consumption.published(7);
        assert!(consumption.caught_up(4));
        assert!(!consumption.caught_up(5));
        assert!(
            !consumption
                .wait_caught_up(6, Duration::from_millis(20))
                .await
        );
        let waiter = {
            let consumption = consumption.clone();
            tokio::spawn(async move { consumption.wait_caught_up(6, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        consumption.consumed(5);
        assert!(waiter.await.expect("joins"));
        assert!(!consumption.caught_up(7));
        consumption.consumed(9);
        assert!(consumption.caught_up(100));
    }
}
