//! openraft's network: RaftNetworkFactory / RaftNetwork over [`PeerClient`].

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::config::peer_addr;
use crate::frame::{RaftReply, RaftRequest};
use crate::lease::Lease;
use crate::metrics::Counters;
use crate::peer_client::{LocalNode, PeerClient};
use crate::raft_types::{NodeInfo, TypeConfig};
use crate::transport::Transport;
use crate::types::NodeId;

/// Makes one [`RaftPeer`] per replication stream or election.
pub(crate) struct NetworkFactory {
    pub(crate) local: LocalNode,
    /// This node's own `peers` list: a peer is dialled where this node's configuration
    /// says, like the peer link and the proposer do, not at the address the membership was
    /// initialized with (another node's list, which may route differently).
    pub(crate) peers: Vec<String>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) lease: Arc<Lease>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = RaftPeer;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> RaftPeer {
        let addr = peer_addr(&self.peers, target).unwrap_or(&node.addr);
        RaftPeer {
            client: PeerClient::new(
                self.local,
                target,
                addr.clone(),
                node.incarnation,
                self.counters.clone(),
                self.transport.clone(),
            ),
            lease: self.lease.clone(),
        }
    }
}

pub(crate) struct RaftPeer {
    client: PeerClient,
    lease: Arc<Lease>,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl RaftPeer {
    async fn call(
        &mut self,
        request: RaftRequest,
        limit: Duration,
    ) -> Result<RaftReply, io::Error> {
        self.client.call(&request, limit).await
    }

    fn remote<E: std::error::Error>(
        &self,
        error: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new(self.client.target(), error))
    }
}

fn transport_error<E: std::error::Error>(
    error: io::Error,
) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
    match error.kind() {
        io::ErrorKind::NotConnected
        | io::ErrorKind::ConnectionRefused
        | io::ErrorKind::PermissionDenied => RPCError::Unreachable(Unreachable::new(&error)),
        _ => RPCError::Network(NetworkError::new(&error)),
    }
}

fn wrong_reply<E: std::error::Error>() -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
    let error = io::Error::new(io::ErrorKind::InvalidData, "reply of the wrong kind");
    RPCError::Network(NetworkError::new(&error))
}

impl RaftNetwork<TypeConfig> for RaftPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let sent = tokio::time::Instant::now();
        match self
            .call(RaftRequest::AppendEntries(rpc), option.hard_ttl())
            .await
        {
            Ok(RaftReply::AppendEntries(result)) => {
                if matches!(result, Ok(AppendEntriesResponse::Success)) {
                    self.lease.acked(self.client.target(), sent);
                }
                result.map_err(|e| self.remote(e))
            }
            Ok(_) => Err(wrong_reply()),
            Err(error) => Err(transport_error(error)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self
            .call(RaftRequest::InstallSnapshot(rpc), option.hard_ttl())
            .await
        {
            Ok(RaftReply::InstallSnapshot(result)) => result.map_err(|e| self.remote(e)),
            Ok(_) => Err(wrong_reply()),
            Err(error) => Err(transport_error(error)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self.call(RaftRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(RaftReply::Vote(result)) => result.map_err(|e| self.remote(e)),
            Ok(_) => Err(wrong_reply()),
            Err(error) => Err(transport_error(error)),
        }
    }

    /// Short retries first, so a restarted peer catches up quickly; at most a second apart.
    fn backoff(&self) -> Backoff {
        Backoff::new((0..).map(|attempt: u32| {
            Duration::from_millis(50u64 << attempt.min(4)).min(Duration::from_secs(1))
        }))
    }
}
