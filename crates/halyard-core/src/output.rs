//! What the broker core asks its server to do.

use std::sync::Arc;

use halyard_codec::{Packet, Will};

use crate::broker::ConnectionId;
use crate::message::{Message, NodeId, OpenExchange, SessionKey};
use crate::registry::ClaimRequest;
use crate::router::SubscriptionEntry;

/// What the broker wants the server to do.
// `Send` is far larger than `Close`, but outputs are moved straight into the server's
// per-connection batches; boxing every packet would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Encode `packet` with the protocol version of the connection's CONNECT (3.1.1 if the
    /// connection never completed a CONNECT) and write it.
    Send {
        /// Target connection.
        conn: ConnectionId,
        /// Packet to write.
        packet: Packet,
    },
    /// Flush everything sent so far to this connection, then close it. The broker has
    /// already forgotten the connection; anything more from it is ignored.
    Close {
        /// Connection to close.
        conn: ConnectionId,
    },
    /// Stop reading from this connection: a QoS 1/2 publish from it is waiting for room in
    /// a subscriber's queue (backpressure; see `QueueFullPolicy`). Packets from it that
    /// were already read may still be handed in; the broker holds them in order.
    Pause {
        /// Connection to stop reading from.
        conn: ConnectionId,
    },
    /// Read from this connection again after an [`Output::Pause`].
    Resume {
        /// Connection to read from again.
        conn: ConnectionId,
    },
    /// Call [`Broker::handle_written`] for this connection once the network has taken
    /// what was sent to it so far (the server reports when its writer takes these packets,
    /// which it does only after writing the ones before). Retained messages streamed at
    /// QoS 0 have no acknowledgement to pace them, so their next page waits for this; only
    /// retained streams ask for it, never ordinary messages.
    NotifyWritten {
        /// Connection whose writer should report.
        conn: ConnectionId,
    },
    /// Send a copy of `message` to another node of the cluster, which delivers it to its
    /// own subscribers and never forwards it again (one copy per node, whatever the number
    /// of its subscribers).
    Forward {
        /// Destination node.
        node: NodeId,
        /// The message as published (per-hop properties already stripped).
        message: Arc<Message>,
        /// Share groups (`$share/{group}/{filter}`) this node was picked to serve for this
        /// message; its ordinary subscribers get the message in any case.
        groups: Vec<Arc<str>>,
        /// For QoS 1/2, its sequence number in the destination's outbox, where it is stored
        /// until [`Broker::forwards_acked`](crate::Broker::forwards_acked); QoS 0 forwards
        /// are not stored.
        seq: Option<u64>,
        /// This node's route version when it routed the message (see `move_window`).
        routed_at: u64,
        /// For a moved session's message passed on: the client id whose session alone
        /// gets it there.
        for_session: Option<Arc<str>>,
        /// With `for_session`, the QoS 2 exchange of it that the session's old owner had
        /// open with the client.
        exchange: Option<OpenExchange>,
    },
    /// Settle this claim, then call [`Broker::handle_claim`](crate::Broker::handle_claim)
    /// with its outcome: the CONNECT waits for it (see `registry`).
    Claim(ClaimRequest),
    /// The session of `client_id` held under `epoch` ended on this node: the registry that
    /// asked for it (see `SessionRegistry::release`) should forget the claim.
    Release {
        /// Client id of the ended session.
        client_id: String,
        /// The epoch it was held under.
        epoch: u64,
    },
    /// Replicate these subscription changes of `client_id`'s session, held under `epoch`
    /// (only with [`BrokerParts::replicated`](crate::BrokerParts::replicated)). With a
    /// `ticket`, the SUBACK waits until
    /// [`Broker::handle_routes_committed`](crate::Broker::handle_routes_committed) is
    /// called with it, so a subscriber that has its SUBACK misses nothing published after
    /// it on any node.
    Subscriptions {
        /// What the SUBACK waits on; `None` for removals, which nothing waits for.
        ticket: Option<u64>,
        /// The session's client id.
        client_id: String,
        /// The epoch of the claim the session is held under (fencing).
        epoch: u64,
        /// Filters added (with their options) and removed, in order.
        changes: Vec<SubscriptionUpdate>,
    },
    /// Replicate this retained message (an empty payload clears the topic's), set by a
    /// publish on this node (only with `BrokerParts::replicated`).
    Retain {
        /// The message as published.
        message: Arc<Message>,
    },
    /// The will of `client_id`'s connection under `epoch` is due (`will`) or discarded
    /// (`None`; DISCONNECT 0x00, or the node sends its clients away). Only with
    /// `BrokerParts::replicated`: the cluster keeps the will with the claim, and whoever
    /// takes it out first publishes it, so settle it there and, if this node won it, hand
    /// it back through [`Broker::publish_settled_will`](crate::Broker::publish_settled_will).
    SettleWill {
        /// The client id.
        client_id: String,
        /// The epoch of the claim the connection was made under.
        epoch: u64,
        /// The session that published it, for No Local.
        publisher: SessionKey,
        /// The will to publish once won; `None` to discard it.
        will: Option<Box<Will>>,
    },
}

/// One subscription change to replicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionUpdate {
    /// A subscription added or replaced: the filter as written, `$share/...` included.
    Add {
        /// The filter.
        filter: String,
        /// Its options and identifier.
        entry: SubscriptionEntry,
    },
    /// A subscription removed.
    Remove {
        /// The filter.
        filter: String,
    },
}
