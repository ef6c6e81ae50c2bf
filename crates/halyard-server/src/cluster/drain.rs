//! Graceful drain of a cluster node on shutdown (SIGTERM, e.g. a rolling restart): its
//! clients are sent away while the node still runs, so that each persistent session is
//! taken over by the node its client reconnects to and handed over on the peer link at once,
//! and what this node forwarded reaches its peers before it exits.
//!
//! Raft leadership is not transferred (openraft 0.9 has no leader transfer): a leader that
//! drains just exits after it, and the others elect a new one within an election timeout.
//! Claims are not released either: a release drops the session's subscriptions in raft, and
//! a session whose client does not come back during the drain must keep them (it stays on
//! this node's disk and moves when its client reconnects after the restart).

use std::time::Duration;

use halyard_cluster::Coordinator;
use halyard_codec::ReasonCode;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::event::{AdminCall, Event};

/// The longest a drain waits for sessions to move and forwards to be acknowledged.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(50);

/// Sends every client DISCONNECT 0x8B Server shutting down (the listeners are closed
/// already, so they reconnect to another node), then waits, at most [`DRAIN_TIMEOUT`],
/// until no persistent session is owned here and the peer link holds nothing unacknowledged.
pub(crate) async fn drain(coordinator: &Coordinator, events: &mpsc::Sender<Event>) {
    let started = Instant::now();
    let send_away = AdminCall(Box::new(|broker, now| {
        broker.disconnect_all(
            now,
            ReasonCode::SERVER_SHUTTING_DOWN,
            "this cluster node is shutting down; connect to another",
        )
    }));
    if events.send(Event::Admin(send_away)).await.is_err() {
        return;
    }
    let deadline = started + DRAIN_TIMEOUT;
    loop {
        let owned = coordinator.persistent_sessions_owned();
        let unacked: u64 = coordinator
            .link()
            .status()
            .iter()
            .map(|link| link.unacked)
            .sum();
        if owned == 0 && unacked == 0 {
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "cluster drain done"
            );
            return;
        }
        if Instant::now() >= deadline {
            warn!(
                owned,
                unacked, "cluster drain timed out: sessions stay here until their clients return"
            );
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}
