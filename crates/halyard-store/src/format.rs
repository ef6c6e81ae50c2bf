//! The on-disk value format of [`RedbStore`](crate::RedbStore), written by hand.
//!
//! Every value starts with a version byte so a later release can read (or knowingly refuse)
//! what an earlier one wrote. Integers are big-endian. Times are `u64` nanoseconds since the
//! Unix epoch with 0 meaning "none", so a `SystemTime` round-trips exactly.
//!
//! From version 2 on, a value ends with a CRC32C of its record's key (see [`RecordKey`]) and of
//! every byte before the checksum, so a flipped bit anywhere in it, or a value found under a
//! key it was not written for, is detected instead of delivered. Version 1 values (written
//! before checksums) have the same body without the checksum; they are still read, and any
//! rewrite (including a state patch) stores them as the current version.
//!
//! A message (topic, payload, QoS, RETAIN, properties) is stored as an MQTT 5 PUBLISH encoded
//! by `halyard-codec`, preceded by its expiry: the codec already knows how to write and
//! strictly validate every property, so the store needs no second property format.
//!
//! | value | body after the version byte (then the checksum) |
//! | --- | --- |
//! | session | expiry interval u32, expires at (time), fencing epoch u64 (v3), held since u64 and routes from u64 (v4), will flag u8; if 1: will due (time), will delay flag u8 + u32, will as PUBLISH |
//! | subscription | QoS u8, flags u8 (bit 0 no local, bit 1 retain as published), retain handling u8, identifier flag u8 + u32 |
//! | delivery | state u8 (0 pending, 1 awaiting PUBACK, 2 awaiting PUBREC, 3 awaiting PUBCOMP), packet id u16, delivery QoS u8, delivery RETAIN u8, id count u32 + ids u32 each, message |
//! | retained | message |
//! | forward | group count u32, each group: length u32 + UTF-8, routed at u64 (v3), for session flag u8 + length u32 + UTF-8 (v3), message |
//! | relay | node u64, from u64, until (time), filter count u32, each filter: length u32 + UTF-8 |
//! | message | expires at (time), PUBLISH packet (rest of the body) |
//!
//! Each kind of value has its own current version (`SESSION_VERSION`, ...). To add a field to
//! one kind: raise its version by one, write the field among the fixed fields (never after a
//! PUBLISH, which runs to the end of the body), and read it at the same place only when the
//! value's version is at least the new one, with a default for older values. For example an
//! `epoch: u64` of a session: `SESSION_VERSION = 3`; in [`encode_session`],
//! `out.extend_from_slice(&record.epoch.to_be_bytes())` right after `expires at`; in
//! [`decode_session`], `let epoch = if version >= 3 { r.u64()? } else { 0 };` right after
//! `expires at`; and a round-trip test of a version 2 value. The checksum framing is the same
//! for every version from 2 on and needs no change.
//!
//! Values read from disk are untrusted: decoding never panics and never allocates more than
//! the value's own length; anything unexpected is a [`FormatError`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use halyard_codec::{
    decode_standalone, encode_standalone, standalone_publish, DecodeError, EncodeError, Publish,
    QoS, StandaloneError, SubscriptionOptions, Will,
};
use halyard_core::store::{
    DeliveryState, SessionRecord, StoredDelivery, StoredForward, StoredMessage, StoredRelay,
};
use halyard_core::{OpenExchange, SubscriptionEntry};

/// The version of values written before checksums: read, never written.
const UNCHECKED_VERSION: u8 = 1;
/// The first version whose values end with a checksum; every later one does too.
const CHECKED_SINCE: u8 = 2;
/// Current version of each kind of value (see the module documentation to add a field).
const SESSION_VERSION: u8 = 4;
/// The first session version carrying the fencing epoch (after `expires at`); earlier ones
/// read with epoch 0.
const SESSION_EPOCH_SINCE: u8 = 3;
/// The first session version carrying `held since` and `routes from` (after the epoch);
/// earlier ones read with the epoch and 0, as sessions were restored before.
const SESSION_WINDOW_SINCE: u8 = 4;
const SUBSCRIPTION_VERSION: u8 = 2;
const DELIVERY_VERSION: u8 = 2;
const RETAINED_VERSION: u8 = 2;
const FORWARD_VERSION: u8 = 4;
const RELAY_VERSION: u8 = 2;
/// Length of the CRC32C that ends a checked value.
const CHECKSUM_LEN: usize = 4;

/// Byte offset of the delivery state tag; the packet id follows it. Fixed in every version so
/// that [`patch_delivery_state`] can rewrite the state without decoding the message.
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
    /// The value's bytes (or its key) are not those its checksum was computed over.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The CRC32C stored at the end of the value.
        stored: u32,
        /// The CRC32C of what was read.
        computed: u32,
    },
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

/// The key a value is stored under, covered by the value's checksum: a value that a damaged
/// page shows under another key, or in another table, fails its check.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RecordKey<'a> {
    /// Client id.
    Session(&'a str),
    /// Client id and filter.
    Subscription(&'a str, &'a str),
    /// Client id and queue sequence number.
    Delivery(&'a str, u64),
    /// Retained key (topic levels joined by U+0000).
    Retained(&'a str),
    /// Destination node and outbox sequence number.
    Forward(u64, u64),
    /// Client id and the epoch of the claim that moved the session.
    Relay(&'a str, u64),
}

impl RecordKey<'_> {
    /// CRC32C of the key: a table tag, then each part (strings length-prefixed).
    fn checksum(self) -> u32 {
        let part = |crc: u32, text: &str| {
            let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
            crc32c::crc32c_append(
                crc32c::crc32c_append(crc, &len.to_be_bytes()),
                text.as_bytes(),
            )
        };
        match self {
            RecordKey::Session(client) => part(crc32c::crc32c(b"s"), client),
            RecordKey::Subscription(client, filter) => {
                part(part(crc32c::crc32c(b"b"), client), filter)
            }
            RecordKey::Delivery(client, seq) => {
                crc32c::crc32c_append(part(crc32c::crc32c(b"d"), client), &seq.to_be_bytes())
            }
            RecordKey::Retained(key) => part(crc32c::crc32c(b"r"), key),
            RecordKey::Forward(dest, seq) => crc32c::crc32c_append(
                crc32c::crc32c_append(crc32c::crc32c(b"f"), &dest.to_be_bytes()),
                &seq.to_be_bytes(),
            ),
            RecordKey::Relay(client, to) => {
                crc32c::crc32c_append(part(crc32c::crc32c(b"l"), client), &to.to_be_bytes())
            }
        }
    }
}

/// CRC32C of `key` followed by `bytes`.
fn checksum(key: RecordKey<'_>, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(key.checksum(), bytes)
}

/// Ends a value (version byte and body) with its checksum.
fn seal(key: RecordKey<'_>, mut value: Vec<u8>) -> Vec<u8> {
    let crc = checksum(key, &value);
    value.extend_from_slice(&crc.to_be_bytes());
    value
}

/// A value whose version is known and whose checksum (if it has one) holds.
struct Opened<'a> {
    version: u8,
    body: Reader<'a>,
}

/// Checks a value's version (at most `newest`) and checksum, returning its body.
fn open<'v>(key: RecordKey<'_>, value: &'v [u8], newest: u8) -> Result<Opened<'v>, FormatError> {
    let (&version, rest) = value.split_first().ok_or(FormatError::Truncated)?;
    if version == UNCHECKED_VERSION {
        return Ok(Opened {
            version,
            body: Reader(rest),
        });
    }
    if !(CHECKED_SINCE..=newest).contains(&version) {
        return Err(FormatError::UnknownVersion(version));
    }
    let split = value
        .len()
        .checked_sub(CHECKSUM_LEN)
        .filter(|&at| at > 0)
        .ok_or(FormatError::Truncated)?;
    let (checked, stored) = value.split_at(split);
    let mut stored_bytes = [0; CHECKSUM_LEN];
    stored_bytes.copy_from_slice(stored);
    let stored = u32::from_be_bytes(stored_bytes);
    let computed = checksum(key, checked);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    Ok(Opened {
        version,
        body: Reader(&checked[1..]),
    })
}

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

    /// A string written by [`put_text`]; `what` names it in the error.
    fn text(&mut self, what: &'static str) -> Result<String, FormatError> {
        let len = usize::try_from(self.u32()?).map_err(|_| FormatError::Truncated)?;
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| FormatError::Invalid(what))?;
        Ok(text.to_owned())
    }

    /// A list written by [`put_texts`].
    fn texts(&mut self, what: &'static str) -> Result<Vec<String>, FormatError> {
        let count = self.u32()?;
        let mut texts = Vec::new();
        for _ in 0..count {
            texts.push(self.text(what)?);
        }
        Ok(texts)
    }

    fn time(&mut self) -> Result<Option<SystemTime>, FormatError> {
        match self.u64()? {
            0 => Ok(None),
            nanos => Ok(Some(UNIX_EPOCH + Duration::from_nanos(nanos))),
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

/// A length-prefixed UTF-8 string: client ids, filters and share groups, all MQTT strings
/// (at most 65,535 bytes), far below the u32 length.
fn put_text(out: &mut Vec<u8>, text: &str) {
    let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// A count, then each string as [`put_text`] writes it.
fn put_texts(out: &mut Vec<u8>, texts: &[String]) {
    let count = u32::try_from(texts.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for text in texts {
        put_text(out, text);
    }
}

fn put_time(out: &mut Vec<u8>, time: Option<SystemTime>) {
    out.extend_from_slice(&time.map_or(0, time_to_u64).to_be_bytes());
}

/// Appends topic, payload, QoS, RETAIN and properties as an MQTT 5 PUBLISH.
fn put_publish(out: &mut Vec<u8>, publish: Publish) -> Result<(), EncodeFailure> {
    Ok(encode_standalone(publish, out)?)
}

/// Decodes the rest of the body as exactly one MQTT 5 PUBLISH.
fn take_publish(r: Reader<'_>) -> Result<Publish, FormatError> {
    decode_standalone(r.0).map_err(|e| match e {
        StandaloneError::Decode(e) => FormatError::Publish(e),
        StandaloneError::Truncated => FormatError::Truncated,
        StandaloneError::Trailing(n) => FormatError::Trailing(n),
        StandaloneError::NotPublish => FormatError::Invalid("embedded packet type"),
    })
}

fn put_message(out: &mut Vec<u8>, message: &StoredMessage) -> Result<(), EncodeFailure> {
    put_time(out, message.expires_at);
    put_publish(
        out,
        standalone_publish(
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
    let mut out = vec![SESSION_VERSION];
    out.extend_from_slice(&record.expiry_interval.to_be_bytes());
    put_time(&mut out, record.expires_at);
    out.extend_from_slice(&record.epoch.to_be_bytes());
    out.extend_from_slice(&record.held_since.to_be_bytes());
    out.extend_from_slice(&record.routes_from.to_be_bytes());
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
                standalone_publish(
                    &will.topic,
                    &will.payload,
                    will.qos,
                    will.retain,
                    &will.properties,
                ),
            )?;
        }
    }
    Ok(seal(RecordKey::Session(&record.client_id), out))
}

/// Decodes a session record stored under `client_id`.
pub(crate) fn decode_session(client_id: &str, value: &[u8]) -> Result<SessionRecord, FormatError> {
    let Opened {
        body: mut r,
        version,
    } = open(RecordKey::Session(client_id), value, SESSION_VERSION)?;
    let expiry_interval = r.u32()?;
    let expires_at = r.time()?;
    let epoch = if version >= SESSION_EPOCH_SINCE {
        r.u64()?
    } else {
        0
    };
    let (held_since, routes_from) = if version >= SESSION_WINDOW_SINCE {
        (r.u64()?, r.u64()?)
    } else {
        (epoch, 0)
    };
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
        held_since,
        routes_from,
        expiry_interval,
        expires_at,
        delayed_will,
    })
}

/// Encodes a relay (its client id and `to` are the key).
pub(crate) fn encode_relay(relay: &StoredRelay) -> Vec<u8> {
    let mut out = vec![RELAY_VERSION];
    out.extend_from_slice(&relay.node.to_be_bytes());
    out.extend_from_slice(&relay.from.to_be_bytes());
    put_time(&mut out, Some(relay.until));
    put_texts(&mut out, &relay.filters);
    seal(RecordKey::Relay(&relay.client_id, relay.to), out)
}

/// Decodes a relay stored under `(client_id, to)`.
pub(crate) fn decode_relay(
    client_id: &str,
    to: u64,
    value: &[u8],
) -> Result<StoredRelay, FormatError> {
    let opened = open(RecordKey::Relay(client_id, to), value, RELAY_VERSION)?;
    if opened.version < CHECKED_SINCE {
        return Err(FormatError::UnknownVersion(opened.version));
    }
    let mut r = opened.body;
    let node = r.u64()?;
    let from = r.u64()?;
    let until = r.time()?.ok_or(FormatError::Invalid("relay end"))?;
    let filters = r.texts("filter")?;
    r.finish()?;
    Ok(StoredRelay {
        client_id: client_id.to_owned(),
        node,
        filters,
        from,
        to,
        until,
    })
}

/// Encodes a subscription entry stored under `(client_id, filter)`.
pub(crate) fn encode_subscription(
    client_id: &str,
    filter: &str,
    entry: &SubscriptionEntry,
) -> Vec<u8> {
    let options = &entry.options;
    let mut out = vec![
        SUBSCRIPTION_VERSION,
        options.qos as u8,
        u8::from(options.no_local) | u8::from(options.retain_as_published) << 1,
        options.retain_handling,
        u8::from(entry.identifier.is_some()),
    ];
    out.extend_from_slice(&entry.identifier.unwrap_or(0).to_be_bytes());
    seal(RecordKey::Subscription(client_id, filter), out)
}

/// Decodes a subscription entry stored under `(client_id, filter)`.
pub(crate) fn decode_subscription(
    client_id: &str,
    filter: &str,
    value: &[u8],
) -> Result<SubscriptionEntry, FormatError> {
    let key = RecordKey::Subscription(client_id, filter);
    let Opened { body: mut r, .. } = open(key, value, SUBSCRIPTION_VERSION)?;
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

/// Encodes a delivery with its state, stored under `(client_id, seq)`.
pub(crate) fn encode_delivery(
    client_id: &str,
    seq: u64,
    delivery: &StoredDelivery,
    state: DeliveryState,
) -> Result<Vec<u8>, EncodeFailure> {
    let mut out = Vec::with_capacity(64 + delivery.message.payload.len());
    out.push(DELIVERY_VERSION);
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
    Ok(seal(RecordKey::Delivery(client_id, seq), out))
}

/// Reads the state at the front of a delivery body.
fn take_state(r: &mut Reader<'_>) -> Result<DeliveryState, FormatError> {
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

/// Checks a delivery's checksum and reads only its state: what start-up needs for a pending
/// one, which stays on disk. (A version 1 value has no checksum; only its state is checked.)
pub(crate) fn delivery_state(
    client_id: &str,
    seq: u64,
    value: &[u8],
) -> Result<DeliveryState, FormatError> {
    let mut opened = open(RecordKey::Delivery(client_id, seq), value, DELIVERY_VERSION)?;
    take_state(&mut opened.body)
}

/// Decodes a delivery stored under `(client_id, seq)` and its state.
pub(crate) fn decode_delivery(
    client_id: &str,
    seq: u64,
    value: &[u8],
) -> Result<(StoredDelivery, DeliveryState), FormatError> {
    let Opened { body: mut r, .. } =
        open(RecordKey::Delivery(client_id, seq), value, DELIVERY_VERSION)?;
    let state = take_state(&mut r)?;
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

/// Returns `value` with its state replaced, without decoding the message; the result is
/// always of the current version (a version 1 value gains its checksum).
pub(crate) fn patch_delivery_state(
    client_id: &str,
    seq: u64,
    value: &[u8],
    state: DeliveryState,
) -> Result<Vec<u8>, FormatError> {
    let key = RecordKey::Delivery(client_id, seq);
    let mut opened = open(key, value, DELIVERY_VERSION)?;
    take_state(&mut opened.body)?;
    let body_end = match opened.version {
        UNCHECKED_VERSION => value.len(),
        _ => value.len() - CHECKSUM_LEN,
    };
    let mut out = Vec::with_capacity(body_end + CHECKSUM_LEN);
    out.push(DELIVERY_VERSION);
    out.extend_from_slice(&state_bytes(state));
    out.extend_from_slice(&value[STATE_END..body_end]);
    Ok(seal(key, out))
}

/// Encodes a retained message stored under `key` (its [`retained_key`]).
///
/// [`retained_key`]: halyard_core::retained::retained_key
pub(crate) fn encode_retained(
    key: &str,
    message: &StoredMessage,
) -> Result<Vec<u8>, EncodeFailure> {
    let mut out = vec![RETAINED_VERSION];
    put_message(&mut out, message)?;
    Ok(seal(RecordKey::Retained(key), out))
}

/// Checks a retained message's checksum without decoding it (start-up's check).
pub(crate) fn verify_retained(key: &str, value: &[u8]) -> Result<(), FormatError> {
    open(RecordKey::Retained(key), value, RETAINED_VERSION).map(drop)
}

/// Decodes a retained message stored under `key`.
pub(crate) fn decode_retained(key: &str, value: &[u8]) -> Result<StoredMessage, FormatError> {
    take_message(open(RecordKey::Retained(key), value, RETAINED_VERSION)?.body)
}

/// Encodes a forward stored for node `dest` at `seq`.
pub(crate) fn encode_forward(
    dest: u64,
    seq: u64,
    forward: &StoredForward,
) -> Result<Vec<u8>, EncodeFailure> {
    let mut out = vec![FORWARD_VERSION];
    put_texts(&mut out, &forward.groups);
    out.extend_from_slice(&forward.routed_at.to_be_bytes());
    match &forward.for_session {
        Some(client_id) => {
            // 1: addressed; 2 and 3 (version 4): with an open QoS 2 exchange, its packet id
            // after the client id.
            out.push(match forward.exchange {
                None => 1,
                Some(OpenExchange::Unreceived(_)) => 2,
                Some(OpenExchange::Received(_)) => 3,
            });
            put_text(&mut out, client_id);
            if let Some(OpenExchange::Unreceived(id) | OpenExchange::Received(id)) =
                forward.exchange
            {
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
        None => out.push(0),
    }
    put_message(&mut out, &forward.message)?;
    Ok(seal(RecordKey::Forward(dest, seq), out))
}

/// Decodes a forward stored for node `dest` at `seq`.
pub(crate) fn decode_forward(
    dest: u64,
    seq: u64,
    value: &[u8],
) -> Result<StoredForward, FormatError> {
    let opened = open(RecordKey::Forward(dest, seq), value, FORWARD_VERSION)?;
    let version = opened.version;
    let mut r = opened.body;
    let groups = r.texts("share group")?;
    let (routed_at, for_session, exchange) = if version >= 3 {
        let routed_at = r.u64()?;
        let flag = r.u8()?;
        if flag > 3 || (flag > 1 && version < 4) {
            return Err(FormatError::Invalid("for-session flag"));
        }
        let for_session = if flag == 0 {
            None
        } else {
            Some(r.text("client id")?)
        };
        let exchange = match flag {
            2 => Some(OpenExchange::Unreceived(r.u16()?)),
            3 => Some(OpenExchange::Received(r.u16()?)),
            _ => None,
        };
        (routed_at, for_session, exchange)
    } else {
        (0, None, None)
    };
    let message = take_message(r)?;
    Ok(StoredForward {
        message,
        groups,
        routed_at,
        for_session,
        exchange,
    })
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

    fn delivery() -> StoredDelivery {
        StoredDelivery {
            message: message(),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![1, 268_435_455],
        }
    }

    /// The value as the release before checksums wrote it: version 1, no checksum.
    fn as_version_1(value: &[u8]) -> Vec<u8> {
        let mut old = value[..value.len() - CHECKSUM_LEN].to_vec();
        old[0] = UNCHECKED_VERSION;
        old
    }

    #[test]
    fn delivery_round_trips_in_every_state() {
        let delivery = delivery();
        for state in [
            DeliveryState::Pending,
            DeliveryState::AwaitingAck(7),
            DeliveryState::AwaitingReceipt(65535),
            DeliveryState::AwaitingCompletion(1),
        ] {
            let value = encode_delivery("c", 9, &delivery, state).expect("encodes");
            assert_eq!(delivery_state("c", 9, &value).expect("state"), state);
            let (back, back_state) = decode_delivery("c", 9, &value).expect("decodes");
            assert_eq!(back, delivery);
            assert_eq!(back_state, state);
            let patched =
                patch_delivery_state("c", 9, &value, DeliveryState::Pending).expect("patches");
            assert_eq!(
                decode_delivery("c", 9, &patched).expect("decodes"),
                (delivery.clone(), DeliveryState::Pending)
            );
        }
    }

    #[test]
    fn qos0_message_without_expiry_round_trips() {
        let mut m = message();
        m.qos = QoS::AtMostOnce;
        m.expires_at = None;
        m.properties = Properties::default();
        let value = encode_retained("k", &m).expect("encodes");
        verify_retained("k", &value).expect("verifies");
        assert_eq!(decode_retained("k", &value).expect("decodes"), m);
    }

    fn session_with_will() -> SessionRecord {
        SessionRecord {
            client_id: "c1".into(),
            epoch: 41,
            held_since: 38,
            routes_from: 39,
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
        }
    }

    #[test]
    fn session_with_will_round_trips() {
        let record = session_with_will();
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
    fn session_written_before_its_window_reads_as_held_since_its_epoch() {
        let mut record = session_with_will();
        let current = encode_session(&record).expect("encodes");
        let mut body = current[..current.len() - CHECKSUM_LEN].to_vec();
        body.drain(21..37);
        body[0] = SESSION_WINDOW_SINCE - 1;
        let older = seal(RecordKey::Session("c1"), body);
        record.held_since = record.epoch;
        record.routes_from = 0;
        assert_eq!(decode_session("c1", &older).expect("decodes"), record);
    }

    #[test]
    fn session_written_before_epochs_reads_with_epoch_zero() {
        // Version 1 (no checksum): expiry interval 60, no expiry time, no will.
        let mut value = vec![UNCHECKED_VERSION];
        value.extend_from_slice(&60u32.to_be_bytes());
        value.extend_from_slice(&0u64.to_be_bytes());
        value.push(0);
        let record = decode_session("old", &value).expect("decodes");
        assert_eq!((record.epoch, record.expiry_interval), (0, 60));
    }

    #[test]
    fn relay_round_trips_and_is_bound_to_its_key() {
        let relay = StoredRelay {
            client_id: "moved".into(),
            node: 3,
            filters: vec!["a/#".into(), "b/+".into()],
            from: 7,
            to: 12,
            until: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        };
        let value = encode_relay(&relay);
        assert_eq!(decode_relay("moved", 12, &value).expect("decodes"), relay);
        assert!(decode_relay("moved", 13, &value).is_err(), "another key");
        assert!(decode_relay("moved", 12, &value[..value.len() - 1]).is_err());
    }

    fn entry() -> SubscriptionEntry {
        SubscriptionEntry {
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
            identifier: Some(42),
        }
    }

    #[test]
    fn subscription_round_trips() {
        let value = encode_subscription("c", "a/#", &entry());
        assert_eq!(
            decode_subscription("c", "a/#", &value).expect("decodes"),
            entry()
        );
    }

    #[test]
    fn values_written_before_checksums_still_load() {
        // Version 1 sessions have no epoch (the 8 bytes after `expires at`) and no window
        // (the 16 after it): they read as 0.
        let mut record = session_with_will();
        let mut old = as_version_1(&encode_session(&record).expect("encodes"));
        old.drain(13..37);
        record.epoch = 0;
        record.held_since = 0;
        record.routes_from = 0;
        assert_eq!(decode_session("c1", &old).expect("decodes"), record);

        let old = as_version_1(&encode_subscription("c", "f", &entry()));
        assert_eq!(
            decode_subscription("c", "f", &old).expect("decodes"),
            entry()
        );

        let value =
            encode_delivery("c", 1, &delivery(), DeliveryState::AwaitingAck(3)).expect("encodes");
        let old = as_version_1(&value);
        assert_eq!(
            decode_delivery("c", 1, &old).expect("decodes"),
            (delivery(), DeliveryState::AwaitingAck(3))
        );
        // A state patch rewrites it as the current version, checksum included.
        let patched = patch_delivery_state("c", 1, &old, DeliveryState::Pending).expect("patches");
        assert_eq!(patched[0], DELIVERY_VERSION);
        assert!(
            decode_delivery("c", 2, &patched).is_err(),
            "checked against its key"
        );
        assert_eq!(
            decode_delivery("c", 1, &patched).expect("decodes"),
            (delivery(), DeliveryState::Pending)
        );

        let old = as_version_1(&encode_retained("k", &message()).expect("encodes"));
        verify_retained("k", &old).expect("nothing to check");
        assert_eq!(decode_retained("k", &old).expect("decodes"), message());
    }

    #[test]
    fn a_version_2_forward_reads_with_no_route_version_and_no_session() {
        let mut body = vec![2];
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&2u32.to_be_bytes());
        body.extend_from_slice(b"g1");
        put_message(&mut body, &message()).expect("encodes");
        let value = seal(RecordKey::Forward(2, 9), body);
        let forward = decode_forward(2, 9, &value).expect("decodes");
        assert_eq!(forward.groups, vec!["g1".to_owned()]);
        assert_eq!((forward.routed_at, forward.for_session), (0, None));
        assert_eq!(forward.message, message());
    }

    #[test]
    fn forward_round_trips_and_fails_under_another_key() {
        let forward = StoredForward {
            message: message(),
            groups: vec!["g1".to_owned(), "élan".to_owned()],
            routed_at: 41,
            for_session: Some("mover".to_owned()),
            exchange: None,
        };
        let value = encode_forward(2, 9, &forward).expect("encodes");
        assert_eq!(decode_forward(2, 9, &value).expect("decodes"), forward);
        for exchange in [OpenExchange::Unreceived(7), OpenExchange::Received(65_535)] {
            let open = StoredForward {
                exchange: Some(exchange),
                ..forward.clone()
            };
            let value_open = encode_forward(2, 9, &open).expect("encodes");
            assert_eq!(decode_forward(2, 9, &value_open).expect("decodes"), open);
        }
        let unaddressed = StoredForward {
            for_session: None,
            ..forward.clone()
        };
        let value_unaddressed = encode_forward(2, 9, &unaddressed).expect("encodes");
        assert_eq!(
            decode_forward(2, 9, &value_unaddressed).expect("decodes"),
            unaddressed
        );
        assert!(
            decode_forward(3, 9, &value).is_err(),
            "another node's outbox"
        );
        assert!(decode_forward(2, 8, &value).is_err(), "another seq");
        for cut in 0..value.len() {
            assert!(decode_forward(2, 9, &value[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn any_flipped_bit_fails_the_checksum() {
        let value = encode_delivery("c", 5, &delivery(), DeliveryState::Pending).expect("encodes");
        for at in 0..value.len() {
            for bit in [0x01, 0x80] {
                let mut damaged = value.clone();
                damaged[at] ^= bit;
                assert!(
                    decode_delivery("c", 5, &damaged).is_err(),
                    "bit {bit:#x} of byte {at}"
                );
                assert!(delivery_state("c", 5, &damaged).is_err());
            }
        }
        // The payload's bytes in particular: a flip there is a checksum failure.
        let at = value
            .windows(5)
            .position(|w| w == b"hello")
            .expect("payload stored");
        let mut damaged = value.clone();
        damaged[at] ^= 0x20;
        assert!(matches!(
            decode_delivery("c", 5, &damaged),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn a_value_under_another_key_fails_the_checksum() {
        let value = encode_delivery("c", 5, &delivery(), DeliveryState::Pending).expect("encodes");
        assert!(decode_delivery("c", 6, &value).is_err());
        assert!(decode_delivery("d", 5, &value).is_err());
        let value = encode_session(&session_with_will()).expect("encodes");
        assert!(decode_session("c2", &value).is_err());
        let value = encode_subscription("c", "a", &entry());
        assert!(decode_subscription("c", "b", &value).is_err());
        // Length prefixes keep the parts apart: ("ca", "b") is not ("c", "ab").
        let value = encode_subscription("ca", "b", &entry());
        assert!(decode_subscription("c", "ab", &value).is_err());
        let value = encode_retained("a", &message()).expect("encodes");
        assert!(verify_retained("b", &value).is_err());
    }

    #[test]
    fn every_truncation_and_bad_version_is_an_error_not_a_panic() {
        let delivery = StoredDelivery {
            message: message(),
            qos: QoS::ExactlyOnce,
            retain: true,
            subscription_ids: vec![3],
        };
        let value =
            encode_delivery("c", 0, &delivery, DeliveryState::AwaitingAck(3)).expect("encodes");
        for version_1 in [false, true] {
            let value = if version_1 {
                as_version_1(&value)
            } else {
                value.clone()
            };
            for len in 0..value.len() {
                assert!(
                    decode_delivery("c", 0, &value[..len]).is_err(),
                    "prefix of {len}"
                );
                let _ = patch_delivery_state("c", 0, &value[..len], DeliveryState::Pending);
            }
            let mut longer = value.clone();
            longer.push(0);
            assert!(decode_delivery("c", 0, &longer).is_err());
        }
        for version in [0, 3, 99] {
            let mut wrong_version = value.clone();
            wrong_version[0] = version;
            assert!(matches!(
                decode_delivery("c", 0, &wrong_version),
                Err(FormatError::UnknownVersion(v)) if v == version
            ));
        }
        // A huge identifier count must not allocate.
        let mut huge = vec![UNCHECKED_VERSION, 0, 0, 0, 1, 0];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_delivery("c", 0, &huge).is_err());
        let huge = seal(RecordKey::Delivery("c", 0), {
            let mut v = huge;
            v[0] = DELIVERY_VERSION;
            v
        });
        assert!(matches!(
            decode_delivery("c", 0, &huge),
            Err(FormatError::Truncated)
        ));
        assert!(
            decode_subscription("c", "f", &[UNCHECKED_VERSION, 3, 0, 0, 0, 0, 0, 0, 0]).is_err()
        );
        assert!(decode_session("c", &[UNCHECKED_VERSION, 0]).is_err());
        assert!(decode_session("c", &[SESSION_VERSION, 0, 0, 0]).is_err());
    }
}
