//! Merges concurrent writes into one raft entry (`Command::Batch`).
//!
//! One proposal is in flight at a time; whatever arrives meanwhile, or within the batch
//! window after a first command, goes into the next entry. A batch holds at most one command
//! per client id, so every claim in it gets a distinct epoch and a client's commands keep
//! their order.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::command::{Command, Response};
use crate::error::ClusterError;
use crate::metrics::Counters;
use crate::proposer::Proposer;
use crate::status::Commit;

/// One write waiting for its entry.
pub(crate) struct Pending {
    pub(crate) command: Command,
    pub(crate) reply: oneshot::Sender<Result<Commit<Response>, ClusterError>>,
}

pub(crate) struct Batcher {
    pub(crate) inbox: mpsc::Receiver<Pending>,
    pub(crate) proposer: Proposer,
    pub(crate) window: Duration,
    pub(crate) max_batch: usize,
    pub(crate) counters: Arc<Counters>,
}

impl Batcher {
    pub(crate) async fn run(mut self) {
        let mut waiting: VecDeque<Pending> = VecDeque::new();
        loop {
            if waiting.is_empty() {
                let Some(first) = self.inbox.recv().await else {
                    return;
                };
                waiting.push_back(first);
                let until = Instant::now() + self.window;
                while waiting.len() < self.max_batch {
                    match tokio::time::timeout_at(until, self.inbox.recv()).await {
                        Ok(Some(pending)) => waiting.push_back(pending),
                        _ => break,
                    }
                }
            }
            while let Ok(pending) = self.inbox.try_recv() {
                waiting.push_back(pending);
            }
            let batch = take_batch(&mut waiting, self.max_batch);
            self.propose(batch).await;
        }
    }

    async fn propose(&mut self, batch: Vec<Pending>) {
        let (mut commands, replies): (Vec<Command>, Vec<_>) = batch
            .into_iter()
            .map(|pending| (pending.command, pending.reply))
            .unzip();
        self.counters
            .entries_proposed
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .commands_proposed
            .fetch_add(commands.len() as u64, Ordering::Relaxed);
        let command = if commands.len() == 1 {
            commands.remove(0)
        } else {
            Command::Batch(commands)
        };
        let batched = replies.len() > 1;
        match self.proposer.propose(command).await {
            Ok((index, Response::Batch(responses))) if batched => {
                for (reply, value) in replies.into_iter().zip(responses) {
                    let _ = reply.send(Ok(Commit { index, value }));
                }
            }
            Ok((index, value)) => {
                for reply in replies {
                    let _ = reply.send(Ok(Commit {
                        index,
                        value: value.clone(),
                    }));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Takes up to `max` commands in order, skipping (and keeping for later) any command whose
/// client already has one in this batch.
fn take_batch(waiting: &mut VecDeque<Pending>, max: usize) -> Vec<Pending> {
    let mut taken = Vec::new();
    let mut clients = BTreeSet::new();
    let mut later = VecDeque::new();
    while let Some(pending) = waiting.pop_front() {
        let fits = taken.len() < max
            && pending
                .command
                .client_id()
                .is_none_or(|client| clients.insert(client.to_owned()));
        if fits {
            taken.push(pending);
        } else {
            later.push_back(pending);
        }
    }
    *waiting = later;
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Claim;

    fn pending(client: &str, request_id: u64) -> Pending {
        let (reply, _) = oneshot::channel();
        Pending {
            command: Command::Claim(Claim {
                client_id: client.to_owned(),
                node: 1,
                request_id,
                expected_epoch: None,
                session_expiry_secs: 0,
                persistent: false,
                now_ms: 0,
                clean_start: false,
            }),
            reply,
        }
    }

    fn request_ids(batch: &[Pending]) -> Vec<u64> {
        batch
            .iter()
            .map(|pending| match &pending.command {
                Command::Claim(claim) => claim.request_id,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn a_batch_holds_one_command_per_client_in_order() {
        let mut waiting: VecDeque<_> = [
            pending("a", 1),
            pending("b", 2),
            pending("a", 3),
            pending("c", 4),
            pending("a", 5),
        ]
        .into();
        assert_eq!(request_ids(&take_batch(&mut waiting, 10)), vec![1, 2, 4]);
        assert_eq!(request_ids(&take_batch(&mut waiting, 10)), vec![3]);
        assert_eq!(request_ids(&take_batch(&mut waiting, 10)), vec![5]);
        assert!(waiting.is_empty());
    }

    #[test]
    fn a_batch_stops_at_its_maximum() {
        let mut waiting: VecDeque<_> = (0..5).map(|i| pending(&format!("c{i}"), i)).collect();
        assert_eq!(take_batch(&mut waiting, 3).len(), 3);
        assert_eq!(waiting.len(), 2);
    }
}
