//! One task per client: negotiation, login (policy lookup and auth relay),
//! then the query phase.
//!
//! Invariant: a client reaches the query phase only after PostgreSQL itself
//! accepted its credentials and a policy mapped it to a role; every way out
//! of a session (refusal, failure, disconnect) leaves an audit record.

pub mod budget;
pub mod cancel;
mod cancelling;
pub mod carried;
pub mod checks;
pub mod clock;
pub mod commits;
pub mod conn_limits;
mod console;
mod controls;
pub mod core;
pub mod kept;
pub mod latch;
pub mod ledger;
pub mod opaque;
mod outcome;
mod prepared;
pub mod refusal;
mod relay;
pub mod results;
mod sequencer;
pub mod split;
pub mod startup;
pub mod state;
mod tracker;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::audit::{Auditor, Event, Kind, Status};
use crate::auth::limits::Limits;
use crate::auth::relay::{self as auth_relay, Outcome as AuthOutcome, RelayError};
use crate::client::{ClientConn, ClientError};
use crate::config::Config;
use crate::identity::guard::Guard;
use crate::identity::policy::Policy;
use crate::pool::Pools;
use crate::protocol::messages;
use crate::protocol::startup::StartupMessage;
use cancel::CancelRegistry;
pub(crate) use cancelling::cancel_backend;
use refusal::{Refusal, StartupRefusal};
use relay::{End, QueryLoop};
use startup::FirstPacket;

pub use controls::Live;

/// Everything sessions share.
pub struct Shared {
    pub config: Arc<Config>,
    pub policy: RwLock<Arc<Policy>>,
    pub pools: Pools,
    /// The databases' client-tag signing keys.
    pub tags: crate::identity::tag::TagKeys,
    pub auditor: Auditor,
    pub guard: Guard,
    pub cancels: CancelRegistry,
    pub tls: Option<TlsAcceptor>,
    /// TLS towards PostgreSQL (`[backend] tls`), for the auth relay.
    pub backend_tls: Option<crate::tls::BackendTls>,
    /// One permit per client served (`max_client_connections`).
    pub client_slots: Arc<tokio::sync::Semaphore>,
    /// One permit per login being relayed (`max_auth_connections`).
    pub auth_slots: Arc<tokio::sync::Semaphore>,
    /// The memory large client messages may hold at once
    /// (`large_message_memory`).
    pub message_budget: budget::MessageBudget,
    /// Sessions open per client user and database, for PostgreSQL's
    /// connection limits.
    pub conn_counts: Arc<conn_limits::Counts>,
    pub metrics: crate::metrics::Metrics,
    /// Reloadable settings (SIGHUP); `config` keeps the ones that need a restart.
    pub live: RwLock<Arc<Live>>,
    /// The audit shipper's progress, when `[audit.ship]` is set.
    pub ship: Option<Arc<crate::audit::ship::ShipStatus>>,
    /// Where audit checkpoints are anchored, when configured.
    pub anchor: Option<crate::audit::anchor::Target>,
    /// Shutting down: no new clients (`/readyz` fails).
    pub draining: std::sync::atomic::AtomicBool,
    /// TLS towards the `[[peers]]` that ask for it, by peer id.
    pub peer_tls: std::collections::HashMap<u8, crate::tls::ClientTls>,
    /// The configuration file, when started from one (console RELOAD).
    pub config_path: std::sync::OnceLock<std::path::PathBuf>,
    /// Cancels being sent on to peers at once: a peer that does not answer
    /// cannot make the gateway hold connections without bound.
    pub peer_forwards: Arc<tokio::sync::Semaphore>,
    /// Console PAUSE: no new transaction gets a server connection.
    pub paused: tokio::sync::watch::Sender<bool>,
    /// Console SHUTDOWN: the accept loop drains and stops, as on SIGTERM.
    pub shutdown: latch::Latch,
}

impl Shared {
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What a metrics scrape reads besides the counters.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot {
            audit: self.auditor.counters(),
            audit_queue_depth: self.auditor.queue_depth() as u64,
            large_messages: {
                let budget = &self.message_budget;
                let load =
                    |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
                (load(&budget.held), load(&budget.waits))
            },
            ship: self.ship.as_ref().map(|s| {
                (
                    s.lag_records.load(std::sync::atomic::Ordering::Relaxed),
                    s.lag_seconds() as u64,
                    s.truncated.load(std::sync::atomic::Ordering::Relaxed),
                )
            }),
            pools: {
                // Summed over a database's pools (one per login).
                let mut per_db = std::collections::BTreeMap::<String, (u64, u64)>::new();
                for ((db, _), st) in self.pools.status() {
                    let entry = per_db.entry(db).or_default();
                    entry.0 += st.available as u64;
                    entry.1 += st.size as u64;
                }
                per_db
                    .into_iter()
                    .map(|(db, (idle, total))| (db, idle, total))
                    .collect()
            },
            backend: {
                let primary = &self.config.backend.primary;
                let state = primary.state();
                let hosts = primary.hosts().iter().enumerate();
                let hosts = hosts.map(|(i, h)| (h.to_string(), state.current == Some(i)));
                (hosts.collect(), state.failovers)
            },
        }
    }

    /// The reloadable settings in force.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Who a logged-in client is: what every audit record of the session carries.
#[derive(Debug, Clone)]
pub struct Identity {
    // Shared (`Arc`) so that each audit event takes them without copying.
    pub session_id: Arc<str>,
    pub client_user: Arc<str>,
    pub database: Arc<str>,
    pub role: Arc<str>,
    pub client_addr: Arc<str>,
    pub application_name: Option<Arc<str>>,
    /// Settings applied to every server connection that serves this client.
    pub settings: Vec<(String, String)>,
    /// The parameters the client was told of at login (`ParameterStatus`).
    pub reported: Vec<(String, String)>,
}

impl Identity {
    /// A client `user` mapped to `role`, for tests without a login.
    #[cfg(test)]
    pub(crate) fn for_tests(user: &str, role: &str) -> Identity {
        Identity {
            session_id: Arc::from("0123456789abcdef"),
            client_user: Arc::from(user),
            database: Arc::from("app"),
            role: Arc::from(role),
            client_addr: Arc::from("127.0.0.1"),
            application_name: None,
            settings: Vec::new(),
            reported: Vec::new(),
        }
    }

    /// An audit event of `kind` carrying this identity.
    pub fn event(&self, kind: Kind) -> Event {
        let mut ev = Event::new(kind);
        ev.session_id = Some(self.session_id.clone());
        ev.client_user = Some(self.client_user.clone());
        ev.role = Some(self.role.clone());
        ev.database = Some(self.database.clone());
        ev.client_addr = Some(self.client_addr.clone());
        ev.application_name = self.application_name.clone();
        ev
    }
}

fn new_session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Serves one accepted connection to the end, with a `session` span that
/// carries the peer and, once logged in, the session id, client user, role
/// and database: every log line of the session names it as its parent
/// (cheaper than entering it on every poll).
pub async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "session",
        %peer,
        id = Empty,
        user = Empty,
        role = Empty,
        database = Empty
    );
    // Entered while logging in (a short phase); the query phase names it
    // as the parent of its log lines instead of entering it on every poll.
    serve_in_span(shared, tcp, peer, shutdown, span).await
}

async fn serve_in_span(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    span: tracing::Span,
) {
    let _ = tcp.set_nodelay(true);
    let login_timeout = Duration::from_millis(shared.config.server.login_timeout_ms);
    let max = shared.config.server.max_message_size;
    let login = async {
        match startup::negotiate(tcp, shared.tls.as_ref(), max).await? {
            FirstPacket::Gone => Ok(None),
            FirstPacket::Cancel {
                pid,
                secret,
                forwarded,
                client,
            } => {
                // Served even when every client slot is taken, and without
                // one. The requester learns the cancel was dealt with when
                // its connection closes (as PostgreSQL's postmaster does):
                // after it reached PostgreSQL for one of ours; at once for
                // a peer's, so a slow peer holds nothing of the requester's.
                let mut client = Some(client);
                if cancelling::is_for_peer(&shared, pid) {
                    drop(client.take());
                }
                cancelling::on_cancel(&shared, pid, secret, forwarded, peer).await;
                drop(client);
                Ok(None)
            }
            FirstPacket::Startup(mut client, startup) => {
                // Held for the whole session.
                let Ok(slot) = shared.client_slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "max_client_connections reached; client refused");
                    refuse_login(&mut client, Refusal::TooManyClients).await;
                    return Ok(None);
                };
                let admitted = login(&shared, client, startup, peer).await?;
                Ok::<_, ClientError>(admitted.map(|admitted| (admitted, slot)))
            }
        }
    };
    let logged_in = match tokio::time::timeout(login_timeout, login).await {
        Err(_) => {
            tracing::debug!(%peer, "login timed out");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, "connection ended during login: {e}");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some((Admitted::Console(client, ident), _slot)))) => {
            tracing::info!(parent: &span, user = %ident.client_user, "admin console opened");
            console::serve(&shared, &ident, client, shutdown).await;
            let mut ev = ident.event(Kind::SessionEnd);
            ev.message = Some("admin console closed".into());
            shared.auditor.append_nowait(ev).await;
            return;
        }
        Ok(Ok(Some((Admitted::Client(s), slot)))) => (s, slot),
    };
    let ((client, ident, key, _seat), _client_slot) = logged_in;
    let (pid, secret, slot) = key;
    span.record("id", &*ident.session_id)
        .record("user", &*ident.client_user)
        .record("role", &*ident.role)
        .record("database", &*ident.database);
    tracing::info!(parent: &span, "session started");
    crate::metrics::Metrics::inc(&shared.metrics.clients);
    let end = QueryLoop::new(&shared, &ident, client, (pid, slot), shutdown)
        .in_span(span.clone())
        .run()
        .await;
    shared.cancels.unregister(pid, secret);
    crate::metrics::Metrics::dec(&shared.metrics.clients);
    let mut ev = ident.event(Kind::SessionEnd);
    match &end {
        End::Fatal(refusal) => {
            let e = refusal.to_wire();
            ev.status = Some(Status::Error);
            ev.sqlstate = Some(e.code.code().to_string());
            ev.message = Some(e.message);
        }
        End::ClientGone => ev.message = Some("the client disconnected".into()),
    }
    shared.auditor.append_nowait(ev).await;
    tracing::info!(parent: &span, "session ended: {end:?}");
}

/// A client let in: its connection, who it is, its cancel key, and its
/// place under PostgreSQL's connection limits (held for the session).
type LoggedIn = (
    ClientConn,
    Identity,
    (i32, i32, Arc<cancel::CancelSlot>),
    conn_limits::Seat,
);

/// Most cancels sent on to peers at once; more are dropped (logged).
pub const PEER_FORWARDS: usize = 64;

/// Who was let in: a client of the databases, or an admin of the console.
enum Admitted {
    Client(LoggedIn),
    Console(ClientConn, Identity),
}

async fn login(
    shared: &Shared,
    mut client: ClientConn,
    startup: StartupMessage,
    peer: SocketAddr,
) -> Result<Option<Admitted>, ClientError> {
    let mut ident = Identity {
        session_id: new_session_id().into(),
        client_user: "".into(),
        database: "".into(),
        role: "".into(),
        client_addr: peer.to_string().into(),
        application_name: startup.get("application_name").map(Arc::from),
        settings: Vec::new(),
        reported: Vec::new(),
    };
    if let Err(e) = check_startup(&startup) {
        refuse_login(&mut client, Refusal::Startup(e)).await;
        return Ok(None);
    }
    ident.client_user = as_postgres_names(startup.get("user").unwrap_or_default()).into();
    ident.database = match startup.get("database") {
        Some(db) if !db.is_empty() => as_postgres_names(db).into(),
        _ => ident.client_user.clone(),
    };
    // The console exists only where admins are named: elsewhere a real
    // database may be called that.
    if &*ident.database == console::DATABASE && !shared.live().admin_users.is_empty() {
        let admitted = console::login(shared, client, &startup, &mut ident).await?;
        return Ok(admitted.map(|client| Admitted::Console(client, ident)));
    }
    let Some(role) = shared.policy().resolve(&ident.client_user, &ident.database) else {
        refuse_unmapped(shared, &ident, &mut client).await;
        return Ok(None);
    };
    ident.role = role.into();
    ident.settings = state::startup_settings(
        &startup.params,
        &ident.client_user,
        &shared.config.identity.client_user_setting,
    );
    let Some((mut greeting, limits)) = relay_login(shared, &mut client, &startup, &ident).await?
    else {
        return Ok(None);
    };
    let seat = match shared
        .conn_counts
        .admit(&ident.client_user, &ident.database, limits)
    {
        Ok(seat) => seat,
        Err(over) => {
            let refusal = Refusal::ConnectionLimit(
                over,
                ident.client_user.to_string(),
                ident.database.to_string(),
            );
            refuse_denied(shared, &ident, &mut client, refusal).await;
            return Ok(None);
        }
    };
    ident.reported = messages::parameter_statuses(&greeting);
    let (pid, secret, slot) = shared.cancels.register(ident.event(Kind::Cancel));
    messages::backend_key_data(&mut greeting, pid, secret);
    messages::ready_for_query(&mut greeting, b'I');
    if let Err(e) = client.write_all(&greeting).await {
        shared.cancels.unregister(pid, secret);
        return Err(e);
    }
    // Which policy mapped the client: gateways behind one load balancer
    // can be shown to apply the same one.
    let mut start = ident.event(Kind::SessionStart);
    start.message = Some(format!("policy {}", shared.policy().digest()));
    shared.auditor.append_nowait(start).await;
    Ok(Some(Admitted::Client((
        client,
        ident,
        (pid, secret, slot),
        seat,
    ))))
}

/// No policy rule maps this client: FATAL 28000, recorded as `denied`.
async fn refuse_unmapped(shared: &Shared, ident: &Identity, client: &mut ClientConn) {
    let refusal = Refusal::Unmapped {
        user: ident.client_user.to_string(),
        database: ident.database.to_string(),
    };
    crate::metrics::Metrics::inc(&shared.metrics.denied);
    refuse_denied(shared, ident, client, refusal).await;
}

/// A login the gateway itself turns away: recorded as `denied` (with the
/// role, if one was settled), then refused on the wire.
async fn refuse_denied(
    shared: &Shared,
    ident: &Identity,
    client: &mut ClientConn,
    refusal: Refusal,
) {
    let error = refusal.to_wire();
    let mut ev = ident.event(Kind::Denied);
    ev.role = Some(ident.role.clone()).filter(|role| !role.is_empty());
    ev.status = Some(Status::Error);
    ev.sqlstate = Some(error.code.code().into());
    ev.message = Some(error.message.clone());
    shared.auditor.append_nowait(ev).await;
    refuse_login(client, refusal).await;
}

/// The one place a login is refused on the wire.
async fn refuse_login(client: &mut ClientConn, refusal: Refusal) {
    client.send_error(&refusal.to_wire()).await;
}

/// Relays `startup`'s login to PostgreSQL (one of `max_auth_connections`
/// at a time): the greeting to send on (authentication ok, the server's
/// parameters) and the connection limits PostgreSQL states for the client
/// when it succeeded, `None` when it did not (recorded and told to the
/// client by [`authenticated`]).
async fn relay_login(
    shared: &Shared,
    client: &mut ClientConn,
    startup: &StartupMessage,
    ident: &Identity,
) -> Result<Option<(BytesMut, Limits)>, ClientError> {
    // Closed only when the gateway stops; then the login cannot proceed.
    let Ok(slot) = shared.auth_slots.clone().acquire_owned().await else {
        return Ok(None);
    };
    let mut greeting = BytesMut::new();
    let relayed = auth_relay::relay(
        client,
        startup,
        &shared.config.backend,
        shared.backend_tls.as_ref(),
        &mut greeting,
        slot,
    )
    .await;
    let limits = authenticated(shared, ident, client, relayed).await?;
    Ok(limits.map(|limits| (greeting, limits)))
}

/// The connection limits of a relayed login that succeeded, `None` when
/// it did not: a refusal is recorded as
/// `auth_failed` (PostgreSQL's error already reached the client), a
/// gateway failure is sent to the client.
async fn authenticated(
    shared: &Shared,
    ident: &Identity,
    client: &mut ClientConn,
    relayed: Result<AuthOutcome, RelayError>,
) -> Result<Option<Limits>, ClientError> {
    match relayed {
        Ok(AuthOutcome::Authenticated(limits)) => Ok(Some(limits)),
        Ok(AuthOutcome::ClientGone) => {
            tracing::debug!(user = %ident.client_user, "client hung up during authentication");
            Ok(None)
        }
        Ok(AuthOutcome::Refused(fields)) => {
            crate::metrics::Metrics::inc(&shared.metrics.auth_failures);
            let mut ev = ident.event(Kind::AuthFailed);
            ev.status = Some(Status::Error);
            ev.sqlstate = Some(fields.code);
            ev.message = Some(fields.message);
            shared.auditor.append_nowait(ev).await;
            Ok(None)
        }
        Err(RelayError::Gateway(e)) => {
            tracing::warn!(user = %ident.client_user, "authentication relay failed: {e:?}");
            refuse_login(client, Refusal::Relay(e)).await;
            Ok(None)
        }
        Err(RelayError::Client(ClientError::Protocol(e))) => {
            refuse_login(client, Refusal::Protocol(e)).await;
            Ok(None)
        }
        Err(RelayError::Client(e)) => Err(e),
    }
}

/// PostgreSQL keeps the first 63 bytes of a user or database name (it
/// authenticates the truncated name): the gateway maps and records the
/// same one. [`check_startup`] refused names cut inside a character.
fn as_postgres_names(name: &str) -> &str {
    if name.len() > MAX_NAME {
        &name[..MAX_NAME]
    } else {
        name
    }
}

/// PostgreSQL's `NAMEDATALEN` - 1.
const MAX_NAME: usize = 63;

/// Refuses startup packets the gateway cannot serve, before any backend work.
///
/// A parameter given twice is refused: PostgreSQL takes the last `user`
/// and `database`, so a gateway reading the first would authenticate one
/// user and map another.
fn check_startup(startup: &StartupMessage) -> Result<(), StartupRefusal> {
    for (i, (key, _)) in startup.params.iter().enumerate() {
        if startup.params[..i].iter().any(|(k, _)| k == key) {
            return Err(StartupRefusal::Repeated(key.clone()));
        }
    }
    for key in ["user", "database"] {
        let value = startup.get(key).unwrap_or_default();
        if value.len() > MAX_NAME && !value.is_char_boundary(MAX_NAME) {
            return Err(StartupRefusal::CutName(key));
        }
    }
    if startup.get("user").is_none_or(str::is_empty) {
        return Err(StartupRefusal::NoUser);
    }
    if let Some(r) = startup.get("replication") {
        if !matches!(
            r.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        ) {
            return Err(StartupRefusal::Replication);
        }
    }
    Ok(())
}
