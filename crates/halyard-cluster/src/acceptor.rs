//! The cluster port: accepts connections, checks the hello, serves the raft channel and
//! hands link connections to the peer link.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use tokio::task::JoinSet;

use crate::applied_everywhere::serve_wait_applied;
use crate::command::{Command, Response};
use crate::frame::{
    self, Channel, FramedStream, Hello, ProposeError, RaftReply, RaftRequest, Welcome,
};
use crate::metrics::{bump, Counters};
use crate::peer_client::LocalNode;
use crate::peer_link::LinkInbound;
use crate::raft_types::{NodeInfo, Raft};
use crate::transport::{BoxStream, Incoming};
use crate::types::NodeId;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the accept loop needs to judge and serve a connection.
pub(crate) struct Acceptor {
    pub(crate) local: LocalNode,
    pub(crate) peer_count: u64,
    /// None when only the peer link is served (link tests).
    pub(crate) raft: Option<Raft>,
    pub(crate) link: Option<LinkInbound>,
    pub(crate) counters: Arc<Counters>,
}

/// Accepts until the task is aborted; aborting it also ends every connection it serves.
pub(crate) async fn run(mut incoming: Box<dyn Incoming>, acceptor: Arc<Acceptor>) {
    let mut connections = JoinSet::new();
    loop {
        // Biased: the order in which ready branches are taken must not depend on tokio's
        // random choice, so that a simulation replays.
        tokio::select! {
            biased;
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = incoming.accept() => match accepted {
                Ok(stream) => {
                    connections.spawn(serve(stream, acceptor.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "cluster accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
}

async fn serve(stream: BoxStream, acceptor: Arc<Acceptor>) {
    let mut connection = frame::framed(stream);
    let hello = match frame::receive_within::<Hello>(&mut connection, HELLO_TIMEOUT).await {
        Ok(hello) => hello,
        Err(error) => {
            note_error(&acceptor.counters, &error);
            return;
        }
    };
    if let Err(reason) = acceptor.check(&hello) {
        bump(&acceptor.counters.rejected_peers);
        tracing::warn!(from = hello.from, reason, "cluster peer rejected");
        let _ = frame::send(&mut connection, &Welcome::Rejected(reason)).await;
        return;
    }
    let welcome = Welcome::Accepted {
        node: acceptor.local.id,
        incarnation: acceptor.local.incarnation,
    };
    if frame::send(&mut connection, &welcome).await.is_err() {
        return;
    }
    let result = match (hello.channel, &acceptor.raft, &acceptor.link) {
        (Channel::Raft, Some(raft), _) => serve_raft(&mut connection, raft).await,
        (Channel::Link, _, Some(link)) => {
            link.serve(connection, hello.from, hello.incarnation).await
        }
        _ => Ok(()),
    };
    if let Err(error) = result {
        note_error(&acceptor.counters, &error);
    }
}

fn note_error(counters: &Counters, error: &io::Error) {
    if frame::is_bad_frame(error) {
        bump(&counters.bad_frames);
        tracing::warn!(%error, "bad frame from a cluster peer; connection closed");
    }
}

impl Acceptor {
    /// A known node id, and on the raft channel the incarnation the membership records.
    fn check(&self, hello: &Hello) -> Result<(), String> {
        if hello.from == 0 || hello.from > self.peer_count || hello.from == self.local.id {
            return Err(format!(
                "node {} is not a peer of node {}",
                hello.from, self.local.id
            ));
        }
        let served = match hello.channel {
            Channel::Raft => self.raft.is_some(),
            Channel::Link => self.link.is_some(),
        };
        if !served {
            return Err("channel not served".to_owned());
        }
        if let (Channel::Raft, Some(raft)) = (hello.channel, &self.raft) {
            let metrics = raft.metrics();
            let recorded = metrics
                .borrow()
                .membership_config
                .membership()
                .get_node(&hello.from)
                .map_or(0, |node| node.incarnation);
            if recorded != 0 && recorded != hello.incarnation {
                return Err(format!(
                    "node {} is incarnation {recorded:016x}, not {:016x}: a node with a new data directory needs a new id",
                    hello.from, hello.incarnation
                ));
            }
        }
        Ok(())
    }
}

async fn serve_raft(connection: &mut FramedStream, raft: &Raft) -> io::Result<()> {
    while let Some(request) = frame::receive::<RaftRequest>(connection).await? {
        let reply = match request {
            RaftRequest::AppendEntries(rpc) => {
                RaftReply::AppendEntries(raft.append_entries(rpc).await)
            }
            RaftRequest::Vote(rpc) => RaftReply::Vote(raft.vote(rpc).await),
            RaftRequest::InstallSnapshot(rpc) => {
                RaftReply::InstallSnapshot(raft.install_snapshot(rpc).await)
            }
            RaftRequest::Propose(command) => RaftReply::Proposed(propose_here(raft, command).await),
            RaftRequest::Announce { node, incarnation } => {
                RaftReply::Announced(record_incarnation(raft, node, incarnation).await)
            }
            RaftRequest::WaitApplied { index, wait_ms } => {
                match serve_wait_applied(raft, index, wait_ms).await {
                    Ok(applied) => RaftReply::Applied(applied),
                    // Shutting down: the caller takes a closed connection as unreachable.
                    Err(_) => return Ok(()),
                }
            }
        };
        frame::send(connection, &reply).await?;
    }
    Ok(())
}

/// Proposes on this node, which must be the leader.
pub(crate) async fn propose_here(
    raft: &Raft,
    command: Command,
) -> Result<(u64, Response), ProposeError> {
    raft.client_write(command)
        .await
        .map(|written| (written.log_id.index, written.data))
        .map_err(propose_error)
}

fn propose_error(error: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> ProposeError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ProposeError::NotLeader {
                leader: forward.leader_id,
            }
        }
        RaftError::Fatal(_) => ProposeError::ShuttingDown,
        other => ProposeError::Refused(other.to_string()),
    }
}

/// Leader side of an announce: record a node's incarnation once; a different one later is
/// refused (that node lost its data directory and must not pass for its old self).
pub(crate) async fn record_incarnation(
    raft: &Raft,
    node: NodeId,
    incarnation: u64,
) -> Result<(), ProposeError> {
    let recorded = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&node)
        .cloned();
    let Some(recorded) = recorded else {
        return Err(ProposeError::Refused(format!(
            "node {node} is not a member"
        )));
    };
    if recorded.incarnation == incarnation {
        return Ok(());
    }
    if recorded.incarnation != 0 {
        return Err(ProposeError::Refused(format!(
            "node {node} is recorded with another incarnation"
        )));
    }
    let update = NodeInfo {
        addr: recorded.addr,
        incarnation,
    };
    raft.change_membership(ChangeMembers::SetNodes([(node, update)].into()), true)
        .await
        .map(|_| ())
        .map_err(propose_error)
}
