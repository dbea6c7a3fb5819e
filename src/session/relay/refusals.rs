//! The gateway's refusals (decided by [`crate::session::checks`]): the
//! guard's record of a blocked statement, and the refused message answered
//! in the position PostgreSQL would have answered it, inside a transaction
//! too (`Sequencer::refuse`).

use super::*;
use crate::session::checks::{Checks, Passed, Refused, Rules};

/// A statement longer than this is checked off the threads other sessions
/// run on (the checks are linear, but a megabyte still takes milliseconds).
const LARGE: usize = 64 * 1024;

/// Runs `check` of a statement of `len` bytes, off the runtime's worker
/// threads when it is large.
fn off_thread<R>(len: usize, check: impl FnOnce() -> R) -> R {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if len > LARGE && multi_thread {
        tokio::task::block_in_place(check)
    } else {
        check()
    }
}

impl QueryLoop<'_> {
    /// The session's checks, over its current state.
    pub(super) fn checks(&mut self) -> Checks<'_> {
        Checks {
            rules: Rules {
                guard: &self.shared.guard,
                mode: self.mode,
                session_set: self.shared.config.pool.session_set,
            },
            names: &self.seq.names,
            code: &mut self.seq.code,
            carried: &mut self.carried,
        }
    }

    /// Runs `check` on a statement of `len` bytes ([`off_thread`]).
    pub(super) fn off_thread<R>(&mut self, len: usize, check: impl FnOnce(&mut Checks) -> R) -> R {
        let mut checks = self.checks();
        off_thread(len, || check(&mut checks))
    }

    /// The guard's check of a statement text alone (a batch audited ahead).
    pub(super) fn guard_passes(&self, sql: &[u8]) -> bool {
        off_thread(sql.len(), || self.shared.guard.check(sql).is_ok())
    }

    /// A message passed: what it leaves on the bound connection.
    pub(super) fn passed(&mut self, passed: Passed) {
        if !passed.session_dirty {
            return;
        }
        if let Some(server) = self.server.as_mut() {
            server.custody_mut().mark_dirty(&self.ident.session_id);
        }
    }

    /// Answers a refused message; a statement the guard blocked gets its
    /// `guard_blocked` record first.
    pub(super) async fn refused(&mut self, flow: Flow, refused: Refused) -> Result<(), End> {
        if let (Some(sql), Refusal::Guard(why)) = (&refused.blocked, &refused.refusal) {
            self.record_blocked(sql, why).await;
        }
        self.refuse(flow, refused.refusal).await
    }

    /// Answers a client message with `error` instead of running it (see
    /// `Sequencer::refuse`); a FATAL one ends the session.
    pub(super) async fn refuse(
        &mut self,
        flow: Flow,
        refusal: impl Into<Refusal>,
    ) -> Result<(), End> {
        let refusal = refusal.into();
        let error = refusal.to_wire();
        if error.is_fatal() {
            return Err(End::Fatal(refusal));
        }
        self.seq.refuse(flow, error);
        Ok(())
    }

    /// Records a guard refusal.
    async fn record_blocked(&mut self, sql: &[u8], why: &str) {
        tracing::info!(parent: &self.span, "statement guard: {why}");
        if self.auditing {
            let mut ev = self.event(Kind::GuardBlocked);
            ev.statement = Some(self.carried.client_text(sql).into_owned());
            ev.status = Some(Status::Error);
            ev.sqlstate = Some(sqlstate::INSUFFICIENT_PRIVILEGE.code().to_string());
            ev.message = Some(why.to_string());
            self.shared.auditor.append_nowait(ev).await;
        }
        crate::metrics::Metrics::inc(&self.shared.metrics.guard_blocks);
    }
}
