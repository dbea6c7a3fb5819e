//! The first packets of a connection: TLS and GSS negotiation, then either a
//! `StartupMessage` or a `CancelRequest`.
//!
//! Invariant: a client that sends anything after `SSLRequest` before it has
//! read the answer is refused (those bytes were not protected by TLS and
//! must not be treated as if they were).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::client::{ClientConn, ClientError, ClientStream};
use crate::protocol::frame::ProtocolError;
use crate::protocol::startup::{split_startup, StartupMessage, StartupPacket};

/// What a new connection turned out to be.
pub enum FirstPacket {
    Startup(ClientConn, StartupMessage),
    Cancel {
        pid: i32,
        secret: i32,
        /// Forwarded by a peer gateway: never forwarded again.
        forwarded: bool,
        /// The client's cancel connection, closed only once the cancel has
        /// been dealt with: libpq's cancel returns when it closes, and the
        /// client then goes on, so closing first would let the cancel land
        /// on whatever runs next.
        client: ClientStream,
    },
    /// The client hung up before sending a startup message.
    Gone,
}

/// Runs the negotiation of a freshly accepted socket.
pub async fn negotiate(
    tcp: TcpStream,
    tls: Option<&TlsAcceptor>,
    max_message_size: usize,
) -> Result<FirstPacket, ClientError> {
    negotiate_inner(tcp, tls, max_message_size).await
}

async fn negotiate_inner(
    mut tcp: TcpStream,
    tls: Option<&TlsAcceptor>,
    max_message_size: usize,
) -> Result<FirstPacket, ClientError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let Some(packet) = read_packet(&mut tcp, &mut buf).await? else {
            return Ok(FirstPacket::Gone);
        };
        match packet {
            StartupPacket::GssEncRequest => tcp.write_all(b"N").await?,
            StartupPacket::SslRequest => {
                if !buf.is_empty() {
                    return Err(unencrypted_data());
                }
                let Some(acceptor) = tls else {
                    tcp.write_all(b"N").await?;
                    continue;
                };
                tcp.write_all(b"S").await?;
                let stream = acceptor.accept(tcp).await?;
                let mut stream = ClientStream::Tls(Box::new(stream));
                return match read_packet(&mut stream, &mut buf).await? {
                    None => Ok(FirstPacket::Gone),
                    Some(StartupPacket::Startup(m)) => Ok(FirstPacket::Startup(
                        ClientConn::new(stream, buf, max_message_size),
                        m,
                    )),
                    Some(StartupPacket::Cancel {
                        pid,
                        secret,
                        forwarded,
                    }) => Ok(FirstPacket::Cancel {
                        pid,
                        secret,
                        forwarded,
                        client: stream,
                    }),
                    Some(_) => Err(ProtocolError::Malformed {
                        what: "negotiation request inside TLS",
                    }
                    .into()),
                };
            }
            StartupPacket::Cancel {
                pid,
                secret,
                forwarded,
            } => {
                return Ok(FirstPacket::Cancel {
                    pid,
                    secret,
                    forwarded,
                    client: ClientStream::Plain(tcp),
                })
            }
            StartupPacket::Startup(m) => {
                let conn = ClientConn::new(ClientStream::Plain(tcp), buf, max_message_size);
                return Ok(FirstPacket::Startup(conn, m));
            }
        }
    }
}

fn unencrypted_data() -> ClientError {
    ProtocolError::Malformed {
        what: "SSLRequest followed by unencrypted data",
    }
    .into()
}

/// Reads one first packet; a malformed one is answered with a FATAL before
/// the error is returned.
async fn read_packet<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<StartupPacket>, ClientError> {
    loop {
        match split_startup(buf) {
            Ok(Some(packet)) => return Ok(Some(packet)),
            Ok(None) => {}
            Err(e) => {
                let mut out = BytesMut::new();
                e.to_fatal().encode(&mut out);
                let _ = stream.write_all(&out).await;
                return Err(e.into());
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}
