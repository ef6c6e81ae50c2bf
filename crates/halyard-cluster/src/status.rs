//! The public view of the cluster's state: members, leader, indexes, links.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{ClientId, NodeId, Owner, RouteKey};

/// What `Coordinator::status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub node_id: NodeId,
    pub incarnation: u64,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub current_term: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub members: Vec<MemberStatus>,
    /// The publish peer link to each other node.
    pub links: Vec<LinkStatus>,
    /// Why a peer refused this node as a stale incarnation of its id (lost data directory).
    pub fenced: Option<String>,
}

/// This node's raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

/// One member of the raft membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: NodeId,
    pub addr: String,
    /// 0 until the node has announced its incarnation.
    pub incarnation: u64,
    pub voter: bool,
    /// Leader only: the highest log index known replicated to this member.
    pub matched_index: Option<u64>,
}

/// The peer link's state towards one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub node: NodeId,
    pub connected: bool,
    /// Frames sent but not yet acknowledged.
    pub unacked: u64,
}

/// A consistent copy of the state a broker core mirrors, taken at `applied_index`: the change
/// feed returned with it carries exactly the entries after that index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorState {
    pub applied_index: u64,
    pub owners: BTreeMap<ClientId, Owner>,
    pub routes: BTreeMap<RouteKey, BTreeSet<NodeId>>,
}

/// A committed write: the log index of its entry and the command's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit<T> {
    pub index: u64,
    pub value: T,
}
