//! Degraded mode while the store is out of space (ENOSPC, EDQUOT).
//!
//! A full disk passes when an operator frees space, and restarting does not free any, so the
//! broker keeps serving what needs no disk (QoS 0, clean sessions, subscribers draining what
//! is queued) and refuses what does:
//!
//! - QoS 1/2 publishes: MQTT 5 gets PUBACK/PUBREC 0x97 Quota exceeded; MQTT 3.x cannot be
//!   told, so its publish is held unacknowledged and reading from it pauses (`pushback`)
//!   until space returns, then it is routed and acknowledged as usual;
//! - new persistent sessions: CONNACK 0x88 Server unavailable (3.1.1: 0x03). A persistent
//!   session already stored resumes.
//!
//! The batch whose commit failed was handled in memory already: its messages were routed,
//! so online subscribers still get them, but none of them is acknowledged. Its successful
//! PUBACKs and PUBRECs become 0x97 (MQTT 5; a refused QoS 2 packet id is forgotten
//! [MQTT-4.3.3-9]); a 3.x publisher loses its acknowledgement and its connection, so it sends
//! the message again on reconnect [MQTT-4.4.0-1]. A resend can duplicate a message for an
//! online subscriber; nothing is acknowledged that is not stored.
//!
//! The server probes the store now and then ([`Broker::probe_store`]); the first probe that
//! succeeds ends degraded mode and resumes the paused publishers.

use std::collections::BTreeSet;
use std::time::Instant;

use halyard_codec::{ConnAck, Packet, ProtocolVersion, PubResponse, ReasonCode};

use crate::broker::{Broker, ConnectionId};
use crate::close::CloseKind;
use crate::output::Output;
use crate::pushback::{PendingPublish, WaitingFor};
use crate::store::StoreError;

impl Broker {
    /// Whether the broker is degraded because the store is out of space.
    pub fn is_disk_full(&self) -> bool {
        self.disk_full.is_some()
    }

    /// Since when the broker has been degraded, if it is.
    pub fn disk_full_since(&self) -> Option<Instant> {
        self.disk_full
    }

    /// The server calls this when [`Broker::commit`] failed with a
    /// [`StoreErrorKind::NoSpace`](crate::store::StoreErrorKind::NoSpace) error, before it
    /// takes the batch's outputs: the broker is degraded from now on, and no acknowledgement
    /// of the batch goes out (see the module documentation). Returns whether this started a
    /// degraded episode (to log it once).
    pub fn handle_disk_full(&mut self, now: Instant) -> bool {
        let started = self.disk_full.is_none();
        self.disk_full.get_or_insert(now);
        self.withhold_uncommitted_acks(now);
        started
    }

    /// Tries a small write ([`Store::probe`](crate::store::Store::probe)) while degraded.
    /// `Ok(true)`: space is back, degraded mode ended and paused publishers go on (their
    /// outputs, like any, wait for the next commit). `Ok(false)`: still full. An error of
    /// another kind is returned for the server to treat as any failed commit.
    pub fn probe_store(&mut self, now: Instant) -> Result<bool, StoreError> {
        if self.disk_full.is_none() {
            return Ok(true);
        }
        let result = match self.out.journal.as_mut() {
            Some(journal) => journal.store.probe(),
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                self.disk_full = None;
                self.pushback.note_maybe_room();
                self.retry_paused(now);
                self.pump_stalled_queues(now);
                Ok(true)
            }
            Err(error) if error.is_no_space() => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Reads of on-disk queues failed while the store was full; a connected session whose
    /// queue stalled on one may have no acknowledgement coming to retry it, so it is pumped
    /// now.
    fn pump_stalled_queues(&mut self, now: Instant) {
        let stalled: Vec<_> = self
            .sessions
            .iter()
            .filter(|(_, session)| {
                session.link.is_some() && session.spilled > 0 && session.pending.is_empty()
            })
            .map(|(&key, _)| key)
            .collect();
        for key in stalled {
            self.pump(now, key);
        }
    }

    /// Whether a CONNECT would make a new persistent session, which cannot be stored now.
    pub(crate) fn refuses_persistent_session(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry_interval: u32,
    ) -> bool {
        if self.disk_full.is_none() || self.out.journal.is_none() || expiry_interval == 0 {
            return false;
        }
        let stored = self
            .client_ids
            .get(client_id)
            .and_then(|key| self.sessions.get(key))
            .is_some_and(|session| session.persistent);
        clean_start || !stored
    }

    /// Answers a CONNECT refused by [`Broker::refuses_persistent_session`].
    pub(crate) fn refuse_persistent_session(
        &mut self,
        conn: ConnectionId,
        version: ProtocolVersion,
    ) {
        self.out.stats.disk_full_refusals += 1;
        // [MQTT-3.2.2-6], [MQTT-3.2.2-7]: no session present, and the connection closes.
        self.out.send(
            conn,
            Packet::ConnAck(ConnAck {
                session_present: false,
                code: if version.is_v5() {
                    ReasonCode::SERVER_UNAVAILABLE
                } else {
                    ReasonCode::V3_SERVER_UNAVAILABLE
                },
                properties: Default::default(),
            }),
        );
        self.out.outputs.push_back(Output::Close { conn });
    }

    /// A QoS 1/2 publish while degraded: MQTT 5 is refused with 0x97, MQTT 3.x is held and
    /// its connection paused until space returns. Nothing is routed.
    pub(crate) fn refuse_for_disk_full(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        publish: PendingPublish,
    ) {
        self.out.stats.disk_full_refusals += 1;
        if !publish.v5 {
            return self.push_back_publish(now, conn, publish, WaitingFor::Disk);
        }
        let response = PubResponse {
            packet_id: publish.packet_id,
            reason: ReasonCode::QUOTA_EXCEEDED,
            properties: Default::default(),
        };
        let packet = match publish.qos {
            halyard_codec::QoS::ExactlyOnce => Packet::PubRec(response),
            _ => Packet::PubAck(response),
        };
        self.out.send(conn, packet);
    }

    /// Rewrites the queued outputs of a batch that was not stored so that none acknowledges
    /// a publish: successful PUBACK/PUBREC become 0x97 (MQTT 5) or are removed, and their
    /// 3.x connections closed.
    fn withhold_uncommitted_acks(&mut self, now: Instant) {
        let mut closing = BTreeSet::new();
        let mut outputs = std::mem::take(&mut self.out.outputs);
        outputs.retain_mut(|output| {
            let Output::Send { conn, packet } = output else {
                return true;
            };
            let (response, qos2) = match packet {
                Packet::PubAck(response) => (response, false),
                Packet::PubRec(response) => (response, true),
                _ => return true,
            };
            if response.reason.is_error() {
                return true;
            }
            let Some(&key) = self.conns.get(conn) else {
                return false; // the connection is gone: nothing to tell
            };
            let Some(session) = self.sessions.get_mut(&key) else {
                return false;
            };
            self.out.stats.disk_full_refusals += 1;
            if !session.is_v5() {
                closing.insert(key);
                return false;
            }
            if qos2 {
                // Refused, so a later PUBLISH with this id is a new message [MQTT-4.3.3-9].
                session.inbound_qos2.remove(&response.packet_id);
            }
            response.reason = ReasonCode::QUOTA_EXCEEDED;
            true
        });
        self.out.outputs = outputs;
        for key in closing {
            self.close_link(now, key, CloseKind::Abnormal(None));
        }
    }
}
