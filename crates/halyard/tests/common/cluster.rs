//! A three-node cluster of real `halyard` processes for the cluster tests: each node has its
//! own temp data dir, MQTT and HTTP ports; dropping the [`Cluster`] kills only its own three
//! processes (each [`Broker`] kills and reaps its child, printing its stderr if the test
//! failed).
//!
//! [`Cluster::start_with_proxies`] puts a [`FaultProxy`] on every directed pair of nodes
//! (each node's `--peers` names the proxies towards the others), so that a test can cut and
//! heal the links between chosen nodes.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use super::fault_proxy::FaultProxy;
use super::{http, Broker};

/// How long a fresh cluster may take to elect a leader and have every node ready (three
/// debug processes share two cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Start attempts before giving up: a cluster port picked free may be taken again before
/// the node binds it (rare), which shows as a node that never comes up.
pub const START_ATTEMPTS: usize = 3;

/// Three running nodes, ids 1..=3 at indexes 0..=2.
pub struct Cluster {
    nodes: Vec<Broker>,
    /// Each node's cluster flags, to restart it as itself.
    args: Vec<Vec<String>>,
    /// `(from, to)` -> the proxy node `from` dials node `to` through (with proxies only).
    proxies: BTreeMap<(usize, usize), FaultProxy>,
    /// Each node's own cluster address, node 1 first.
    peers: Vec<String>,
}

/// `n` distinct free loopback ports, found by binding port 0 and releasing it.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("local addr").port())
        .collect()
}

/// The arguments that make a `serve` a cluster node.
pub fn cluster_args(node_id: Option<usize>, listen: &str, peers: &str) -> Vec<String> {
    let mut args = vec![
        "--cluster-listen".to_owned(),
        listen.to_owned(),
        "--peers".to_owned(),
        peers.to_owned(),
    ];
    if let Some(id) = node_id {
        args.extend(["--node-id".to_owned(), id.to_string()]);
    }
    args
}

/// Polls `/readyz` of `node` until it answers 200 or `deadline` passes.
pub fn wait_ready(node: &Broker, deadline: Instant) -> bool {
    loop {
        if readyz(node) == 200 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The status of `/readyz` on `node`.
pub fn readyz(node: &Broker) -> u16 {
    http(node.http_addr(), "GET", "/readyz", None, None).0
}

impl Cluster {
    /// Starts three nodes and waits until all three are ready.
    pub fn start() -> Cluster {
        Self::start_retrying(false, None)
    }

    /// Starts three nodes that all read the configuration file `toml`, and waits until all
    /// three are ready.
    pub fn start_with_config(toml: &str) -> Cluster {
        Self::start_retrying(false, Some(toml))
    }

    /// Starts three nodes whose cluster traffic goes through a [`FaultProxy`] per directed
    /// pair, and waits until all three are ready.
    pub fn start_with_proxies() -> Cluster {
        Self::start_retrying(true, None)
    }

    fn start_retrying(proxied: bool, toml: Option<&str>) -> Cluster {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(proxied, toml) {
                Ok(cluster) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!("no cluster came up in {START_ATTEMPTS} attempts; last: {last_error}");
    }

    fn try_start(proxied: bool, toml: Option<&str>) -> Result<Cluster, String> {
        let config = toml.map(|toml| super::write_temp_config(toml).display().to_string());
        let ports = free_ports(3);
        let listens: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let mut proxies = BTreeMap::new();
        if proxied {
            for from in 1..=3 {
                for to in (1..=3).filter(|&to| to != from) {
                    let target = listens[to - 1].parse().expect("listen addr");
                    proxies.insert((from, to), FaultProxy::start(target));
                }
            }
        }
        let mut nodes = Vec::new();
        let mut all_args = Vec::new();
        for (index, listen) in listens.iter().enumerate() {
            let id = index + 1;
            let peers: Vec<String> = (1..=3)
                .map(|to| match proxies.get(&(id, to)) {
                    Some(proxy) => proxy.addr().to_string(),
                    None => listens[to - 1].clone(),
                })
                .collect();
            let mut args = cluster_args(Some(id), listen, &peers.join(","));
            if let Some(config) = &config {
                args.extend(["--config".to_owned(), config.clone()]);
            }
            nodes.push(Broker::try_start_with_args(&args)?);
            all_args.push(args);
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for (index, node) in nodes.iter().enumerate() {
            if !wait_ready(node, deadline) {
                return Err(format!(
                    "node {} not ready; stderr:\n{}",
                    index + 1,
                    node.logs()
                ));
            }
        }
        Ok(Cluster {
            nodes,
            args: all_args,
            proxies,
            peers: listens,
        })
    }

    /// The cluster address of node `id`.
    pub fn cluster_addr(&self, id: usize) -> &str {
        &self.peers[id - 1]
    }

    /// The `--peers` list of a cluster started without proxies.
    pub fn peer_list(&self) -> String {
        self.peers.join(",")
    }

    /// Replaces node `id` by a new process with the same id and addresses and a new, empty
    /// data directory (the old one is removed with the old process).
    pub fn restart_with_empty_data(&mut self, id: usize) {
        let args = self.args[id - 1].clone();
        self.nodes[id - 1].kill9();
        self.nodes[id - 1] = Broker::try_start_with_args(&args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Cuts the links between nodes `a` and `b`, both ways.
    pub fn cut(&self, a: usize, b: usize) {
        self.proxy(a, b).cut();
        self.proxy(b, a).cut();
    }

    /// Heals the links between nodes `a` and `b`.
    pub fn heal(&self, a: usize, b: usize) {
        self.proxy(a, b).heal();
        self.proxy(b, a).heal();
    }

    fn proxy(&self, from: usize, to: usize) -> &FaultProxy {
        self.proxies
            .get(&(from, to))
            .unwrap_or_else(|| panic!("no proxy {from}->{to}: start_with_proxies"))
    }

    /// `kill -9` of node `id`; its data directory stays for [`Cluster::restart`].
    pub fn kill9(&mut self, id: usize) {
        self.nodes[id - 1].kill9();
    }

    /// Starts node `id` again as itself (same flags and data directory) once its process
    /// has ended, and waits until it is ready; panics if it is not within the ready timeout.
    pub fn restart(&mut self, id: usize) {
        let data_dir = self.nodes[id - 1].disown_data_dir();
        self.nodes[id - 1].kill9();
        let node = Broker::try_start_in(&self.args[id - 1], data_dir)
            .unwrap_or_else(|error| panic!("node {id} did not restart: {error}"));
        self.nodes[id - 1] = node;
        self.wait_ready(id);
    }

    /// Waits until node `id` answers 200 on `/readyz`.
    pub fn wait_ready(&self, id: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        assert!(
            wait_ready(self.node(id), deadline),
            "node {id} not ready; stderr:\n{}",
            self.node(id).logs()
        );
    }

    /// Node `id`, mutably (to signal it or wait for its exit).
    pub fn node_mut(&mut self, id: usize) -> &mut Broker {
        &mut self.nodes[id - 1]
    }

    /// Node `id` (1-based, as in `--node-id`).
    pub fn node(&self, id: usize) -> &Broker {
        &self.nodes[id - 1]
    }

    /// The MQTT address of node `id`.
    pub fn addr(&self, id: usize) -> SocketAddr {
        self.node(id).addr()
    }

    /// `/api/v1/cluster` of node `id`, parsed.
    pub fn status(&self, id: usize) -> serde_json::Value {
        let (code, body) = http(
            self.node(id).http_addr(),
            "GET",
            "/api/v1/cluster",
            None,
            None,
        );
        assert_eq!(code, 200, "/api/v1/cluster of node {id}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("bad cluster JSON {body:?}: {e}"))
    }

    /// Frames node `from` still holds unacknowledged for node `to` on the peer link.
    pub fn unacked(&self, from: usize, to: usize) -> u64 {
        self.status(from)["links"]
            .as_array()
            .and_then(|links| {
                links
                    .iter()
                    .find(|link| link["node"].as_u64() == Some(to as u64))
            })
            .and_then(|link| link["unacked"].as_u64())
            .unwrap_or_else(|| panic!("no link {from}->{to} in {}", self.status(from)))
    }

    /// Polls until node `from` holds nothing unacknowledged for node `to`: everything it
    /// forwarded there is stored by the receiver.
    pub fn wait_link_drained(&self, from: usize, to: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.unacked(from, to) > 0 {
            assert!(
                Instant::now() < deadline,
                "link {from}->{to} never drained: {}",
                self.status(from)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
