//! Multi-process tests of the wills of a lost node's clients (issue 13): "Wills of the lost
//! node's clients are published once, by the survivors." Three real `halyard` nodes on
//! loopback; the node holding the wills is killed with SIGKILL. The victim is a follower,
//! except in the leader's own test: killing the leader adds an election, which may fence the
//! survivors for a moment (see README) and drop the subscriber that watches for the wills,
//! so that test's watcher keeps a persistent session and resumes it.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::*;
use halyard_codec::{Packet, ProtocolVersion, Publish, QoS, ReasonCode, Will};

/// One cluster test at a time (see cluster_faults.rs: parallel clusters starve raft).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a will may take to arrive: the lease plus the margin before a silent node is
/// taken for gone (2 s), the will delay, and slack for debug builds on a busy machine.
const WILL_DEADLINE: Duration = Duration::from_secs(20);

/// How long the subscriber watches for a duplicate (or a cancelled will) afterwards.
const QUIET_MS: u64 = 3_000;

/// The Will Delay Interval of the delayed wills: longer than a reconnect to a survivor
/// takes (the CONNACK waits out the dead owner's 2 s hand-over timeout).
const DELAY_SECS: u32 = 6;
const DELAY: Duration = Duration::from_secs(DELAY_SECS as u64);

/// A follower to kill, and the two survivors.
fn pick_nodes(cluster: &Cluster) -> (usize, usize, usize) {
    let leader = cluster.status(1)["leader"].as_u64();
    let victim = if leader == Some(3) { 2 } else { 3 };
    let survivors: Vec<usize> = (1..=3).filter(|&id| id != victim).collect();
    (victim, survivors[0], survivors[1])
}

fn will_of(payload: &str, delay_secs: Option<u32>, retain: bool) -> Will {
    let mut will = will("wills/lost", payload.as_bytes(), QoS::AtLeastOnce, retain);
    will.properties.will_delay_interval = delay_secs;
    will
}

/// An MQTT 5 client `id` on `addr` with `will`, and a session that outlives its connection
/// by `expiry` seconds.
async fn with_will(addr: SocketAddr, id: &str, will: Will, expiry: u32, clean: bool) -> RawClient {
    let mut connect = connect_packet(ProtocolVersion::V5, id, clean);
    connect.will = Some(will);
    connect.properties.session_expiry_interval = Some(expiry);
    let (client, ack) = RawClient::handshake(addr, connect).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "CONNACK for {id}: {ack:?}");
    client
}

async fn watcher(addr: SocketAddr, id: &str) -> RawClient {
    let mut watcher = RawClient::connect_v5(addr, id, true).await;
    let codes = watcher.subscribe(1, &[("wills/#", QoS::AtLeastOnce)]).await;
    assert_eq!(codes, vec![ReasonCode::GRANTED_QOS_1]);
    watcher
}

/// The next PUBLISH within [`WILL_DEADLINE`], acknowledged.
async fn next_publish(client: &mut RawClient, what: &str) -> Publish {
    match client.try_recv(WILL_DEADLINE).await {
        Ok(Packet::Publish(publish)) => {
            client.ack(&publish).await;
            publish
        }
        other => panic!("expected {what}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wills_of_a_killed_nodes_clients_are_published_once_by_the_survivors() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start();
    let (victim, watching, other) = pick_nodes(&cluster);
    let mut watcher = watcher(cluster.addr(watching), "w-watcher").await;

    // The owner publishes a will itself when its client's connection drops, having won it
    // in raft first [MQTT-3.1.2-8]; it must not come again when the owner dies later.
    let dropped = with_will(
        cluster.addr(victim),
        "w-dropped",
        will_of("dropped", None, false),
        0,
        true,
    )
    .await;
    drop(dropped);
    let publish = next_publish(&mut watcher, "the dropped client's will").await;
    assert_eq!(&publish.payload[..], b"dropped");

    // A client that says DISCONNECT 0x00 has its will deleted [MQTT-3.1.2-10], also for
    // the survivors.
    let mut polite = with_will(
        cluster.addr(victim),
        "w-polite",
        will_of("polite", None, false),
        0,
        true,
    )
    .await;
    polite
        .send(&Packet::Disconnect(halyard_codec::Disconnect {
            reason: ReasonCode::SUCCESS,
            properties: Default::default(),
        }))
        .await;
    polite.expect_closed().await;

    let lost = with_will(
        cluster.addr(victim),
        "w-lost",
        will_of("lost", None, true),
        0,
        true,
    )
    .await;
    // Let the DISCONNECT's discard reach raft before the node dies.
    watcher.expect_nothing(500).await;
    let killed_at = Instant::now();
    cluster.kill9(victim);
    drop(lost);

    let publish = next_publish(&mut watcher, "the lost client's will").await;
    eprintln!(
        "kill -9 to will published by a survivor: {:?}",
        killed_at.elapsed()
    );
    assert_eq!(
        &publish.payload[..],
        b"lost",
        "only the lost client's will comes"
    );
    assert_eq!(publish.topic, "wills/lost");
    // Once: no second copy from the other survivor, and neither the dropped client's will
    // again nor the polite client's.
    watcher.expect_nothing(QUIET_MS).await;

    // Published as an ordinary message: the RETAIN flag holds cluster-wide [MQTT-3.3.1-5].
    let mut late = RawClient::connect_v5(cluster.addr(other), "w-late", true).await;
    late.subscribe(1, &[("wills/#", QoS::AtLeastOnce)]).await;
    // [MQTT-3.3.1-9]: a new subscription gets the retained messages that match it.
    let retained = next_publish(&mut late, "the retained will").await;
    assert_eq!(&retained.payload[..], b"lost");
    assert!(
        retained.retain,
        "sent for a new subscription, it carries RETAIN 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_elsewhere_cancels_a_killed_nodes_delayed_will_but_not_an_undelayed_one() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start();
    let (victim, watching, resuming) = pick_nodes(&cluster);
    let mut watcher = watcher(cluster.addr(watching), "d-watcher").await;

    // Two wills wait 6 s after the connection is lost; the sessions last 300 s.
    let returning = with_will(
        cluster.addr(victim),
        "d-returning",
        will_of("returning", Some(DELAY_SECS), false),
        300,
        true,
    )
    .await;
    let staying = with_will(
        cluster.addr(victim),
        "d-away",
        will_of("away", Some(DELAY_SECS), false),
        300,
        true,
    )
    .await;
    // A will without a delay was due when the connection was lost: a reconnect does not
    // take it back [MQTT-3.1.2-8].
    let prompt = with_will(
        cluster.addr(victim),
        "d-prompt",
        will_of("prompt", None, false),
        300,
        true,
    )
    .await;
    let killed_at = Instant::now();
    cluster.kill9(victim);
    drop((returning, staying, prompt));

    // [MQTT-3.1.3-9]: a new connection to the session before the Will Delay Interval has
    // passed: its will is not published. (The claims commit at once; the CONNACKs wait for
    // the dead owner's hand-over to time out.)
    let resuming = cluster.addr(resuming);
    let (mut back, _prompt_back) = tokio::join!(
        RawClient::connect_v5(resuming, "d-returning", false),
        RawClient::connect_v5(resuming, "d-prompt", false),
    );
    assert!(killed_at.elapsed() < DELAY, "reconnected within the delay");

    let publish = next_publish(&mut watcher, "the reconnected client's undelayed will").await;
    assert_eq!(&publish.payload[..], b"prompt");
    // The other client stays away: its will comes once, after the delay.
    let publish = next_publish(&mut watcher, "the absent client's delayed will").await;
    let waited = killed_at.elapsed();
    eprintln!("kill -9 to delayed will published: {waited:?}");
    assert_eq!(
        &publish.payload[..],
        b"away",
        "the returning client's will is cancelled"
    );
    assert!(
        waited >= DELAY,
        "[MQTT-3.1.2-8] not before its delay: {waited:?}"
    );
    watcher.expect_nothing(QUIET_MS).await;

    // The watcher still hears that topic, so the silence above means something.
    let packet = publish_packet("wills/back", b"back", QoS::AtLeastOnce, false, Some(1));
    assert!(!back.publish(packet).await.is_error());
    let publish = next_publish(&mut watcher, "a publish from the returned client").await;
    assert_eq!(&publish.payload[..], b"back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_left_by_a_node_killed_and_restarted_at_once_is_published_once() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start();
    let (victim, watching, _) = pick_nodes(&cluster);
    let mut watcher = watcher(cluster.addr(watching), "r-watcher").await;
    let lost = with_will(
        cluster.addr(victim),
        "r-lost",
        will_of("restarted", None, false),
        0,
        true,
    )
    .await;
    // The restarted process knows nothing of the connection its predecessor held, and the
    // leader may not miss the node for long: the restarted node publishes what its previous
    // process left, or the leader does, never both.
    cluster.kill9(victim);
    drop(lost);
    cluster.restart(victim);
    let publish = next_publish(&mut watcher, "the will of the killed process's client").await;
    assert_eq!(&publish.payload[..], b"restarted");
    watcher.expect_nothing(QUIET_MS).await;
}

/// A watcher with a session that outlives its connection, subscribed to the wills.
async fn persistent_watcher(addr: SocketAddr, id: &str) -> RawClient {
    let mut connect = connect_packet(ProtocolVersion::V5, id, true);
    connect.properties.session_expiry_interval = Some(300);
    let (mut watcher, ack) = RawClient::handshake(addr, connect).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    watcher.subscribe(1, &[("wills/#", QoS::AtLeastOnce)]).await;
    watcher
}

/// The next PUBLISH for the persistent watcher `id` on `addr`, which resumes its session
/// whenever its node fences itself for a moment (DISCONNECT 0x9C, CONNACK 0x88 meanwhile):
/// what was published in between waits in the session.
async fn next_publish_across_fences(
    addr: SocketAddr,
    id: &str,
    watcher: &mut RawClient,
) -> Publish {
    let deadline = Instant::now() + WILL_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match watcher.try_recv(left).await {
            Ok(Packet::Publish(publish)) => {
                watcher.ack(&publish).await;
                return publish;
            }
            Ok(Packet::Disconnect(_)) | Err(RecvError::Closed) => loop {
                assert!(
                    Instant::now() < deadline,
                    "{id} could not resume its session"
                );
                let mut connect = connect_packet(ProtocolVersion::V5, id, false);
                connect.properties.session_expiry_interval = Some(300);
                let (resumed, ack) = RawClient::handshake(addr, connect).await;
                if ack.code == ReasonCode::SUCCESS {
                    *watcher = resumed;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            },
            other => panic!("expected a will for {id}, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wills_of_a_killed_leaders_clients_are_published_once_by_the_new_leader_side() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start();
    let leader = cluster.status(1)["leader"]
        .as_u64()
        .and_then(|leader| usize::try_from(leader).ok())
        .expect("a leader");
    let watching = if leader == 1 { 2 } else { 1 };
    let mut watcher = persistent_watcher(cluster.addr(watching), "l-watcher").await;
    let lost = with_will(
        cluster.addr(leader),
        "l-lost",
        will_of("leader lost", None, false),
        0,
        true,
    )
    .await;
    // The survivors elect a new leader, which has never heard from the dead one: it counts
    // the lease and margin from its election.
    cluster.kill9(leader);
    drop(lost);
    let addr = cluster.addr(watching);
    let publish = next_publish_across_fences(addr, "l-watcher", &mut watcher).await;
    assert_eq!(&publish.payload[..], b"leader lost");
    match watcher.try_recv(Duration::from_millis(QUIET_MS)).await {
        Ok(Packet::Publish(again)) => panic!("the will came twice: {again:?}"),
        // Silence; or a late fence of the watcher's node, which ends the watch.
        Err(RecvError::Timeout | RecvError::Closed) | Ok(Packet::Disconnect(_)) => {}
        other => panic!("expected silence, got {other:?}"),
    }
}
