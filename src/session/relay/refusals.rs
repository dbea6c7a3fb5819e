//! The gateway's refusals: the statement guard's check, its audit record,
//! and the refused message answered in the position PostgreSQL would have
//! answered it, inside a transaction too (`Sequencer::refuse`).

use super::*;

impl QueryLoop<'_> {
    /// Runs the statement guard; a large statement is checked off the
    /// threads other sessions run on (the check is linear, but a megabyte
    /// still takes milliseconds).
    /// `parse`: the text of a `Parse`, which may leave `set_config`'s
    /// setting name to a bound parameter (the ones returned).
    pub(super) fn check_guard(
        &self,
        sql: &[u8],
        parse: bool,
    ) -> Result<Vec<u16>, crate::identity::Violation> {
        const LARGE: usize = 64 * 1024;
        let guard = &self.shared.guard;
        let check = || match parse {
            true => guard.check_parse(sql),
            false => guard.check(sql).map(|()| Vec::new()),
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if sql.len() > LARGE && multi_thread {
            tokio::task::block_in_place(check)
        } else {
            check()
        }
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

    /// Records a guard refusal and builds the client's error.
    pub(super) async fn blocked(&mut self, sql: &[u8], why: &str) -> Refusal {
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
        Refusal::Guard(why.to_string())
    }
}
