//! `wait_applied_everywhere`: three coordinators in one process; once it returns, every
//! reachable node's route index holds the change, and an unreachable node is skipped.

mod support;

use std::time::Duration;

use bytes::Bytes;
use halyard_cluster::{ClaimOutcome, Coordinator, RouteKey, SubscriptionChange};
use support::{takeover, TestCluster, PATIENCE};

/// The wait's limit in these tests (the server's); a stopped node is skipped once out of
/// contact for longer than its lease plus a margin (2 s with the default lease).
const LIMIT: Duration = Duration::from_secs(5);

/// Claims `client_id` on `node` and returns its epoch.
async fn claim(node: &Coordinator, client_id: &str) -> u64 {
    match node.claim(takeover(client_id)).await.expect("claim").value {
        ClaimOutcome::Granted { epoch, .. } => epoch,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Subscribes `client_id` to `filter` through `node`; returns the commit's index.
async fn subscribe(node: &Coordinator, client_id: &str, epoch: u64, filter: &str) -> u64 {
    let change = SubscriptionChange::Add {
        filter: filter.to_owned(),
        options: Bytes::from_static(b"\x01"),
    };
    let commit = node
        .update_subscriptions(client_id, epoch, vec![change])
        .await
        .expect("subscribe");
    assert!(commit.value, "the owner's epoch is current");
    commit.index
}

fn route(filter: &str) -> RouteKey {
    RouteKey {
        filter: filter.to_owned(),
        group: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_applied_everywhere_every_node_routes_the_change() {
    let cluster = TestCluster::start(3).await;
    for round in 0..12u64 {
        let subscriber = round % 3 + 1;
        let client_id = format!("client-{round}");
        let node = cluster.node(subscriber);
        let epoch = claim(node, &client_id).await;
        let filter = format!("rooms/{round}/+");
        let index = subscribe(node, &client_id, epoch, &filter).await;
        node.wait_applied_everywhere(index, PATIENCE)
            .await
            .expect("every node applies it");
        for id in 1..=3 {
            let routes = cluster.node(id).routes();
            assert_eq!(
                routes
                    .get(&route(&filter))
                    .map(|nodes| nodes.contains(&subscriber)),
                Some(true),
                "node {id} routes {filter} to node {subscriber} once the wait returned"
            );
        }
    }
    assert_eq!(cluster.node(1).metrics().unreachable_peers_skipped, 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_skipped_and_waited_for_again_once_back() {
    let mut cluster = TestCluster::start(3).await;
    cluster.stop(3).await;
    cluster.wait_for_leader().await;
    let epoch = claim(cluster.node(1), "alive").await;
    let index = subscribe(cluster.node(1), "alive", epoch, "a/+").await;
    cluster
        .node(1)
        .wait_applied_everywhere(index, LIMIT)
        .await
        .expect("the stopped node is skipped");
    assert_eq!(cluster.node(1).metrics().unreachable_peers_skipped, 1);
    assert!(cluster.node(2).routes().contains_key(&route("a/+")));

    cluster.restart(3).await;
    let back = tokio::time::timeout(PATIENCE, async {
        for round in 0u64.. {
            let filter = format!("b/{round}");
            let index = subscribe(cluster.node(1), "alive", epoch, &filter).await;
            let skipped = cluster.node(1).metrics().unreachable_peers_skipped;
            cluster
                .node(1)
                .wait_applied_everywhere(index, LIMIT)
                .await
                .expect("waited");
            if cluster.node(1).metrics().unreachable_peers_skipped == skipped {
                return filter;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unreachable!("the loop only ends by returning")
    })
    .await
    .expect("node 3 is waited for again");
    assert!(
        cluster.node(3).routes().contains_key(&route(&back)),
        "a wait that did not skip node 3 saw it apply {back}"
    );
    cluster.shutdown().await;
}
