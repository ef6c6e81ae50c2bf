//! SUBSCRIBE and UNSUBSCRIBE.

use std::time::Instant;

use halyard_codec::{Packet, Properties, ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe};

use crate::authz::Access;
use crate::broker::Broker;
use crate::message::SessionKey;
use crate::router::{FilterRef, SubscriptionEntry};

impl Broker {
    pub(crate) fn on_subscribe(&mut self, now: Instant, key: SessionKey, subscribe: Subscribe) {
        let identifier = subscribe
            .properties
            .subscription_identifiers
            .first()
            .copied();
        let Some(v5) = self.sessions.get(&key).map(|s| s.is_v5()) else {
            return;
        };
        if subscribe
            .subscriptions
            .iter()
            .any(|sub| sub.options.no_local && FilterRef::parse(&sub.filter).group.is_some())
        {
            // [MQTT-3.8.3-4]
            return self.protocol_error(now, key, "No Local on a shared subscription");
        }
        let mut reasons = Vec::with_capacity(subscribe.subscriptions.len());
        let mut retained_requests = Vec::new();
        for subscription in subscribe.subscriptions {
            if !self.topic_within_limits(&subscription.filter) {
                reasons.push(if v5 {
                    ReasonCode::TOPIC_FILTER_INVALID
                } else {
                    ReasonCode::V3_SUBACK_FAILURE
                });
                continue;
            }
            let inner = FilterRef::parse(&subscription.filter).filter;
            if !self.authorized(key, Access::Subscribe, inner) {
                self.out.stats.denied_subscribe += 1;
                reasons.push(if v5 {
                    ReasonCode::NOT_AUTHORIZED
                } else {
                    ReasonCode::V3_SUBACK_FAILURE
                });
                continue;
            }
            if !self.subscription_quota_allows(key, &subscription.filter) {
                reasons.push(if v5 {
                    ReasonCode::QUOTA_EXCEEDED
                } else {
                    ReasonCode::V3_SUBACK_FAILURE
                });
                continue;
            }
            let entry = SubscriptionEntry {
                options: subscription.options,
                identifier,
            };
            let filter = FilterRef::parse(&subscription.filter);
            let is_new = self.router.subscribe(key, filter, entry);
            if is_new {
                self.subscription_count += 1;
            }
            let send_retained = filter.group.is_none()
                && match subscription.options.retain_handling {
                    0 => true,
                    1 => is_new,
                    _ => false,
                };
            if send_retained {
                retained_requests.push((filter.filter.to_owned(), entry));
            }
            if let Some(session) = self.sessions.get_mut(&key) {
                // The subscription is replaced: a stream of its retained messages still
                // running starts over if they are to be sent again [MQTT-3.8.4-3].
                if filter.group.is_none() {
                    session.stop_retained(filter.filter);
                }
                if let Some(journal) = self.out.journal(session.persistent) {
                    journal.store.put_subscription(
                        &session.client_id,
                        &subscription.filter,
                        &entry,
                    );
                }
                session.subscriptions.insert(subscription.filter, entry);
            }
            reasons.push(ReasonCode(subscription.options.qos as u8));
        }
        let Some(conn) = self
            .sessions
            .get(&key)
            .and_then(|s| s.link.as_ref())
            .map(|link| link.conn)
        else {
            return;
        };
        self.out.send(
            conn,
            Packet::SubAck(SubAck {
                packet_id: subscribe.packet_id,
                reasons,
                properties: Properties::default(),
            }),
        );
        self.send_retained(now, key, retained_requests);
    }

    pub(crate) fn on_unsubscribe(
        &mut self,
        now: Instant,
        key: SessionKey,
        unsubscribe: Unsubscribe,
    ) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(link) = session.link.as_ref() else {
            return;
        };
        let conn = link.conn;
        let v5 = link.version.is_v5();
        let mut reasons = Vec::new();
        let mut stopped = false;
        for filter in &unsubscribe.filters {
            stopped |= session.stop_retained(filter);
            let existed = session.subscriptions.remove(filter).is_some();
            if existed {
                if let Some(journal) = self.out.journal(session.persistent) {
                    journal
                        .store
                        .delete_subscription(&session.client_id, filter);
                }
            }
            if existed && self.router.unsubscribe(key, FilterRef::parse(filter)) {
                self.subscription_count -= 1;
            }
            if v5 {
                reasons.push(if existed {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::NO_SUBSCRIPTION_EXISTED
                });
            }
        }
        self.out.send(
            conn,
            Packet::UnsubAck(UnsubAck {
                packet_id: unsubscribe.packet_id,
                reasons,
                properties: Properties::default(),
            }),
        );
        if stopped {
            // The stream being read may have been the one stopped: the next one starts.
            self.pump(now, key);
        }
    }
}
