//! Routing one message to every matching session.

use std::sync::Arc;
use std::time::Instant;

use halyard_codec::QoS;

use crate::authz::Access;
use crate::broker::Broker;
use crate::message::{Message, SessionKey};
use crate::publish::RouteOutcome;
use crate::session::Delivery;

impl Broker {
    /// Routes one message to every matching session. With `atomic`, a QoS 1/2 message
    /// that some subscriber has no room for is delivered to nobody, so the publisher can be
    /// told (0x97) and retry without creating duplicates elsewhere.
    pub(crate) fn route(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        atomic: bool,
    ) -> RouteOutcome {
        let mut matches = std::mem::take(&mut self.route_scratch);
        matches.clear();
        let sessions = &self.sessions;
        self.router.route(
            &message.topic,
            &|key| sessions.get(&key).is_some_and(|s| s.link.is_some()),
            &mut matches,
        );
        matches.retain(|m| !(m.entry.options.no_local && message.publisher == Some(m.session)));
        if !self.authorizer.allows_everything() {
            let before = matches.len();
            matches.retain(|m| self.authorized(m.session, Access::Receive, &message.topic));
            self.out.stats.denied_delivery += (before - matches.len()) as u64;
        }
        // Overlapping subscriptions of one session give one copy, at the highest QoS, with
        // every subscription identifier [MQTT-3.3.4-3] .. [MQTT-3.3.4-5].
        matches.sort_by_key(|m| (m.session, m.shared));
        let mut deliveries: Vec<(SessionKey, Delivery)> = Vec::with_capacity(matches.len());
        for m in &matches {
            let retain = m.entry.options.retain_as_published && message.retain;
            let qos = message.qos.min(m.entry.options.qos);
            match deliveries.last_mut() {
                Some((session, delivery)) if *session == m.session && !m.shared => {
                    delivery.qos = delivery.qos.max(qos);
                    delivery.retain |= retain;
                    delivery.subscription_ids.extend(m.entry.identifier);
                }
                _ => deliveries.push((
                    m.session,
                    Delivery {
                        seq: 0,
                        message: Arc::clone(&message),
                        qos,
                        retain,
                        subscription_ids: m.entry.identifier.into_iter().collect(),
                    },
                )),
            }
        }
        self.route_scratch = matches;

        let limits = self.limits();
        if atomic {
            let blocked = deliveries.iter().find(|(key, delivery)| {
                delivery.qos != QoS::AtMostOnce
                    && self.sessions.get(key).is_some_and(|s| !s.has_room(limits))
            });
            if let Some(&(blocked_by, _)) = blocked {
                self.pushback.blocked_by = Some(blocked_by);
                if message.qos == QoS::AtMostOnce {
                    self.out.stats.dropped_qos0 += 1;
                } else {
                    self.out.stats.refused_quota += 1;
                }
                return RouteOutcome::QuotaExceeded;
            }
        }
        if message.retain {
            if message.payload.is_empty() {
                // [MQTT-3.3.1-10], [MQTT-3.3.1-11]
                self.remove_retained(&message.topic);
            } else {
                // [MQTT-3.3.1-5]
                self.set_retained(&message);
            }
        }
        if deliveries.is_empty() {
            return RouteOutcome::NoSubscribers;
        }
        for (key, delivery) in deliveries {
            let Some(session) = self.sessions.get_mut(&key) else {
                continue;
            };
            let qos = delivery.qos;
            if !session.push(delivery, now, limits, &mut self.out) {
                if qos == QoS::AtMostOnce {
                    self.out.stats.dropped_qos0 += 1;
                } else {
                    self.out.stats.dropped_queue_full += 1;
                }
            }
        }
        RouteOutcome::Delivered
    }
}
