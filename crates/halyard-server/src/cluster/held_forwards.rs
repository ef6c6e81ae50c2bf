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
use std::sync::Arc;
use std::time::Instant;

use halyard_cluster::NodeId;
use halyard_core::{Broker, ForwardOffer, Message, PUSHBACK_TIMEOUT};

/// A frame waiting behind a held forward, in arrival order.
pub(crate) enum HeldFrame {
    /// A forward, to offer again.
    Forward {
        seq: u64,
        stored_as: Option<(u64, u64)>,
        message: Message,
        groups: Vec<Arc<str>>,
    },
    /// Another frame, taken already, whose acknowledgement must not overtake the forwards.
    Ack(u64),
}

struct Held {
    /// When the forward at the front began to wait.
    since: Instant,
    frames: VecDeque<HeldFrame>,
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

    /// Queues `frame` behind what `origin` has held; gives it back if nothing is held.
    pub(crate) fn queue_behind(&mut self, origin: NodeId, frame: HeldFrame) -> Option<HeldFrame> {
        match self.by_origin.get_mut(&origin) {
            Some(held) => {
                held.frames.push_back(frame);
                None
            }
            None => Some(frame),
        }
    }

    /// Starts holding `origin`'s frames with `frame`, a forward that found no room.
    pub(crate) fn hold(&mut self, now: Instant, origin: NodeId, frame: HeldFrame) {
        let held = self.by_origin.entry(origin).or_insert_with(|| Held {
            since: now,
            frames: VecDeque::new(),
        });
        held.frames.push_front(frame);
    }

    /// Whether a held forward has waited out [`PUSHBACK_TIMEOUT`].
    pub(crate) fn overdue(&self, now: Instant) -> bool {
        self.by_origin
            .values()
            .any(|held| now >= held.since + PUSHBACK_TIMEOUT)
    }

    /// How many forwards are held.
    pub(crate) fn forwards(&self) -> usize {
        self.by_origin
            .values()
            .map(|held| {
                held.frames
                    .iter()
                    .filter(|frame| matches!(frame, HeldFrame::Forward { .. }))
                    .count()
            })
            .sum()
    }

    /// Offers every peer's held frames again, in order, until one still finds no room;
    /// the link sequence numbers taken go to `to_ack`, acknowledged after the next commit.
    pub(crate) fn retry(
        &mut self,
        broker: &mut Broker,
        now: Instant,
        to_ack: &mut Vec<(NodeId, u64)>,
    ) {
        for (&origin, held) in &mut self.by_origin {
            while let Some(frame) = held.frames.pop_front() {
                match frame {
                    HeldFrame::Ack(seq) => to_ack.push((origin, seq)),
                    HeldFrame::Forward {
                        seq,
                        stored_as,
                        message,
                        groups,
                    } if now >= held.since + PUSHBACK_TIMEOUT => {
                        broker.handle_forward(now, origin, stored_as, message, &groups);
                        to_ack.push((origin, seq));
                        held.since = now;
                    }
                    HeldFrame::Forward {
                        seq,
                        stored_as,
                        message,
                        groups,
                    } => match broker.offer_forward(now, origin, stored_as, message, &groups) {
                        ForwardOffer::Taken => {
                            to_ack.push((origin, seq));
                            held.since = now;
                        }
                        ForwardOffer::NoRoom(message) => {
                            held.frames.push_front(HeldFrame::Forward {
                                seq,
                                stored_as,
                                message,
                                groups,
                            });
                            break;
                        }
                    },
                }
            }
        }
        self.by_origin.retain(|_, held| !held.frames.is_empty());
    }
}
