//! The simulation in CI: many seeds hold every invariant under partitions, kills and
//! restarts with and without data, and with sessions moving from node to node; a seed
//! replays exactly, and each invariant catches a fault injected to break it.

use std::time::Duration;

use halyard_sim::{replay_command, run, Options, Outcome, Sabotage, Violation};

/// Seeds CI runs (the brief: at least 200).
const CI_SEEDS: u64 = 200;

/// Full-profile seeds checked for the safety invariants.
const FULL_SEEDS: u64 = 300;

fn failures(outcomes: &[Outcome], options: &Options) -> Vec<String> {
    outcomes
        .iter()
        .filter(|outcome| !outcome.violations.is_empty())
        .map(|outcome| {
            format!(
                "seed {}: {} (replay: {})",
                outcome.seed,
                outcome.violations[0],
                replay_command(outcome.seed, options)
            )
        })
        .collect()
}

/// Runs seeds `0..seeds` under `options` on two threads, one runtime per seed: each seed is
/// single-threaded and deterministic.
fn run_seeds(seeds: u64, options: Options) -> Vec<Outcome> {
    let halves: Vec<Vec<Outcome>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|half| {
                scope.spawn(move || {
                    (half..seeds)
                        .step_by(2)
                        .map(|seed| run(seed, options))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a simulation thread panicked"))
            .collect()
    });
    halves.into_iter().flatten().collect()
}

#[test]
fn two_hundred_seeds_hold_every_invariant() {
    let outcomes = run_seeds(CI_SEEDS, Options::ci());
    assert_eq!(outcomes.len() as u64, CI_SEEDS);
    let failed = failures(&outcomes, &Options::ci());
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    let acked: u64 = outcomes.iter().map(|outcome| outcome.acked).sum();
    let faults: u64 = outcomes.iter().map(|outcome| outcome.faults).sum();
    let wipes: u64 = outcomes.iter().map(|outcome| outcome.wipes).sum();
    println!(
        "{CI_SEEDS} seeds: {acked} acknowledged publishes, {faults} faults, {wipes} restarts without data"
    );
    assert!(acked > CI_SEEDS * 100, "the publishers published");
    assert!(faults > CI_SEEDS, "faults were injected");
    assert!(
        wipes > 0,
        "nodes came back without their data (and were readmitted)"
    );
}

/// Sessions moving from node to node get every acknowledged message, and QoS 2 ones once
/// (issue 12's takeover across nodes).
#[test]
fn two_hundred_seeds_of_moving_sessions_lose_and_repeat_nothing() {
    let outcomes = run_seeds(CI_SEEDS, Options::moving());
    let failed = failures(&outcomes, &Options::moving());
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    let moves: u64 = outcomes.iter().map(|outcome| outcome.moves).sum();
    let delivered: u64 = outcomes.iter().map(|outcome| outcome.delivered).sum();
    println!("{CI_SEEDS} seeds: {moves} session moves, {delivered} deliveries");
    assert!(moves > CI_SEEDS, "sessions moved");
}

/// The full profile (sessions moving while nodes are partitioned, killed and wiped) never
/// lets two nodes serve one client at once, and route tables agree. Losses in this profile
/// are open work (README, "Simulation"); these two safety invariants must hold already
/// (halyard-sim seed 296 broke the first when a node handed on a session it held without
/// its previous owner's hand-over).
#[test]
fn full_profile_seeds_never_give_a_client_two_live_owners() {
    let options = Options::default();
    let outcomes = run_seeds(FULL_SEEDS, options);
    let unsafe_runs: Vec<String> = outcomes
        .iter()
        .filter_map(|outcome| {
            let broken = outcome.violations.iter().find(|violation| {
                matches!(
                    violation,
                    Violation::TwoOwners { .. } | Violation::RoutesDiffer { .. }
                )
            })?;
            Some(format!(
                "seed {}: {broken} (replay: {})",
                outcome.seed,
                replay_command(outcome.seed, &options)
            ))
        })
        .collect();
    assert!(unsafe_runs.is_empty(), "{}", unsafe_runs.join("\n"));
    let lossy = outcomes
        .iter()
        .filter(|outcome| !outcome.violations.is_empty())
        .count();
    println!("{FULL_SEEDS} full-profile seeds: {lossy} lose or repeat a message");
}

#[test]
fn a_seed_replays_with_the_same_trace() {
    // The full profile: partitions, kills, restarts with and without data, moves.
    let options = Options {
        steps: 400,
        settle_steps: 300,
        ..Options::default()
    };
    let seed = 4;
    let first = run(seed, options);
    let second = run(seed, options);
    println!(
        "seed {seed}: trace {:016x} over {} events, {} faults",
        first.trace, first.events, first.faults
    );
    assert!(first.faults > 0, "the seed injects faults");
    assert_eq!(first.trace, second.trace, "same seed, same trace");
    assert_eq!(first.violations, second.violations);
    let other = run(seed + 1, options);
    assert_ne!(first.trace, other.trace, "another seed, another run");
}

fn sabotaged(sabotage: Sabotage) -> Vec<Violation> {
    let options = Options {
        steps: 300,
        settle_steps: 200,
        partitions: false,
        kills: false,
        moves: false,
        max_delay: Duration::from_millis(5),
        sabotage: Some(sabotage),
        ..Options::default()
    };
    run(11, options).violations
}

#[test]
fn each_invariant_catches_its_injected_fault() {
    let lost = sabotaged(Sabotage::LoseDeliveries);
    assert!(
        lost.iter()
            .any(|v| matches!(v, Violation::AckedLost { .. })),
        "{lost:?}"
    );
    let twice = sabotaged(Sabotage::DeliverQos2Twice);
    assert!(
        twice
            .iter()
            .any(|v| matches!(v, Violation::Qos2Twice { .. })),
        "{twice:?}"
    );
    let owners = sabotaged(Sabotage::SecondOwner);
    assert!(
        owners
            .iter()
            .any(|v| matches!(v, Violation::TwoOwners { .. })),
        "{owners:?}"
    );
    let routes = sabotaged(Sabotage::SkewRoutes);
    assert!(
        routes
            .iter()
            .any(|v| matches!(v, Violation::RoutesDiffer { .. })),
        "{routes:?}"
    );
}

#[test]
fn a_client_connecting_again_during_a_takeover_never_has_two_live_owners() {
    // Full-profile seed 18: node 2 is cut off holding sub1; sub1 connects to node 3, then
    // connects there again while the first claim still waits for node 2's hand-over. The
    // second claim's previous owner is node 3 itself, and it used to be served at once
    // while node 2 still held its lease and sub1's connection (steps 105 to 206). It must
    // wait for the hand-over too. (The seed still finds other, known violations: losses
    // and QoS 2 repeats around the move, see the README.)
    let outcome = run(18, Options::default());
    let owners: Vec<&Violation> = outcome
        .violations
        .iter()
        .filter(|v| matches!(v, Violation::TwoOwners { .. }))
        .collect();
    assert!(outcome.faults > 0, "the seed partitions the cluster");
    assert!(owners.is_empty(), "{owners:?}");
}
