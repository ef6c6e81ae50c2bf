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

/// One fault test at a time: each runs three debug nodes, and several clusters at once on a
/// small machine starve raft of CPU and disk long enough to lapse the leases of healthy
/// nodes (which then fence themselves, as they should), failing tests at random.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _serial = SERIAL.lock().await;
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
    let _serial = SERIAL.lock().await;
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
        "client on the cut-off node disconnected after: {:?}",
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

    // The majority takes the same client id, with its subscriptions from raft (once it has
    // a leader: if node 3 led, nodes 1 and 2 elect one first).
    wait_until("node 1 serves", || readyz(cluster.node(1)) == 200);
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
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start();
    // A follower dies (node 3 unless it leads): killing the leader adds an election, which,
    // if it outlasts the lease, fences the survivors for a moment (see README).
    let leader = cluster.status(1)["leader"].as_u64();
    let victim = if leader == Some(3) { 2 } else { 3 };
    let (watching, resuming) = if victim == 3 { (1, 2) } else { (1, 3) };
    let (mut lost, _) = persistent_v5(cluster.addr(victim), "lost-client", true).await;
    lost.subscribe(1, &[("k/#", QoS::AtLeastOnce)]).await;
    let mut watcher = RawClient::connect_v5(cluster.addr(watching), "k-watcher", true).await;
    watcher.subscribe(1, &[("k/live", QoS::AtLeastOnce)]).await;
    let mut publisher = RawClient::connect_v5(cluster.addr(resuming), "k-pub", true).await;

    let killed_at = Instant::now();
    cluster.kill9(victim);
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
    // The lost node's client resumes on a survivor without subscribing again.
    let (mut resumed, present) = persistent_v5(cluster.addr(resuming), "lost-client", false).await;
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
    let _serial = SERIAL.lock().await;
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

/// The nodes' MQTT addresses, updated when a node restarts on a new port.
type Addrs = std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>;

/// A TCP connection and CONNECT to the first of `addrs` (from `start`, round robin) that
/// answers with a successful CONNACK; `None` after a round with none.
async fn connect_any(
    addrs: &Addrs,
    start: usize,
    connect: &halyard_codec::Connect,
) -> Option<(RawClient, usize, bool)> {
    let addrs = addrs.lock().expect("addrs").clone();
    for offset in 0..addrs.len() {
        let index = (start + offset) % addrs.len();
        let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(addrs[index]),
        )
        .await
        else {
            continue;
        };
        drop(stream);
        let mut client = RawClient::connect(addrs[index]).await;
        client.version = ProtocolVersion::V5;
        client
            .send(&Packet::Connect(Box::new(connect.clone())))
            .await;
        if let Ok(Packet::ConnAck(ack)) = client.try_recv(Duration::from_secs(3)).await {
            if ack.code == ReasonCode::SUCCESS {
                return Some((client, index, ack.session_present));
            }
        }
    }
    None
}

/// Publishes `roll/t` QoS 1 at about 50 msg/s with ids 0.., reconnecting to any node when
/// its node goes away, until `stop`; returns the ids that were PUBACKed.
async fn rolling_publisher(
    addrs: Addrs,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<u32> {
    use std::sync::atomic::Ordering;
    let connect = connect_packet(ProtocolVersion::V5, "roll-pub", true);
    let mut acked = Vec::new();
    let mut next = 0u32;
    let mut start = 0;
    while !stop.load(Ordering::SeqCst) {
        let Some((mut client, index, _)) = connect_any(&addrs, start, &connect).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        start = index + 1;
        while !stop.load(Ordering::SeqCst) {
            let id = next;
            next += 1;
            let packet_id = (id % 60000 + 1) as u16;
            let packet = publish_packet(
                "roll/t",
                id.to_string().as_bytes(),
                QoS::AtLeastOnce,
                false,
                Some(packet_id),
            );
            client.send(&Packet::Publish(packet)).await;
            let acked_now = loop {
                match client.try_recv(Duration::from_secs(3)).await {
                    Ok(Packet::PubAck(ack)) if ack.packet_id == packet_id => {
                        break !ack.reason.is_error()
                    }
                    Ok(Packet::PubAck(_)) => {}
                    _ => break false,
                }
            };
            if !acked_now {
                break;
            }
            acked.push(id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    acked
}

/// A persistent QoS 1 subscriber to `roll/t` that acknowledges every message and reconnects
/// (Clean Start 0) to any node when its node goes away, until `stop`; returns the ids it got.
async fn rolling_subscriber(
    addrs: Addrs,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> std::collections::BTreeSet<u32> {
    use std::sync::atomic::Ordering;
    let mut connect = connect_packet(ProtocolVersion::V5, "roll-sub", true);
    connect.properties.session_expiry_interval = Some(300);
    let first_addr = addrs.lock().expect("addrs")[0];
    let (mut first, _) = RawClient::handshake(first_addr, connect.clone()).await;
    first.subscribe(1, &[("roll/t", QoS::AtLeastOnce)]).await;
    let _ = subscribed.send(());
    connect.clean_start = false;
    let mut received = std::collections::BTreeSet::new();
    let mut client = Some(first);
    let mut start = 1;
    while !stop.load(Ordering::SeqCst) {
        let mut current = match client.take() {
            Some(current) => current,
            None => match connect_any(&addrs, start, &connect).await {
                Some((current, index, present)) => {
                    assert!(
                        present,
                        "the persistent session resumes on node {}",
                        index + 1
                    );
                    start = index + 1;
                    current
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        loop {
            match current.try_recv(Duration::from_millis(200)).await {
                Ok(Packet::Publish(publish)) => {
                    current.ack(&publish).await;
                    let id: u32 = String::from_utf8_lossy(&publish.payload)
                        .parse()
                        .expect("numeric payload");
                    received.insert(id);
                }
                Ok(_) => {}
                Err(RecvError::Timeout) => {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    }
    received
}

/// The takeover window this exercises: when the subscriber's claim is applied on its old
/// node before the publisher's node, the publisher's node still routes to the old one,
/// which passes the message on to the new owner addressed to the session (`move_window`);
/// and the new owner keeps copies of what is routed to it while its claim is pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_qos1_traffic_loses_no_acknowledged_message() {
    let _serial = SERIAL.lock().await;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut cluster = Cluster::start();
    // Restarted nodes get new MQTT ports; the clients learn them through this list.
    let addrs: Addrs = Arc::new(std::sync::Mutex::new(
        (1..=3).map(|id| cluster.addr(id)).collect(),
    ));
    let stop_sub = Arc::new(AtomicBool::new(false));
    let stop_pub = Arc::new(AtomicBool::new(false));
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let subscriber = tokio::spawn(rolling_subscriber(
        Arc::clone(&addrs),
        Arc::clone(&stop_sub),
        subscribed_tx,
    ));
    subscribed_rx.await.expect("subscribed");
    let publisher = tokio::spawn(rolling_publisher(Arc::clone(&addrs), Arc::clone(&stop_pub)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut drained_logs = String::new();
    for id in 1..=3 {
        cluster.node(id).sigterm();
        let exited = cluster.node_mut(id).wait_exit(DEADLINE);
        assert!(exited.is_some(), "node {id} did not exit after SIGTERM");
        let logs = cluster.node(id).logs();
        assert!(
            logs.contains("cluster drain done"),
            "node {id} drain: {logs}"
        );
        drained_logs.push_str(&format!("---- node {id} before its restart ----\n{logs}\n"));
        cluster.restart(id);
        addrs.lock().expect("addrs")[id - 1] = cluster.addr(id);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_pub.store(true, Ordering::SeqCst);
    let acked = publisher.await.expect("publisher");
    assert!(
        acked.len() > 100,
        "the publisher got through: {}",
        acked.len()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_sub.store(true, Ordering::SeqCst);
    let received = subscriber.await.expect("subscriber");
    let lost: Vec<u32> = acked
        .iter()
        .copied()
        .filter(|id| !received.contains(id))
        .collect();
    eprintln!(
        "rolling restart: {} acknowledged, {} received, {} acknowledged lost",
        acked.len(),
        received.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}\n{drained_logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_and_its_persistent_session_moves_with_its_queue() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start();
    let (mut subscriber, _) = persistent_v5(cluster.addr(1), "drain-sub", true).await;
    subscriber.subscribe(1, &[("d/#", QoS::AtLeastOnce)]).await;
    subscriber.disconnect().await;
    let mut publisher = RawClient::connect_v5(cluster.addr(2), "drain-pub", true).await;
    const COUNT: u16 = 10;
    for i in 0..COUNT {
        let payload = format!("m-{i}");
        let packet = publish_packet(
            "d/x",
            payload.as_bytes(),
            QoS::AtLeastOnce,
            false,
            Some(i + 1),
        );
        assert!(
            !publisher.publish(packet).await.is_error(),
            "PUBACK {payload}"
        );
    }
    // Queued in the offline session on node 1.
    cluster.wait_link_drained(2, 1);
    let mut live = RawClient::connect_v5(cluster.addr(1), "drain-live", true).await;
    cluster.node(1).sigterm();
    live.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN)
        .await;
    // Node 1 drains: it still runs, so the session and its queue move at once to node 3.
    let (mut resumed, present) = persistent_v5(cluster.addr(3), "drain-sub", false).await;
    assert!(present, "[MQTT-3.2.2-2] session present = 1");
    for i in 0..COUNT {
        let publish = resumed.recv_publish_ack().await;
        assert_eq!(
            publish.payload,
            format!("m-{i}").as_bytes(),
            "queued on node 1"
        );
    }
    let exited = cluster.node_mut(1).wait_exit(DEADLINE);
    assert!(exited.is_some_and(|status| status.success()), "{exited:?}");
    let logs = cluster.node(1).logs();
    assert!(logs.contains("cluster drain done"), "{logs}");
    assert!(!logs.contains("drain timed out"), "{logs}");
}
