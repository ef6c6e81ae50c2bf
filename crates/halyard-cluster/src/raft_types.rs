//! openraft's type configuration; crate-private so no openraft type leaks into the API.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::command::{Command, Response};

/// A member's node info in the raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The cluster port (`host:port`) as configured in `--peers`.
    pub addr: String,
    /// The node's incarnation id; 0 until the node has announced itself.
    pub incarnation: u64,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (incarnation {:016x})", self.addr, self.incarnation)
    }
}

openraft::declare_raft_types!(
    /// The cluster's raft types.
    pub TypeConfig:
        D = Command,
        R = Response,
        Node = NodeInfo,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, NodeInfo>;
pub type StorageError = openraft::StorageError<u64>;

pub type Raft = openraft::Raft<TypeConfig>;
