//! The frames of the publish peer link (after the connection's hello).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// One frame on a link connection; data flows sender to receiver, acks the other way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum LinkFrame {
    /// One publish copy, tagged so the receiver can drop duplicates.
    Data {
        origin: NodeId,
        incarnation: u64,
        seq: u64,
        payload: Bytes,
    },
    /// Every seq up to this one is stored by the receiving app (cumulative).
    Ack { seq: u64 },
}
