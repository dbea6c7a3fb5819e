//! The untyped first packets of a connection: `SSLRequest`,
//! `GSSENCRequest`, `CancelRequest` and `StartupMessage`.
//!
//! Invariant: the declared length is checked (`8 <= len <= 10000`, exactly 16
//! for a cancel) before anything is reserved, and only protocol 3.x is
//! accepted; a 3.x minor version above 0 is relayed so that the backend
//! answers it with `NegotiateProtocolVersion`.

use bytes::{Bytes, BytesMut};

use super::frame::{ProtocolError, Reader};

pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
/// A `CancelRequest` one pgwarden forwards to the peer that issued its key
/// (`[[peers]]`): handled like a client's, but never forwarded again, so
/// forwarding cannot loop. Version 1234.8866, unused by PostgreSQL.
pub const PEER_CANCEL_REQUEST_CODE: i32 = (1234 << 16) | 8866;
/// PostgreSQL's own limit on the size of a startup packet.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// One first packet from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    /// `forwarded`: sent by a peer gateway ([`PEER_CANCEL_REQUEST_CODE`]).
    Cancel {
        pid: i32,
        secret: i32,
        forwarded: bool,
    },
    Startup(StartupMessage),
}

/// A `StartupMessage`: the protocol version and the parameters, with the
/// original bytes kept for relaying to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: i32,
    pub params: Vec<(String, String)>,
    pub raw: Bytes,
}

impl StartupMessage {
    /// The value of a startup parameter.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits the next first-packet off `buf`; `Ok(None)` until it is complete.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(ProtocolError::InvalidLength(len.into()));
    }
    let len = len as usize;
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let raw = buf.split_to(len).freeze();
    decode(raw).map(Some)
}

fn decode(raw: Bytes) -> Result<StartupPacket, ProtocolError> {
    let code = i32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    match code {
        SSL_REQUEST_CODE if raw.len() == 8 => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if raw.len() == 8 => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE | PEER_CANCEL_REQUEST_CODE if raw.len() == 16 => {
            let mut r = Reader::new(&raw[8..], "CancelRequest");
            Ok(StartupPacket::Cancel {
                pid: r.i32()?,
                secret: r.i32()?,
                forwarded: code == PEER_CANCEL_REQUEST_CODE,
            })
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE | PEER_CANCEL_REQUEST_CODE => {
            Err(ProtocolError::InvalidLength(raw.len() as i64))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let params = decode_params(&raw[8..])?;
            Ok(StartupPacket::Startup(StartupMessage {
                version: code,
                params,
                raw,
            }))
        }
    }
}

fn decode_params(body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let malformed = ProtocolError::Malformed {
        what: "StartupMessage",
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| malformed.clone());
    let mut r = Reader::new(body, "StartupMessage");
    let mut params = Vec::new();
    loop {
        let key = r.cstr()?;
        if key.is_empty() {
            break;
        }
        let value = r.cstr()?;
        params.push((text(key)?, text(value)?));
    }
    if r.remaining() != 0 {
        return Err(malformed);
    }
    Ok(params)
}

/// Encodes an `SSLRequest` (asking a server to switch to TLS).
pub fn ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8i32.to_be_bytes());
    out[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    out
}

/// Encodes a `CancelRequest` packet for the backend.
pub fn cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    cancel_packet(CANCEL_REQUEST_CODE, pid, secret)
}

/// Encodes the cancel a gateway forwards to the peer that issued the key.
pub fn peer_cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    cancel_packet(PEER_CANCEL_REQUEST_CODE, pid, secret)
}

fn cancel_packet(code: i32, pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&code.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..].copy_from_slice(&secret.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&((8 + body.len()) as i32).to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn startup_message_params() {
        let mut b = packet(196608, b"user\0alice\0database\0db\0\0");
        let StartupPacket::Startup(m) = split_startup(&mut b).unwrap().unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(m.get("user"), Some("alice"));
        assert_eq!(m.get("database"), Some("db"));
        assert_eq!(m.raw.len(), 8 + 24);
        assert!(b.is_empty());
    }

    #[test]
    fn ssl_gss_and_cancel() {
        let mut b = packet(SSL_REQUEST_CODE, b"");
        assert_eq!(
            split_startup(&mut b).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        let mut b = packet(GSSENC_REQUEST_CODE, b"");
        assert_eq!(
            split_startup(&mut b).unwrap(),
            Some(StartupPacket::GssEncRequest)
        );
        let mut b = BytesMut::from(&cancel_request(7, -9)[..]);
        assert_eq!(
            split_startup(&mut b).unwrap(),
            Some(StartupPacket::Cancel {
                pid: 7,
                secret: -9,
                forwarded: false
            })
        );
    }

    #[test]
    fn bad_lengths_and_versions_are_rejected() {
        let mut b = BytesMut::from(&[0x40u8, 0, 0, 0][..]);
        assert!(split_startup(&mut b).is_err());
        let mut b = BytesMut::from(&[0u8, 0, 0, 4][..]);
        assert!(split_startup(&mut b).is_err());
        let mut b = packet(0x0002_0000, b"user\0x\0\0");
        assert_eq!(
            split_startup(&mut b),
            Err(ProtocolError::UnsupportedVersion { major: 2, minor: 0 })
        );
        let mut b = packet(CANCEL_REQUEST_CODE, b"1234");
        assert!(split_startup(&mut b).is_err());
    }

    #[test]
    fn unterminated_params_are_malformed() {
        let mut b = packet(196608, b"user\0alice");
        assert!(split_startup(&mut b).is_err());
        let mut b = packet(196608, b"user\0\xff\0\0");
        assert!(split_startup(&mut b).is_err());
    }

    #[test]
    fn partial_packet_waits() {
        let full = packet(196608, b"user\0alice\0\0");
        let mut b = BytesMut::from(&full[..6]);
        assert_eq!(split_startup(&mut b).unwrap(), None);
    }
}
