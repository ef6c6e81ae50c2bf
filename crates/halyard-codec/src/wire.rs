//! The MQTT primitive data types (integers, Variable Byte Integers, length-prefixed strings
//! and binary data), read from a bounded packet body and written through a [`Sink`].
//!
//! Reading never panics: every read checks what is left and reports a truncated field as a
//! Malformed Packet, because the body was already cut to the declared remaining length.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{DecodeError, EncodeError};

/// The largest value a Variable Byte Integer can hold (four bytes of seven bits).
pub(crate) const MAX_VBI: usize = 268_435_455;

/// Parses a Variable Byte Integer from the front of `bytes`.
///
/// `Ok(None)` means the slice ends before the integer does; `Ok(Some((value, used)))` gives
/// the value and how many bytes it took. A fourth byte that still has its continuation bit
/// set is malformed, so this never needs more than four bytes to decide.
pub(crate) fn peek_vbi(bytes: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for (i, &byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(DecodeError::MalformedPacket(
            "variable byte integer longer than four bytes",
        ))
    } else {
        Ok(None)
    }
}

/// Bytes a Variable Byte Integer takes for `value` (assumed at most [`MAX_VBI`]).
pub(crate) fn vbi_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A cursor over one packet body. Payload fields are split off zero-copy as [`Bytes`].
pub(crate) struct Reader {
    buf: Bytes,
}

const ENDS_EARLY: DecodeError = DecodeError::MalformedPacket("packet ends inside a field");

impl Reader {
    /// Wraps a body that holds exactly the remaining length of one packet.
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// True once the whole body has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Fails unless the whole body has been read: trailing bytes make a packet malformed.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::MalformedPacket("trailing bytes after packet"))
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(ENDS_EARLY);
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(ENDS_EARLY);
        }
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(ENDS_EARLY);
        }
        Ok(self.buf.get_u32())
    }

    pub(crate) fn vbi(&mut self) -> Result<usize, DecodeError> {
        match peek_vbi(&self.buf)? {
            Some((value, used)) => {
                self.buf.advance(used);
                Ok(value)
            }
            None => Err(ENDS_EARLY),
        }
    }

    /// Splits off the next `len` bytes without copying.
    pub(crate) fn take(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < len {
            return Err(ENDS_EARLY);
        }
        Ok(self.buf.split_to(len))
    }

    /// Everything left, without copying (the PUBLISH payload).
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Two-byte length-prefixed binary data.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }

    /// Two-byte length-prefixed UTF-8 string: well-formed [MQTT-1.5.4-1] (which also excludes
    /// surrogates) and free of U+0000 [MQTT-1.5.4-2].
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        let text = std::str::from_utf8(&raw).map_err(|_| {
            DecodeError::MalformedPacket("string is not well-formed UTF-8 [MQTT-1.5.4-1]")
        })?;
        if text.contains('\0') {
            return Err(DecodeError::MalformedPacket(
                "string contains U+0000 [MQTT-1.5.4-2]",
            ));
        }
        Ok(text.to_owned())
    }
}

/// Where the encoder puts bytes. The same packet-walking code runs once against a
/// [`Counter`] (to learn the remaining length, and to validate) and once against a
/// [`Writer`], so the two can never disagree about a packet's size.
pub(crate) trait Sink {
    fn bytes(&mut self, value: &[u8]);
    fn u8(&mut self, value: u8);
    fn u16(&mut self, value: u16);
    fn u32(&mut self, value: u32);
    /// Callers guarantee `value <= MAX_VBI`.
    fn vbi(&mut self, value: usize);
}

/// Counts bytes instead of writing them.
#[derive(Default)]
pub(crate) struct Counter(pub(crate) usize);

impl Sink for Counter {
    fn bytes(&mut self, value: &[u8]) {
        self.0 += value.len();
    }
    fn u8(&mut self, _: u8) {
        self.0 += 1;
    }
    fn u16(&mut self, _: u16) {
        self.0 += 2;
    }
    fn u32(&mut self, _: u32) {
        self.0 += 4;
    }
    fn vbi(&mut self, value: usize) {
        self.0 += vbi_len(value);
    }
}

/// Appends to a caller-owned buffer.
pub(crate) struct Writer<'a>(pub(crate) &'a mut BytesMut);

impl Sink for Writer<'_> {
    fn bytes(&mut self, value: &[u8]) {
        self.0.put_slice(value);
    }
    fn u8(&mut self, value: u8) {
        self.0.put_u8(value);
    }
    fn u16(&mut self, value: u16) {
        self.0.put_u16(value);
    }
    fn u32(&mut self, value: u32) {
        self.0.put_u32(value);
    }
    fn vbi(&mut self, mut value: usize) {
        loop {
            // `value % 128` always fits in seven bits.
            let mut byte = (value % 128) as u8;
            value /= 128;
            if value > 0 {
                byte |= 0x80;
            }
            self.0.put_u8(byte);
            if value == 0 {
                break;
            }
        }
    }
}

/// Writes two-byte length-prefixed binary data, refusing anything over 65,535 bytes.
pub(crate) fn put_binary<S: Sink>(
    sink: &mut S,
    field: &'static str,
    value: &[u8],
) -> Result<(), EncodeError> {
    let len = u16::try_from(value.len()).map_err(|_| EncodeError::FieldTooLong {
        field,
        len: value.len(),
    })?;
    sink.u16(len);
    sink.bytes(value);
    Ok(())
}

/// Writes a two-byte length-prefixed UTF-8 string.
pub(crate) fn put_string<S: Sink>(
    sink: &mut S,
    field: &'static str,
    value: &str,
) -> Result<(), EncodeError> {
    put_binary(sink, field, value.as_bytes())
}

/// Writes a Variable Byte Integer, refusing values it cannot hold.
pub(crate) fn put_vbi<S: Sink>(sink: &mut S, value: usize) -> Result<(), EncodeError> {
    if value > MAX_VBI {
        return Err(EncodeError::PacketTooLarge { size: value });
    }
    sink.vbi(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vbi_bytes(value: usize) -> Vec<u8> {
        let mut buf = BytesMut::new();
        Writer(&mut buf).vbi(value);
        buf.to_vec()
    }

    #[test]
    fn vbi_boundaries_round_trip() {
        for (value, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (MAX_VBI, 4),
        ] {
            let bytes = vbi_bytes(value);
            assert_eq!(bytes.len(), len, "{value}");
            assert_eq!(vbi_len(value), len);
            assert_eq!(peek_vbi(&bytes), Ok(Some((value, len))));
        }
        assert_eq!(vbi_bytes(MAX_VBI), [0xFF, 0xFF, 0xFF, 0x7F]);
    }

    #[test]
    fn vbi_incomplete_and_too_long() {
        assert_eq!(peek_vbi(&[]), Ok(None));
        assert_eq!(peek_vbi(&[0x80, 0x80, 0x80]), Ok(None));
        assert!(matches!(
            peek_vbi(&[0x80, 0x80, 0x80, 0x80]),
            Err(DecodeError::MalformedPacket(_))
        ));
        assert!(peek_vbi(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
    }

    #[test]
    fn strings_reject_bad_utf8_and_nul() {
        // [MQTT-1.5.4-1]: an encoded surrogate (U+D800) is not well-formed UTF-8.
        let mut r = Reader::new(Bytes::from_static(&[0, 3, 0xED, 0xA0, 0x80]));
        assert!(matches!(r.string(), Err(DecodeError::MalformedPacket(_))));
        // [MQTT-1.5.4-2]
        let mut r = Reader::new(Bytes::from_static(&[0, 2, b'a', 0]));
        assert!(matches!(r.string(), Err(DecodeError::MalformedPacket(_))));
        // [MQTT-1.5.4-3]: a BOM is kept, not stripped.
        let mut r = Reader::new(Bytes::from_static(&[0, 4, 0xEF, 0xBB, 0xBF, b'a']));
        assert_eq!(r.string().unwrap(), "\u{FEFF}a");
        let mut r = Reader::new(Bytes::from_static(&[0, 5, b'a']));
        assert!(r.string().is_err());
    }

    #[test]
    fn put_binary_rejects_oversized_field() {
        let big = vec![0u8; 65_536];
        let mut counter = Counter::default();
        assert_eq!(
            put_binary(&mut counter, "payload", &big),
            Err(EncodeError::FieldTooLong {
                field: "payload",
                len: 65_536
            })
        );
    }
}
