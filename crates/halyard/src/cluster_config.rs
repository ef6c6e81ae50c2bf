//! The `[cluster]` table and `--node-id` / `--cluster-listen` / `--peers`: running this
//! broker as one node of a cluster. Without peers it is a single node, exactly as before.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use halyard_cluster::{ClusterConfig, Listen};
use serde::{Deserialize, Serialize};

/// The `[cluster]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's id: its 1-based position in `peers`.
    pub node_id: Option<u64>,
    /// Address (`IP:PORT`) of this node's cluster port (raft and the peer link).
    pub listen: Option<SocketAddr>,
    /// Every voter's cluster address (`host:port`), this node included, in the same order
    /// on every node. Empty: a single node.
    pub peers: Vec<String>,
    /// Milliseconds this node keeps serving its sessions without contact with a quorum;
    /// then it fences itself (see "Running a cluster"). Default 1500, which is also the most
    /// allowed: the takeover timeout (2000) less a 500 ms margin, checked at start.
    pub lease_ms: Option<u64>,
}

/// What the lease must leave below the takeover timeout for network delay and clock drift.
const LEASE_MARGIN: Duration = Duration::from_millis(500);

/// The command line's cluster flags, which override the table.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ClusterArgs {
    /// This node's id in the cluster: its 1-based position in --peers.
    #[arg(long, value_name = "N")]
    pub node_id: Option<u64>,
    /// Address (IP:PORT) of this node's cluster port; overrides `cluster.listen`.
    #[arg(long, value_name = "ADDR")]
    pub cluster_listen: Option<SocketAddr>,
    /// Every voter's cluster address, this node's included, comma-separated
    /// (host:port,host:port,...); overrides `cluster.peers`.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub peers: Vec<String>,
}

/// The cluster this node joins, or `None` for a single node.
pub fn cluster_config(
    section: &ClusterSection,
    args: ClusterArgs,
    data_dir: &Path,
) -> Result<Option<ClusterConfig>> {
    let peers = if args.peers.is_empty() {
        section.peers.clone()
    } else {
        args.peers
    };
    let node_id = args.node_id.or(section.node_id);
    let listen = args.cluster_listen.or(section.listen);
    if peers.is_empty() {
        if node_id.is_some() || listen.is_some() {
            bail!("cluster.node_id and cluster.listen need cluster.peers (--peers)");
        }
        return Ok(None);
    }
    let Some(node_id) = node_id else {
        bail!("a cluster node needs cluster.node_id (--node-id): its position in the peers list");
    };
    let Some(listen) = listen else {
        bail!("a cluster node needs cluster.listen (--cluster-listen)");
    };
    if node_id == 0 || node_id > peers.len() as u64 {
        bail!(
            "cluster.node_id {node_id} is not a position in cluster.peers (1 to {})",
            peers.len()
        );
    }
    let mut config =
        ClusterConfig::new(node_id, Listen::Addr(listen), peers, data_dir.to_path_buf());
    if let Some(lease_ms) = section.lease_ms {
        config.lease = Duration::from_millis(lease_ms);
    }
    let takeover = halyard_server::cluster::TRANSFER_TIMEOUT;
    if config.lease + LEASE_MARGIN > takeover {
        bail!(
            "cluster.lease_ms {} must be at most {} ms (the takeover timeout less {} ms), or a fenced node could still serve a session taken over elsewhere",
            config.lease.as_millis(),
            (takeover - LEASE_MARGIN).as_millis(),
            LEASE_MARGIN.as_millis()
        );
    }
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(node: Option<u64>, listen: Option<&str>, peers: &[&str]) -> ClusterArgs {
        ClusterArgs {
            node_id: node,
            cluster_listen: listen.map(|addr| addr.parse().expect("addr")),
            peers: peers.iter().map(|peer| peer.to_string()).collect(),
        }
    }

    #[test]
    fn without_peers_it_is_a_single_node() {
        let config = cluster_config(
            &ClusterSection::default(),
            args(None, None, &[]),
            Path::new("d"),
        )
        .expect("valid");
        assert!(config.is_none());
    }

    #[test]
    fn flags_override_the_table_and_are_checked() {
        let section = ClusterSection {
            node_id: Some(1),
            listen: Some("127.0.0.1:7001".parse().expect("addr")),
            peers: vec!["a:1".into()],
            lease_ms: None,
        };
        let config = cluster_config(
            &section,
            args(Some(2), None, &["a:1", "b:2", "c:3"]),
            Path::new("d"),
        )
        .expect("valid")
        .expect("a cluster");
        assert_eq!((config.node_id, config.peers.len()), (2, 3));
        let error = cluster_config(
            &section,
            args(Some(4), None, &["a:1", "b:2"]),
            Path::new("d"),
        )
        .expect_err("node 4 of 2");
        assert!(error.to_string().contains("cluster.node_id 4"), "{error}");
        let error = cluster_config(
            &ClusterSection::default(),
            args(Some(1), None, &["a:1"]),
            Path::new("d"),
        )
        .expect_err("no listen");
        assert!(error.to_string().contains("cluster.listen"), "{error}");
        let error = cluster_config(
            &ClusterSection::default(),
            args(Some(1), Some("127.0.0.1:1"), &[]),
            Path::new("d"),
        )
        .expect_err("no peers");
        assert!(error.to_string().contains("cluster.peers"), "{error}");
    }

    #[test]
    fn a_lease_too_close_to_the_takeover_timeout_is_refused() {
        let section = |lease_ms| ClusterSection {
            lease_ms: Some(lease_ms),
            ..ClusterSection::default()
        };
        let flags = || args(Some(1), Some("127.0.0.1:1"), &["a:1"]);
        let config = cluster_config(&section(1000), flags(), Path::new("d"))
            .expect("valid")
            .expect("a cluster");
        assert_eq!(config.lease, Duration::from_millis(1000));
        let error = cluster_config(&section(1600), flags(), Path::new("d")).expect_err("too long");
        assert!(
            error.to_string().contains("cluster.lease_ms 1600"),
            "{error}"
        );
    }
}
