//! The broker's deadlines, with at most one armed per connection or session and kind.
//!
//! Arming a deadline replaces the one armed before in its slot, and a connection's or a
//! session's deadlines are cancelled when it ends, so the queue holds at most two entries
//! per live connection and two per session, whatever clients do. (A heap that skipped stale
//! entries instead kept one for every CONNECT until its deadline: a client reconnecting in
//! a loop with keep-alive 65535 grew it for hours.)

use std::collections::BTreeSet;
use std::time::Instant;

use crate::broker::ConnectionId;
use crate::message::SessionKey;
use crate::timers::Timer;
use crate::FastMap;

/// What a deadline is for, without its epoch: the unit of replacement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    KeepAlive(ConnectionId),
    Pushback(ConnectionId),
    Will(SessionKey),
    SessionExpiry(SessionKey),
}

impl Slot {
    fn of(timer: Timer) -> Slot {
        match timer {
            Timer::KeepAlive(conn) => Slot::KeepAlive(conn),
            Timer::Pushback(conn) => Slot::Pushback(conn),
            Timer::Will(key, _) => Slot::Will(key),
            Timer::SessionExpiry(key, _) => Slot::SessionExpiry(key),
        }
    }
}

/// Deadlines in time order, one per slot.
#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    order: BTreeSet<(Instant, Timer)>,
    armed: FastMap<Slot, (Instant, Timer)>,
}

impl TimerQueue {
    /// Arms `timer` at `at`, replacing whatever its slot held.
    pub fn arm(&mut self, at: Instant, timer: Timer) {
        if let Some(old) = self.armed.insert(Slot::of(timer), (at, timer)) {
            self.order.remove(&old);
        }
        self.order.insert((at, timer));
    }

    /// The earliest deadline.
    pub fn peek(&self) -> Option<(Instant, Timer)> {
        self.order.first().copied()
    }

    /// Takes the earliest deadline if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let &(at, timer) = self.order.first()?;
        if at > now {
            return None;
        }
        self.order.pop_first();
        self.armed.remove(&Slot::of(timer));
        Some(timer)
    }

    /// A connection ended: its keep-alive and pushback deadlines go.
    pub fn cancel_connection(&mut self, conn: ConnectionId) {
        self.cancel(Slot::KeepAlive(conn));
        self.cancel(Slot::Pushback(conn));
    }

    /// A session ended or left this broker: its will and expiry deadlines go.
    pub fn cancel_session(&mut self, key: SessionKey) {
        self.cancel(Slot::Will(key));
        self.cancel(Slot::SessionExpiry(key));
    }

    fn cancel(&mut self, slot: Slot) {
        if let Some(entry) = self.armed.remove(&slot) {
            self.order.remove(&entry);
        }
    }

    /// Deadlines armed.
    pub fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn arming_a_slot_again_replaces_its_deadline() {
        let start = Instant::now();
        let mut queue = TimerQueue::default();
        for i in 0..1000 {
            queue.arm(start + Duration::from_secs(i), Timer::KeepAlive(7));
        }
        queue.arm(start, Timer::SessionExpiry(3, 1));
        queue.arm(start + Duration::from_secs(5), Timer::SessionExpiry(3, 2));
        assert_eq!(queue.len(), 2);
        assert_eq!(
            queue.pop_due(start + Duration::from_secs(10)),
            Some(Timer::SessionExpiry(3, 2))
        );
        assert_eq!(
            queue.pop_due(start + Duration::from_secs(10)),
            None,
            "keep-alive is at 999 s"
        );
        queue.cancel_connection(7);
        assert_eq!(queue.len(), 0);
    }
}
