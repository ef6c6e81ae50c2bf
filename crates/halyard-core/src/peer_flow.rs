//! Flow control across nodes, for the `queue_full_policy` values that refuse the publisher
//! (`pushback`, `reject`).
//!
//! On one node those policies slow the publisher down instead of dropping for a full
//! subscriber (see `pushback`). Across nodes the publisher's PUBACK left from its own node,
//! so the subscriber's node can no longer refuse the message; it can only take it later.
//! Two halves make the slowdown reach the publisher:
//! - **Receiver:** [`Broker::offer_forward`] gives back a QoS 1/2 forward that a local
//!   subscriber has no room for. The cluster driver keeps it, unacknowledged, with every
//!   later frame of that peer behind it, and offers it again; the peer link's bounded window
//!   of unacknowledged frames then fills and the sender's lane falls behind.
//! - **Sender:** while a lane is behind, the driver marks its node congested
//!   ([`Broker::set_node_congested`]); a QoS 1/2 publish that would be forwarded there then
//!   waits like a publish blocked by a full local queue (`WaitingFor::Node`), and goes on
//!   when the lane has caught up.
//!
//! Under the drop policies nothing changes: a full subscriber loses its own messages,
//! counted, and the link never waits.

use std::sync::Arc;
use std::time::Instant;

use halyard_codec::QoS;

use crate::broker::Broker;
use crate::message::{Message, NodeId, OpenExchange};

/// A publish another node forwarded here, as it came off the peer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerForward {
    /// The sender's (incarnation, outbox sequence number) of a QoS 1/2 forward: the
    /// duplicate filter across restarts.
    pub stored_as: Option<(u64, u64)>,
    /// The message.
    pub message: Message,
    /// Share groups the sender picked this node to serve for it.
    pub groups: Vec<Arc<str>>,
    /// The sender's route version when it routed the message (see `move_window`).
    pub routed_at: u64,
    /// A message a moved session's old owner passes on: for that client id's session
    /// alone, whatever else matches here.
    pub for_session: Option<Arc<str>>,
    /// With `for_session`, the QoS 2 exchange of it the old owner had open with the client.
    pub exchange: Option<OpenExchange>,
}

/// What became of a forward offered with [`Broker::offer_forward`].
#[derive(Debug)]
pub enum ForwardOffer {
    /// Delivered, queued, held for a moving session, or dropped as a replay: acknowledge it.
    Taken,
    /// A local subscriber has no room: nothing was delivered; offer it again later.
    NoRoom(PeerForward),
    /// Routed at a route version this node has not reached: nothing was delivered; offer
    /// it again once [`Broker::set_route_version`] has caught up (see `move_window`).
    Early(PeerForward),
}

impl Broker {
    /// [`Broker::handle_forward`], except that under a refusing `queue_full_policy` a QoS
    /// 1/2 message some local subscriber has no room for is given back untouched (see the
    /// module documentation).
    pub fn offer_forward(
        &mut self,
        now: Instant,
        origin: NodeId,
        forward: PeerForward,
    ) -> ForwardOffer {
        let atomic = forward.message.qos != QoS::AtMostOnce
            && self.config.queue_full_policy.refuses_publisher();
        self.take_forward(now, origin, forward, atomic, true)
    }

    /// Whether this node's forward lane to `node` is behind. While it is, QoS 1/2 publishes
    /// that would be forwarded there wait (under a refusing policy); once it has caught up,
    /// they go on.
    pub fn set_node_congested(&mut self, now: Instant, node: NodeId, congested: bool) {
        let known = self.congested_nodes.contains(&node);
        if congested && !known {
            self.congested_nodes.push(node);
        } else if !congested && known {
            self.congested_nodes.retain(|other| *other != node);
            self.pushback.note_maybe_room();
            self.retry_paused(now);
        }
    }

    /// Whether room may have appeared in a local queue since the last call (an
    /// acknowledgement, a subscriber gone, ...): the moment to offer held forwards again.
    pub fn take_room_freed(&mut self) -> bool {
        std::mem::take(&mut self.pushback.freed)
    }
}
