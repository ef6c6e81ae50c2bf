//! The sending half: a bounded queue of unacknowledged frames per destination and the task
//! that keeps a connection to it, writes the queue in order and applies the acks.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::{mpsc, Notify};

use super::{Acked, LinkFrame};
use crate::error::ClusterError;
use crate::frame::{self, Channel, FramedStream, Hello, Welcome};
use crate::metrics::{bump, Counters};
use crate::peer_client::LocalNode;
use crate::status::LinkStatus;
use crate::transport::Transport;
use crate::types::NodeId;

const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Frames for one destination that are not acknowledged yet, in seq order.
pub(crate) struct Outbound {
    state: Mutex<QueueState>,
    wake: Notify,
    capacity: usize,
}

struct QueueState {
    unacked: VecDeque<(u64, Bytes)>,
    /// The highest seq ever queued (seqs must increase).
    last_seq: u64,
    connected: bool,
}

impl Outbound {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                unacked: VecDeque::new(),
                last_seq: 0,
                connected: false,
            }),
            wake: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a frame; `QueueFull` when `capacity` frames await their ack.
    pub(crate) fn push(&self, dest: NodeId, seq: u64, payload: Bytes) -> Result<(), ClusterError> {
        {
            let mut state = self.lock();
            if seq <= state.last_seq {
                return Err(ClusterError::SeqNotIncreasing { dest, seq });
            }
            if state.unacked.len() >= self.capacity {
                return Err(ClusterError::QueueFull(dest));
            }
            state.unacked.push_back((seq, payload));
            state.last_seq = seq;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Whether a frame pushed now would be queued.
    pub(crate) fn has_room(&self) -> bool {
        self.lock().unacked.len() < self.capacity
    }

    /// The queued frames with a seq above `after`, in order.
    fn frames_after(&self, after: u64) -> Vec<(u64, Bytes)> {
        let state = self.lock();
        let start = state.unacked.partition_point(|(seq, _)| *seq <= after);
        state.unacked.range(start..).cloned().collect()
    }

    /// Drops the frames up to `seq`; returns how many.
    fn acknowledge(&self, seq: u64) -> u64 {
        let mut state = self.lock();
        let count = state.unacked.partition_point(|(queued, _)| *queued <= seq);
        state.unacked.drain(..count);
        count as u64
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.lock().connected
    }

    fn set_connected(&self, connected: bool) {
        self.lock().connected = connected;
    }

    pub(crate) fn status(&self, node: NodeId) -> LinkStatus {
        let state = self.lock();
        LinkStatus {
            node,
            connected: state.connected,
            unacked: state.unacked.len() as u64,
        }
    }
}

/// The task that delivers one destination's queue.
pub(crate) struct Sender {
    pub(crate) local: LocalNode,
    pub(crate) dest: NodeId,
    pub(crate) addr: String,
    pub(crate) queue: Arc<Outbound>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) acked: mpsc::Sender<Acked>,
    pub(crate) transport: Arc<dyn Transport>,
}

impl Sender {
    pub(crate) async fn run(self) {
        let mut backoff = FIRST_BACKOFF;
        // The highest seq written on any connection: writing it again is a re-send.
        let mut ever_sent = 0;
        loop {
            match self.connect().await {
                Ok(mut connection) => {
                    backoff = FIRST_BACKOFF;
                    self.queue.set_connected(true);
                    let ended = self.pump(&mut connection, &mut ever_sent).await;
                    self.queue.set_connected(false);
                    if let Err(error) = ended {
                        if frame::is_bad_frame(&error) {
                            bump(&self.counters.bad_frames);
                        }
                        tracing::debug!(dest = self.dest, %error, "peer link connection ended");
                    }
                }
                Err(error) => {
                    tracing::debug!(dest = self.dest, %error, "peer link connect failed");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn connect(&self) -> io::Result<FramedStream> {
        let mut connection = frame::framed(self.transport.connect(&self.addr).await?);
        let hello = Hello {
            channel: Channel::Link,
            from: self.local.id,
            incarnation: self.local.incarnation,
        };
        frame::send(&mut connection, &hello).await?;
        match frame::receive_within::<Welcome>(&mut connection, HANDSHAKE_TIMEOUT).await? {
            Welcome::Accepted { node, .. } if node == self.dest => Ok(connection),
            Welcome::Accepted { node, .. } => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{} is node {node}, not node {}", self.addr, self.dest),
            )),
            Welcome::Rejected(reason) | Welcome::Fenced(reason) => {
                Err(io::Error::new(io::ErrorKind::ConnectionRefused, reason))
            }
        }
    }

    /// Writes every unacked frame (all of them again on a new connection), then new ones as
    /// they are queued, and applies acks, until the connection fails.
    async fn pump(&self, connection: &mut FramedStream, ever_sent: &mut u64) -> io::Result<()> {
        let mut sent_here = 0;
        loop {
            let frames = self.queue.frames_after(sent_here);
            let wrote = !frames.is_empty();
            for (seq, payload) in frames {
                let data = LinkFrame::Data {
                    origin: self.local.id,
                    incarnation: self.local.incarnation,
                    seq,
                    payload,
                };
                let bytes = postcard::to_stdvec(&data).map_err(io::Error::other)?;
                connection.feed(Bytes::from(bytes)).await?;
                bump(&self.counters.link_forwarded);
                if seq <= *ever_sent {
                    bump(&self.counters.link_resent);
                }
                sent_here = seq;
                *ever_sent = (*ever_sent).max(seq);
            }
            if wrote {
                SinkExt::<Bytes>::flush(connection).await?;
            }
            // Biased, so that a simulation replays (see the acceptor).
            tokio::select! {
                biased;
                _ = self.queue.wake.notified() => {}
                received = frame::receive::<LinkFrame>(connection) => match received? {
                    Some(LinkFrame::Ack { seq }) => self.apply_ack(seq).await,
                    Some(LinkFrame::Data { .. }) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "data frame on the sending side"));
                    }
                    None => return Err(io::ErrorKind::UnexpectedEof.into()),
                }
            }
        }
    }

    async fn apply_ack(&self, seq: u64) {
        let acknowledged = self.queue.acknowledge(seq);
        if acknowledged > 0 {
            self.counters
                .link_queued
                .fetch_sub(acknowledged, Ordering::Relaxed);
            // The app reads acks to clean its outbox; if it is gone, nobody needs them.
            let _ = self
                .acked
                .send(Acked {
                    dest: self.dest,
                    seq,
                })
                .await;
        }
    }
}
