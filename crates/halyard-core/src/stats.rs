//! Counters the broker keeps for metrics and the admin API.

use crate::FastMap;

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
    /// QoS 0 messages not sent to a connection whose writer was congested (the server's
    /// own drops at `max_outbound_buffer` are counted by the server).
    pub dropped_slow_consumer: u64,
    /// QoS 1/2 messages not queued for a subscriber whose queue was full: the new message
    /// under `drop_new`, and under the refusing policies a will, retained-on-subscribe or
    /// forwarded message (no publisher to tell).
    pub dropped_queue_full: u64,
    /// Queued QoS 1/2 messages dropped to make room for newer ones (`drop_oldest`).
    pub dropped_oldest: u64,
    /// QoS 1/2 messages dropped for a subscriber disconnected for a full queue
    /// (`disconnect`).
    pub dropped_slow_disconnect: u64,
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
    /// Of `denied_publish`, those to `$SYS/` topics without an explicit ACL grant.
    pub denied_sys_publish: u64,
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
    /// Messages of a session handed over too late (after its new owner resumed without it)
    /// that found no room in the resumed session's queue.
    pub late_transfer_dropped: u64,
    /// Forwarded messages a new owner could not hold while a session moved to it (more
    /// than `MAX_HELD` at once).
    pub move_window_dropped: u64,
    /// Forwards from other nodes dropped because this node had already stored them (a
    /// replay after a reconnect or a restart).
    pub duplicate_forwards: u64,
    /// Claims of a client id that were refused (CONNACK 0x88 / 0x03).
    pub claims_refused: u64,
    /// Reads of a queue from the store that failed; the messages stay queued on disk and
    /// are read again later, never dropped (a session moved to another node goes without
    /// them, counted here too).
    pub store_read_failures: u64,
    /// Whether the store is out of space: the broker is degraded (see `Broker::is_disk_full`).
    pub disk_full: bool,
    /// What degraded mode refused: QoS 1/2 publishes (MQTT 5: 0x97; 3.x: paused, or closed
    /// unacknowledged when their batch failed to commit) and new persistent sessions
    /// (CONNACK 0x88 / 0x03).
    pub disk_full_refusals: u64,
}

/// Why a message was dropped for one subscriber whose queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Its oldest queued message made room for the new one.
    Oldest,
    /// The new message was not queued.
    New,
    /// The subscriber was disconnected, and the new message not queued.
    Disconnected,
    /// A QoS 0 message not sent: the connection's writer already holds
    /// `max_outbound_buffer` unwritten (see `Broker::handle_congested`).
    SlowConsumer,
    /// A moved session's message that found on this node neither the session, a relay to
    /// follow it, nor a claim waiting for it (see `move_window`).
    MoveWindow,
    /// A message of a session handed over late that found no room in the resumed session,
    /// or no relay to follow it on.
    LateHandOver,
}

impl DropReason {
    /// The metric label and log word.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Oldest => "queue_full_oldest",
            DropReason::New => "queue_full",
            DropReason::Disconnected => "queue_full_disconnect",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::MoveWindow => "move_window",
            DropReason::LateHandOver => "late_hand_over",
        }
    }
}

/// Most clients a [`DropReport`] names; drops of further clients are only summed.
const REPORTED_CLIENTS: usize = 64;

/// Drops since the last report, per client and reason, for a log line per client that
/// costs nothing per message (see `Broker::take_drop_report`).
#[derive(Debug, Default, Clone)]
pub struct DropReport {
    /// (client id, reason, messages dropped), for the first clients that dropped.
    pub clients: Vec<(String, DropReason, u64)>,
    /// Drops of clients beyond those named.
    pub others: u64,
    /// Where each named client's first entry is in `clients`: a stalled fan-out notes a
    /// drop per subscriber per message, and a walk of every entry made each drop cost 64
    /// string compares once the report was full.
    first_entry: FastMap<String, usize>,
}

impl PartialEq for DropReport {
    fn eq(&self, other: &DropReport) -> bool {
        self.clients == other.clients && self.others == other.others
    }
}

impl Eq for DropReport {}

impl DropReport {
    pub(crate) fn note(&mut self, client_id: &str, reason: DropReason) {
        if let Some(&first) = self.first_entry.get(client_id) {
            // A client's entries for other reasons follow its first (rarely more than one).
            if let Some(entry) = self.clients[first..]
                .iter_mut()
                .find(|(id, why, _)| *why == reason && id == client_id)
            {
                entry.2 += 1;
                return;
            }
        }
        if self.clients.len() < REPORTED_CLIENTS {
            self.first_entry
                .entry(client_id.to_owned())
                .or_insert(self.clients.len());
            self.clients.push((client_id.to_owned(), reason, 1));
        } else {
            self.others += 1;
        }
    }

    /// Whether nothing was dropped.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.others == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_sums_per_client_and_reason_and_only_counts_clients_beyond_its_names() {
        let mut report = DropReport::default();
        for client in 0..REPORTED_CLIENTS + 10 {
            for _ in 0..3 {
                report.note(&format!("c{client}"), DropReason::SlowConsumer);
            }
        }
        report.note("c0", DropReason::New);
        report.note("c0", DropReason::SlowConsumer);
        assert_eq!(report.clients.len(), REPORTED_CLIENTS);
        assert_eq!(
            report.clients[0],
            ("c0".into(), DropReason::SlowConsumer, 4)
        );
        assert_eq!(
            report.clients[1],
            ("c1".into(), DropReason::SlowConsumer, 3)
        );
        assert_eq!(
            report.others,
            10 * 3 + 1,
            "c0's new reason had no name left"
        );
    }
}
