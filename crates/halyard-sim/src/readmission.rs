//! A node back with an empty data directory is a new incarnation of its id, which the other
//! nodes refuse while the membership records the old one (README, "Running a cluster"): the
//! simulation does what the operator must, removing the id and adding it again through a
//! live node, before it lets another data directory be lost. Two lost disks out of three
//! (or one lost disk let back in under its old id) are beyond what raft survives.

use std::sync::Arc;

use halyard_cluster::{ClusterError, Coordinator, NodeId};
use tokio::task::JoinHandle;

use crate::network::address;

/// The removal and re-adding of one wiped node, retried until both are committed.
pub struct Readmission {
    pub node: NodeId,
    removed: bool,
    /// The membership change under way: the node asked, and its task.
    task: Option<(NodeId, JoinHandle<Result<(), ClusterError>>)>,
}

impl Readmission {
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            removed: false,
            task: None,
        }
    }

    /// Moves the readmission on (asking `host` for the next change when none is under way);
    /// true once the node is a voter again.
    pub async fn advance(&mut self, host: Option<(NodeId, Arc<Coordinator>)>) -> bool {
        if self
            .task
            .as_ref()
            .is_some_and(|(_, task)| !task.is_finished())
        {
            return false;
        }
        if let Some((_, task)) = self.task.take() {
            if let Ok(Ok(())) = task.await {
                if self.removed {
                    return true;
                }
                self.removed = true;
            }
        }
        let Some((id, host)) = host else {
            return false;
        };
        // A removal whose answer was lost may have been committed all the same.
        self.removed |= !host
            .status()
            .members
            .iter()
            .any(|member| member.id == self.node);
        let node = self.node;
        let task = if self.removed {
            tokio::spawn(async move { host.add_member(node, address(node), true).await })
        } else {
            tokio::spawn(async move { host.remove_member(node).await })
        };
        self.task = Some((id, task));
        false
    }

    /// Node `host` is about to be killed: a change asked of it is abandoned (and asked again
    /// of another node), so that nothing holds on to its coordinator.
    pub async fn abandon_on(&mut self, host: NodeId) {
        if self.task.as_ref().is_some_and(|(id, _)| *id == host) {
            if let Some((_, task)) = self.task.take() {
                task.abort();
                let _ = task.await;
            }
        }
    }
}
