//! One raw connection to the PostgreSQL backend: a socket plus its read
//! buffer, used both for pooled service-user connections and for the
//! temporary connection of an auth relay.
//!
//! Invariant: the read buffer is owned here, so `read_frame` and `fill` are
//! cancel-safe inside `select!`: bytes that arrived are never lost.

use std::time::Duration;

use bytes::BytesMut;

use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::BackendConfig;
use crate::tls::{BackendTls, BackendTlsMode};

use crate::protocol::frame::{split_frame, ProtocolError};
use crate::protocol::messages::{self, ErrorFields};

/// Largest frame read whole from the backend outside of row relaying.
const MAX_BACKEND_FRAME: usize = 1 << 30;

/// Why talking to the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot reach PostgreSQL at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to PostgreSQL at {0}")]
    ConnectTimeout(String),
    #[error("connection to PostgreSQL lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL closed the connection")]
    Closed,
    #[error("protocol error from PostgreSQL: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("PostgreSQL: {} {}", .0.code, .0.message)]
    Server(ErrorFields),
    #[error("authentication as the service user failed: {0}")]
    Auth(String),
    #[error("TLS to PostgreSQL: {0}")]
    Tls(String),
    #[error("the database's server connections are all in use ([pool] max_db_connections)")]
    Capped,
    /// One of pgwarden's logins has settings of its own (see
    /// [`ServerConn::check_new_backend`]).
    #[error("{0}")]
    LoginSettings(String),
    /// `[backend] hosts`: none is the one primary (see `config::primary`).
    #[error("{0}")]
    NoPrimary(String),
}

/// A connection to the backend and what pgwarden knows about it.
#[derive(Debug)]
pub struct ServerConn {
    stream: BackendStream,
    /// Bytes read from the backend and not yet consumed.
    pub rbuf: BytesMut,
    /// The backend's process id and cancel secret (from `BackendKeyData`).
    pub pid: i32,
    pub secret: i32,
    /// `ParameterStatus` values the backend reported at login.
    pub params: Vec<(String, String)>,
    /// Client statements this connection holds under their shared names.
    pub statements: super::statements::StatementCache,
    /// Whose identity and settings it carries, and what sessions left on
    /// it.
    custody: super::custody::Custody,
    /// Notifications met by the gateway's own exchanges, not yet relayed.
    notifications: Vec<BytesMut>,
    broken: bool,
    /// When the backend process started (µs since the epoch), read at
    /// creation: signed client tags are bound to it.
    pub started_us: Option<i64>,
    /// The primary's generation it was opened in (`config::primary`).
    pub generation: u64,
    /// The database's connection cap this connection counts against.
    pub(crate) permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// How many times in a row it passed directly from session to session
    /// (`pool::Pools::release`).
    pub(crate) handoffs: u32,
}

/// What pgwarden knows about a server connection, without its socket:
/// what a session leaves on it, as the I/O-free session core marks it.
#[derive(Debug)]
pub struct ConnState<'c> {
    pub custody: &'c mut super::custody::Custody,
    /// Client statements it holds under their shared names.
    pub statements: &'c mut super::statements::StatementCache,
}

impl ConnState<'_> {
    /// Records that `session` ran code pgwarden cannot see into here (a DO
    /// block, a function outside the built-ins it knows, `FunctionCall`...):
    /// see [`super::custody::Custody::mark_opaque`]. With `cache`, the
    /// shared statements are no longer trusted either (the code may have
    /// deallocated or redefined them), so each is closed and prepared
    /// afresh before its next use.
    pub fn mark_opaque(&mut self, session: &std::sync::Arc<str>, cache: bool) {
        self.custody.mark_opaque(session);
        if cache {
            self.statements.mark_uncertain();
        }
    }
}

impl ServerConn {
    /// Opens a connection to the backend (the primary, with `[backend]
    /// hosts`) within the connect timeout, negotiating TLS as `tls` says.
    pub async fn connect(
        backend: &BackendConfig,
        tls: Option<&BackendTls>,
    ) -> Result<ServerConn, BackendError> {
        let (target, generation) = backend
            .primary
            .target(&backend.configured())
            .await
            .map_err(BackendError::NoPrimary)?;
        let mut conn = Self::connect_to(backend, tls, &target).await;
        if let Ok(conn) = conn.as_mut() {
            conn.generation = generation;
        }
        if conn.is_err() {
            backend.primary.recheck();
        }
        conn
    }

    /// Opens a connection to `target` within the connect timeout,
    /// negotiating TLS as `tls` says (an `SSLRequest`, then the handshake).
    pub async fn connect_to(
        backend: &BackendConfig,
        tls: Option<&BackendTls>,
        target: &crate::config::primary::Host,
    ) -> Result<ServerConn, BackendError> {
        let addr = target.to_string();
        let timeout = Duration::from_millis(backend.connect_timeout_ms);
        let open = async {
            let mut tcp =
                TcpStream::connect(&addr)
                    .await
                    .map_err(|source| BackendError::Connect {
                        addr: addr.clone(),
                        source,
                    })?;
            tcp.set_nodelay(true)?;
            let Some(tls) = tls else {
                return Ok(BackendStream::Plain(tcp));
            };
            let mut request = BytesMut::new();
            frontend::ssl_request(&mut request);
            tcp.write_all(&request).await?;
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer).await?;
            match (answer[0], tls.mode) {
                (b'S', _) => {
                    let name = ServerName::try_from(target.host.clone())
                        .map_err(|e| BackendError::Tls(format!("bad host name for TLS: {e}")))?;
                    let stream = tls
                        .connector
                        .connect(name, tcp)
                        .await
                        .map_err(|e| BackendError::Tls(e.to_string()))?;
                    Ok(BackendStream::Tls(Box::new(stream)))
                }
                (b'N', BackendTlsMode::Prefer) => Ok(BackendStream::Plain(tcp)),
                (b'N', _) => Err(BackendError::Tls("PostgreSQL does not offer TLS".into())),
                (other, _) => Err(BackendError::Tls(format!(
                    "unexpected answer {other:#04x} to SSLRequest"
                ))),
            }
        };
        let stream = match tokio::time::timeout(timeout, open).await {
            Err(_) => return Err(BackendError::ConnectTimeout(addr)),
            Ok(result) => result?,
        };
        Ok(ServerConn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            pid: 0,
            secret: 0,
            params: Vec::new(),
            statements: Default::default(),
            custody: Default::default(),
            notifications: Vec::new(),
            broken: false,
            permit: None,
            handoffs: 0,
            started_us: None,
            generation: 0,
        })
    }

    /// Reads more bytes into the buffer; an orderly close is an error here
    /// because the gateway never expects the backend to hang up first.
    pub async fn fill(&mut self) -> Result<usize, BackendError> {
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            self.broken = true;
            return Err(BackendError::Closed);
        }
        Ok(n)
    }

    /// Reads one whole frame, for the gateway's own exchanges (assertion,
    /// verification, reads back): a `NotificationResponse` met on the way
    /// belongs to the client, and is kept for it ([`Self::take_notifications`]).
    pub async fn read_frame(&mut self) -> Result<BytesMut, BackendError> {
        loop {
            match split_frame(&mut self.rbuf, MAX_BACKEND_FRAME)? {
                Some(frame) if frame[0] == b'A' => self.notifications.push(frame),
                Some(frame) => return Ok(frame),
                None => {
                    self.fill().await?;
                }
            }
        }
    }

    /// A notification the gateway's own exchange met, for the client.
    pub fn keep_notification(&mut self, frame: BytesMut) {
        self.notifications.push(frame);
    }

    /// Notifications the gateway's own exchanges met, for the client.
    pub fn take_notifications(&mut self) -> Vec<BytesMut> {
        std::mem::take(&mut self.notifications)
    }

    /// Drops the notifications the gateway's own exchanges met: they were
    /// for a session whose `LISTEN`s a reset has just ended.
    pub fn forget_notifications(&mut self) {
        self.notifications.clear();
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        if let Err(e) = self.stream.write_all(bytes).await {
            self.broken = true;
            return Err(e.into());
        }
        Ok(())
    }

    /// Reads frames until `ReadyForQuery`, returning its status byte. The
    /// first `ErrorResponse` seen is returned as `Server` after the
    /// `ReadyForQuery`, so the connection is left in a known state.
    pub async fn drain_until_ready(&mut self) -> Result<u8, BackendError> {
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame[0] {
                b'Z' if frame.len() == 6 => {
                    return match error {
                        Some(e) => Err(BackendError::Server(e)),
                        None => Ok(frame[5]),
                    }
                }
                b'E' if error.is_none() => {
                    error = Some(messages::parse_error_fields(&frame[5..])?);
                }
                _ => {}
            }
        }
    }

    /// Runs `sql` as a simple query of the gateway's own and returns its
    /// rows as text (`None` for NULL); the first error the server reports
    /// is returned instead, once it is ready again.
    pub async fn simple_rows(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, BackendError> {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        self.write_all(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame[0] {
                b'D' => rows.push(messages::text_columns(&frame[5..])?),
                b'E' if error.is_none() => error = Some(messages::parse_error_fields(&frame[5..])?),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(fields) => Err(BackendError::Server(fields)),
            None => Ok(rows),
        }
    }

    /// Reads when the backend process started (µs since the epoch), for
    /// values bound to this backend (the signed client tag), and refuses a
    /// login that has settings of its own: pgwarden's logins never have
    /// any, and one a client set (`ALTER ROLE CURRENT_USER IN DATABASE ...
    /// SET search_path = ...` after reaching the login) would apply to the
    /// sessions of every client this connection serves.
    pub async fn check_new_backend(&mut self) -> Result<Option<i64>, BackendError> {
        // What the backend applied at its start, not only what the catalog
        // says now: a setting removed again right after the backend
        // started still counts.
        // A library's settings (`plpgsql.*`) are placeholders, invisible to
        // `pg_show_all_settings()`, until the library loads; loading
        // PL/pgSQL (an empty block) turns one the backend started with into
        // a setting whose source shows. A database without PL/pgSQL has
        // none to hide.
        match self.simple_rows("DO $$BEGIN END$$").await {
            Ok(_) | Err(BackendError::Server(_)) => {}
            Err(e) => return Err(e),
        }
        let own = self
            .simple_rows(SETTING_SOURCES_SQL)
            .await?
            .into_iter()
            .find(|row| {
                matches!(
                    row.get(1).cloned().flatten().as_deref(),
                    Some("user" | "database user")
                )
            });
        if let Some(row) = own {
            let name = row.first().cloned().flatten().unwrap_or_default();
            return Err(BackendError::LoginSettings(format!(
                "the login has a setting of its own ({name}, from ALTER ROLE ... SET), which pgwarden's logins never have: a session that reached the login may have set it to run code in other clients' sessions; run pgwarden migrate, which removes such settings"
            )));
        }
        let rows = self.simple_rows(NEW_CONNECTION_SQL).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        if row.get(1).cloned().flatten().as_deref() != Some("0") {
            return Err(BackendError::LoginSettings(
                "the login has settings of its own (ALTER ROLE ... SET, in pg_db_role_setting), which pgwarden's logins never have: a session that reached the login may have set them to run code in other clients' sessions; run pgwarden migrate, which removes them".into(),
            ));
        }
        Ok(row
            .first()
            .cloned()
            .flatten()
            .and_then(|text| parse_started(&text)))
    }

    /// What the connection carries for the gateway (see
    /// [`super::custody::Custody`]).
    pub fn custody(&self) -> &super::custody::Custody {
        &self.custody
    }

    pub fn custody_mut(&mut self) -> &mut super::custody::Custody {
        &mut self.custody
    }

    /// What pgwarden knows about this connection, without its socket.
    pub fn state(&mut self) -> ConnState<'_> {
        ConnState {
            custody: &mut self.custody,
            statements: &mut self.statements,
        }
    }

    /// Gets the connection ready to serve `wanted`: when another session
    /// may have left state here (or settings the new one would not
    /// overwrite), forgets it all, statements included (the caller sends
    /// the reset), and says what else the binding must send.
    pub fn prepare_for(
        &mut self,
        wanted: &super::custody::Wanted<'_>,
    ) -> super::custody::Preparation {
        let preparation = self.custody.prepare(wanted);
        if preparation.reset {
            self.statements.clear();
            self.notifications.clear();
        }
        preparation
    }

    /// Forgets what a session left here, once a reset has cleared it on
    /// the server: settings, prepared statements, sequence state, and the
    /// identity it carried.
    pub fn forget_state(&mut self) {
        self.custody.forget();
        self.statements.clear();
        self.notifications.clear();
    }

    /// Marks the connection as unfit for reuse; the pool will discard it.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// False once an I/O error was seen, the connection was marked broken,
    /// or the backend sent anything (or closed) while the connection sat
    /// idle: an idle server connection has nothing to say unless it is
    /// going away.
    pub fn is_healthy(&mut self) -> bool {
        if self.broken || !self.rbuf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        // With TLS this reads the raw socket: anything there (an alert, a
        // record) means the connection is going away, and it is discarded.
        let tcp = match &self.stream {
            BackendStream::Plain(s) => s,
            BackendStream::Tls(s) => s.get_ref().0,
        };
        match tcp.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            _ => {
                self.broken = true;
                false
            }
        }
    }

    /// Sends `Terminate` and closes, ignoring errors: used for connections
    /// that are done, so there is nobody to report a failure to.
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        messages::terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }
}

/// A backend byte stream, with or without TLS.
type BackendStream = crate::tls::MaybeTls<TlsStream<TcpStream>>;

/// Where each of a new backend's settings came from. It names no operator
/// (the sources are compared by the gateway): the login's own settings may
/// be what put someone's operators first.
const SETTING_SOURCES_SQL: &str =
    "SELECT g.name, g.source FROM pg_catalog.pg_show_all_settings() g";

/// A new connection's facts: the backend's start time as [`parse_started`]
/// expects it, and how many settings of its own the login has here in the
/// catalog (custom settings do not show in `pg_show_all_settings()`). Run
/// with only `pg_catalog` searched (inside a transaction, so the session's
/// own search path is untouched), so no operator or function of the
/// database's can stand in for the built-ins.
const NEW_CONNECTION_SQL: &str = "BEGIN; SET LOCAL search_path = pg_catalog, pg_temp; \
     SELECT EXTRACT(epoch FROM a.backend_start), \
        (SELECT count(*) FROM pg_catalog.pg_db_role_setting s \
          WHERE s.setrole = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = SESSION_USER) \
            AND s.setdatabase IN (0, (SELECT d.oid FROM pg_catalog.pg_database d \
                                       WHERE d.datname = pg_catalog.current_database()))) \
     FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a; COMMIT";

/// `1764520000.123456` (seconds, up to 6 decimals) as microseconds.
pub fn parse_started(text: &str) -> Option<i64> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let frac: i64 = format!("{frac:0<6}").parse().ok()?;
    secs.checked_mul(1_000_000)?.checked_add(frac)
}

#[cfg(test)]
mod start_time_tests {
    use super::*;

    #[test]
    fn backend_start_times_parse_to_microseconds() {
        assert_eq!(
            parse_started("1764520000.123456"),
            Some(1_764_520_000_123_456)
        );
        assert_eq!(parse_started("1764520000.1"), Some(1_764_520_000_100_000));
        assert_eq!(parse_started("1764520000"), Some(1_764_520_000_000_000));
        assert_eq!(parse_started("1764520000.1234567"), None);
        assert_eq!(parse_started("x"), None);
    }
}
