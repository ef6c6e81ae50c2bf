//! The cluster as the HTTP listener shows it: `/readyz`, `/api/v1/cluster` and the raft,
//! peer-link and claim metrics in `/metrics`.

use halyard_cluster::{Coordinator, Role};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

/// Whether this node has joined its cluster: a leader is known and this node is a member
/// whose incarnation the membership records (from then on, a restart with an empty data
/// directory under this id is fenced).
pub(crate) fn joined(coordinator: &Coordinator) -> bool {
    let status = coordinator.status();
    status.leader.is_some()
        && status
            .members
            .iter()
            .any(|m| m.id == status.node_id && m.incarnation == status.incarnation)
}

/// Whether this node is fenced: without its lease it serves no sessions.
pub(crate) fn fenced(coordinator: &Coordinator) -> bool {
    !coordinator.lease_held()
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::Learner => "learner",
        Role::Shutdown => "shutdown",
    }
}

/// `/api/v1/cluster`: members, leader, raft term and indexes, and per-peer link state.
pub(crate) fn status_json(coordinator: &Coordinator) -> Value {
    let status = coordinator.status();
    json!({
        "node_id": status.node_id,
        "incarnation": status.incarnation,
        "role": role_name(status.role),
        "leader": status.leader,
        "term": status.current_term,
        "last_log_index": status.last_log_index,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "fenced": fenced(coordinator),
        "members": status.members.iter().map(|member| json!({
            "id": member.id,
            "addr": member.addr,
            "incarnation": member.incarnation,
            "voter": member.voter,
            "matched_index": member.matched_index,
        })).collect::<Vec<_>>(),
        "stale_incarnation": status.fenced,
        "links": status.links.iter().map(|link| json!({
            "node": link.node,
            "connected": link.connected,
            "unacked": link.unacked,
        })).collect::<Vec<_>>(),
    })
}

/// The cluster's metrics as a registry of their own, encoded next to the broker's.
pub(crate) fn registry(coordinator: &Coordinator) -> Registry {
    let metrics = coordinator.metrics();
    let mut registry = Registry::with_prefix("halyard_cluster");
    let mut gauge = |name: &str, help: &str, value: u64| {
        let metric = Gauge::<i64>::default();
        metric.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, metric);
    };
    gauge("raft_term", "Current raft term", metrics.current_term);
    gauge(
        "raft_commit_index",
        "Highest committed log index",
        metrics.commit_index,
    );
    gauge(
        "raft_applied_index",
        "Highest applied log index",
        metrics.applied_index,
    );
    gauge(
        "raft_leader_changes",
        "Leader changes seen since start",
        metrics.leader_changes,
    );
    gauge(
        "fenced",
        "1 while this node lacks its lease (no quorum contact) and serves no sessions",
        u64::from(fenced(coordinator)),
    );
    gauge(
        "claims_committed",
        "Session claims granted",
        metrics.claims_committed,
    );
    gauge(
        "claims_refused",
        "Session claims refused (compare-and-set conflict)",
        metrics.claims_refused,
    );
    gauge(
        "entries_proposed",
        "Raft entries this node proposed",
        metrics.entries_proposed,
    );
    gauge(
        "link_forwarded",
        "Peer link frames written (first sends and re-sends)",
        metrics.link_forwarded,
    );
    gauge(
        "link_queued",
        "Peer link frames waiting for an acknowledgement",
        metrics.link_queued,
    );
    gauge(
        "link_dropped",
        "Peer link frames refused for a full queue",
        metrics.link_dropped,
    );
    gauge(
        "link_resent",
        "Peer link frames sent again after a reconnect",
        metrics.link_resent,
    );
    gauge(
        "link_duplicates",
        "Peer link frames received twice and dropped",
        metrics.link_duplicates,
    );
    gauge(
        "unreachable_peers_skipped",
        "Voters a SUBACK did not wait for because they were unreachable",
        metrics.unreachable_peers_skipped,
    );
    registry
}
