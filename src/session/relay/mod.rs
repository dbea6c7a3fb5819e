//! The query phase of one client: the driver of the session's core
//! (`session::core`). It reads the client's and the server's sockets, hands
//! what arrives to the core, and performs what the core answers: the audit
//! store, the pool and the identity assertion for a client message's plan,
//! then the writes; the retag, the identity check and the release once the
//! server's answers are read; the timeouts.
//!
//! Invariants (the order is the core's; the driver keeps it):
//! - a server connection is bound (and the identity assertion has succeeded
//!   on it) before any client message is forwarded to it;
//! - it is released only when every forwarded `Query`/`Sync` has had its
//!   `ReadyForQuery`, the last one said `I`, and nothing unsynced is in flight;
//! - a statement's `query` audit record is stored before the statement is
//!   forwarded;
//! - a statement the gateway refuses while a transaction is open is replaced
//!   by one that fails on the server, so the server's transaction state and
//!   the order of responses stay exactly what PostgreSQL would produce.

mod binding;
mod confirm;
mod gone;
mod lost;
mod run;
mod server;
mod timeouts;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::budget::{self, Grant, Need};
use super::cancel::{BackendKey, CancelSlot};
use super::checks::Rules;
use super::core::{Core, Step};
use super::refusal::Refusal;
use super::sequencer::{ClientStep, Flow, ServerStep};
use super::tracker::{Outcome, Pending};
use super::{Identity, Shared};
use crate::audit::{Kind, Link, Status};
use crate::client::{ClientConn, ClientError};
use crate::config::{OnFailure, PoolMode, VerifyMode};
use crate::identity::assert::{Assertion, Verdict};
use crate::pool::{self, PooledConn};
use crate::protocol::frame::ProtocolError;
use crate::protocol::messages::{self, PgError};
use crate::protocol::sqlstate;

/// Why the query phase ended.
#[derive(Debug)]
pub enum End {
    /// The client sent `Terminate` or hung up.
    ClientGone,
    /// The gateway closes the session with this FATAL error.
    Fatal(Refusal),
}

impl From<ProtocolError> for End {
    fn from(e: ProtocolError) -> End {
        End::Fatal(Refusal::Protocol(e))
    }
}

impl From<ClientError> for End {
    fn from(e: ClientError) -> End {
        match e {
            ClientError::Io(_) => End::ClientGone,
            ClientError::Protocol(p) => End::Fatal(Refusal::Protocol(p)),
        }
    }
}

/// The driver of one client's query phase: its sockets, its server
/// connection and the services it calls; everything else is the core's.
pub struct QueryLoop<'a> {
    shared: &'a Shared,
    ident: &'a Identity,
    mode: PoolMode,
    client: ClientConn,
    server: Option<PooledConn>,
    /// The pool this session's connections come from, once known.
    pool: Option<pool::PoolRef>,
    cancel: Arc<CancelSlot>,
    /// What the session knows and decides, without I/O.
    core: Core<'a>,
    shutdown: watch::Receiver<bool>,
    shutting_down: bool,
    /// The client is gone (or is being sent away): nothing more is relayed
    /// to it while the gateway finishes its server work.
    client_gone: bool,
    /// The session's span (peer, id, user, role, database): every log line
    /// names it as its parent, so the span need not be entered on each poll.
    span: tracing::Span,
    /// The identity assertion sent ahead of the client's first message of
    /// the transaction, until its answers are read (`confirm`).
    confirming: Option<confirm::Confirming>,
    /// The client's messages up to a `Sync` went behind an unconfirmed
    /// assertion: no more are taken until it is confirmed.
    hold_client: bool,
    /// The hold ended: the client's buffered messages are taken again.
    resume_client: bool,
    /// A lost server connection left the client in an aborted transaction
    /// block (`lost`).
    lost_block: Option<lost::LostBlock>,
    /// This session's figures for `SHOW STATS`, added to its database's in
    /// batches; when the request being answered went out, and when the
    /// bound connection was bound.
    stats: crate::metrics::DbStats,
    request_at: Option<Instant>,
    bound_at: Option<Instant>,
    /// The share of `large_message_memory` held for the large message
    /// being read or handled (`session::budget`).
    grant: Option<Grant<'a>>,
    /// How long a write to the client may wait for it to read
    /// ([`write_limit`]).
    write_limit: Option<Duration>,
}

/// A client that takes nothing of what it is sent for
/// `client_write_timeout_ms` is ended: the gateway's write waits, and the
/// server's with it, so no timeout or cancel could act.
fn write_limit(live: &super::Live) -> Option<Duration> {
    (live.client_write_timeout_ms > 0).then(|| Duration::from_millis(live.client_write_timeout_ms))
}

enum Wake<'a> {
    Client(Result<usize, ClientError>),
    Server(Result<usize, crate::backend::conn::BackendError>),
    Shutdown,
    Timer,
    /// An admin ended the session (console KILL).
    Killed,
    /// The large message being read may be read on.
    Granted(Grant<'a>),
}

impl<'a> QueryLoop<'a> {
    /// `client_pid`: the process id the gateway gave the client in its
    /// `BackendKeyData`.
    pub fn new(
        shared: &'a Shared,
        ident: &'a Identity,
        client: ClientConn,
        (client_pid, cancel): (i32, Arc<CancelSlot>),
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let rules = Rules {
            guard: &shared.guard,
            mode: shared.config.pool.mode,
            session_set: shared.config.pool.session_set,
        };
        let mut core = Core::new(
            ident,
            rules,
            shared.auditor.enabled(),
            (client.max_message_size, client_pid),
        );
        core.max_value_bytes = shared.config.audit.max_value_bytes;
        core.prepared_statement_memory = shared.config.server.prepared_statement_memory;
        QueryLoop {
            shared,
            ident,
            mode: shared.config.pool.mode,
            client,
            server: None,
            pool: None,
            cancel,
            core,
            shutdown,
            shutting_down: false,
            client_gone: false,
            span: tracing::Span::none(),
            confirming: None,
            hold_client: false,
            resume_client: false,
            lost_block: None,
            stats: Default::default(),
            request_at: None,
            bound_at: None,
            grant: None,
            write_limit: write_limit(&shared.live()),
        }
    }

    /// The session's span, named as the parent of every log line.
    pub fn in_span(mut self, span: tracing::Span) -> Self {
        self.core = self.core.in_span(span.clone());
        self.span = span;
        self
    }

    /// True when no transaction or message exchange is in progress, so the
    /// session may be ended (shutdown) without losing work.
    fn idle(&self) -> bool {
        self.core.seq.idle() && self.confirming.is_none()
    }

    /// Whether the client's bytes are read now (not while its messages
    /// wait for the server, or behind an identity assertion).
    fn reading(&self) -> bool {
        !self.core.seq.deferred() && !self.hold_client
    }

    /// Runs until the client leaves or the session must end.
    pub async fn run(mut self) -> End {
        let end = self.relay().await;
        self.finish(&end).await;
        // Results still held belong to a transaction whose outcome pgwarden
        // did not learn.
        self.abandon_ledger().await;
        self.flush_counts();
        end
    }

    fn flush_counts(&mut self) {
        let (tx, st) = std::mem::take(&mut self.core.counts);
        self.shared
            .metrics
            .add_user_counts(&self.ident.client_user, tx, st);
        let mut stats = std::mem::take(&mut self.stats);
        stats.xacts = tx;
        self.shared
            .metrics
            .add_db_stats(&self.ident.database, &stats);
    }

    async fn relay(&mut self) -> End {
        loop {
            self.shutting_down |= *self.shutdown.borrow();
            if self.shutting_down && self.idle() {
                return End::Fatal(Refusal::Shutdown);
            }
            let idle = self.idle();
            let reading = self.reading();
            let needs_grant = self.grant_needed();
            let timer = self.next_timeout();
            let deadline = timer
                .as_ref()
                .map(|(_, at)| tokio::time::Instant::from_std(*at));
            let wake = {
                let client = &mut self.client;
                let server = &mut self.server;
                let shutdown = &mut self.shutdown;
                let cancel = &self.cancel;
                let budget = &self.shared.message_budget;
                let user = &self.ident.client_user;
                tokio::select! {
                    _ = cancel.killed() => Wake::Killed,
                    r = async { server.as_mut().expect("guarded").fill().await }, if server.is_some() => Wake::Server(r),
                    // A large message is read on only with its grant.
                    w = async {
                        match needs_grant {
                            None => Wake::Client(client.fill().await),
                            Some(bytes) => Wake::Granted(budget.grant(user, bytes).await),
                        }
                    }, if reading => w,
                    r = shutdown.changed(), if idle && !self.shutting_down => {
                        if r.is_err() { self.shutting_down = true; }
                        Wake::Shutdown
                    }
                    _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => Wake::Timer,
                }
            };
            if let Wake::Client(Ok(n)) = wake {
                self.stats.received += n as u64;
            }
            let step = match wake {
                Wake::Client(Ok(0)) => Err(End::ClientGone),
                Wake::Client(Ok(_)) => self.on_client_data().await,
                Wake::Client(Err(e)) => Err(e.into()),
                Wake::Server(Ok(_)) => self.on_server_data().await,
                Wake::Server(Err(e)) => self.server_gone(&e.to_string()).await,
                Wake::Shutdown => Ok(()),
                Wake::Granted(grant) => {
                    self.grant = Some(grant);
                    Ok(())
                }
                // Ended by an admin, as pg_terminate_backend ends one.
                Wake::Killed => Err(End::Fatal(Refusal::Shutdown)),
                Wake::Timer => match timer {
                    Some((which, _)) => self.on_timeout(which).await,
                    None => Ok(()),
                },
            };
            if let Err(end) = step {
                return end;
            }
            // Client messages held behind an identity assertion (or a lost
            // connection's answer) are taken now.
            if std::mem::take(&mut self.resume_client) && !self.core.seq.deferred() {
                if let Err(end) = self.on_client_data().await {
                    return end;
                }
            }
        }
    }

    // ----- client to server -------------------------------------------------

    /// The grant the message at the front of the client's buffer needs
    /// before more of it is read, if it has none (`session::budget`). When
    /// no large message is being read or waits, the grant is given back,
    /// with the memory the buffers grew to for it.
    fn grant_needed(&mut self) -> Option<usize> {
        if self.grant.is_none() && self.client.rbuf.len() < 5 {
            // Mostly so: no message started, nothing held.
            return None;
        }
        let raw = self.core.seq.raw_from_client();
        let max = self.client.max_message_size;
        match budget::need(&self.client.rbuf, max, raw, self.grant.as_ref()) {
            Need::Keep => None,
            Need::Grant(bytes) => {
                // Nothing is held while waiting for more.
                self.grant = None;
                Some(bytes)
            }
            Need::Release => {
                if self.grant.take().is_some() {
                    budget::renew(&mut self.client.rbuf);
                    self.core.seq.shrink_buffers();
                }
                None
            }
        }
    }

    async fn on_client_data(&mut self) -> Result<(), End> {
        // Reloadable (SIGHUP): read once per read from the client.
        let live = self.shared.live();
        self.core.log_parameters = live.log_parameters;
        self.write_limit = write_limit(&live);
        self.audit_ahead().await;
        let taken = self.core.seq.client_messages();
        self.take_client_frames().await?;
        // Only whole messages are the client moving: a message trickled a
        // byte at a time holds nothing past the idle timeouts.
        if self.core.seq.client_messages() != taken {
            self.core.clock.client_moved(Instant::now());
        }
        self.flush_client().await?;
        self.record_results().await;
        self.flush_server().await
    }

    /// Handles the client's buffered frames, up to one that must wait for
    /// the server (see `Sequencer::next_client`).
    async fn take_client_frames(&mut self) -> Result<(), End> {
        loop {
            let max = self.client.max_message_size;
            let opaque = self
                .server
                .as_ref()
                .is_some_and(|s| s.custody().is_opaque());
            let step = self
                .core
                .seq
                .next_client(&mut self.client.rbuf, max, opaque);
            match step.map_err(|e| End::Fatal(e.into()))? {
                ClientStep::Frame(frame) => {
                    let tag = frame[0];
                    // Most messages need no waiting (no record to store, no
                    // connection to bind) and are taken without starting the
                    // future that may wait, which is large (it may store
                    // records and bind) and copied at each start.
                    if let Some(step) = self.on_client_frame(frame)? {
                        let result = self.perform(step).await;
                        self.core.seq.emit_synthetic();
                        result?;
                    }
                    // PostgreSQL skips what follows a failed assertion only
                    // up to a `Sync`: nothing beyond goes before it is read.
                    if self.confirming.is_some() && matches!(tag, b'S' | b'Q' | b'F') {
                        self.hold_client = true;
                        self.flush_for_confirmation();
                        return Ok(());
                    }
                }
                ClientStep::Idle => {
                    self.flush_for_confirmation();
                    return Ok(());
                }
            }
        }
    }

    /// With an assertion unconfirmed, a `Flush`: its answers come even
    /// when nothing the client sent makes PostgreSQL send what it has (and
    /// after a `Sync` or query, which do, it costs the server nothing).
    fn flush_for_confirmation(&mut self) {
        if self.confirming.is_some() {
            messages::flush(self.core.seq.wire());
        }
    }

    /// Plans a client message and performs it if that needs no waiting;
    /// otherwise returns the step for [`Self::perform`] (after which
    /// `emit_synthetic` is the caller's).
    fn on_client_frame(&mut self, frame: Bytes) -> Result<Option<Step>, End> {
        self.rollback_tells(&frame);
        let step = self
            .core
            .client_frame(frame, &self.client.rbuf)
            .map_err(End::Fatal)?;
        match self.perform_now(step) {
            Ok(()) => {
                self.core.seq.emit_synthetic();
                Ok(None)
            }
            Err(step) => Ok(Some(step)),
        }
    }

    async fn flush_server(&mut self) -> Result<(), End> {
        if self.core.seq.misrouted() {
            tracing::error!(parent: &self.span, "a message for the server was written while no connection carried the client's identity");
            self.abandon_server("internal error").await;
            return Err(End::Fatal(Refusal::Internal(
                "a message had no identity-bearing connection",
            )));
        }
        if self.core.seq.to_server().is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        self.core.clock.request_sent(now);
        self.request_at.get_or_insert(now);
        let Some(server) = self.server.as_mut() else {
            self.core.seq.clear_to_server();
            return Ok(());
        };
        if !self.core.seq.owes_nothing() {
            self.cancel.set_running(true);
        }
        let written = server.write_all(self.core.seq.to_server()).await;
        self.core.seq.clear_to_server();
        if self.core.seq.copy_in() {
            self.core.clock.gateway_waited(now, Instant::now());
        }
        if let Err(e) = written {
            return self.server_gone(&e.to_string()).await;
        }
        Ok(())
    }

    async fn flush_client(&mut self) -> Result<(), End> {
        // Between whole messages only (none is being streamed through).
        if self.core.seq.between_server_messages() {
            if let Some(server) = self.server.as_mut() {
                for notification in server.take_notifications() {
                    self.core.seq.client_out().extend_from_slice(&notification);
                }
            }
        }
        let out = self.core.seq.client_out();
        if out.is_empty() {
            return Ok(());
        }
        if self.client_gone {
            out.clear();
            return Ok(());
        }
        self.stats.sent += out.len() as u64;
        let result = match self.write_limit {
            None => self.client.write_all(out).await,
            Some(limit) => match self.client.write_all_reading(out, limit).await {
                Some(result) => result,
                None => return Err(self.client_not_reading(limit).await),
            },
        };
        self.core.seq.client_out().clear();
        result.map_err(End::from)
    }

    /// The client took nothing of what it was sent for `limit`: while the
    /// gateway waits for it, the server waits for the gateway (PostgreSQL
    /// acts on no cancel while it cannot send), so the server connection
    /// is given up and the session ended.
    async fn client_not_reading(&mut self, limit: Duration) -> End {
        let why = format!(
            "the client took nothing of what it was sent for {} ms (client_write_timeout_ms)",
            limit.as_millis()
        );
        tracing::info!(parent: &self.span, "{why}: the session ends and its server connection is given up");
        self.core.seq.client_out().clear();
        self.client_gone = true;
        if self.server.is_some() {
            self.abandon_server(&why).await;
        }
        terminating(sqlstate::CONNECTION_FAILURE, &why)
    }
}

/// The session ends with FATAL `code`, saying `why`.
fn terminating(code: sqlstate::SqlState, why: &str) -> End {
    End::Fatal(Refusal::Answer(PgError::fatal(
        code,
        format!("terminating connection: {why}"),
    )))
}
