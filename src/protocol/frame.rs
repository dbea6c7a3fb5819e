//! Framing of regular (typed) protocol messages: a tag byte, a 4-byte
//! big-endian length that counts itself, then the body.
//!
//! Invariant: a declared length is checked against `4 <= len <= max` before a
//! single byte is reserved for it, so a hostile peer cannot make the gateway
//! allocate what it merely announces.

use bytes::{Buf, BytesMut};

/// Why bytes on the wire are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid message length {0}")]
    InvalidLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("unexpected message type {0:?}")]
    UnexpectedMessage(char),
}

/// The header of one typed message found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub tag: u8,
    /// Length of the whole frame including the tag byte.
    pub total: usize,
}

impl FrameHeader {
    /// Peeks the header at the start of `buf`. `Ok(None)` when fewer than 5
    /// bytes are buffered. Does not require the body to be present.
    pub fn peek(buf: &[u8], max: usize) -> Result<Option<FrameHeader>, ProtocolError> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if len < 4 {
            return Err(ProtocolError::InvalidLength(len.into()));
        }
        let len = len as usize;
        if len > max {
            return Err(ProtocolError::TooLarge { len, max });
        }
        Ok(Some(FrameHeader {
            tag: buf[0],
            total: len + 1,
        }))
    }

    /// Length of the body (after the 5-byte header).
    pub fn body_len(&self) -> usize {
        self.total - 5
    }
}

/// Splits one complete frame off the front of `buf`, or returns `Ok(None)`
/// if it is not complete yet (reserving room for it, now that its length
/// has been checked).
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, ProtocolError> {
    let Some(header) = FrameHeader::peek(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < header.total {
        buf.reserve(header.total - buf.len());
        return Ok(None);
    }
    Ok(Some(buf.split_to(header.total)))
}

/// A cursor over a message body that reads the protocol's primitive types.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn malformed(&self) -> ProtocolError {
        ProtocolError::Malformed { what: self.what }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        if self.buf.is_empty() {
            return Err(self.malformed());
        }
        Ok(self.buf.get_u8())
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        if self.buf.len() < 2 {
            return Err(self.malformed());
        }
        Ok(self.buf.get_i16())
    }

    /// A 16-bit count, unsigned as PostgreSQL reads the counts of `Bind`
    /// and `FunctionCall` (up to 65535).
    pub fn count16(&mut self) -> Result<usize, ProtocolError> {
        Ok(usize::from(self.i16()? as u16))
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        if self.buf.len() < 4 {
            return Err(self.malformed());
        }
        Ok(self.buf.get_i32())
    }

    /// A NUL-terminated string, without its terminator, as raw bytes.
    pub fn cstr(&mut self) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.malformed())?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = &rest[1..];
        Ok(s)
    }

    /// `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.malformed());
        }
        let (s, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_needs_five_bytes() {
        assert_eq!(FrameHeader::peek(b"Q\0\0\0", 100).unwrap(), None);
    }

    #[test]
    fn peek_rejects_short_and_negative_lengths() {
        assert_eq!(
            FrameHeader::peek(b"Q\0\0\0\x03", 100),
            Err(ProtocolError::InvalidLength(3))
        );
        assert_eq!(
            FrameHeader::peek(b"Q\xff\xff\xff\xff", 100),
            Err(ProtocolError::InvalidLength(-1))
        );
    }

    #[test]
    fn oversized_length_is_rejected_without_reserving() {
        let mut buf = BytesMut::from(&b"Q\x40\0\0\0abc"[..]);
        let err = split_frame(&mut buf, 1 << 20).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }));
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn split_waits_for_complete_frame_then_splits_it() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x09SEL"[..]);
        assert!(split_frame(&mut buf, 100).unwrap().is_none());
        buf.extend_from_slice(b"1\0Z");
        let frame = split_frame(&mut buf, 100).unwrap().unwrap();
        assert_eq!(&frame[..], b"Q\0\0\0\x09SEL1\0");
        assert_eq!(&buf[..], b"Z");
    }

    #[test]
    fn reader_reads_primitives_and_reports_truncation() {
        let mut r = Reader::new(b"ab\0\0\x01\0\0", "test");
        assert_eq!(r.cstr().unwrap(), b"ab");
        assert_eq!(r.i16().unwrap(), 1);
        assert!(r.i32().is_err());
        let mut r = Reader::new(b"no terminator", "test");
        assert!(r.cstr().is_err());
    }
}
