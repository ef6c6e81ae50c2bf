//! Counters the broker keeps for metrics and the admin API.

/// Counters for metrics and the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Connections that completed CONNECT and are open.
    pub connected_clients: usize,
    /// Sessions held, connected or not.
    pub sessions: usize,
    /// Subscriptions across all sessions.
    pub subscriptions: usize,
    /// Retained messages stored.
    pub retained_messages: usize,
    /// PUBLISH packets received from clients.
    pub messages_received: u64,
    /// PUBLISH packets sent to clients.
    pub messages_sent: u64,
    /// QoS 0 messages not delivered because the session's queue was full.
    pub dropped_qos0: u64,
    /// Messages not sent because they exceed the client's Maximum Packet Size.
    pub dropped_too_large: u64,
    /// Will and retained-on-subscribe deliveries lost to a full queue (no publisher to tell).
    pub dropped_queue_full: u64,
    /// QoS 1/2 publishes refused (MQTT 5 reason 0x97, or 3.x connection closed unacknowledged)
    /// because a subscriber's queue was full.
    pub refused_quota: u64,
    /// Times a publisher was paused because a subscriber's queue had no room for its
    /// QoS 1/2 publish (backpressure instead of refusing it).
    pub pushback_pauses: u64,
    /// Paused publishers closed unacknowledged because the pause outlasted
    /// `PUSHBACK_TIMEOUT`.
    pub pushback_timeouts: u64,
    /// PUBLISH packets the authorizer refused (MQTT 5: answered 0x87; MQTT 3.x:
    /// acknowledged and dropped, as the 3.1.1 spec allows).
    pub denied_publish: u64,
    /// SUBSCRIBE filters the authorizer refused (SUBACK 0x80 / 0x87).
    pub denied_subscribe: u64,
    /// Deliveries withheld because the subscriber may not read the topic.
    pub denied_delivery: u64,
    /// Connections closed for publishing faster than `max_publish_rate` (MQTT 5: 0x96).
    pub refused_publish_rate: u64,
    /// SUBSCRIBE filters refused by `max_subscriptions_per_client` (0x97 / 0x80).
    pub refused_subscription_quota: u64,
    /// Copies of messages handed out for other nodes of a cluster ([`Output::Forward`]).
    ///
    /// [`Output::Forward`]: crate::Output::Forward
    pub forwarded: u64,
    /// Claims of a client id that were refused (CONNACK 0x88 / 0x03).
    pub claims_refused: u64,
    /// Reads from the store that failed (queued messages of a session that moved).
    pub storage_read_errors: u64,
}
