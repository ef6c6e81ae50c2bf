//! The durable half of forwarding publishes to other nodes of a cluster.
//!
//! Sending side: a QoS 1/2 publish bound for another node gets the next sequence number of
//! that node's outbox and is put in the store in the same batch as the local subscribers'
//! queue writes, so the commit that lets its PUBACK out also holds the copy for every other
//! node. The copy leaves as [`Output::Forward`] with that number; it is removed when the node
//! acknowledges it ([`Broker::forwards_acked`]), and read back ([`Broker::read_forwards`])
//! after a restart, or when the link could not take it.
//!
//! Receiving side: the sender's (incarnation, sequence number) of the newest forward stored
//! here is kept per sending node and written with the batch that stored the forward's
//! deliveries, so a forward replayed after a crash on either side is recognised and dropped
//! ([`Broker::handle_forward`]).
//!
//! [`Output::Forward`]: crate::Output::Forward

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::broker::Broker;
use crate::message::{Message, NodeId, OpenExchange};
use crate::store::{LoadedOutbox, PeerMark, StoredForward};

/// Per-destination outbox positions and per-origin duplicate filters.
#[derive(Debug, Default)]
pub(crate) struct ForwardOutboxes {
    /// Per destination: the next sequence number, and the highest one acknowledged.
    lanes: BTreeMap<NodeId, Lane>,
    /// Sequence numbers start above this (see [`Broker::set_forward_seq_floor`]).
    floor: u64,
    /// Per origin: the newest forward stored from it.
    marks: BTreeMap<NodeId, PeerMark>,
    /// Marks changed since the last commit, written just before it.
    dirty_marks: Vec<NodeId>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Lane {
    next_seq: u64,
    acked_through: u64,
    /// The highest sequence number stored (0: none).
    last_seq: u64,
}

impl ForwardOutboxes {
    pub(crate) fn restore(
        outboxes: BTreeMap<NodeId, LoadedOutbox>,
        marks: Vec<PeerMark>,
    ) -> ForwardOutboxes {
        let lanes = outboxes
            .into_iter()
            .map(|(dest, loaded)| {
                let lane = Lane {
                    next_seq: loaded.last_seq.max(loaded.acked_through).saturating_add(1),
                    acked_through: loaded.acked_through,
                    last_seq: loaded.last_seq,
                };
                (dest, lane)
            })
            .collect();
        ForwardOutboxes {
            lanes,
            floor: 0,
            marks: marks.into_iter().map(|mark| (mark.origin, mark)).collect(),
            dirty_marks: Vec::new(),
        }
    }

    /// The sequence number for the next forward to `dest`.
    pub(crate) fn next_seq(&mut self, dest: NodeId) -> u64 {
        let floor = self.floor;
        let lane = self.lanes.entry(dest).or_default();
        let seq = lane.next_seq.max(floor.saturating_add(1));
        lane.next_seq = seq.saturating_add(1);
        lane.last_seq = seq;
        seq
    }

    /// Whether a forward from `origin` is one already stored here.
    pub(crate) fn is_duplicate(&self, origin: NodeId, incarnation: u64, seq: u64) -> bool {
        self.marks
            .get(&origin)
            .is_some_and(|mark| mark.incarnation == incarnation && seq <= mark.seq)
    }

    pub(crate) fn note_received(&mut self, origin: NodeId, incarnation: u64, seq: u64) {
        self.marks.insert(
            origin,
            PeerMark {
                origin,
                incarnation,
                seq,
            },
        );
        if !self.dirty_marks.contains(&origin) {
            self.dirty_marks.push(origin);
        }
    }

    /// The marks to write before the next commit.
    pub(crate) fn take_dirty_marks(&mut self) -> Vec<PeerMark> {
        let dirty = std::mem::take(&mut self.dirty_marks);
        dirty
            .into_iter()
            .filter_map(|origin| self.marks.get(&origin).copied())
            .collect()
    }
}

/// A forward read back from an outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingForward {
    /// Its outbox sequence number.
    pub seq: u64,
    /// The message.
    pub message: Arc<Message>,
    /// Share groups the destination was picked to serve.
    pub groups: Vec<Arc<str>>,
    /// The route version it was routed at.
    pub routed_at: u64,
    /// The client id whose session alone gets it, for a moved session's message.
    pub for_session: Option<Arc<str>>,
    /// With `for_session`, the QoS 2 exchange of it the old owner had open with the client.
    pub exchange: Option<OpenExchange>,
}

impl Broker {
    /// Outbox sequence numbers from now on are above `floor` (and above what the store
    /// holds). The server passes the wall clock in microseconds, so that even a node whose
    /// store was lost while its cluster identity was kept never reuses a number a receiver
    /// has seen.
    pub fn set_forward_seq_floor(&mut self, floor: u64) {
        self.outboxes.floor = floor;
    }

    /// Destinations whose outbox holds forwards not yet acknowledged, with the highest
    /// sequence number acknowledged: the server sends what follows it when it starts.
    pub fn outbox_backlogs(&self) -> Vec<(NodeId, u64)> {
        self.outboxes
            .lanes
            .iter()
            .filter(|(_, lane)| lane.last_seq > lane.acked_through)
            .map(|(dest, lane)| (*dest, lane.acked_through))
            .collect()
    }

    /// `dest` has stored every forward up to `through`: they leave the outbox.
    pub fn forwards_acked(&mut self, dest: NodeId, through: u64) {
        let lane = self.outboxes.lanes.entry(dest).or_default();
        if through <= lane.acked_through {
            return;
        }
        lane.acked_through = through;
        if let Some(journal) = self.out.journal.as_mut() {
            journal.store.ack_forwards(dest, through);
        }
    }

    /// Up to `limit` forwards for `dest` after sequence number `after`, from the store, in
    /// order. `None` if the read failed (counted in `store_read_failures`): the forwards stay
    /// stored and the server asks again later.
    pub fn read_forwards(
        &mut self,
        dest: NodeId,
        after: u64,
        limit: usize,
    ) -> Option<Vec<PendingForward>> {
        let Some(journal) = self.out.journal.as_mut() else {
            return Some(Vec::new());
        };
        match journal.store.read_forwards(dest, after, limit) {
            Ok(stored) => Some(
                stored
                    .into_iter()
                    .map(|(seq, forward)| PendingForward {
                        seq,
                        message: Arc::new(journal.clock.message(forward.message)),
                        groups: forward.groups.into_iter().map(Arc::from).collect(),
                        routed_at: forward.routed_at,
                        for_session: forward.for_session.map(Arc::from),
                        exchange: forward.exchange,
                    })
                    .collect(),
            ),
            Err(_) => {
                self.out.stats.store_read_failures += 1;
                None
            }
        }
    }

    /// Gives a QoS 1/2 forward to `dest` its outbox sequence number and stores it, with
    /// the current route version.
    pub(crate) fn store_forward(
        &mut self,
        dest: NodeId,
        message: &Message,
        groups: &[Arc<str>],
        for_session: Option<&str>,
        exchange: Option<OpenExchange>,
    ) -> u64 {
        let seq = self.outboxes.next_seq(dest);
        if let Some(journal) = self.out.journal.as_mut() {
            let forward = StoredForward {
                message: journal.clock.stored_message(message),
                groups: groups.iter().map(|group| group.to_string()).collect(),
                routed_at: self.route_version,
                for_session: for_session.map(str::to_owned),
                exchange,
            };
            journal.store.put_forward(dest, seq, &forward);
        }
        seq
    }

    /// Writes the duplicate filters changed since the last commit.
    pub(crate) fn write_peer_marks(&mut self) {
        let marks = self.outboxes.take_dirty_marks();
        if let Some(journal) = self.out.journal.as_mut() {
            for mark in &marks {
                journal.store.put_peer_mark(mark);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_continue_above_what_was_stored_and_acknowledged() {
        let mut outboxes = ForwardOutboxes::restore(
            BTreeMap::from([
                (
                    2,
                    LoadedOutbox {
                        acked_through: 40,
                        last_seq: 0,
                        pending: 0,
                    },
                ),
                (
                    3,
                    LoadedOutbox {
                        acked_through: 5,
                        last_seq: 9,
                        pending: 4,
                    },
                ),
            ]),
            Vec::new(),
        );
        assert_eq!(outboxes.next_seq(2), 41);
        assert_eq!(outboxes.next_seq(3), 10);
        assert_eq!(outboxes.next_seq(4), 1, "no record, no floor");
        outboxes.floor = 1_000;
        assert_eq!(outboxes.next_seq(4), 1_001);
        assert_eq!(outboxes.next_seq(4), 1_002);
    }

    #[test]
    fn a_forward_is_a_duplicate_only_under_the_same_incarnation() {
        let mut outboxes = ForwardOutboxes::default();
        outboxes.note_received(1, 7, 100);
        assert!(outboxes.is_duplicate(1, 7, 100));
        assert!(outboxes.is_duplicate(1, 7, 3));
        assert!(!outboxes.is_duplicate(1, 7, 101));
        assert!(!outboxes.is_duplicate(1, 8, 3), "a node that lost its disk");
        assert!(!outboxes.is_duplicate(2, 7, 3));
        assert_eq!(outboxes.take_dirty_marks().len(), 1);
        assert!(outboxes.take_dirty_marks().is_empty());
    }
}
