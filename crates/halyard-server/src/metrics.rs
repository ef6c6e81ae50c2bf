//! Prometheus metrics of one server instance (issue 5).
//!
//! One [`Registry`] per [`crate::Server`], never a global one, so that several brokers in one
//! process (tests, a future cluster test) keep their numbers apart. Traffic counters are
//! atomics bumped by the broker task as it handles packets; gauges and the core's own
//! counters ([`halyard_core::BrokerStats`]) are copied in when `/metrics` is scraped, from a
//! snapshot the broker task takes, so the hot path never touches them.

use std::sync::Mutex;
use std::time::Duration;

use halyard_codec::{Packet, QoS};
use halyard_core::BrokerStats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of the per-QoS message counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct QosLabel {
    qos: u8,
}

/// Label of the drop and refusal counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

/// What the broker task reports at scrape time (see [`Metrics::update`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Snapshot {
    /// The core's counters and sizes.
    pub(crate) stats: BrokerStats,
    /// Messages queued beyond the in-flight windows, over all sessions.
    pub(crate) queued: u64,
    /// Outbound QoS 1/2 messages in flight, over all sessions.
    pub(crate) inflight: u64,
}

/// Every metric of one server, with the registry that exposes them.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// PUBLISH packets received, `[qos]` (pre-resolved family members: no lookup per packet).
    received: [Counter; 3],
    /// PUBLISH packets written to clients, `[qos]`.
    sent: [Counter; 3],
    /// Bytes of MQTT packets read from clients.
    pub(crate) bytes_received: Counter,
    /// Bytes of MQTT packets handed to connection writers.
    pub(crate) bytes_sent: Counter,
    /// Bytes received per QoS of PUBLISH packets.
    bytes_received_qos: [Counter; 3],
    /// Bytes sent per QoS of PUBLISH packets.
    bytes_sent_qos: [Counter; 3],
    /// Network connections accepted.
    pub(crate) connections_accepted: Counter,
    /// QoS 0 messages the dispatcher dropped for a slow consumer.
    pub(crate) dropped_slow_consumer: Counter,
    /// Times a publisher was paused because a subscriber queue was full (pushback).
    publisher_pauses: Counter,
    dropped: Family<ReasonLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    /// Clients refused or disconnected by authentication, counted where it happens (see
    /// `Security::count_refusal`).
    pub(crate) auth_refused: Family<ReasonLabel, Counter>,
    connections: Gauge,
    /// Idle plain TCP connections parked now (see `park.rs`); kept by the parker itself.
    pub(crate) connections_parked: Gauge,
    sessions: Gauge,
    subscriptions: Gauge,
    retained: Gauge,
    queued: Gauge,
    inflight: Gauge,
    /// 1 while the store is out of space and the broker degraded (see `disk_full` in the core).
    disk_full: Gauge,
    /// Bytes the core's sessions hold in memory ([`halyard_core::Broker::held_bytes`]).
    pub(crate) memory_held: Gauge,
    /// Publishers paced by the memory budget now.
    pub(crate) publishers_paced: Gauge,
    /// Seconds publishers spent paced by the memory budget, summed over connections.
    pub(crate) paced_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Bytes of events connections sent to the broker task and it has not handled yet.
    pub(crate) event_queue_bytes: Gauge,
    /// Memory held by bytes queued for connection writers (what `max_outbound_buffer`
    /// bounds per connection), over all open connections; set before each scrape.
    pub(crate) outbound_buffer_bytes: Gauge,
    /// Time from the broker task taking a batch of events with publishes to the end of its
    /// dispatch to connection writers: the broker's own share of publish latency.
    pub(crate) publish_latency: Histogram,
    /// Serializes scrapes, which turn the core's running totals into counter increments.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Index of a QoS in the per-QoS arrays.
fn qi(qos: QoS) -> usize {
    qos as usize
}

impl Metrics {
    /// A fresh registry with every Halyard metric registered under the `halyard_` prefix.
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("halyard");
        let messages_received = Family::<QosLabel, Counter>::default();
        let messages_sent = Family::<QosLabel, Counter>::default();
        let bytes_received_family = Family::<QosLabel, Counter>::default();
        let bytes_sent_family = Family::<QosLabel, Counter>::default();
        let per_qos = |family: &Family<QosLabel, Counter>| {
            [0u8, 1, 2].map(|qos| family.get_or_create(&QosLabel { qos }).clone())
        };
        let metrics = Metrics {
            received: per_qos(&messages_received),
            sent: per_qos(&messages_sent),
            bytes_received_qos: per_qos(&bytes_received_family),
            bytes_sent_qos: per_qos(&bytes_sent_family),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            connections_accepted: Counter::default(),
            dropped_slow_consumer: Counter::default(),
            publisher_pauses: Counter::default(),
            dropped: Family::default(),
            refused: Family::default(),
            auth_refused: Family::default(),
            connections: Gauge::default(),
            connections_parked: Gauge::default(),
            sessions: Gauge::default(),
            subscriptions: Gauge::default(),
            retained: Gauge::default(),
            queued: Gauge::default(),
            inflight: Gauge::default(),
            disk_full: Gauge::default(),
            memory_held: Gauge::default(),
            publishers_paced: Gauge::default(),
            paced_seconds: Counter::default(),
            event_queue_bytes: Gauge::default(),
            outbound_buffer_bytes: Gauge::default(),
            publish_latency: Histogram::new(exponential_buckets(0.000_01, 2.0, 18)),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "messages_received",
            "PUBLISH packets received from clients, by QoS",
            messages_received,
        );
        registry.register(
            "messages_sent",
            "PUBLISH packets sent to clients, by QoS",
            messages_sent,
        );
        registry.register(
            "publish_bytes_received",
            "Bytes of PUBLISH packets received, by QoS",
            bytes_received_family,
        );
        registry.register(
            "publish_bytes_sent",
            "Bytes of PUBLISH packets sent, by QoS",
            bytes_sent_family,
        );
        registry.register(
            "bytes_received",
            "Bytes of MQTT packets received from clients",
            metrics.bytes_received.clone(),
        );
        registry.register(
            "bytes_sent",
            "Bytes of MQTT packets sent to clients",
            metrics.bytes_sent.clone(),
        );
        registry.register(
            "connections_accepted",
            "Network connections accepted",
            metrics.connections_accepted.clone(),
        );
        registry.register(
            "publisher_pauses",
            "Times a publisher stopped being read because a subscriber queue was full",
            metrics.publisher_pauses.clone(),
        );
        registry.register(
            "messages_dropped",
            "Messages not delivered, by reason (qos0_queue_full, too_large, queue_full, queue_full_oldest, queue_full_disconnect, slow_consumer, delivery_not_authorized)",
            metrics.dropped.clone(),
        );
        registry.register(
            "requests_refused",
            "Publishes and subscriptions refused, by reason (quota_exceeded, publish_not_authorized, sys_publish_not_authorized, subscribe_not_authorized, publish_rate, subscription_quota, pushback_timeout, disk_full)",
            metrics.refused.clone(),
        );
        registry.register(
            "auth_refused",
            "Clients refused at CONNECT, at re-authentication or when their token expired, by reason (see README)",
            metrics.auth_refused.clone(),
        );
        registry.register(
            "connections",
            "Clients connected now (CONNECT completed)",
            metrics.connections.clone(),
        );
        registry.register(
            "connections_parked",
            "Idle plain TCP connections parked now: no task, no reactor registration",
            metrics.connections_parked.clone(),
        );
        registry.register(
            "sessions",
            "Sessions held, connected or not",
            metrics.sessions.clone(),
        );
        registry.register(
            "subscriptions",
            "Subscriptions over all sessions",
            metrics.subscriptions.clone(),
        );
        registry.register(
            "retained_messages",
            "Retained messages stored",
            metrics.retained.clone(),
        );
        registry.register(
            "queued_messages",
            "Messages queued beyond the in-flight windows, over all sessions",
            metrics.queued.clone(),
        );
        registry.register(
            "inflight_messages",
            "Outbound QoS 1/2 messages awaiting acknowledgement, over all sessions",
            metrics.inflight.clone(),
        );
        registry.register(
            "disk_full",
            "1 while the data directory is out of space: QoS 1/2 publishes and new persistent sessions are refused (see README)",
            metrics.disk_full.clone(),
        );
        registry.register_with_unit(
            "memory_held",
            "Bytes of messages the sessions hold in memory, queued and in flight (what memory_budget bounds)",
            prometheus_client::registry::Unit::Bytes,
            metrics.memory_held.clone(),
        );
        registry.register(
            "publishers_paced",
            "Publishing connections not read now because memory_budget is exceeded",
            metrics.publishers_paced.clone(),
        );
        registry.register_with_unit(
            "publishers_paced",
            "Time publishing connections spent unread because memory_budget was exceeded, summed over connections",
            prometheus_client::registry::Unit::Seconds,
            metrics.paced_seconds.clone(),
        );
        registry.register_with_unit(
            "event_queue",
            "Bytes of decoded packets handed to the broker task and not handled yet (what event_queue_bytes bounds)",
            prometheus_client::registry::Unit::Bytes,
            metrics.event_queue_bytes.clone(),
        );
        registry.register_with_unit(
            "outbound_buffer",
            "Memory held by bytes queued for connection writers and not written yet, over all open connections (max_outbound_buffer bounds each)",
            prometheus_client::registry::Unit::Bytes,
            metrics.outbound_buffer_bytes.clone(),
        );
        registry.register_with_unit(
            "publish_latency",
            "Broker task time from taking a batch of events with PUBLISH packets to dispatching its output",
            prometheus_client::registry::Unit::Seconds,
            metrics.publish_latency.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Counts what one read of a connection brought; `version` frames the byte count. Returns
    /// how many PUBLISH packets it held (the broker task bounds its intake per turn by them).
    pub(crate) fn count_inbound(
        &self,
        packets: &[Packet],
        version: halyard_codec::ProtocolVersion,
    ) -> usize {
        let mut publishes = 0;
        for packet in packets {
            let len = halyard_codec::encoded_len(packet, version) as u64;
            self.bytes_received.inc_by(len);
            if let Packet::Publish(publish) = packet {
                publishes += 1;
                self.received[qi(publish.qos)].inc();
                self.bytes_received_qos[qi(publish.qos)].inc_by(len);
            }
        }
        publishes
    }

    /// Counts one packet of `len` encoded bytes handed to a connection writer.
    pub(crate) fn count_outbound(&self, packet: &Packet, len: usize) {
        self.bytes_sent.inc_by(len as u64);
        if let Packet::Publish(publish) = packet {
            self.sent[qi(publish.qos)].inc();
            self.bytes_sent_qos[qi(publish.qos)].inc_by(len as u64);
        }
    }

    /// Records the latency of one batch.
    pub(crate) fn observe_publish_latency(&self, elapsed: Duration) {
        self.publish_latency.observe(elapsed.as_secs_f64());
    }

    /// Copies a broker snapshot into the gauges and core-fed counters.
    pub(crate) fn update(&self, snapshot: &Snapshot) {
        let _guard = self
            .scrape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stats = &snapshot.stats;
        let gauge = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge(&self.connections, stats.connected_clients as u64);
        gauge(&self.sessions, stats.sessions as u64);
        gauge(&self.subscriptions, stats.subscriptions as u64);
        gauge(&self.retained, stats.retained_messages as u64);
        gauge(&self.queued, snapshot.queued);
        gauge(&self.inflight, snapshot.inflight);
        gauge(&self.disk_full, u64::from(stats.disk_full));
        // The core keeps running totals; a counter only goes up, by the difference.
        let catch_up = |family: &Family<ReasonLabel, Counter>, reason, total: u64| {
            let counter = family.get_or_create(&ReasonLabel { reason });
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        };
        catch_up(&self.dropped, "qos0_queue_full", stats.dropped_qos0);
        catch_up(&self.dropped, "too_large", stats.dropped_too_large);
        catch_up(&self.dropped, "queue_full", stats.dropped_queue_full);
        catch_up(&self.dropped, "queue_full_oldest", stats.dropped_oldest);
        catch_up(
            &self.dropped,
            "queue_full_disconnect",
            stats.dropped_slow_disconnect,
        );
        catch_up(
            &self.dropped,
            "slow_consumer",
            self.dropped_slow_consumer.get() + stats.dropped_slow_consumer,
        );
        catch_up(&self.dropped, "move_window", stats.move_window_dropped);
        catch_up(&self.dropped, "late_hand_over", stats.late_transfer_dropped);
        catch_up(&self.refused, "quota_exceeded", stats.refused_quota);
        catch_up(
            &self.refused,
            "publish_not_authorized",
            stats
                .denied_publish
                .saturating_sub(stats.denied_sys_publish),
        );
        catch_up(
            &self.refused,
            "sys_publish_not_authorized",
            stats.denied_sys_publish,
        );
        catch_up(
            &self.refused,
            "subscribe_not_authorized",
            stats.denied_subscribe,
        );
        catch_up(&self.refused, "publish_rate", stats.refused_publish_rate);
        catch_up(
            &self.refused,
            "subscription_quota",
            stats.refused_subscription_quota,
        );
        catch_up(&self.refused, "pushback_timeout", stats.pushback_timeouts);
        catch_up(&self.refused, "disk_full", stats.disk_full_refusals);
        catch_up(
            &self.dropped,
            "delivery_not_authorized",
            stats.denied_delivery,
        );
        let pauses = self.publisher_pauses.get();
        if stats.pushback_pauses > pauses {
            self.publisher_pauses.inc_by(stats.pushback_pauses - pauses);
        }
    }

    /// The Prometheus text exposition of every metric, and of `extra`'s (the cluster's).
    pub(crate) fn encode(&self, extra: Option<&Registry>) -> Result<String, std::fmt::Error> {
        use prometheus_client::encoding::text;
        let mut out = String::new();
        text::encode_registry(&mut out, &self.registry)?;
        if let Some(extra) = extra {
            text::encode_registry(&mut out, extra)?;
        }
        text::encode_eof(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::{ProtocolVersion, Publish};

    #[test]
    fn traffic_and_snapshot_show_in_the_text() {
        let metrics = Metrics::new();
        let publish = Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            topic: "a".into(),
            packet_id: Some(1),
            payload: vec![0; 10].into(),
            ..Publish::default()
        });
        assert_eq!(
            metrics.count_inbound(std::slice::from_ref(&publish), ProtocolVersion::V3_1_1),
            1
        );
        assert_eq!(
            metrics.count_inbound(&[Packet::PingReq], ProtocolVersion::V3_1_1),
            0
        );
        metrics.count_outbound(&publish, 17);
        metrics.observe_publish_latency(Duration::from_micros(50));
        let mut snapshot = Snapshot::default();
        snapshot.stats.connected_clients = 3;
        snapshot.stats.refused_quota = 2;
        snapshot.stats.move_window_dropped = 4;
        snapshot.stats.late_transfer_dropped = 5;
        metrics.update(&snapshot);
        metrics.update(&snapshot);
        let text = metrics.encode(None).expect("encodes");
        assert!(
            text.contains("halyard_messages_received_total{qos=\"1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("halyard_messages_sent_total{qos=\"1\"} 1"),
            "{text}"
        );
        assert!(text.contains("halyard_bytes_sent_total 17"), "{text}");
        assert!(text.contains("halyard_connections 3"), "{text}");
        assert!(
            text.contains("halyard_requests_refused_total{reason=\"quota_exceeded\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("halyard_publish_latency_seconds_count 1"),
            "{text}"
        );
        for (reason, count) in [("move_window", 4), ("late_hand_over", 5)] {
            assert!(
                text.contains(&format!(
                    "halyard_messages_dropped_total{{reason=\"{reason}\"}} {count}"
                )),
                "{text}"
            );
        }
    }
}
