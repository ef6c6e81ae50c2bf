//! Runs seeds of the cluster simulation: `halyard-sim --seeds N [--seed S]`.

use std::process::ExitCode;

use clap::Parser;
use halyard_sim::{replay_command, run, Options};

/// Runs the deterministic cluster simulation.
#[derive(Parser)]
struct Cli {
    /// How many seeds to run, from `--seed` on.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps (10 ms each) of traffic and faults per seed.
    #[arg(long, default_value_t = Options::default().steps)]
    steps: u64,
    /// Run each seed twice and check that the traces match.
    #[arg(long)]
    check_determinism: bool,
    /// The CI profile: partitions, delays, kills and restarts; subscribers stay on their node.
    #[arg(long)]
    ci: bool,
    /// No partitions.
    #[arg(long)]
    no_partitions: bool,
    /// No kills or restarts.
    #[arg(long)]
    no_kills: bool,
    /// Subscribers stay on their first node.
    #[arg(long)]
    no_moves: bool,
    /// Print every event of the trace (faults, connects, packets to clients, applied routes).
    #[arg(long)]
    print_trace: bool,
    /// Print the nodes' logs to stderr, filtered like `RUST_LOG` (e.g. `halyard_server=debug`).
    #[arg(long)]
    log: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(filter) = &cli.log {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let base = if cli.ci {
        Options::ci()
    } else {
        Options::default()
    };
    let options = Options {
        steps: cli.steps,
        partitions: base.partitions && !cli.no_partitions,
        kills: base.kills && !cli.no_kills,
        moves: base.moves && !cli.no_moves,
        print_trace: cli.print_trace,
        ..base
    };
    let mut failed = 0;
    for seed in cli.seed..cli.seed.saturating_add(cli.seeds) {
        let outcome = run(seed, options);
        println!(
            "seed {seed}: trace {:016x} ({} events), {} acked, {} delivered, {} faults, {} moves",
            outcome.trace,
            outcome.events,
            outcome.acked,
            outcome.delivered,
            outcome.faults,
            outcome.moves
        );
        let mut bad = !outcome.violations.is_empty();
        for violation in &outcome.violations {
            println!("  violation: {violation}");
        }
        if cli.check_determinism {
            let again = run(seed, options);
            if again.trace != outcome.trace {
                println!("  not deterministic: second trace {:016x}", again.trace);
                bad = true;
            }
        }
        if bad {
            failed += 1;
            println!("  replay: {}", replay_command(seed, &options));
        }
    }
    if failed > 0 {
        println!("{failed} of {} seeds failed", cli.seeds);
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
