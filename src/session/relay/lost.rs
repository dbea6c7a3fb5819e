//! A server connection lost under a client that can go on (a backend
//! restart or failover, `[backend] hosts`): the client gets its request's
//! error as PostgreSQL would send it and keeps its session; its next
//! transaction runs on a new connection (to the new primary).
//!
//! Invariants:
//! - what was in flight is recorded with an unknown outcome (PostgreSQL may
//!   have run it before the connection went); a transaction block that
//!   nothing in flight could end (no `COMMIT`, `ROLLBACK`...) is recorded
//!   rolled back, since PostgreSQL cannot commit it without one;
//! - a client inside such a block learns its transaction is gone from an
//!   error, never from a later answer alone: the request in flight gets
//!   08006; if none was, the client's next request does (a `ROLLBACK`
//!   excepted, which gets what it asked for). It stays in an aborted block
//!   (`ReadyForQuery` `E`) whose next connection is put into one too, so a
//!   `COMMIT` answers `ROLLBACK` and nothing it sends before ending the
//!   block runs outside a transaction it believes it is in;
//! - a request in flight that ends the block (`COMMIT`) leaves the client
//!   idle, as a failed `COMMIT` does in PostgreSQL: the error says its
//!   outcome is unknown;
//! - client messages waiting behind the lost request are taken again, and
//!   the rest of an unsynced batch is skipped to its `Sync`;
//! - a session that cannot go on this way (pinned to the lost connection,
//!   session pooling, a COPY or a large message half through) ends as before.

use super::run::Held;
use super::*;
use crate::audit::TxOutcome;
use crate::session::commits::Commits;

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
        let seq = &mut self.core.seq;
        let ending = seq.code.ending();
        let in_block = matches!(seq.tx_status(), b'T' | b'E') && !ending;
        // No Sync went since the batch's last answer: its implicit
        // transaction was not committed either.
        let rolled_back = (in_block || seq.unsynced()) && !ending;
        // A batch whose messages were all answered but whose Sync was not
        // (or not sent yet) has had no error: it gets one, or the client
        // would take the Sync's answer for a commit.
        let untold_batch = seq.expect().sync_first() || (seq.unsynced() && seq.owes_nothing());
        let told = seq.tx_status() == b'E' || !seq.owes_nothing() || seq.unsynced();
        let pid = self.server.as_ref().map(|s| s.pid);
        for pending in self.core.seq.take_pendings() {
            let mut ev = self
                .core
                .result_event(pending, Outcome::NotExecuted { after: None }, pid);
            ev.status = Some(Status::Unknown);
            ev.message = Some(format!("the server connection was lost: {why}"));
            if rolled_back {
                ev.tx = Some(TxOutcome::RolledBack);
            }
            self.shared.auditor.append_nowait(ev).await;
        }
        self.write_results(match rolled_back {
            true => Held::RolledBack,
            false => Held::Unknowable,
        })
        .await;
        self.confirming = None;
        self.hold_client = false;
        // Whatever waits in the client's buffer is taken again.
        self.resume_client = true;
        let error = PgError::error(
            sqlstate::CONNECTION_FAILURE,
            format!("the server connection was lost ({why}); the request's outcome is unknown"),
        );
        let status = if in_block { b'E' } else { b'I' };
        if rolled_back {
            // Settings it changed are undone, as a rollback undoes them.
            let core = &mut self.core;
            core.carried.roll_back(core.seq.client_out());
        }
        if untold_batch {
            error.encode(self.core.seq.client_out());
        }
        self.core.fail_in_flight_as(&error, status);
        self.discard_failed_server().await;
        self.core.seq.connection_lost(status);
        self.lost_block = in_block.then_some(match told {
            true => LostBlock::Told,
            false => LostBlock::Untold,
        });
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

    /// Before a connection is bound after a lost connection left the
    /// client in an aborted block: a client not told yet gets its error
    /// instead (its request is refused); otherwise the new connection is
    /// put into an aborted block too, ahead of the client's message (the
    /// gateway's own queries, answered to no one).
    pub(super) fn lost_block_before_bind(&mut self) -> Result<(), Refusal> {
        if self.lost_block == Some(LostBlock::Untold) {
            self.lost_block = Some(LostBlock::Told);
            return Err(Refusal::Answer(PgError::error(
                sqlstate::CONNECTION_FAILURE,
                "the server connection was lost while the transaction was open: the transaction was rolled back",
            )));
        }
        Ok(())
    }

    /// After [`Self::lost_block_before_bind`], with the new connection
    /// bound.
    pub(super) fn mirror_lost_block(&mut self) {
        if self.lost_block.take().is_some() {
            self.core.seq.own_query("BEGIN");
            self.core
                .seq
                .own_query(crate::session::sequencer::REFUSED_SQL);
        }
    }

    /// A client not told of its lost block that asks to roll back needs no
    /// error: its `ROLLBACK` gets what it asked for.
    pub(super) fn rollback_tells(&mut self, frame: &[u8]) {
        if self.lost_block == Some(LostBlock::Untold)
            && frame.first() == Some(&b'Q')
            && messages::parse_query(&frame[5..])
                .is_ok_and(|q| Commits::rolls_back_first(q) && Commits::of(q).rolls_back)
        {
            self.lost_block = Some(LostBlock::Told);
        }
    }
}

/// A lost server connection left the client in an aborted block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LostBlock {
    /// The client knows (it was answered an error, or `E`).
    Told,
    /// It does not yet: its next request is answered with the error.
    Untold,
}
