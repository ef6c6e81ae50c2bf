//! Membership at run time (issue 13): `halyard cluster join|leave|status` against real
//! three-node clusters on loopback, and the fencing of a node that lost its data directory.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::{cluster_args, free_ports, readyz, Cluster};
use common::*;
use halyard_codec::QoS;

/// How long the polls below wait for a replicated effect before failing.
const DEADLINE: Duration = Duration::from_secs(30);

/// `halyard cluster ARGS --url` against the admin API at `http`; (success, stdout, stderr).
fn cluster_cli(http: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let url = format!("http://{http}");
    let mut all = vec!["cluster"];
    all.extend_from_slice(args);
    all.extend(["--url", url.as_str()]);
    let (status, stdout, stderr) = run_halyard(&all);
    (status.success(), stdout, stderr)
}

/// Polls `what` until it holds, failing with `context()` after [`DEADLINE`].
fn wait_until(what: &str, mut check: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} never happened: {}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The member ids (and whether each is a voter) in `/api/v1/cluster` of `node`.
fn members(node: &Broker) -> Vec<(u64, bool)> {
    let (code, body) = http(node.http_addr(), "GET", "/api/v1/cluster", None, None);
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    status["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|member| {
            let id = member["id"].as_u64().expect("id");
            (id, member["voter"].as_bool().expect("voter"))
        })
        .collect()
}

/// A clean-start MQTT 5 subscriber to `filter` on `addr`, once its SUBACK is in.
async fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> V5Client {
    let mut options = V5Client::options(addr, id);
    options.set_clean_start(true);
    let (mut client, _) = V5Client::connect_with(options).await;
    client
        .client
        .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client.wait_suback().await;
    client
}

/// One acknowledged QoS 1 publish from a new client on `addr`.
async fn publish_once(addr: SocketAddr, id: &str, topic: &str, payload: &[u8]) {
    let mut publisher = RawClient::connect_v5(addr, id, true).await;
    let reason = publisher
        .publish(publish_packet(
            topic,
            payload,
            QoS::AtLeastOnce,
            false,
            Some(1),
        ))
        .await;
    assert!(!reason.is_error(), "PUBACK on {topic}: {reason:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_as_learner_and_carries_traffic_both_ways() {
    let cluster = Cluster::start();
    let port = free_ports(1)[0];
    let addr4 = format!("127.0.0.1:{port}");
    let fourth = Broker::try_start_with_args(&cluster_args(Some(4), &addr4, &cluster.peer_list()))
        .unwrap_or_else(|error| panic!("{error}"));
    // Not a member yet: the voters refuse it and it never initializes a cluster of its own.
    assert_eq!(readyz(&fourth), 503);

    // Asked of a node that need not be the leader: it forwards the change.
    let (ok, stdout, stderr) = cluster_cli(cluster.node(2).http_addr(), &["join", "4", &addr4]);
    assert!(ok, "join: {stderr}");
    assert!(stdout.contains(&format!("  4 {addr4} learner")), "{stdout}");
    wait_until("node 4 ready", || readyz(&fourth) == 200, || fourth.logs());
    let expected = vec![(1, true), (2, true), (3, true), (4, false)];
    assert_eq!(members(cluster.node(1)), expected);

    // A subscriber on the learner gets what is published on a voter (its route reached the
    // voters), and the learner forwards to a voter's subscriber.
    let mut on_learner = subscriber(fourth.addr(), "sub-on-4", "j/#").await;
    let mut on_voter = subscriber(cluster.addr(2), "sub-on-2", "r/#").await;
    publish_once(cluster.addr(1), "pub-on-1", "j/1", b"to the learner").await;
    publish_once(fourth.addr(), "pub-on-4", "r/4", b"from the learner").await;
    assert_eq!(
        &on_learner.next_publish().await.payload[..],
        b"to the learner"
    );
    assert_eq!(
        &on_voter.next_publish().await.payload[..],
        b"from the learner"
    );

    let (ok, stdout, stderr) = cluster_cli(fourth.http_addr(), &["status"]);
    assert!(ok, "status: {stderr}");
    assert!(stdout.starts_with("node 4 (learner), leader "), "{stdout}");
    assert!(stdout.contains("links:\n  to 1 connected"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_removes_a_voter_and_the_other_two_keep_serving() {
    let mut cluster = Cluster::start();
    let (ok, stdout, stderr) = cluster_cli(cluster.node(1).http_addr(), &["leave", "3"]);
    assert!(ok, "leave: {stderr}");
    assert!(!stdout.contains("  3 "), "{stdout}");
    assert_eq!(members(cluster.node(2)), vec![(1, true), (2, true)]);
    let (ok, _, stderr) = cluster_cli(cluster.node(1).http_addr(), &["leave", "3"]);
    assert!(!ok);
    assert!(stderr.contains("node 3 is not a member"), "{stderr}");
    // Its data may now go: two voters are the whole cluster, and a quorum.
    cluster.node_mut(3).kill9();
    let mut subscriber = subscriber(cluster.addr(1), "after-leave-sub", "l/#").await;
    publish_once(cluster.addr(2), "after-leave-pub", "l/2", b"two voters").await;
    assert_eq!(&subscriber.next_publish().await.payload[..], b"two voters");
    assert_eq!(readyz(cluster.node(2)), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_with_an_empty_data_directory_is_fenced_until_removed_and_added_again() {
    let mut cluster = Cluster::start();
    cluster.restart_with_empty_data(3);
    let fenced = || {
        let (code, body) = http(cluster.node(3).http_addr(), "GET", "/readyz", None, None);
        code == 503 && body.contains("fenced by the cluster")
    };
    wait_until("node 3 fenced", fenced, || cluster.node(3).logs());
    let logs = cluster.node(3).logs();
    assert!(
        logs.contains("this node is fenced and cannot join"),
        "{logs}"
    );
    assert!(
        logs.contains("its data directory was lost or replaced"),
        "{logs}"
    );
    let peer_logs = format!("{}{}", cluster.node(1).logs(), cluster.node(2).logs());
    assert!(peer_logs.contains("cluster peer fenced"), "{peer_logs}");
    // The two others keep serving meanwhile.
    let mut subscriber = subscriber(cluster.addr(1), "fence-sub", "f/#").await;
    publish_once(cluster.addr(2), "fence-pub", "f/2", b"still two").await;
    assert_eq!(&subscriber.next_publish().await.payload[..], b"still two");

    // The operator's way back: remove the old node 3, add the new one, promote it.
    let http1 = cluster.node(1).http_addr();
    let (ok, _, stderr) = cluster_cli(http1, &["leave", "3"]);
    assert!(ok, "leave: {stderr}");
    let addr3 = cluster.cluster_addr(3).to_owned();
    let (ok, _, stderr) = cluster_cli(http1, &["join", "3", &addr3, "--voter"]);
    assert!(ok, "join: {stderr}");
    wait_until(
        "node 3 ready",
        || readyz(cluster.node(3)) == 200,
        || cluster.node(3).logs(),
    );
    assert_eq!(
        members(cluster.node(1)),
        vec![(1, true), (2, true), (3, true)]
    );
}
