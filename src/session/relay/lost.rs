//! A server connection lost under a client that can go on (a backend
//! restart or failover, `[backend] hosts`): the client gets its request's
//! error as PostgreSQL would send it and keeps its session; its next
//! transaction runs on a new connection (to the new primary).
//!
//! Invariants:
//! - what was in flight is recorded with an unknown outcome (PostgreSQL may
//!   have committed it before the connection went);
//! - a client that was inside a transaction block is told its transaction
//!   is aborted (`ReadyForQuery` `E`), and stays so: its next request runs
//!   on a connection put into an aborted block first, so a `COMMIT` answers
//!   `ROLLBACK` and nothing it sends before ending the block runs outside
//!   a transaction it believes it is in;
//! - a session that cannot go on this way (pinned to the lost connection,
//!   session pooling, a COPY or a large message half through) ends as before.

use super::*;

impl QueryLoop<'_> {
    /// The server connection failed (`why`): the session goes on where it
    /// can, else it ends ([`Self::server_lost`]).
    pub(super) async fn server_gone(&mut self, why: &str) -> Result<(), End> {
        // The health check looks at once: the primary may be gone.
        self.shared.config.backend.primary.recheck();
        if !self.may_go_on() {
            return Err(self.server_lost(why).await);
        }
        tracing::warn!(parent: &self.span, "server connection lost, the session goes on: {why}");
        let in_block = matches!(self.core.seq.tx_status(), b'T' | b'E');
        let pid = self.server.as_ref().map(|s| s.pid);
        for pending in self.core.seq.take_pendings() {
            let mut ev = self
                .core
                .result_event(pending, Outcome::NotExecuted { after: None }, pid);
            ev.status = Some(Status::Unknown);
            ev.message = Some(format!("the server connection was lost: {why}"));
            self.shared.auditor.append_nowait(ev).await;
        }
        self.abandon_ledger().await;
        self.confirming = None;
        if std::mem::take(&mut self.hold_client) {
            self.resume_client = true;
        }
        let error = PgError::error(
            sqlstate::CONNECTION_FAILURE,
            format!("the server connection was lost ({why}); the request's outcome is unknown"),
        );
        self.core
            .fail_in_flight_as(&error, if in_block { b'E' } else { b'I' });
        self.discard_failed_server().await;
        self.lost_in_block = in_block;
        self.flush_client().await
    }

    fn may_go_on(&self) -> bool {
        let seq = &self.core.seq;
        self.mode == PoolMode::Transaction
            && !seq.is_pinned()
            && !seq.copy_in()
            && !seq.streaming_from_client()
            && seq.between_server_messages()
            && !self.client_gone
            && !self.shutting_down
    }

    /// After a lost connection left the client in an aborted transaction
    /// block: the new connection is put into one too, ahead of the client's
    /// message (the gateway's own queries, answered to no one).
    pub(super) fn mirror_lost_block(&mut self) {
        if std::mem::take(&mut self.lost_in_block) {
            self.core.seq.own_query("BEGIN");
            self.core
                .seq
                .own_query(crate::session::sequencer::REFUSED_SQL);
        }
    }
}
