//! Publishing the wills of connections that no live process holds: those of a node the
//! leader has not heard from for longer than the lease plus a margin (dead, or fenced by its
//! own lease, so its connections are closed either way), and those an earlier process of
//! this node left behind (kill -9 and restart). Each is won by a `SettleWill`
//! compare-and-set before it is handed to the app, so it is published at most once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::batcher::Pending;
use crate::command::{Command, Response};
use crate::lease::Lease;
use crate::raft_types::Raft;
use crate::state_machine::{lock, SharedApplier};
use crate::types::{ClientId, FiredWill, NodeId, WillRecord};

/// Time past the lease after which a silent node is taken for gone: a node that is alive
/// has fenced itself (closing its connections) within the lease plus the network delay and
/// clock drift, which the takeover timeout's margin over the lease bounds the same way.
pub(crate) const LOST_NODE_MARGIN: Duration = Duration::from_millis(500);

/// How often the due wills are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Where a sweep looks from.
pub(crate) struct WillSweep {
    pub(crate) node: NodeId,
    /// This process's run (see [`WillRecord::run`]).
    pub(crate) run: u64,
    pub(crate) raft: Raft,
    pub(crate) applier: SharedApplier,
    pub(crate) lease: Arc<Lease>,
    pub(crate) proposals: mpsc::Sender<Pending>,
    pub(crate) fired: mpsc::Sender<FiredWill>,
    /// The lease plus [`LOST_NODE_MARGIN`].
    pub(crate) lost_after: Duration,
}

impl WillSweep {
    pub(crate) async fn run(self) {
        let started = Instant::now();
        let mut leader_since = None;
        let mut ticker = tokio::time::interval(SWEEP_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = Instant::now();
            let leader = self.raft.metrics().borrow().state == ServerState::Leader;
            leader_since = if leader {
                Some(leader_since.unwrap_or(now))
            } else {
                None
            };
            let view = View {
                node: self.node,
                run: self.run,
                started,
                leader_since,
                lost_after: self.lost_after,
                now,
            };
            let acked = self.lease.acked_sends();
            let due = {
                let applier = lock(&self.applier);
                due_wills(applier.state.wills(), now, |record| {
                    view.holder_gone_since(record, acked.get(&record.node).copied())
                })
            };
            if !self.settle(due).await {
                return;
            }
        }
    }

    /// Commits a `SettleWill` per due will (all sent before any answer is awaited, so the
    /// batcher merges them) and hands those it won to the app. False once the batcher or
    /// the app is gone.
    async fn settle(&self, due: Vec<((ClientId, u64), WillRecord)>) -> bool {
        let mut answers = Vec::with_capacity(due.len());
        for ((client_id, epoch), record) in due {
            let (reply, answer) = oneshot::channel();
            let command = Command::SettleWill {
                client_id: client_id.clone(),
                epoch,
            };
            if self
                .proposals
                .send(Pending { command, reply })
                .await
                .is_err()
            {
                return false;
            }
            answers.push((client_id, epoch, record.will, answer));
        }
        for (client_id, epoch, will, answer) in answers {
            match answer.await {
                Ok(Ok(commit)) if commit.value == Response::WillSettled(true) => {
                    tracing::info!(%client_id, epoch, "will of a lost connection published");
                    let fired = FiredWill {
                        client_id,
                        epoch,
                        will,
                    };
                    if self.fired.send(fired).await.is_err() {
                        return false;
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%client_id, %error, "will of a lost connection not settled; retried");
                }
                Err(_) => return false,
            }
        }
        true
    }
}

/// What one sweep knows about this node and the others.
struct View {
    node: NodeId,
    run: u64,
    /// When this process started.
    started: Instant,
    /// Since when this node leads, if it does.
    leader_since: Option<Instant>,
    lost_after: Duration,
    now: Instant,
}

impl View {
    /// Since when the connection of `record` is known closed, if it is: this node's
    /// previous process's since this one started; another node's, on the leader, once it
    /// has not acknowledged (`last_acked`) for `lost_after`.
    fn holder_gone_since(
        &self,
        record: &WillRecord,
        last_acked: Option<Instant>,
    ) -> Option<Instant> {
        if record.node == self.node {
            return (record.run != self.run).then_some(self.started);
        }
        // Only the leader hears from every node; a new leader counts from its election.
        let leader_since = self.leader_since?;
        let heard = last_acked.map_or(leader_since, |acked| acked.max(leader_since));
        let gone = heard + self.lost_after;
        (gone <= self.now).then_some(gone)
    }
}

/// The wills due at `now`: those whose holder is gone (`gone_since`) for at least their
/// delay.
pub(crate) fn due_wills(
    wills: &BTreeMap<(ClientId, u64), WillRecord>,
    now: Instant,
    gone_since: impl Fn(&WillRecord) -> Option<Instant>,
) -> Vec<((ClientId, u64), WillRecord)> {
    wills
        .iter()
        .filter(|(_, record)| {
            gone_since(record).is_some_and(|since| {
                since + Duration::from_secs(u64::from(record.delay_secs)) <= now
            })
        })
        .map(|(key, record)| (key.clone(), record.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn a_holder_is_gone_when_the_leader_misses_it_or_its_process_restarted() {
        let start = Instant::now();
        let lost_after = Duration::from_secs(2);
        let view = |leader_since, now| View {
            node: 1,
            run: 1,
            started: start,
            leader_since,
            lost_after,
            now,
        };
        let later = start + Duration::from_secs(5);
        let mut previous_run = record(1, 0);
        previous_run.run = 8;
        assert_eq!(
            view(None, later).holder_gone_since(&previous_run, None),
            Some(start)
        );
        assert_eq!(
            view(None, later).holder_gone_since(&record(1, 0), None),
            None,
            "this process holds it"
        );
        assert_eq!(
            view(None, later).holder_gone_since(&record(2, 0), None),
            None,
            "only the leader judges others"
        );
        let acked = start + Duration::from_secs(1);
        let leading = view(Some(start), later);
        assert_eq!(
            leading.holder_gone_since(&record(2, 0), Some(acked)),
            Some(acked + lost_after)
        );
        assert_eq!(
            leading.holder_gone_since(&record(2, 0), Some(later)),
            None,
            "heard from just now"
        );
        let elected = start + Duration::from_secs(4);
        assert_eq!(
            view(Some(elected), later).holder_gone_since(&record(2, 0), None),
            None,
            "a new leader waits from its election"
        );
    }

    fn record(node: NodeId, delay_secs: u32) -> WillRecord {
        WillRecord {
            node,
            run: 1,
            delay_secs,
            will: Bytes::from_static(b"w"),
        }
    }

    #[test]
    fn a_will_is_due_its_delay_after_its_holder_is_gone() {
        let start = Instant::now();
        let wills: BTreeMap<_, _> = [
            (("now".to_owned(), 1), record(1, 0)),
            (("later".to_owned(), 2), record(1, 10)),
            (("alive".to_owned(), 3), record(2, 0)),
        ]
        .into();
        let gone = |record: &WillRecord| (record.node == 1).then_some(start);
        let keys = |due: Vec<((ClientId, u64), WillRecord)>| {
            due.into_iter().map(|(key, _)| key.0).collect::<Vec<_>>()
        };
        assert_eq!(keys(due_wills(&wills, start, gone)), vec!["now"]);
        let later = start + Duration::from_secs(10);
        assert_eq!(keys(due_wills(&wills, later, gone)), vec!["later", "now"]);
    }
}
