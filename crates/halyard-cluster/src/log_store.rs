//! openraft's log storage (vote, entries, committed id, purge and truncate) on redb.

// openraft's StorageError (224 bytes) and redb's errors (160) are fixed by their traits and
// travel only on cold failure paths.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use redb::ReadableTable;

use crate::raft_db::{
    read_meta, storage_error, write_meta, RaftDb, KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, LOGS,
};
use crate::raft_types::{Entry, LogId, StorageError, TypeConfig};

/// The raft log in `raft.redb`; clones share the file.
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<RaftDb>,
    /// The last committed index this node saved, for status and metrics (0 = none).
    committed_index: Arc<AtomicU64>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<RaftDb>) -> Self {
        Self {
            db,
            committed_index: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The committed index as last saved by openraft.
    pub(crate) fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed_index.clone()
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let read = |e: redb::Error| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e);
        let txn = self.db.begin_read().map_err(|e| read(e.into()))?;
        let table = txn.open_table(LOGS).map_err(|e| read(e.into()))?;
        let Some((_, value)) = table.last().map_err(|e| read(e.into()))? else {
            return Ok(None);
        };
        let entry = decode_entry(value.value())?;
        Ok(Some(entry.log_id))
    }

    /// Deletes the entries with index in `range`.
    fn delete_range(&self, range: impl RangeBounds<u64>) -> Result<(), StorageError> {
        let write = |e: redb::Error| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e);
        let txn = self.db.begin_write().map_err(|e| write(e.into()))?;
        {
            let mut table = txn.open_table(LOGS).map_err(|e| write(e.into()))?;
            table
                .retain_in(range, |_, _| false)
                .map_err(|e| write(e.into()))?;
        }
        txn.commit().map_err(|e| write(e.into()))
    }
}

fn decode_entry(bytes: &[u8]) -> Result<Entry, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let read = |e: redb::Error| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e);
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let txn = self.db.begin_read().map_err(|e| read(e.into()))?;
        let table = txn.open_table(LOGS).map_err(|e| read(e.into()))?;
        let mut entries = Vec::new();
        for item in table
            .range::<u64>((start, end))
            .map_err(|e| read(e.into()))?
        {
            let (_, value) = item.map_err(|e| read(e.into()))?;
            entries.push(decode_entry(value.value())?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> =
            read_meta(&self.db, KEY_LAST_PURGED, ErrorSubject::Store)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        write_meta(&self.db, KEY_VOTE, vote, ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        read_meta(&self.db, KEY_VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        write_meta(&self.db, KEY_COMMITTED, &committed, ErrorSubject::Store)?;
        self.committed_index
            .store(committed.map_or(0, |id| id.index), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> =
            read_meta(&self.db, KEY_COMMITTED, ErrorSubject::Store)?;
        let committed = committed.flatten();
        self.committed_index
            .store(committed.map_or(0, |id| id.index), Ordering::Relaxed);
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = |e: redb::Error| storage_error(ErrorSubject::Logs, ErrorVerb::Write, e);
        let txn = self.db.begin_write().map_err(|e| write(e.into()))?;
        {
            let mut table = txn.open_table(LOGS).map_err(|e| write(e.into()))?;
            for entry in entries {
                let bytes = postcard::to_stdvec(&entry)
                    .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, e))?;
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(|e| write(e.into()))?;
            }
        }
        txn.commit().map_err(|e| write(e.into()))?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.delete_range((Bound::Included(log_id.index), Bound::Unbounded))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        write_meta(&self.db, KEY_LAST_PURGED, &log_id, ErrorSubject::Store)?;
        self.delete_range(..=log_id.index)
    }
}
