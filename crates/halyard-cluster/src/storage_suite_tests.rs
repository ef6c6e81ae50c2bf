//! openraft's own storage test suite against the redb log store and state machine.

// openraft's StorageError (224 bytes) and redb's errors (160) are fixed by their traits and
// travel only on cold failure paths.
#![allow(clippy::result_large_err)]

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use crate::log_store::LogStore;
use crate::raft_types::{StorageError, TypeConfig};
use crate::state_machine::StateMachineStore;

struct RedbStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::raft_db::open(dir.path(), false).expect("open raft.redb");
        let log_store = LogStore::new(db.clone());
        let state_machine = StateMachineStore::open(db, 1 << 20)?;
        Ok((dir, log_store, state_machine))
    }
}

#[test]
fn openraft_storage_suite_passes_on_redb() -> Result<(), StorageError> {
    Suite::test_all(RedbStoreBuilder)
}
