//! Multi-process cluster tests under faults (issue 13): three real `halyard` nodes on
//! loopback, their cluster links through fault-injecting proxies where a test cuts them,
//! nodes killed with SIGKILL and restarted on their data directories. One test per case;
//! each starts its own cluster.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::{readyz, Cluster};
use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};

/// How long the polls below wait for a replicated or fault effect before failing (debug
/// builds of three nodes share two cores).
const DEADLINE: Duration = Duration::from_secs(20);

/// A raw MQTT 5 client `id` on `addr` with a session that outlives the connection.
async fn persistent_v5(addr: SocketAddr, id: &str, clean: bool) -> (RawClient, bool) {
    let mut connect = connect_packet(ProtocolVersion::V5, id, clean);
    connect.properties.session_expiry_interval = Some(300);
    let (client, ack) = RawClient::handshake(addr, connect).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "CONNACK for {id}: {ack:?}");
    (client, ack.session_present)
}

/// Polls `check` every 100 ms until it is true, failing with `what` after [`DEADLINE`].
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether node `from`'s peer link to node `to` is connected.
fn link_connected(cluster: &Cluster, from: usize, to: usize) -> bool {
    cluster.status(from)["links"]
        .as_array()
        .and_then(|links| links.iter().find(|l| l["node"].as_u64() == Some(to as u64)))
        .and_then(|link| link["connected"].as_bool())
        .unwrap_or(false)
}

/// Subscribes a fresh client on node `sub` to `topic` and has a fresh client on node `publ`
/// publish to it at QoS 1 until one message arrives (a route may still be on its way to the
/// publisher's node right after a heal or restart). Returns how many publishes it took.
async fn carries(cluster: &Cluster, publ: usize, sub: usize, topic: &str) -> usize {
    let mut subscriber =
        RawClient::connect_v5(cluster.addr(sub), &format!("carry-sub-{sub}-{publ}"), true).await;
    subscriber.subscribe(1, &[(topic, QoS::AtLeastOnce)]).await;
    let mut publisher =
        RawClient::connect_v5(cluster.addr(publ), &format!("carry-pub-{publ}-{sub}"), true).await;
    let deadline = Instant::now() + DEADLINE;
    for attempt in 1u16.. {
        let packet = publish_packet(topic, b"ping", QoS::AtLeastOnce, false, Some(attempt));
        let reason = publisher.publish(packet).await;
        assert!(!reason.is_error(), "PUBACK on node {publ}: {reason:?}");
        if let Ok(Packet::Publish(p)) = subscriber.try_recv(Duration::from_millis(300)).await {
            assert_eq!(&p.payload[..], b"ping");
            return usize::from(attempt);
        }
        assert!(
            Instant::now() < deadline,
            "node {publ} -> node {sub} carries no traffic"
        );
    }
    unreachable!("the loop returns or fails")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_carries_cluster_traffic_and_cuts_and_heals_one_pair() {
    let cluster = Cluster::start_with_proxies();
    carries(&cluster, 3, 1, "p/1").await;
    wait_until("node 1 links to node 3", || link_connected(&cluster, 1, 3));
    cluster.cut(1, 3);
    wait_until("the cut shows on node 1's link to node 3", || {
        !link_connected(&cluster, 1, 3)
    });
    assert!(
        link_connected(&cluster, 1, 2),
        "a cut between 1 and 3 leaves 1-2 alone"
    );
    // Node 3 still reaches the quorum through node 2, so it keeps serving.
    assert_eq!(readyz(cluster.node(3)), 200, "node 3 still has node 2");
    cluster.heal(1, 3);
    wait_until("node 1 links to node 3 again", || {
        link_connected(&cluster, 1, 3)
    });
    carries(&cluster, 3, 1, "p/2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_quorum_fences_itself_and_serves_again_after_heal() {
    let cluster = Cluster::start_with_proxies();
    let (mut victim, _) = persistent_v5(cluster.addr(3), "fenced-client", true).await;
    victim.subscribe(1, &[("f/#", QoS::AtLeastOnce)]).await;
    let cut_at = Instant::now();
    cluster.cut(3, 1);
    cluster.cut(3, 2);
    // The lease (1.5 s) lapses: node 3 drops its client with 0x9C Use another server.
    match victim.try_recv(DEADLINE).await {
        Ok(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::USE_ANOTHER_SERVER),
        other => panic!("expected DISCONNECT 0x9C from the fenced node, got {other:?}"),
    }
    victim.expect_closed().await;
    eprintln!(
        "client on the cut-off node disconnected after {:?}",
        cut_at.elapsed()
    );
    assert_eq!(readyz(cluster.node(3)), 503, "/readyz while fenced");
    assert_eq!(cluster.status(3)["fenced"], true, "{}", cluster.status(3));
    assert_eq!(metric(cluster.node(3), "halyard_cluster_fenced"), 1.0);

    // The minority refuses new sessions at once: 0x88 in MQTT 5, 0x03 in 3.1.1.
    let mut connect = connect_packet(ProtocolVersion::V5, "newcomer", true);
    connect.properties.session_expiry_interval = Some(300);
    let (_, ack) = RawClient::handshake(cluster.addr(3), connect).await;
    assert_eq!(ack.code, ReasonCode::SERVER_UNAVAILABLE, "MQTT 5: {ack:?}");
    assert!(!ack.session_present, "[MQTT-3.2.2-6]");
    let connect = connect_packet(ProtocolVersion::V3_1_1, "newcomer-v3", false);
    let (_, ack) = RawClient::handshake(cluster.addr(3), connect).await;
    assert_eq!(
        ack.code,
        ReasonCode::V3_SERVER_UNAVAILABLE,
        "3.1.1: {ack:?}"
    );

    // The majority takes the same client id, with its subscriptions from raft.
    let (mut moved, present) = persistent_v5(cluster.addr(1), "fenced-client", false).await;
    assert!(
        present,
        "session present = 1 from the subscriptions in raft"
    );
    assert_eq!(readyz(cluster.node(1)), 200, "the majority serves");
    let mut publisher = RawClient::connect_v5(cluster.addr(2), "f-pub", true).await;
    let packet = publish_packet("f/a", b"majority", QoS::AtLeastOnce, false, Some(1));
    assert!(!publisher.publish(packet).await.is_error());
    let publish = moved.recv_publish_ack().await;
    assert_eq!(&publish.payload[..], b"majority");

    cluster.heal(3, 1);
    cluster.heal(3, 2);
    wait_until("node 3 is ready again", || readyz(cluster.node(3)) == 200);
    assert_eq!(cluster.status(3)["fenced"], false);
    // It caught up: it knows node 1 owns the session now.
    wait_until("node 3 applied what the majority committed", || {
        let applied = cluster.status(3)["applied_index"].as_u64();
        applied >= cluster.status(1)["commit_index"].as_u64()
    });
    carries(&cluster, 1, 3, "h/to3").await;
    carries(&cluster, 3, 1, "h/to1").await;
    // The moved session stays where the majority put it.
    moved.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_survivors_serve_and_the_lost_nodes_session_resumes_elsewhere() {
    let mut cluster = Cluster::start();
    let (mut lost, _) = persistent_v5(cluster.addr(3), "lost-client", true).await;
    lost.subscribe(1, &[("k/#", QoS::AtLeastOnce)]).await;
    let mut watcher = RawClient::connect_v5(cluster.addr(1), "k-watcher", true).await;
    watcher.subscribe(1, &[("k/live", QoS::AtLeastOnce)]).await;
    let mut publisher = RawClient::connect_v5(cluster.addr(2), "k-pub", true).await;

    let killed_at = Instant::now();
    cluster.kill9(3);
    drop(lost);
    // Deliveries between the survivors go on, every one of them.
    for i in 0..10u16 {
        let payload = format!("live-{i}");
        let packet = publish_packet(
            "k/live",
            payload.as_bytes(),
            QoS::AtLeastOnce,
            false,
            Some(i + 1),
        );
        assert!(
            !publisher.publish(packet).await.is_error(),
            "PUBACK {payload}"
        );
        let publish = watcher.recv_publish_ack().await;
        assert_eq!(publish.payload, payload.as_bytes());
    }
    // The lost node's client resumes on node 2 without subscribing again.
    let (mut resumed, present) = persistent_v5(cluster.addr(2), "lost-client", false).await;
    eprintln!(
        "kill -9 to resumed session on a survivor: {:?}",
        killed_at.elapsed()
    );
    assert!(present, "[MQTT-3.2.2-2] session present = 1 on a survivor");
    let packet = publish_packet("k/x", b"after", QoS::AtLeastOnce, false, Some(100));
    assert!(!publisher.publish(packet).await.is_error());
    let publish = resumed.recv_publish_ack().await;
    assert_eq!(
        &publish.payload[..],
        b"after",
        "its old subscription k/# holds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_restarted_on_its_data_rejoins_as_itself_and_carries_traffic() {
    let mut cluster = Cluster::start();
    let incarnation = cluster.status(3)["incarnation"].as_u64();
    assert!(incarnation.is_some_and(|i| i != 0));
    cluster.kill9(3);
    carries(&cluster, 1, 2, "r/meanwhile").await;
    let restarted_at = Instant::now();
    cluster.restart(3);
    carries(&cluster, 1, 3, "r/to3").await;
    carries(&cluster, 3, 1, "r/to1").await;
    eprintln!("restart to traffic both ways: {:?}", restarted_at.elapsed());
    assert_eq!(
        cluster.status(3)["incarnation"].as_u64(),
        incarnation,
        "the same incarnation: it is itself"
    );
    let members = cluster.status(1)["members"].clone();
    let node3 = members
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == 3))
        .unwrap_or_else(|| panic!("node 3 in {members}"));
    assert_eq!(node3["incarnation"].as_u64(), incarnation);
}
