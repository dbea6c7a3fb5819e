//! The session's core, without I/O: for each client message it decides what
//! must happen (refuse it, store these `query` records, bind a connection,
//! then forward these bytes), and it keeps everything the session knows
//! besides its sockets: the protocol state ([`Sequencer`]), the settings
//! the client carries, the timers, the result records on their way out.
//!
//! The relay (`session::relay`) is its driver: it reads the sockets, hands
//! each client message to [`Core::client_frame`], performs the [`Step`] it
//! gets back (the audit store, the pool, the identity assertion) and
//! returns the results to [`Core::apply`], which writes the bytes for the
//! server. So the order of the guarantees is fixed here, once, for every
//! message:
//! - a refused message is refused before anything of it is stored or sent;
//! - a message's `query` records are stored before a connection is bound
//!   for it (no pooled connection idles through an fsync), and before any
//!   byte of it is written;
//! - bytes for the server are written only in `apply`, which runs only
//!   after the binding succeeded (and the sequencer drops any written
//!   while no connection carrying the client's identity is bound).

mod ahead;
mod apply;
mod plan;
mod server;

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::audit::{Event, Kind, Link, Status};
use crate::backend::conn::ConnState;
use crate::protocol::messages::{self, PgError};
use crate::protocol::sqlstate;
use crate::session::carried::Carried;
use crate::session::checks::{off_thread, Checks, Refused, Rules};
use crate::session::clock::Clock;
use crate::session::ledger::Control;
use crate::session::outcome::{Outcome, Pending};
use crate::session::refusal::Refusal;
use crate::session::results::Results;
use crate::session::sequencer::{Flow, Sequencer};
use crate::session::Identity;

pub use ahead::Ahead;
pub use plan::Then;
pub use server::{Bound, Duty};

/// What the driver does with a client message.
#[derive(Debug)]
pub enum Step {
    /// Nothing more: it was answered, skipped or passed through.
    Done,
    /// The client sent `Terminate`.
    Terminate,
    /// Answer it with this refusal (storing the guard's record first,
    /// when the guard refused it).
    Refuse(Flow, Refused),
    /// Perform the plan's I/O, then [`Core::apply`] it.
    Run(Box<Plan>),
}

impl Step {
    fn run(plan: Plan) -> Step {
        Step::Run(Box::new(plan))
    }
}

/// A `query` record to store, and what its statement does to its
/// transaction.
#[derive(Debug)]
pub struct ToRecord {
    pub event: Event,
    pub control: Control,
}

/// What a client message needs before its bytes are written, in this order.
#[derive(Debug)]
pub struct Plan {
    /// How a refusal answers it, should its I/O fail.
    pub flow: Flow,
    /// `query` records stored already (audited ahead of its batch).
    pub stored: Vec<Option<Pending>>,
    /// `query` records to store first, in order.
    pub records: Vec<ToRecord>,
    /// A record that cannot be stored refuses the message; otherwise it
    /// goes on unrecorded.
    pub must_record: bool,
    /// A connection must be bound (and carry the client's identity).
    pub bind: bool,
    /// A record to store once bound (a `Bind` whose planning may run code).
    pub after_bind: Option<ToRecord>,
    pub then: Then,
}

/// How much of a refusal's reason the gateway's log shows.
const LOGGED_REASON: usize = 1024;

/// The session's state, without its sockets.
pub struct Core<'a> {
    ident: &'a Identity,
    rules: Rules<'a>,
    auditing: bool,
    /// `[audit] log_parameters`, as the driver last read it (reloadable).
    pub log_parameters: bool,
    /// `[audit] max_value_bytes`: longer statement texts are refused
    /// ([`Core::too_long`]), longer parameter values and messages are
    /// recorded cut (see `audit::cut`).
    pub max_value_bytes: usize,
    /// `[server] prepared_statement_memory` (0: no limit).
    pub prepared_statement_memory: usize,
    /// The largest client message accepted.
    max_message_size: usize,
    /// The protocol state.
    pub seq: Sequencer,
    /// The settings the client carries to every server connection.
    pub carried: Carried,
    /// The session's timers.
    pub clock: Clock,
    /// The `result` records on their way to the audit log.
    pub results: Results,
    /// The first `Execute` of a batch, audited before the batch took a
    /// server connection ([`Core::ahead`]): taken by that `Execute`, or
    /// settled at `Sync` (or session end) if it never ran.
    pre_audited: Option<Ahead>,
    /// (transactions, statements) not yet added to the shared metrics.
    pub counts: (u64, u64),
    /// `verify = "transaction"`, and client messages ran since the last
    /// check of the bound connection's identity.
    pub verify_due: bool,
    /// The process id the client knows its session by (gateway-made).
    client_pid: i32,
    span: tracing::Span,
}

impl<'a> Core<'a> {
    /// `client_pid`: the process id the gateway gave the client in its
    /// `BackendKeyData`.
    pub fn new(
        ident: &'a Identity,
        rules: Rules<'a>,
        auditing: bool,
        (max_message_size, client_pid): (usize, i32),
    ) -> Self {
        let opaque_start = !crate::session::opaque::settings_transparent(&ident.settings);
        Core {
            ident,
            rules,
            auditing,
            log_parameters: false,
            max_value_bytes: crate::config::DEFAULT_MAX_VALUE_BYTES,
            prepared_statement_memory: 0,
            max_message_size,
            seq: Sequencer::default().with_code(crate::session::sequencer::Code::new(opaque_start)),
            carried: Carried::new(
                &ident.client_user,
                ident.settings.clone(),
                ident.application_name.clone(),
            )
            .showing(ident.reported.clone()),
            clock: Clock::new(Instant::now()),
            results: Results::default(),
            pre_audited: None,
            counts: (0, 0),
            verify_due: false,
            client_pid,
            span: tracing::Span::none(),
        }
    }

    /// The session's span, named as the parent of every log line.
    pub fn in_span(mut self, span: tracing::Span) -> Self {
        self.span = span;
        self
    }

    /// Whether the session's statements are recorded.
    pub fn auditing(&self) -> bool {
        self.auditing
    }

    fn checks(&mut self) -> Checks<'_> {
        Checks {
            rules: self.rules,
            names: &self.seq.names,
            code: &mut self.seq.code,
            carried: &mut self.carried,
        }
    }

    /// A whole client message (`rest`: the client's bytes buffered behind
    /// it). `Err`: the session ends with this error.
    pub fn client_frame(&mut self, frame: Bytes, rest: &[u8]) -> Result<Step, Refusal> {
        // Reading a large message (its checks, its records, its text for
        // each prefilter) is work for another thread: other sessions run
        // on this one (red team rt34: four 200 MB queries held another
        // session's `SELECT 1` for 4 s after their records were cut).
        off_thread(frame.len(), move || self.planned(frame, rest))
    }

    fn planned(&mut self, frame: Bytes, rest: &[u8]) -> Result<Step, Refusal> {
        let tag = frame[0];
        tracing::trace!(parent: &self.span, tag = %(tag as char), len = frame.len(), "client frame");
        if !self
            .seq
            .admit(&frame, crate::session::commits::Commits::rolls_back_first)
        {
            return Ok(Step::Done);
        }
        if matches!(tag, b'Q' | b'E' | b'F') {
            self.counts.1 += 1;
        }
        let step = match tag {
            b'X' => Step::Terminate,
            b'Q' => self.plan_query(frame)?,
            b'P' => self.plan_parse(frame)?,
            b'B' => self.plan_bind(frame, rest)?,
            b'E' => self.plan_execute(frame)?,
            // Ignored by the server during copy-in: nothing to await.
            b'S' if self.seq.copy_in() => {
                self.seq.pass(&frame);
                Step::Done
            }
            b'S' => {
                self.sync();
                Step::Done
            }
            b'D' => self.plan_describe(frame)?,
            b'C' => self.plan_close(frame)?,
            b'F' => self.plan_function_call(frame)?,
            b'H' | b'd' | b'c' | b'f' => {
                self.seq.pass(&frame);
                Step::Done
            }
            other => return Err(Refusal::UnknownMessage(other)),
        };
        Ok(step)
    }

    /// The client's `Sync`.
    fn sync(&mut self) {
        // An error earlier in the batch may have discarded its `Execute`.
        self.settle_unexecuted_ahead();
        self.seq.sync();
    }

    /// Answers a client message with `refusal` instead of running it (see
    /// `Sequencer::refuse`); `Err` for a FATAL one, which ends the session.
    pub fn refuse(&mut self, flow: Flow, refusal: Refusal) -> Result<(), Refusal> {
        let error = refusal.to_wire();
        if error.is_fatal() {
            return Err(refusal);
        }
        self.seq.refuse(flow, error);
        Ok(())
    }

    // ----- records ----------------------------------------------------------

    /// An audit event of this session: its identity, and the application
    /// name the client uses now.
    pub fn event(&self, kind: Kind) -> Event {
        let mut ev = self.ident.event(kind);
        ev.application_name = self.carried.application_name();
        ev
    }

    /// The `query` record of `sql` (as the client sent it), or nothing
    /// when the session is not audited.
    fn record(&self, sql: &[u8], params: Option<Vec<Option<String>>>) -> Option<ToRecord> {
        if !self.auditing {
            return None;
        }
        let mut event = self.event(Kind::Query);
        // Copying, hashing and cutting a huge text or parameter is work for
        // another thread.
        let values: usize = params.iter().flatten().flatten().map(String::len).sum();
        off_thread(sql.len() + values, || {
            event.params = params;
            event.cut_long_values(self.max_value_bytes);
            // The statement is kept whole: this one is going to run, and
            // its text was measured when it came (`too_long`). Read again
            // now, it may be longer (`client_encoding` changed since its
            // `Parse`: red team rt36), never cut.
            event.statement = Some(self.carried.client_text(sql).into_owned());
        });
        // From the bytes the server runs, not the recorded text (which may
        // be the bytes in hex).
        Some(ToRecord {
            event,
            control: Control::of(sql),
        })
    }

    /// The `query` record of a statement the gateway sends on its own
    /// initiative, with `note` saying why.
    pub fn own_record(&self, sql: &str, note: &str) -> Option<ToRecord> {
        let mut record = self.record(sql.as_bytes(), None)?;
        record.event.message = Some(match record.event.message.take() {
            Some(cut) => format!("{note}; {cut}"),
            None => note.to_string(),
        });
        Some(record)
    }

    /// A statement text longer than its record may keep (`[audit]
    /// max_value_bytes`, counted as recorded), refused: a statement whose
    /// record kept only its start could hide what ran after it.
    pub fn too_long(&self, sql: &[u8]) -> Option<Refused> {
        let max = self.max_value_bytes;
        // Recorded text is at most 3 bytes per byte sent, plus a prefix.
        if !self.auditing || max == 0 || sql.len().saturating_mul(3) + 64 <= max {
            return None;
        }
        let len = self.carried.client_text(sql).len();
        (len > max).then(|| Refused::too_long(sql, len, max))
    }

    /// A named `Parse` or `Bind` keeping `len` bytes, replacing an entry
    /// that kept `replaced`, that would take the session's statements and
    /// portals past `prepared_statement_memory`: refused (the gateway keeps
    /// every statement a client prepares, to prepare it again on whichever
    /// connection serves it, and a portal's parameters for its record).
    /// `sql`: the statement, for the refusal's record.
    /// `sizes` gives (`replaced`, `len`), worked out only for a named
    /// message under a limit.
    pub fn too_much_kept(
        &self,
        name: &[u8],
        sizes: impl FnOnce(&crate::session::sequencer::Names) -> (usize, usize),
        sql: &[u8],
    ) -> Option<Refused> {
        let max = self.prepared_statement_memory;
        if max == 0 || name.is_empty() {
            return None;
        }
        let names = &self.seq.names;
        let (replaced, len) = sizes(names);
        let held = names.statements.bytes() + names.portals.bytes();
        let bytes = held.saturating_sub(replaced).saturating_add(len);
        (bytes > max).then(|| Refused {
            refusal: Refusal::TooMuchPrepared { bytes, max },
            blocked: Some(sql.to_vec()),
        })
    }

    /// The `guard_blocked` record of a refused message, if it has one.
    pub fn blocked_record(&self, refused: &Refused) -> Option<Event> {
        let Some(sql) = &refused.blocked else {
            return None;
        };
        let error = refused.refusal.to_wire();
        // The reason may quote the client's text (a language name...).
        let why = &error.message;
        let shown = &why[..crate::audit::table::floor_char_boundary(why, LOGGED_REASON)];
        tracing::info!(parent: &self.span, "statement refused: {shown}");
        if !self.auditing {
            return None;
        }
        let mut ev = self.event(Kind::GuardBlocked);
        ev.status = Some(Status::Error);
        ev.sqlstate = Some(error.code.code().to_string());
        ev.message = Some(why.clone());
        off_thread(sql.len(), || {
            ev.statement = Some(self.carried.client_text(sql).into_owned());
            ev.cut_long_values(self.max_value_bytes);
        });
        Some(ev)
    }

    /// A statement's `result` record; `backend_pid`: the connection it
    /// ran on.
    pub fn result_event(
        &self,
        pending: Pending,
        outcome: Outcome,
        backend_pid: Option<i32>,
    ) -> Event {
        let mut ev = self.event(Kind::Result);
        ev.link = Link::Result(pending.ticket);
        ev.duration_us = Some(pending.started.elapsed().as_micros() as u64);
        ev.backend_pid = backend_pid;
        match outcome {
            Outcome::Ok { tag, rows } => {
                ev.status = Some(Status::Ok);
                ev.command_tag = tag;
                ev.rows = rows;
            }
            Outcome::Error { code, message } => {
                ev.status = Some(Status::Error);
                ev.message = Some(match self.clock.cancel_note() {
                    Some(note) if code == sqlstate::QUERY_CANCELED.code() => {
                        format!("{message} ({note})")
                    }
                    _ => message,
                });
                ev.sqlstate = Some(code);
            }
            Outcome::Returned { value } => {
                ev.status = Some(Status::Ok);
                ev.message = Some(format!("returned {value}"));
            }
            Outcome::NotExecuted { after } => {
                ev.cause = after;
                ev.status = Some(Status::Error);
                ev.message = Some("not executed: an earlier message of the pipeline failed".into());
            }
            Outcome::Unknown => {
                ev.status = Some(Status::Unknown);
                ev.message = Some(
                    "the server's answers to this query did not match the statements pgwarden split it into: which statement did what cannot be told".into(),
                );
            }
        }
        let len = ev.message.as_ref().map_or(0, String::len);
        off_thread(len, || ev.cut_long_values(self.max_value_bytes));
        ev
    }

    /// Statements whose records are stored never reached a server: each
    /// `result` records the error that stopped them (`refusal`).
    pub fn unrun(&mut self, pendings: Vec<Option<Pending>>, refusal: &Refusal) {
        let error = refusal.to_wire();
        for pending in pendings.into_iter().flatten() {
            let outcome = Outcome::Error {
                code: error.code.code().to_string(),
                message: error.message.clone(),
            };
            self.results.unran(pending, outcome);
        }
    }

    /// The messages in flight were skipped by the server (a pipelined
    /// identity assertion before them failed): they are answered as
    /// PostgreSQL answers a batch whose first message failed with `error`,
    /// and recorded as such.
    pub fn fail_in_flight(&mut self, error: &PgError) {
        self.fail_in_flight_as(error, b'I');
    }

    /// As [`Self::fail_in_flight`], the client left in transaction status
    /// `status` (`E`: its transaction is aborted).
    pub fn fail_in_flight_as(&mut self, error: &PgError, status: u8) {
        let mut failed = BytesMut::new();
        error.encode(&mut failed);
        let mut ready = BytesMut::new();
        messages::ready_for_query(&mut ready, status);
        // Each answer resolves at least one entry; the bound is a guard.
        for _ in 0..=self.seq.expect().len() * 2 {
            self.seq.emit_synthetic();
            let frame = match self.seq.expect().failure_answer() {
                None => break,
                Some(b'E') => failed.clone(),
                Some(_) => ready.clone(),
            };
            self.server_frame(frame, None);
        }
    }

    /// No connection could be bound (`refusal`): a statement audited ahead
    /// of its batch gets that error as its result.
    pub fn bind_failed(&mut self, refusal: &Refusal) {
        if let Some(Ahead::Stored(pending)) = self.pre_audited.take() {
            self.unrun(vec![Some(pending)], refusal);
        }
    }

    /// A statement audited ahead of its batch that will not run now: its
    /// `result` says so.
    pub fn settle_unexecuted_ahead(&mut self) {
        if let Some(Ahead::Stored(pending)) = self.pre_audited.take() {
            self.results
                .unran(pending, Outcome::NotExecuted { after: None });
        }
    }
}

/// The bound connection's state for [`Core::apply`], when one is bound.
pub type Conn<'c> = Option<ConnState<'c>>;

#[cfg(test)]
mod tests;
