//! Per-client limits enforced by the core: publish rate and subscriptions per client.
//!
//! - `max_publish_rate` (messages per second, 0 = unlimited) is a token bucket per
//!   connection holding at most one second's worth, so short bursts pass. A client that
//!   publishes faster is disconnected: MQTT 5 clients first get DISCONNECT 0x96 (Message rate
//!   too high), 3.x clients are closed. Disconnecting (rather than silently dropping) tells a
//!   misbehaving client something is wrong and never loses an acknowledged message.
//! - `max_subscriptions_per_client` (0 = unlimited) refuses new filters beyond the limit with
//!   SUBACK 0x97 (Quota exceeded) in MQTT 5 and 0x80 in 3.x; re-subscribing to a filter the
//!   session already has is always allowed (it replaces the subscription).
//!
//! Both refusals are counted in [`crate::BrokerStats`].

use std::time::Instant;

use crate::broker::Broker;
use crate::message::SessionKey;

/// A token bucket of publishes per second; a rate of 0 never runs out.
#[derive(Debug, Clone)]
pub(crate) struct RateBucket {
    rate: u32,
    tokens: f64,
    at: Instant,
}

impl RateBucket {
    /// A full bucket for `rate` messages per second.
    pub(crate) fn new(rate: u32, now: Instant) -> RateBucket {
        RateBucket {
            rate,
            tokens: f64::from(rate),
            at: now,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let rate = f64::from(self.rate);
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Broker {
    /// Whether the session may add `filter` under `max_subscriptions_per_client`; counts a
    /// refusal.
    pub(crate) fn subscription_quota_allows(&mut self, key: SessionKey, filter: &str) -> bool {
        let limit = self.config.max_subscriptions_per_client;
        if limit == 0 {
            return true;
        }
        let allowed = self.sessions.get(&key).is_none_or(|session| {
            session.subscriptions.contains_key(filter) || session.subscriptions.len() < limit
        });
        if !allowed {
            self.out.stats.refused_subscription_quota += 1;
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_a_second_of_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = RateBucket::new(10, start);
        for _ in 0..10 {
            assert!(bucket.take(start));
        }
        assert!(!bucket.take(start), "burst exhausted");
        assert!(
            bucket.take(start + Duration::from_millis(100)),
            "one token per 100 ms"
        );
        assert!(!bucket.take(start + Duration::from_millis(150)));
        let mut unlimited = RateBucket::new(0, start);
        assert!((0..10_000).all(|_| unlimited.take(start)));
    }
}
