//! Inbound PUBLISH and the QoS 1/2 handshakes of messages from clients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_codec::{Packet, Properties, PubResponse, Publish, QoS, ReasonCode};

use crate::broker::{Broker, ConnectionId};
use crate::close::CloseKind;
use crate::message::{boxed_properties, Message, SessionKey};
use crate::pushback::{PendingPublish, QueueFullPolicy, WaitingFor};

/// How a publish fared when routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteOutcome {
    Delivered,
    NoSubscribers,
    QuotaExceeded,
}

impl Broker {
    pub(crate) fn on_publish(&mut self, now: Instant, key: SessionKey, mut publish: Publish) {
        self.out.stats.messages_received += 1;
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(link) = session.link.as_mut() else {
            return;
        };
        let conn = link.conn;
        let v5 = link.version.is_v5();

        if !link.publish_rate.take(now) {
            self.out.stats.refused_publish_rate += 1;
            return self.close_with(
                now,
                key,
                ReasonCode::MESSAGE_RATE_TOO_HIGH,
                "publish rate above max_publish_rate",
            );
        }
        if !publish.properties.subscription_identifiers.is_empty() {
            // [MQTT-3.3.4-6]
            return self.protocol_error(now, key, "Subscription Identifier in a client PUBLISH");
        }
        if let Some(alias) = publish.properties.topic_alias.take() {
            if alias == 0 || alias > self.config.topic_alias_maximum {
                // [MQTT-3.3.2-9], [MQTT-3.3.2-10]
                return self.close_with(
                    now,
                    key,
                    ReasonCode::TOPIC_ALIAS_INVALID,
                    "topic alias out of range",
                );
            }
            if publish.topic.is_empty() {
                match link.inbound_aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return self.protocol_error(now, key, "topic alias not yet defined"),
                }
            } else {
                link.inbound_aliases.insert(alias, publish.topic.clone());
            }
        } else if publish.topic.is_empty() {
            return self.protocol_error(now, key, "empty topic without a topic alias");
        }

        if !self.topic_within_limits(&publish.topic) {
            return self.close_with(
                now,
                key,
                ReasonCode::TOPIC_NAME_INVALID,
                "topic exceeds the configured length or level limit",
            );
        }
        if publish.retain && !self.config.retain_available {
            // [MQTT-3.3.1-19]
            return self.close_with(
                now,
                key,
                ReasonCode::RETAIN_NOT_SUPPORTED,
                "retain is not available",
            );
        }

        let packet_id = publish.packet_id.unwrap_or(0);
        if !self.may_publish(key, &publish.topic) {
            return self.deny_publish(conn, v5, publish.qos, packet_id);
        }
        if publish.qos == QoS::ExactlyOnce {
            let Some(session) = self.sessions.get_mut(&key) else {
                return;
            };
            if session.inbound_qos2.contains(&packet_id) {
                // Re-sent before PUBREL: acknowledged again, not delivered again [MQTT-4.3.3-9].
                self.out
                    .send(conn, pub_response(packet_id, ReasonCode::SUCCESS));
                return;
            }
            if session.inbound_qos2.len() >= usize::from(self.config.receive_maximum) {
                // [MQTT-3.3.4-9]
                return self.close_with(
                    now,
                    key,
                    ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                    "more unacknowledged QoS 2 messages than Receive Maximum",
                );
            }
        }

        let mut properties = publish.properties;
        let expiry = properties.message_expiry_interval.take();
        // A retained message can outlive the read buffer its payload was cut from by hours;
        // copying it lets that buffer be freed instead of pinned.
        let payload = if publish.retain {
            bytes::Bytes::copy_from_slice(&publish.payload)
        } else {
            publish.payload
        };
        let message = Message {
            topic: publish.topic,
            payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: boxed_properties(properties),
            expires_at: expiry.map(|secs| now + Duration::from_secs(u64::from(secs))),
            publisher: Some(key),
        };
        let publish = PendingPublish {
            message: Arc::new(message),
            qos: publish.qos,
            packet_id,
            v5,
        };
        self.finish_publish(now, key, conn, publish);
    }

    /// Routes a validated publish and acknowledges it, or, while the disk is full, refuses a
    /// QoS 1/2 one (see `disk_full`), or, when a subscriber's queue has no room for it, pushes the publisher back (MQTT 3.x, or MQTT 5 with
    /// `queue_full_policy = "pushback"`) or refuses it with 0x97 (MQTT 5 by default).
    pub(crate) fn finish_publish(
        &mut self,
        now: Instant,
        key: SessionKey,
        conn: ConnectionId,
        publish: PendingPublish,
    ) {
        let (qos, packet_id, v5) = (publish.qos, publish.packet_id, publish.v5);
        if qos != QoS::AtMostOnce && self.disk_full.is_some() {
            return self.refuse_for_disk_full(now, conn, publish);
        }
        let outcome = self.route(now, Arc::clone(&publish.message), true);
        let blocked_by = self.pushback.blocked_by.take();
        if outcome == RouteOutcome::QuotaExceeded && qos != QoS::AtMostOnce {
            let push_back = !v5 || self.config.queue_full_policy == QueueFullPolicy::Pushback;
            match blocked_by {
                Some(waiting_on) if push_back && waiting_on != WaitingFor::Room(key) => {
                    // Not refused after all: it waits (see `pushback`).
                    self.out.stats.refused_quota = self.out.stats.refused_quota.saturating_sub(1);
                    return self.push_back_publish(now, conn, publish, waiting_on);
                }
                // The publisher's own queue is full: pausing it would stop us reading the
                // PUBACKs that empty that queue. MQTT 3.x cannot refuse a publish: withhold
                // the acknowledgement and close, so the client sends it again on reconnect
                // instead of believing it delivered.
                _ if !v5 => return self.close_link(now, key, CloseKind::Abnormal(None)),
                _ => {}
            }
        }
        let reason = match outcome {
            RouteOutcome::Delivered => ReasonCode::SUCCESS,
            RouteOutcome::NoSubscribers if v5 => ReasonCode::NO_MATCHING_SUBSCRIBERS,
            RouteOutcome::NoSubscribers => ReasonCode::SUCCESS,
            RouteOutcome::QuotaExceeded => ReasonCode::QUOTA_EXCEEDED,
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.out.send(
                conn,
                Packet::PubAck(PubResponse {
                    packet_id,
                    reason,
                    properties: Properties::default(),
                }),
            ),
            QoS::ExactlyOnce => {
                if outcome != RouteOutcome::QuotaExceeded {
                    if let Some(session) = self.sessions.get_mut(&key) {
                        session.inbound_qos2.insert(packet_id);
                        if let Some(journal) = self.out.journal(session.persistent) {
                            journal
                                .store
                                .put_inbound_qos2(&session.client_id, packet_id);
                        }
                    }
                }
                self.out.send(conn, pub_response(packet_id, reason));
            }
        }
    }

    pub(crate) fn on_pubrec(&mut self, now: Instant, key: SessionKey, rec: PubResponse) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(conn) = session.link.as_ref().map(|link| link.conn) else {
            return;
        };
        match session.on_pubrec(rec.packet_id, rec.reason, &mut self.out) {
            Some(reason) => {
                let reason = if session.is_v5() {
                    reason
                } else {
                    ReasonCode::SUCCESS
                };
                self.out.send(
                    conn,
                    Packet::PubRel(PubResponse {
                        packet_id: rec.packet_id,
                        reason,
                        properties: Properties::default(),
                    }),
                );
            }
            None => self.pump(now, key),
        }
    }

    pub(crate) fn on_pubrel(&mut self, key: SessionKey, rel: PubResponse) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(conn) = session.link.as_ref().map(|link| link.conn) else {
            return;
        };
        let known = session.inbound_qos2.remove(&rel.packet_id);
        if known {
            if let Some(journal) = self.out.journal(session.persistent) {
                journal
                    .store
                    .delete_inbound_qos2(&session.client_id, rel.packet_id);
            }
        }
        let reason = if known || !session.is_v5() {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        };
        self.out.send(
            conn,
            Packet::PubComp(PubResponse {
                packet_id: rel.packet_id,
                reason,
                properties: Properties::default(),
            }),
        );
    }

    /// Answers a PUBLISH the authorizer refused: MQTT 5 gets PUBACK/PUBREC 0x87 Not
    /// authorized; MQTT 3.x cannot be told, so the message is acknowledged as usual and
    /// dropped ([MQTT-3.3.5-2] allows this). Either way nothing is routed or retained.
    pub(crate) fn deny_publish(&mut self, conn: ConnectionId, v5: bool, qos: QoS, packet_id: u16) {
        self.out.stats.denied_publish += 1;
        let reason = if v5 {
            ReasonCode::NOT_AUTHORIZED
        } else {
            ReasonCode::SUCCESS
        };
        let response = PubResponse {
            packet_id,
            reason,
            properties: Properties::default(),
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.out.send(conn, Packet::PubAck(response)),
            // 3.x: the client's PUBREL for this id is answered with PUBCOMP like any other.
            QoS::ExactlyOnce => self.out.send(conn, Packet::PubRec(response)),
        }
    }
}

fn pub_response(packet_id: u16, reason: ReasonCode) -> Packet {
    Packet::PubRec(PubResponse {
        packet_id,
        reason,
        properties: Properties::default(),
    })
}
