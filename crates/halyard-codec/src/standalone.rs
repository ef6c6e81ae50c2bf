//! A PUBLISH as a value of its own, outside any connection: how the store keeps a message
//! and how the cluster's peer link and raft carry one. The codec already writes and strictly
//! validates every property, so neither needs a second message format. Always MQTT 5 (the
//! only version that carries every property), with packet id 1 for QoS 1/2 (ids belong to
//! connections, not to messages).

use bytes::{Bytes, BytesMut};

use crate::{decode, encode, DecodeContext, DecodeError, EncodeError, Packet, Properties};
use crate::{ProtocolVersion, Publish, QoS};

/// Why bytes are not exactly one standalone PUBLISH.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StandaloneError {
    /// The PUBLISH does not decode.
    #[error("embedded PUBLISH: {0}")]
    Decode(#[from] DecodeError),
    /// The bytes end inside the packet.
    #[error("embedded PUBLISH truncated")]
    Truncated,
    /// Bytes follow the packet.
    #[error("{0} bytes after the embedded PUBLISH")]
    Trailing(usize),
    /// The packet is not a PUBLISH.
    #[error("embedded packet is not a PUBLISH")]
    NotPublish,
}

/// The PUBLISH a message is kept as.
pub fn standalone_publish(
    topic: &str,
    payload: &Bytes,
    qos: QoS,
    retain: bool,
    properties: &Properties,
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

/// Appends `publish` to `out` as an MQTT 5 packet.
pub fn encode_standalone(publish: Publish, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let mut buf = BytesMut::new();
    encode(&Packet::Publish(publish), ProtocolVersion::V5, &mut buf)?;
    out.extend_from_slice(&buf);
    Ok(())
}

/// Decodes `bytes` as exactly one MQTT 5 PUBLISH, of any size.
pub fn decode_standalone(bytes: &[u8]) -> Result<Publish, StandaloneError> {
    let mut buf = BytesMut::from(bytes);
    let ctx = DecodeContext {
        version: Some(ProtocolVersion::V5),
        max_packet_size: u32::MAX,
    };
    match decode(&mut buf, &ctx)? {
        Some(Packet::Publish(publish)) if buf.is_empty() => Ok(publish),
        Some(Packet::Publish(_)) => Err(StandaloneError::Trailing(buf.len())),
        Some(_) => Err(StandaloneError::NotPublish),
        None => Err(StandaloneError::Truncated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standalone_publish_round_trips_and_rejects_what_is_not_exactly_one() {
        let properties = Properties {
            content_type: Some("text/plain".into()),
            ..Properties::default()
        };
        let publish = standalone_publish(
            "a/b",
            &Bytes::from_static(b"x"),
            QoS::ExactlyOnce,
            true,
            &properties,
        );
        let mut bytes = Vec::new();
        encode_standalone(publish.clone(), &mut bytes).expect("encodes");
        assert_eq!(decode_standalone(&bytes), Ok(publish));
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode_standalone(&longer),
            Err(StandaloneError::Trailing(1))
        );
        assert_eq!(
            decode_standalone(&bytes[..bytes.len() - 1]),
            Err(StandaloneError::Truncated)
        );
        assert_eq!(
            decode_standalone(&[0xC0, 0x00]),
            Err(StandaloneError::NotPublish),
            "PINGREQ"
        );
    }
}
