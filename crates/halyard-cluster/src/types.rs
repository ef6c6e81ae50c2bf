//! Plain data types shared by the state machine and the public API.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// 1-based position of a node in the `--peers` list.
pub type NodeId = u64;

/// An MQTT client identifier.
pub type ClientId = String;

/// The owner of a session: the node serving it and its fencing epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub node: NodeId,
    /// The log index of the entry that granted the claim; strictly increasing.
    pub epoch: u64,
    pub session_expiry_secs: u32,
    pub persistent: bool,
    /// The proposer's clock when the claim was made.
    pub claimed_ms: u64,
}

/// One route of the route index: a filter (and share group) with subscribers on a node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteKey {
    /// The filter without the `$share/{group}/` prefix.
    pub filter: String,
    pub group: Option<String>,
}

/// A stored subscription: which node serves it and the broker's options bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub node: NodeId,
    pub options: Bytes,
}

/// A retained message as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedMessage {
    pub payload: Bytes,
    /// The proposer's clock when it was set.
    pub stamped_ms: u64,
}

/// One effect of an applied entry, for the change feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// `node == None`: the owner was released.
    OwnerChanged {
        client_id: ClientId,
        node: Option<NodeId>,
        epoch: u64,
        previous: Option<(NodeId, u64)>,
    },
    RouteAdded {
        filter: String,
        group: Option<String>,
        node: NodeId,
    },
    RouteRemoved {
        filter: String,
        group: Option<String>,
        node: NodeId,
    },
    RetainedSet {
        topic: String,
    },
    RetainedDeleted {
        topic: String,
    },
}

/// All changes of one applied log entry, in log order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub changes: Vec<Change>,
}
