//! Multi-process cluster tests (issue 12): three real `halyard` nodes on loopback, driven
//! with rumqttc (MQTT 5) and raw packets.
//!
//! Every test starts its own [`Cluster`]: each one changes session ownership, routes or
//! retained state that another test could observe, so none is shared.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::cluster::{cluster_args, readyz, Cluster};
use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};

/// How long the polls below wait for a replicated effect before failing.
const REPLICATION_DEADLINE: Duration = Duration::from_secs(10);

/// A raw MQTT 5 client `id` on `addr` with a session that outlives the connection.
async fn persistent_v5(addr: std::net::SocketAddr, id: &str, clean: bool) -> (RawClient, bool) {
    let mut connect = connect_packet(ProtocolVersion::V5, id, clean);
    connect.properties.session_expiry_interval = Some(300);
    let (client, ack) = RawClient::handshake(addr, connect).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "CONNACK for {id}: {ack:?}");
    (client, ack.session_present)
}

/// Publishes `count` QoS 1 messages `{prefix}-{i}` to `topic`, each acknowledged.
async fn publish_qos1(client: &mut RawClient, topic: &str, prefix: &str, count: u16) {
    for i in 0..count {
        let payload = format!("{prefix}-{i}");
        let packet = publish_packet(
            topic,
            payload.as_bytes(),
            QoS::AtLeastOnce,
            false,
            Some(i + 1),
        );
        // 0x10 (no matching subscribers) is a success too [MQTT-3.4.2.1].
        let reason = client.publish(packet).await;
        assert!(!reason.is_error(), "PUBACK of {payload}: {reason:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_on_one_node_gets_every_qos1_message_from_the_others_in_order() {
    let cluster = Cluster::start();
    let mut options = V5Client::options(cluster.addr(1), "sub1");
    options.set_clean_start(true);
    let (mut subscriber, _) = V5Client::connect_with(options).await;
    subscriber
        .client
        .subscribe("c1/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    subscriber.wait_suback().await;
    // Publish right after SUBACK: the SUBACK waits until every node applied the route.
    let mut publisher2 = RawClient::connect_v5(cluster.addr(2), "pub2", true).await;
    let mut publisher3 = RawClient::connect_v5(cluster.addr(3), "pub3", true).await;
    const COUNT: u16 = 20;
    let (_, _) = tokio::join!(
        publish_qos1(&mut publisher2, "c1/a", "n2", COUNT),
        publish_qos1(&mut publisher3, "c1/b", "n3", COUNT)
    );
    let mut next = [0u16; 2];
    for _ in 0..2 * COUNT {
        let publish = subscriber.next_publish().await;
        let payload = String::from_utf8_lossy(&publish.payload).into_owned();
        let (node, i) = payload.split_once('-').expect("payload node-i");
        let slot = if node == "n2" { 0 } else { 1 };
        let i: u16 = i.parse().expect("index");
        assert_eq!(
            i, next[slot],
            "{node}: out of order or duplicated ({payload})"
        );
        next[slot] += 1;
    }
    assert_eq!(next, [COUNT, COUNT]);
    subscriber.expect_no_publish(300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_published_on_node_1_reaches_a_new_subscriber_on_node_3() {
    let cluster = Cluster::start();
    let mut publisher = RawClient::connect_v5(cluster.addr(1), "rpub", true).await;
    let packet = publish_packet("c2/state", b"on", QoS::AtLeastOnce, true, Some(1));
    let reason = publisher.publish(packet).await;
    assert!(!reason.is_error(), "PUBACK: {reason:?}");
    // The retained message replicates through raft after the PUBACK, so a subscriber on
    // node 3 may come too early: retry with a new subscriber until a deadline instead of
    // sleeping a guessed time.
    let deadline = Instant::now() + REPLICATION_DEADLINE;
    loop {
        let mut subscriber = RawClient::connect_v5(cluster.addr(3), "rsub", true).await;
        subscriber.subscribe(1, &[("c2/#", QoS::AtLeastOnce)]).await;
        match subscriber.try_recv(Duration::from_millis(300)).await {
            Ok(Packet::Publish(p)) => {
                assert_eq!(p.topic, "c2/state");
                assert_eq!(&p.payload[..], b"on");
                assert!(p.retain, "[MQTT-3.3.1-8] retained on subscribe: RETAIN = 1");
                return;
            }
            Err(RecvError::Timeout) => {}
            other => panic!("expected the retained PUBLISH, got {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "retained message never reached node 3"
        );
        subscriber.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_moves_from_node_1_to_node_3_with_its_queue() {
    let cluster = Cluster::start();
    let (mut session, present) = persistent_v5(cluster.addr(1), "roamer", true).await;
    assert!(!present);
    session.subscribe(1, &[("c3/#", QoS::AtLeastOnce)]).await;
    session.disconnect().await;
    let mut publisher = RawClient::connect_v5(cluster.addr(2), "pub", true).await;
    const COUNT: u16 = 10;
    publish_qos1(&mut publisher, "c3/x", "m", COUNT).await;
    // PUBACK on node 2 means the forwards sit in its link queue; wait until node 1 stored
    // them (acknowledged on the link) so the queue is in the session node 3 takes over.
    cluster.wait_link_drained(2, 1);
    let (mut resumed, present) = persistent_v5(cluster.addr(3), "roamer", false).await;
    assert!(present, "[MQTT-3.2.2-2] session present = 1 on resume");
    for i in 0..COUNT {
        let publish = resumed.recv_publish_ack().await;
        assert_eq!(publish.payload, format!("m-{i}").as_bytes());
    }
    resumed.expect_nothing(300).await;
}

/// A QoS 1 PUBACK in a cluster means the message is stored in the outbox of every node with
/// a matching route: acknowledged on node 1 while the subscriber's node 2 is down, it
/// survives `kill -9` of node 1 as well, is replayed once both are back, and the persistent
/// subscriber resumes on node 2 with every message, once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_acknowledged_while_their_node_is_down_survive_a_crash_of_the_sender() {
    let mut cluster = Cluster::start();
    let (mut session, _) = persistent_v5(cluster.addr(2), "keeper", true).await;
    session.subscribe(1, &[("c9/#", QoS::AtLeastOnce)]).await;
    session.disconnect().await;
    cluster.kill9(2);
    let mut publisher = RawClient::connect_v5(cluster.addr(1), "pub9", true).await;
    const COUNT: u16 = 20;
    publish_qos1(&mut publisher, "c9/x", "m", COUNT).await;
    assert!(
        cluster.unacked(1, 2) > 0,
        "node 2 is down: nothing acknowledged yet"
    );
    // Node 1's link queue is in memory: only its outbox on disk holds the messages now.
    cluster.kill9(1);
    cluster.restart(2);
    cluster.restart(1);
    let (mut resumed, present) = persistent_v5(cluster.addr(2), "keeper", false).await;
    assert!(present, "[MQTT-3.2.2-2] session present = 1 on resume");
    for i in 0..COUNT {
        let publish = resumed.recv_publish_ack().await;
        assert_eq!(
            String::from_utf8_lossy(&publish.payload),
            format!("m-{i}"),
            "replayed in order, without duplicates"
        );
    }
    resumed.expect_nothing(500).await;
}

/// Under `queue_full_policy = "pushback"` a subscriber that stops reading does not lose what
/// other nodes forward to it: its node takes a forward only once the subscriber's queue has
/// room, and leaves it unacknowledged meanwhile (so the sender keeps it), instead of
/// dropping it as a full queue of the drop policies would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_on_another_node_loses_nothing_under_pushback() {
    let cluster = Cluster::start_with_config(
        "queue_full_policy = \"pushback\"\nmax_inflight = 1\nmax_queued_messages = 5\n",
    );
    let mut subscriber = RawClient::connect_v5(cluster.addr(2), "stalled", true).await;
    subscriber
        .subscribe(1, &[("c10/#", QoS::AtLeastOnce)])
        .await;
    let mut publisher = RawClient::connect_v5(cluster.addr(1), "pub10", true).await;
    const COUNT: u16 = 40;
    publish_qos1(&mut publisher, "c10/x", "m", COUNT).await;
    assert!(
        cluster.unacked(1, 2) > 0,
        "node 2 holds forwards its full subscriber has no room for, unacknowledged"
    );
    for i in 0..COUNT {
        let publish = subscriber.recv_publish_ack().await;
        assert_eq!(
            String::from_utf8_lossy(&publish.payload),
            format!("m-{i}"),
            "every message, in order"
        );
    }
    subscriber.expect_nothing(300).await;
    assert_eq!(
        metric(
            cluster.node(2),
            "halyard_messages_dropped_total{reason=\"queue_full\"}"
        ),
        0.0,
        "nothing dropped for the full subscriber"
    );
    cluster.wait_link_drained(1, 2);
}

/// A clean start on node 2 ends the session that node 1 held for the client id, so the
/// will node 1 held back for its Will Delay Interval is published now, once, wherever its
/// subscribers are [MQTT-3.1.3-9].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_start_on_another_node_publishes_the_delayed_will_of_the_old_session() {
    let cluster = Cluster::start();
    let mut watcher = RawClient::connect_v5(cluster.addr(3), "watcher", true).await;
    watcher
        .subscribe(1, &[("c10/will", QoS::AtLeastOnce)])
        .await;
    let mut connect = connect_packet(ProtocolVersion::V5, "willer", false);
    connect.properties.session_expiry_interval = Some(300);
    let mut last_words = will("c10/will", b"gone", QoS::AtLeastOnce, false);
    last_words.properties.will_delay_interval = Some(600);
    connect.will = Some(last_words);
    let (client, ack) = RawClient::handshake(cluster.addr(1), connect).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    // Gone without DISCONNECT: the will waits out its delay on node 1.
    drop(client);
    watcher.expect_nothing(500).await;
    let (_fresh, present) = persistent_v5(cluster.addr(2), "willer", true).await;
    assert!(!present, "clean start: a new session");
    let publish = watcher.recv_publish_ack().await;
    assert_eq!(publish.topic, "c10/will");
    assert_eq!(&publish.payload[..], b"gone");
    watcher.expect_nothing(500).await;
}

/// A persistent session whose node dies resumes on another node from raft (its
/// subscriptions, no queue); once the dead node is back with its data directory, it hands
/// the queue it held over to the new owner, and the client gets those messages too, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_hands_the_queue_of_a_session_that_moved_to_its_new_owner() {
    let mut cluster = Cluster::start();
    let (mut session, _) = persistent_v5(cluster.addr(1), "mover2", true).await;
    session.subscribe(1, &[("c11/#", QoS::AtLeastOnce)]).await;
    session.disconnect().await;
    let mut publisher = RawClient::connect_v5(cluster.addr(3), "pub11", true).await;
    publish_qos1(&mut publisher, "c11/x", "queued", 10).await;
    cluster.wait_link_drained(3, 1);
    cluster.kill9(1);
    let (mut resumed, present) = persistent_v5(cluster.addr(2), "mover2", false).await;
    assert!(present, "subscriptions resume from raft");
    publish_qos1(&mut publisher, "c11/x", "live", 5).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(String::from_utf8_lossy(&resumed.recv_publish_ack().await.payload).into_owned());
    }
    cluster.restart(1);
    for _ in 0..10 {
        got.push(String::from_utf8_lossy(&resumed.recv_publish_ack().await.payload).into_owned());
    }
    resumed.expect_nothing(500).await;
    got.sort();
    let mut expected: Vec<String> = (0..10)
        .map(|i| format!("queued-{i}"))
        .chain((0..5).map(|i| format!("live-{i}")))
        .collect();
    expected.sort();
    assert_eq!(got, expected, "every message once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_again_on_node_2_takes_the_session_over_from_node_1() {
    let cluster = Cluster::start();
    let mut first = RawClient::connect_v5(cluster.addr(1), "mover", true).await;
    let mut second = RawClient::connect_v5(cluster.addr(2), "mover", true).await;
    match first.try_recv(Duration::from_secs(1)).await {
        Ok(Packet::Disconnect(d)) => assert_eq!(
            d.reason,
            ReasonCode::SESSION_TAKEN_OVER,
            "[MQTT-3.1.4-3] the old connection gets 0x8E"
        ),
        other => panic!("expected DISCONNECT 0x8E on node 1, got {other:?}"),
    }
    first.expect_closed_within(Duration::from_secs(1)).await;
    second.subscribe(1, &[("c4/t", QoS::AtLeastOnce)]).await;
    let packet = publish_packet("c4/t", b"hi", QoS::AtLeastOnce, false, Some(2));
    assert_eq!(second.publish(packet).await, ReasonCode::SUCCESS);
    let publish = second.recv_publish_ack().await;
    assert_eq!(&publish.payload[..], b"hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_across_nodes_delivers_each_message_to_one_member() {
    let cluster = Cluster::start();
    let mut member1 = RawClient::connect_v5(cluster.addr(1), "m1", true).await;
    let mut member2 = RawClient::connect_v5(cluster.addr(2), "m2", true).await;
    member1
        .subscribe(1, &[("$share/g/c5/t", QoS::AtLeastOnce)])
        .await;
    member2
        .subscribe(1, &[("$share/g/c5/t", QoS::AtLeastOnce)])
        .await;
    let mut publisher = RawClient::connect_v5(cluster.addr(3), "pub", true).await;
    const COUNT: u16 = 20;
    publish_qos1(&mut publisher, "c5/t", "s", COUNT).await;
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + REPLICATION_DEADLINE;
    while seen.len() < usize::from(COUNT) {
        assert!(tokio::time::Instant::now() < deadline, "only got {seen:?}");
        for member in [&mut member1, &mut member2] {
            match member.try_recv(Duration::from_millis(100)).await {
                Ok(Packet::Publish(p)) => {
                    member.ack(&p).await;
                    let payload = String::from_utf8_lossy(&p.payload).into_owned();
                    assert!(seen.insert(payload.clone()), "{payload} delivered twice");
                }
                Err(RecvError::Timeout) => {}
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }
    member1.expect_nothing(300).await;
    member2.expect_nothing(100).await;
}

/// Whether a connection is still open and answering, closed, or silent for now.
#[derive(Debug, PartialEq, Eq)]
enum Liveness {
    Alive,
    Closed,
    Unknown,
}

/// PINGREQ and what comes back; a DISCONNECT (the fence) counts as closed.
async fn probe(client: &mut RawClient) -> Liveness {
    client.send(&Packet::PingReq).await;
    loop {
        match client.try_recv(Duration::from_millis(500)).await {
            Ok(Packet::PingResp) => return Liveness::Alive,
            Ok(Packet::Disconnect(_)) | Err(RecvError::Closed) => return Liveness::Closed,
            Ok(_) => continue,
            Err(_) => return Liveness::Unknown,
        }
    }
}

/// Sends CONNECT (MQTT 5, clean start) and returns the client if CONNACK was a success.
async fn try_connect(addr: std::net::SocketAddr, id: &str) -> Option<RawClient> {
    let mut client = RawClient::connect(addr).await;
    client.version = ProtocolVersion::V5;
    let connect = connect_packet(ProtocolVersion::V5, id, true);
    client.send(&Packet::Connect(Box::new(connect))).await;
    match client.try_recv(TIMEOUT).await {
        Ok(Packet::ConnAck(ack)) if ack.code == ReasonCode::SUCCESS => Some(client),
        Ok(Packet::ConnAck(_)) | Err(RecvError::Closed) => None,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_client_id_on_two_nodes_at_once_leaves_exactly_one_live_connection() {
    let cluster = Cluster::start();
    for attempt in 0..100 {
        let (a, b) = tokio::join!(
            try_connect(cluster.addr(1), "racer"),
            try_connect(cluster.addr(2), "racer")
        );
        let mut open: Vec<RawClient> = [a, b].into_iter().flatten().collect();
        assert!(!open.is_empty(), "attempt {attempt}: both claims lost");
        // The loser is fenced once the winner's claim is applied on its node: poll until
        // exactly one connection remains and answers.
        let deadline = Instant::now() + REPLICATION_DEADLINE;
        loop {
            let mut states = Vec::new();
            for client in open.iter_mut() {
                states.push(probe(client).await);
            }
            let mut index = 0;
            open.retain(|_| {
                index += 1;
                states[index - 1] != Liveness::Closed
            });
            assert!(
                !open.is_empty(),
                "attempt {attempt}: no live connection left"
            );
            if open.len() == 1 && states.contains(&Liveness::Alive) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "attempt {attempt}: still {} connections ({states:?})",
                open.len()
            );
        }
        let mut winner = open.pop().expect("one left");
        assert_eq!(
            probe(&mut winner).await,
            Liveness::Alive,
            "attempt {attempt}"
        );
        winner.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_readiness_and_term_metric_agree() {
    let cluster = Cluster::start();
    for id in 1..=3 {
        assert_eq!(readyz(cluster.node(id)), 200, "node {id} ready");
    }
    // Right after an election the followers may not have heard of the leader's term yet.
    let deadline = Instant::now() + REPLICATION_DEADLINE;
    let term = loop {
        let statuses: Vec<_> = (1..=3).map(|id| cluster.status(id)).collect();
        let leaders: HashSet<_> = statuses.iter().map(|s| s["leader"].as_u64()).collect();
        let terms: HashSet<_> = statuses.iter().map(|s| s["term"].as_u64()).collect();
        let leading = statuses.iter().filter(|s| s["role"] == "leader").count();
        if leaders.len() == 1 && terms.len() == 1 && leading == 1 {
            for (index, status) in statuses.iter().enumerate() {
                assert_eq!(status["node_id"].as_u64(), Some(index as u64 + 1));
                let mut members: Vec<u64> = status["members"]
                    .as_array()
                    .expect("members")
                    .iter()
                    .filter_map(|m| m["id"].as_u64())
                    .collect();
                members.sort_unstable();
                assert_eq!(members, [1, 2, 3], "members of node {}", index + 1);
            }
            assert!(
                leaders.iter().all(Option::is_some),
                "a leader: {statuses:?}"
            );
            break terms.into_iter().next().flatten().expect("a term");
        }
        assert!(Instant::now() < deadline, "no agreement: {statuses:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(term > 0);
    for id in 1..=3 {
        let value = metric(cluster.node(id), "halyard_cluster_raft_term");
        assert!(
            value >= term as f64,
            "node {id}: raft_term {value} vs {term}"
        );
    }
}

#[test]
fn a_node_with_peers_but_no_node_id_exits_naming_the_key() {
    let data_dir = unique_temp_path("data", "d");
    let data = data_dir.to_string_lossy().into_owned();
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
    ];
    let cluster = cluster_args(None, "127.0.0.1:1", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3");
    args.extend(cluster.iter().map(String::as_str));
    let (status, _, stderr) = run_halyard(&args);
    let _ = std::fs::remove_dir_all(&data_dir);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("cluster.node_id"), "stderr: {stderr}");
}
