//! Gets a command committed: on this node when it leads, else forwarded to the leader.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::acceptor::propose_here;
use crate::command::{Command, Response};
use crate::error::ClusterError;
use crate::frame::{ProposeError, RaftReply, RaftRequest};
use crate::membership;
use crate::metrics::Counters;
use crate::peer_client::{LocalNode, PeerClient};
use crate::raft_types::Raft;
use crate::transport::Transport;
use crate::types::NodeId;

/// Pause before asking again after "not the leader" or a failed forward.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

pub(crate) struct Proposer {
    pub(crate) raft: Raft,
    pub(crate) local: LocalNode,
    pub(crate) peers: Vec<String>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) timeout: Duration,
    /// A leader without a quorum ack for longer than this has lost its quorum.
    pub(crate) quorum_silence: Duration,
    pub(crate) clients: BTreeMap<NodeId, PeerClient>,
    pub(crate) transport: Arc<dyn Transport>,
}

impl Proposer {
    /// Commits `command` within the proposal timeout; returns the entry's index and answer.
    /// After `NoQuorum` or `Timeout` the entry may still commit later (raft cannot tell).
    pub(crate) async fn propose(
        &mut self,
        command: Command,
    ) -> Result<(u64, Response), ClusterError> {
        let deadline = Instant::now() + self.timeout;
        let mut metrics = self.raft.metrics();
        let mut leader_unreachable = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.expired(leader_unreachable));
            }
            let remaining = deadline - now;
            let leader = metrics.borrow_and_update().current_leader;
            match leader {
                None => {
                    if let Ok(Err(_)) = tokio::time::timeout(remaining, metrics.changed()).await {
                        return Err(ClusterError::Shutdown);
                    }
                }
                Some(leader) if leader == self.local.id => {
                    match tokio::time::timeout(remaining, propose_here(&self.raft, command.clone()))
                        .await
                    {
                        Err(_) => return Err(self.expired(false)),
                        Ok(Ok(done)) => return Ok(done),
                        Ok(Err(error)) => self.handle_refusal(error).await?,
                    }
                }
                Some(leader) => {
                    let request = RaftRequest::Propose(command.clone());
                    match self.client(leader)?.call(&request, remaining).await {
                        Ok(RaftReply::Proposed(Ok(done))) => return Ok(done),
                        Ok(RaftReply::Proposed(Err(error))) => {
                            leader_unreachable = false;
                            self.handle_refusal(error).await?;
                        }
                        Ok(_) => return Err(ClusterError::Raft("reply of the wrong kind".into())),
                        Err(error) => {
                            leader_unreachable = error.kind() != io::ErrorKind::TimedOut;
                            tokio::time::sleep(RETRY_PAUSE.min(remaining)).await;
                        }
                    }
                }
            }
        }
    }

    async fn handle_refusal(&self, error: ProposeError) -> Result<(), ClusterError> {
        match error {
            ProposeError::NotLeader { .. } => {
                tokio::time::sleep(RETRY_PAUSE).await;
                Ok(())
            }
            ProposeError::ShuttingDown => Err(ClusterError::Shutdown),
            ProposeError::Refused(why) => Err(ClusterError::Raft(why)),
        }
    }

    fn client(&mut self, leader: NodeId) -> Result<&mut PeerClient, ClusterError> {
        if !self.clients.contains_key(&leader) {
            let addr = membership::addr(&self.raft, &self.peers, leader)
                .ok_or(ClusterError::UnknownNode(leader))?;
            let client = PeerClient::new(
                self.local,
                leader,
                addr,
                0,
                self.counters.clone(),
                self.transport.clone(),
            );
            self.clients.insert(leader, client);
        }
        self.clients
            .get_mut(&leader)
            .ok_or(ClusterError::UnknownNode(leader))
    }

    /// Out of time: no quorum when there is no leader, when we lead without recent quorum
    /// acks, or when the leader we know cannot be reached; otherwise a plain timeout.
    fn expired(&self, leader_unreachable: bool) -> ClusterError {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        match metrics.current_leader {
            None => ClusterError::NoQuorum,
            Some(leader) if leader == self.local.id => {
                let silence = metrics.millis_since_quorum_ack.map(Duration::from_millis);
                if silence.is_none_or(|silence| silence > self.quorum_silence) {
                    ClusterError::NoQuorum
                } else {
                    ClusterError::Timeout
                }
            }
            Some(_) if leader_unreachable => ClusterError::NoQuorum,
            Some(_) => ClusterError::Timeout,
        }
    }
}
