//! Forwards from peers that a local subscriber had no room for, under a refusing
//! `queue_full_policy` (see the core's `peer_flow`).
//!
//! A held forward is not acknowledged, and every later frame of the same peer waits behind
//! it, acknowledgement included: acknowledgements are cumulative, so one for a later frame
//! would acknowledge the held one too. The peer link's bounded window of unacknowledged
//! frames then slows the sender down. A forward held longer than [`PUSHBACK_TIMEOUT`] is
//! delivered to whoever has room and dropped (counted) for the full subscriber, the bound
//! that local pushback has too: one stuck subscriber must not stop a peer's traffic here
//! for good.

use std::collections::{BTreeMap, VecDeque};

use std::time::Instant;

use halyard_cluster::NodeId;
use halyard_core::{Broker, ForwardOffer, PeerForward, PUSHBACK_TIMEOUT};
use tracing::debug;

/// A frame from a peer that the broker takes in order: held, with those after it, while a
/// forward finds no room.
pub(crate) enum PeerFrame {
    /// A forward, offered to the core.
    Forward { seq: u64, forward: PeerForward },
    /// Another frame, taken already, whose acknowledgement must not overtake the forwards.
    Ack(u64),
}

struct Held {
    /// When the forward at the front began to wait.
    since: Instant,
    frames: VecDeque<PeerFrame>,
}

/// Held frames per peer.
#[derive(Default)]
pub(crate) struct HeldForwards {
    by_origin: BTreeMap<NodeId, Held>,
}

impl HeldForwards {
    pub(crate) fn is_empty(&self) -> bool {
        self.by_origin.is_empty()
    }

    /// Takes `frame` from `origin`: behind what that peer has held, or at once; held (with
    /// every later frame of that peer) if it is a forward that finds no room. The link
    /// sequence numbers taken go to `to_ack`, acknowledged after the next commit.
    pub(crate) fn take(
        &mut self,
        broker: &mut Broker,
        now: Instant,
        origin: NodeId,
        frame: PeerFrame,
        to_ack: &mut Vec<(NodeId, u64)>,
    ) {
        if let Some(held) = self.by_origin.get_mut(&origin) {
            held.frames.push_back(frame);
            return;
        }
        let mut held = Held {
            since: now,
            frames: VecDeque::from([frame]),
        };
        offer(&mut held, broker, now, origin, to_ack);
        if !held.frames.is_empty() {
            debug!(origin, "a forward waits for room in a local queue");
            self.by_origin.insert(origin, held);
        }
    }

    /// Whether a held forward has waited out [`PUSHBACK_TIMEOUT`].
    pub(crate) fn overdue(&self, now: Instant) -> bool {
        self.by_origin
            .values()
            .any(|held| now >= held.since + PUSHBACK_TIMEOUT)
    }

    /// Offers every peer's held frames again, in order, until one still finds no room.
    pub(crate) fn retry(
        &mut self,
        broker: &mut Broker,
        now: Instant,
        to_ack: &mut Vec<(NodeId, u64)>,
    ) {
        for (&origin, held) in &mut self.by_origin {
            offer(held, broker, now, origin, to_ack);
        }
        self.by_origin.retain(|_, held| !held.frames.is_empty());
    }
}

/// Hands `origin`'s held frames to the broker in order until a forward finds no room; one
/// that has waited out [`PUSHBACK_TIMEOUT`] is taken whatever room there is.
fn offer(
    held: &mut Held,
    broker: &mut Broker,
    now: Instant,
    origin: NodeId,
    to_ack: &mut Vec<(NodeId, u64)>,
) {
    while let Some(frame) = held.frames.pop_front() {
        let (seq, forward) = match frame {
            PeerFrame::Ack(seq) => {
                to_ack.push((origin, seq));
                continue;
            }
            PeerFrame::Forward { seq, forward } => (seq, forward),
        };
        let offered = if now >= held.since + PUSHBACK_TIMEOUT {
            broker.handle_forward(now, origin, forward);
            ForwardOffer::Taken
        } else {
            broker.offer_forward(now, origin, forward)
        };
        match offered {
            ForwardOffer::Taken => {
                to_ack.push((origin, seq));
                held.since = now;
            }
            ForwardOffer::NoRoom(forward) | ForwardOffer::Early(forward) => {
                held.frames.push_front(PeerFrame::Forward { seq, forward });
                return;
            }
        }
    }
}
