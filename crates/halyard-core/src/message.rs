//! The broker's internal form of an application message.

use std::time::Instant;

use bytes::Bytes;
use halyard_codec::{Properties, QoS};

/// Key of a session inside one broker; cheaper to store in indexes than the client id.
pub type SessionKey = u64;

/// Id of a node of a cluster: its 1-based position in the list of voters.
pub type NodeId = u64;

/// A QoS 2 exchange that a moved session's old owner had open with the client when the
/// session left it: the node that holds the session now carries it on under the same
/// packet id [MQTT-4.3.3-8], since the client may hold that id (see `move_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenExchange {
    /// Sent with no PUBREC back yet: sent again under the id with DUP = 1.
    Unreceived(u16),
    /// PUBREC came back: the message is the client's, only PUBREL is due.
    Received(u16),
}

/// A message as accepted from a publisher (or a will), shared by every subscriber that gets it.
///
/// Per-hop properties (topic alias, subscription identifiers, message expiry) are stripped on
/// the way in and computed again for each delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name the message was published to.
    pub topic: String,
    /// Opaque application data.
    pub payload: Bytes,
    /// QoS the publisher used; deliveries get at most this.
    pub qos: QoS,
    /// RETAIN flag as published.
    pub retain: bool,
    /// Properties forwarded unchanged (payload format, content type, response topic,
    /// correlation data, user properties). Boxed and absent when empty, which is most
    /// messages: the full property set is several hundred bytes, and retained and queued
    /// messages can number in the millions.
    pub properties: Option<Box<Properties>>,
    /// When the MQTT 5 Message Expiry Interval runs out; `None` means never.
    pub expires_at: Option<Instant>,
    /// Session that published it, so No Local subscriptions can skip it.
    pub publisher: Option<SessionKey>,
}

/// Boxes `properties` unless they are all unset.
pub fn boxed_properties(properties: Properties) -> Option<Box<Properties>> {
    (properties != Properties::default()).then(|| Box::new(properties))
}

impl Message {
    /// True once the message may no longer be delivered [MQTT-3.3.2-5].
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Seconds of expiry left to forward to a subscriber (rounded up so a live message never
    /// goes out with 0), or `None` when the message does not expire.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        })
    }
}
