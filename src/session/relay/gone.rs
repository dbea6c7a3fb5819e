//! A client that goes away while its server connection still works for it
//! (mid-statement, mid-COPY, inside a transaction), and a session the
//! gateway ends inside a transaction: the gateway finishes the exchange on
//! the client's behalf, records what PostgreSQL really did, rolls the
//! transaction back with a record that says why, and keeps the connection.
//!
//! Invariant: nothing is relayed to a client that is gone; the connection
//! goes back to the pool only idle outside a transaction (the usual release
//! rules), and is destroyed when the exchange cannot be finished (a client
//! frame cut in the middle, the server not answering).

use super::*;

/// How long a vanished client's statement may run on before it is
/// cancelled, and how long the cancel may take before the connection is
/// given up.
const WAIT_BEFORE_CANCEL: Duration = Duration::from_secs(5);
const WAIT_AFTER_CANCEL: Duration = Duration::from_secs(10);

impl QueryLoop<'_> {
    /// The client is gone: finish what it left on the server connection.
    /// Afterwards the connection is idle outside a transaction, released,
    /// or destroyed.
    pub(super) async fn settle_for_gone_client(&mut self) {
        self.client.rbuf.clear();
        if self.server.is_none() || self.core.seq.streaming_from_client() {
            return;
        }
        self.core
            .seq
            .fail_copy("the client disconnected during COPY");
        self.roll_back("the client disconnected inside a transaction")
            .await;
    }

    /// Rolls back what the client left open, on the gateway's initiative:
    /// an extended batch it never synced (which must not commit), then an
    /// open transaction, with a `query` record of the `ROLLBACK` that names
    /// the gateway and `why`. Waits for the server; nothing of it reaches
    /// the client.
    pub(super) async fn roll_back(&mut self, why: &str) {
        self.client_gone = true;
        self.core.seq.resume();
        self.core.seq.abort_unsynced(PgError::error(
            sqlstate::CONNECTION_FAILURE,
            "the batch was abandoned",
        ));
        if self.flush_server().await.is_err() || !self.wait_for_server(why).await {
            return;
        }
        if self.server.is_none() || self.core.seq.tx_status() == b'I' {
            return;
        }
        let note = format!("issued by pgwarden: {why}");
        // A store failure does not stop the rollback.
        let pending = match self.core.own_record("ROLLBACK", &note) {
            Some(record) => self.store_query(record).await.unwrap_or_default(),
            None => None,
        };
        self.core.seq.own_query_unregistered("ROLLBACK");
        self.core.seq.expect().query(pending, None);
        if self.flush_server().await.is_ok() {
            self.wait_for_server(why).await;
        }
    }

    /// Reads the server's answers (recorded, relayed nowhere) until it owes
    /// nothing, cancelling the running statement after a while. False when
    /// the connection had to be given up.
    async fn wait_for_server(&mut self, why: &str) -> bool {
        let mut cancelled = false;
        let mut deadline = tokio::time::Instant::now() + WAIT_BEFORE_CANCEL;
        while !self.core.seq.owes_nothing() {
            let Some(server) = self.server.as_mut() else {
                return true;
            };
            match tokio::time::timeout_at(deadline, server.fill()).await {
                Ok(Ok(_)) => {
                    if self.on_server_data().await.is_err() {
                        return false;
                    }
                }
                Ok(Err(e)) => {
                    self.server_lost(&e.to_string()).await;
                    return false;
                }
                Err(_) if !cancelled => {
                    cancelled = true;
                    deadline = tokio::time::Instant::now() + WAIT_AFTER_CANCEL;
                    let note = format!(
                        "cancelled by pgwarden: {why}, and the statement ran on for {} s",
                        WAIT_BEFORE_CANCEL.as_secs()
                    );
                    self.core.clock.cancelled(note, false);
                    if let Some(backend) = self.cancel.backend() {
                        crate::session::cancel_backend(self.shared, backend).await;
                    }
                }
                Err(_) => {
                    self.abandon_server("the server did not answer after the client disconnected")
                        .await;
                    return false;
                }
            }
        }
        true
    }
}
