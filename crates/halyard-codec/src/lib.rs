//! Sans-IO MQTT 3.1 / 3.1.1 / 5.0 codec.
//!
//! Decoding works on a caller-owned buffer and answers "need more bytes" with `Ok(None)`
//! instead of blocking, in the manner of mini-redis' `Frame::check`; it never panics on peer
//! input and never allocates more than the declared (and bounded) packet size.
//!
//! - [`decode`] / [`DecodeContext`]: bytes to [`Packet`], with strict validation.
//! - [`encode`] / [`encoded_len`]: [`Packet`] to bytes for one [`ProtocolVersion`].
//! - [`encode_standalone`] / [`decode_standalone`]: one PUBLISH as a value of its own
//!   (stored messages, cluster frames).
//! - [`topic`]: topic name / filter validity and matching, shared with the broker core.
//! - [`DecodeError::reason_code`]: the one place protocol errors become reason codes.

#![forbid(unsafe_code)]

mod decode;
mod encode;
mod error;
mod packet;
mod properties;
mod standalone;
pub mod topic;
mod wire;

pub use decode::{decode, DecodeContext};
pub use encode::{encode, encoded_len, encoded_publish_topic, publish_packet_id_offset};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use standalone::{decode_standalone, encode_standalone, standalone_publish, StandaloneError};
