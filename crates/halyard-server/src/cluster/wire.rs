//! What one node sends another over the peer link, and what the server stores in raft for
//! the core: forwarded publishes, moved sessions, retained messages and subscription
//! options. Messages travel as MQTT 5 PUBLISH packets encoded by `halyard-codec` (it already
//! writes and strictly validates every property), inside postcard frames. Times are
//! wall-clock milliseconds since the Unix epoch, since the nodes' monotonic clocks share
//! nothing. Everything decoded here came from a peer: decoding never panics.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use halyard_codec::{
    decode_standalone, encode_standalone, standalone_publish, Properties, Publish, QoS,
    SubscriptionOptions, Will,
};
use halyard_core::store::{DeliveryState, StoredDelivery, StoredMessage};
use halyard_core::{boxed_properties, Message, OpenExchange, SessionState, SubscriptionEntry};
use serde::{Deserialize, Serialize};

/// A frame from a peer (or a raft value) that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The postcard frame is malformed.
    #[error("malformed cluster frame: {0}")]
    Frame(#[from] postcard::Error),
    /// An embedded PUBLISH does not decode, or is not exactly one PUBLISH.
    #[error("malformed message in a cluster frame: {0}")]
    Message(String),
}

/// One message on the peer link.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum PeerMessage {
    /// A publish for the receiver's subscribers.
    Forward {
        /// The message.
        message: WireMessage,
        /// Share groups (`$share/{group}/{filter}`) the receiver serves for it.
        groups: Vec<String>,
        /// Its sequence number in the sender's outbox (QoS 1/2): the receiver's duplicate
        /// filter across restarts.
        stored_as: Option<u64>,
        /// The sender's route version when it routed the message.
        routed_at: u64,
        /// For a moved session's message passed on: the client id whose session alone
        /// gets it.
        for_session: Option<String>,
        /// With `for_session`, the QoS 2 exchange of it the old owner had open.
        exchange: Option<WireExchange>,
    },
    /// A session moved to the receiver, which claimed it under `epoch`.
    Session {
        /// The receiver's claim.
        epoch: u64,
        /// The session.
        state: WireSession,
    },
}

/// [`OpenExchange`] on the peer link.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) enum WireExchange {
    Unreceived(u16),
    Received(u16),
}

impl From<OpenExchange> for WireExchange {
    fn from(exchange: OpenExchange) -> Self {
        match exchange {
            OpenExchange::Unreceived(id) => WireExchange::Unreceived(id),
            OpenExchange::Received(id) => WireExchange::Received(id),
        }
    }
}

impl From<WireExchange> for OpenExchange {
    fn from(exchange: WireExchange) -> Self {
        match exchange {
            WireExchange::Unreceived(id) => OpenExchange::Unreceived(id),
            WireExchange::Received(id) => OpenExchange::Received(id),
        }
    }
}

/// A message: an MQTT 5 PUBLISH (topic, payload, QoS, RETAIN, properties) and its expiry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireMessage {
    publish: Vec<u8>,
    expires_at_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireSession {
    client_id: String,
    epoch: u64,
    since: u64,
    expiry_interval: u32,
    subscriptions: Vec<(String, WireEntry)>,
    inflight: Vec<(WireDelivery, WireState)>,
    pending: Vec<WireDelivery>,
    inbound_qos2: Vec<u16>,
    /// Due time, the will as a PUBLISH, and its Will Delay Interval.
    delayed_will: Option<(u64, WireMessage, Option<u32>)>,
    username: Option<Option<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireDelivery {
    message: WireMessage,
    qos: u8,
    retain: bool,
    subscription_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum WireState {
    Pending,
    AwaitingAck(u16),
    AwaitingReceipt(u16),
    AwaitingCompletion(u16),
}

/// A subscription's options and identifier, as raft keeps them for the core.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct WireEntry {
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    identifier: Option<u32>,
}

/// `now` on both clocks, to turn the core's instants into wall-clock times and back.
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    /// The monotonic clock.
    pub now: Instant,
    /// The same moment on the wall clock.
    pub wall: SystemTime,
}

impl Clocks {
    fn instant_to_ms(self, at: Instant) -> u64 {
        let wall = match at.checked_duration_since(self.now) {
            Some(after) => self.wall + after,
            None => self.wall - self.now.duration_since(at),
        };
        wall_to_ms(wall)
    }

    fn ms_to_instant(self, ms: u64) -> Instant {
        match ms_to_wall(ms).duration_since(self.wall) {
            Ok(after) => self.now + after,
            Err(_) => self.now,
        }
    }
}

fn wall_to_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

fn ms_to_wall(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn qos_of(level: u8) -> Result<QoS, WireError> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        other => Err(WireError::Message(format!("QoS {other}"))),
    }
}

impl WireMessage {
    fn new(
        topic: &str,
        payload: &Bytes,
        qos: QoS,
        retain: bool,
        properties: &Properties,
        expires_at_ms: Option<u64>,
    ) -> Result<WireMessage, WireError> {
        let mut publish = Vec::new();
        encode_standalone(
            standalone_publish(topic, payload, qos, retain, properties),
            &mut publish,
        )
        .map_err(|e| WireError::Message(e.to_string()))?;
        Ok(WireMessage {
            publish,
            expires_at_ms,
        })
    }

    fn publish(&self) -> Result<Publish, WireError> {
        decode_standalone(&self.publish).map_err(|e| WireError::Message(e.to_string()))
    }

    fn of_message(message: &Message, clocks: Clocks) -> Result<WireMessage, WireError> {
        let properties = message.properties.as_deref().cloned().unwrap_or_default();
        WireMessage::new(
            &message.topic,
            &message.payload,
            message.qos,
            message.retain,
            &properties,
            message.expires_at.map(|at| clocks.instant_to_ms(at)),
        )
    }

    fn to_message(&self, clocks: Clocks) -> Result<Message, WireError> {
        let publish = self.publish()?;
        Ok(Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: boxed_properties(publish.properties),
            expires_at: self.expires_at_ms.map(|ms| clocks.ms_to_instant(ms)),
            publisher: None,
        })
    }

    fn of_stored(message: &StoredMessage) -> Result<WireMessage, WireError> {
        WireMessage::new(
            &message.topic,
            &message.payload,
            message.qos,
            message.retain,
            &message.properties,
            message.expires_at.map(wall_to_ms),
        )
    }

    fn to_stored(&self) -> Result<StoredMessage, WireError> {
        let publish = self.publish()?;
        Ok(StoredMessage {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: publish.properties,
            expires_at: self.expires_at_ms.map(ms_to_wall),
        })
    }
}

impl WireDelivery {
    fn of(delivery: &StoredDelivery) -> Result<WireDelivery, WireError> {
        Ok(WireDelivery {
            message: WireMessage::of_stored(&delivery.message)?,
            qos: delivery.qos as u8,
            retain: delivery.retain,
            subscription_ids: delivery.subscription_ids.clone(),
        })
    }

    fn to_stored(&self) -> Result<StoredDelivery, WireError> {
        Ok(StoredDelivery {
            message: self.message.to_stored()?,
            qos: qos_of(self.qos)?,
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
        })
    }
}

impl WireState {
    fn of(state: DeliveryState) -> WireState {
        match state {
            DeliveryState::Pending => WireState::Pending,
            DeliveryState::AwaitingAck(id) => WireState::AwaitingAck(id),
            DeliveryState::AwaitingReceipt(id) => WireState::AwaitingReceipt(id),
            DeliveryState::AwaitingCompletion(id) => WireState::AwaitingCompletion(id),
        }
    }

    fn to_state(self) -> DeliveryState {
        match self {
            WireState::Pending => DeliveryState::Pending,
            WireState::AwaitingAck(id) => DeliveryState::AwaitingAck(id),
            WireState::AwaitingReceipt(id) => DeliveryState::AwaitingReceipt(id),
            WireState::AwaitingCompletion(id) => DeliveryState::AwaitingCompletion(id),
        }
    }
}

impl WireEntry {
    fn of(entry: &SubscriptionEntry) -> WireEntry {
        WireEntry {
            qos: entry.options.qos as u8,
            no_local: entry.options.no_local,
            retain_as_published: entry.options.retain_as_published,
            retain_handling: entry.options.retain_handling,
            identifier: entry.identifier,
        }
    }

    fn to_entry(self) -> Result<SubscriptionEntry, WireError> {
        if self.retain_handling > 2 {
            return Err(WireError::Message(format!(
                "retain handling {}",
                self.retain_handling
            )));
        }
        Ok(SubscriptionEntry {
            options: SubscriptionOptions {
                qos: qos_of(self.qos)?,
                no_local: self.no_local,
                retain_as_published: self.retain_as_published,
                retain_handling: self.retain_handling,
            },
            identifier: self.identifier,
        })
    }
}

impl WireSession {
    fn of(state: &SessionState) -> Result<WireSession, WireError> {
        let delayed_will = match &state.delayed_will {
            None => None,
            Some((due, will)) => {
                let (message, delay) = will_to_wire(will)?;
                Some((wall_to_ms(*due), message, delay))
            }
        };
        Ok(WireSession {
            client_id: state.client_id.clone(),
            epoch: state.epoch,
            since: state.since,
            expiry_interval: state.expiry_interval,
            subscriptions: state
                .subscriptions
                .iter()
                .map(|(filter, entry)| (filter.clone(), WireEntry::of(entry)))
                .collect(),
            inflight: state
                .inflight
                .iter()
                .map(|(delivery, state)| Ok((WireDelivery::of(delivery)?, WireState::of(*state))))
                .collect::<Result<_, WireError>>()?,
            pending: state
                .pending
                .iter()
                .map(WireDelivery::of)
                .collect::<Result<_, _>>()?,
            inbound_qos2: state.inbound_qos2.clone(),
            delayed_will,
            username: state.username.clone(),
        })
    }

    fn to_state(&self) -> Result<SessionState, WireError> {
        let delayed_will = match &self.delayed_will {
            None => None,
            Some((due, message, delay)) => Some((ms_to_wall(*due), will_of_wire(message, *delay)?)),
        };
        Ok(SessionState {
            client_id: self.client_id.clone(),
            epoch: self.epoch,
            since: self.since,
            expiry_interval: self.expiry_interval,
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(filter, entry)| Ok((filter.clone(), entry.to_entry()?)))
                .collect::<Result<_, WireError>>()?,
            inflight: self
                .inflight
                .iter()
                .map(|(delivery, state)| Ok((delivery.to_stored()?, state.to_state())))
                .collect::<Result<_, WireError>>()?,
            pending: self
                .pending
                .iter()
                .map(WireDelivery::to_stored)
                .collect::<Result<_, _>>()?,
            inbound_qos2: self.inbound_qos2.clone(),
            delayed_will,
            username: self.username.clone(),
        })
    }
}

/// A will as a PUBLISH, and its Will Delay Interval (which a PUBLISH cannot carry).
fn will_to_wire(will: &Will) -> Result<(WireMessage, Option<u32>), WireError> {
    let mut properties = will.properties.clone();
    let delay = properties.will_delay_interval.take();
    let message = WireMessage::new(
        &will.topic,
        &will.payload,
        will.qos,
        will.retain,
        &properties,
        None,
    )?;
    Ok((message, delay))
}

/// The will [`will_to_wire`] wrote.
fn will_of_wire(message: &WireMessage, delay: Option<u32>) -> Result<Will, WireError> {
    let publish = message.publish()?;
    let mut properties = publish.properties;
    properties.will_delay_interval = delay;
    Ok(Will {
        topic: publish.topic,
        payload: publish.payload,
        qos: publish.qos,
        retain: publish.retain,
        properties,
    })
}

/// A will as raft keeps it with its claim (opaque to the cluster crate).
pub(crate) fn encode_will(will: &Will) -> Result<Bytes, WireError> {
    Ok(postcard::to_stdvec(&will_to_wire(will)?)?.into())
}

/// A will from raft, as [`encode_will`] wrote it.
pub(crate) fn decode_will(blob: &[u8]) -> Result<Will, WireError> {
    let (message, delay): (WireMessage, Option<u32>) = postcard::from_bytes(blob)?;
    will_of_wire(&message, delay)
}

/// What travels with a forwarded message besides the message itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardTags<'a> {
    /// Share groups the receiver serves for it.
    pub groups: &'a [Arc<str>],
    /// Its sequence number in the sender's outbox, if stored there.
    pub stored_as: Option<u64>,
    /// The sender's route version when it routed the message.
    pub routed_at: u64,
    /// The client id whose session alone gets it, for a moved session's message.
    pub for_session: Option<&'a str>,
    /// With `for_session`, the QoS 2 exchange of it the old owner had open.
    pub exchange: Option<OpenExchange>,
}

/// A forwarded publish, ready for the peer link.
pub(crate) fn encode_forward(
    message: &Message,
    tags: ForwardTags<'_>,
    clocks: Clocks,
) -> Result<Bytes, WireError> {
    let frame = PeerMessage::Forward {
        message: WireMessage::of_message(message, clocks)?,
        groups: tags.groups.iter().map(|group| group.to_string()).collect(),
        stored_as: tags.stored_as,
        routed_at: tags.routed_at,
        for_session: tags.for_session.map(str::to_owned),
        exchange: tags.exchange.map(WireExchange::from),
    };
    Ok(postcard::to_stdvec(&frame)?.into())
}

/// A session moved to `dest`'s claim under `epoch`, ready for the peer link.
pub(crate) fn encode_session(epoch: u64, state: &SessionState) -> Result<Bytes, WireError> {
    let frame = PeerMessage::Session {
        epoch,
        state: WireSession::of(state)?,
    };
    Ok(postcard::to_stdvec(&frame)?.into())
}

/// What a peer sent, decoded.
#[derive(Debug)]
pub(crate) enum Received {
    /// A publish for local subscribers.
    Forward {
        /// The message.
        message: Message,
        /// Share groups this node serves for it.
        groups: Vec<Arc<str>>,
        /// Its sequence number in the sender's outbox, if stored there.
        stored_as: Option<u64>,
        /// The sender's route version when it routed the message.
        routed_at: u64,
        /// The client id whose session alone gets it, for a moved session's message.
        for_session: Option<Arc<str>>,
        /// With `for_session`, the QoS 2 exchange of it the old owner had open.
        exchange: Option<OpenExchange>,
    },
    /// A session for this node's claim under `epoch`.
    Session {
        /// The claim.
        epoch: u64,
        /// The session.
        state: Box<SessionState>,
    },
}

/// Decodes a peer-link payload.
pub(crate) fn decode_peer(payload: &[u8], clocks: Clocks) -> Result<Received, WireError> {
    match postcard::from_bytes::<PeerMessage>(payload)? {
        PeerMessage::Forward {
            message,
            groups,
            stored_as,
            routed_at,
            for_session,
            exchange,
        } => Ok(Received::Forward {
            message: message.to_message(clocks)?,
            groups: groups.into_iter().map(Arc::from).collect(),
            stored_as,
            routed_at,
            for_session: for_session.map(Arc::from),
            exchange: exchange.map(OpenExchange::from),
        }),
        PeerMessage::Session { epoch, state } => Ok(Received::Session {
            epoch,
            state: Box::new(state.to_state()?),
        }),
    }
}

/// A retained message as raft stores it.
pub(crate) fn encode_retained(message: &Message, clocks: Clocks) -> Result<Bytes, WireError> {
    Ok(postcard::to_stdvec(&WireMessage::of_message(message, clocks)?)?.into())
}

/// A retained message from raft.
pub(crate) fn decode_retained(blob: &[u8], clocks: Clocks) -> Result<Message, WireError> {
    postcard::from_bytes::<WireMessage>(blob)?.to_message(clocks)
}

/// A subscription's options as raft keeps them (opaque to the cluster crate).
pub(crate) fn encode_entry(entry: &SubscriptionEntry) -> Result<Bytes, WireError> {
    Ok(postcard::to_stdvec(&WireEntry::of(entry))?.into())
}

/// A subscription's options from raft, as [`encode_entry`] wrote them.
pub(crate) fn decode_entry(options: &[u8]) -> Result<SubscriptionEntry, WireError> {
    postcard::from_bytes::<WireEntry>(options)?.to_entry()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::clock::{DriverClock, SystemClock};

    fn stored(topic: &str, qos: QoS) -> StoredDelivery {
        StoredDelivery {
            message: StoredMessage {
                topic: topic.into(),
                payload: Bytes::from_static(b"payload"),
                qos,
                retain: false,
                properties: Properties {
                    content_type: Some("text/plain".into()),
                    ..Properties::default()
                },
                expires_at: Some(UNIX_EPOCH + Duration::from_millis(1_900_000_000_000)),
            },
            qos,
            retain: true,
            subscription_ids: vec![3, 9],
        }
    }

    #[test]
    fn a_session_survives_the_wire() {
        let entry = SubscriptionEntry {
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
            identifier: Some(77),
        };
        let state = SessionState {
            client_id: "moving".into(),
            epoch: 12,
            since: 9,
            expiry_interval: 3600,
            subscriptions: vec![("a/#".into(), entry), ("$share/g/b".into(), entry)],
            inflight: vec![
                (
                    stored("a/1", QoS::AtLeastOnce),
                    DeliveryState::AwaitingAck(5),
                ),
                (
                    stored("a/2", QoS::ExactlyOnce),
                    DeliveryState::AwaitingCompletion(6),
                ),
            ],
            pending: vec![stored("a/3", QoS::AtLeastOnce)],
            inbound_qos2: vec![4, 8],
            delayed_will: Some((
                UNIX_EPOCH + Duration::from_millis(1_800_000_000_123),
                Will {
                    topic: "wills/moving".into(),
                    payload: Bytes::from_static(b"gone"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: Properties {
                        will_delay_interval: Some(30),
                        ..Properties::default()
                    },
                },
            )),
            username: Some(Some("alice".into())),
        };
        let bytes = encode_session(13, &state).expect("encodes");
        match decode_peer(&bytes, SystemClock.clocks()).expect("decodes") {
            Received::Session { epoch, state: back } => {
                assert_eq!(epoch, 13);
                assert_eq!(*back, state);
            }
            other => panic!("expected a session, got {other:?}"),
        }
    }

    #[test]
    fn a_forward_keeps_its_message_groups_and_remaining_expiry() {
        let clocks = SystemClock.clocks();
        let message = Message {
            topic: "plant/line3/temp".into(),
            payload: Bytes::from_static(b"21.5"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: boxed_properties(Properties {
                user_properties: vec![("k".into(), "v".into())],
                ..Properties::default()
            }),
            expires_at: Some(clocks.now + Duration::from_secs(30)),
            publisher: Some(4),
        };
        let groups: Vec<Arc<str>> = vec!["$share/g/plant/#".into()];
        let tags = ForwardTags {
            groups: &groups,
            stored_as: Some(77),
            routed_at: 812,
            for_session: Some("mover"),
            exchange: Some(OpenExchange::Unreceived(9)),
        };
        let bytes = encode_forward(&message, tags, clocks).expect("encodes");
        match decode_peer(&bytes, clocks).expect("decodes") {
            Received::Forward {
                message: back,
                groups: back_groups,
                stored_as,
                routed_at,
                for_session,
                exchange,
            } => {
                assert_eq!(exchange, Some(OpenExchange::Unreceived(9)));
                assert_eq!(back_groups, groups);
                assert_eq!(stored_as, Some(77));
                assert_eq!(routed_at, 812);
                assert_eq!(for_session.as_deref(), Some("mover"));
                assert_eq!(
                    (&back.topic, &back.payload, back.qos, back.retain),
                    (
                        &message.topic,
                        &message.payload,
                        message.qos,
                        message.retain
                    )
                );
                assert_eq!(back.properties, message.properties);
                let left = back.expires_at.expect("expires").duration_since(clocks.now);
                assert!(left <= Duration::from_secs(30) && left >= Duration::from_millis(29_999));
                assert_eq!(back.publisher, None, "a forward has no local publisher");
            }
            other => panic!("expected a forward, got {other:?}"),
        }
    }

    #[test]
    fn garbage_from_a_peer_is_an_error_not_a_panic() {
        let clocks = SystemClock.clocks();
        for bytes in [
            &b""[..],
            b"\x00",
            b"\x01\xff\xff\xff\xff\x0f",
            b"\x00\x03abc\x00",
        ] {
            assert!(decode_peer(bytes, clocks).is_err(), "{bytes:?}");
        }
        let bad_qos = postcard::to_stdvec(&PeerMessage::Forward {
            message: WireMessage {
                publish: vec![0x30, 0x01],
                expires_at_ms: None,
            },
            groups: vec![],
            stored_as: None,
            routed_at: 0,
            for_session: None,
            exchange: None,
        })
        .expect("encodes");
        assert!(decode_peer(&bad_qos, clocks).is_err());
    }
}
