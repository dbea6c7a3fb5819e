//! The relay's timeouts ([`crate::session::clock`] says which fires next):
//! what happens when one fires.

use super::*;
use crate::session::clock::{Limits, Phase, Timeout};

impl QueryLoop<'_> {
    /// The next timeout that applies in the current state, if configured.
    pub(super) fn next_timeout(&self) -> Option<(Timeout, Instant)> {
        let live = self.shared.live();
        let limits = Limits {
            client_idle_ms: live.client_idle_timeout_ms,
            idle_in_transaction_ms: live.idle_in_transaction_timeout_ms,
            query_ms: live.query_timeout_ms,
        };
        let timeout = self.core.clock.next_timeout(self.phase(), limits);
        match self.large_message_due() {
            Some(at) if timeout.is_none_or(|(_, t)| at < t) => Some((Timeout::LargeMessage, at)),
            _ => timeout,
        }
    }

    /// When the large message being read must be whole, if others wait
    /// for the budget by then (`session::budget`). Not while the gateway
    /// reads nothing from the client.
    fn large_message_due(&self) -> Option<Instant> {
        let grant = self.grant.as_ref()?;
        let max = self.client.max_message_size;
        let arriving = self.reading() && crate::session::budget::arriving(&self.client.rbuf, max);
        arriving.then_some(grant.until)
    }

    /// A large message was not whole in its allowance: its session is
    /// ended if another waits for the memory it holds, and looked at again
    /// in a second if not.
    fn large_message_late(&mut self) -> Result<(), End> {
        let budget = &self.shared.message_budget;
        let Some(grant) = self.grant.as_mut() else {
            return Ok(());
        };
        if !budget.others_wait() {
            grant.until = Instant::now() + std::time::Duration::from_secs(1);
            return Ok(());
        }
        let why = format!(
            "a message of {} bytes did not arrive within {} s while other sessions waited for large_message_memory",
            grant.bytes(),
            crate::session::budget::allowance(grant.bytes()).as_secs()
        );
        tracing::info!(parent: &self.span, "{why}: the session ends");
        Err(terminating(sqlstate::OUT_OF_MEMORY, &why))
    }

    fn phase(&self) -> Phase {
        if self.core.seq.copy_in() {
            Phase::CopyIn
        } else if !self.core.seq.owes_nothing() {
            Phase::Working
        } else if self.core.seq.is_bound()
            && (self.core.seq.tx_status() != b'I' || self.core.seq.unsynced())
        {
            Phase::InTransaction
        } else {
            Phase::Idle
        }
    }

    /// Ends a `COPY` the server waits on, if one runs: PostgreSQL acts on a
    /// cancel only when the client sends more, so the gateway fails the
    /// copy itself (`CopyFail`, which PostgreSQL answers with 57014). In
    /// the middle of a `CopyData` the server cannot be told, and the
    /// connection is given up. False when it was.
    async fn end_copy(&mut self, why: &str) -> bool {
        if !self.core.seq.copy_in() {
            return true;
        }
        if self.core.seq.streaming_from_client() {
            let why = format!("{why} in the middle of a CopyData message");
            self.abandon_server(&why).await;
            return false;
        }
        self.core.seq.fail_copy(&format!("pgwarden: {why}"));
        true
    }

    pub(super) async fn on_timeout(&mut self, which: Timeout) -> Result<(), End> {
        match which {
            Timeout::ClientIdle => Err(End::Fatal(Refusal::ClientIdle)),
            Timeout::LargeMessage => self.large_message_late(),
            Timeout::IdleInTransaction => {
                let why = "idle_in_transaction_timeout_ms elapsed";
                if self.end_copy(why).await {
                    self.roll_back(why).await;
                }
                Err(End::Fatal(Refusal::IdleInTransaction))
            }
            Timeout::Query => {
                let note = "cancelled by pgwarden: query_timeout_ms elapsed";
                self.core.clock.cancelled(note.into(), true);
                if self.core.seq.copy_in() {
                    return match self.end_copy("query_timeout_ms elapsed").await {
                        true => self.flush_server().await,
                        false => Err(End::Fatal(Refusal::Answer(PgError::fatal(
                            sqlstate::QUERY_CANCELED,
                            "canceling COPY: query_timeout_ms elapsed in the middle of a CopyData message",
                        )))),
                    };
                }
                if let Some(backend) = self.cancel.backend() {
                    tracing::info!(parent: &self.span, "query_timeout: cancelling the running statement");
                    crate::session::cancel_backend(self.shared, backend).await;
                }
                Ok(())
            }
        }
    }
}
