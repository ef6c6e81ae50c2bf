//! The cross-node scenarios against a real 3-node cluster (three servers with their raft
//! coordinators and peer links on loopback, in this process): publishers on node 1 reach a
//! subscriber on node 2, and sessions opened on node 1 are taken over on node 2.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use halyard_bench::run::{run, Params, Scenario};
use halyard_cluster::{ClusterConfig, Coordinator, Listen};
use halyard_core::{Broker, BrokerParts};
use halyard_server::{Server, ServerConfig};
use tempfile::TempDir;
use tokio::sync::oneshot;

struct Node {
    mqtt: SocketAddr,
    coordinator: Arc<Coordinator>,
    _stop: oneshot::Sender<()>,
    _dir: TempDir,
}

/// Starts three nodes and waits until each has joined (a leader known, itself a member),
/// which is what `/readyz` reports.
async fn start_cluster() -> Vec<Node> {
    let listeners: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind cluster port"))
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    let mut nodes = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = ClusterConfig::new(
            index as u64 + 1,
            Listen::Bound(listener),
            peers.clone(),
            dir.path().to_path_buf(),
        );
        cluster.fsync = false;
        let coordinator = Arc::new(Coordinator::start(cluster).await.expect("start node"));
        let config = ServerConfig {
            listeners: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            ..ServerConfig::default()
        };
        let broker = Broker::with_parts(config.broker.clone(), BrokerParts::replicated());
        let mut server = Server::bind_with(config, broker).await.expect("bind");
        server.join_cluster(Arc::clone(&coordinator));
        let mqtt = server.local_addrs()[0];
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        nodes.push(Node {
            mqtt,
            coordinator,
            _stop: stop,
            _dir: dir,
        });
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let joined = nodes.iter().all(|node| {
                let status = node.coordinator.status();
                status.leader.is_some() && status.members.iter().any(|m| m.id == status.node_id)
            });
            if joined {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every node joins the cluster");
    nodes
}

fn params(scenario: Scenario, addr: SocketAddr) -> Params {
    Params {
        scenario,
        host: addr.ip().to_string(),
        port: addr.port(),
        subscriber_port: None,
        takeover_port: None,
        rounds: 0,
        qos: 1,
        payload: 64,
        duration_s: 1.0,
        warmup_s: 0.2,
        drain_s: 5.0,
        inflight: 32,
        publishers: 4,
        subscribers: 1,
        rate: None,
        connections: 0,
        connect_concurrency: 1,
        hold_s: 0.0,
        keep_alive: 0,
        session_expiry: u32::MAX,
        broker_pid: None,
        mqtt_version: "3.1.1".to_owned(),
        threads: 2,
        run_id: format!("c{}", std::process::id()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_fanin_and_takeover_complete_on_a_three_node_cluster() {
    let nodes = start_cluster().await;
    let (a, b) = (nodes[0].mqtt, nodes[1].mqtt);

    let fanin = run(
        Params {
            subscriber_port: Some(b.port()),
            ..params(Scenario::Fanin, a)
        },
        a,
    )
    .await
    .expect("cross-node fan-in runs");
    assert_eq!(fanin.error_count, 0, "errors: {:?}", fanin.errors);
    let received = fanin.received.expect("counted");
    assert!(received > 0, "nothing published on node 1 reached node 2");
    assert_eq!(fanin.unexpected, Some(0));
    assert!(fanin.acked.is_some_and(|acked| acked > 0), "no PUBACK");

    let takeover = run(
        Params {
            takeover_port: Some(b.port()),
            rounds: 5,
            ..params(Scenario::Takeover, a)
        },
        a,
    )
    .await
    .expect("takeover runs");
    assert_eq!(takeover.error_count, 0, "errors: {:?}", takeover.errors);
    assert_eq!(takeover.takeovers, Some(5), "every round completed");
    // The session moved with its subscription [MQTT-3.2.2-3].
    assert_eq!(takeover.session_present, Some(5));
    let connack = takeover.takeover_connack_us.expect("one sample per round");
    assert_eq!(connack.count, 5);
    assert_eq!(
        takeover.takeover_old_closed_us.map(|l| l.count),
        Some(5),
        "node 1 closed every old connection [MQTT-3.1.4-3]"
    );
}
