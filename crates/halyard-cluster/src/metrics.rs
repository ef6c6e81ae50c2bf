//! Counters of the cluster, shared by its tasks; read as a [`Metrics`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Monotonic counters (and the link's queued gauge), updated lock-free.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) leader_changes: AtomicU64,
    pub(crate) claims_committed: AtomicU64,
    pub(crate) claims_refused: AtomicU64,
    pub(crate) entries_proposed: AtomicU64,
    pub(crate) commands_proposed: AtomicU64,
    pub(crate) bad_frames: AtomicU64,
    pub(crate) rejected_peers: AtomicU64,
    pub(crate) link_forwarded: AtomicU64,
    pub(crate) link_queued: AtomicU64,
    pub(crate) link_dropped: AtomicU64,
    pub(crate) link_resent: AtomicU64,
    pub(crate) link_duplicates: AtomicU64,
    pub(crate) link_delivered: AtomicU64,
    pub(crate) unreachable_peers_skipped: AtomicU64,
    /// Why a peer fenced this node (its id is a member under another incarnation), until
    /// the membership records this node's incarnation (an operator removed and re-added it).
    pub(crate) fenced: Mutex<Option<String>>,
}

impl Counters {
    /// A peer refused this node as a stale incarnation of its id: logged once, kept for the
    /// status (`/readyz` says why the node never joins).
    pub(crate) fn note_fenced(&self, reason: &str) {
        let mut fenced = self.fenced.lock().unwrap_or_else(PoisonError::into_inner);
        if fenced.is_none() {
            *fenced = Some(reason.to_owned());
            tracing::error!(
                reason,
                "cluster: this node is fenced and cannot join: a peer knows its node id under another incarnation"
            );
        }
    }

    /// Why this node is fenced, if it is.
    pub(crate) fn fenced(&self) -> Option<String> {
        self.fenced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The membership records this node's incarnation: it is not fenced (any more).
    pub(crate) fn clear_fenced(&self) {
        *self.fenced.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A point-in-time copy of the cluster's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    pub current_term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Leader changes seen by this node since start.
    pub leader_changes: u64,
    pub claims_committed: u64,
    /// Claims answered with a conflict (CAS failed).
    pub claims_refused: u64,
    /// Raft entries this node proposed (each may hold a batch of commands).
    pub entries_proposed: u64,
    /// Commands this node proposed.
    pub commands_proposed: u64,
    /// Bytes (topic + payload) of the retained messages, against the cap.
    pub retained_bytes: u64,
    /// Raft entries applied on this node since start.
    pub entries_applied: u64,
    /// Snapshots installed from a leader since start (this node was behind its purged log).
    pub snapshots_installed: u64,
    /// Frames from peers that did not decode (their connection was closed).
    pub bad_frames: u64,
    /// Peer connections refused (unknown node or wrong incarnation).
    pub rejected_peers: u64,
    /// Peer link: frames written to a peer (first sends and re-sends).
    pub link_forwarded: u64,
    /// Peer link: frames waiting for an ack, all peers.
    pub link_queued: u64,
    /// Peer link: sends refused with `QueueFull`.
    pub link_dropped: u64,
    /// Peer link: frames sent again after a reconnect.
    pub link_resent: u64,
    /// Peer link: received duplicates dropped.
    pub link_duplicates: u64,
    /// Peer link: received frames handed to the app.
    pub link_delivered: u64,
    /// Voters skipped by `wait_applied_everywhere` because they were out of contact for
    /// longer than their lease plus a margin (one per skipped voter per wait).
    pub unreachable_peers_skipped: u64,
}

impl Counters {
    /// The counters as a [`Metrics`]; raft figures are filled in by the caller.
    pub(crate) fn snapshot(&self) -> Metrics {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Metrics {
            leader_changes: get(&self.leader_changes),
            claims_committed: get(&self.claims_committed),
            claims_refused: get(&self.claims_refused),
            entries_proposed: get(&self.entries_proposed),
            commands_proposed: get(&self.commands_proposed),
            bad_frames: get(&self.bad_frames),
            rejected_peers: get(&self.rejected_peers),
            link_forwarded: get(&self.link_forwarded),
            link_queued: get(&self.link_queued),
            link_dropped: get(&self.link_dropped),
            link_resent: get(&self.link_resent),
            link_duplicates: get(&self.link_duplicates),
            link_delivered: get(&self.link_delivered),
            unreachable_peers_skipped: get(&self.unreachable_peers_skipped),
            ..Metrics::default()
        }
    }
}
