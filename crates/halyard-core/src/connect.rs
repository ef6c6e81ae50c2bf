//! CONNECT: validation, the session claim, takeover and CONNACK.

use std::time::{Duration, Instant, SystemTime};

use halyard_codec::{ConnAck, Connect, Packet, Properties, ProtocolVersion, ReasonCode};

use crate::authz::ClientInfo;
use crate::broker::{Broker, ConnectionId};
use crate::close::CloseKind;
use crate::message::NodeId;
use crate::output::Output;
use crate::packet_ids::PacketIds;
use crate::registry::{ClaimOutcome, ClaimPoll, ClaimRequest};
use crate::session::{Link, Session};
use crate::timers::Timer;

impl Broker {
    pub(crate) fn reject_connect(
        &mut self,
        conn: ConnectionId,
        version: ProtocolVersion,
        v5: ReasonCode,
        v3: ReasonCode,
    ) {
        let code = if version.is_v5() { v5 } else { v3 };
        self.out.send(
            conn,
            Packet::ConnAck(ConnAck {
                session_present: false,
                code,
                properties: Properties::default(),
            }),
        );
        self.out.outputs.push_back(Output::Close { conn });
    }

    pub(crate) fn on_connect(&mut self, now: Instant, conn: ConnectionId, mut connect: Connect) {
        let version = connect.protocol;
        let v5 = version.is_v5();
        let method = connect.properties.authentication_method.as_deref();
        if v5 && method.is_some_and(|method| !self.authorizer.server_authenticates(method)) {
            // Not a method the server completed before forwarding the CONNECT [MQTT-4.12.0-1].
            return self.reject_connect(
                conn,
                version,
                ReasonCode::BAD_AUTHENTICATION_METHOD,
                ReasonCode::V3_NOT_AUTHORIZED,
            );
        }

        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        let max_keepalive = self.config.max_keepalive;
        if max_keepalive > 0 && (keep_alive == 0 || keep_alive > max_keepalive) {
            if v5 {
                keep_alive = max_keepalive;
                server_keep_alive = Some(max_keepalive);
            } else if keep_alive > max_keepalive {
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    ReasonCode::V3_IDENTIFIER_REJECTED,
                );
            }
        }

        let mut client_id = connect.client_id;
        let mut assigned_client_id = None;
        if client_id.is_empty() {
            let allowed = self.config.allow_zero_length_client_id
                && match version {
                    ProtocolVersion::V3_1 => false,
                    // [MQTT-3.1.3-8]
                    ProtocolVersion::V3_1_1 => connect.clean_start,
                    ProtocolVersion::V5 => true,
                };
            if !allowed {
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    ReasonCode::V3_IDENTIFIER_REJECTED,
                );
            }
            client_id = format!("halyard-{}-{}", self.next_assigned_id, conn);
            self.next_assigned_id += 1;
            if v5 {
                // [MQTT-3.2.2-16]
                assigned_client_id = Some(client_id.clone());
            }
        }

        if let Some(will) = &connect.will {
            if !self.topic_within_limits(&will.topic) {
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::TOPIC_NAME_INVALID,
                    ReasonCode::V3_SERVER_UNAVAILABLE,
                );
            }
            if will.retain && !self.config.retain_available {
                // [MQTT-3.2.2-13]
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::RETAIN_NOT_SUPPORTED,
                    ReasonCode::V3_SERVER_UNAVAILABLE,
                );
            }
        }

        if let Some(will) = &connect.will {
            let client = ClientInfo {
                client_id: &client_id,
                username: connect.username.as_deref(),
            };
            if !crate::broker_topics::may_publish(&*self.authorizer, &client, &will.topic) {
                // A will the client could not publish itself is refused up front, as
                // Mosquitto does.
                return self.reject_connect(
                    conn,
                    version,
                    ReasonCode::NOT_AUTHORIZED,
                    ReasonCode::V3_NOT_AUTHORIZED,
                );
            }
        }

        let requested_expiry = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry_interval = requested_expiry.min(self.config.max_session_expiry);
        if self.refuses_persistent_session(&client_id, connect.clean_start, expiry_interval) {
            return self.refuse_persistent_session(conn, version);
        }

        connect.client_id = client_id;
        let admitted = AdmittedConnect {
            connect,
            assigned_client_id,
            keep_alive,
            server_keep_alive,
            requested_expiry,
            expiry_interval,
            held: Vec::new(),
            lost: false,
        };
        let request = ClaimRequest {
            conn,
            client_id: admitted.connect.client_id.clone(),
            held_epoch: self
                .client_ids
                .get(&admitted.connect.client_id)
                .and_then(|key| self.sessions.get(key))
                .map(|session| session.epoch),
            clean_start: admitted.connect.clean_start,
            expiry_interval,
            will: admitted.connect.will.clone().map(Box::new),
        };
        match self.registry.claim(&request) {
            ClaimPoll::Ready(ClaimOutcome::Granted {
                epoch, packet_ids, ..
            }) => self.finish_connect(now, conn, admitted, epoch, packet_ids),
            ClaimPoll::Ready(ClaimOutcome::Refused) => self.refuse_claim(conn, version),
            ClaimPoll::Pending => {
                self.claims.insert(conn, Box::new(admitted));
                self.out.outputs.push_back(Output::Claim(request));
            }
        }
    }

    /// The outcome of a claim emitted as [`Output::Claim`]: the waiting CONNECT is
    /// answered, CONNACK 0x88 Server unavailable (MQTT 5) or 0x03 (3.x) if it was refused,
    /// and the packets its client sent meanwhile are handled. `wall` is `now` on the wall
    /// clock, for the times of a session moved from another node. The session gets the copies
    /// of messages held for it while the claim was pending (see `move_window`).
    pub fn handle_claim(
        &mut self,
        now: Instant,
        wall: SystemTime,
        conn: ConnectionId,
        outcome: ClaimOutcome,
    ) {
        let client_id = self.claims.get(&conn).map(|c| c.connect.client_id.clone());
        let epoch = match &outcome {
            ClaimOutcome::Granted { epoch, .. } => Some(*epoch),
            ClaimOutcome::Refused => None,
        };
        // A newer claim of the client here settled first (before the driver's raft state
        // showed it was newer): this grant is refused, and what was routed here under it
        // joins the session (halyard-sim seed 48 --no-kills).
        let newer_here = client_id
            .as_deref()
            .zip(epoch)
            .and_then(|(client_id, epoch)| self.newer_session_epoch(client_id, epoch));
        self.settle_claim(now, wall, conn, outcome);
        if let Some(client_id) = client_id {
            if let (Some(epoch), Some(newer)) = (epoch, newer_here) {
                self.join_overtaken_claim(now, &client_id, epoch, newer);
                self.release_held(now, &client_id, None);
            } else {
                self.release_held(now, &client_id, epoch);
                if let Some(epoch) = epoch {
                    self.extend_to_joined_claims(&client_id, epoch);
                }
            }
        }
    }

    /// A claim granted under `epoch` that the claim `newer` of the same client id overtook
    /// before it was answered: the connection is refused like [`ClaimOutcome::Refused`].
    /// The copies held for it (routed from `epoch` on, before the newer claim) were routed
    /// here for the session and nowhere else: they follow the session, addressed to it, to
    /// `owner`, the node of the newer claim (`None`: this node).
    pub fn handle_superseded_claim(
        &mut self,
        now: Instant,
        wall: SystemTime,
        conn: ConnectionId,
        epoch: u64,
        newer: u64,
        owner: Option<NodeId>,
    ) {
        let client_id = self.claims.get(&conn).map(|c| c.connect.client_id.clone());
        self.settle_claim(now, wall, conn, ClaimOutcome::Refused);
        if let Some(client_id) = client_id {
            match owner {
                Some(_) => self.hand_held_on(now, &client_id, epoch, newer, owner),
                None => self.join_overtaken_claim(now, &client_id, epoch, newer),
            }
            self.release_held(now, &client_id, None);
        }
    }

    fn settle_claim(
        &mut self,
        now: Instant,
        wall: SystemTime,
        conn: ConnectionId,
        outcome: ClaimOutcome,
    ) {
        let Some(admitted) = self.claims.remove(&conn) else {
            return;
        };
        let mut admitted = *admitted;
        let held = std::mem::take(&mut admitted.held);
        let lost = admitted.lost;
        match outcome {
            ClaimOutcome::Granted {
                epoch,
                session,
                packet_ids,
            } => {
                if let Some(state) = session {
                    if self.holds_newer_session(&state.client_id, epoch) {
                        // A later claim here settled first and serves the client: what this
                        // one brings joins that session instead of replacing it (found by
                        // the simulation, halyard-sim seed 147); this claim is refused below.
                        self.merge_late_session(now, wall, epoch, *state);
                    } else {
                        let until = self.window_end(&state.client_id, epoch);
                        let key = self.import_session(now, wall, *state, epoch);
                        if let Some(session) = self.sessions.get_mut(&key) {
                            session.routes_until = until;
                        }
                    }
                }
                self.finish_connect(now, conn, admitted, epoch, packet_ids);
                if lost {
                    // The claim holds although its connection is gone: the session is this
                    // node's now, so it is set up and then closed like any other.
                    return self.connection_lost(now, conn);
                }
            }
            ClaimOutcome::Refused => {
                if !lost {
                    self.refuse_claim(conn, admitted.connect.protocol);
                }
                return;
            }
        }
        for packet in held {
            self.handle_packet(now, conn, packet);
        }
    }

    /// Whether this node holds `client_id`'s session under a claim newer than `epoch`.
    fn holds_newer_session(&self, client_id: &str, epoch: u64) -> bool {
        self.newer_session_epoch(client_id, epoch).is_some()
    }

    /// The epoch of `client_id`'s session here if it is newer than `epoch`.
    fn newer_session_epoch(&self, client_id: &str, epoch: u64) -> Option<u64> {
        self.client_ids
            .get(client_id)
            .and_then(|key| self.sessions.get(key))
            .map(|session| session.epoch)
            .filter(|&held| held > epoch)
    }

    fn refuse_claim(&mut self, conn: ConnectionId, version: ProtocolVersion) {
        self.out.stats.claims_refused += 1;
        self.reject_connect(
            conn,
            version,
            ReasonCode::SERVER_UNAVAILABLE,
            ReasonCode::V3_SERVER_UNAVAILABLE,
        );
    }

    /// Holds a packet that arrived while its connection's claim is undecided, or hands it
    /// back when the connection has no such claim. A second CONNECT meanwhile is a protocol
    /// error [MQTT-3.1.0-2].
    pub(crate) fn hold_while_claiming(
        &mut self,
        conn: ConnectionId,
        packet: Packet,
    ) -> Option<Packet> {
        let Some(admitted) = self.claims.get_mut(&conn) else {
            return Some(packet);
        };
        if matches!(packet, Packet::Connect(_)) {
            admitted.lost = true;
            self.out.outputs.push_back(Output::Close { conn });
        } else if !admitted.lost {
            admitted.held.push(packet);
        }
        None
    }

    /// The connection of an undecided claim closed: the outcome, when it comes, finds it
    /// gone. True if `conn` had such a claim.
    pub(crate) fn lose_while_claiming(&mut self, conn: ConnectionId) -> bool {
        match self.claims.get_mut(&conn) {
            Some(admitted) => {
                admitted.lost = true;
                true
            }
            None => false,
        }
    }

    /// Answers a CONNECT whose claim was granted under `epoch`: takeover of a connection
    /// this node holds for the client id, the session resumed or started, CONNACK.
    fn finish_connect(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        admitted: AdmittedConnect,
        epoch: u64,
        packet_ids: PacketIds,
    ) {
        let AdmittedConnect {
            connect,
            assigned_client_id,
            keep_alive,
            server_keep_alive,
            requested_expiry,
            expiry_interval,
            ..
        } = admitted;
        let version = connect.protocol;
        let v5 = version.is_v5();
        let client_id = connect.client_id;
        let existing = self.client_ids.get(&client_id).copied();
        if existing
            .and_then(|key| self.sessions.get(&key))
            .is_some_and(|session| session.epoch > epoch)
        {
            // A newer claim of the same client id was settled first: this one lost, and
            // the will its claim brought is never published.
            if self.replicated && connect.will.is_some() {
                self.out.outputs.push_back(Output::SettleWill {
                    client_id,
                    epoch,
                    publisher: 0,
                    will: None,
                });
            }
            return self.refuse_claim(conn, version);
        }
        // Takeover: end the existing connection first [MQTT-3.1.4-3].
        if let Some(old_key) = existing {
            if self
                .sessions
                .get(&old_key)
                .is_some_and(|s| s.link.is_some())
            {
                self.close_link(now, old_key, CloseKind::TakenOver);
            }
        }
        let existing = self.client_ids.get(&client_id).copied();
        let (key, session_present) = match existing {
            Some(old_key) if !connect.clean_start => (old_key, true),
            _ => {
                if let Some(old_key) = existing {
                    self.end_session(now, old_key);
                }
                let key = self.next_session_key;
                self.next_session_key += 1;
                let mut session =
                    Session::new(client_id.clone(), epoch, expiry_interval, &self.memory);
                if !connect.clean_start {
                    // The client asked to resume: an earlier claim of this node whose session
                    // had not arrived yet is this session's past (see `merge_late_session`).
                    session.held_since = 0;
                }
                self.sessions.insert(key, Box::new(session));
                self.client_ids.insert(client_id.clone(), key);
                (key, false)
            }
        };

        let window = usize::from(
            connect
                .properties
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(self.config.max_inflight)
                .max(1),
        );
        let keep_alive_grace =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let link = Link {
            conn,
            version,
            keep_alive_grace,
            deadline: keep_alive_grace.map(|grace| now + grace),
            inbound_aliases: Default::default(),
            outbound_aliases: Default::default(),
            outbound_alias_max: connect.properties.topic_alias_maximum.unwrap_or(0),
            max_packet_size: connect.properties.maximum_packet_size.unwrap_or(u32::MAX),
            window,
            will: connect.will.map(Box::new),
            username: connect.username,
            publish_rate: crate::limits::RateBucket::new(self.config.max_publish_rate, now),
            congested: false,
        };
        if let Some(deadline) = link.deadline {
            self.timers.arm(deadline, Timer::KeepAlive(conn));
        }
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        session.epoch = epoch;
        session.number_in(packet_ids);
        session.expiry_interval = expiry_interval;
        session.expires_at = None;
        // A new connection before the will delay passed cancels the will [MQTT-3.1.3-9].
        session.delayed_will = None;
        session.username = Some(link.username.clone());
        session.link = Some(link);
        self.conns.insert(conn, key);
        self.update_persistence(key);
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };

        let mut properties = Properties::default();
        if v5 {
            properties.assigned_client_identifier = assigned_client_id;
            properties.server_keep_alive = server_keep_alive;
            if expiry_interval != requested_expiry {
                properties.session_expiry_interval = Some(expiry_interval);
            }
            if self.config.receive_maximum != u16::MAX {
                properties.receive_maximum = Some(self.config.receive_maximum);
            }
            properties.maximum_packet_size = Some(self.config.max_packet_size);
            if self.config.topic_alias_maximum > 0 {
                properties.topic_alias_maximum = Some(self.config.topic_alias_maximum);
            }
            if !self.config.retain_available {
                properties.retain_available = Some(0);
            }
            // The server's final data of the exchange it completed [MQTT-4.12.0-5]: the same
            // method, and the CONNECT's Authentication Data as the server replaced it.
            properties.authentication_method = connect.properties.authentication_method;
            properties.authentication_data = connect.properties.authentication_data;
        }
        self.out.send(
            conn,
            Packet::ConnAck(ConnAck {
                session_present,
                code: ReasonCode::SUCCESS,
                properties,
            }),
        );
        if session_present {
            session.resend_inflight(now, &mut self.out);
            if let Some(streams) = session.retained.as_deref_mut() {
                // A notification asked of the previous connection will not come.
                streams.awaiting_write = false;
            }
            self.pump(now, key);
        }
    }
}

/// A CONNECT that passed every check and waits for its claim (or is being answered).
pub(crate) struct AdmittedConnect {
    /// The CONNECT, with the client id the broker assigned if it was empty.
    connect: Connect,
    /// MQTT 5 Assigned Client Identifier for CONNACK [MQTT-3.2.2-16].
    assigned_client_id: Option<String>,
    keep_alive: u16,
    /// MQTT 5 Server Keep Alive for CONNACK, when the broker lowered the keep-alive.
    server_keep_alive: Option<u16>,
    requested_expiry: u32,
    expiry_interval: u32,
    /// Packets the client sent after CONNECT while the claim was undecided, in order.
    held: Vec<Packet>,
    /// The connection closed (or broke the protocol) while the claim was undecided.
    lost: bool,
}

impl AdmittedConnect {
    /// Whether the claim continues a persistent session (which may be on its way here).
    pub(crate) fn resumes_session(&self) -> bool {
        !self.connect.clean_start && self.expiry_interval > 0
    }

    /// The client id claimed.
    pub(crate) fn client_id(&self) -> &str {
        &self.connect.client_id
    }
}
