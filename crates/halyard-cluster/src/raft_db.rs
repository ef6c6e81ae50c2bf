//! The `raft.redb` file: raft log, vote, committed id, snapshot and the node identity.

// openraft's StorageError (224 bytes) and redb's errors (160) are fixed by their traits and
// travel only on cold failure paths.
#![allow(clippy::result_large_err)]

use std::path::Path;
use std::sync::Arc;

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};
use redb::{Database, Durability, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::raft_types::StorageError;

/// Log entries by index, postcard-encoded.
pub(crate) const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Single values by name (see the `KEY_*` constants), postcard-encoded.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

pub(crate) const KEY_VOTE: &str = "vote";
pub(crate) const KEY_COMMITTED: &str = "committed";
pub(crate) const KEY_LAST_PURGED: &str = "last_purged";
pub(crate) const KEY_SNAPSHOT: &str = "snapshot";
pub(crate) const KEY_IDENTITY: &str = "identity";
pub(crate) const KEY_INCARNATION_SINCE: &str = "incarnation_since_ms";

/// The file name inside the data directory.
pub const RAFT_FILE: &str = "raft.redb";

/// The open `raft.redb` and how its commits reach the disk.
pub(crate) struct RaftDb {
    db: Database,
    /// `Immediate` (fsync per commit, what raft's safety assumes) unless tests turn it off.
    durability: Durability,
}

impl RaftDb {
    pub(crate) fn begin_write(&self) -> Result<WriteTransaction, redb::TransactionError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(self.durability);
        Ok(txn)
    }

    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        self.db.begin_read()
    }
}

/// Opens (or creates) `raft.redb` in `data_dir` with both tables present; `fsync = false`
/// skips the fsync per commit (tests only: a crash may then lose a vote or entries).
pub(crate) fn open(data_dir: &Path, fsync: bool) -> Result<Arc<RaftDb>, redb::Error> {
    std::fs::create_dir_all(data_dir).map_err(redb::StorageError::Io)?;
    let db = RaftDb {
        db: Database::create(data_dir.join(RAFT_FILE))?,
        durability: if fsync {
            Durability::Immediate
        } else {
            Durability::Eventual
        },
    };
    let txn = db.begin_write()?;
    txn.open_table(LOGS)?;
    txn.open_table(META)?;
    txn.commit()?;
    Ok(Arc::new(db))
}

/// Wraps any storage failure as openraft's storage error.
pub(crate) fn storage_error(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    error: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&error)).into()
}

/// Reads one META value.
pub(crate) fn read_meta<T: DeserializeOwned>(
    db: &RaftDb,
    key: &str,
    subject: ErrorSubject<u64>,
) -> Result<Option<T>, StorageError> {
    let read = |e: redb::Error| storage_error(subject.clone(), ErrorVerb::Read, e);
    let txn = db.begin_read().map_err(|e| read(e.into()))?;
    let table = txn.open_table(META).map_err(|e| read(e.into()))?;
    let Some(value) = table.get(key).map_err(|e| read(e.into()))? else {
        return Ok(None);
    };
    postcard::from_bytes(value.value())
        .map(Some)
        .map_err(|e| storage_error(subject.clone(), ErrorVerb::Read, e))
}

/// Writes one META value durably.
pub(crate) fn write_meta<T: Serialize>(
    db: &RaftDb,
    key: &str,
    value: &T,
    subject: ErrorSubject<u64>,
) -> Result<(), StorageError> {
    let write = |e: redb::Error| storage_error(subject.clone(), ErrorVerb::Write, e);
    let bytes = postcard::to_stdvec(value)
        .map_err(|e| storage_error(subject.clone(), ErrorVerb::Write, e))?;
    let txn = db.begin_write().map_err(|e| write(e.into()))?;
    {
        let mut table = txn.open_table(META).map_err(|e| write(e.into()))?;
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| write(e.into()))?;
    }
    txn.commit().map_err(|e| write(e.into()))
}
