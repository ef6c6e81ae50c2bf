//! The on-disk value format of [`RedbStore`](crate::RedbStore), written by hand.
//!
//! Every value starts with a format-version byte so a later release can read (or knowingly
//! refuse) what an earlier one wrote. Integers are big-endian. Times are `u64` nanoseconds
//! since the Unix epoch with 0 meaning "none", so a `SystemTime` round-trips exactly.
//!
//! A message (topic, payload, QoS, RETAIN, properties) is stored as an MQTT 5 PUBLISH encoded
//! by `halyard-codec`, preceded by its expiry: the codec already knows how to write and
//! strictly validate every property, so the store needs no second property format.
//!
//! | value | layout after the version byte |
//! | --- | --- |
//! | session | (version 2) fencing epoch u64, expiry interval u32, expires at (time), will flag u8; if 1: will due (time), will delay flag u8 + u32, will as PUBLISH |
//! | subscription | QoS u8, flags u8 (bit 0 no local, bit 1 retain as published), retain handling u8, identifier flag u8 + u32 |
//! | delivery | state u8 (0 pending, 1 awaiting PUBACK, 2 awaiting PUBREC, 3 awaiting PUBCOMP), packet id u16, delivery QoS u8, delivery RETAIN u8, id count u32 + ids u32 each, message |
//! | retained | message |
//! | message | expires at (time), PUBLISH packet (rest of the value) |
//!
//! Values read from disk are untrusted: decoding never panics and never allocates more than
//! the value's own length; anything unexpected is a [`FormatError`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use halyard_codec::{
    decode, encode, DecodeContext, DecodeError, EncodeError, Packet, ProtocolVersion, Publish, QoS,
    SubscriptionOptions, Will,
};
use halyard_core::store::{DeliveryState, SessionRecord, StoredDelivery, StoredMessage};
use halyard_core::SubscriptionEntry;

/// The only format version written so far.
pub(crate) const FORMAT_VERSION: u8 = 1;

/// Version of session values that carry the fencing epoch after the version byte; session
/// values of [`FORMAT_VERSION`] (written before epochs were stored) read with epoch 0.
const SESSION_WITH_EPOCH: u8 = 2;

/// Byte offset of the delivery state tag; the packet id follows it. Fixed so that
/// [`patch_delivery_state`] can rewrite the state without decoding the message.
const STATE_OFFSET: usize = 1;
const STATE_END: usize = STATE_OFFSET + 3;

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FormatError {
    /// The value ends before its fields do.
    #[error("value truncated")]
    Truncated,
    /// The version byte is one this release does not know.
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// A field holds a value outside its domain.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// Bytes follow the last field.
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
    /// The embedded PUBLISH does not decode.
    #[error("embedded PUBLISH: {0}")]
    Publish(#[from] DecodeError),
}

/// Why a value could not be encoded (the message is larger than a PUBLISH can be).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub(crate) struct EncodeFailure(#[from] EncodeError);

/// A bounds-checked cursor over an untrusted value.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.0.len() < n {
            return Err(FormatError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn flag(&mut self, what: &'static str) -> Result<bool, FormatError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FormatError::Invalid(what)),
        }
    }

    fn qos(&mut self) -> Result<QoS, FormatError> {
        QoS::from_u8(self.u8()?).ok_or(FormatError::Invalid("QoS"))
    }

    fn time(&mut self) -> Result<Option<SystemTime>, FormatError> {
        match self.u64()? {
            0 => Ok(None),
            nanos => Ok(Some(UNIX_EPOCH + Duration::from_nanos(nanos))),
        }
    }

    fn version(&mut self) -> Result<(), FormatError> {
        match self.u8()? {
            FORMAT_VERSION => Ok(()),
            other => Err(FormatError::UnknownVersion(other)),
        }
    }

    fn finish(self) -> Result<(), FormatError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(FormatError::Trailing(n)),
        }
    }
}

/// Nanoseconds since the epoch; never 0 (which means "none"), saturating in the year 2554.
fn time_to_u64(time: SystemTime) -> u64 {
    let nanos = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    nanos.max(1)
}

fn put_time(out: &mut Vec<u8>, time: Option<SystemTime>) {
    out.extend_from_slice(&time.map_or(0, time_to_u64).to_be_bytes());
}

/// Appends topic, payload, QoS, RETAIN and properties as an MQTT 5 PUBLISH.
fn put_publish(out: &mut Vec<u8>, publish: Publish) -> Result<(), EncodeFailure> {
    let mut buf = BytesMut::new();
    encode(&Packet::Publish(publish), ProtocolVersion::V5, &mut buf)?;
    out.extend_from_slice(&buf);
    Ok(())
}

/// Decodes the rest of the value as exactly one MQTT 5 PUBLISH.
fn take_publish(r: Reader<'_>) -> Result<Publish, FormatError> {
    let mut buf = BytesMut::from(r.0);
    let ctx = DecodeContext {
        version: Some(ProtocolVersion::V5),
        max_packet_size: u32::MAX,
    };
    match decode(&mut buf, &ctx)? {
        Some(Packet::Publish(publish)) if buf.is_empty() => Ok(publish),
        Some(Packet::Publish(_)) => Err(FormatError::Trailing(buf.len())),
        Some(_) => Err(FormatError::Invalid("embedded packet type")),
        None => Err(FormatError::Truncated),
    }
}

fn publish_of(
    topic: &str,
    payload: &bytes::Bytes,
    qos: QoS,
    retain: bool,
    properties: &halyard_codec::Properties,
) -> Publish {
    Publish {
        dup: false,
        qos,
        retain,
        topic: topic.to_owned(),
        packet_id: (qos != QoS::AtMostOnce).then_some(1),
        payload: payload.clone(),
        properties: properties.clone(),
    }
}

fn put_message(out: &mut Vec<u8>, message: &StoredMessage) -> Result<(), EncodeFailure> {
    put_time(out, message.expires_at);
    put_publish(
        out,
        publish_of(
            &message.topic,
            &message.payload,
            message.qos,
            message.retain,
            &message.properties,
        ),
    )
}

fn take_message(mut r: Reader<'_>) -> Result<StoredMessage, FormatError> {
    let expires_at = r.time()?;
    let publish = take_publish(r)?;
    Ok(StoredMessage {
        topic: publish.topic,
        payload: publish.payload,
        qos: publish.qos,
        retain: publish.retain,
        properties: publish.properties,
        expires_at,
    })
}

/// Encodes a session record (the client id is the key, not part of the value).
pub(crate) fn encode_session(record: &SessionRecord) -> Result<Vec<u8>, EncodeFailure> {
    let mut out = vec![SESSION_WITH_EPOCH];
    out.extend_from_slice(&record.epoch.to_be_bytes());
    out.extend_from_slice(&record.expiry_interval.to_be_bytes());
    put_time(&mut out, record.expires_at);
    match &record.delayed_will {
        None => out.push(0),
        Some((due, will)) => {
            out.push(1);
            put_time(&mut out, Some(*due));
            // Will Delay Interval is not a PUBLISH property, so the encoder would drop it.
            match will.properties.will_delay_interval {
                None => out.extend_from_slice(&[0, 0, 0, 0, 0]),
                Some(delay) => {
                    out.push(1);
                    out.extend_from_slice(&delay.to_be_bytes());
                }
            }
            put_publish(
                &mut out,
                publish_of(
                    &will.topic,
                    &will.payload,
                    will.qos,
                    will.retain,
                    &will.properties,
                ),
            )?;
        }
    }
    Ok(out)
}

/// Decodes a session record stored under `client_id`.
pub(crate) fn decode_session(client_id: &str, value: &[u8]) -> Result<SessionRecord, FormatError> {
    let mut r = Reader(value);
    let epoch = match r.u8()? {
        FORMAT_VERSION => 0,
        SESSION_WITH_EPOCH => r.u64()?,
        other => return Err(FormatError::UnknownVersion(other)),
    };
    let expiry_interval = r.u32()?;
    let expires_at = r.time()?;
    let delayed_will = if r.flag("will flag")? {
        let due = r.time()?.ok_or(FormatError::Invalid("will due time"))?;
        let has_delay = r.flag("will delay flag")?;
        let delay = r.u32()?;
        let publish = take_publish(r)?;
        let mut properties = publish.properties;
        properties.will_delay_interval = has_delay.then_some(delay);
        Some((
            due,
            Will {
                topic: publish.topic,
                payload: publish.payload,
                qos: publish.qos,
                retain: publish.retain,
                properties,
            },
        ))
    } else {
        r.finish()?;
        None
    };
    Ok(SessionRecord {
        client_id: client_id.to_owned(),
        epoch,
        expiry_interval,
        expires_at,
        delayed_will,
    })
}

/// Encodes a subscription entry.
pub(crate) fn encode_subscription(entry: &SubscriptionEntry) -> Vec<u8> {
    let options = &entry.options;
    let mut out = vec![
        FORMAT_VERSION,
        options.qos as u8,
        u8::from(options.no_local) | u8::from(options.retain_as_published) << 1,
        options.retain_handling,
        u8::from(entry.identifier.is_some()),
    ];
    out.extend_from_slice(&entry.identifier.unwrap_or(0).to_be_bytes());
    out
}

/// Decodes a subscription entry.
pub(crate) fn decode_subscription(value: &[u8]) -> Result<SubscriptionEntry, FormatError> {
    let mut r = Reader(value);
    r.version()?;
    let qos = r.qos()?;
    let flags = r.u8()?;
    if flags & !0b11 != 0 {
        return Err(FormatError::Invalid("subscription flags"));
    }
    let retain_handling = r.u8()?;
    if retain_handling > 2 {
        return Err(FormatError::Invalid("retain handling"));
    }
    let has_identifier = r.flag("identifier flag")?;
    let identifier = r.u32()?;
    r.finish()?;
    Ok(SubscriptionEntry {
        options: SubscriptionOptions {
            qos,
            no_local: flags & 1 != 0,
            retain_as_published: flags & 2 != 0,
            retain_handling,
        },
        identifier: has_identifier.then_some(identifier),
    })
}

fn state_bytes(state: DeliveryState) -> [u8; 3] {
    let (tag, packet_id) = match state {
        DeliveryState::Pending => (0u8, 0u16),
        DeliveryState::AwaitingAck(id) => (1, id),
        DeliveryState::AwaitingReceipt(id) => (2, id),
        DeliveryState::AwaitingCompletion(id) => (3, id),
    };
    let [hi, lo] = packet_id.to_be_bytes();
    [tag, hi, lo]
}

/// Encodes a delivery with its state.
pub(crate) fn encode_delivery(
    delivery: &StoredDelivery,
    state: DeliveryState,
) -> Result<Vec<u8>, EncodeFailure> {
    let mut out = Vec::with_capacity(64 + delivery.message.payload.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&state_bytes(state));
    out.push(delivery.qos as u8);
    out.push(u8::from(delivery.retain));
    // A PUBLISH carries far fewer than 2^32 subscription identifiers.
    let count = u32::try_from(delivery.subscription_ids.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for id in &delivery.subscription_ids {
        out.extend_from_slice(&id.to_be_bytes());
    }
    put_message(&mut out, &delivery.message)?;
    Ok(out)
}

/// Reads only the state of an encoded delivery: what start-up needs for a pending one.
pub(crate) fn delivery_state(value: &[u8]) -> Result<DeliveryState, FormatError> {
    let mut r = Reader(value);
    r.version()?;
    let tag = r.u8()?;
    let packet_id = r.u16()?;
    let needs_id = |state: fn(u16) -> DeliveryState| {
        if packet_id == 0 {
            Err(FormatError::Invalid("packet id 0"))
        } else {
            Ok(state(packet_id))
        }
    };
    match tag {
        0 => Ok(DeliveryState::Pending),
        1 => needs_id(DeliveryState::AwaitingAck),
        2 => needs_id(DeliveryState::AwaitingReceipt),
        3 => needs_id(DeliveryState::AwaitingCompletion),
        _ => Err(FormatError::Invalid("delivery state")),
    }
}

/// Decodes a delivery and its state.
pub(crate) fn decode_delivery(
    value: &[u8],
) -> Result<(StoredDelivery, DeliveryState), FormatError> {
    let state = delivery_state(value)?;
    let mut r = Reader(value.get(STATE_END..).unwrap_or_default());
    let qos = r.qos()?;
    let retain = r.flag("retain flag")?;
    let count = r.u32()? as usize;
    // Bound the allocation by what the value can actually hold.
    if count > r.0.len() / 4 {
        return Err(FormatError::Truncated);
    }
    let subscription_ids = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
    let message = take_message(r)?;
    Ok((
        StoredDelivery {
            message,
            qos,
            retain,
            subscription_ids,
        },
        state,
    ))
}

/// Returns `value` with its state replaced, without decoding the message.
pub(crate) fn patch_delivery_state(
    value: &[u8],
    state: DeliveryState,
) -> Result<Vec<u8>, FormatError> {
    delivery_state(value)?;
    let mut out = value.to_vec();
    out[STATE_OFFSET..STATE_END].copy_from_slice(&state_bytes(state));
    Ok(out)
}

/// Encodes a retained message.
pub(crate) fn encode_retained(message: &StoredMessage) -> Result<Vec<u8>, EncodeFailure> {
    let mut out = vec![FORMAT_VERSION];
    put_message(&mut out, message)?;
    Ok(out)
}

/// Decodes a retained message.
pub(crate) fn decode_retained(value: &[u8]) -> Result<StoredMessage, FormatError> {
    let mut r = Reader(value);
    r.version()?;
    take_message(r)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use halyard_codec::Properties;

    use super::*;

    fn message() -> StoredMessage {
        StoredMessage {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Properties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(30),
                content_type: Some("text/plain".into()),
                response_topic: Some("r/t".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
                ..Properties::default()
            },
            expires_at: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)),
        }
    }

    #[test]
    fn delivery_round_trips_in_every_state() {
        let delivery = StoredDelivery {
            message: message(),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![1, 268_435_455],
        };
        for state in [
            DeliveryState::Pending,
            DeliveryState::AwaitingAck(7),
            DeliveryState::AwaitingReceipt(65535),
            DeliveryState::AwaitingCompletion(1),
        ] {
            let value = encode_delivery(&delivery, state).expect("encodes");
            assert_eq!(delivery_state(&value).expect("state"), state);
            let (back, back_state) = decode_delivery(&value).expect("decodes");
            assert_eq!(back, delivery);
            assert_eq!(back_state, state);
            let patched = patch_delivery_state(&value, DeliveryState::Pending).expect("patches");
            assert_eq!(
                decode_delivery(&patched).expect("decodes").1,
                DeliveryState::Pending
            );
        }
    }

    #[test]
    fn qos0_message_without_expiry_round_trips() {
        let mut m = message();
        m.qos = QoS::AtMostOnce;
        m.expires_at = None;
        m.properties = Properties::default();
        let value = encode_retained(&m).expect("encodes");
        assert_eq!(decode_retained(&value).expect("decodes"), m);
    }

    #[test]
    fn session_with_will_round_trips() {
        let record = SessionRecord {
            client_id: "c1".into(),
            epoch: 41,
            expiry_interval: u32::MAX,
            expires_at: Some(UNIX_EPOCH + Duration::from_nanos(1)),
            delayed_will: Some((
                UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                Will {
                    topic: "will/t".into(),
                    payload: Bytes::from_static(b"bye"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: Properties {
                        will_delay_interval: Some(10),
                        message_expiry_interval: Some(5),
                        ..Properties::default()
                    },
                },
            )),
        };
        let value = encode_session(&record).expect("encodes");
        assert_eq!(decode_session("c1", &value).expect("decodes"), record);
        let plain = SessionRecord {
            delayed_will: None,
            expires_at: None,
            ..record
        };
        let value = encode_session(&plain).expect("encodes");
        assert_eq!(decode_session("c1", &value).expect("decodes"), plain);
    }

    #[test]
    fn session_written_before_epochs_reads_with_epoch_zero() {
        // Version 1: expiry interval 60, no expiry time, no will.
        let mut value = vec![FORMAT_VERSION];
        value.extend_from_slice(&60u32.to_be_bytes());
        value.extend_from_slice(&0u64.to_be_bytes());
        value.push(0);
        let record = decode_session("old", &value).expect("decodes");
        assert_eq!((record.epoch, record.expiry_interval), (0, 60));
    }

    #[test]
    fn subscription_round_trips() {
        let entry = SubscriptionEntry {
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
            identifier: Some(42),
        };
        assert_eq!(
            decode_subscription(&encode_subscription(&entry)).expect("decodes"),
            entry
        );
    }

    #[test]
    fn every_truncation_and_bad_version_is_an_error_not_a_panic() {
        let delivery = StoredDelivery {
            message: message(),
            qos: QoS::ExactlyOnce,
            retain: true,
            subscription_ids: vec![3],
        };
        let value = encode_delivery(&delivery, DeliveryState::AwaitingAck(3)).expect("encodes");
        for len in 0..value.len() {
            assert!(decode_delivery(&value[..len]).is_err(), "prefix of {len}");
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(decode_delivery(&longer).is_err());
        let mut wrong_version = value;
        wrong_version[0] = 99;
        assert!(matches!(
            decode_delivery(&wrong_version),
            Err(FormatError::UnknownVersion(99))
        ));
        // A huge identifier count must not allocate.
        let mut huge = vec![FORMAT_VERSION, 0, 0, 0, 1, 0];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_delivery(&huge).is_err());
        assert!(decode_subscription(&[FORMAT_VERSION, 3, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode_session("c", &[FORMAT_VERSION, 0]).is_err());
    }
}
