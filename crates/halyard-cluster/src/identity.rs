//! The node identity kept in the data directory: node id and a random incarnation id.
//!
//! A node that comes back with an empty data directory gets a new incarnation, so its peers
//! never mistake it for its old self (whose vote and log it no longer has).

use openraft::ErrorSubject;
use serde::{Deserialize, Serialize};

use crate::error::ClusterError;
use crate::raft_db::{read_meta, write_meta, RaftDb, KEY_IDENTITY, KEY_INCARNATION_SINCE};
use crate::types::NodeId;

/// This node's identity as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: NodeId,
    pub incarnation: u64,
}

/// Loads the stored identity, or creates one with a fresh incarnation on first start.
/// A stored node id different from `node_id` is an error: the directory belongs to another node.
/// `entropy` (simulations only) replaces the OS's randomness for a new incarnation.
pub(crate) fn load_or_create(
    db: &RaftDb,
    node_id: NodeId,
    entropy: Option<u64>,
) -> Result<Identity, ClusterError> {
    match stored(db)? {
        Some(identity) if identity.node_id == node_id => Ok(identity),
        Some(identity) => Err(ClusterError::IdentityMismatch {
            stored: identity.node_id,
            configured: node_id,
        }),
        None => {
            let identity = Identity {
                node_id,
                incarnation: match entropy {
                    Some(seed) => seed.max(1),
                    None => random_incarnation()?,
                },
            };
            write_meta(db, KEY_IDENTITY, &identity, ErrorSubject::Store)
                .map_err(|e| ClusterError::Storage(e.to_string()))?;
            Ok(identity)
        }
    }
}

/// The identity stored in `db`, if any (none: the data directory is new or was emptied).
pub(crate) fn stored(db: &RaftDb) -> Result<Option<Identity>, ClusterError> {
    read_meta(db, KEY_IDENTITY, ErrorSubject::Store)
        .map_err(|e| ClusterError::Storage(e.to_string()))
}

/// When the incarnation began (see `Coordinator::incarnation_since_ms`): recorded at the
/// first call, as `now_ms` if the data directory was empty at this start, else as 0.
pub(crate) fn incarnation_since(
    db: &RaftDb,
    started_empty: bool,
    now_ms: u64,
) -> Result<u64, ClusterError> {
    let storage = |e: openraft::StorageError<NodeId>| ClusterError::Storage(e.to_string());
    if let Some(since) =
        read_meta(db, KEY_INCARNATION_SINCE, ErrorSubject::Store).map_err(storage)?
    {
        return Ok(since);
    }
    let since = if started_empty { now_ms } else { 0 };
    write_meta(db, KEY_INCARNATION_SINCE, &since, ErrorSubject::Store).map_err(storage)?;
    Ok(since)
}

/// A non-zero random id (0 means "not announced" in the membership).
fn random_incarnation() -> Result<u64, ClusterError> {
    loop {
        let mut bytes = [0u8; 8];
        getrandom::getrandom(&mut bytes).map_err(|e| ClusterError::Storage(e.to_string()))?;
        let incarnation = u64::from_le_bytes(bytes);
        if incarnation != 0 {
            return Ok(incarnation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_incarnation_start_is_recorded_once_and_is_0_for_an_older_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::raft_db::open(dir.path(), false).expect("open");
        assert_eq!(incarnation_since(&db, true, 500).expect("first"), 500);
        assert_eq!(incarnation_since(&db, false, 900).expect("later"), 500);
        let older = tempfile::tempdir().expect("tempdir");
        let db = crate::raft_db::open(older.path(), false).expect("open");
        assert_eq!(incarnation_since(&db, false, 900).expect("older"), 0);
    }

    #[test]
    fn identity_survives_a_reopen_and_rejects_another_node_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = {
            let db = crate::raft_db::open(dir.path(), false).expect("open");
            load_or_create(&db, 2, None).expect("create")
        };
        let db = crate::raft_db::open(dir.path(), false).expect("reopen");
        assert_eq!(load_or_create(&db, 2, None).expect("load"), first);
        assert!(matches!(
            load_or_create(&db, 3, None),
            Err(ClusterError::IdentityMismatch {
                stored: 2,
                configured: 3
            })
        ));
        let other = tempfile::tempdir().expect("tempdir");
        let fresh = load_or_create(
            &crate::raft_db::open(other.path(), false).expect("open"),
            2,
            None,
        )
        .expect("create");
        assert_ne!(
            fresh.incarnation, first.incarnation,
            "an empty dir is a new incarnation"
        );
    }
}
