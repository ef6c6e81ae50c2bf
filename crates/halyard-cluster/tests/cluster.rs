//! Three coordinators in one process on 127.0.0.1 ephemeral ports with temp dirs.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halyard_cluster::{Change, ClaimOutcome, ClusterError, RouteKey, SubscriptionChange};
use support::{takeover, TestCluster, PATIENCE};

fn granted_epoch(outcome: &ClaimOutcome) -> u64 {
    match outcome {
        ClaimOutcome::Granted { epoch, .. } => *epoch,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn add(filter: &str) -> SubscriptionChange {
    SubscriptionChange::Add {
        filter: filter.to_owned(),
        options: Bytes::from_static(b"\x01"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_one_node_is_seen_on_another_with_a_larger_epoch() {
    let cluster = TestCluster::start(3).await;
    let first = cluster
        .node(1)
        .claim(takeover("alpha"))
        .await
        .expect("claim on node 1");
    let second = cluster
        .node(2)
        .claim(takeover("alpha"))
        .await
        .expect("claim on node 2");
    let first_epoch = granted_epoch(&first.value);
    let second_epoch = granted_epoch(&second.value);
    assert!(second_epoch > first_epoch);
    assert_eq!(
        second.value,
        ClaimOutcome::Granted {
            epoch: second_epoch,
            previous: Some((1, first_epoch)),
            generation: 1,
        }
    );
    cluster
        .node(3)
        .wait_applied(second.index, PATIENCE)
        .await
        .expect("node 3 catches up");
    let owner = cluster
        .node(3)
        .owner("alpha")
        .expect("node 3 knows the owner");
    assert_eq!((owner.node, owner.epoch), (2, second_epoch));

    let stale = halyard_cluster::ClaimRequest {
        expected_epoch: Some(first_epoch),
        ..takeover("alpha")
    };
    let refused = cluster.node(3).claim(stale).await.expect("a CAS answers");
    assert!(
        matches!(refused.value, ClaimOutcome::Conflict { current: Some(ref owner) } if owner.epoch == second_epoch)
    );
    assert_eq!(cluster.node(3).metrics().claims_refused, 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_one_client_get_distinct_epochs_and_one_owner() {
    let cluster = Arc::new(TestCluster::start(3).await);
    let mut tasks = Vec::new();
    for claim in 0..100u64 {
        let cluster = cluster.clone();
        let node = claim % 3 + 1;
        tasks.push(tokio::spawn(async move {
            let commit = cluster
                .node(node)
                .claim(takeover("contended"))
                .await
                .expect("claim");
            (granted_epoch(&commit.value), node)
        }));
    }
    let mut epochs = BTreeSet::new();
    let mut last = (0, 0);
    for task in tasks {
        let (epoch, node) = task.await.expect("task");
        assert!(epochs.insert(epoch), "epoch {epoch} granted twice");
        last = last.max((epoch, node));
    }
    assert_eq!(epochs.len(), 100);
    for id in 1..=3 {
        cluster
            .node(id)
            .wait_applied(last.0, PATIENCE)
            .await
            .expect("caught up");
        let owner = cluster.node(id).owner("contended").expect("an owner");
        assert_eq!(
            (owner.epoch, owner.node),
            last,
            "node {id} agrees on the owner"
        );
    }
    let Ok(cluster) = Arc::try_unwrap(cluster) else {
        panic!("tasks done");
    };
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_reach_every_route_index_at_the_same_applied_index() {
    let cluster = TestCluster::start(3).await;
    let mut feeds: Vec<_> = (1..=3).map(|id| cluster.node(id).changes().1).collect();
    let claim = cluster.node(1).claim(takeover("sub")).await.expect("claim");
    let epoch = granted_epoch(&claim.value);
    let commit = cluster
        .node(1)
        .update_subscriptions(
            "sub",
            epoch,
            vec![add("sensors/+/temp"), add("$share/g/jobs/#")],
        )
        .await
        .expect("subscribe");
    assert!(commit.value, "the owner's epoch is current");
    let expected_route = Change::RouteAdded {
        filter: "jobs/#".into(),
        group: Some("g".into()),
        node: 1,
    };
    for (index, feed) in feeds.iter_mut().enumerate() {
        let applied = tokio::time::timeout(PATIENCE, async {
            loop {
                let applied = feed.recv().await.expect("feed open");
                if applied.changes.contains(&expected_route) {
                    return applied;
                }
            }
        })
        .await
        .expect("route change arrives");
        assert_eq!(
            applied.index,
            commit.index,
            "node {} applied it at the same index",
            index + 1
        );
    }
    let routes = cluster.node(1).routes();
    for id in 2..=3 {
        assert_eq!(cluster.node(id).routes(), routes);
    }
    let plain = RouteKey {
        filter: "sensors/+/temp".into(),
        group: None,
    };
    assert_eq!(routes[&plain], BTreeSet::from([1]));
    let fenced = cluster
        .node(2)
        .update_subscriptions("sub", epoch - 1, vec![add("x")])
        .await
        .expect("answered");
    assert!(!fenced.value, "a stale epoch is fenced off");

    let (mirror, _) = cluster.node(3).changes();
    assert!(mirror.applied_index >= commit.index);
    assert_eq!(mirror.routes, routes);
    assert_eq!(mirror.owners["sub"].epoch, epoch);

    let retained = cluster
        .node(2)
        .set_retained("sensors/1/temp", Bytes::from_static(b"21.5"), 5)
        .await
        .expect("retain");
    cluster
        .node(3)
        .wait_applied(retained.index, PATIENCE)
        .await
        .expect("caught up");
    let found = cluster.node(3).retained("sensors/+/temp");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].1.payload, Bytes::from_static(b"21.5"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_a_thousand_subscribes_is_batched() {
    let cluster = Arc::new(TestCluster::start(3).await);
    let before = cluster.node(1).metrics().entries_proposed;
    let log_before = cluster.node(1).status().last_log_index;
    let mut claims = Vec::new();
    for client in 0..1000 {
        let cluster = cluster.clone();
        claims.push(tokio::spawn(async move {
            let client_id = format!("storm-{client}");
            let commit = cluster
                .node(1)
                .claim(takeover(&client_id))
                .await
                .expect("claim");
            let epoch = granted_epoch(&commit.value);
            let subscribed = cluster
                .node(1)
                .update_subscriptions(&client_id, epoch, vec![add(&format!("storm/{client}"))])
                .await
                .expect("subscribe");
            assert!(subscribed.value);
            subscribed.index
        }));
    }
    let mut last_index = 0;
    for claim in claims {
        last_index = last_index.max(claim.await.expect("task"));
    }
    let entries = cluster.node(1).metrics().entries_proposed - before;
    assert!(
        entries < 100,
        "2,000 commands (1,000 claims + 1,000 subscribes) took {entries} raft entries"
    );
    let log_growth = cluster.node(1).status().last_log_index - log_before;
    assert!(
        log_growth < 100,
        "the raft log grew by {log_growth} entries"
    );
    cluster
        .node(3)
        .wait_applied(last_index, PATIENCE)
        .await
        .expect("caught up");
    assert_eq!(cluster.node(3).routes().len(), 1000);
    let Ok(cluster) = Arc::try_unwrap(cluster) else {
        panic!("tasks done");
    };
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_as_itself_and_catches_up() {
    let mut cluster = TestCluster::start(3).await;
    let incarnation = cluster.node(3).incarnation();
    wait_for_incarnations(&cluster).await;
    cluster.stop(3).await;
    let mut last = 0;
    for client in 0..20 {
        last = cluster
            .node(1)
            .claim(takeover(&format!("while-away-{client}")))
            .await
            .expect("two of three still commit")
            .index;
    }
    cluster.restart(3).await;
    assert_eq!(
        cluster.node(3).incarnation(),
        incarnation,
        "same data dir, same incarnation"
    );
    cluster
        .node(3)
        .wait_applied(last, PATIENCE)
        .await
        .expect("node 3 catches up");
    assert!(cluster.node(3).owner("while-away-19").is_some());
    let member = cluster
        .node(1)
        .status()
        .members
        .into_iter()
        .find(|member| member.id == 3)
        .expect("node 3 is a member");
    assert!(member.voter, "no add_learner needed: still a voter");
    assert_eq!(member.incarnation, incarnation);
    let after = cluster
        .node(3)
        .claim(takeover("after-restart"))
        .await
        .expect("node 3 writes");
    assert!(after.index > last);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_with_an_empty_data_dir_is_not_taken_for_its_old_self() {
    let mut cluster = TestCluster::start(3).await;
    wait_for_incarnations(&cluster).await;
    let old = cluster.node(3).incarnation();
    cluster.stop(3).await;
    cluster.dirs[2] = tempfile::tempdir().expect("tempdir");
    cluster.restart(3).await;
    assert_ne!(cluster.node(3).incarnation(), old);
    let commit = cluster
        .node(1)
        .claim(takeover("meanwhile"))
        .await
        .expect("1 and 2 commit");
    tokio::time::timeout(PATIENCE, async {
        while cluster.node(1).metrics().rejected_peers + cluster.node(2).metrics().rejected_peers
            == 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new incarnation is refused");
    assert!(
        cluster.node(3).owner("meanwhile").is_none(),
        "node 3 got no entries: {:?}",
        commit.index
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_left_alone_fails_claims_with_no_quorum() {
    let mut cluster = TestCluster::start(3).await;
    let survivor = cluster.wait_for_leader().await;
    for id in (1..=3).filter(|id| *id != survivor) {
        cluster.stop(id).await;
    }
    assert_no_quorum(&cluster, survivor).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_left_alone_fails_claims_with_no_quorum() {
    let mut cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let survivor = (1..=3).find(|id| *id != leader).expect("a follower");
    for id in (1..=3).filter(|id| *id != survivor) {
        cluster.stop(id).await;
    }
    assert_no_quorum(&cluster, survivor).await;
    cluster.shutdown().await;
}

/// With two of three nodes stopped, a claim on the survivor answers `NoQuorum` (bounded by
/// the proposal timeout; PATIENCE only guards against a hang).
async fn assert_no_quorum(cluster: &TestCluster, survivor: u64) {
    let answer = tokio::time::timeout(PATIENCE, cluster.node(survivor).claim(takeover("lonely")))
        .await
        .expect("the claim answers instead of hanging");
    assert_eq!(
        answer.map(|commit| commit.index),
        Err(ClusterError::NoQuorum)
    );
    assert!(cluster.node(survivor).owner("lonely").is_none());
}

async fn wait_for_incarnations(cluster: &TestCluster) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let members = cluster.node(1).status().members;
            if members.len() == 3 && members.iter().all(|member| member.incarnation != 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every node announced its incarnation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_link_shares_the_cluster_port() {
    let cluster = TestCluster::start(3).await;
    let mut node3 = cluster.node(3).take_link_receivers().expect("first take");
    assert!(cluster.node(3).take_link_receivers().is_none());
    let mut node1 = cluster.node(1).take_link_receivers().expect("first take");
    for seq in 1..=3 {
        cluster
            .node(1)
            .link()
            .send(3, seq, Bytes::from(vec![seq as u8]))
            .expect("queued");
    }
    for seq in 1..=3 {
        let delivery = tokio::time::timeout(PATIENCE, node3.deliveries.recv())
            .await
            .expect("delivered")
            .expect("open");
        assert_eq!((delivery.origin, delivery.seq), (1, seq));
        assert_eq!(delivery.origin_incarnation, cluster.node(1).incarnation());
    }
    cluster.node(3).link().ack(1, 3);
    let acked = tokio::time::timeout(PATIENCE, node1.acked.recv())
        .await
        .expect("acked")
        .expect("open");
    assert_eq!((acked.dest, acked.seq), (3, 3));
    let link = cluster
        .node(1)
        .status()
        .links
        .into_iter()
        .find(|link| link.node == 3)
        .expect("link to 3");
    assert!(link.connected);
    assert_eq!(link.unacked, 0);
    assert_eq!(cluster.node(1).metrics().link_forwarded, 3);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_purged_log_catches_up_from_a_snapshot() {
    let mut cluster = TestCluster::start_with(3, |config| config.snapshot_every_entries = 10).await;
    wait_for_incarnations(&cluster).await;
    let claim = cluster
        .node(1)
        .claim(takeover("snap"))
        .await
        .expect("claim");
    let epoch = granted_epoch(&claim.value);
    cluster
        .node(1)
        .update_subscriptions("snap", epoch, vec![add("snap/+")])
        .await
        .expect("subscribe");
    cluster.stop(3).await;
    let mut last = 0;
    for client in 0..40 {
        last = cluster
            .node(2)
            .claim(takeover(&format!("behind-{client}")))
            .await
            .expect("claim")
            .index;
    }
    cluster.restart(3).await;
    cluster
        .node(3)
        .wait_applied(last, PATIENCE)
        .await
        .expect("caught up");
    // The leader may cut a newer snapshot while node 3 is still catching up and send that
    // one too, so one install is the least, not the exact count.
    assert!(cluster.node(3).metrics().snapshots_installed >= 1);
    assert_eq!(cluster.node(3).routes(), cluster.node(1).routes());
    assert_eq!(
        cluster.node(3).owner("behind-39"),
        cluster.node(1).owner("behind-39")
    );
    assert_eq!(
        cluster.node(3).owner("snap").map(|owner| owner.epoch),
        Some(epoch)
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_node_id_is_refused() {
    let listeners: Vec<_> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<_> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut listeners = listeners.into_iter();
    let first = listeners.next().expect("listener");
    let config = support::test_config(
        1,
        halyard_cluster::Listen::Bound(first),
        &addrs,
        dir.path().into(),
    );
    halyard_cluster::Coordinator::start(config)
        .await
        .expect("start as node 1")
        .shutdown()
        .await;
    let second = listeners.next().expect("listener");
    let config = support::test_config(
        2,
        halyard_cluster::Listen::Bound(second),
        &addrs,
        dir.path().into(),
    );
    let refused = halyard_cluster::Coordinator::start(config).await.err();
    assert_eq!(
        refused,
        Some(ClusterError::IdentityMismatch {
            stored: 1,
            configured: 2
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_start_claim_on_another_node_drops_the_routes_everywhere() {
    let cluster = TestCluster::start(3).await;
    let claim = cluster
        .node(1)
        .claim(takeover("fresh"))
        .await
        .expect("claim");
    let epoch = granted_epoch(&claim.value);
    cluster
        .node(1)
        .update_subscriptions("fresh", epoch, vec![add("news/#")])
        .await
        .expect("subscribe");
    let clean = halyard_cluster::ClaimRequest {
        clean_start: true,
        ..takeover("fresh")
    };
    let commit = cluster.node(2).claim(clean).await.expect("clean claim");
    granted_epoch(&commit.value);
    cluster
        .node(2)
        .wait_applied_everywhere(commit.index, PATIENCE)
        .await
        .expect("applied everywhere");
    for id in 1..=3 {
        assert!(
            cluster.node(id).routes().is_empty(),
            "node {id} still routes the clean-started client"
        );
        assert!(cluster.node(id).subscriptions("fresh").is_empty());
    }
    cluster.shutdown().await;
}
