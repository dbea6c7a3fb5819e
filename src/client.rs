//! The client side of a session: a plain or TLS stream plus its read buffer.
//!
//! Invariant: the read buffer is owned here, so reading is cancel-safe inside
//! `select!`, and every frame taken from it has passed the
//! `max_message_size` check before any memory was reserved for it.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::protocol::frame::{split_frame, ProtocolError};
use crate::protocol::messages::PgError;

/// Why the client side failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client connection: {0}")]
    Io(#[from] io::Error),
    #[error("client protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}

/// How long a client may take to read the error it is sent last.
const SEND_ERROR_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A client's byte stream, with or without TLS.
pub type ClientStream = crate::tls::MaybeTls<TlsStream<TcpStream>>;

/// A connected client after the first packets.
pub struct ClientConn {
    stream: ClientStream,
    /// Bytes read from the client and not yet consumed.
    pub rbuf: BytesMut,
    pub max_message_size: usize,
}

impl ClientConn {
    pub fn new(stream: ClientStream, rbuf: BytesMut, max_message_size: usize) -> ClientConn {
        ClientConn {
            stream,
            rbuf,
            max_message_size,
        }
    }

    /// Reads more bytes; `Ok(0)` means the client closed its side.
    pub async fn fill(&mut self) -> Result<usize, ClientError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(8192);
        }
        Ok(self.stream.read_buf(&mut self.rbuf).await?)
    }

    /// Reads one whole frame; `Ok(None)` when the client hung up.
    pub async fn read_frame(&mut self) -> Result<Option<BytesMut>, ClientError> {
        self.read_frame_within(self.max_message_size).await
    }

    /// [`Self::read_frame`] for a message that may be at most `max` bytes
    /// long (its declared length, which counts itself).
    pub async fn read_frame_within(&mut self, max: usize) -> Result<Option<BytesMut>, ClientError> {
        loop {
            if let Some(frame) = split_frame(&mut self.rbuf, max)? {
                return Ok(Some(frame));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Sends a gateway error. Write failures are ignored: the client is
    /// either gone or about to be disconnected. A client that reads
    /// nothing gets [`SEND_ERROR_WAIT`] to take it, not the session's life.
    pub async fn send_error(&mut self, error: &PgError) {
        let mut out = BytesMut::new();
        error.encode(&mut out);
        let _ = tokio::time::timeout(SEND_ERROR_WAIT, self.stream.write_all(&out)).await;
    }

    /// Flushes and shuts the connection down.
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}
