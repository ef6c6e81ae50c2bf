//! Sessions handed over by a previous owner, matched with the claims waiting for them:
//! whichever of the two comes second completes the pair.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use halyard_core::SessionState;
use tokio::sync::oneshot;

/// Sessions handed over by a previous owner, and claims waiting for them; whichever
/// comes second completes the pair.
#[derive(Default)]
pub(super) struct Transfers {
    /// Sessions that came before their claim waited for them.
    pub(super) arrived: HashMap<(String, u64), Box<SessionState>>,
    pub(super) waiting: HashMap<(String, u64), oneshot::Sender<Box<SessionState>>>,
    /// Claims that stopped waiting (the client resumed from raft's state), with when: a
    /// session arriving for one of them is merged into the live session.
    gave_up: HashMap<(String, u64), Instant>,
    /// Clean-start claims that took a client id from another node, with when: the session
    /// the old owner hands over is ended here (its delayed will published).
    ended: HashMap<(String, u64), Instant>,
}

/// What to do with a session handed over.
pub(super) enum Arrival {
    /// Its claim was waiting and has it now.
    Taken,
    /// Kept for a claim that has not asked yet; if none does, it is merged like a late one
    /// (a restarted node hands over the sessions that moved while it was down).
    Kept,
    /// The claim resumed without it: merge it into the live session.
    Late(Box<SessionState>),
    /// The claim started clean: the session is over.
    Ended(Box<SessionState>),
}

/// How long a claim that stopped waiting still takes a late hand-over.
const LATE_TRANSFER_WINDOW: Duration = Duration::from_secs(60);

impl Transfers {
    /// Gives a session to the claim waiting for it, or says what to do with it. When this
    /// node's client connected again while its claim waited, the newest claim gets it (the
    /// older ones are superseded; see `waits_for_handover`).
    pub(super) fn arrive(&mut self, key: (String, u64), state: Box<SessionState>) -> Arrival {
        let newest = self.newest_waiting(&key.0).filter(|&epoch| epoch >= key.1);
        let waiter = newest.and_then(|epoch| self.waiting.remove(&(key.0.clone(), epoch)));
        if let Some(waiter) = waiter {
            let _ = waiter.send(state);
            return Arrival::Taken;
        }
        if self.gave_up.remove(&key).is_some() {
            return Arrival::Late(state);
        }
        if self.ended.remove(&key).is_some() {
            return Arrival::Ended(state);
        }
        self.arrived.insert(key, state);
        Arrival::Kept
    }

    /// The epoch of the newest claim of `client_id` waiting for a hand-over.
    pub(super) fn newest_waiting(&self, client_id: &str) -> Option<u64> {
        self.waiting
            .keys()
            .filter(|(waiting, _)| waiting == client_id)
            .map(|&(_, epoch)| epoch)
            .max()
    }

    /// The claim of `key` stopped waiting for its session.
    pub(super) fn give_up(&mut self, now: Instant, key: (String, u64)) {
        self.gave_up
            .retain(|_, since| now.duration_since(*since) < LATE_TRANSFER_WINDOW);
        self.gave_up.insert(key, now);
    }

    /// The clean-start claim of `key` ended the session another node held.
    pub(super) fn end(&mut self, now: Instant, key: (String, u64)) {
        self.ended
            .retain(|_, since| now.duration_since(*since) < LATE_TRANSFER_WINDOW);
        self.ended.insert(key, now);
    }
}

pub(super) type SharedTransfers = Arc<Mutex<Transfers>>;

pub(super) fn lock(transfers: &SharedTransfers) -> std::sync::MutexGuard<'_, Transfers> {
    transfers.lock().unwrap_or_else(PoisonError::into_inner)
}
