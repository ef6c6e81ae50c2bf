//! Halyard's deterministic cluster simulation.
//!
//! Three (or more) nodes run in one process on a current-thread tokio runtime with paused
//! time: each has the real broker core on a real redb store, the real coordinator (openraft
//! with its log and state machine in redb) and the production cluster driver between them.
//! Their cluster ports are joined by a simulated network ([`network`]) with seeded delays,
//! partitions and deaths; scripted MQTT clients ([`client`]) feed the cores through their
//! public input API. Everything random comes from the seed, so a seed replays exactly: the
//! run's trace digest says so. Invariants ([`invariants`]) are checked after every step.

#![forbid(unsafe_code)]

pub mod client;
pub mod clock;
pub mod invariants;
pub mod network;
pub mod node;
pub mod readmission;
pub mod sabotage;
pub mod scenario;
pub mod trace;

pub use invariants::Violation;
pub use sabotage::Sabotage;
pub use scenario::{run, Options, Outcome};

/// The command that replays `seed` under `options` (its fault profile; the number of
/// steps is the default one).
pub fn replay_command(seed: u64, options: &Options) -> String {
    let mut flags = String::new();
    if !options.moves {
        flags.push_str(" --ci");
    }
    if !options.partitions {
        flags.push_str(" --no-partitions");
    }
    if !options.kills {
        flags.push_str(" --no-kills");
    }
    format!("scripts/sim{flags} --seed {seed}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_command_names_the_profile() {
        assert_eq!(
            replay_command(7, &Options::default()),
            "scripts/sim --seed 7"
        );
        assert_eq!(
            replay_command(7, &Options::ci()),
            "scripts/sim --ci --seed 7"
        );
        assert_eq!(
            replay_command(7, &Options::moving()),
            "scripts/sim --no-partitions --no-kills --seed 7"
        );
    }
}
