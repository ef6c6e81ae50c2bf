//! This node's claims as the driver follows them, to find the one that committed in raft
//! after this node had refused its connection.
//!
//! A claim whose raft answer never came back (a timeout, a leader lost in a partition) is
//! refused here with CONNACK 0x88, yet its entry may still commit. Raft then names this
//! node the owner: other nodes route the client's messages here, and its previous owner
//! hands the session over here. Such an orphaned claim must still find a session, or all
//! of that is dropped (halyard-sim seeds 11, 167, 197, 227, 281 --no-kills). The driver
//! asks [`OwnClaims`] whether each claim of this node that raft applies is one of that kind.

use std::collections::HashMap;

use crate::cluster::event::OwnClaim;

/// Claims of this node in flight and answered, per client id.
#[derive(Debug, Default)]
pub(crate) struct OwnClaims {
    /// Claim tasks not yet answered.
    in_flight: HashMap<String, u32>,
    /// The newest epoch granted here, until raft's apply of it is seen.
    granted: HashMap<String, u64>,
    /// The newest claim of this node applied while a claim task of the client was still
    /// out: it may be that task's own, or an orphan; its answer tells.
    undecided: HashMap<String, OwnClaim>,
}

impl OwnClaims {
    /// A claim task for `client_id` started.
    pub(crate) fn started(&mut self, client_id: &str) {
        *self.in_flight.entry(client_id.to_owned()).or_default() += 1;
    }

    /// A claim task for `client_id` answered (`granted`: its epoch, if granted). Returns the
    /// epoch of an orphaned claim it leaves behind: an applied claim of this node that no
    /// task has answered for once none is out any more.
    pub(crate) fn settled(&mut self, client_id: &str, granted: Option<u64>) -> Option<OwnClaim> {
        if let Some(count) = self.in_flight.get_mut(client_id) {
            *count -= 1;
            if *count == 0 {
                self.in_flight.remove(client_id);
            }
        }
        if let Some(epoch) = granted {
            let newest = self.granted.entry(client_id.to_owned()).or_default();
            *newest = (*newest).max(epoch);
        }
        let undecided = self.undecided.get(client_id).copied()?;
        if granted.is_some_and(|epoch| epoch >= undecided.epoch) {
            self.undecided.remove(client_id);
            return None;
        }
        if self.in_flight.contains_key(client_id) {
            return None;
        }
        self.undecided.remove(client_id);
        Some(undecided)
    }

    /// Whether a claim task for `client_id` is out.
    pub(crate) fn in_flight(&self, client_id: &str) -> bool {
        self.in_flight.contains_key(client_id)
    }

    /// Raft applied this node's `claim` of `client_id`. True when it is orphaned now: no
    /// task of this node answered for it, and none is out that might.
    pub(crate) fn applied(&mut self, client_id: &str, claim: OwnClaim) -> bool {
        let epoch = claim.epoch;
        if let Some(&granted) = self.granted.get(client_id) {
            if granted >= epoch {
                if granted == epoch {
                    self.granted.remove(client_id);
                }
                return false;
            }
        }
        if self.in_flight.contains_key(client_id) {
            let undecided = self.undecided.entry(client_id.to_owned()).or_insert(claim);
            if claim.epoch > undecided.epoch {
                *undecided = claim;
            }
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(epoch: u64) -> OwnClaim {
        OwnClaim {
            epoch,
            expiry_secs: 60,
            claimed_ms: 1,
            previous_elsewhere: false,
        }
    }

    #[test]
    fn a_claim_applied_after_its_grant_was_answered_is_not_orphaned() {
        let mut claims = OwnClaims::default();
        claims.started("c");
        assert_eq!(claims.settled("c", Some(7)), None);
        assert!(!claims.applied("c", claim(7)));
        assert!(
            claims.applied("c", claim(9)),
            "a later one no task answered for"
        );
    }

    #[test]
    fn a_claim_applied_before_its_grant_is_answered_is_not_orphaned() {
        let mut claims = OwnClaims::default();
        claims.started("c");
        assert!(!claims.applied("c", claim(7)));
        assert_eq!(claims.settled("c", Some(7)), None);
    }

    #[test]
    fn a_claim_applied_with_nothing_out_is_orphaned_at_once() {
        let mut claims = OwnClaims::default();
        claims.started("c");
        assert_eq!(
            claims.settled("c", None),
            None,
            "refused: nothing applied yet"
        );
        assert!(claims.applied("c", claim(7)));
    }

    #[test]
    fn a_claim_applied_while_its_refusal_is_on_the_way_is_orphaned_by_the_refusal() {
        let mut claims = OwnClaims::default();
        claims.started("c");
        claims.started("c");
        assert!(!claims.applied("c", claim(7)));
        assert_eq!(claims.settled("c", None), None, "another task is still out");
        assert_eq!(claims.settled("c", None), Some(claim(7)));
        assert_eq!(claims.settled("c", None), None, "told once");
    }

    #[test]
    fn a_newer_grant_here_supersedes_an_undecided_claim() {
        let mut claims = OwnClaims::default();
        claims.started("c");
        claims.started("c");
        assert!(!claims.applied("c", claim(7)));
        assert_eq!(claims.settled("c", Some(9)), None);
        assert_eq!(claims.settled("c", None), None);
    }
}
