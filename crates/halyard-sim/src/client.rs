//! Scripted MQTT 5 clients, sans-IO: they turn what a broker sent them into their answers
//! and into observations for the invariants (acknowledged publishes, deliveries).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use halyard_cluster::NodeId;
use halyard_codec::{
    Connect, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions,
};
use halyard_core::ConnectionId;

/// The topic filter every subscriber uses; publishers write below it.
pub const FILTER: &str = "t/#";

/// Session expiry of persistent sessions: longer than any run.
const PERSISTENT_EXPIRY_SECS: u32 = 86_400;

/// What a client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Publishes at this QoS on a clean session.
    Publisher(QoS),
    /// Subscribes to [`FILTER`]: persistent (QoS 2, kept session) or clean (QoS 1).
    Subscriber { persistent: bool },
}

/// What a client saw that the invariants care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// A publish was acknowledged (PUBACK, or PUBREC for QoS 2).
    Acked { message: u64, qos: QoS },
    /// A message reached the application (QoS 2 duplicates before PUBREL are not).
    Delivered { message: u64, qos: QoS },
    /// A SUBACK granted the subscription.
    Subscribed,
    /// A CONNACK accepted the connection; whether a session was resumed.
    Connected { session_present: bool },
    /// The connection ended (closed by the broker, or its node died).
    Disconnected,
}

/// One scripted client.
#[derive(Debug)]
pub struct SimClient {
    pub client_id: String,
    pub role: Role,
    /// The node and connection it is on, if any.
    pub conn: Option<(NodeId, ConnectionId)>,
    /// Whether its CONNACK accepted it.
    pub connected: bool,
    next_packet_id: u16,
    /// Outgoing QoS 1/2 publishes not completed: packet id -> message number.
    outgoing: BTreeMap<u16, u64>,
    /// Incoming QoS 2 ids received and not yet released (client session state, kept across
    /// reconnects of a persistent session: a re-sent PUBLISH with one is not a new message).
    awaiting_release: BTreeSet<u16>,
}

/// A message's number, carried as its payload.
pub fn payload_of(message: u64) -> Bytes {
    Bytes::from(message.to_be_bytes().to_vec())
}

fn message_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.try_into().ok()?))
}

fn response(packet_id: u16) -> PubResponse {
    PubResponse {
        packet_id,
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    }
}

impl SimClient {
    pub fn new(client_id: String, role: Role) -> Self {
        Self {
            client_id,
            role,
            conn: None,
            connected: false,
            next_packet_id: 1,
            outgoing: BTreeMap::new(),
            awaiting_release: BTreeSet::new(),
        }
    }

    fn persistent(&self) -> bool {
        matches!(self.role, Role::Subscriber { persistent: true })
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1).max(1);
        id
    }

    /// The CONNECT for a new connection on `node` as `conn`.
    pub fn connect(&mut self, node: NodeId, conn: ConnectionId) -> Packet {
        self.conn = Some((node, conn));
        self.connected = false;
        let persistent = self.persistent();
        Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: !persistent,
            keep_alive: 0,
            client_id: self.client_id.clone(),
            will: None,
            username: None,
            password: None,
            properties: Properties {
                session_expiry_interval: persistent.then_some(PERSISTENT_EXPIRY_SECS),
                ..Properties::default()
            },
        }))
    }

    /// The connection is gone; a clean client forgets its session state.
    pub fn disconnected(&mut self) -> Observation {
        self.conn = None;
        self.connected = false;
        self.outgoing.clear();
        if !self.persistent() {
            self.awaiting_release.clear();
        }
        Observation::Disconnected
    }

    /// A publish of message number `message`, if this is a connected publisher.
    pub fn publish(&mut self, message: u64) -> Option<Packet> {
        let Role::Publisher(qos) = self.role else {
            return None;
        };
        if !self.connected {
            return None;
        }
        let packet_id = self.packet_id();
        self.outgoing.insert(packet_id, message);
        Some(Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: format!("t/{}", self.client_id),
            packet_id: Some(packet_id),
            payload: payload_of(message),
            properties: Properties::default(),
        }))
    }

    /// Handles a packet from the broker: the answers to send and what was observed.
    pub fn receive(&mut self, packet: Packet) -> (Vec<Packet>, Vec<Observation>) {
        let mut answers = Vec::new();
        let mut seen = Vec::new();
        match packet {
            Packet::ConnAck(connack) if connack.code == ReasonCode::SUCCESS => {
                self.connected = true;
                if !connack.session_present {
                    self.awaiting_release.clear();
                }
                seen.push(Observation::Connected {
                    session_present: connack.session_present,
                });
                if let Role::Subscriber { persistent } = self.role {
                    if !(persistent && connack.session_present) {
                        let qos = if persistent {
                            QoS::ExactlyOnce
                        } else {
                            QoS::AtLeastOnce
                        };
                        answers.push(subscribe(self.packet_id(), qos));
                    }
                }
            }
            Packet::ConnAck(_) => {}
            Packet::Publish(publish) => {
                let Some(message) = message_of(&publish.payload) else {
                    return (answers, seen);
                };
                let qos = publish.qos;
                match (qos, publish.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) => {
                        seen.push(Observation::Delivered { message, qos });
                        answers.push(Packet::PubAck(response(id)));
                    }
                    (QoS::ExactlyOnce, Some(id)) => {
                        if self.awaiting_release.insert(id) {
                            seen.push(Observation::Delivered { message, qos });
                        }
                        answers.push(Packet::PubRec(response(id)));
                    }
                    _ => seen.push(Observation::Delivered { message, qos }),
                }
            }
            Packet::PubRel(rel) => {
                self.awaiting_release.remove(&rel.packet_id);
                answers.push(Packet::PubComp(response(rel.packet_id)));
            }
            Packet::PubAck(ack) if ack.reason.0 < 0x80 => {
                if let Some(message) = self.outgoing.remove(&ack.packet_id) {
                    seen.push(Observation::Acked {
                        message,
                        qos: QoS::AtLeastOnce,
                    });
                }
            }
            Packet::PubRec(rec) if rec.reason.0 < 0x80 => {
                if let Some(&message) = self.outgoing.get(&rec.packet_id) {
                    seen.push(Observation::Acked {
                        message,
                        qos: QoS::ExactlyOnce,
                    });
                    answers.push(Packet::PubRel(response(rec.packet_id)));
                }
            }
            Packet::PubComp(comp) => {
                self.outgoing.remove(&comp.packet_id);
            }
            Packet::SubAck(suback) => {
                let granted = suback.reasons.iter().all(|reason| reason.0 < 0x80);
                if granted {
                    seen.push(Observation::Subscribed);
                }
            }
            _ => {}
        }
        (answers, seen)
    }
}

fn subscribe(packet_id: u16, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        subscriptions: vec![Subscription {
            filter: FILTER.to_owned(),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        }],
        properties: Properties::default(),
    })
}
