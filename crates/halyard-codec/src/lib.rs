//! Sans-IO MQTT 3.1 / 3.1.1 / 5.0 codec.
//!
//! Decoding works on a caller-owned buffer and answers "need more bytes" with `Ok(None)`
//! instead of blocking, in the manner of mini-redis' `Frame::check`; it never panics on peer
//! input and never allocates more than the declared (and bounded) packet size.

mod packet;

pub use packet::*;
