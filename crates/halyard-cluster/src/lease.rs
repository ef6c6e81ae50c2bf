//! The ownership lease: whether this node may still serve the sessions it owns.
//!
//! A node holds the lease while it has recently heard from a quorum: as a leader, while a
//! majority of voters (itself included) acknowledged an AppendEntries it *sent* less than
//! `lease` ago; as a follower, while it *received*, less than `lease` ago, an AppendEntries it
//! accepted that showed it every entry the leader had committed at the time (its
//! `leader_commit` is within the entries it carries). Without the lease the node fences
//! itself: it drops its clients and refuses claims until it has the lease again.
//!
//! # Why a fenced node never serves a session the majority gave away
//!
//! Let a claim of client `c` by node N commit at time `t_c` while node F still serves `c`.
//! N serves `c` only after the old owner handed the session over, which F does only after it
//! applied the claim (and then it has closed its connection first), or after N waited the
//! takeover timeout `T` from when it saw the commit, so not before `t_c + T`.
//!
//! - F is a follower. Every AppendEntries a leader sends after `t_c` carries a
//!   `leader_commit` at or past the claim, so one that F accepts with a `leader_commit`
//!   within its entries makes F commit the claim, apply it and close `c`. The last
//!   AppendEntries that extended F's lease without that was therefore sent before `t_c` and
//!   received before `t_c + d`, `d` the one-way delay of the cluster link. F's lease ends
//!   before `t_c + d + lease`.
//! - F is the leader. Its lease rests on acknowledgements of requests sent at `t_s`; a
//!   voter that acknowledged one does not vote for another leader until an election
//!   timeout after it, so a claim committed by another leader has `t_c > t_s + e_min` and
//!   F's lease ends at `t_s + lease < t_c`. A claim F commits itself, F applies.
//!
//! So with `lease + d + r < T`, `r` the drift between the nodes' monotonic clocks over `T`
//! plus the time F takes to apply a committed entry and act on its lease, F has closed `c`
//! before N serves it. Halyard takes `T` = 2 s and checks `lease <= T - 500 ms` at start-up,
//! leaving at least 500 ms for `d + r` on a working network. The argument needs a leader
//! that talks to the quorum it leads: a stale leader cut off together with some followers
//! (possible from five voters on) would keep those followers leased; with three voters the
//! minority is a single node and cannot hold that.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::types::NodeId;

/// Contact with the quorum as seen from this node.
#[derive(Debug)]
pub(crate) struct Lease {
    duration: Duration,
    voters: usize,
    contact: Mutex<Contact>,
}

#[derive(Debug, Default)]
struct Contact {
    /// Per peer: when this node sent the latest AppendEntries the peer accepted.
    acked_sends: BTreeMap<NodeId, Instant>,
    /// When this node received the latest AppendEntries that brought it up to the
    /// leader's commit.
    leader_contact: Option<Instant>,
}

impl Lease {
    pub(crate) fn new(duration: Duration, voters: usize) -> Self {
        Self {
            duration,
            voters,
            contact: Mutex::new(Contact::default()),
        }
    }

    fn contact(&self) -> std::sync::MutexGuard<'_, Contact> {
        self.contact
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `peer` accepted an AppendEntries this node sent at `sent`.
    pub(crate) fn acked(&self, peer: NodeId, sent: Instant) {
        let mut contact = self.contact();
        let latest = contact.acked_sends.entry(peer).or_insert(sent);
        *latest = (*latest).max(sent);
    }

    /// This node accepted, received at `received`, an AppendEntries that brought it up to
    /// its leader's commit.
    pub(crate) fn heard_leader(&self, received: Instant) {
        let mut contact = self.contact();
        contact.leader_contact = Some(
            contact
                .leader_contact
                .map_or(received, |at| at.max(received)),
        );
    }

    /// Per peer, when this node sent the latest AppendEntries that the peer accepted.
    pub(crate) fn acked_sends(&self) -> BTreeMap<NodeId, Instant> {
        self.contact().acked_sends.clone()
    }

    /// Whether this node holds the lease at `now`. Both kinds of evidence stay valid
    /// whatever the node's role is now (a candidate still heard its leader at that time),
    /// so the role is not asked.
    pub(crate) fn held(&self, now: Instant) -> bool {
        let contact = self.contact();
        // This node counts as one voter, heard from now.
        let mut sends: Vec<Instant> = contact.acked_sends.values().copied().collect();
        sends.push(now);
        sends.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_send = sends.get(self.voters / 2).copied();
        let recent = |since: Instant| now.saturating_duration_since(since) < self.duration;
        quorum_send.is_some_and(recent) || contact.leader_contact.is_some_and(recent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(1500);

    #[test]
    fn a_leader_holds_the_lease_while_a_majority_acked_a_recent_send() {
        let lease = Lease::new(LEASE, 3);
        let start = Instant::now();
        assert!(!lease.held(start), "no ack yet");
        lease.acked(2, start);
        assert!(lease.held(start + Duration::from_millis(1400)));
        assert!(!lease.held(start + LEASE));
        lease.acked(3, start + Duration::from_secs(1));
        assert!(
            lease.held(start + Duration::from_secs(2)),
            "node 3's later ack counts"
        );
    }

    #[test]
    fn five_voters_need_two_acks() {
        let lease = Lease::new(LEASE, 5);
        let start = Instant::now();
        lease.acked(2, start);
        assert!(!lease.held(start));
        lease.acked(3, start);
        assert!(lease.held(start));
    }

    #[test]
    fn a_follower_holds_it_after_hearing_the_leader() {
        let lease = Lease::new(LEASE, 3);
        let start = Instant::now();
        assert!(!lease.held(start));
        lease.heard_leader(start);
        assert!(lease.held(start + Duration::from_millis(100)));
        assert!(!lease.held(start + LEASE));
        lease.heard_leader(start - Duration::from_secs(1));
        assert!(
            lease.held(start + Duration::from_millis(100)),
            "an older stamp never moves the contact back"
        );
    }
}
