//! What the cluster driver tells the broker task: decisions of raft and arrivals from the
//! peer link, handed to the core between packets like any other event.

use std::sync::Arc;

use halyard_codec::Will;
use halyard_core::{ClaimOutcome, ConnectionId, Message, NodeId, SessionState};

/// What the cluster tells the broker task.
#[derive(Debug)]
pub enum ClusterEvent {
    /// A claim emitted as `Output::Claim` was decided.
    ClaimSettled {
        /// The waiting connection.
        conn: ConnectionId,
        /// The client id it claimed.
        client_id: String,
        /// The outcome.
        outcome: ClaimOutcome,
    },
    /// Routes a SUBACK waits for were committed, or could not be.
    RoutesCommitted {
        /// The core's ticket.
        ticket: u64,
        /// Whether they were.
        committed: bool,
    },
    /// Another node gained or lost subscribers to a filter (`$share/...` for a group).
    Route {
        /// The node.
        node: NodeId,
        /// The filter as subscribed.
        filter: String,
        /// Added (true) or removed.
        added: bool,
    },
    /// A claim of `client_id` by `new_owner` under `epoch` was committed.
    Claimed {
        /// The client id.
        client_id: String,
        /// The new owner's epoch.
        epoch: u64,
        /// The new owner.
        new_owner: NodeId,
    },
    /// Every change of the feed up to raft index `index` was handed over in the events
    /// before this one: once the broker has handled them, the coordinator may count the
    /// index as seen here (see `Coordinator::consumed`).
    Consumed {
        /// The raft index.
        index: u64,
    },
    /// A peer stored every frame this node sent it up to link sequence number `seq`.
    Acked {
        /// The peer.
        dest: NodeId,
        /// The link sequence number.
        seq: u64,
    },
    /// A publish another node forwarded here.
    Forwarded {
        /// The sender, to acknowledge once stored.
        origin: NodeId,
        /// Its sequence number on the link.
        seq: u64,
        /// The sender's incarnation and outbox sequence number, for a stored forward.
        stored_as: Option<(u64, u64)>,
        /// The message.
        message: Message,
        /// Share groups this node serves for it.
        groups: Vec<Arc<str>>,
    },
    /// A retained message set or cleared through raft (possibly by this node).
    Retained(Message),
    /// A session another node ended because a clean-start claim here took its client id.
    EndedSession(Box<SessionState>),
    /// A session handed over after its claim here stopped waiting for it.
    LateSession {
        /// The claim it was sent for.
        epoch: u64,
        /// The session.
        state: Box<SessionState>,
    },
    /// This node lost its lease: it must stop serving its sessions.
    Fenced,
    /// A frame from a peer other than a forward (a session handed over, an undecodable
    /// frame) was taken: acknowledged in order with the forwards before it.
    FrameTaken {
        /// The sender.
        origin: NodeId,
        /// Its sequence number on the link.
        seq: u64,
    },
    /// Held forwards may have room now, or a lane caught up or fell behind: the driver
    /// acts on it while the broker takes events, before the next commit.
    Wake,
    /// A will this node won in raft: publish it.
    WillWon {
        /// The session that published it here (0 for another node's client).
        publisher: u64,
        /// The will.
        will: Box<Will>,
    },
}
