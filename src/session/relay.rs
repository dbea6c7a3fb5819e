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

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::cancel::{BackendKey, CancelSlot};
use super::client::{ClientConn, ClientError};
use super::prepared;
use super::state::Effect;
use super::tracker::{CacheEffects, Outcome, Pending, Resolved, Route, Tracker};
use super::{Identity, Shared};
use crate::audit::{Event, Kind, Status};
use crate::config::{OnFailure, PoolMode, VerifyMode};
use crate::identity::assert::{Assertion, Verdict};
use crate::pool::{self, statements, PooledConn};
use crate::protocol::frame::{split_frame, FrameHeader, ProtocolError};
use crate::protocol::messages::{self, PgError};
use crate::protocol::sqlstate;

/// Text sent in place of a refused statement: it fails at parse time, so the
/// server aborts exactly as it would for a refused statement of its own.
const REFUSED_SQL: &str = "pgwarden refused this statement";
/// OID of `set_config(text, text, boolean)`, reachable through `FunctionCall`.
const SET_CONFIG_OID: i32 = 2078;
/// Larger row and copy frames are streamed through instead of buffered whole.
const STREAM_THRESHOLD: usize = 64 * 1024;
const MAX_SERVER_FRAME: usize = 1 << 30;

/// Why the query phase ended.
#[derive(Debug)]
pub enum End {
    /// The client sent `Terminate` or hung up.
    ClientGone,
    /// The gateway closes the session with this FATAL error.
    Fatal(PgError),
}

impl From<ClientError> for End {
    fn from(e: ClientError) -> End {
        match e {
            ClientError::Io(_) => End::ClientGone,
            ClientError::Protocol(p) => End::Fatal(protocol_error(p)),
        }
    }
}

fn protocol_error(p: ProtocolError) -> PgError {
    PgError::fatal(sqlstate::PROTOCOL_VIOLATION, p.to_string())
}

/// Which kind of client message a refusal answers.
#[derive(Clone, Copy)]
enum Flow {
    /// `Query` or `FunctionCall`: one error, then `ReadyForQuery`.
    Simple,
    /// Extended protocol: one error, then everything up to `Sync` is skipped.
    Extended,
}

struct Portal {
    sql: Bytes,
    params: Option<Vec<Option<String>>>,
}

/// The state of one client's query phase.
pub struct QueryLoop<'a> {
    shared: &'a Shared,
    ident: &'a Identity,
    mode: PoolMode,
    auditing: bool,
    client: ClientConn,
    server: Option<PooledConn>,
    cancel: Arc<CancelSlot>,
    tracker: Tracker,
    /// Transaction status from the last `ReadyForQuery`.
    tx_status: u8,
    /// Extended-protocol messages were forwarded since the last `Sync`.
    unsynced: bool,
    /// Skipping client messages until `Sync`, as the server does after an error.
    discard_until_sync: bool,
    /// The next `Sync` is answered by the gateway (the error was local).
    local_sync: bool,
    /// The client created connection-bound objects (temp tables, LISTEN,
    /// session advisory locks...): it keeps its server connection.
    pinned: bool,
    /// The client's settings, carried to every server connection.
    settings: Arc<Vec<(String, String)>>,
    /// The client set `application_name`; the bound connection shows it
    /// without the client's name until the gateway re-applies it.
    retag_application_name: bool,
    /// `verify = "transaction"` and client messages ran since the last check.
    needs_verify: bool,
    /// The server is in copy-in (`CopyInResponse` seen, client has not sent
    /// `CopyDone`/`CopyFail` yet).
    copy_in: bool,
    client_passthrough: usize,
    server_passthrough: usize,
    to_server: BytesMut,
    to_client: BytesMut,
    /// The client's prepared statements by client name ("" = unnamed).
    statements: std::collections::HashMap<Bytes, prepared::Statement>,
    portals: std::collections::HashMap<Bytes, Portal>,
    resolved: Vec<Resolved>,
    shutdown: watch::Receiver<bool>,
    shutting_down: bool,
}

enum Wake {
    Client(Result<usize, ClientError>),
    Server(Result<usize, pool::conn::BackendError>),
    Shutdown,
}

impl<'a> QueryLoop<'a> {
    pub fn new(
        shared: &'a Shared,
        ident: &'a Identity,
        client: ClientConn,
        cancel: Arc<CancelSlot>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        QueryLoop {
            shared,
            ident,
            mode: shared.config.pool.mode,
            auditing: shared.auditor.enabled(),
            client,
            server: None,
            cancel,
            tracker: Tracker::default(),
            tx_status: b'I',
            unsynced: false,
            discard_until_sync: false,
            local_sync: false,
            copy_in: false,
            needs_verify: false,
            settings: Arc::new(ident.settings.clone()),
            pinned: false,
            retag_application_name: false,
            client_passthrough: 0,
            server_passthrough: 0,
            to_server: BytesMut::with_capacity(8 * 1024),
            to_client: BytesMut::with_capacity(16 * 1024),
            statements: Default::default(),
            portals: Default::default(),
            resolved: Vec::new(),
            shutdown,
            shutting_down: false,
        }
    }

    /// True when no transaction or message exchange is in progress, so the
    /// session may be ended (shutdown) without losing work.
    fn idle(&self) -> bool {
        self.server.is_none()
            || (self.tracker.is_empty()
                && !self.unsynced
                && self.tx_status == b'I'
                && !self.copy_in
                && self.client_passthrough == 0)
    }

    /// Runs until the client leaves or the session must end.
    pub async fn run(mut self) -> End {
        let end = self.relay().await;
        self.finish(&end).await;
        end
    }

    async fn relay(&mut self) -> End {
        loop {
            self.shutting_down |= *self.shutdown.borrow();
            if self.shutting_down && self.idle() {
                return End::Fatal(PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection due to administrator command",
                ));
            }
            let idle = self.idle();
            let wake = {
                let client = &mut self.client;
                let server = &mut self.server;
                let shutdown = &mut self.shutdown;
                tokio::select! {
                    r = async { server.as_mut().expect("guarded").fill().await }, if server.is_some() => Wake::Server(r),
                    r = client.fill() => Wake::Client(r),
                    r = shutdown.changed(), if idle && !self.shutting_down => {
                        if r.is_err() { self.shutting_down = true; }
                        Wake::Shutdown
                    }
                }
            };
            let step = match wake {
                Wake::Client(Ok(0)) => Err(End::ClientGone),
                Wake::Client(Ok(_)) => self.on_client_data().await,
                Wake::Client(Err(e)) => Err(e.into()),
                Wake::Server(Ok(_)) => self.on_server_data().await,
                Wake::Server(Err(e)) => Err(self.server_lost(&e.to_string()).await),
                Wake::Shutdown => Ok(()),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    // ----- client to server -------------------------------------------------

    async fn on_client_data(&mut self) -> Result<(), End> {
        loop {
            if self.client_passthrough > 0 {
                let n = self.client_passthrough.min(self.client.rbuf.len());
                if n == 0 {
                    break;
                }
                self.to_server
                    .extend_from_slice(&self.client.rbuf.split_to(n));
                self.client_passthrough -= n;
                continue;
            }
            let max = self.client.max_message_size;
            let Some(header) = FrameHeader::peek(&self.client.rbuf, max)
                .map_err(|e| End::Fatal(protocol_error(e)))?
            else {
                break;
            };
            if header.tag == b'd'
                && self.server.is_some()
                && header.total > STREAM_THRESHOLD
                && self.client.rbuf.len() < header.total
            {
                let n = self.client.rbuf.len();
                self.to_server
                    .extend_from_slice(&self.client.rbuf.split_to(n));
                self.client_passthrough = header.total - n;
                continue;
            }
            let Some(frame) = split_frame(&mut self.client.rbuf, max)
                .map_err(|e| End::Fatal(protocol_error(e)))?
            else {
                break;
            };
            self.on_client_frame(frame.freeze()).await?;
        }
        self.flush_client().await?;
        self.record_results().await;
        self.flush_server().await
    }

    async fn on_client_frame(&mut self, frame: Bytes) -> Result<(), End> {
        let tag = frame[0];
        tracing::trace!(tag = %(tag as char), len = frame.len(), "client frame");
        if self.discard_until_sync && tag != b'S' {
            return Ok(());
        }
        let result = match tag {
            b'X' => Err(End::ClientGone),
            b'Q' => self.on_query(frame).await,
            b'P' => self.on_parse(frame).await,
            b'B' => self.on_bind(frame).await,
            b'E' => self.on_execute(frame).await,
            b'S' if self.copy_in => {
                // Ignored by the server during copy-in: nothing to await.
                self.to_server.extend_from_slice(&frame);
                Ok(())
            }
            b'S' => self.on_sync(frame).await,
            b'D' => self.on_describe(frame).await,
            b'C' => self.on_close(frame).await,
            b'F' => self.on_function_call(frame).await,
            b'c' | b'f' if self.copy_in => {
                self.copy_in = false;
                self.to_server.extend_from_slice(&frame);
                Ok(())
            }
            b'H' | b'd' | b'c' | b'f' => {
                // Flush has nothing to flush, and copy messages outside COPY
                // are ignored by PostgreSQL, when no server is bound.
                if self.server.is_some() {
                    self.to_server.extend_from_slice(&frame);
                }
                Ok(())
            }
            other => Err(End::Fatal(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid frontend message type {other}"),
            ))),
        };
        self.tracker
            .emit_synthetic(self.tx_status, &mut self.to_client);
        result
    }

    async fn on_query(&mut self, frame: Bytes) -> Result<(), End> {
        let sql = messages::parse_query(&frame[5..]).map_err(|e| End::Fatal(protocol_error(e)))?;
        if let Err(v) = self.shared.guard.check(sql) {
            let error = self.blocked(sql, &v.to_string()).await;
            return self.refuse(Flow::Simple, error).await;
        }
        if let Some(dealloc) = prepared::parse_deallocate(sql) {
            if self.deallocate(dealloc).await {
                return Ok(());
            }
        }
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Simple, e).await;
        }
        let pending = match self.audit_statement(sql, None).await {
            Ok(p) => p,
            Err(e) => return self.refuse(Flow::Simple, e).await,
        };
        self.note_state(sql);
        self.to_server.extend_from_slice(&frame);
        self.tracker.query(pending, None);
        Ok(())
    }

    /// Marks the bound connection as holding this session's state when
    /// `sql` may leave some behind, and pins the client to it when `sql`
    /// creates objects the client will look for on it again.
    fn note_state(&mut self, sql: &[u8]) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if super::state::deallocates(sql) {
            server.statements.mark_uncertain();
        }
        match super::state::effect(sql) {
            Effect::None => {}
            Effect::Settings => {
                server
                    .dirty_by
                    .get_or_insert_with(|| self.ident.session_id.clone());
            }
            Effect::Pin => {
                server
                    .dirty_by
                    .get_or_insert_with(|| self.ident.session_id.clone());
                if !self.pinned && self.mode == PoolMode::Transaction {
                    tracing::info!(session = %self.ident.session_id, "client pinned to its server connection until it disconnects");
                }
                self.pinned = true;
            }
        }
    }

    /// `DEALLOCATE` of protocol-level statements is answered by the gateway:
    /// the client's names go, the shared server-side statements stay for
    /// others. Returns false when the server must answer (a name the gateway
    /// does not map, i.e. an SQL-level `PREPARE`, or `ALL` inside a
    /// transaction, where SQL-level statements may exist).
    async fn deallocate(&mut self, what: prepared::Deallocate) -> bool {
        let tag = match what {
            prepared::Deallocate::All => {
                self.statements.retain(|name, _| name.is_empty());
                if self.server.is_some() {
                    return false;
                }
                "DEALLOCATE ALL"
            }
            prepared::Deallocate::Name(name) => {
                if self
                    .statements
                    .get(&name[..])
                    .is_none_or(|s| s.shared.is_none())
                {
                    return false;
                }
                self.statements.remove(&name[..]);
                "DEALLOCATE"
            }
        };
        if let Ok(Some(pending)) = self.audit_statement(tag.as_bytes(), None).await {
            self.resolved.push(Resolved {
                pending,
                outcome: Outcome::Ok {
                    tag: Some(tag.to_string()),
                    rows: None,
                },
            });
        }
        self.tracker.synth_query(tag);
        true
    }

    async fn on_parse(&mut self, frame: Bytes) -> Result<(), End> {
        let parse =
            messages::parse_parse(&frame[5..]).map_err(|e| End::Fatal(protocol_error(e)))?;
        if let Err(v) = self.shared.guard.check(parse.query) {
            let query = parse.query;
            let error = self.blocked(query, &v.to_string()).await;
            return self.refuse(Flow::Extended, error).await;
        }
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Extended, e).await;
        }
        self.note_state(parse.query);
        let name = frame.slice_ref(parse.name);
        let sql = frame.slice_ref(parse.query);
        self.unsynced = true;
        if name.is_empty() {
            self.statements
                .insert(name, prepared::Statement::unnamed(sql));
            self.to_server.extend_from_slice(&frame);
            self.tracker.parse(false, None);
            return Ok(());
        }
        let rest = frame.slice(5 + parse.name.len() + 1..);
        let key = statements::key(&rest);
        self.statements.insert(
            name,
            prepared::Statement {
                sql,
                shared: Some((key, rest.clone())),
            },
        );
        let server = self.server.as_mut().expect("bound above");
        if server.statements.touch(key) {
            self.tracker.synth_parse();
        } else {
            self.prepare_on_server(key, &rest, false);
        }
        Ok(())
    }

    /// Sends `Parse` of a shared statement to the bound server (closing the
    /// one the cache evicts to make room). `injected`: the client did not
    /// ask for this Parse, so its answer is not relayed.
    fn prepare_on_server(&mut self, key: u128, rest: &[u8], injected: bool) {
        let server = self.server.as_mut().expect("caller binds");
        if server.statements.is_uncertain() {
            prepared::statement_message(&mut self.to_server, b'C', &statements::server_name(key));
            self.tracker.close(true);
        }
        if let Some(evicted) = server.statements.insert(key) {
            prepared::statement_message(
                &mut self.to_server,
                b'C',
                &statements::server_name(evicted),
            );
            self.tracker.close(true);
        }
        prepared::parse(&mut self.to_server, &statements::server_name(key), rest);
        self.tracker.parse(injected, Some(key));
    }

    /// The server name of a client's named statement, prepared on the bound
    /// server first if needed; `None` for unnamed or unknown names (relayed
    /// as they are, so the server reports unknown ones itself).
    fn server_statement(&mut self, name: &[u8]) -> Option<String> {
        if name.is_empty() {
            return None;
        }
        let (key, rest) = self.statements.get(name)?.shared.clone()?;
        let server = self.server.as_mut().expect("caller binds");
        if !server.statements.touch(key) {
            self.prepare_on_server(key, &rest, true);
        }
        Some(statements::server_name(key))
    }

    async fn on_bind(&mut self, frame: Bytes) -> Result<(), End> {
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Extended, e).await;
        }
        let bind = messages::parse_bind(&frame[5..]).map_err(|e| End::Fatal(protocol_error(e)))?;
        if let Err(e) = self.check_unnamed(bind.statement) {
            return self.refuse(Flow::Extended, e).await;
        }
        if self.auditing {
            let sql = self
                .statements
                .get(bind.statement)
                .map(|s| s.sql.clone())
                .unwrap_or_default();
            let params = if self.shared.config.audit.log_parameters {
                Some(
                    bind.params_for_audit()
                        .map_err(|e| End::Fatal(protocol_error(e)))?,
                )
            } else {
                None
            };
            self.portals
                .insert(frame.slice_ref(bind.portal), Portal { sql, params });
        }
        match self.server_statement(bind.statement) {
            Some(name) => {
                let rest = 5 + bind.portal.len() + 1 + bind.statement.len() + 1;
                prepared::bind(&mut self.to_server, bind.portal, &name, &frame[rest..]);
            }
            None => self.to_server.extend_from_slice(&frame),
        }
        self.tracker.bind();
        self.unsynced = true;
        Ok(())
    }

    async fn on_describe(&mut self, frame: Bytes) -> Result<(), End> {
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Extended, e).await;
        }
        let (kind, name) = messages::parse_close_or_describe(&frame[5..])
            .map_err(|e| End::Fatal(protocol_error(e)))?;
        if kind == b'S' {
            if let Err(e) = self.check_unnamed(name) {
                return self.refuse(Flow::Extended, e).await;
            }
        }
        let server_name = if kind == b'S' {
            self.server_statement(name)
        } else {
            None
        };
        match server_name {
            Some(server_name) => {
                prepared::statement_message(&mut self.to_server, b'D', &server_name)
            }
            None => self.to_server.extend_from_slice(&frame),
        }
        self.tracker.describe();
        self.unsynced = true;
        Ok(())
    }

    /// The unnamed statement lives on the server connection, which in
    /// transaction pooling may have served another client since this one's
    /// `Parse`: using it without a `Parse` in the same binding would run
    /// someone else's statement. Refused as PostgreSQL refuses a missing one.
    fn check_unnamed(&self, statement: &[u8]) -> Result<(), PgError> {
        if statement.is_empty() && !self.statements.contains_key(&b""[..]) {
            return Err(PgError::error(
                sqlstate::INVALID_SQL_STATEMENT_NAME,
                "unnamed prepared statement does not exist",
            )
            .with_detail("in transaction pooling the unnamed statement lasts only until the end of the transaction"));
        }
        Ok(())
    }

    async fn on_close(&mut self, frame: Bytes) -> Result<(), End> {
        let (kind, name) = messages::parse_close_or_describe(&frame[5..])
            .map_err(|e| End::Fatal(protocol_error(e)))?;
        if kind == b'S'
            && self
                .statements
                .get(name)
                .is_some_and(|s| s.shared.is_some())
        {
            // The client's name goes; the shared statement stays on the server.
            self.statements.remove(name);
            self.tracker.synth_close();
            return Ok(());
        }
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Extended, e).await;
        }
        if kind == b'S' {
            self.statements.remove(name);
        }
        self.to_server.extend_from_slice(&frame);
        self.tracker.close(false);
        self.unsynced = true;
        Ok(())
    }

    async fn on_execute(&mut self, frame: Bytes) -> Result<(), End> {
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Extended, e).await;
        }
        let mut pending = None;
        if self.auditing {
            let name =
                messages::parse_execute(&frame[5..]).map_err(|e| End::Fatal(protocol_error(e)))?;
            let (sql, params) = match self.portals.get(name) {
                Some(p) => (p.sql.clone(), p.params.clone()),
                None => (Bytes::new(), None),
            };
            pending = match self.audit_statement(&sql, params).await {
                Ok(p) => p,
                Err(e) => return self.refuse(Flow::Extended, e).await,
            };
        }
        self.to_server.extend_from_slice(&frame);
        self.tracker.execute(pending);
        self.unsynced = true;
        Ok(())
    }

    async fn on_sync(&mut self, frame: Bytes) -> Result<(), End> {
        self.discard_until_sync = false;
        if self.local_sync || (self.server.is_none() && self.tracker.is_empty()) {
            self.local_sync = false;
            messages::ready_for_query(&mut self.to_client, self.tx_status);
            return Ok(());
        }
        self.to_server.extend_from_slice(&frame);
        self.tracker.sync();
        self.unsynced = false;
        Ok(())
    }

    async fn on_function_call(&mut self, frame: Bytes) -> Result<(), End> {
        let oid = crate::protocol::frame::Reader::new(&frame[5..], "FunctionCall")
            .i32()
            .map_err(|e| End::Fatal(protocol_error(e)))?;
        let text = format!("FunctionCall oid={oid}");
        if oid == SET_CONFIG_OID {
            let error = self
                .blocked(
                    text.as_bytes(),
                    "set_config through FunctionCall is not allowed through pgwarden",
                )
                .await;
            return self.refuse(Flow::Simple, error).await;
        }
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Simple, e).await;
        }
        let pending = match self.audit_statement(text.as_bytes(), None).await {
            Ok(p) => p,
            Err(e) => return self.refuse(Flow::Simple, e).await,
        };
        self.to_server.extend_from_slice(&frame);
        self.tracker.query(pending, None);
        Ok(())
    }

    /// Answers a client message with `error` instead of running it. With a
    /// server bound (a transaction is open) the statement is replaced by one
    /// that fails, so the server aborts the transaction as PostgreSQL would;
    /// otherwise the gateway answers by itself.
    async fn refuse(&mut self, flow: Flow, error: PgError) -> Result<(), End> {
        if error.is_fatal() {
            return Err(End::Fatal(error));
        }
        match (flow, self.server.is_some()) {
            (Flow::Simple, true) => {
                messages::query(&mut self.to_server, REFUSED_SQL);
                self.tracker.query(None, Some(error));
            }
            (Flow::Simple, false) => {
                error.encode(&mut self.to_client);
                messages::ready_for_query(&mut self.to_client, self.tx_status);
            }
            (Flow::Extended, true) => {
                messages::parse(&mut self.to_server, REFUSED_SQL);
                self.tracker.blocked_parse(error);
                self.unsynced = true;
                self.discard_until_sync = true;
            }
            (Flow::Extended, false) => {
                error.encode(&mut self.to_client);
                self.discard_until_sync = true;
                self.local_sync = true;
            }
        }
        Ok(())
    }

    /// Records a guard refusal and builds the client's error.
    async fn blocked(&mut self, sql: &[u8], why: &str) -> PgError {
        tracing::info!(session = %self.ident.session_id, user = %self.ident.client_user, "statement guard: {why}");
        if self.auditing {
            let mut ev = self.ident.event(Kind::GuardBlocked);
            ev.statement = Some(String::from_utf8_lossy(sql).into_owned());
            ev.status = Some(Status::Error);
            ev.sqlstate = Some(sqlstate::INSUFFICIENT_PRIVILEGE.code().to_string());
            ev.message = Some(why.to_string());
            self.shared.auditor.append_nowait(ev).await;
        }
        PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, why.to_string())
    }

    /// Writes a statement's `query` record ahead of forwarding it.
    async fn audit_statement(
        &mut self,
        sql: &[u8],
        params: Option<Vec<Option<String>>>,
    ) -> Result<Option<Pending>, PgError> {
        if !self.auditing {
            return Ok(None);
        }
        let mut ev = self.ident.event(Kind::Query);
        ev.statement = Some(String::from_utf8_lossy(sql).into_owned());
        ev.params = params;
        ev.backend_pid = self.server.as_ref().map(|s| s.pid);
        match self.shared.auditor.append(ev).await {
            Ok(seq) => Ok(Some(Pending {
                seq,
                started: Instant::now(),
            })),
            Err(e) if self.shared.auditor.on_failure() == OnFailure::Allow => {
                tracing::error!(
                    "audit store failed, statement allowed by on_failure = \"allow\": {e}"
                );
                Ok(None)
            }
            Err(e) => {
                tracing::error!("audit store failed, statement refused: {e}");
                Err(PgError::error(
                    sqlstate::IO_ERROR,
                    "pgwarden cannot write its audit log; the statement was not run",
                )
                .with_detail(e.to_string()))
            }
        }
    }

    /// Binds a server connection if none is bound: acquires one and asserts
    /// the client's identity on it.
    async fn bind_server(&mut self) -> Result<(), PgError> {
        self.needs_verify = self.shared.config.identity.verify == VerifyMode::Transaction;
        if self.server.is_some() {
            return Ok(());
        }
        let mut conn = self.shared.pools.acquire(&self.ident.database).await?;
        if conn
            .dirty_by
            .as_ref()
            .is_some_and(|owner| *owner != self.ident.session_id)
        {
            if let Err(e) = reset_state(&mut conn).await {
                tracing::warn!("resetting a server connection failed: {e}");
                pool::discard(conn);
                return Err(PgError::error(
                    sqlstate::CONNECTION_FAILURE,
                    "pgwarden could not reset a server connection; please retry",
                ));
            }
        }
        let carries_identity = conn.identity.as_ref().is_some_and(|(role, user)| {
            *role == self.ident.role && *user == self.ident.client_user
        });
        let carries_settings = conn.applied.as_ref().is_some_and(|a| **a == *self.settings);
        if !carries_identity || !carries_settings {
            conn.identity = None;
            conn.applied = None;
            let assertion = Assertion {
                role: &self.ident.role,
                setting: &self.shared.config.identity.client_user_setting,
                client_user: &self.ident.client_user,
                settings: &self.settings,
            };
            if let Err(e) = assertion.apply(&mut conn).await {
                tracing::warn!(session = %self.ident.session_id, "identity assertion failed: {e}");
                pool::discard(conn);
                return Err(e);
            }
            conn.identity = Some((self.ident.role.clone(), self.ident.client_user.clone()));
            conn.applied = Some(self.settings.clone());
        }
        self.cancel.bind(BackendKey {
            pid: conn.pid,
            secret: conn.secret,
        });
        self.server = Some(conn);
        Ok(())
    }

    async fn flush_server(&mut self) -> Result<(), End> {
        if self.to_server.is_empty() {
            return Ok(());
        }
        let Some(server) = self.server.as_mut() else {
            self.to_server.clear();
            return Ok(());
        };
        if let Err(e) = server.write_all(&self.to_server).await {
            self.to_server.clear();
            return Err(self.server_lost(&e.to_string()).await);
        }
        self.to_server.clear();
        Ok(())
    }

    async fn flush_client(&mut self) -> Result<(), End> {
        if self.to_client.is_empty() {
            return Ok(());
        }
        let result = self.client.write_all(&self.to_client).await;
        self.to_client.clear();
        result.map_err(End::from)
    }

    // ----- server to client -------------------------------------------------

    async fn on_server_data(&mut self) -> Result<(), End> {
        while let Some(server) = self.server.as_mut() {
            let rbuf = &mut server.rbuf;
            if self.server_passthrough > 0 {
                let n = self.server_passthrough.min(rbuf.len());
                if n == 0 {
                    break;
                }
                self.to_client.extend_from_slice(&rbuf.split_to(n));
                self.server_passthrough -= n;
                continue;
            }
            let header = match FrameHeader::peek(rbuf, MAX_SERVER_FRAME) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(self.server_lost(&e.to_string()).await),
            };
            if matches!(header.tag, b'D' | b'd')
                && header.total > STREAM_THRESHOLD
                && rbuf.len() < header.total
            {
                let n = rbuf.len();
                self.to_client.extend_from_slice(&rbuf.split_to(n));
                self.server_passthrough = header.total - n;
                continue;
            }
            let frame = match split_frame(rbuf, MAX_SERVER_FRAME) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(self.server_lost(&e.to_string()).await),
            };
            self.on_server_frame(frame);
        }
        self.flush_client().await?;
        self.record_results().await;
        if self.retag_application_name && self.tracker.is_empty() && !self.copy_in {
            self.retag_application_name();
            self.flush_server().await?;
        }
        if self.idle() && self.tx_status == b'I' && self.needs_verify {
            self.verify_identity().await?;
        }
        if self.mode == PoolMode::Transaction && !self.pinned && self.idle() {
            self.release();
        }
        Ok(())
    }

    fn on_server_frame(&mut self, frame: BytesMut) {
        let tag = frame[0];
        tracing::trace!(tag = %(tag as char), len = frame.len(), "server frame");
        match tag {
            b'Z' if frame.len() == 6 => {
                self.tx_status = frame[5];
                self.copy_in = false;
            }
            b'G' => self.copy_in = true,
            b'S' => self.on_parameter_status(&frame[5..]),
            _ => {}
        }
        if tag == b'E' {
            let fatal = messages::parse_error_fields(&frame[5..])
                .is_ok_and(|f| matches!(f.severity.as_str(), "FATAL" | "PANIC"));
            if fatal {
                if let Some(server) = self.server.as_mut() {
                    server.mark_broken();
                }
            }
        }
        let mut cache = CacheEffects::default();
        let route = self
            .tracker
            .on_server(tag, &frame[5..], &mut self.resolved, &mut cache);
        if let Some(server) = self.server.as_mut() {
            for key in cache.not_prepared {
                server.statements.remove(key);
            }
        }
        match route {
            Route::Forward => self.to_client.extend_from_slice(&frame),
            Route::Drop => {}
            Route::Replace(error) => error.encode(&mut self.to_client),
        }
        self.tracker
            .emit_synthetic(self.tx_status, &mut self.to_client);
    }

    /// A setting changed on the server while this client was bound: the
    /// connection now holds this session's state, and a tracked setting
    /// follows the client to its next connection.
    fn on_parameter_status(&mut self, body: &[u8]) {
        let mut r = crate::protocol::frame::Reader::new(body, "ParameterStatus");
        let (Ok(name), Ok(value)) = (r.cstr(), r.cstr()) else {
            return;
        };
        let (name, value) = (
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(value),
        );
        let settings = Arc::make_mut(&mut self.settings);
        super::state::track(settings, &name, &value, &self.ident.client_user);
        if name.eq_ignore_ascii_case("application_name")
            && !value.ends_with(&format!("[{}]", self.ident.client_user))
        {
            self.retag_application_name = true;
        }
        if let Some(server) = self.server.as_mut() {
            server
                .dirty_by
                .get_or_insert_with(|| self.ident.session_id.clone());
            server.applied = Some(self.settings.clone());
        }
    }

    /// Re-applies the client's (tagged) application name on the bound
    /// connection, so `pg_stat_activity` and the server log keep showing
    /// who it is; the answers are the gateway's and never reach the client.
    fn retag_application_name(&mut self) {
        self.retag_application_name = false;
        let Some((_, name)) = self.settings.iter().find(|(k, _)| k == "application_name") else {
            return;
        };
        let literal = name.replace('\\', "\\\\").replace('\'', "''");
        let sql = format!("SELECT pg_catalog.set_config('application_name', E'{literal}', false)");
        messages::query(&mut self.to_server, &sql);
        self.tracker.injected();
    }

    async fn record_results(&mut self) {
        if self.resolved.is_empty() {
            return;
        }
        for r in std::mem::take(&mut self.resolved) {
            let ev = self.result_event(r.pending, r.outcome);
            self.shared.auditor.append_nowait(ev).await;
        }
    }

    fn result_event(&self, pending: Pending, outcome: Outcome) -> Event {
        let mut ev = self.ident.event(Kind::Result);
        ev.ref_seq = Some(pending.seq);
        ev.duration_us = Some(pending.started.elapsed().as_micros() as u64);
        ev.backend_pid = self.server.as_ref().map(|s| s.pid);
        match outcome {
            Outcome::Ok { tag, rows } => {
                ev.status = Some(Status::Ok);
                ev.command_tag = tag;
                ev.rows = rows;
            }
            Outcome::Error { code, message } => {
                ev.status = Some(Status::Error);
                ev.sqlstate = Some(code);
                ev.message = Some(message);
            }
            Outcome::NotExecuted => {
                ev.status = Some(Status::Error);
                ev.message = Some("not executed: an earlier message of the pipeline failed".into());
            }
        }
        ev
    }

    /// `verify = "transaction"`: at the end of a transaction, before the
    /// connection can go to anyone else, confirm it still carries this
    /// client's identity. A mismatch ends the session with FATAL 42501 and
    /// destroys the connection.
    async fn verify_identity(&mut self) -> Result<(), End> {
        self.needs_verify = false;
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let assertion = Assertion {
            role: &self.ident.role,
            setting: &self.shared.config.identity.client_user_setting,
            client_user: &self.ident.client_user,
            settings: &[],
        };
        let (found_role, found_user) = match assertion.verify(server).await {
            Ok(Verdict::Intact) => return Ok(()),
            Ok(Verdict::Violated {
                found_role,
                found_user,
            }) => (found_role, found_user),
            Err(e) => {
                return Err(self
                    .server_lost(&format!("identity verification failed: {e}"))
                    .await)
            }
        };
        let message = format!(
            "identity changed during the transaction: expected role \"{}\" and client \"{}\", found role \"{found_role}\" and client \"{found_user}\"",
            self.ident.role, self.ident.client_user
        );
        tracing::error!(session = %self.ident.session_id, "{message}");
        if self.auditing {
            let mut ev = self.ident.event(Kind::IdentityViolation);
            ev.status = Some(Status::Error);
            ev.sqlstate = Some(sqlstate::INSUFFICIENT_PRIVILEGE.code().to_string());
            ev.message = Some(message.clone());
            ev.backend_pid = Some(server.pid);
            self.shared.auditor.append_nowait(ev).await;
        }
        self.abandon_server("identity violation").await;
        Err(End::Fatal(PgError::fatal(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            message,
        )))
    }

    fn release(&mut self) {
        if let Some(conn) = self.server.take() {
            self.cancel.unbind();
            self.statements.remove(&b""[..]);
            drop(conn);
        }
    }

    /// The server connection failed: its in-flight statements are recorded
    /// as unknown, it is destroyed, and the client session ends.
    async fn server_lost(&mut self, why: &str) -> End {
        tracing::warn!(session = %self.ident.session_id, "server connection lost: {why}");
        self.abandon_server("server connection lost before the statement completed")
            .await;
        End::Fatal(PgError::fatal(
            sqlstate::CONNECTION_FAILURE,
            "pgwarden lost its connection to PostgreSQL; your transaction, if any, was rolled back",
        ))
    }

    async fn abandon_server(&mut self, why: &str) {
        for pending in self.tracker.drain() {
            let mut ev = self.result_event(pending, Outcome::NotExecuted);
            ev.status = Some(Status::Unknown);
            ev.message = Some(why.to_string());
            self.shared.auditor.append_nowait(ev).await;
        }
        if let Some(conn) = self.server.take() {
            self.cancel.unbind();
            pool::discard(conn);
        }
    }

    /// Leaves the server connection in a state fit for the next client, or
    /// destroys it.
    async fn finish(&mut self, end: &End) {
        if let End::Fatal(error) = end {
            self.to_client.clear();
            self.client.send_error(error).await;
        }
        if self.server.is_none() {
            return;
        }
        if !self.idle() {
            self.abandon_server("client disconnected before the statement completed")
                .await;
            return;
        }
        if self.needs_verify && self.verify_identity().await.is_err() {
            return;
        }
        if self.mode == PoolMode::Session {
            self.reset_session().await;
        }
        self.release();
    }

    /// Session pooling hands the connection to another client next: clear
    /// everything this one set (settings, prepared statements, temp tables,
    /// role); the next bind asserts the next identity.
    async fn reset_session(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let mut out = BytesMut::new();
        messages::query(&mut out, "DISCARD ALL");
        server.statements.clear();
        server.identity = None;
        server.applied = None;
        server.dirty_by = None;
        let ok = match server.write_all(&out).await {
            Ok(()) => server.drain_until_ready().await.is_ok(),
            Err(_) => false,
        };
        if !ok {
            self.abandon_server("reset failed").await;
        }
    }
}

/// Clears what another session may have left on a server connection: its
/// settings, cursors, LISTENs, advisory locks, temp objects and SQL-level
/// prepared statements (and with them the shared statements: the cache is
/// emptied). The identity is asserted afresh afterwards.
async fn reset_state(conn: &mut PooledConn) -> Result<(), pool::conn::BackendError> {
    let mut out = BytesMut::new();
    messages::query(&mut out, super::state::RESET_SQL);
    conn.write_all(&out).await?;
    conn.statements.clear();
    conn.identity = None;
    conn.applied = None;
    conn.drain_until_ready().await?;
    conn.dirty_by = None;
    Ok(())
}
