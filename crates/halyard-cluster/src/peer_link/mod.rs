//! The publish peer link: point-to-point copies of publishes between nodes.
//!
//! `send(dest, seq, payload)` queues a frame tagged (origin, incarnation, seq) for one
//! destination, where the caller's `seq` is a persistent, increasing per-destination
//! sequence. One sender task per destination keeps a TCP connection (over the cluster port)
//! and writes the queue in order; the receiver hands each new frame to its app and drops
//! duplicates by the per-(origin, incarnation) high-water mark. The receiving app calls
//! `ack(origin, seq)` once it has stored a frame; acks flow back on the same connection
//! (cumulative) and the sender reports them to its app, which can then delete the message from
//! its durable outbox. Unacknowledged frames stay queued (at most `capacity` per destination;
//! past that `send` fails with `QueueFull`) and are re-sent after a reconnect.

mod frame;
mod inbound;
mod outbound;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

pub(crate) use frame::LinkFrame;
pub(crate) use inbound::LinkInbound;

use crate::config::peer_addr;
use crate::error::ClusterError;
use crate::metrics::{bump, Counters};
use crate::peer_client::LocalNode;
use crate::status::LinkStatus;
use crate::transport::Transport;
use crate::types::NodeId;
use outbound::Outbound;

/// A frame received from another node, for the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub origin: NodeId,
    pub origin_incarnation: u64,
    pub seq: u64,
    pub payload: Bytes,
}

/// A destination has stored every frame up to `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub dest: NodeId,
    pub seq: u64,
}

/// The app's ends of the link: frames received, and acks of frames sent.
#[derive(Debug)]
pub struct LinkReceivers {
    pub deliveries: mpsc::Receiver<Delivery>,
    pub acked: mpsc::Receiver<Acked>,
}

/// The sending side and the ack handle of the peer link.
pub struct PeerLink {
    local: LocalNode,
    capacity: usize,
    /// One queue and sender task per destination; destinations change with the membership.
    outbound: Mutex<BTreeMap<NodeId, Destination>>,
    acked: mpsc::Sender<Acked>,
    counters: Arc<Counters>,
    transport: Arc<dyn Transport>,
    inbound: LinkInbound,
}

/// One destination's queue and the task that delivers it.
struct Destination {
    addr: String,
    queue: Arc<Outbound>,
    task: AbortHandle,
}

impl PeerLink {
    /// Starts one sender task per other node in `peers`; returns the link, the inbound half
    /// for the cluster port, and the app's receivers.
    pub(crate) fn start(
        local: LocalNode,
        peers: &[String],
        capacity: usize,
        counters: Arc<Counters>,
        transport: Arc<dyn Transport>,
    ) -> (PeerLink, LinkReceivers) {
        let (acked_tx, acked) = mpsc::channel(capacity);
        let (deliveries_tx, deliveries) = mpsc::channel(capacity);
        let inbound = LinkInbound::new(deliveries_tx, counters.clone());
        let link = PeerLink {
            local,
            capacity,
            outbound: Mutex::new(BTreeMap::new()),
            acked: acked_tx,
            counters,
            transport,
            inbound,
        };
        let destinations = (1..=peers.len() as NodeId)
            .filter_map(|dest| Some((dest, peer_addr(peers, dest)?.clone())))
            .collect();
        link.set_destinations(destinations);
        (link, LinkReceivers { deliveries, acked })
    }

    /// Makes the destinations exactly `members` (this node left out): starts a sender for
    /// each new one (or one whose address changed) and stops those of nodes no longer there,
    /// dropping what was queued for them.
    pub(crate) fn set_destinations(&self, members: BTreeMap<NodeId, String>) {
        let mut outbound = self
            .outbound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        outbound.retain(|dest, destination| {
            let keep = members.get(dest) == Some(&destination.addr);
            if !keep {
                destination.task.abort();
            }
            keep
        });
        for (dest, addr) in members {
            if dest == self.local.id || outbound.contains_key(&dest) {
                continue;
            }
            let queue = Arc::new(Outbound::new(self.capacity));
            let sender = outbound::Sender {
                local: self.local,
                dest,
                addr: addr.clone(),
                queue: queue.clone(),
                counters: self.counters.clone(),
                acked: self.acked.clone(),
                transport: self.transport.clone(),
            };
            let task = tokio::spawn(sender.run()).abort_handle();
            outbound.insert(dest, Destination { addr, queue, task });
        }
    }

    fn queue(&self, dest: NodeId) -> Option<Arc<Outbound>> {
        self.outbound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&dest)
            .map(|destination| destination.queue.clone())
    }

    /// The half that serves incoming link connections.
    pub(crate) fn inbound(&self) -> LinkInbound {
        self.inbound.clone()
    }

    /// Queues a frame for `dest`. `seq` must be larger than the last one sent to `dest`.
    pub fn send(&self, dest: NodeId, seq: u64, payload: Bytes) -> Result<(), ClusterError> {
        let queue = self.queue(dest).ok_or(ClusterError::UnknownNode(dest))?;
        let pushed = queue.push(dest, seq, payload);
        match pushed {
            Ok(()) => bump(&self.counters.link_queued),
            Err(ClusterError::QueueFull(_)) => bump(&self.counters.link_dropped),
            Err(_) => {}
        }
        pushed
    }

    /// Whether `send` to `dest` would queue a frame now rather than fail with `QueueFull`:
    /// an app with a durable outbox keeps frames there instead of losing them.
    pub fn has_room(&self, dest: NodeId) -> bool {
        self.queue(dest).is_some_and(|queue| queue.has_room())
    }

    /// Whether the link to `dest` has a connection now.
    pub fn is_connected(&self, dest: NodeId) -> bool {
        self.queue(dest).is_some_and(|queue| queue.is_connected())
    }

    /// The app has stored every frame from `origin` up to `seq`; tells the sender.
    pub fn ack(&self, origin: NodeId, seq: u64) {
        self.inbound.ack(origin, seq);
    }

    /// Starts duplicate detection for `origin`'s incarnation at `seq` (what the app already
    /// stored before a restart); frames up to `seq` are dropped and acknowledged.
    pub fn seed_high_water(&self, origin: NodeId, origin_incarnation: u64, seq: u64) {
        self.inbound.seed(origin, origin_incarnation, seq);
    }

    /// Per destination: connected, and frames awaiting an ack.
    pub fn status(&self) -> Vec<LinkStatus> {
        self.outbound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(dest, destination)| destination.queue.status(*dest))
            .collect()
    }

    /// Stops the sender tasks.
    pub(crate) fn stop(&self) {
        self.set_destinations(BTreeMap::new());
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
