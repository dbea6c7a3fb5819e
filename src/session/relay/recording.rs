//! What the audit log gets for the statements of the query phase: the
//! `query` record stored before a statement is forwarded (or before its
//! batch takes a connection), the statement text and parameters its
//! portals and cursors resolve to, and the records of statements that
//! never ran.
//!
//! Invariant: a `query` record is stored before any message that can run
//! its statement is sent to the server.

use super::*;
use crate::session::ledger::Control;

/// A statement as its `query` record shows it: text and audited parameters.
pub(super) type Audited = (Bytes, Option<Vec<Option<String>>>);

/// How the first `Execute` of a batch fared when it was audited ahead.
pub(super) enum Ahead {
    /// Its `query` record is stored.
    Stored(Pending),
    /// The store failed and `on_failure = "allow"`: it runs unaudited.
    Unaudited,
    /// The store failed: it is refused.
    Failed(Refusal),
}

impl QueryLoop<'_> {
    /// Remembers the cursors a statement declares, so that an `Execute` of
    /// such a portal is recorded with the statement it runs.
    pub(super) fn note_cursors(&mut self, sql: &Bytes) {
        if !self.auditing {
            return;
        }
        for (name, text) in prepared::declared_cursors(sql) {
            let portal = Portal {
                sql: sql.slice_ref(text),
                params: None,
                copies_in: false,
            };
            self.seq.names.portals.insert(Bytes::from(name), portal);
        }
    }

    /// Stores a statement's `query` record, then binds a server connection
    /// for it. The record comes first so that, between transactions, no
    /// pooled connection idles while the record waits for its fsync (with
    /// `group`, a pool of 20 would otherwise serve at most 20 fsync waits at
    /// a time). Such a record has no `backend_pid`; its `result` has it, and
    /// `export` joins it in. If no connection can be had, the statement's
    /// `result` records the error it got.
    pub(super) async fn audit_and_bind(
        &mut self,
        sql: &[u8],
        params: Option<Vec<Option<String>>>,
    ) -> Result<Option<Pending>, Refusal> {
        let pending = self.audit_statement(sql, params).await?;
        self.bind_for(pending).await
    }

    /// [`Self::audit_and_bind`] for a simple query of several statements
    /// (`parts` of `sql`): one `query` record each, in order, all stored
    /// before any is sent. If a record cannot be stored or no connection
    /// can be had, those already stored record the error.
    pub(super) async fn audit_each_and_bind(
        &mut self,
        sql: &[u8],
        parts: Vec<std::ops::Range<usize>>,
    ) -> Result<Vec<Option<Pending>>, Refusal> {
        let mut pendings = Vec::with_capacity(parts.len());
        for part in parts {
            match self.audit_statement(&sql[part], None).await {
                // `None` (on_failure = "allow") keeps its place.
                Ok(p) => pendings.push(p),
                Err(e) => {
                    for p in pendings.into_iter().flatten() {
                        self.unrun(p, &e);
                    }
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.bind_server().await {
            for p in pendings.into_iter().flatten() {
                self.unrun(p, &e);
            }
            return Err(e);
        }
        if let Some(Some(first)) = pendings.first_mut() {
            first.started = Instant::now();
        }
        Ok(pendings)
    }

    /// Binds a server connection for a statement whose record is stored
    /// (`pending`). If none can be had, its `result` records the error;
    /// otherwise its duration starts now, so it is the statement's own and
    /// not the wait for a connection.
    pub(super) async fn bind_for(
        &mut self,
        mut pending: Option<Pending>,
    ) -> Result<Option<Pending>, Refusal> {
        if let Err(e) = self.bind_server().await {
            if let Some(pending) = pending {
                self.unrun(pending, &e);
            }
            return Err(e);
        }
        if let Some(pending) = pending.as_mut() {
            pending.started = Instant::now();
        }
        Ok(pending)
    }

    /// A statement audited ahead of its batch that will not run now: its
    /// `result` says so.
    pub(super) fn settle_unexecuted_ahead(&mut self) {
        if let Some(Ahead::Stored(pending)) = self.pre_audited.take() {
            self.results
                .unran(pending, Outcome::NotExecuted { after: None });
        }
    }

    /// Whether the client's buffered messages, before the next `Sync` or
    /// `Flush`, hold an `Execute` of `portal`: its `query` record is then
    /// stored before any of them is sent (they go out together).
    pub(super) fn execute_follows(&self, portal: &[u8]) -> bool {
        let buf = &self.client.rbuf[..];
        let mut at = 0;
        while let Ok(Some(header)) = FrameHeader::peek(&buf[at..], self.client.max_message_size) {
            let end = at + header.total;
            if end > buf.len() {
                return false;
            }
            match header.tag {
                b'E' if messages::parse_execute(&buf[at + 5..end]).is_ok_and(|p| p == portal) => {
                    return true
                }
                b'S' | b'H' => return false,
                _ => {}
            }
            at = end;
        }
        false
    }

    /// The text of the client's statement `name`, as its portals record it
    /// (empty when the name is unknown: the server reports that itself).
    pub(super) fn statement_sql(&self, name: &[u8]) -> Bytes {
        self.seq
            .names
            .statements
            .get(name)
            .map(|s| s.sql.clone())
            .unwrap_or_default()
    }

    /// The parameters of `bind` as its `query` record shows them: only
    /// with `log_parameters`.
    pub(super) fn audited_params(
        &self,
        bind: &messages::BindView<'_>,
    ) -> Result<Option<Vec<Option<String>>>, ProtocolError> {
        if !self.shared.live().log_parameters {
            return Ok(None);
        }
        bind.params_for_audit(self.carried.client_encoding())
            .map(Some)
    }

    /// What the `query` record of an `Execute` of portal `name` shows.
    pub(super) fn portal_audited(&self, name: &[u8]) -> Audited {
        match self.seq.names.portals.get(name) {
            Some(p) => (p.sql.clone(), p.params.clone()),
            // A portal opened by code the gateway cannot see (a cursor a
            // function returned): say which.
            None => (
                Bytes::from(format!(
                    "-- Execute of portal \"{}\" (opened by code pgwarden cannot see)",
                    String::from_utf8_lossy(name)
                )),
                None,
            ),
        }
    }

    /// Records that the statement of `pending` never reached a server
    /// because no connection could be bound (`error`).
    pub(super) fn unrun(&mut self, pending: Pending, refusal: &Refusal) {
        let error = refusal.to_wire();
        let outcome = Outcome::Error {
            code: error.code.code().to_string(),
            message: error.message.clone(),
        };
        self.results.unran(pending, outcome);
    }

    /// Between transactions, stores the `query` record of the first
    /// `Execute` of the client's buffered batch before the batch's `Parse`
    /// or `Bind` takes a server connection, so that no pooled connection
    /// idles through the record's fsync ([`Self::audit_and_bind`] does the
    /// same for a simple `Query`). The record is the one `on_execute` would
    /// write; it is left to `on_execute` when the batch is not a plain run
    /// of `Parse`/`Bind`/`Describe`/`Flush` up to that `Execute`, is not all
    /// buffered yet, or holds anything the gateway refuses: a statement the
    /// guard blocks, a use of an unnamed statement it has not parsed
    /// ([`Self::check_unnamed`]), a message too large or malformed.
    pub(super) async fn audit_ahead(&mut self) {
        let between_transactions = self.server.is_none()
            && self.pre_audited.is_none()
            && !self.seq.discarding()
            && !self.seq.streaming_from_client();
        if !self.auditing || !between_transactions {
            return;
        }
        let Some((sql, params)) = self.first_execute_ahead() else {
            return;
        };
        self.pre_audited = Some(match self.audit_statement(&sql, params).await {
            Ok(Some(pending)) => Ahead::Stored(pending),
            Ok(None) => Ahead::Unaudited,
            Err(e) => Ahead::Failed(e),
        });
    }

    /// The statement text and audited parameters the first buffered
    /// `Execute` will have, from the `Parse` and `Bind` messages before it
    /// and the session's statements and portals (as `on_bind` and
    /// `on_execute` resolve them).
    pub(super) fn first_execute_ahead(&self) -> Option<Audited> {
        let buf = &self.client.rbuf[..];
        let mut parsed: Vec<(&[u8], &[u8])> = Vec::new();
        let mut bound: Vec<(&[u8], Audited)> = Vec::new();
        let unnamed_known = |parsed: &[(&[u8], &[u8])], name: &[u8]| {
            !name.is_empty()
                || parsed.iter().any(|(n, _)| n.is_empty())
                || self.seq.names.check_unnamed(name).is_ok()
        };
        let mut at = 0;
        loop {
            let header = FrameHeader::peek(&buf[at..], self.client.max_message_size).ok()??;
            let end = at + header.total;
            if end > buf.len() {
                return None;
            }
            let body = &buf[at + 5..end];
            match header.tag {
                b'P' => {
                    let parse = messages::parse_parse(body).ok()?;
                    if !self.guard_passes(parse.query) {
                        return None;
                    }
                    parsed.push((parse.name, parse.query));
                }
                b'B' => {
                    let bind = messages::parse_bind(body).ok()?;
                    if !unnamed_known(&parsed, bind.statement) {
                        return None;
                    }
                    let sql = match parsed
                        .iter()
                        .rev()
                        .find(|(name, _)| *name == bind.statement)
                    {
                        Some((_, query)) => Bytes::copy_from_slice(query),
                        None => self.statement_sql(bind.statement),
                    };
                    let params = self.audited_params(&bind).ok()?;
                    bound.push((bind.portal, (sql, params)));
                }
                b'D' => {
                    let (kind, name) = messages::parse_close_or_describe(body).ok()?;
                    if kind == b'S' && !unnamed_known(&parsed, name) {
                        return None;
                    }
                }
                b'H' => {}
                b'E' => {
                    let name = messages::parse_execute(body).ok()?;
                    return Some(match bound.into_iter().rev().find(|(p, _)| *p == name) {
                        Some((_, audited)) => audited,
                        None => self.portal_audited(name),
                    });
                }
                _ => return None,
            }
            at = end;
        }
    }

    /// Writes a statement's `query` record ahead of forwarding it.
    pub(super) async fn audit_statement(
        &mut self,
        sql: &[u8],
        params: Option<Vec<Option<String>>>,
    ) -> Result<Option<Pending>, Refusal> {
        if !self.auditing {
            return Ok(None);
        }
        let mut ev = self.event(Kind::Query);
        ev.statement = Some(self.carried.client_text(sql).into_owned());
        ev.params = params;
        // From the bytes the server runs, not the recorded text (which may
        // be the bytes in hex).
        self.store_query(ev, Control::of(sql)).await
    }

    /// Writes the `query` record of a statement the gateway sends on its
    /// own initiative, with `note` saying why.
    pub(super) async fn audit_note(
        &mut self,
        sql: &str,
        note: &str,
    ) -> Result<Option<Pending>, Refusal> {
        if !self.auditing {
            return Ok(None);
        }
        let mut ev = self.event(Kind::Query);
        ev.statement = Some(sql.to_string());
        ev.message = Some(note.to_string());
        self.store_query(ev, Control::of(sql.as_bytes())).await
    }

    /// Stores a `query` record before its statement is forwarded.
    pub(super) async fn store_query(
        &mut self,
        mut ev: Event,
        control: Control,
    ) -> Result<Option<Pending>, Refusal> {
        let ticket = self.shared.auditor.ticket();
        ev.backend_pid = self.server.as_ref().map(|s| s.pid);
        ev.link = Link::Query(ticket);
        let started = Instant::now();
        let appended = self.shared.auditor.append_ahead(ev).await;
        self.shared.metrics.audit_append(started.elapsed());
        match appended {
            Ok(()) => Ok(Some(Pending {
                ticket,
                started: Instant::now(),
                control,
            })),
            Err(e) if self.shared.auditor.on_failure() == OnFailure::Allow => {
                tracing::error!(parent: &self.span,
                    "audit store failed, statement allowed by on_failure = \"allow\": {e}"
                );
                Ok(None)
            }
            Err(e) => {
                tracing::error!(parent: &self.span, "audit store failed, statement refused: {e}");
                Err(Refusal::Audit(e.to_string()))
            }
        }
    }

    /// Records the outcomes the last server messages resolved.
    pub(super) async fn record_results(&mut self) {
        // Out of `self` while `result_event` reads the session.
        let mut results = std::mem::take(&mut self.results);
        let events = results.drain(|p, o| self.result_event(p, o));
        self.results = results;
        for ev in events {
            self.shared.auditor.append_nowait(ev).await;
        }
    }

    /// Results held for a transaction whose outcome can no longer be known
    /// (the server connection is gone): written with `tx = unknown`.
    pub(super) async fn abandon_ledger(&mut self) {
        let mut results = std::mem::take(&mut self.results);
        let events = results.abandon(|p, o| self.result_event(p, o));
        self.results = results;
        for ev in events {
            self.shared.auditor.append_nowait(ev).await;
        }
    }

    /// An audit event of this session: its identity, and the application
    /// name the client uses now.
    pub(super) fn event(&self, kind: Kind) -> Event {
        let mut ev = self.ident.event(kind);
        ev.application_name = self.carried.application_name();
        ev
    }

    pub(super) fn result_event(&self, pending: Pending, outcome: Outcome) -> Event {
        let mut ev = self.event(Kind::Result);
        ev.link = Link::Result(pending.ticket);
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
        }
        ev
    }
}
