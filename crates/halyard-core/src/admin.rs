//! Operator queries and actions on the broker (issue 5: the admin API): list and inspect
//! clients, kick one, list retained messages, publish on the operator's behalf.
//!
//! Kept in its own module, as an `impl Broker` block, so the protocol code in `broker.rs`
//! stays about MQTT; everything here runs on the broker task like any packet, so it needs no
//! lock and sees a consistent state.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use halyard_codec::{topic, ProtocolVersion, QoS, ReasonCode};
use serde::Serialize;

use crate::broker::Broker;
use crate::close::CloseKind;
use crate::message::Message;
use crate::publish::RouteOutcome;
use crate::session::Session;

/// One line of the client list: enough to spot a stuck or misbehaving client at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientSummary {
    /// The MQTT client identifier.
    pub client_id: String,
    /// Whether a network connection is bound to the session now.
    pub connected: bool,
    /// `"3.1"`, `"3.1.1"` or `"5.0"` while connected; `None` for an offline session.
    pub protocol: Option<&'static str>,
    /// Number of subscriptions the session holds.
    pub subscriptions: usize,
    /// Messages waiting beyond the in-flight window (in memory and on disk).
    pub queued: u64,
    /// Outbound QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: usize,
    /// Messages dropped for this session because its queue was full (`queue_full_policy`).
    pub dropped: u64,
    /// Session Expiry Interval in seconds (`4294967295` = never).
    pub expiry_interval: u32,
    /// Whether the session is written to the durable store.
    pub persistent: bool,
}

/// One subscription of a client, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionInfo {
    /// The filter as the client wrote it (shared ones with their `$share/` prefix).
    pub filter: String,
    /// Granted maximum QoS.
    pub qos: u8,
    /// MQTT 5 No Local.
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
    /// MQTT 5 Retain Handling (0, 1 or 2).
    pub retain_handling: u8,
    /// MQTT 5 Subscription Identifier, if any.
    pub identifier: Option<u32>,
}

/// Everything the admin API tells about one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientDetail {
    /// The list fields.
    #[serde(flatten)]
    pub summary: ClientSummary,
    /// Subscriptions, sorted by filter.
    pub subscription_list: Vec<SubscriptionInfo>,
    /// Whether a will is waiting out its delay.
    pub delayed_will: bool,
}

/// One retained message, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedInfo {
    /// Topic name.
    pub topic: String,
    /// QoS it was published with.
    pub qos: u8,
    /// The payload bytes.
    pub payload: Bytes,
}

/// A page of a sorted listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// Items in the whole listing (for the pager).
    pub total: usize,
    /// The requested slice.
    pub items: Vec<T>,
}

/// Why an admin publish was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminPublishError {
    /// The topic is empty, has wildcards or a NUL, or exceeds the configured limits.
    #[error("invalid topic name")]
    InvalidTopic,
    /// QoS must be 0, 1 or 2.
    #[error("qos must be 0, 1 or 2")]
    InvalidQos,
    /// A QoS 1/2 subscriber had no room; nobody got the message.
    #[error("a subscriber's queue is full (quota exceeded)")]
    QuotaExceeded,
}

/// What [`Broker::admin_kick`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kicked {
    /// The client was connected and has been disconnected.
    Disconnected,
    /// The client was offline: its session has been ended.
    SessionEnded,
    /// There is no session with that client id.
    NoSession,
}

/// Retained messages read per store page by [`Broker::admin_retained`].
const ADMIN_PAGE: usize = 1024;

/// Matches [`Broker::admin_retained`] counts past the requested page for `total`.
pub const ADMIN_COUNT_LIMIT: usize = 100_000;

/// Protocol version as operators write it.
fn protocol_name(version: ProtocolVersion) -> &'static str {
    match version {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

fn summary(session: &Session) -> ClientSummary {
    ClientSummary {
        client_id: session.client_id.clone(),
        connected: session.link.is_some(),
        protocol: session.version().map(protocol_name),
        subscriptions: session.subscriptions.len(),
        queued: session.queued(),
        inflight: session.inflight.len(),
        dropped: session.dropped,
        expiry_interval: session.expiry_interval,
        persistent: session.persistent,
    }
}

impl Broker {
    /// Sessions (connected or not) sorted by client id, `limit` of them from `offset`:
    /// sorted so that paging is stable while clients come and go. The index is kept in
    /// order, so a page costs its offset and length, never a sort of every client id.
    pub fn admin_clients(&self, offset: usize, limit: usize) -> Page<ClientSummary> {
        let total = self.client_ids.len();
        let items = self
            .client_ids
            .values()
            .skip(offset)
            .take(limit)
            .filter_map(|key| self.sessions.get(key))
            .map(|session| summary(session))
            .collect();
        Page { total, items }
    }

    /// One client's session, or `None` if the broker holds no session for `client_id`.
    pub fn admin_client(&self, client_id: &str) -> Option<ClientDetail> {
        let session = self.sessions.get(self.client_ids.get(client_id)?)?;
        let mut subscription_list: Vec<SubscriptionInfo> = session
            .subscriptions
            .iter()
            .map(|(filter, entry)| SubscriptionInfo {
                filter: filter.clone(),
                qos: entry.options.qos as u8,
                no_local: entry.options.no_local,
                retain_as_published: entry.options.retain_as_published,
                retain_handling: entry.options.retain_handling,
                identifier: entry.identifier,
            })
            .collect();
        subscription_list.sort_by(|a, b| a.filter.cmp(&b.filter));
        Some(ClientDetail {
            summary: summary(session),
            subscription_list,
            delayed_will: session.delayed_will.is_some(),
        })
    }

    /// Disconnects `client_id` as an administrative action: an MQTT 5 client is told
    /// DISCONNECT 0x98, the will is published (the client did not send DISCONNECT), and the
    /// session lives on per its expiry interval. A session whose client is offline is ended
    /// instead, as if it had expired (a delayed will is published then), so that an operator
    /// can purge one.
    pub fn admin_kick(&mut self, now: Instant, client_id: &str) -> Kicked {
        let Some(&key) = self.client_ids.get(client_id) else {
            return Kicked::NoSession;
        };
        let Some(session) = self.sessions.get(&key) else {
            return Kicked::NoSession;
        };
        if session.link.is_none() {
            self.end_session(now, key);
            return Kicked::SessionEnded;
        }
        self.close_link(
            now,
            key,
            CloseKind::Abnormal(Some(ReasonCode::ADMINISTRATIVE_ACTION)),
        );
        Kicked::Disconnected
    }

    /// Retained messages matching `filter`, in topic-level order (see
    /// [`crate::retained`]), `limit` of them from `offset`. Expired ones are left out (and
    /// removed). Read a page at a time from the store, so a listing never holds more than
    /// `offset + limit` messages; `total` counts every match up to [`ADMIN_COUNT_LIMIT`]
    /// rows past the page and is a lower bound beyond that, so a listing of millions does
    /// not stall the broker.
    pub fn admin_retained(
        &mut self,
        now: Instant,
        filter: &str,
        offset: usize,
        limit: usize,
    ) -> Page<RetainedInfo> {
        let mut items = Vec::new();
        let mut total = 0;
        if !topic::is_valid_topic_filter(filter)
            || topic::parse_shared_subscription(filter).is_some()
        {
            return Page { total, items };
        }
        let wanted = offset.saturating_add(limit);
        let mut after: Option<String> = None;
        loop {
            let page = self.read_retained(now, filter, after.as_deref(), ADMIN_PAGE);
            for message in page.messages {
                if total >= offset && total < wanted {
                    items.push(RetainedInfo {
                        topic: message.topic.clone(),
                        qos: message.qos as u8,
                        payload: message.payload.clone(),
                    });
                }
                total += 1;
            }
            match page.next {
                Some(next) if total < wanted.saturating_add(ADMIN_COUNT_LIMIT) => {
                    after = Some(next)
                }
                _ => return Page { total, items },
            }
        }
    }

    /// Publishes a message as the operator, to every matching subscriber (and the retained
    /// store when `retain`). Ok(true) if some subscriber got it, Ok(false) if none matched.
    pub fn admin_publish(
        &mut self,
        now: Instant,
        topic_name: &str,
        payload: Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<bool, AdminPublishError> {
        if !topic::is_valid_topic_name(topic_name) || !self.topic_within_limits(topic_name) {
            return Err(AdminPublishError::InvalidTopic);
        }
        let qos = match qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            _ => return Err(AdminPublishError::InvalidQos),
        };
        let message = Message {
            topic: topic_name.to_owned(),
            payload,
            qos,
            retain: retain && self.config.retain_available,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
        };
        match self.route(now, Arc::new(message), true) {
            RouteOutcome::Delivered => Ok(true),
            RouteOutcome::NoSubscribers => Ok(false),
            RouteOutcome::QuotaExceeded => Err(AdminPublishError::QuotaExceeded),
        }
    }

    /// Total outbound messages queued and in flight over all sessions: for the queue-depth
    /// gauges (one pass over the sessions, done per scrape, not per message).
    pub fn admin_queue_depths(&self) -> (u64, u64) {
        self.sessions
            .values()
            .fold((0, 0), |(queued, inflight), s| {
                (queued + s.queued(), inflight + s.inflight.len() as u64)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BrokerConfig, Output};
    use halyard_codec::{Connect, Packet, Subscribe, Subscription, SubscriptionOptions};

    fn connect(broker: &mut Broker, now: Instant, conn: u64, id: &str, v: ProtocolVersion) {
        broker.handle_packet(
            now,
            conn,
            Packet::Connect(Box::new(Connect {
                protocol: v,
                clean_start: true,
                keep_alive: 0,
                client_id: id.to_owned(),
                will: None,
                username: None,
                password: None,
                properties: Default::default(),
            })),
        );
    }

    fn subscribe(broker: &mut Broker, now: Instant, conn: u64, filter: &str) {
        broker.handle_packet(
            now,
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: filter.to_owned(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                }],
                properties: Default::default(),
            }),
        );
    }

    fn drain(broker: &mut Broker) -> Vec<Output> {
        std::iter::from_fn(|| broker.poll_output()).collect()
    }

    #[test]
    fn clients_are_listed_sorted_and_paged() {
        let now = Instant::now();
        let mut broker = Broker::new(BrokerConfig::default());
        for (conn, id) in [(1, "c"), (2, "a"), (3, "b")] {
            connect(&mut broker, now, conn, id, ProtocolVersion::V3_1_1);
        }
        let page = broker.admin_clients(1, 5);
        assert_eq!(page.total, 3);
        let ids: Vec<_> = page.items.iter().map(|c| c.client_id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert!(page.items[0].connected);
        assert_eq!(page.items[0].protocol, Some("3.1.1"));
        assert!(broker.admin_clients(3, 5).items.is_empty());
    }

    #[test]
    fn client_detail_shows_subscriptions() {
        let now = Instant::now();
        let mut broker = Broker::new(BrokerConfig::default());
        connect(&mut broker, now, 1, "s", ProtocolVersion::V5);
        subscribe(&mut broker, now, 1, "a/+");
        let detail = broker.admin_client("s").expect("known client");
        assert_eq!(detail.summary.protocol, Some("5.0"));
        assert_eq!(detail.summary.subscriptions, 1);
        assert_eq!(detail.subscription_list[0].filter, "a/+");
        assert_eq!(detail.subscription_list[0].qos, 1);
        assert!(broker.admin_client("nobody").is_none());
    }

    #[test]
    fn kick_sends_administrative_action_to_v5_and_closes() {
        let now = Instant::now();
        let mut broker = Broker::new(BrokerConfig::default());
        connect(&mut broker, now, 7, "k", ProtocolVersion::V5);
        drain(&mut broker);
        assert_eq!(broker.admin_kick(now, "k"), Kicked::Disconnected);
        let outputs = drain(&mut broker);
        assert!(outputs.iter().any(|o| matches!(o,
            Output::Send { conn: 7, packet: Packet::Disconnect(d) }
                if d.reason == ReasonCode::ADMINISTRATIVE_ACTION)));
        assert!(outputs.contains(&Output::Close { conn: 7 }));
        assert_eq!(
            broker.admin_kick(now, "k"),
            Kicked::NoSession,
            "session ended"
        );
        assert_eq!(broker.admin_kick(now, "unknown"), Kicked::NoSession);
    }

    #[test]
    fn admin_publish_reaches_subscribers_and_retained_listing() {
        let now = Instant::now();
        let mut broker = Broker::new(BrokerConfig::default());
        connect(&mut broker, now, 1, "s", ProtocolVersion::V3_1_1);
        subscribe(&mut broker, now, 1, "x/#");
        drain(&mut broker);
        assert_eq!(
            broker.admin_publish(now, "x/1", Bytes::from_static(b"hi"), 1, true),
            Ok(true)
        );
        assert!(drain(&mut broker).iter().any(|o| matches!(o,
            Output::Send { conn: 1, packet: Packet::Publish(p) } if p.topic == "x/1")));
        assert_eq!(
            broker.admin_publish(now, "y", Bytes::from_static(b"b"), 0, true),
            Ok(false)
        );
        assert_eq!(
            broker.admin_publish(now, "x/+", Bytes::new(), 0, false),
            Err(AdminPublishError::InvalidTopic)
        );
        assert_eq!(
            broker.admin_publish(now, "x", Bytes::new(), 3, false),
            Err(AdminPublishError::InvalidQos)
        );
        let page = broker.admin_retained(now, "#", 0, 10);
        let topics: Vec<_> = page.items.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(topics, ["x/1", "y"]);
        assert_eq!(broker.admin_retained(now, "#", 1, 10).items.len(), 1);
        assert_eq!(broker.admin_retained(now, "bad/#/x", 0, 10).total, 0);
    }
}
