//! Run-time membership: who is a member, at which address, and the leader-side changes
//! behind `halyard cluster join|leave`.
//!
//! The voters named in `peers` form the cluster at its first start. Any other node joins as
//! a learner (openraft `add_learner`, which replicates the log to it) and may be promoted to
//! voter; leaving first demotes a voter, so the voter set shrinks before the node's data is
//! deleted. A removed node id can be added again, with a new incarnation (a new data
//! directory): until then, its peers fence it (see [`crate::acceptor`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use tokio::time::Instant;

use crate::acceptor::propose_error;
use crate::config::peer_addr;
use crate::error::ClusterError;
use crate::frame::{MembershipChange, ProposeError, RaftReply, RaftRequest};
use crate::metrics::Counters;
use crate::peer_client::{LocalNode, PeerClient};
use crate::raft_types::{NodeInfo, Raft};
use crate::transport::Transport;
use crate::types::NodeId;

/// The members (voters and learners) with their node info, as this node knows them; empty
/// before the cluster is initialized here.
pub(crate) fn members(raft: &Raft) -> BTreeMap<NodeId, NodeInfo> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, info)| (*id, info.clone()))
        .collect()
}

/// Where `node`'s cluster port is: as the membership records it, else its `peers` entry.
pub(crate) fn addr(raft: &Raft, peers: &[String], node: NodeId) -> Option<String> {
    let recorded = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&node)
        .map(|info| info.addr.clone());
    recorded.or_else(|| peer_addr(peers, node).cloned())
}

/// Pause before asking again when no leader is known or the leader moved.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Gets `change` done by the leader (this node or the one it knows), within `limit`.
pub(crate) async fn request(
    raft: &Raft,
    local: LocalNode,
    peers: &[String],
    counters: &Arc<Counters>,
    transport: &Arc<dyn Transport>,
    change: MembershipChange,
    limit: Duration,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + limit;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ClusterError::NoQuorum);
        }
        let leader = raft.metrics().borrow().current_leader;
        let result = match leader {
            None => Err(ProposeError::NotLeader { leader: None }),
            Some(leader) if leader == local.id => {
                match tokio::time::timeout(remaining, self::change(raft, change.clone())).await {
                    Ok(result) => result,
                    Err(_) => return Err(ClusterError::Timeout),
                }
            }
            Some(leader) => {
                let addr = addr(raft, peers, leader).ok_or(ClusterError::UnknownNode(leader))?;
                let mut client =
                    PeerClient::new(local, leader, addr, 0, counters.clone(), transport.clone());
                let request = RaftRequest::Membership(change.clone());
                match client.call(&request, remaining).await {
                    Ok(RaftReply::Membership(result)) => result,
                    Ok(_) => return Err(ClusterError::Raft("reply of the wrong kind".into())),
                    Err(_) => Err(ProposeError::NotLeader { leader: None }),
                }
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(ProposeError::NotLeader { .. }) => tokio::time::sleep(RETRY_PAUSE).await,
            Err(ProposeError::ShuttingDown) => return Err(ClusterError::Shutdown),
            Err(ProposeError::Refused(why)) => return Err(ClusterError::Membership(why)),
        }
    }
}

/// How long a membership step waits for the change before it to commit: openraft takes one
/// change at a time, and the last entry of a `leave` may still be uncommitted when a `join`
/// follows it at once (`tests/cluster_membership.rs` met it: 409 "already undergoing a
/// configuration change").
const IN_PROGRESS_WAIT: Duration = Duration::from_secs(5);

/// Runs one membership step, again while the change before it is still in progress.
async fn one_at_a_time<T, F, Fut>(mut step: F) -> Result<T, ProposeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
        Output = Result<T, RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>,
    >,
{
    let deadline = Instant::now() + IN_PROGRESS_WAIT;
    loop {
        match step().await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other.map_err(propose_error),
        }
    }
}

/// Leader side of a membership change.
pub(crate) async fn change(raft: &Raft, change: MembershipChange) -> Result<(), ProposeError> {
    let voters: BTreeSet<NodeId> = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    let known = members(raft);
    match change {
        MembershipChange::Add { node, addr, voter } => {
            if node == 0 {
                return Err(ProposeError::Refused("node ids start at 1".to_owned()));
            }
            match known.get(&node) {
                Some(info) if info.addr != addr => {
                    return Err(ProposeError::Refused(format!(
                        "node {node} is already a member at {}; `halyard cluster leave {node}` first",
                        info.addr
                    )));
                }
                Some(_) => {}
                None => {
                    let info = NodeInfo {
                        addr,
                        incarnation: 0,
                    };
                    one_at_a_time(|| raft.add_learner(node, info.clone(), true)).await?;
                    tracing::info!(node, "cluster: node added as a learner");
                }
            }
            if voter && !voters.contains(&node) {
                one_at_a_time(|| {
                    raft.change_membership(ChangeMembers::AddVoterIds([node].into()), true)
                })
                .await?;
                tracing::info!(node, "cluster: node promoted to voter");
            }
            Ok(())
        }
        MembershipChange::Remove { node } => {
            if !known.contains_key(&node) {
                return Err(ProposeError::Refused(format!(
                    "node {node} is not a member"
                )));
            }
            if voters.contains(&node) {
                if voters.len() == 1 {
                    return Err(ProposeError::Refused(format!(
                        "node {node} is the last voter"
                    )));
                }
                one_at_a_time(|| {
                    raft.change_membership(ChangeMembers::RemoveVoters([node].into()), true)
                })
                .await?;
                tracing::info!(node, "cluster: voter demoted to learner");
            }
            one_at_a_time(|| {
                raft.change_membership(ChangeMembers::RemoveNodes([node].into()), true)
            })
            .await?;
            tracing::info!(node, "cluster: node removed from the membership");
            Ok(())
        }
    }
}
