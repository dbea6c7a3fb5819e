//! The gateway's refusals: the statement guard's check, and a refused
//! message answered in the position PostgreSQL would have answered it,
//! inside a transaction too (see [`QueryLoop::refuse`]).

use super::*;
use crate::session::commits::Commits;

/// Why a request that commits after opaque code and goes on is refused.
pub(super) const COMMIT_THEN_MORE: &str = "a request must not start another transaction after COMMIT once code pgwarden cannot see has run in it (COMMIT AND CHAIN, a DO block that commits, statements after COMMIT): pgwarden asserts identity afresh between transactions; send them separately";

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

    /// Answers a client message with `error` instead of running it.
    ///
    /// When nothing is in flight, the gateway answers by itself; inside a
    /// transaction the client is told it is aborted (`E`) while the server's
    /// transaction stays open and untouched, until the client's next
    /// request ([`Self::settle_local_abort`]): its `ROLLBACK` goes to the
    /// server as it is, and anything else first makes the server's
    /// transaction fail too. So a refusal leaves no error in the server's
    /// log unless the client goes on inside the aborted transaction.
    ///
    /// With requests in flight (a pipeline) the server's transaction state
    /// at this point is not known yet: the statement is replaced by one that
    /// fails, so the server aborts exactly as PostgreSQL would.
    pub(super) async fn refuse(&mut self, flow: Flow, error: PgError) -> Result<(), End> {
        if error.is_fatal() {
            return Err(End::Fatal(error));
        }
        let in_flight = !self.tracker.is_empty() || self.unsynced || self.copy_in;
        if self.server.is_some() && !in_flight {
            error.encode(&mut self.to_client);
            if self.tx_status == b'T' {
                self.tx_status = b'E';
                self.aborted_locally = true;
            }
            match flow {
                Flow::Simple => messages::ready_for_query(&mut self.to_client, self.tx_status),
                Flow::Extended => {
                    self.discard_until_sync = true;
                    self.local_sync = true;
                }
            }
            return Ok(());
        }
        match (flow, self.server.is_some()) {
            (Flow::Simple, true) => {
                self.send_own_query(REFUSED_SQL);
                self.tracker.query(None, Some(error));
            }
            (Flow::Simple, false) => {
                error.encode(&mut self.to_client);
                messages::ready_for_query(&mut self.to_client, self.tx_status);
            }
            (Flow::Extended, true) => {
                self.send_failing_parse();
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

    /// The client's transaction was aborted by a refusal the server did not
    /// see ([`Self::refuse`]) and `frame` starts its next request: a simple
    /// query starting with `ROLLBACK` (or `ROLLBACK TO SAVEPOINT`) goes to
    /// the server as it is,
    /// since the server's open transaction ends (or rewinds) the same way;
    /// a lone `Sync` is answered `E`; anything else is preceded by a
    /// statement that fails, so the server answers it exactly as
    /// PostgreSQL answers in an aborted transaction (25P02, `ROLLBACK` for
    /// `COMMIT`).
    pub(super) fn settle_local_abort(&mut self, frame: &[u8]) {
        let starts_request = match frame[0] {
            b'Q' | b'F' => true,
            b'P' | b'B' | b'D' | b'C' | b'E' | b'S' => !self.unsynced && !self.discard_until_sync,
            _ => false,
        };
        if !self.aborted_locally || !starts_request {
            return;
        }
        if frame[0] == b'S' {
            self.local_sync = true;
            return;
        }
        self.aborted_locally = false;
        // Only a simple query runs what it says at once: a `Parse` or
        // `Bind` of `ROLLBACK` may be followed by anything before it runs.
        let rolls_back = frame[0] == b'Q'
            && messages::parse_query(&frame[5..]).is_ok_and(Commits::rolls_back_first);
        if rolls_back {
            return;
        }
        self.send_own_query(REFUSED_SQL);
        self.tracker.injected();
    }

    /// Records a guard refusal and builds the client's error.
    pub(super) async fn blocked(&mut self, sql: &[u8], why: &str) -> PgError {
        tracing::info!(parent: &self.span, "statement guard: {why}");
        if self.auditing {
            let mut ev = self.event(Kind::GuardBlocked);
            ev.statement = Some(self.client_text(sql).into_owned());
            ev.status = Some(Status::Error);
            ev.sqlstate = Some(sqlstate::INSUFFICIENT_PRIVILEGE.code().to_string());
            ev.message = Some(why.to_string());
            self.shared.auditor.append_nowait(ev).await;
        }
        crate::metrics::Metrics::inc(&self.shared.metrics.guard_blocks);
        PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, why.to_string())
    }
}
