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

/// A will kept with its owner record, for when the owner cannot publish it (lost node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WillRecord {
    /// The node that holds the connection.
    pub node: NodeId,
    /// The holding node's process run (random per start): a record of an earlier run was
    /// left by a process that is gone, whose connections are all closed.
    pub run: u64,
    /// Seconds from the loss of the connection until the will is due: the smaller of its
    /// Will Delay Interval and the Session Expiry Interval [MQTT-3.1.3-9]; 0 once due.
    pub delay_secs: u32,
    /// The will as the app encoded it (opaque here).
    pub will: Bytes,
}

/// A will this node won through raft ([`crate::Coordinator::take_fired_wills`]): the app
/// publishes it as an ordinary message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredWill {
    pub client_id: ClientId,
    pub epoch: u64,
    pub will: Bytes,
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
        /// The claim's (or the released owner's) Session Expiry Interval.
        session_expiry_secs: u32,
        /// The claim's (or the released owner's) proposer clock.
        claimed_ms: u64,
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
