//! The auth relay: a client's login is answered by PostgreSQL itself, over a
//! temporary connection that carries the client's own `StartupMessage`.
//!
//! Invariant: the temporary connection is closed as soon as the exchange
//! ends, whatever happens (success, failure, the client hanging up), and is
//! never used for anything else; nothing from it but authentication traffic
//! and `ParameterStatus` reaches the client: its `BackendKeyData` is dropped
//! (the gateway issues its own).
//!
//! Frames for the client are gathered and written once before the gateway
//! waits for the client's answer, and after a successful login they are left
//! in the caller's buffer, so the whole greeting (`AuthenticationOk`, every
//! `ParameterStatus`, the gateway's `BackendKeyData` and `ReadyForQuery`)
//! reaches the client in one write instead of one per frame.

use bytes::{BufMut, BytesMut};
use tokio::sync::OwnedSemaphorePermit;

use super::codes;
use super::limits::{self, Limits};
use crate::backend::conn::{BackendError, ServerConn};
use crate::client::{ClientConn, ClientError};
use crate::config::BackendConfig;
use crate::protocol::frame::Reader;
use crate::protocol::messages::{self, write_frame, ErrorFields};
use crate::protocol::startup::StartupMessage;

/// How a relayed login ended.
#[derive(Debug)]
pub enum Outcome {
    /// PostgreSQL accepted the client; `AuthenticationOk` and the
    /// `ParameterStatus` messages wait in the caller's `greeting` buffer.
    /// The connection limits PostgreSQL states for the client come with it.
    Authenticated(Limits),
    /// PostgreSQL refused; its `ErrorResponse` has been relayed verbatim.
    Refused(ErrorFields),
    /// The client hung up before the exchange finished (psql does this to
    /// prompt for a password). Normal traffic, not an error.
    ClientGone,
}

/// Why the relay could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0:?}")]
    Gateway(RelayFailure),
}

/// Why the gateway could not relay a login (`session::refusal` says it
/// to the client).
#[derive(Debug)]
pub enum RelayFailure {
    /// PostgreSQL could not be reached or answered nonsense.
    Backend(String),
    /// PostgreSQL asked for an authentication method the gateway cannot
    /// relay (its request code).
    Method(i32),
    /// The client answered the authentication request with another message.
    UnexpectedAnswer(u8),
}

impl From<BackendError> for RelayError {
    fn from(e: BackendError) -> Self {
        RelayError::Gateway(RelayFailure::Backend(e.to_string()))
    }
}

/// Relays the login of `startup` between `client` and a temporary backend
/// connection, then closes that connection. On [`Outcome::Authenticated`]
/// the frames still owed to the client are in `greeting`, for the caller to
/// send with its own `BackendKeyData` and `ReadyForQuery`. `slot` (one of
/// `max_auth_connections`) is held until the connection is closed.
pub async fn relay(
    client: &mut ClientConn,
    startup: &StartupMessage,
    backend: &BackendConfig,
    tls: Option<&crate::tls::BackendTls>,
    greeting: &mut BytesMut,
    slot: OwnedSemaphorePermit,
) -> Result<Outcome, RelayError> {
    let mut server = ServerConn::connect(backend, tls).await?;
    let mut outcome = exchange(client, &mut server, startup, greeting).await;
    if let Ok(Outcome::Authenticated(limits)) = &mut outcome {
        match limits_of(&mut server).await {
            Ok(read) => *limits = read,
            // Fails closed: a client must not get past a limit by making
            // it unreadable.
            Err(e) => outcome = Err(RelayError::Gateway(RelayFailure::Backend(e))),
        }
    }
    // Terminate costs the temporary backend's wake-up on this core; the
    // client's answer need not wait for it, and nothing else uses `server`.
    tokio::spawn(async move {
        server.close().await;
        drop(slot);
    });
    outcome
}

/// The connection limits PostgreSQL states for the client just logged in
/// on `server`.
async fn limits_of(server: &mut ServerConn) -> Result<Limits, String> {
    match server.simple_rows(limits::QUERY).await {
        Ok(rows) => match rows.first() {
            Some(row) => Ok(Limits::from_row(row)),
            None => Err("the client's role or database is not in the catalog".into()),
        },
        Err(e) => Err(format!("cannot read the client's connection limits: {e}")),
    }
}

async fn exchange(
    client: &mut ClientConn,
    server: &mut ServerConn,
    startup: &StartupMessage,
    out: &mut BytesMut,
) -> Result<Outcome, RelayError> {
    server.write_all(&startup.raw).await?;
    loop {
        let frame = server.read_frame().await?;
        match frame[0] {
            b'R' => {
                let code = Reader::new(&frame[5..], "Authentication")
                    .i32()
                    .map_err(BackendError::from)?;
                if let Some(outcome) = relay_auth_request(client, server, code, &frame, out).await?
                {
                    return Ok(outcome);
                }
            }
            b'E' => {
                let fields =
                    messages::parse_error_fields(&frame[5..]).map_err(BackendError::from)?;
                out.extend_from_slice(&frame);
                client.write_all(out).await?;
                out.clear();
                return Ok(Outcome::Refused(fields));
            }
            // The gateway issues its own key; the temporary backend's is useless.
            b'K' => {}
            b'Z' => return Ok(Outcome::Authenticated(Limits::default())),
            b'S' | b'N' | b'v' => out.extend_from_slice(&frame),
            other => {
                return Err(BackendError::Protocol(
                    crate::protocol::ProtocolError::UnexpectedMessage(other as char),
                )
                .into())
            }
        }
    }
}

/// Relays one authentication request and, where the protocol expects one,
/// the client's answer. `Some` when the relay is over.
async fn relay_auth_request(
    client: &mut ClientConn,
    server: &mut ServerConn,
    code: i32,
    frame: &[u8],
    out: &mut BytesMut,
) -> Result<Option<Outcome>, RelayError> {
    match code {
        codes::OK | codes::SASL_FINAL => {
            out.extend_from_slice(frame);
            Ok(None)
        }
        codes::CLEARTEXT | codes::MD5 | codes::SASL_CONTINUE => {
            out.extend_from_slice(frame);
            relay_client_answer(client, server, out).await
        }
        codes::SASL => {
            out.extend_from_slice(&without_channel_binding(&frame[9..]));
            relay_client_answer(client, server, out).await
        }
        other => Err(RelayError::Gateway(RelayFailure::Method(other))),
    }
}

/// The longest answer to an authentication request, its declared length:
/// PostgreSQL reads a password or SASL message whose length (which counts
/// itself) is at most `PG_MAX_AUTH_TOKEN_LENGTH`, 65,535, and closes the
/// connection on a longer one. The gateway reads no more from a client
/// nobody has authenticated yet, not `max_message_size`, which is for
/// statements.
const MAX_ANSWER: usize = 65_535;

/// Sends what `out` holds, then relays the client's answer.
async fn relay_client_answer(
    client: &mut ClientConn,
    server: &mut ServerConn,
    out: &mut BytesMut,
) -> Result<Option<Outcome>, RelayError> {
    client.write_all(out).await?;
    out.clear();
    let answer = match client.read_frame_within(MAX_ANSWER).await {
        Ok(Some(frame)) => frame,
        Ok(None) => return Ok(Some(Outcome::ClientGone)),
        Err(ClientError::Io(_)) => return Ok(Some(Outcome::ClientGone)),
        Err(e) => return Err(e.into()),
    };
    if answer[0] != b'p' {
        return Err(RelayError::Gateway(RelayFailure::UnexpectedAnswer(
            answer[0],
        )));
    }
    server.write_all(&answer).await?;
    Ok(None)
}

/// Rebuilds `AuthenticationSASL` without `-PLUS` mechanisms: channel binding
/// ties the client's TLS session to the server's, which a gateway that
/// terminates TLS cannot relay.
fn without_channel_binding(mechanisms: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    write_frame(&mut out, b'R', |b| {
        b.put_i32(codes::SASL);
        for m in super::service::mechanisms(mechanisms) {
            if !m.ends_with(b"-PLUS") {
                b.put_slice(m);
                b.put_u8(0);
            }
        }
        b.put_u8(0);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_mechanisms_are_removed() {
        let frame = without_channel_binding(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(&frame[5..9], &10i32.to_be_bytes());
        assert_eq!(&frame[9..], b"SCRAM-SHA-256\0\0");
        let len = i32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len + 1, frame.len());
    }
}
