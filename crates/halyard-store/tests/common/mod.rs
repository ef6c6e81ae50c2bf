//! Builders shared by the integration tests.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use halyard_codec::{Properties, QoS, SubscriptionOptions, Will};
use halyard_core::store::{SessionRecord, StoredDelivery, StoredMessage};
use halyard_core::SubscriptionEntry;

/// A message with most properties set and a nanosecond-precise expiry.
pub fn message(topic: &str, payload: &[u8]) -> StoredMessage {
    StoredMessage {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties {
            payload_format_indicator: Some(0),
            message_expiry_interval: Some(3600),
            content_type: Some("application/octet-stream".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            ..Properties::default()
        },
        expires_at: Some(SystemTime::now() + Duration::from_secs(3600)),
    }
}

/// A QoS 0 message without properties or expiry.
pub fn plain_message(topic: &str, payload: &[u8]) -> StoredMessage {
    StoredMessage {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
    }
}

/// A delivery of `message` with subscription identifiers.
pub fn delivery(message: StoredMessage, qos: QoS) -> StoredDelivery {
    StoredDelivery {
        message,
        qos,
        retain: true,
        subscription_ids: vec![7, 268_435_455],
    }
}

/// A session record without a will.
pub fn session(client_id: &str) -> SessionRecord {
    SessionRecord {
        client_id: client_id.to_owned(),
        epoch: 3,
        held_since: 3,
        routes_from: 0,
        expiry_interval: 300,
        expires_at: Some(SystemTime::now() + Duration::from_secs(300)),
        delayed_will: None,
    }
}

/// A session record with a delayed will.
pub fn session_with_will(client_id: &str) -> SessionRecord {
    SessionRecord {
        client_id: client_id.to_owned(),
        epoch: 4,
        held_since: 4,
        routes_from: 0,
        expiry_interval: u32::MAX,
        expires_at: None,
        delayed_will: Some((
            SystemTime::now() + Duration::from_secs(30),
            Will {
                topic: format!("will/{client_id}"),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: Properties {
                    will_delay_interval: Some(30),
                    message_expiry_interval: Some(60),
                    content_type: Some("text/plain".into()),
                    user_properties: vec![("why".into(), "test".into())],
                    ..Properties::default()
                },
            },
        )),
    }
}

/// A subscription entry.
pub fn subscription(qos: QoS, identifier: Option<u32>) -> SubscriptionEntry {
    SubscriptionEntry {
        options: SubscriptionOptions {
            qos,
            no_local: true,
            retain_as_published: false,
            retain_handling: 1,
        },
        identifier,
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("halyard-store-test-")
        .tempdir()
        .expect("temp dir")
}
