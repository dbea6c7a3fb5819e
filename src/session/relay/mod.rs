//! The query phase of one client: relays frames between the client and a
//! server connection bound for the duration of a transaction (or of the
//! session), decoding only what identity, audit and transaction tracking
//! need.
//!
//! Invariants:
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
mod function_call;
mod gone;
mod queries;
mod recording;
mod refusals;
mod server;
mod timeouts;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::cancel::{BackendKey, CancelSlot};
use super::carried::Carried;
use super::clock::Clock;
use super::outcome::Portal;
use super::prepared;
use super::refusal::Refusal;
use super::results::Results;
use super::sequencer::{ClientStep, Code, Flow, Sequencer, ServerStep};
use super::state::Effect;
use super::tracker::{CacheEffects, Outcome, Pending, Route};
use super::{Identity, Shared};
use crate::audit::{Event, Kind, Link, Status};
use crate::backend::statements;
use crate::client::{ClientConn, ClientError};
use crate::config::{OnFailure, PoolMode, VerifyMode};
use crate::identity::assert::{Assertion, Verdict};
use crate::pool::{self, PooledConn};
use crate::protocol::frame::{FrameHeader, ProtocolError};
use crate::protocol::messages::{self, PgError};
use crate::protocol::sqlstate;
use crate::session::commits::Commits;
use recording::Ahead;

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

/// The state of one client's query phase.
pub struct QueryLoop<'a> {
    shared: &'a Shared,
    ident: &'a Identity,
    mode: PoolMode,
    auditing: bool,
    client: ClientConn,
    server: Option<PooledConn>,
    /// The pool this session's connections come from, once known.
    pool: Option<pool::PoolRef>,
    cancel: Arc<CancelSlot>,
    /// The protocol state: what the server owes, the transaction status,
    /// the bytes to write each way, when the connection may go.
    seq: Sequencer,
    /// The settings the client carries to every server connection.
    carried: Carried,
    /// `verify = "transaction"` and client messages ran since the last check.
    needs_verify: bool,
    /// The session's timers.
    clock: Clock,
    /// (transactions, statements) not yet added to the shared metrics.
    counts: (u64, u64),
    /// The first `Execute` of a batch, audited before the batch took a
    /// server connection ([`QueryLoop::audit_ahead`]): taken by that
    /// `Execute`, or settled at `Sync` (or session end) if it never ran.
    pre_audited: Option<Ahead>,
    /// The `result` records on their way to the audit log.
    results: Results,
    shutdown: watch::Receiver<bool>,
    shutting_down: bool,
    /// The client is gone (or is being sent away): nothing more is relayed
    /// to it while the gateway finishes its server work.
    client_gone: bool,
    /// The process id the client knows its session by (gateway-made).
    client_pid: i32,
    /// The session's span (peer, id, user, role, database): every log line
    /// names it as its parent, so the span need not be entered on each poll.
    span: tracing::Span,
}

enum Wake {
    Client(Result<usize, ClientError>),
    Server(Result<usize, crate::backend::conn::BackendError>),
    Shutdown,
    Timer,
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
        QueryLoop {
            shared,
            ident,
            mode: shared.config.pool.mode,
            auditing: shared.auditor.enabled(),
            client,
            server: None,
            pool: None,
            cancel,
            seq: Sequencer::default().with_code(Code::new(
                !crate::session::opaque::settings_transparent(&ident.settings),
            )),
            needs_verify: false,
            clock: Clock::new(Instant::now()),
            counts: (0, 0),
            carried: Carried::new(
                &ident.client_user,
                ident.settings.clone(),
                ident.application_name.clone(),
            ),
            pre_audited: None,
            results: Results::default(),
            shutdown,
            shutting_down: false,
            client_gone: false,
            client_pid,
            span: tracing::Span::none(),
        }
    }

    /// The session's span, named as the parent of every log line.
    pub fn in_span(mut self, span: tracing::Span) -> Self {
        self.span = span;
        self
    }

    /// True when no transaction or message exchange is in progress, so the
    /// session may be ended (shutdown) without losing work.
    fn idle(&self) -> bool {
        self.seq.idle()
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
        let (tx, st) = std::mem::take(&mut self.counts);
        self.shared
            .metrics
            .add_user_counts(&self.ident.client_user, tx, st);
    }

    async fn relay(&mut self) -> End {
        loop {
            self.shutting_down |= *self.shutdown.borrow();
            if self.shutting_down && self.idle() {
                return End::Fatal(Refusal::Shutdown);
            }
            let idle = self.idle();
            let timer = self.next_timeout();
            let deadline = timer
                .as_ref()
                .map(|(_, at)| tokio::time::Instant::from_std(*at));
            let wake = {
                let client = &mut self.client;
                let server = &mut self.server;
                let shutdown = &mut self.shutdown;
                tokio::select! {
                    r = async { server.as_mut().expect("guarded").fill().await }, if server.is_some() => Wake::Server(r),
                    r = client.fill(), if !self.seq.deferred() => Wake::Client(r),
                    r = shutdown.changed(), if idle && !self.shutting_down => {
                        if r.is_err() { self.shutting_down = true; }
                        Wake::Shutdown
                    }
                    _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => Wake::Timer,
                }
            };
            if matches!(wake, Wake::Client(Ok(n)) if n > 0) {
                self.clock.client_moved(Instant::now());
            }
            let step = match wake {
                Wake::Client(Ok(0)) => Err(End::ClientGone),
                Wake::Client(Ok(_)) => self.on_client_data().await,
                Wake::Client(Err(e)) => Err(e.into()),
                Wake::Server(Ok(_)) => self.on_server_data().await,
                Wake::Server(Err(e)) => Err(self.server_lost(&e.to_string()).await),
                Wake::Shutdown => Ok(()),
                Wake::Timer => match timer {
                    Some((which, _)) => self.on_timeout(which).await,
                    None => Ok(()),
                },
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    // ----- client to server -------------------------------------------------

    async fn on_client_data(&mut self) -> Result<(), End> {
        self.audit_ahead().await;
        self.take_client_frames().await?;
        self.flush_client().await?;
        self.record_results().await;
        self.flush_server().await
    }

    /// Handles the client's buffered frames, up to one that must wait
    /// ([`Self::must_wait`]).
    /// Handles the client's buffered frames, up to one that must wait for
    /// the server (see `Sequencer::next_client`).
    async fn take_client_frames(&mut self) -> Result<(), End> {
        loop {
            let max = self.client.max_message_size;
            let opaque = self
                .server
                .as_ref()
                .is_some_and(|s| s.custody().is_opaque());
            let step = self.seq.next_client(&mut self.client.rbuf, max, opaque);
            match step.map_err(|e| End::Fatal(e.into()))? {
                ClientStep::Frame(frame) => self.on_client_frame(frame).await?,
                ClientStep::Idle => return Ok(()),
            }
        }
    }

    async fn on_client_frame(&mut self, frame: Bytes) -> Result<(), End> {
        let tag = frame[0];
        tracing::trace!(parent: &self.span, tag = %(tag as char), len = frame.len(), "client frame");
        if !self.seq.admit(&frame, Commits::rolls_back_first) {
            return Ok(());
        }
        if matches!(tag, b'Q' | b'E' | b'F') {
            self.counts.1 += 1;
        }
        let result = match tag {
            b'X' => Err(End::ClientGone),
            b'Q' => self.on_query(frame).await,
            b'P' => self.on_parse(frame).await,
            b'B' => self.on_bind(frame).await,
            b'E' => self.on_execute(frame).await,
            // Ignored by the server during copy-in: nothing to await.
            b'S' if self.seq.copy_in() => {
                self.seq.pass(&frame);
                Ok(())
            }
            b'S' => {
                self.on_sync();
                Ok(())
            }
            b'D' => self.on_describe(frame).await,
            b'C' => self.on_close(frame).await,
            b'F' => self.on_function_call(frame).await,
            b'H' | b'd' | b'c' | b'f' => {
                self.seq.pass(&frame);
                Ok(())
            }
            other => Err(End::Fatal(Refusal::UnknownMessage(other))),
        };
        self.seq.emit_synthetic();
        result
    }

    async fn flush_server(&mut self) -> Result<(), End> {
        if self.seq.misrouted() {
            tracing::error!(parent: &self.span, "a message for the server was written while no connection carried the client's identity");
            self.abandon_server("internal error").await;
            return Err(End::Fatal(Refusal::Internal(
                "a message had no identity-bearing connection",
            )));
        }
        if self.seq.to_server().is_empty() {
            return Ok(());
        }
        self.clock.request_sent(Instant::now());
        let Some(server) = self.server.as_mut() else {
            self.seq.clear_to_server();
            return Ok(());
        };
        if !self.seq.owes_nothing() {
            self.cancel.set_running(true);
        }
        let written = server.write_all(self.seq.to_server()).await;
        self.seq.clear_to_server();
        if let Err(e) = written {
            return Err(self.server_lost(&e.to_string()).await);
        }
        Ok(())
    }

    async fn flush_client(&mut self) -> Result<(), End> {
        // Between whole messages only (none is being streamed through).
        if self.seq.between_server_messages() {
            if let Some(server) = self.server.as_mut() {
                for notification in server.take_notifications() {
                    self.seq.client_out().extend_from_slice(&notification);
                }
            }
        }
        let out = self.seq.client_out();
        if out.is_empty() {
            return Ok(());
        }
        if self.client_gone {
            out.clear();
            return Ok(());
        }
        let result = self.client.write_all(out).await;
        self.seq.client_out().clear();
        result.map_err(End::from)
    }
}
