//! The `[cluster]` table and `--node-id` / `--cluster-listen` / `--peers`: running this
//! broker as one node of a cluster. Without peers it is a single node, exactly as before.
//!
//! On Kubernetes every pod of the StatefulSet gets the same file, so the node id can come
//! from the pod's hostname instead (`halyard-N` is node N+1, see [`node_id_from_hostname`]).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use halyard_cluster::{ClusterConfig, Listen};
use serde::{Deserialize, Serialize};

/// The `[cluster]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's id: its 1-based position in `peers`; a larger id is a node added to a
    /// running cluster with `halyard cluster join` (it never initializes a cluster).
    pub node_id: Option<u64>,
    /// Take the node id from the hostname instead of `node_id`: a hostname ending in `-N`
    /// (a StatefulSet's pod N, such as `halyard-0`) is node N+1. Stable across restarts, as a
    /// pod keeps its name. The hostname is `HOSTNAME`, else the kernel's.
    pub node_id_from_hostname: bool,
    /// Address (`IP:PORT`) of this node's cluster port (raft and the peer link).
    pub listen: Option<SocketAddr>,
    /// Every voter's cluster address (`host:port`, the host a DNS name or an IP), this node
    /// included, in the same order on every node. Names are resolved on every connection
    /// attempt and retried until they resolve. Empty: a single node.
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
    /// This node's id in the cluster: its 1-based position in --peers, or a larger id for a
    /// node added at run time with `halyard cluster join`.
    #[arg(long, value_name = "N", conflicts_with = "node_id_from_hostname")]
    pub node_id: Option<u64>,
    /// Take the node id from the hostname: `NAME-N` (a StatefulSet's pod N) is node N+1;
    /// overrides `cluster.node_id_from_hostname`.
    #[arg(long)]
    pub node_id_from_hostname: bool,
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
    let node_id = if args.node_id.is_some() {
        args.node_id
    } else if args.node_id_from_hostname || section.node_id_from_hostname {
        if section.node_id.is_some() && !args.node_id_from_hostname {
            bail!("cluster.node_id and cluster.node_id_from_hostname are both set: choose one");
        }
        Some(node_id_from_hostname(&hostname()?)?)
    } else {
        section.node_id
    };
    let listen = args.cluster_listen.or(section.listen);
    if peers.is_empty() {
        if node_id.is_some() || listen.is_some() || section.node_id_from_hostname {
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
    if node_id == 0 {
        bail!("cluster.node_id 0: node ids start at 1");
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
    config.validate()?;
    Ok(Some(config))
}

/// The node id of a StatefulSet pod: the ordinal after the last `-`, plus one (node ids
/// start at 1, ordinals at 0).
pub fn node_id_from_hostname(hostname: &str) -> Result<u64> {
    let ordinal = hostname
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<u64>().ok());
    match ordinal.and_then(|ordinal| ordinal.checked_add(1)) {
        Some(node_id) => Ok(node_id),
        None => bail!(
            "cluster.node_id_from_hostname: hostname {hostname:?} does not end in -N \
             (a StatefulSet pod's ordinal, halyard-0 being node 1)"
        ),
    }
}

/// This host's name: `HOSTNAME` (which Kubernetes sets to the pod name), else the kernel's.
fn hostname() -> Result<String> {
    if let Some(name) = std::env::var_os("HOSTNAME") {
        return Ok(name.to_string_lossy().into_owned());
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cluster.node_id_from_hostname: HOSTNAME is not set and the kernel's hostname cannot be read")?;
    Ok(name.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(node: Option<u64>, listen: Option<&str>, peers: &[&str]) -> ClusterArgs {
        ClusterArgs {
            node_id: node,
            node_id_from_hostname: false,
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
            node_id_from_hostname: false,
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
        let joiner = cluster_config(
            &section,
            args(Some(4), None, &["a:1", "b:2"]),
            Path::new("d"),
        )
        .expect("node 4 of 2 joins at run time")
        .expect("a cluster");
        assert_eq!(joiner.node_id, 4);
        let error = cluster_config(&section, args(Some(0), None, &["a:1"]), Path::new("d"))
            .expect_err("node 0");
        assert!(error.to_string().contains("cluster.node_id 0"), "{error}");
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

    #[test]
    fn a_statefulset_ordinal_is_the_node_id_plus_one() {
        assert_eq!(node_id_from_hostname("halyard-0").expect("pod 0"), 1);
        assert_eq!(node_id_from_hostname("my-broker-12").expect("pod 12"), 13);
        for bad in ["halyard", "halyard-", "halyard-x", "3f2c9a1b7d4e"] {
            let error = node_id_from_hostname(bad).expect_err(bad);
            assert!(error.to_string().contains("does not end in -N"), "{error}");
        }
        let section = ClusterSection {
            node_id: Some(1),
            node_id_from_hostname: true,
            listen: Some("127.0.0.1:7001".parse().expect("addr")),
            peers: vec!["a:1".into()],
            lease_ms: None,
        };
        let error =
            cluster_config(&section, args(None, None, &[]), Path::new("d")).expect_err("both set");
        assert!(error.to_string().contains("choose one"), "{error}");
        // --node-id on the command line still wins over the table.
        let config = cluster_config(&section, args(Some(1), None, &[]), Path::new("d"))
            .expect("valid")
            .expect("a cluster");
        assert_eq!(config.node_id, 1);
    }
}
