//! Ending connections and sessions: DISCONNECT, network loss, protocol errors, wills.

use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_codec::{ConnAck, DecodeError, Packet, ReasonCode, Will};

use crate::broker::{Broker, ConnectionId};
use crate::message::{boxed_properties, Message, SessionKey};
use crate::output::Output;
use crate::pushback::Pushback;
use crate::router::FilterRef;
use crate::session::Session;
use crate::timers::Timer;

/// Why a connection is being closed by the broker or the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseKind {
    /// DISCONNECT from the client without a will request: the will is discarded.
    Normal,
    /// DISCONNECT 0x04 from an MQTT 5 client: close normally but publish the will.
    NormalWithWill,
    /// Network failure, keep-alive or protocol error: the will is published, and an MQTT 5
    /// client is first told `reason` where one is given.
    Abnormal(Option<ReasonCode>),
    /// Another connection claimed the client id [MQTT-3.1.4-3]: like `Abnormal`, but the
    /// session is left for the new connection's CONNECT to resume or discard.
    TakenOver,
}

impl Broker {
    /// The decoder rejected bytes from `conn`: the broker answers (CONNACK or DISCONNECT with
    /// the error's reason code, where the protocol allows), publishes the will, and closes.
    pub fn handle_decode_error(&mut self, now: Instant, conn: ConnectionId, error: &DecodeError) {
        let code = error.reason_code();
        match self.conns.get(&conn).copied() {
            Some(key) => self.close_link(now, key, CloseKind::Abnormal(Some(code))),
            None if self.lose_while_claiming(conn) => {
                self.out.outputs.push_back(Output::Close { conn });
            }
            None => {
                if matches!(error, DecodeError::UnsupportedProtocolVersion { .. }) {
                    // The level is unknown, so answer in the 3.1.1 form every client parses
                    // [MQTT-3.1.2-2].
                    self.out.send(
                        conn,
                        Packet::ConnAck(ConnAck {
                            code: ReasonCode::V3_UNACCEPTABLE_PROTOCOL_VERSION,
                            ..Default::default()
                        }),
                    );
                }
                self.out.outputs.push_back(Output::Close { conn });
            }
        }
    }

    /// The socket of `conn` closed or failed without a DISCONNECT: the will is published.
    pub fn connection_lost(&mut self, now: Instant, conn: ConnectionId) {
        if let Some(&key) = self.conns.get(&conn) {
            self.close_link(now, key, CloseKind::Abnormal(None));
        } else if self.lose_while_claiming(conn) {
            return;
        }
        self.retry_paused(now);
    }

    /// Graceful shutdown: MQTT 5 clients get DISCONNECT 0x8B, every connection is closed.
    /// Wills are not published: the clients did nothing wrong.
    pub fn shutdown(&mut self, _now: Instant) {
        let conns: Vec<(ConnectionId, SessionKey)> = self.conns.drain().collect();
        self.pushback = Pushback::default();
        for (conn, _) in self.claims.drain() {
            self.out.outputs.push_back(Output::Close { conn });
        }
        for (conn, key) in conns {
            if let Some(session) = self.sessions.get_mut(&key) {
                session.send_disconnect(ReasonCode::SERVER_SHUTTING_DOWN, None, &mut self.out);
                session.link = None;
            }
            self.out.outputs.push_back(Output::Close { conn });
        }
    }

    /// Closes every client connection, telling MQTT 5 clients `reason` and `why`: this node
    /// may no longer serve them (a cluster node that lost its lease). Sessions stay, to be
    /// resumed here or handed to a new owner; wills are not published, as on shutdown: the
    /// clients did nothing wrong, and their sessions may go on elsewhere.
    pub fn disconnect_all(&mut self, now: Instant, reason: ReasonCode, why: &str) {
        let keys: Vec<SessionKey> = self.conns.values().copied().collect();
        for key in keys {
            if let Some(session) = self.sessions.get(&key) {
                session.send_disconnect(reason, Some(why), &mut self.out);
            }
            self.discard_will(key);
            self.close_link(now, key, CloseKind::Normal);
        }
        self.retry_paused(now);
    }

    pub(crate) fn protocol_error(&mut self, now: Instant, key: SessionKey, why: &str) {
        self.close_with(now, key, ReasonCode::PROTOCOL_ERROR, why);
    }

    /// Closes an MQTT 5 connection with a DISCONNECT carrying `reason` and a reason string.
    pub(crate) fn close_with(
        &mut self,
        now: Instant,
        key: SessionKey,
        reason: ReasonCode,
        why: &str,
    ) {
        if let Some(session) = self.sessions.get(&key) {
            session.send_disconnect(reason, Some(why), &mut self.out);
        }
        self.close_link(now, key, CloseKind::Abnormal(None));
    }

    pub(crate) fn close_link(&mut self, now: Instant, key: SessionKey, kind: CloseKind) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        match kind {
            CloseKind::Abnormal(Some(reason)) => {
                session.send_disconnect(reason, None, &mut self.out)
            }
            CloseKind::TakenOver => {
                session.send_disconnect(ReasonCode::SESSION_TAKEN_OVER, None, &mut self.out)
            }
            _ => {}
        }
        let Some(mut link) = session.link.take() else {
            return;
        };
        self.conns.remove(&link.conn);
        self.timers.cancel_connection(link.conn);
        self.pushback.forget(link.conn);
        self.pushback.note_maybe_room();
        self.out
            .outputs
            .push_back(Output::Close { conn: link.conn });
        let will = match kind {
            CloseKind::Normal => None,
            CloseKind::NormalWithWill | CloseKind::Abnormal(_) | CloseKind::TakenOver => {
                link.will.take().map(|will| *will)
            }
        };
        if kind == CloseKind::TakenOver {
            if let Some(will) = will {
                self.schedule_will(now, key, will);
            }
            return;
        }
        let ends_now = session.expiry_interval == 0;
        let (client_id, epoch) = (session.client_id.clone(), session.epoch);
        if let Some(will) = will {
            if ends_now {
                self.will_due(now, key, client_id, epoch, will);
            } else {
                self.schedule_will(now, key, will);
            }
        }
        self.left_offline(now, key);
    }

    /// The session `key` has no connection from now on: it ends now if its expiry interval
    /// is 0, or else waits out that interval for a new connection.
    pub(crate) fn left_offline(&mut self, now: Instant, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        if session.expiry_interval == 0 {
            self.end_session(now, key);
            return;
        }
        if session.expiry_interval != u32::MAX {
            let at = now + Duration::from_secs(u64::from(session.expiry_interval));
            session.expires_at = Some(at);
            self.timers
                .arm(at, Timer::SessionExpiry(key, session.epoch));
        }
        self.save_session_record(key);
    }

    /// Publishes `will` now, or after its Will Delay Interval unless a new connection to
    /// the session comes first [MQTT-3.1.3-9].
    pub(crate) fn schedule_will(&mut self, now: Instant, key: SessionKey, will: Will) {
        let delay = will.properties.will_delay_interval.unwrap_or(0);
        let Some(session) = self.sessions.get_mut(&key) else {
            return self.publish_will(now, key, will);
        };
        if delay > 0 {
            let due = now + Duration::from_secs(u64::from(delay));
            session.delayed_will = Some(Box::new((due, will)));
            self.timers.arm(due, Timer::Will(key, session.epoch));
            self.save_session_record(key);
        } else {
            let (client_id, epoch) = (session.client_id.clone(), session.epoch);
            self.will_due(now, key, client_id, epoch, will);
        }
    }

    /// The will of `client_id`'s connection under `epoch` is due: a single node publishes it
    /// now; a cluster node first takes it out of raft (see [`Output::SettleWill`]), so that
    /// it is published once, here or by the survivors if this node is lost meanwhile.
    pub(crate) fn will_due(
        &mut self,
        now: Instant,
        key: SessionKey,
        client_id: String,
        epoch: u64,
        will: Will,
    ) {
        if self.replicated {
            self.out.outputs.push_back(Output::SettleWill {
                client_id,
                epoch,
                publisher: key,
                will: Some(Box::new(will)),
            });
        } else {
            self.publish_will(now, key, will);
        }
    }

    /// Drops the will of the connection of `key` [MQTT-3.1.2-10]; a cluster node also takes
    /// it out of raft, so that nobody publishes it.
    fn discard_will(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(link) = session.link.as_mut() else {
            return;
        };
        if link.will.take().is_some() && self.replicated {
            self.out.outputs.push_back(Output::SettleWill {
                client_id: session.client_id.clone(),
                epoch: session.epoch,
                publisher: key,
                will: None,
            });
        }
    }

    /// A will this node won in raft (see [`Output::SettleWill`]): published as an ordinary
    /// message. `publisher` is the session that published it on this node, if any (0 for a
    /// lost node's will).
    pub fn publish_settled_will(&mut self, now: Instant, publisher: SessionKey, will: Will) {
        self.publish_will(now, publisher, will);
    }

    /// Discards a session: its subscriptions leave the router and a will still waiting out
    /// its delay is published now, since the session ended first [MQTT-3.1.3-9].
    pub(crate) fn end_session(&mut self, now: Instant, key: SessionKey) {
        let Some(session) = self.forget_session(key) else {
            return;
        };
        if self.registry.release(&session.client_id, session.epoch) {
            self.out.outputs.push_back(Output::Release {
                client_id: session.client_id.clone(),
                epoch: session.epoch,
            });
        }
        if let Some((_, will)) = session.delayed_will.map(|b| *b) {
            self.will_due(now, key, session.client_id, session.epoch, will);
        }
    }

    /// Takes a session out of every index and out of the store, and hands it back: what
    /// ending a session and moving it to another node have in common.
    pub(crate) fn forget_session(&mut self, key: SessionKey) -> Option<Box<Session>> {
        let session = self.sessions.remove(&key)?;
        if self.client_ids.get(&session.client_id) == Some(&key) {
            self.client_ids.remove(&session.client_id);
        }
        if let Some(link) = &session.link {
            self.conns.remove(&link.conn);
            self.pushback.forget(link.conn);
            self.timers.cancel_connection(link.conn);
        }
        self.timers.cancel_session(key);
        self.pushback.note_maybe_room();
        for filter in session.subscriptions.keys() {
            if self.router.unsubscribe(key, FilterRef::parse(filter)) {
                self.subscription_count -= 1;
            }
        }
        if let Some(journal) = self.out.journal(session.persistent) {
            journal.store.delete_session(&session.client_id);
        }
        Some(session)
    }

    pub(crate) fn publish_will(&mut self, now: Instant, key: SessionKey, will: Will) {
        let mut properties = will.properties;
        let expiry = properties.message_expiry_interval.take();
        properties.will_delay_interval = None;
        let message = Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties: boxed_properties(properties),
            expires_at: expiry.map(|secs| now + Duration::from_secs(u64::from(secs))),
            publisher: Some(key),
        };
        self.route(now, Arc::new(message), false);
    }

    pub(crate) fn on_disconnect(
        &mut self,
        now: Instant,
        key: SessionKey,
        disconnect: halyard_codec::Disconnect,
    ) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        if let Some(expiry) = disconnect.properties.session_expiry_interval {
            if session.expiry_interval == 0 && expiry != 0 {
                // [MQTT-3.14.2-2]
                return self.protocol_error(
                    now,
                    key,
                    "session expiry set on DISCONNECT after 0 in CONNECT",
                );
            }
            session.expiry_interval = expiry.min(self.config.max_session_expiry);
        }
        let kind = if disconnect.reason == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE {
            CloseKind::NormalWithWill
        } else {
            // [MQTT-3.1.2-10]: the will is discarded on a normal DISCONNECT.
            self.discard_will(key);
            CloseKind::Normal
        };
        self.close_link(now, key, kind);
    }
}
