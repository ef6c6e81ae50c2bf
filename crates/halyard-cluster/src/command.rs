//! The replicated commands (raft entry payloads) and their responses.
//!
//! Every command carries what `apply` needs to be deterministic: the proposer stamps time
//! (`now_ms`) and request ids, so no replica reads a clock or a random number.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::types::{ClientId, NodeId, Owner, WillRecord};

/// One replicated change request.
///
/// postcard encodes a variant by its position and a struct without field names, so a field
/// cannot be added to an entry already in some log: new variants go last, and an entry of
/// an older layout keeps its variant (see [`Command::LegacyClaim`]). Old entries therefore
/// decode on new nodes, but a node running an older build cannot read a new variant: upgrade
/// every node of a cluster before its clients reconnect through an upgraded one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A claim written before `clean_start` existed; applied as `clean_start: false`.
    /// Only read from older logs, never proposed.
    LegacyClaim(LegacyClaim),
    /// Give up ownership if the epoch still matches.
    Release {
        client_id: ClientId,
        node: NodeId,
        epoch: u64,
    },
    /// Add or remove subscriptions, fenced by the owner epoch.
    Subscriptions {
        client_id: ClientId,
        epoch: u64,
        changes: Vec<SubscriptionChange>,
    },
    /// Set a retained message; an empty payload deletes it.
    SetRetained {
        topic: String,
        payload: Bytes,
        now_ms: u64,
    },
    /// Several commands in one raft entry (reconnect storms); applied in order.
    Batch(Vec<Command>),
    /// Take (or CAS) session ownership of a client id.
    Claim(Claim),
    /// A claim whose connection has a will: a granted claim keeps the will with the owner
    /// record, so that the survivors can publish it if this node is lost.
    ClaimWithWill { claim: Claim, will: WillRecord },
    /// The will of `client_id` under `epoch` is published or discarded: a compare-and-set
    /// that removes it if it is still there. Whoever commits it first publishes it, so a
    /// will is published at most once across the cluster.
    SettleWill { client_id: ClientId, epoch: u64 },
}

impl Command {
    /// The client a command concerns; a batch holds at most one command per client.
    pub(crate) fn client_id(&self) -> Option<&str> {
        match self {
            Command::Claim(claim) | Command::ClaimWithWill { claim, .. } => Some(&claim.client_id),
            Command::LegacyClaim(claim) => Some(&claim.client_id),
            Command::Release { client_id, .. }
            | Command::Subscriptions { client_id, .. }
            | Command::SettleWill { client_id, .. } => Some(client_id),
            Command::SetRetained { .. } | Command::Batch(_) => None,
        }
    }
}

/// A claim of session ownership (the distributed lock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub client_id: ClientId,
    pub node: NodeId,
    /// Unique per proposing node; a retry with the same id returns the first answer.
    pub request_id: u64,
    /// `Some(e)`: compare-and-set against the current epoch (0 = no owner); `None`: take over.
    pub expected_epoch: Option<u64>,
    pub session_expiry_secs: u32,
    pub persistent: bool,
    pub now_ms: u64,
    /// MQTT clean start: the client's subscriptions (and their routes) are dropped, not
    /// moved to the claiming node.
    pub clean_start: bool,
}

/// A [`Claim`] as logged before `clean_start` was added (same fields, same order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyClaim {
    pub client_id: ClientId,
    pub node: NodeId,
    pub request_id: u64,
    pub expected_epoch: Option<u64>,
    pub session_expiry_secs: u32,
    pub persistent: bool,
    pub now_ms: u64,
}

impl From<&LegacyClaim> for Claim {
    fn from(legacy: &LegacyClaim) -> Self {
        Claim {
            client_id: legacy.client_id.clone(),
            node: legacy.node,
            request_id: legacy.request_id,
            expected_epoch: legacy.expected_epoch,
            session_expiry_secs: legacy.session_expiry_secs,
            persistent: legacy.persistent,
            now_ms: legacy.now_ms,
            clean_start: false,
        }
    }
}

/// One subscription change of a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubscriptionChange {
    /// Filter as written (`$share/g/f` included) with the broker's opaque options.
    Add {
        filter: String,
        options: Bytes,
    },
    Remove {
        filter: String,
    },
}

/// The answer to one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Claim(ClaimOutcome),
    /// Release: whether the owner was removed.
    Released(bool),
    /// Subscriptions: false when fenced off (stale epoch).
    SubscriptionsApplied(bool),
    /// Retained set/delete: false when refused by the byte cap.
    RetainedStored(bool),
    Batch(Vec<Response>),
    /// A raft-internal entry (blank, membership).
    Nothing,
    /// SettleWill: true when this entry removed the will (its proposer publishes it).
    WillSettled(bool),
}

/// The result of a claim. Kept in snapshots (the answers for retries), so variants only
/// go last, as for [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimOutcome {
    /// A grant answered before generations existed; only read from older snapshots, and
    /// answered to a retry as [`ClaimOutcome::Granted`] of generation 0.
    LegacyGranted {
        epoch: u64,
        previous: Option<(NodeId, u64)>,
    },
    /// CAS failed: the current owner (None when there is none and the expected epoch was not 0).
    Conflict { current: Option<Owner> },
    /// Granted with a new epoch; `previous` is the owner it replaced (node, epoch).
    /// `generation` counts the client id's grants since its session last ended (0 for the
    /// first), so that consecutive owners can tell their packet identifiers apart.
    Granted {
        epoch: u64,
        previous: Option<(NodeId, u64)>,
        generation: u32,
    },
}
