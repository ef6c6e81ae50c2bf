//! openraft's state machine: the `ClusterState` in memory, snapshots persisted in redb.
//!
//! `apply` does not write to disk: on start-up the state is rebuilt from the last snapshot and
//! openraft re-applies the committed log after it (the log store keeps the committed id). The
//! applied changes are published to the change feeds under the same lock that guards the
//! state, so a feed subscriber's snapshot and its first event line up exactly.

// openraft's StorageError (224 bytes) and redb's errors (160) are fixed by their traits and
// travel only on cold failure paths.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::command::Response;
use crate::consumption::Consumption;
use crate::raft_db::{read_meta, storage_error, write_meta, RaftDb, KEY_SNAPSHOT};
use crate::raft_types::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::state::ClusterState;
use crate::types::{Applied, Change};

/// A snapshot as stored in `raft.redb`.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// What the state machine and the coordinator's readers share.
pub(crate) struct Applier {
    pub(crate) state: ClusterState,
    pub(crate) last_applied: Option<LogId>,
    pub(crate) last_membership: StoredMembership,
    /// Change feed subscribers; one that is full or gone is dropped (it resubscribes).
    feeds: Vec<mpsc::Sender<Applied>>,
    /// How many raft entries were applied since start (metrics, batching tests).
    pub(crate) entries_applied: u64,
    /// Snapshots received from a leader and installed since start.
    pub(crate) snapshots_installed: u64,
    /// What the app has taken from the feeds.
    pub(crate) consumption: Consumption,
}

impl Applier {
    /// Adds a change feed; the caller reads the state under the same lock.
    pub(crate) fn add_feed(&mut self, feed: mpsc::Sender<Applied>) {
        self.feeds.push(feed);
    }

    fn publish(&mut self, applied: Applied) {
        if !self.feeds.is_empty() {
            self.consumption.published(applied.index);
        }
        self.feeds
            .retain(|feed| feed.try_send(applied.clone()).is_ok());
    }
}

/// The shared handle to the applied state.
pub(crate) type SharedApplier = Arc<Mutex<Applier>>;

/// Locks the applied state; a panic elsewhere while holding it does not poison our readers.
pub(crate) fn lock(applier: &SharedApplier) -> MutexGuard<'_, Applier> {
    applier
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The raft state machine on redb.
#[derive(Clone)]
pub(crate) struct StateMachineStore {
    db: Arc<RaftDb>,
    applier: SharedApplier,
    snapshot_counter: Arc<AtomicU64>,
}

impl StateMachineStore {
    /// Opens the state machine, restoring the last stored snapshot.
    pub(crate) fn open(db: Arc<RaftDb>, retained_cap_bytes: u64) -> Result<Self, StorageError> {
        let mut applier = Applier {
            state: ClusterState::new(retained_cap_bytes),
            last_applied: None,
            last_membership: StoredMembership::default(),
            feeds: Vec::new(),
            entries_applied: 0,
            snapshots_installed: 0,
            consumption: Consumption::default(),
        };
        if let Some(stored) =
            read_meta::<StoredSnapshot>(&db, KEY_SNAPSHOT, ErrorSubject::Snapshot(None))?
        {
            restore(&mut applier, &stored)?;
        }
        Ok(Self {
            db,
            applier: Arc::new(Mutex::new(applier)),
            snapshot_counter: Arc::new(AtomicU64::new(0)),
        })
    }

    pub(crate) fn applier(&self) -> SharedApplier {
        self.applier.clone()
    }

    fn current_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        read_meta(&self.db, KEY_SNAPSHOT, ErrorSubject::Snapshot(None))
    }
}

fn restore(applier: &mut Applier, stored: &StoredSnapshot) -> Result<(), StorageError> {
    let state = ClusterState::from_snapshot(&stored.data).map_err(|e| {
        storage_error(
            ErrorSubject::Snapshot(Some(stored.meta.signature())),
            ErrorVerb::Read,
            e,
        )
    })?;
    applier.state.replace_data(state);
    applier.last_applied = stored.meta.last_log_id;
    applier.last_membership = stored.meta.last_membership.clone();
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_log_id, last_membership) = {
            let applier = lock(&self.applier);
            let data = applier
                .state
                .to_snapshot()
                .map_err(|e| storage_error(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            (data, applier.last_applied, applier.last_membership.clone())
        };
        let counter = self.snapshot_counter.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_log_id {
            Some(id) => format!("{}-{}-{counter}", id.leader_id, id.index),
            None => format!("--{counter}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        write_meta(
            &self.db,
            KEY_SNAPSHOT,
            &stored,
            ErrorSubject::Snapshot(Some(meta.signature())),
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applier = lock(&self.applier);
        Ok((applier.last_applied, applier.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applier = lock(&self.applier);
        let mut responses = Vec::new();
        for entry in entries {
            applier.last_applied = Some(entry.log_id);
            applier.entries_applied += 1;
            let index = entry.log_id.index;
            let mut changes: Vec<Change> = Vec::new();
            let response = match entry.payload {
                EntryPayload::Blank => Response::Nothing,
                EntryPayload::Membership(membership) => {
                    applier.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    Response::Nothing
                }
                EntryPayload::Normal(command) => applier.state.apply(index, &command, &mut changes),
            };
            // Every entry, with changes or not: the app's route version follows the applied
            // index exactly, so that a peer routed at any index is reached here too.
            applier.publish(Applied { index, changes });
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        {
            let mut applier = lock(&self.applier);
            restore(&mut applier, &stored)?;
            applier.snapshots_installed += 1;
            // The feed cannot express "state replaced": subscribers resubscribe and resync.
            applier.feeds.clear();
        }
        write_meta(
            &self.db,
            KEY_SNAPSHOT,
            &stored,
            ErrorSubject::Snapshot(Some(meta.signature())),
        )
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.current_snapshot()?.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

#[cfg(test)]
#[path = "storage_suite_tests.rs"]
mod storage_suite_tests;
