//! The relay's timeouts: how long a client may stay idle, idle inside a
//! transaction, or wait for a statement, and what happens when one fires.

use super::*;

/// Which timeout, if any, the relay is waiting on.
pub(super) enum Timeout {
    ClientIdle,
    IdleInTransaction,
    Query,
}

impl QueryLoop<'_> {
    /// The next timeout that applies in the current state, if configured.
    pub(super) fn next_timeout(&self) -> Option<(Timeout, Instant)> {
        let server = self.shared.live();
        let after = |ms: u64, from: Instant| (ms > 0).then(|| from + Duration::from_millis(ms));
        if !self.seq.owes_nothing() {
            // The server is working for the client.
            let started = self.query_started?;
            if self.cancel_sent {
                return None;
            }
            return after(server.query_timeout_ms, started).map(|at| (Timeout::Query, at));
        }
        // Inside a transaction, or an extended batch the client has not
        // synced (which holds the connection just the same).
        if self.seq.is_bound() && (self.seq.tx_status() != b'I' || self.seq.unsynced()) {
            return after(server.idle_in_transaction_timeout_ms, self.last_activity)
                .map(|at| (Timeout::IdleInTransaction, at));
        }
        after(server.client_idle_timeout_ms, self.last_activity).map(|at| (Timeout::ClientIdle, at))
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
                self.cancel_sent = true;
                self.cancel_note = Some("cancelled by pgwarden: query_timeout_ms elapsed".into());
                if let Some(backend) = self.cancel.backend() {
                    tracing::info!(parent: &self.span, "query_timeout: cancelling the running statement");
                    crate::session::cancel_backend(self.shared, backend).await;
                }
                Ok(())
            }
        }
    }
}
