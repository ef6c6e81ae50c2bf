//! Why a packet could not be decoded or encoded.
//!
//! Every decode error means "close the connection"; [`DecodeError::reason_code`] is the one
//! place where a protocol violation becomes the MQTT 5 reason code the broker reports.

use crate::{ProtocolVersion, ReasonCode};

/// A peer sent bytes that are not a valid MQTT packet for this connection.
///
/// The `&'static str` in several variants says which rule was broken (usually citing the
/// normative statement); it is meant for logs, not for the wire.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes do not follow the packet grammar (reason code 0x81).
    #[error("malformed packet: {0}")]
    MalformedPacket(&'static str),
    /// The packet is well-formed but breaks a protocol rule (reason code 0x82).
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// The declared packet size exceeds what this side accepts (reason code 0x95). Reported
    /// from the fixed header alone, before the body is buffered.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge {
        /// Whole packet size, fixed header included.
        size: usize,
        /// The limit from the [`DecodeContext`](crate::DecodeContext).
        max: u32,
    },
    /// CONNECT names a known protocol but a level this codec does not speak (reason code 0x84;
    /// the broker answers CONNACK 0x84, or return code 0x01 for 3.x, then closes).
    #[error("unsupported protocol level {level}")]
    UnsupportedProtocolVersion {
        /// The protocol level byte the client sent.
        level: u8,
    },
    /// CONNECT carries a protocol name other than `MQTT` / `MQIsdp`. The peer may not speak
    /// MQTT at all, so the broker closes without a CONNACK [MQTT-3.1.2-1];
    /// [`reason_code`](DecodeError::reason_code) still gives 0x84 for logs and metrics.
    #[error("invalid protocol name")]
    InvalidProtocolName,
    /// A PUBLISH or will topic name is not acceptable, e.g. it holds wildcards
    /// [MQTT-3.3.2-2] (reason code 0x90).
    #[error("topic name invalid: {0}")]
    TopicNameInvalid(&'static str),
    /// A PUBLISH carries Topic Alias 0 [MQTT-3.3.2-8] (reason code 0x94). Aliases above the
    /// negotiated maximum are the core's to check.
    #[error("topic alias invalid: {0}")]
    TopicAliasInvalid(&'static str),
}

impl DecodeError {
    /// The MQTT 5 reason code to put in DISCONNECT/CONNACK - the one place protocol errors
    /// map to reason codes.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::MalformedPacket(_) => ReasonCode::MALFORMED_PACKET,
            DecodeError::ProtocolError(_) => ReasonCode::PROTOCOL_ERROR,
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion { .. } | DecodeError::InvalidProtocolName => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            DecodeError::TopicNameInvalid(_) => ReasonCode::TOPIC_NAME_INVALID,
            DecodeError::TopicAliasInvalid(_) => ReasonCode::TOPIC_ALIAS_INVALID,
        }
    }
}

/// A packet the encoder refuses to put on the wire, because no valid encoding exists.
///
/// When `encode` fails it has written nothing to the buffer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The remaining length (or a property block length) would exceed 268,435,455 bytes,
    /// the largest Variable Byte Integer.
    #[error("packet too large: remaining length {size} exceeds 268435455")]
    PacketTooLarge {
        /// The length that did not fit.
        size: usize,
    },
    /// A string or binary field is longer than its two-byte length prefix allows (65,535).
    #[error("{field} is {len} bytes, longer than 65535")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The packet type does not exist at this protocol level (AUTH before MQTT 5).
    #[error("{packet} does not exist in protocol {version:?}")]
    InvalidPacketForVersion {
        /// The packet type.
        packet: &'static str,
        /// The level asked for.
        version: ProtocolVersion,
    },
    /// The packet breaks a rule no encoding can satisfy (e.g. QoS 1 PUBLISH without a packet
    /// identifier, packet identifier 0).
    #[error("invalid packet: {0}")]
    InvalidPacket(&'static str),
}
