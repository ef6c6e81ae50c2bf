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
    /// Sessions that came before their claim waited for them, or after it had its own (more
    /// than one node's claim, each overtaken, may pass a session on under the same claim),
    /// in the order they came.
    arrived: HashMap<(String, u64), Vec<SessionState>>,
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
    /// (a restarted node hands over the sessions that moved while it was down). One that
    /// comes after its claim got a session is merged into that one the same way.
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
    /// node's client connected again while its claim waited, the newest claim gets it; the
    /// older ones are superseded and stop waiting at once, so that what was routed here for
    /// them reaches the session now rather than after their timeout (see
    /// `waits_for_handover`; halyard-sim seed 83 --no-partitions lost such copies in a crash
    /// while they waited).
    pub(super) fn arrive(&mut self, key: (String, u64), state: Box<SessionState>) -> Arrival {
        let newest = self.newest_waiting(&key.0).filter(|&epoch| epoch >= key.1);
        let waiter = newest.and_then(|epoch| self.waiting.remove(&(key.0.clone(), epoch)));
        if let Some(waiter) = waiter {
            let _ = waiter.send(state);
            // Dropping their senders ends their waits, oldest first: in the map's order the
            // simulation's runs would differ.
            let mut older: Vec<(String, u64)> = self
                .waiting
                .keys()
                .filter(|(client_id, epoch)| *client_id == key.0 && Some(*epoch) < newest)
                .cloned()
                .collect();
            older.sort_unstable();
            for stale in older {
                self.waiting.remove(&stale);
            }
            return Arrival::Taken;
        }
        // Kept for the window, not used up by the first: more than one node may pass a
        // session on under one claim (halyard-sim seed 197 --no-kills: the second, with the
        // queue, was kept 4 s and merged after the run's end).
        if self.gave_up.contains_key(&key) {
            return Arrival::Late(state);
        }
        if self.ended.contains_key(&key) {
            return Arrival::Ended(state);
        }
        self.arrived.entry(key).or_default().push(*state);
        Arrival::Kept
    }

    /// The first session kept for the claim of `key`.
    pub(super) fn take_arrived(&mut self, key: &(String, u64)) -> Option<Box<SessionState>> {
        let kept = self.arrived.get_mut(key)?;
        let first = kept.remove(0);
        if kept.is_empty() {
            self.arrived.remove(key);
        }
        Some(Box::new(first))
    }

    /// Every session still kept for the claim of `key`.
    pub(super) fn take_all_arrived(&mut self, key: &(String, u64)) -> Vec<SessionState> {
        self.arrived.remove(key).unwrap_or_default()
    }

    /// The epoch of the newest claim of `client_id` waiting for a hand-over.
    pub(super) fn newest_waiting(&self, client_id: &str) -> Option<u64> {
        self.waiting
            .keys()
            .filter(|(waiting, _)| waiting == client_id)
            .map(|&(_, epoch)| epoch)
            .max()
    }

    /// The claim of `key` resumed the session it took and is settled: hand-overs for it
    /// from now on are late ones, and those kept meanwhile are returned to be merged.
    pub(super) fn resumed(&mut self, now: Instant, key: (String, u64)) -> Vec<SessionState> {
        let kept = self.take_all_arrived(&key);
        self.give_up(now, key);
        kept
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

#[cfg(test)]
mod tests {
    use super::*;

    fn session(client_id: &str, queued: usize) -> Box<SessionState> {
        Box::new(SessionState {
            client_id: client_id.to_owned(),
            epoch: 1,
            since: 0,
            expiry_interval: 3600,
            subscriptions: Vec::new(),
            inflight: Vec::new(),
            pending: Vec::new(),
            inbound_qos2: vec![0; queued],
            delayed_will: None,
            username: None,
        })
    }

    /// Two nodes' overtaken claims both pass the session on under the newest claim: the
    /// claim gets the first and the second is kept for a merge, never written over
    /// (halyard-sim seed 82 --no-partitions).
    #[test]
    fn a_second_session_for_one_claim_is_kept_beside_the_first() {
        let mut transfers = Transfers::default();
        let key = ("sub".to_owned(), 25);
        assert!(matches!(
            transfers.arrive(key.clone(), session("sub", 1)),
            Arrival::Kept
        ));
        assert!(matches!(
            transfers.arrive(key.clone(), session("sub", 2)),
            Arrival::Kept
        ));
        let first = transfers.take_arrived(&key).expect("the first");
        assert_eq!(first.inbound_qos2.len(), 1);
        let rest = transfers.take_all_arrived(&key);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].inbound_qos2.len(), 2);
        assert!(transfers.take_arrived(&key).is_none());

        // After the waiting claim took one, another for it is kept to be merged.
        let (sender, mut receiver) = oneshot::channel();
        transfers.waiting.insert(key.clone(), sender);
        assert!(matches!(
            transfers.arrive(key.clone(), session("sub", 3)),
            Arrival::Taken
        ));
        assert_eq!(receiver.try_recv().expect("taken").inbound_qos2.len(), 3);
        assert!(matches!(
            transfers.arrive(key.clone(), session("sub", 4)),
            Arrival::Kept
        ));
        assert_eq!(transfers.take_all_arrived(&key).len(), 1);
    }

    /// Once the claim that took a session is settled, what was kept for it meanwhile is
    /// merged, and a hand-over for it that comes later is a late one, merged at once.
    #[test]
    fn hand_overs_after_a_resumed_claim_are_late_ones() {
        let mut transfers = Transfers::default();
        let key = ("sub".to_owned(), 41);
        let (sender, _receiver) = oneshot::channel();
        transfers.waiting.insert(key.clone(), sender);
        assert!(matches!(
            transfers.arrive(key.clone(), session("sub", 1)),
            Arrival::Taken
        ));
        assert!(matches!(
            transfers.arrive(key.clone(), session("sub", 2)),
            Arrival::Kept
        ));
        let kept = transfers.resumed(Instant::now(), key.clone());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].inbound_qos2.len(), 2);
        assert!(matches!(
            transfers.arrive(key.clone(), session("sub", 3)),
            Arrival::Late(state) if state.inbound_qos2.len() == 3
        ));
        assert!(
            matches!(transfers.arrive(key, session("sub", 4)), Arrival::Late(_)),
            "every late one, not only the first"
        );
    }

    /// The client connected to this node twice while its first claim waited: the newest
    /// claim gets the session, and the older claim's wait ends then, not at its timeout.
    #[test]
    fn the_newest_claim_gets_the_session_and_the_older_stops_waiting() {
        let mut transfers = Transfers::default();
        let (older, mut older_waits) = oneshot::channel();
        let (newer, mut newer_waits) = oneshot::channel();
        let (other, mut other_waits) = oneshot::channel();
        transfers.waiting.insert(("sub".to_owned(), 23), older);
        transfers.waiting.insert(("sub".to_owned(), 24), newer);
        transfers
            .waiting
            .insert(("bystander".to_owned(), 20), other);
        assert!(matches!(
            transfers.arrive(("sub".to_owned(), 23), session("sub", 1)),
            Arrival::Taken
        ));
        assert!(newer_waits.try_recv().is_ok(), "the newest has it");
        assert_eq!(
            older_waits.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the older waits no more"
        );
        assert_eq!(
            other_waits.try_recv(),
            Err(oneshot::error::TryRecvError::Empty),
            "another client's claim still waits"
        );
    }
}
