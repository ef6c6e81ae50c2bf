//! Helpers for the multi-node tests: clusters on 127.0.0.1 ephemeral ports in temp dirs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use halyard_cluster::{ClaimRequest, ClusterConfig, Coordinator, Listen};
use tempfile::TempDir;

/// Guards every wait in these tests against a hang; not a performance target.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A cluster under test: nodes by id (index 0 = node 1), their dirs and addresses.
pub struct TestCluster {
    pub nodes: Vec<Option<Coordinator>>,
    pub addrs: Vec<SocketAddr>,
    pub dirs: Vec<TempDir>,
    /// Applied to every node's configuration, at start and restart.
    tweak: fn(&mut ClusterConfig),
}

/// Short raft timeouts for a quick test run (heartbeat 50 ms, elections 150-300 ms).
pub fn test_config(
    node_id: u64,
    listen: Listen,
    peers: &[SocketAddr],
    dir: PathBuf,
) -> ClusterConfig {
    let peers = peers.iter().map(ToString::to_string).collect();
    let mut config = ClusterConfig::new(node_id, listen, peers, dir);
    config.heartbeat_interval = Duration::from_millis(50);
    config.election_timeout_min = Duration::from_millis(150);
    config.election_timeout_max = Duration::from_millis(300);
    config.proposal_timeout = Duration::from_secs(3);
    config.fsync = false;
    config
}

impl TestCluster {
    /// Starts `size` nodes and waits until they agree on a leader.
    pub async fn start(size: usize) -> TestCluster {
        Self::start_with(size, |_| {}).await
    }

    /// [`TestCluster::start`] with a change to every node's configuration.
    pub async fn start_with(size: usize, tweak: fn(&mut ClusterConfig)) -> TestCluster {
        let listeners: Vec<std::net::TcpListener> = (0..size)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|listener| listener.local_addr().expect("addr"))
            .collect();
        let dirs: Vec<TempDir> = (0..size)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let starts = listeners.into_iter().enumerate().map(|(index, listener)| {
            let mut config = test_config(
                index as u64 + 1,
                Listen::Bound(listener),
                &addrs,
                dirs[index].path().to_path_buf(),
            );
            tweak(&mut config);
            Coordinator::start(config)
        });
        let nodes = futures_util::future::join_all(starts)
            .await
            .into_iter()
            .map(|started| Some(started.expect("start node")))
            .collect();
        let cluster = TestCluster {
            nodes,
            addrs,
            dirs,
            tweak,
        };
        cluster.wait_for_leader().await;
        cluster
    }

    /// Node `id` (1-based).
    pub fn node(&self, id: u64) -> &Coordinator {
        self.nodes[id as usize - 1]
            .as_ref()
            .expect("node is running")
    }

    /// Waits until every running node names the same leader; returns it.
    pub async fn wait_for_leader(&self) -> u64 {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let leaders: Vec<Option<u64>> = self
                    .nodes
                    .iter()
                    .flatten()
                    .map(|node| node.status().leader)
                    .collect();
                if let Some(Some(leader)) = leaders.first() {
                    if leaders.iter().all(|other| *other == Some(*leader)) {
                        return *leader;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a leader is elected")
    }

    /// Stops node `id`, keeping its data directory.
    pub async fn stop(&mut self, id: u64) {
        let node = self.nodes[id as usize - 1].take().expect("node is running");
        node.shutdown().await;
    }

    /// Restarts node `id` on its old address with its old data directory.
    pub async fn restart(&mut self, id: u64) {
        let index = id as usize - 1;
        let mut config = test_config(
            id,
            Listen::Addr(self.addrs[index]),
            &self.addrs,
            self.dirs[index].path().to_path_buf(),
        );
        (self.tweak)(&mut config);
        self.nodes[index] = Some(Coordinator::start(config).await.expect("restart node"));
    }

    /// Stops every running node.
    pub async fn shutdown(mut self) {
        for node in self.nodes.iter_mut().filter_map(Option::take) {
            node.shutdown().await;
        }
    }
}

/// An unconditional claim (MQTT takeover semantics).
pub fn takeover(client_id: &str) -> ClaimRequest {
    ClaimRequest {
        client_id: client_id.to_owned(),
        expected_epoch: None,
        session_expiry_secs: 300,
        persistent: true,
        clean_start: false,
        now_ms: 1_700_000_000_000,
    }
}
