//! Broker limits and behaviour switches; every field has a documented default.

use serde::{Deserialize, Serialize};

use crate::pushback::QueueFullPolicy;

/// Limits and switches of the broker core. The binary maps its TOML `[mqtt]`-level keys onto
/// this struct; every field has a default so an empty config is a working broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Largest keep-alive (seconds) a client may ask for. MQTT 5 clients asking for more (or
    /// for 0) are told this value as Server Keep Alive; MQTT 3.x clients asking for more are
    /// refused with "identifier rejected", as Mosquitto does, because 3.x has no way to tell
    /// them. 0 = no maximum.
    pub max_keepalive: u16,
    /// Outbound in-flight window (unacknowledged QoS 1/2 messages) per session; for MQTT 5
    /// clients the smaller of this and their Receive Maximum.
    pub max_inflight: u16,
    /// Inbound QoS 1/2 messages a client may have unacknowledged at once (MQTT 5 Receive
    /// Maximum advertised in CONNACK).
    pub receive_maximum: u16,
    /// Messages queued per session beyond the in-flight window (also while offline).
    pub max_queued_messages: usize,
    /// Bytes (topic and payload) queued per session beyond the in-flight window, on disk
    /// for a persistent session; 0 = bounded by `max_queued_messages` only.
    pub max_queued_bytes: usize,
    /// Largest packet accepted from a client, in bytes (advertised as Maximum Packet Size).
    pub max_packet_size: u32,
    /// Longest topic name or filter, in bytes.
    pub max_topic_length: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    pub max_topic_levels: usize,
    /// Topic aliases an MQTT 5 client may use towards the broker.
    pub topic_alias_maximum: u16,
    /// Whether retained messages are stored.
    pub retain_available: bool,
    /// Upper bound on MQTT 5 session expiry (seconds) a client may ask for.
    pub max_session_expiry: u32,
    /// Whether a client may connect with an empty client id (the broker assigns one).
    pub allow_zero_length_client_id: bool,
    /// What a subscriber's full queue does to a QoS 1/2 message (see [`QueueFullPolicy`]):
    /// `"drop_oldest"` (the default), `"drop_new"` or `"disconnect"` cost that subscriber
    /// alone; `"reject"` (PUBACK/PUBREC 0x97 to MQTT 5 publishers) and `"pushback"` (the
    /// broker stops reading from the publisher until there is room) refuse the publisher,
    /// and MQTT 3.x publishers are then always pushed back, since 3.x cannot refuse.
    pub queue_full_policy: QueueFullPolicy,
    /// PUBLISH packets per second one connection may send (a one-second burst is allowed);
    /// beyond it the client is disconnected (MQTT 5: DISCONNECT 0x96). 0 = no limit.
    pub max_publish_rate: u32,
    /// Subscriptions one session may hold; more are refused (SUBACK 0x97 in MQTT 5, 0x80 in
    /// 3.x). 0 = no limit.
    pub max_subscriptions_per_client: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_keepalive: 0,
            max_inflight: 32,
            receive_maximum: 1024,
            max_queued_messages: 1000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_packet_size: 1024 * 1024,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            topic_alias_maximum: 32,
            retain_available: true,
            max_session_expiry: u32::MAX,
            allow_zero_length_client_id: true,
            queue_full_policy: QueueFullPolicy::default(),
            max_publish_rate: 0,
            max_subscriptions_per_client: 0,
        }
    }
}
