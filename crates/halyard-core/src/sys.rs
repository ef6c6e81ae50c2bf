//! `$SYS/broker/...` topics, named as Mosquitto names them so that existing dashboards and
//! scripts (`mosquitto_sub -t '$SYS/#' -v`) work unchanged.
//!
//! [`SysTopics`] is driven by the clock it is given (`now`), like the rest of the core, so
//! the interval and the load averages are testable with a fake clock. The server calls
//! [`SysTopics::handle_timeout`] when [`SysTopics::poll_timeout`] is due and passes the byte
//! counts only it knows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use halyard_codec::QoS;

use crate::broker::Broker;
use crate::message::Message;

/// Byte counters the network shell keeps (the core never sees raw bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SysTraffic {
    /// Bytes read from clients so far.
    pub bytes_received: u64,
    /// Bytes written to clients so far.
    pub bytes_sent: u64,
    /// Network connections accepted so far (for `load/connections/...`).
    pub connections: u64,
}

/// The averaging windows of Mosquitto's `load/...` topics, in seconds.
const WINDOWS: [(&str, f64); 3] = [("1min", 60.0), ("5min", 300.0), ("15min", 900.0)];

/// Counters that get `load/<name>/<window>` averages.
const LOADS: [&str; 5] = [
    "messages/received",
    "messages/sent",
    "bytes/received",
    "bytes/sent",
    "connections",
];

/// Periodic publisher of the `$SYS/broker/...` retained topics.
#[derive(Debug, Clone)]
pub struct SysTopics {
    interval: Duration,
    started: Instant,
    next_due: Instant,
    /// Counter values (in `LOADS` order) at the previous publication.
    last: Option<(Instant, [u64; 5])>,
    /// Exponentially decaying per-minute rates, `[counter][window]`, as Mosquitto computes them.
    loads: [[f64; 3]; 5],
}

impl SysTopics {
    /// A publisher every `interval` (must be non-zero), with uptime counted from `now`. The
    /// first publication is due at once, so `$SYS` is populated right after start.
    pub fn new(interval: Duration, now: Instant) -> SysTopics {
        SysTopics {
            interval: interval.max(Duration::from_millis(1)),
            started: now,
            next_due: now,
            last: None,
            loads: [[0.0; 3]; 5],
        }
    }

    /// When [`SysTopics::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Instant {
        self.next_due
    }

    /// Publishes every `$SYS/broker/...` topic (retained) if due, and schedules the next run.
    pub fn handle_timeout(&mut self, broker: &mut Broker, now: Instant, traffic: SysTraffic) {
        if now < self.next_due {
            return;
        }
        while self.next_due <= now {
            self.next_due += self.interval;
        }
        let stats = broker.stats();
        let counters = [
            stats.messages_received,
            stats.messages_sent,
            traffic.bytes_received,
            traffic.bytes_sent,
            traffic.connections,
        ];
        if let Some((then, before)) = self.last {
            let elapsed = now.saturating_duration_since(then).as_secs_f64();
            if elapsed > 0.0 {
                for (i, load) in self.loads.iter_mut().enumerate() {
                    let per_minute = counters[i].saturating_sub(before[i]) as f64 * 60.0 / elapsed;
                    for (w, (_, window)) in WINDOWS.iter().enumerate() {
                        let decay = (-elapsed / window).exp();
                        load[w] = per_minute + decay * (load[w] - per_minute);
                    }
                }
            }
        }
        self.last = Some((now, counters));

        let uptime = now.saturating_duration_since(self.started).as_secs();
        let (queued, inflight) = broker.admin_queue_depths();
        let mut topics: Vec<(String, String)> = vec![
            (
                "version".into(),
                format!("halyard version {}", env!("CARGO_PKG_VERSION")),
            ),
            ("uptime".into(), format!("{uptime} seconds")),
            (
                "clients/connected".into(),
                stats.connected_clients.to_string(),
            ),
            ("clients/active".into(), stats.connected_clients.to_string()),
            ("clients/total".into(), stats.sessions.to_string()),
            (
                "clients/disconnected".into(),
                (stats.sessions.saturating_sub(stats.connected_clients)).to_string(),
            ),
            (
                "messages/received".into(),
                stats.messages_received.to_string(),
            ),
            ("messages/sent".into(), stats.messages_sent.to_string()),
            (
                "publish/messages/received".into(),
                stats.messages_received.to_string(),
            ),
            (
                "publish/messages/sent".into(),
                stats.messages_sent.to_string(),
            ),
            (
                "publish/messages/dropped".into(),
                (stats.dropped_qos0
                    + stats.dropped_too_large
                    + stats.dropped_queue_full
                    + stats.dropped_oldest
                    + stats.dropped_slow_disconnect
                    + stats.dropped_slow_consumer)
                    .to_string(),
            ),
            ("bytes/received".into(), traffic.bytes_received.to_string()),
            ("bytes/sent".into(), traffic.bytes_sent.to_string()),
            (
                "retained messages/count".into(),
                stats.retained_messages.to_string(),
            ),
            (
                "subscriptions/count".into(),
                stats.subscriptions.to_string(),
            ),
            ("messages/stored".into(), (queued + inflight).to_string()),
            (
                "store/messages/count".into(),
                (queued + inflight).to_string(),
            ),
            ("messages/inflight".into(), inflight.to_string()),
        ];
        for (i, name) in LOADS.iter().enumerate() {
            for (w, (window, _)) in WINDOWS.iter().enumerate() {
                topics.push((
                    format!("load/{name}/{window}"),
                    format!("{:.2}", self.loads[i][w]),
                ));
            }
        }
        for (suffix, payload) in topics {
            broker.publish_sys(now, &format!("$SYS/broker/{suffix}"), payload.into());
        }
    }
}

impl Broker {
    /// Publishes one broker-generated message: stored as retained (in memory only: `$SYS`
    /// values are stale after a restart anyway, so they are not written to the store) and
    /// routed to current subscribers with RETAIN=0 like any live publication.
    pub fn publish_sys(&mut self, now: Instant, topic: &str, payload: Bytes) {
        let message = Message {
            topic: topic.to_owned(),
            payload,
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
        };
        let live = Message {
            retain: false,
            ..message.clone()
        };
        self.retained.set(Arc::new(message));
        self.route(now, Arc::new(live), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BrokerConfig;

    fn retained(broker: &mut Broker, now: Instant, topic: &str) -> Option<String> {
        broker
            .admin_retained(now, topic, 0, 1)
            .items
            .first()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
    }

    #[test]
    fn publishes_at_the_interval_with_uptime_and_loads() {
        let start = Instant::now();
        let mut broker = Broker::new(BrokerConfig::default());
        let mut sys = SysTopics::new(Duration::from_secs(10), start);
        assert_eq!(sys.poll_timeout(), start);
        sys.handle_timeout(&mut broker, start, SysTraffic::default());
        assert_eq!(
            retained(&mut broker, start, "$SYS/broker/uptime").as_deref(),
            Some("0 seconds")
        );
        assert_eq!(
            retained(&mut broker, start, "$SYS/broker/clients/connected").as_deref(),
            Some("0")
        );
        assert_eq!(sys.poll_timeout(), start + Duration::from_secs(10));

        // Not due yet: nothing changes.
        let early = start + Duration::from_secs(5);
        sys.handle_timeout(
            &mut broker,
            early,
            SysTraffic {
                bytes_received: 999,
                ..SysTraffic::default()
            },
        );
        assert_eq!(
            retained(&mut broker, early, "$SYS/broker/bytes/received").as_deref(),
            Some("0")
        );

        // 600 bytes in 60 s = 600 per minute; the 1-minute average moves towards it.
        let later = start + Duration::from_secs(60);
        sys.handle_timeout(
            &mut broker,
            later,
            SysTraffic {
                bytes_received: 600,
                bytes_sent: 60,
                connections: 1,
            },
        );
        assert_eq!(
            retained(&mut broker, later, "$SYS/broker/uptime").as_deref(),
            Some("60 seconds")
        );
        assert_eq!(
            retained(&mut broker, later, "$SYS/broker/bytes/received").as_deref(),
            Some("600")
        );
        let one: f64 = retained(&mut broker, later, "$SYS/broker/load/bytes/received/1min")
            .expect("published")
            .parse()
            .expect("a number");
        let fifteen: f64 = retained(&mut broker, later, "$SYS/broker/load/bytes/received/15min")
            .expect("published")
            .parse()
            .expect("a number");
        // 600 * (1 - e^-1) = 379.27; the longer window moves less.
        assert!((one - 379.27).abs() < 0.01, "{one}");
        assert!(fifteen > 0.0 && fifteen < one, "{fifteen}");
        assert_eq!(sys.poll_timeout(), start + Duration::from_secs(70));
        assert!(retained(&mut broker, later, "$SYS/broker/version")
            .expect("published")
            .starts_with("halyard version "));
        // `#` never reaches `$SYS` [MQTT-4.7.2-1]; the retained store holds them apart.
        assert!(broker.admin_retained(later, "#", 0, 100).items.is_empty());
    }
}
