//! The cluster port: accepts connections, checks the hello, serves the raft channel and
//! hands link connections to the peer link.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::ChangeMembers;
use tokio::task::JoinSet;

use crate::applied_everywhere::serve_wait_applied;
use crate::command::{Command, Response};
use crate::consumption::Consumption;
use crate::frame::{
    self, Channel, FramedStream, Hello, ProposeError, RaftReply, RaftRequest, Welcome,
};
use crate::lease::Lease;
use crate::membership;
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
    /// None when only the peer link is served (link tests).
    pub(crate) raft: Option<Raft>,
    pub(crate) link: Option<LinkInbound>,
    pub(crate) counters: Arc<Counters>,
    /// What this node's app has taken from the change feed.
    pub(crate) consumption: Consumption,
    /// Stamped when the leader's AppendEntries brings this node up to its commit.
    pub(crate) lease: Arc<Lease>,
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
    if let Err(refusal) = acceptor.check(&hello) {
        bump(&acceptor.counters.rejected_peers);
        match &refusal {
            Welcome::Fenced(reason) => {
                tracing::warn!(from = hello.from, reason, "cluster peer fenced")
            }
            other => tracing::warn!(from = hello.from, reason = ?other, "cluster peer rejected"),
        }
        let _ = frame::send(&mut connection, &refusal).await;
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
        (Channel::Raft, Some(raft), _) => {
            serve_raft(
                &mut connection,
                raft,
                &acceptor.consumption,
                &acceptor.lease,
            )
            .await
        }
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
    /// A member, and on the raft channel the incarnation the membership records. Before
    /// the membership is known here (a voter before the first start's initialization, a node
    /// waiting to be added with `halyard cluster join`), any other node: the one that adds
    /// it may itself have been added at run time. A refusal is the [`Welcome`] to send.
    fn check(&self, hello: &Hello) -> Result<(), Welcome> {
        let members = self
            .raft
            .as_ref()
            .map(membership::members)
            .unwrap_or_default();
        let known = members.is_empty() || members.contains_key(&hello.from);
        if hello.from == 0 || !known || hello.from == self.local.id {
            return Err(Welcome::Rejected(format!(
                "node {} is not a member of node {}'s cluster",
                hello.from, self.local.id
            )));
        }
        let served = match hello.channel {
            Channel::Raft => self.raft.is_some(),
            Channel::Link => self.link.is_some(),
        };
        if !served {
            return Err(Welcome::Rejected("channel not served".to_owned()));
        }
        if hello.channel == Channel::Raft && self.raft.is_some() {
            let recorded = members.get(&hello.from).map_or(0, |node| node.incarnation);
            if recorded != 0 && recorded != hello.incarnation {
                return Err(Welcome::Fenced(format!(
                    "node {} is a member as incarnation {recorded:016x}, not {:016x}: its data directory was lost or replaced; remove it (`halyard cluster leave {}`) and add it again (`halyard cluster join`), or give it its old data directory",
                    hello.from, hello.incarnation, hello.from
                )));
            }
        }
        Ok(())
    }
}

async fn serve_raft(
    connection: &mut FramedStream,
    raft: &Raft,
    consumption: &Consumption,
    lease: &Lease,
) -> io::Result<()> {
    while let Some(request) = frame::receive::<RaftRequest>(connection).await? {
        let reply = match request {
            RaftRequest::AppendEntries(rpc) => {
                let received = tokio::time::Instant::now();
                // Only a request that shows every entry the leader has committed proves that
                // this node knows of every claim committed before it was sent.
                let last = rpc
                    .entries
                    .last()
                    .map(|entry| entry.log_id)
                    .or(rpc.prev_log_id);
                let covers_commit = rpc.leader_commit <= last;
                let result = raft.append_entries(rpc).await;
                if covers_commit && matches!(result, Ok(AppendEntriesResponse::Success)) {
                    lease.heard_leader(received);
                }
                RaftReply::AppendEntries(result)
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
                match serve_wait_applied(raft, consumption, index, wait_ms).await {
                    Ok(applied) => RaftReply::Applied(applied),
                    // Shutting down: the caller takes a closed connection as unreachable.
                    Err(_) => return Ok(()),
                }
            }
            RaftRequest::Membership(change) => {
                RaftReply::Membership(membership::change(raft, change).await)
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

pub(crate) fn propose_error(
    error: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>,
) -> ProposeError {
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
