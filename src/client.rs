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

    /// [`Self::write_all`] to a client that must take some of what it is
    /// sent every `limit`; `None` when it took nothing for that long. A
    /// write waits until half the socket's send buffer is free, which a
    /// client reading slowly but steadily may take longer than `limit` to
    /// free: what it took is read from the bytes the kernel still holds
    /// for it, from the first `limit` a write waits to the next.
    pub async fn write_all_reading(
        &mut self,
        mut bytes: &[u8],
        limit: std::time::Duration,
    ) -> Option<Result<(), ClientError>> {
        let mut unsent = None;
        while !bytes.is_empty() {
            match tokio::time::timeout(limit, self.stream.write(bytes)).await {
                Err(_) => {
                    let now = self.unsent()?;
                    if unsent.is_some_and(|before| now >= before) {
                        return None;
                    }
                    unsent = Some(now);
                }
                Ok(Err(e)) => return Some(Err(e.into())),
                Ok(Ok(0)) => return Some(Err(io::Error::from(io::ErrorKind::WriteZero).into())),
                Ok(Ok(n)) => {
                    bytes = &bytes[n..];
                    unsent = None;
                }
            }
        }
        Some(Ok(()))
    }

    /// The bytes the kernel holds for the client, not yet taken by it
    /// (`TIOCOUTQ`).
    fn unsent(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        let fd = match &self.stream {
            ClientStream::Plain(tcp) => tcp.as_raw_fd(),
            ClientStream::Tls(tls) => tls.get_ref().0.as_raw_fd(),
        };
        let mut unsent: libc::c_int = 0;
        // SAFETY: `fd` is this connection's open socket, and TIOCOUTQ
        // writes one int to the pointer given.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unsent) };
        (rc == 0).then_some(unsent)
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
