//! What the cluster driver tells the broker task: decisions of raft and arrivals from the
//! peer link, handed to the core between packets like any other event.

use halyard_codec::Will;
use halyard_core::{ClaimOutcome, ConnectionId, Message, NodeId, PeerForward, SessionState};

/// A claim of this node as raft applied it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnClaim {
    /// Its epoch.
    pub epoch: u64,
    /// Its Session Expiry Interval.
    pub expiry_secs: u32,
    /// Its proposer's clock (this node's).
    pub claimed_ms: u64,
    /// Whether another node may have served the session before this claim: its previous
    /// owner was another node, or that is not known.
    pub previous_elsewhere: bool,
}

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
    /// A claim of `client_id` by this node under `epoch` was committed.
    ClaimedHere {
        /// The client id.
        client_id: String,
        /// The claim.
        claim: OwnClaim,
    },
    /// The raft entry at `index` was applied (or, at start and after a snapshot, every
    /// entry up to it): its route, ownership and retained changes, handed to the core at
    /// once, so that the core's route version (`Broker::set_route_version`) never names a
    /// half-applied entry. Once the broker has handled them, the coordinator may count the
    /// index as seen here (see `Coordinator::consumed`).
    Applied {
        /// The raft index.
        index: u64,
        /// The entry's changes, as events ([`ClusterEvent::Route`], `Claimed`, `ClaimedHere`,
        /// `Retained`).
        changes: Vec<ClusterEvent>,
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
        /// The forward.
        forward: PeerForward,
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
    /// A session handed over for this node's claim of `client_id` under `epoch` was kept:
    /// no claim waited for it.
    HandOverKept {
        /// The client id.
        client_id: String,
        /// The claim it was sent for.
        epoch: u64,
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
