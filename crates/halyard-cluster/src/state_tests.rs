//! Pure tests of `ClusterState::apply`.

use bytes::Bytes;

use super::*;
use crate::command::LegacyClaim;

fn claim(client: &str, node: NodeId, request_id: u64, expected: Option<u64>) -> Command {
    Command::Claim(Claim {
        client_id: client.to_owned(),
        node,
        request_id,
        expected_epoch: expected,
        session_expiry_secs: 60,
        persistent: true,
        now_ms: 1_000,
        clean_start: false,
    })
}

fn subscribe(client: &str, epoch: u64, filters: &[&str]) -> Command {
    Command::Subscriptions {
        client_id: client.to_owned(),
        epoch,
        changes: filters
            .iter()
            .map(|filter| SubscriptionChange::Add {
                filter: (*filter).to_owned(),
                options: Bytes::from_static(b"\x01"),
            })
            .collect(),
    }
}

fn unsubscribe(client: &str, epoch: u64, filter: &str) -> Command {
    Command::Subscriptions {
        client_id: client.to_owned(),
        epoch,
        changes: vec![SubscriptionChange::Remove {
            filter: filter.to_owned(),
        }],
    }
}

fn apply(state: &mut ClusterState, index: u64, command: Command) -> (Response, Vec<Change>) {
    let mut changes = Vec::new();
    let response = state.apply(index, &command, &mut changes);
    (response, changes)
}

fn granted_epoch(response: &Response) -> u64 {
    match response {
        Response::Claim(ClaimOutcome::Granted { epoch, .. }) => *epoch,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn route(filter: &str, group: Option<&str>) -> RouteKey {
    RouteKey {
        filter: filter.to_owned(),
        group: group.map(str::to_owned),
    }
}

#[test]
fn claim_epochs_strictly_increase_and_name_the_previous_owner() {
    let mut state = ClusterState::new(1024);
    let first = granted_epoch(&apply(&mut state, 5, claim("c", 1, 1, None)).0);
    let (second, changes) = apply(&mut state, 9, claim("c", 2, 1, None));
    assert_eq!(first, 5);
    assert_eq!(
        second,
        Response::Claim(ClaimOutcome::Granted {
            epoch: 9,
            previous: Some((1, 5)),
            generation: 1,
        })
    );
    assert_eq!(
        changes,
        vec![Change::OwnerChanged {
            client_id: "c".into(),
            node: Some(2),
            epoch: 9,
            previous: Some((1, 5)),
            session_expiry_secs: 60,
            claimed_ms: 1_000,
        }]
    );
    assert_eq!(
        state.owner("c").map(|owner| (owner.node, owner.epoch)),
        Some((2, 9))
    );
}

#[test]
fn compare_and_set_claims() {
    let mut state = ClusterState::new(1024);
    assert_eq!(
        granted_epoch(&apply(&mut state, 3, claim("c", 1, 1, Some(0))).0),
        3
    );
    let (conflict, changes) = apply(&mut state, 4, claim("c", 2, 1, Some(0)));
    match conflict {
        Response::Claim(ClaimOutcome::Conflict {
            current: Some(owner),
        }) => {
            assert_eq!((owner.node, owner.epoch), (1, 3));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(changes.is_empty());
    assert_eq!(
        granted_epoch(&apply(&mut state, 5, claim("c", 2, 2, Some(3))).0),
        5
    );
    let (no_owner, _) = apply(&mut state, 6, claim("other", 2, 3, Some(7)));
    assert_eq!(
        no_owner,
        Response::Claim(ClaimOutcome::Conflict { current: None })
    );
}

#[test]
fn a_retried_claim_returns_the_first_answer() {
    let mut state = ClusterState::new(1024);
    let first = apply(&mut state, 3, claim("c", 1, 42, None)).0;
    apply(&mut state, 4, claim("c", 2, 1, None));
    let (retry, changes) = apply(&mut state, 8, claim("c", 1, 42, None));
    assert_eq!(retry, first);
    assert!(changes.is_empty(), "a retry changes nothing");
    assert_eq!(state.owner("c").map(|owner| owner.node), Some(2));
}

#[test]
fn two_claims_of_one_client_in_one_batch_do_not_share_an_epoch() {
    let mut state = ClusterState::new(1024);
    let (response, _) = apply(
        &mut state,
        7,
        Command::Batch(vec![claim("c", 1, 1, None), claim("c", 2, 1, None)]),
    );
    let Response::Batch(responses) = response else {
        panic!("batch answers with a batch");
    };
    assert_eq!(granted_epoch(&responses[0]), 7);
    assert!(matches!(
        responses[1],
        Response::Claim(ClaimOutcome::Conflict { .. })
    ));
}

#[test]
fn release_with_a_stale_epoch_is_ignored() {
    let mut state = ClusterState::new(1024);
    apply(&mut state, 2, claim("c", 1, 1, None));
    apply(&mut state, 3, subscribe("c", 2, &["a/b"]));
    apply(&mut state, 4, claim("c", 2, 2, None));
    let stale = Command::Release {
        client_id: "c".into(),
        node: 1,
        epoch: 2,
    };
    assert_eq!(apply(&mut state, 5, stale).0, Response::Released(false));
    assert_eq!(state.owner("c").map(|owner| owner.epoch), Some(4));
    let current = Command::Release {
        client_id: "c".into(),
        node: 2,
        epoch: 4,
    };
    let (released, changes) = apply(&mut state, 6, current);
    assert_eq!(released, Response::Released(true));
    assert!(state.owner("c").is_none());
    assert!(
        state.subscriptions("c").is_none(),
        "release drops the subscriptions"
    );
    assert!(state.routes().is_empty());
    assert!(changes.contains(&Change::RouteRemoved {
        filter: "a/b".into(),
        group: None,
        node: 2
    }));
}

#[test]
fn a_fenced_subscription_change_is_ignored() {
    let mut state = ClusterState::new(1024);
    apply(&mut state, 2, claim("c", 1, 1, None));
    apply(&mut state, 3, claim("c", 2, 2, None));
    let (response, changes) = apply(&mut state, 4, subscribe("c", 2, &["a/b"]));
    assert_eq!(response, Response::SubscriptionsApplied(false));
    assert!(changes.is_empty());
    assert!(state.routes().is_empty());
    let (response, _) = apply(&mut state, 5, subscribe("c", 3, &["a/b"]));
    assert_eq!(response, Response::SubscriptionsApplied(true));
    assert_eq!(
        state
            .routes()
            .get(&route("a/b", None))
            .map(|nodes| nodes.len()),
        Some(1)
    );
}

#[test]
fn route_index_refcounts_subscribers_per_node() {
    let mut state = ClusterState::new(1024);
    apply(&mut state, 1, claim("a", 1, 1, None));
    apply(&mut state, 2, claim("b", 1, 2, None));
    let (_, added) = apply(&mut state, 3, subscribe("a", 1, &["t/+"]));
    let (_, second) = apply(&mut state, 4, subscribe("b", 2, &["t/+"]));
    assert_eq!(added.len(), 1);
    assert!(
        second.is_empty(),
        "a second subscriber on the node adds no route"
    );
    let (_, removed) = apply(&mut state, 5, unsubscribe("a", 1, "t/+"));
    assert!(removed.is_empty(), "one subscriber left: the route stays");
    assert!(state.routes().contains_key(&route("t/+", None)));
    let (_, removed) = apply(&mut state, 6, unsubscribe("b", 2, "t/+"));
    assert_eq!(
        removed,
        vec![Change::RouteRemoved {
            filter: "t/+".into(),
            group: None,
            node: 1
        }]
    );
    assert!(state.routes().is_empty());
}

#[test]
fn takeover_moves_the_routes_to_the_new_node() {
    let mut state = ClusterState::new(1024);
    apply(&mut state, 1, claim("a", 1, 1, None));
    apply(&mut state, 2, subscribe("a", 1, &["x"]));
    let (_, changes) = apply(&mut state, 3, claim("a", 3, 1, None));
    assert!(changes.contains(&Change::RouteRemoved {
        filter: "x".into(),
        group: None,
        node: 1
    }));
    assert!(changes.contains(&Change::RouteAdded {
        filter: "x".into(),
        group: None,
        node: 3
    }));
    let nodes: Vec<_> = state.routes()[&route("x", None)].iter().copied().collect();
    assert_eq!(nodes, vec![3]);
}

#[test]
fn share_groups_route_separately_from_plain_filters() {
    let mut state = ClusterState::new(1024);
    apply(&mut state, 1, claim("a", 1, 1, None));
    apply(&mut state, 2, claim("b", 2, 1, None));
    apply(&mut state, 3, subscribe("a", 1, &["$share/g/s/#", "s/#"]));
    apply(
        &mut state,
        4,
        subscribe("b", 2, &["$share/g/s/#", "$share/h/s/#"]),
    );
    let routes = state.routes();
    let nodes = |key: RouteKey| routes[&key].iter().copied().collect::<Vec<_>>();
    assert_eq!(nodes(route("s/#", Some("g"))), vec![1, 2]);
    assert_eq!(nodes(route("s/#", Some("h"))), vec![2]);
    assert_eq!(nodes(route("s/#", None)), vec![1]);
    assert!(state
        .subscriptions("a")
        .is_some_and(|subs| subs.contains_key("$share/g/s/#")));
}

#[test]
fn invalid_filters_are_skipped() {
    let mut state = ClusterState::new(1024);
    apply(&mut state, 1, claim("a", 1, 1, None));
    apply(&mut state, 2, subscribe("a", 1, &["bad/#/x", "ok"]));
    assert_eq!(state.routes().len(), 1);
}

#[test]
fn retained_messages_respect_the_byte_cap() {
    let mut state = ClusterState::new(20);
    let set = |topic: &str, payload: &'static [u8]| Command::SetRetained {
        topic: topic.to_owned(),
        payload: Bytes::from_static(payload),
        now_ms: 77,
    };
    assert_eq!(
        apply(&mut state, 1, set("a", b"123456789")).0,
        Response::RetainedStored(true)
    );
    assert_eq!(state.retained_bytes(), 10);
    let (refused, changes) = apply(&mut state, 2, set("b", b"12345678901"));
    assert_eq!(refused, Response::RetainedStored(false));
    assert!(changes.is_empty());
    assert_eq!(
        apply(&mut state, 3, set("a", b"1234567890123456789")).0,
        Response::RetainedStored(true)
    );
    assert_eq!(
        state.retained_bytes(),
        20,
        "a replacement counts only its own size"
    );
    let (deleted, changes) = apply(&mut state, 4, set("a", b""));
    assert_eq!(deleted, Response::RetainedStored(true));
    assert_eq!(changes, vec![Change::RetainedDeleted { topic: "a".into() }]);
    assert_eq!(state.retained_bytes(), 0);
    apply(&mut state, 5, set("s/1", b"x"));
    let found = state.retained_matching("s/+");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].1.stamped_ms, 77);
    assert_eq!(state.retained_matching("$share/g/s/#"), found);
}

#[test]
fn a_state_survives_a_postcard_round_trip() {
    let mut state = ClusterState::new(100);
    apply(&mut state, 1, claim("a", 1, 1, None));
    apply(&mut state, 2, subscribe("a", 1, &["$share/g/x", "y"]));
    let bytes = state.to_snapshot().expect("encode");
    let mut restored = ClusterState::new(100);
    restored.replace_data(ClusterState::from_snapshot(&bytes).expect("decode"));
    assert_eq!(restored, state);
}

fn clean_claim(client: &str, node: NodeId, request_id: u64) -> Command {
    let Command::Claim(claim) = claim(client, node, request_id, None) else {
        unreachable!("claim() builds a claim");
    };
    Command::Claim(Claim {
        clean_start: true,
        ..claim
    })
}

#[test]
fn a_clean_start_claim_drops_the_subscriptions_and_routes() {
    let mut state = ClusterState::new(1024);
    apply(&mut state, 1, claim("a", 1, 1, None));
    apply(&mut state, 2, subscribe("a", 1, &["x", "$share/g/y"]));
    apply(&mut state, 3, claim("b", 1, 2, None));
    apply(&mut state, 4, subscribe("b", 3, &["x"]));
    let (response, changes) = apply(&mut state, 5, clean_claim("a", 3, 1));
    assert_eq!(granted_epoch(&response), 5);
    assert!(state.subscriptions("a").is_none());
    assert!(changes.contains(&Change::RouteRemoved {
        filter: "y".into(),
        group: Some("g".into()),
        node: 1
    }));
    assert!(
        !changes
            .iter()
            .any(|change| matches!(change, Change::RouteAdded { .. })),
        "nothing moves to the claiming node: {changes:?}"
    );
    assert!(!state.routes().contains_key(&route("y", Some("g"))));
    let nodes: Vec<_> = state.routes()[&route("x", None)].iter().copied().collect();
    assert_eq!(nodes, vec![1], "b's subscription to x still routes");
}

/// `Command` as it was before `clean_start`: its claim variant came first.
#[derive(serde::Serialize)]
enum CommandBeforeCleanStart {
    Claim(LegacyClaim),
}

#[test]
fn a_claim_logged_before_clean_start_decodes_and_moves_the_subscriptions() {
    let old = CommandBeforeCleanStart::Claim(LegacyClaim {
        client_id: "a".into(),
        node: 3,
        request_id: 1,
        expected_epoch: None,
        session_expiry_secs: 60,
        persistent: true,
        now_ms: 1_000,
    });
    let bytes = postcard::to_stdvec(&old).expect("encode");
    let decoded: Command = postcard::from_bytes(&bytes).expect("an old entry decodes");
    let mut state = ClusterState::new(1024);
    apply(&mut state, 1, claim("a", 1, 1, None));
    apply(&mut state, 2, subscribe("a", 1, &["x"]));
    let (response, _) = apply(&mut state, 3, decoded);
    assert_eq!(granted_epoch(&response), 3);
    assert_eq!(state.subscriptions("a").map(|subs| subs["x"].node), Some(3));
}

fn claim_with_will(client: &str, node: NodeId, request_id: u64, delay_secs: u32) -> Command {
    let Command::Claim(claim) = claim(client, node, request_id, None) else {
        unreachable!("claim() builds a claim");
    };
    Command::ClaimWithWill {
        claim,
        will: WillRecord {
            node,
            run: 7,
            delay_secs,
            will: Bytes::from_static(b"gone"),
        },
    }
}

fn settle(client: &str, epoch: u64) -> Command {
    Command::SettleWill {
        client_id: client.to_owned(),
        epoch,
    }
}

#[test]
fn a_will_is_settled_once_whoever_asks() {
    let mut state = ClusterState::new(1 << 20);
    let epoch = granted_epoch(&apply(&mut state, 1, claim_with_will("c", 1, 1, 0)).0);
    assert_eq!(state.wills().len(), 1, "the claim keeps the will");
    // The owner publishing it locally and a survivor sweeping it race: only the first
    // committed entry wins, so the will is published once [MQTT-3.1.2-8].
    let first = apply(&mut state, 2, settle("c", epoch)).0;
    let second = apply(&mut state, 3, settle("c", epoch)).0;
    assert_eq!(first, Response::WillSettled(true));
    assert_eq!(second, Response::WillSettled(false));
    assert!(state.wills().is_empty());
}

#[test]
fn a_newer_claim_cancels_a_delayed_will_but_not_a_due_one() {
    let mut state = ClusterState::new(1 << 20);
    let delayed = granted_epoch(&apply(&mut state, 1, claim_with_will("d", 1, 1, 30)).0);
    let due = granted_epoch(&apply(&mut state, 2, claim_with_will("z", 1, 2, 0)).0);
    // Both clients reconnect on node 3 (without a will).
    apply(&mut state, 3, claim("d", 3, 1, None));
    apply(&mut state, 4, claim("z", 3, 2, None));
    // [MQTT-3.1.3-9]: a new connection before the Will Delay Interval passed: no will.
    assert_eq!(
        apply(&mut state, 5, settle("d", delayed)).0,
        Response::WillSettled(false)
    );
    // Without a delay the will was due when the old connection closed: it stays for the
    // old owner (or the survivors) to publish.
    assert_eq!(
        apply(&mut state, 6, settle("z", due)).0,
        Response::WillSettled(true)
    );
}

#[test]
fn a_clean_start_makes_a_delayed_will_due_now() {
    let mut state = ClusterState::new(1 << 20);
    let epoch = granted_epoch(&apply(&mut state, 1, claim_with_will("c", 1, 1, 30)).0);
    let Command::Claim(mut clean) = claim("c", 2, 1, None) else {
        unreachable!("claim() builds a claim");
    };
    clean.clean_start = true;
    apply(&mut state, 2, Command::Claim(clean));
    // The clean start ends the old session, which publishes its will [MQTT-3.1.3-9].
    let record = &state.wills()[&("c".to_owned(), epoch)];
    assert_eq!(record.delay_secs, 0);
}

#[test]
fn a_retried_claim_does_not_bring_its_will_back() {
    let mut state = ClusterState::new(1 << 20);
    let epoch = granted_epoch(&apply(&mut state, 1, claim_with_will("c", 1, 1, 0)).0);
    apply(&mut state, 2, settle("c", epoch));
    apply(&mut state, 3, claim_with_will("c", 1, 1, 0));
    assert!(
        state.wills().is_empty(),
        "the retry returns the first answer only"
    );
}

fn granted_generation(response: &Response) -> u32 {
    match response {
        Response::Claim(ClaimOutcome::Granted { generation, .. }) => *generation,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[test]
fn each_grant_of_a_client_id_counts_one_generation_until_its_session_ends() {
    let mut state = ClusterState::new(1024);
    let generations: Vec<u32> = [(1, 1), (2, 2), (3, 1), (4, 3)]
        .into_iter()
        .map(|(index, node)| {
            granted_generation(&apply(&mut state, index, claim("c", node, index, None)).0)
        })
        .collect();
    assert_eq!(generations, [0, 1, 2, 3]);
    assert_eq!(
        granted_generation(&apply(&mut state, 5, claim("other", 1, 5, None)).0),
        0,
        "counted per client id"
    );
    let (released, _) = apply(
        &mut state,
        6,
        Command::Release {
            client_id: "c".into(),
            node: 3,
            epoch: 4,
        },
    );
    assert_eq!(released, Response::Released(true));
    assert_eq!(
        granted_generation(&apply(&mut state, 7, claim("c", 2, 7, None)).0),
        0,
        "a session that ended starts again at 0"
    );
}

#[test]
fn a_retried_claim_answers_its_first_generation() {
    let mut state = ClusterState::new(1024);
    apply(&mut state, 1, claim("c", 1, 1, None));
    let first = apply(&mut state, 2, claim("c", 2, 7, None)).0;
    apply(&mut state, 3, claim("c", 1, 8, None));
    assert_eq!(apply(&mut state, 4, claim("c", 2, 7, None)).0, first);
    assert_eq!(granted_generation(&first), 1);
}

#[test]
fn snapshots_keep_generations_and_a_snapshot_without_them_still_reads() {
    let mut state = ClusterState::new(1 << 20);
    apply(&mut state, 1, claim_with_will("c", 1, 1, 5));
    apply(&mut state, 2, claim("c", 2, 2, None));
    let mut restored = ClusterState::new(1 << 20);
    restored.replace_data(ClusterState::from_snapshot(&state.to_snapshot().unwrap()).unwrap());
    assert_eq!(restored, state);
    let mut without = postcard::to_stdvec(&state).unwrap();
    without.extend(postcard::to_stdvec(state.wills()).unwrap());
    let mut restored = ClusterState::from_snapshot(&without).unwrap();
    assert_eq!(restored.wills(), state.wills());
    assert_eq!(
        granted_generation(&apply(&mut restored, 3, claim("c", 3, 3, None)).0),
        1,
        "an owner an older build granted counts as generation 0"
    );
}

#[test]
fn a_grant_an_older_build_answered_is_answered_again_as_generation_0() {
    let mut state = ClusterState::new(1024);
    state.claim_results.insert(
        (1, 9),
        ClaimOutcome::LegacyGranted {
            epoch: 4,
            previous: None,
        },
    );
    assert_eq!(
        apply(&mut state, 10, claim("c", 1, 9, None)).0,
        Response::Claim(ClaimOutcome::Granted {
            epoch: 4,
            previous: None,
            generation: 0,
        })
    );
}

#[test]
fn snapshots_keep_wills_and_older_snapshots_still_read() {
    let mut state = ClusterState::new(1 << 20);
    apply(&mut state, 1, claim_with_will("c", 1, 1, 5));
    let restored = ClusterState::from_snapshot(&state.to_snapshot().unwrap()).unwrap();
    assert_eq!(restored.wills(), state.wills());
    let older = postcard::to_stdvec(&state).unwrap();
    let restored = ClusterState::from_snapshot(&older).unwrap();
    assert!(restored.wills().is_empty());
    assert_eq!(restored.owners(), state.owners());
}
