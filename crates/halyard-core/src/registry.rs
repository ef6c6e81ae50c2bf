//! Who owns a client's session: the claim a CONNECT must win before its CONNACK.
//!
//! A claim is two-phase. The broker asks its [`SessionRegistry`] to settle a
//! [`ClaimRequest`]; a single node settles it at once ([`LocalSessionRegistry`]), while a
//! cluster answers [`ClaimPoll::Pending`], the request leaves the core as
//! [`Output::Claim`](crate::Output::Claim), and the CONNECT waits until the outcome comes
//! back through [`Broker::handle_claim`](crate::Broker::handle_claim). A refused claim (no
//! quorum) gets CONNACK 0x88 Server unavailable (MQTT 5) or 0x03 (3.x).
//!
//! Every granted claim carries a fencing epoch larger than any earlier claim of the client
//! id. The session keeps it (and the store persists it); timers and the session's actions
//! carry it, so that whatever was armed under an older claim does nothing.

use halyard_codec::Will;

use crate::broker::ConnectionId;
use crate::packet_ids::PacketIds;
use crate::transfer::SessionState;

/// A CONNECT's request for its client id's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The connection waiting for the outcome.
    pub conn: ConnectionId,
    /// The client id claimed.
    pub client_id: String,
    /// Epoch of the session this node holds for the client id, if it holds one.
    pub held_epoch: Option<u64>,
    /// Clean Start of the CONNECT: a session held elsewhere is discarded, not moved.
    pub clean_start: bool,
    /// Session Expiry Interval granted (seconds; 0 = the session ends with the connection).
    pub expiry_interval: u32,
    /// The CONNECT's will: a cluster keeps it with the claim, so that the survivors publish
    /// it if this node is lost. Boxed for the reason `Link::will` is.
    pub will: Option<Box<Will>>,
}

/// How a claim ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This node owns the session from now on, under `epoch`.
    Granted {
        /// The fencing epoch; larger than any earlier claim of the client id.
        epoch: u64,
        /// The session's state moved from the node that owned it before, if any.
        session: Option<Box<SessionState>>,
        /// The identifiers the session numbers its QoS 1/2 messages in under this claim.
        packet_ids: PacketIds,
    },
    /// The claim could not be decided (no quorum, or a newer claim won meanwhile).
    Refused,
}

/// Whether a claim is settled now or later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimPoll {
    /// Settled at once.
    Ready(ClaimOutcome),
    /// The outcome comes back through `Broker::handle_claim`.
    Pending,
}

/// The seam for session ownership.
pub trait SessionRegistry: Send {
    /// Starts a claim for `request`.
    fn claim(&mut self, request: &ClaimRequest) -> ClaimPoll;
    /// The session of `client_id` held under `epoch` ended on this node. Returns true when
    /// others must hear of it: the release then leaves the core as
    /// [`Output::Release`](crate::Output::Release).
    fn release(&mut self, client_id: &str, epoch: u64) -> bool;
    /// A session was restored from the store under `epoch`: later claims must exceed it.
    fn restored(&mut self, epoch: u64);
}

/// Single-node registry: every claim succeeds at once with an increasing epoch.
#[derive(Debug, Default)]
pub struct LocalSessionRegistry {
    last_epoch: u64,
}

impl SessionRegistry for LocalSessionRegistry {
    fn claim(&mut self, _request: &ClaimRequest) -> ClaimPoll {
        self.last_epoch += 1;
        ClaimPoll::Ready(ClaimOutcome::Granted {
            epoch: self.last_epoch,
            session: None,
            packet_ids: PacketIds::ALL,
        })
    }

    fn release(&mut self, _client_id: &str, _epoch: u64) -> bool {
        false
    }

    fn restored(&mut self, epoch: u64) {
        self.last_epoch = self.last_epoch.max(epoch);
    }
}

/// A cluster node's registry: every claim is left to the driver (the core emits it as
/// `Output::Claim` and waits for `Broker::handle_claim`), and every release leaves as
/// `Output::Release`. Epochs come from the driver (in a cluster, the raft log index of the
/// claim), so nothing is counted here.
#[derive(Debug, Default)]
pub struct DeferredSessionRegistry;

impl SessionRegistry for DeferredSessionRegistry {
    fn claim(&mut self, _request: &ClaimRequest) -> ClaimPoll {
        ClaimPoll::Pending
    }

    fn release(&mut self, _client_id: &str, _epoch: u64) -> bool {
        true
    }

    fn restored(&mut self, _epoch: u64) {}
}
