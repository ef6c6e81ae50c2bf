//! Records this node's incarnation in the raft membership once a leader exists.
//!
//! The voter set is initialized with incarnation 0 for every node (each node knows only its
//! own); each node then asks the leader to fill in its own. Peers compare it with the
//! incarnation in every raft hello, so a node restarted with an empty data directory is
//! refused instead of being taken for its old self.

use std::sync::Arc;
use std::time::Duration;

use crate::acceptor::record_incarnation;
use crate::frame::{ProposeError, RaftReply, RaftRequest};
use crate::membership;
use crate::metrics::Counters;
use crate::peer_client::{LocalNode, PeerClient};
use crate::raft_types::Raft;
use crate::transport::Transport;

const POLL: Duration = Duration::from_millis(100);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) async fn run(
    raft: Raft,
    local: LocalNode,
    peers: Vec<String>,
    counters: Arc<Counters>,
    transport: Arc<dyn Transport>,
) {
    let mut client: Option<PeerClient> = None;
    loop {
        tokio::time::sleep(POLL).await;
        let (recorded, leader) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            let recorded = metrics
                .membership_config
                .membership()
                .get_node(&local.id)
                .map(|node| node.incarnation);
            (recorded, metrics.current_leader)
        };
        if recorded == Some(local.incarnation) {
            counters.clear_fenced();
            return;
        }
        let Some(leader) = leader else {
            continue;
        };
        let result = if leader == local.id {
            record_incarnation(&raft, local.id, local.incarnation).await
        } else {
            if client
                .as_ref()
                .is_none_or(|client| client.target() != leader)
            {
                client = membership::addr(&raft, &peers, leader).map(|addr| {
                    PeerClient::new(local, leader, addr, 0, counters.clone(), transport.clone())
                });
            }
            let Some(client) = client.as_mut() else {
                continue;
            };
            let request = RaftRequest::Announce {
                node: local.id,
                incarnation: local.incarnation,
            };
            match client.call(&request, CALL_TIMEOUT).await {
                Ok(RaftReply::Announced(result)) => result,
                _ => Err(ProposeError::NotLeader { leader: None }),
            }
        };
        if let Err(ProposeError::Refused(why)) = result {
            tracing::warn!(
                why,
                "cluster did not record this node's incarnation; retrying"
            );
        }
    }
}
