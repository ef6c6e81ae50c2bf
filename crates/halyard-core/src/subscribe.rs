//! SUBSCRIBE and UNSUBSCRIBE.

use std::time::Instant;

use halyard_codec::{Packet, Properties, ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe};

use crate::authz::Access;
use crate::broker::Broker;
use crate::broker::ConnectionId;
use crate::message::SessionKey;
use crate::output::{Output, SubscriptionUpdate};
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
        let mut changes = Vec::new();
        let mut added = Vec::new();
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
                if self.replicated {
                    changes.push(SubscriptionUpdate::Add {
                        filter: subscription.filter.clone(),
                        entry,
                    });
                    if is_new {
                        added.push(subscription.filter.clone());
                    }
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
        let suback = SubAck {
            packet_id: subscribe.packet_id,
            reasons,
            properties: Properties::default(),
        };
        if changes.is_empty() {
            self.out.send(conn, Packet::SubAck(suback));
            return self.send_retained(now, key, retained_requests);
        }
        let Some(session) = self.sessions.get(&key) else {
            return;
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.out.outputs.push_back(Output::Subscriptions {
            ticket: Some(ticket),
            client_id: session.client_id.clone(),
            epoch: session.epoch,
            changes,
        });
        self.route_waits.insert(
            ticket,
            RouteWait {
                key,
                conn,
                suback,
                retained: retained_requests,
                added,
            },
        );
    }

    /// The routes a SUBSCRIBE emitted as `Output::Subscriptions` with `ticket` were
    /// committed (or, with `committed = false`, could not be: no quorum). The SUBACK goes
    /// out, then the retained messages; on failure every filter gets 0x80 (Unspecified
    /// error in MQTT 5, Failure in 3.x) and the filters the SUBSCRIBE added are removed.
    pub fn handle_routes_committed(&mut self, now: Instant, ticket: u64, committed: bool) {
        let Some(wait) = self.route_waits.remove(&ticket) else {
            return;
        };
        let RouteWait {
            key,
            conn,
            mut suback,
            retained,
            added,
        } = wait;
        let live = self
            .sessions
            .get(&key)
            .and_then(|session| session.link.as_ref())
            .is_some_and(|link| link.conn == conn);
        if !committed {
            for filter in &added {
                self.drop_subscription(key, filter);
            }
            for reason in &mut suback.reasons {
                *reason = ReasonCode::V3_SUBACK_FAILURE;
            }
        }
        if !live {
            return;
        }
        self.out.send(conn, Packet::SubAck(suback));
        if committed {
            self.send_retained(now, key, retained);
        }
    }

    /// Removes one subscription of a session, from the router, the session and the store;
    /// true if it existed.
    fn drop_subscription(&mut self, key: SessionKey, filter: &str) -> bool {
        let Some(session) = self.sessions.get_mut(&key) else {
            return false;
        };
        session.stop_retained(filter);
        if session.subscriptions.remove(filter).is_none() {
            return false;
        }
        if let Some(journal) = self.out.journal(session.persistent) {
            journal
                .store
                .delete_subscription(&session.client_id, filter);
        }
        if self.router.unsubscribe(key, FilterRef::parse(filter)) {
            self.subscription_count -= 1;
        }
        true
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
        let mut removed = Vec::new();
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
            if existed && self.replicated {
                removed.push(SubscriptionUpdate::Remove {
                    filter: filter.clone(),
                });
            }
            if v5 {
                reasons.push(if existed {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::NO_SUBSCRIPTION_EXISTED
                });
            }
        }
        if !removed.is_empty() {
            if let Some(session) = self.sessions.get(&key) {
                self.out.outputs.push_back(Output::Subscriptions {
                    ticket: None,
                    client_id: session.client_id.clone(),
                    epoch: session.epoch,
                    changes: removed,
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

/// A SUBACK waiting for its routes to be committed (see `Output::Subscriptions`).
#[derive(Debug)]
pub(crate) struct RouteWait {
    key: SessionKey,
    /// The connection that sent the SUBSCRIBE; a SUBACK is never sent to a later one.
    conn: ConnectionId,
    suback: SubAck,
    /// Retained messages to stream once the SUBACK is out.
    retained: Vec<(String, SubscriptionEntry)>,
    /// Filters the SUBSCRIBE added (not merely replaced), undone if the commit fails.
    added: Vec<String>,
}
