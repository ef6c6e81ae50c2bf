//! The header every benchmark message carries at the start of its payload.
//!
//! `(publisher id, sequence number, send timestamp)` lets the subscriber side count lost and
//! duplicate messages per publisher exactly and measure end-to-end latency. Publisher and
//! subscribers live in the same process, so the timestamp is nanoseconds since one shared
//! monotonic [`Instant`] ([`now_ns`]), not wall-clock time.

use std::sync::OnceLock;
use std::time::Instant;

/// Four bytes that mark a payload as ours, so foreign messages on the topic are recognised.
pub const MAGIC: [u8; 4] = *b"HYB1";

/// Bytes taken by the header: magic (4), publisher id (4), sequence (8), timestamp (8).
pub const HEADER_LEN: usize = 24;

/// The decoded header of one benchmark message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadHeader {
    /// Which publisher sent it (index in the scenario).
    pub publisher: u32,
    /// Per-publisher sequence number, dense from 0.
    pub seq: u64,
    /// Send time, nanoseconds since the process-wide base [`Instant`] (see [`now_ns`]).
    pub sent_ns: u64,
}

impl PayloadHeader {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `payload`.
    ///
    /// Returns false (and writes nothing) if `payload` is shorter than [`HEADER_LEN`].
    pub fn write(&self, payload: &mut [u8]) -> bool {
        let Some(dst) = payload.get_mut(..HEADER_LEN) else {
            return false;
        };
        dst[0..4].copy_from_slice(&MAGIC);
        dst[4..8].copy_from_slice(&self.publisher.to_be_bytes());
        dst[8..16].copy_from_slice(&self.seq.to_be_bytes());
        dst[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
        true
    }

    /// Reads the header from the start of a received payload; `None` if it is too short or
    /// does not start with [`MAGIC`].
    pub fn parse(payload: &[u8]) -> Option<PayloadHeader> {
        let header = payload.get(..HEADER_LEN)?;
        if header[0..4] != MAGIC {
            return None;
        }
        Some(PayloadHeader {
            publisher: u32::from_be_bytes(header[4..8].try_into().ok()?),
            seq: u64::from_be_bytes(header[8..16].try_into().ok()?),
            sent_ns: u64::from_be_bytes(header[16..24].try_into().ok()?),
        })
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds elapsed since the process-wide base instant (fixed on first use).
pub fn now_ns() -> u64 {
    ns_of(Instant::now())
}

/// `at` as nanoseconds since the process-wide base instant (0 if `at` is earlier).
pub fn ns_of(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(base()).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let header = PayloadHeader {
            publisher: 7,
            seq: 0x0102_0304_0506_0708,
            sent_ns: u64::MAX - 3,
        };
        let mut payload = vec![0xAA; 64];
        assert!(header.write(&mut payload));
        assert_eq!(PayloadHeader::parse(&payload), Some(header));
        // Padding after the header is left alone.
        assert!(payload[HEADER_LEN..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn short_or_foreign_payloads_are_rejected() {
        let header = PayloadHeader {
            publisher: 1,
            seq: 2,
            sent_ns: 3,
        };
        let mut short = vec![0; HEADER_LEN - 1];
        assert!(!header.write(&mut short));
        assert_eq!(PayloadHeader::parse(&short), None);

        let mut payload = vec![0; HEADER_LEN];
        assert!(header.write(&mut payload));
        payload[0] = b'X';
        assert_eq!(PayloadHeader::parse(&payload), None);
        assert_eq!(PayloadHeader::parse(b""), None);
    }

    #[test]
    fn clock_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
    }
}
