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
        self.core.clock.next_timeout(self.phase(), limits)
    }

    fn phase(&self) -> Phase {
        if !self.core.seq.owes_nothing() {
            Phase::Working
        } else if self.core.seq.is_bound()
            && (self.core.seq.tx_status() != b'I' || self.core.seq.unsynced())
        {
            Phase::InTransaction
        } else {
            Phase::Idle
        }
    }

    pub(super) async fn on_timeout(&mut self, which: Timeout) -> Result<(), End> {
        match which {
            Timeout::ClientIdle => Err(End::Fatal(Refusal::ClientIdle)),
            Timeout::IdleInTransaction => {
                self.roll_back("idle_in_transaction_timeout_ms elapsed")
                    .await;
                Err(End::Fatal(Refusal::IdleInTransaction))
            }
            Timeout::Query => {
                self.core.clock.cancelled(
                    "cancelled by pgwarden: query_timeout_ms elapsed".into(),
                    true,
                );
                if let Some(backend) = self.cancel.backend() {
                    tracing::info!(parent: &self.span, "query_timeout: cancelling the running statement");
                    crate::session::cancel_backend(self.shared, backend).await;
                }
                Ok(())
            }
        }
    }
}
