//! Logging the service user in to PostgreSQL for the pool: cleartext, MD5
//! and SCRAM-SHA-256.
//!
//! SCRAM uses `postgres-protocol`'s `ScramSha256` (maintained, SASLprep)
//! rather than the unmaintained `scram` crate; see README "Dependencies".
//! Invariant: on success the connection has seen `ReadyForQuery`, and its
//! `BackendKeyData` and `ParameterStatus` values are recorded.

use bytes::BytesMut;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;

use super::codes;
use crate::backend::conn::{BackendError, ServerConn};
use crate::protocol::frame::Reader;
use crate::protocol::messages;

/// Who the pool logs in as.
pub struct ServiceLogin<'a> {
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub database: &'a str,
}

/// A connection of pgwarden's own to `backend`, logged in as `who` (the
/// anchoring of audit checkpoints, the tag-key reader). Close it with
/// [`ServerConn::close`].
pub async fn connect_as(
    backend: &crate::config::BackendConfig,
    tls: Option<&crate::tls::BackendTls>,
    who: &ServiceLogin<'_>,
) -> Result<ServerConn, BackendError> {
    let mut conn = ServerConn::connect(backend, tls).await?;
    login(&mut conn, who).await?;
    Ok(conn)
}

/// Runs the startup and authentication exchange on a fresh connection.
pub async fn login(conn: &mut ServerConn, who: &ServiceLogin<'_>) -> Result<(), BackendError> {
    let mut out = BytesMut::new();
    let params = [
        ("user", who.user),
        ("database", who.database),
        ("client_encoding", "UTF8"),
        ("application_name", "pgwarden"),
    ];
    frontend::startup_message(params.iter().copied(), &mut out)?;
    conn.write_all(&out).await?;
    authenticate(conn, who).await?;
    finish_startup(conn).await
}

fn no_password() -> BackendError {
    BackendError::Auth(
        "PostgreSQL asked for a password and none is configured ([backend] service_password)"
            .into(),
    )
}

async fn authenticate(conn: &mut ServerConn, who: &ServiceLogin<'_>) -> Result<(), BackendError> {
    let mut scram: Option<sasl::ScramSha256> = None;
    loop {
        let frame = conn.read_frame().await?;
        let body = &frame[5..];
        match frame[0] {
            b'E' => return Err(BackendError::Server(messages::parse_error_fields(body)?)),
            b'R' => {}
            b'v' | b'N' => continue,
            other => {
                return Err(crate::protocol::ProtocolError::UnexpectedMessage(other as char).into())
            }
        }
        let mut r = Reader::new(body, "Authentication");
        let code = r.i32()?;
        let mut out = BytesMut::new();
        match code {
            codes::OK => return Ok(()),
            codes::CLEARTEXT => {
                let password = who.password.ok_or_else(no_password)?;
                frontend::password_message(password.as_bytes(), &mut out)?;
            }
            codes::MD5 => {
                let password = who.password.ok_or_else(no_password)?;
                let salt = r.bytes(4)?;
                let hash = md5_hash(
                    who.user.as_bytes(),
                    password.as_bytes(),
                    [salt[0], salt[1], salt[2], salt[3]],
                );
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            codes::SASL => {
                let password = who.password.ok_or_else(no_password)?;
                if !mechanisms(r.bytes(r.remaining())?).any(|m| m == b"SCRAM-SHA-256") {
                    return Err(BackendError::Auth(
                        "PostgreSQL offered no SASL mechanism pgwarden supports".into(),
                    ));
                }
                let s = sasl::ScramSha256::new(
                    password.as_bytes(),
                    sasl::ChannelBinding::unsupported(),
                );
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)?;
                scram = Some(s);
            }
            codes::SASL_CONTINUE => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| BackendError::Auth("unexpected SASLContinue".into()))?;
                s.update(r.bytes(r.remaining())?)
                    .map_err(|e| BackendError::Auth(e.to_string()))?;
                frontend::sasl_response(s.message(), &mut out)?;
            }
            codes::SASL_FINAL => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| BackendError::Auth("unexpected SASLFinal".into()))?;
                s.finish(r.bytes(r.remaining())?)
                    .map_err(|e| BackendError::Auth(format!("server signature rejected: {e}")))?;
                continue;
            }
            other => {
                return Err(BackendError::Auth(format!(
                    "unsupported authentication method (request code {other})"
                )))
            }
        }
        conn.write_all(&out).await?;
    }
}

/// The NUL-separated mechanism list of `AuthenticationSASL`.
pub fn mechanisms(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    list.split(|&b| b == 0).filter(|m| !m.is_empty())
}

async fn finish_startup(conn: &mut ServerConn) -> Result<(), BackendError> {
    loop {
        let frame = conn.read_frame().await?;
        let mut r = Reader::new(&frame[5..], "startup");
        match frame[0] {
            b'S' => {
                let name = String::from_utf8_lossy(r.cstr()?).into_owned();
                let value = String::from_utf8_lossy(r.cstr()?).into_owned();
                conn.params.push((name, value));
            }
            b'K' => {
                conn.pid = r.i32()?;
                conn.secret = r.i32()?;
            }
            b'Z' => return Ok(()),
            b'E' => {
                return Err(BackendError::Server(messages::parse_error_fields(
                    &frame[5..],
                )?))
            }
            _ => {}
        }
    }
}
