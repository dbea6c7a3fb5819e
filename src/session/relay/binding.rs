//! The server connection's life within a session: binding it (reset of
//! another session's state, identity assertion), the settings read back
//! from it, verification, release, loss and the end of the session.
//!
//! Invariant: a server connection serves this client only after it carries
//! this client's identity and settings, and goes back to the pool only idle
//! and, for another client, reset.

use super::confirm::Confirming;
use super::*;
use crate::backend::custody::Wanted;
use crate::identity::tag::Backend;
use crate::session::kept;

impl QueryLoop<'_> {
    /// `[pool] session_set = "keep"`, at the end of a transaction that may
    /// have changed settings for the session: reads their values back from
    /// the server (which knows whether the change committed) and keeps them
    /// for every connection that serves this client.
    pub(super) async fn keep_session_settings(&mut self) {
        let names = self.core.carried.take_pending();
        if names.is_empty() {
            return;
        }
        let Some(server) = self.server.as_mut() else {
            return;
        };
        // A simple query: it drops the connection's unnamed statement.
        self.core.seq.unnamed_lost();
        match kept::read(server, &names).await {
            Ok(values) => {
                self.core.carried.keep(values);
                server
                    .custody_mut()
                    .settings_changed(&self.ident.session_id, self.core.carried.values().clone());
            }
            Err(e) => {
                if !matches!(e, crate::backend::conn::BackendError::Server(_)) {
                    server.mark_broken();
                }
                tracing::warn!(parent: &self.span, "could not read back the session's settings: {e}");
            }
        }
    }

    /// Binds a server connection if none is bound: acquires one and asserts
    /// the client's identity on it. If none can be bound, a statement whose
    /// record was written ahead of the batch gets that error as its result.
    pub(super) async fn bind_server(&mut self) -> Result<(), Refusal> {
        let bound = self.bind_server_now().await;
        if let Err(e) = &bound {
            self.core.bind_failed(e);
        }
        bound
    }

    /// What binding does on a connection bound already: whether the end of
    /// the transaction is verified follows the live setting.
    pub(super) fn note_bound(&mut self) {
        self.core.verify_due = self.shared.live().verify == VerifyMode::Transaction;
    }

    async fn bind_server_now(&mut self) -> Result<(), Refusal> {
        self.note_bound();
        if self.server.is_some() {
            return self.rebind_kept().await;
        }
        self.lost_block_before_bind()?;
        let mut conn = self.acquire().await?;
        let key = self.tag_key().await;
        let preparation = conn.prepare_for(&Wanted {
            session: &self.ident.session_id,
            role: &self.ident.role,
            client_user: &self.ident.client_user,
            settings: self.core.carried.values(),
            tag_key: key.as_ref().map(|k| k.id),
        });
        if preparation.reset {
            crate::metrics::Metrics::inc(&self.shared.metrics.server_resets);
        }
        // The reset clears what another session may have left (settings,
        // cursors, LISTENs, advisory locks, temp objects, sequence state,
        // SQL-level prepared statements, and with them the shared
        // statements); it goes inside the assertion's transaction.
        let pipelined = preparation.assert.then(|| {
            let reset = preparation
                .reset
                .then(|| crate::session::state::reset_sql(crate::session::state::RESET_SQL));
            self.pipeline_assertion(&mut conn, reset.as_deref(), key)
        });
        self.cancel.bind(BackendKey {
            pid: conn.pid,
            secret: conn.secret,
        });
        // Whatever unnamed statement this connection holds is another
        // binding's: the client's is parsed again before it is used.
        self.server = Some(conn);
        self.core.seq.bound();
        self.core.seq.unnamed_lost();
        if let Some((bytes, confirming)) = pipelined {
            // First in the write that carries the client's message: PostgreSQL
            // runs the client's message only if all of it succeeded.
            self.core.seq.wire().extend_from_slice(&bytes);
            self.confirming = Some(confirming);
        }
        self.mirror_lost_block();
        if preparation.discard_sequences {
            // Sent ahead of the client's first message, in the same write;
            // its answers are the gateway's.
            self.core.seq.own_query("DISCARD SEQUENCES");
        }
        Ok(())
    }

    /// The connection kept across transactions (pinned, or session
    /// pooling): a new transaction after opaque code, or under a new tag
    /// key, gets a fresh assertion.
    async fn rebind_kept(&mut self) -> Result<(), Refusal> {
        if !self.core.seq.between_transactions() {
            return Ok(());
        }
        let key = self.tag_key().await;
        let Some(mut conn) = self.server.take() else {
            return Ok(());
        };
        let result = match conn.custody().needs_reassert(key.as_ref().map(|k| k.id)) {
            true => self.reassert(&mut conn, key).await,
            false => Ok(()),
        };
        match result {
            Ok(()) => {
                self.server = Some(conn);
                Ok(())
            }
            Err(e) => {
                self.core.seq.unbound();
                self.cancel.unbind().await;
                pool::discard(conn);
                Err(e)
            }
        }
    }

    /// A connection from this session's pool.
    async fn acquire(&mut self) -> Result<PooledConn, Refusal> {
        // Console PAUSE: wait for RESUME (e.g. while PostgreSQL restarts).
        self.shared.while_paused().await;
        crate::metrics::Metrics::inc(&self.shared.metrics.pool_waits);
        let pool = match self.pool.take() {
            Some(pool) => pool,
            None => self.shared.pools.pool_for(
                &self.ident.database,
                &self.ident.role,
                &self.ident.client_user,
            )?,
        };
        let waiting = Instant::now();
        let acquired = self.shared.pools.acquire(&pool).await;
        self.stats.wait_us += waiting.elapsed().as_micros() as u64;
        self.bound_at = Some(Instant::now());
        self.pool = Some(pool);
        acquired.map_err(|e| {
            if e.is_exhausted() {
                crate::metrics::Metrics::inc(&self.shared.metrics.pool_timeouts);
            }
            Refusal::Acquire(e)
        })
    }

    /// Asserts this client's identity and settings on `conn` (one round
    /// trip, nothing else in flight), the client name signed with `key`
    /// when the database has one. Made between transactions, it also
    /// clears the connection's opaque mark.
    async fn reassert(
        &mut self,
        conn: &mut PooledConn,
        key: Option<crate::identity::tag::TagKey>,
    ) -> Result<(), Refusal> {
        let tag = self.start_assertion(conn, key);
        let assertion = Assertion {
            settings: self.core.carried.values(),
            tag: tag.as_ref().map(|(_, value)| value.as_ref()),
            ..self.assertion()
        };
        if let Err(e) = assertion.apply(conn).await {
            tracing::warn!(parent: &self.span, "identity assertion failed: {e}");
            return Err(e.into());
        }
        conn.custody_mut().asserted(
            (self.ident.role.clone(), self.ident.client_user.clone()),
            self.core.carried.values().clone(),
            tag,
        );
        Ok(())
    }

    /// The assertion (after `reset`, if any) for the same write as the
    /// client's first message: its bytes, and what reads its answers
    /// ([`Confirming`]).
    fn pipeline_assertion(
        &mut self,
        conn: &mut PooledConn,
        reset: Option<&str>,
        key: Option<crate::identity::tag::TagKey>,
    ) -> (BytesMut, Confirming) {
        let tag = self.start_assertion(conn, key);
        let assertion = Assertion {
            settings: self.core.carried.values(),
            tag: tag.as_ref().map(|(_, value)| value.as_ref()),
            ..self.assertion()
        };
        let mut bytes = BytesMut::with_capacity(512);
        let check = assertion.encode_pipelined(reset, &mut bytes);
        // Recorded now, before the client's messages can mark the connection
        // (opaque code, settings): if the assertion fails, the connection
        // is discarded with its custody.
        conn.custody_mut().asserted(
            (self.ident.role.clone(), self.ident.client_user.clone()),
            self.core.carried.values().clone(),
            tag,
        );
        let confirming = Confirming {
            check,
            reset: reset.is_some(),
        };
        (bytes, confirming)
    }

    /// What every assertion does first: counts it, forgets the identity the
    /// connection carried, and signs the client tag with `key` for this
    /// backend.
    fn start_assertion(
        &mut self,
        conn: &mut PooledConn,
        key: Option<crate::identity::tag::TagKey>,
    ) -> Option<(i32, Arc<str>)> {
        crate::metrics::Metrics::inc(&self.shared.metrics.identity_assertions);
        conn.custody_mut().forget_identity();
        // The assertion replaces (and closes) the connection's unnamed
        // statement: the client's own is parsed again before its next use.
        self.core.seq.unnamed_lost();
        let backend = conn.started_us.map(|started_us| Backend {
            pid: conn.pid,
            started_us,
        });
        key.zip(backend).map(|(k, backend)| {
            let value = k.sign_fresh(&self.ident.client_user, &self.ident.role, backend);
            (k.id, Arc::from(value))
        })
    }

    /// The database's tag key, when the client tag is signed.
    async fn tag_key(&self) -> Option<crate::identity::tag::TagKey> {
        self.shared.tags.signing_key(&self.ident.database).await
    }

    /// The identity this client's connections must carry.
    pub(super) fn assertion(&self) -> Assertion<'_> {
        Assertion {
            role: &self.ident.role,
            setting: &self.shared.config.identity.client_user_setting,
            client_user: &self.ident.client_user,
            tag: None,
            settings: &[],
        }
    }

    /// `verify = "transaction"`: at the end of a transaction, before the
    /// connection can go to anyone else, confirm it still carries this
    /// client's identity. One round trip.
    pub(super) async fn verify_identity(&mut self) -> Result<(), End> {
        // Boxed: only with `verify = "transaction"`, where it is a round
        // trip (see `audit::auditor::queue` for why size matters).
        Box::pin(self.verify_identity_now()).await
    }

    async fn verify_identity_now(&mut self) -> Result<(), End> {
        self.core.verify_due = false;
        let Some(mut server) = self.server.take() else {
            return Ok(());
        };
        self.core.seq.unnamed_lost();
        let tag = server.custody().tag_value().map(str::to_string);
        let assertion = Assertion {
            tag: tag.as_deref(),
            ..self.assertion()
        };
        let verdict = assertion.verify(&mut server).await;
        self.server = Some(server);
        match verdict {
            Ok(Verdict::Intact) => Ok(()),
            Ok(Verdict::Violated {
                found_role,
                found_user,
            }) => Err(self.identity_violation(found_role, found_user).await),
            Err(e) => Err(self
                .server_lost(&format!("identity verification failed: {e}"))
                .await),
        }
    }

    /// The connection no longer carries the client's identity: the session
    /// ends with FATAL 42501, the connection is destroyed, and the audit log
    /// gets an `identity_violation` record.
    pub(super) async fn identity_violation(
        &mut self,
        found_role: String,
        found_user: String,
    ) -> End {
        let message = format!(
            "identity changed during the transaction: expected role \"{}\" and client \"{}\", found role \"{found_role}\" and client \"{found_user}\"",
            self.ident.role, self.ident.client_user
        );
        tracing::error!(parent: &self.span, "{message}");
        crate::metrics::Metrics::inc(&self.shared.metrics.identity_violations);
        if self.shared.auditor.enabled() {
            let mut ev = self.core.event(Kind::IdentityViolation);
            ev.status = Some(Status::Error);
            ev.sqlstate = Some(sqlstate::INSUFFICIENT_PRIVILEGE.code().to_string());
            ev.message = Some(message.clone());
            ev.backend_pid = self.server.as_ref().map(|s| s.pid);
            self.shared.auditor.append_nowait(ev).await;
        }
        self.abandon_server("identity violation").await;
        End::Fatal(Refusal::IdentityChanged(message))
    }

    pub(super) async fn release(&mut self) {
        if let Some(at) = self.bound_at.take() {
            self.stats.xact_us += at.elapsed().as_micros() as u64;
        }
        if let Some(conn) = self.server.take() {
            // The client's unnamed statement stays its own; the next
            // connection gets it parsed again when it is used.
            self.core.seq.unbound();
            // A cancel of this client that may still reach the connection
            // must not find the next client's statement on it.
            if !self.cancel.unbind().await {
                tracing::warn!(parent: &self.span, "a cancel to this server connection was not confirmed; the connection is closed");
                pool::discard(conn);
                return;
            }
            let handed = match self.pool.as_ref() {
                Some(pool) => self.shared.pools.release(pool, conn),
                None => {
                    drop(conn);
                    false
                }
            };
            if handed {
                crate::metrics::Metrics::inc(&self.shared.metrics.pool_handoffs);
            }
        }
    }

    /// The server connection failed: its in-flight statements are recorded
    /// as unknown, it is destroyed, and the client session ends.
    pub(super) async fn server_lost(&mut self, why: &str) -> End {
        tracing::warn!(parent: &self.span, "server connection lost: {why}");
        self.abandon_server("server connection lost before the statement completed")
            .await;
        End::Fatal(Refusal::ServerLost)
    }

    pub(super) async fn abandon_server(&mut self, why: &str) {
        self.abandon_ledger().await;
        for pending in self.core.seq.drain() {
            let mut ev = self.core.result_event(
                pending,
                Outcome::NotExecuted { after: None },
                self.server.as_ref().map(|s| s.pid),
            );
            ev.status = Some(Status::Unknown);
            ev.message = Some(why.to_string());
            self.shared.auditor.append_nowait(ev).await;
        }
        self.discard_server().await;
    }

    /// Destroys the bound connection (nothing more is written for it, no
    /// cancel reaches it).
    pub(super) async fn discard_server(&mut self) {
        if let Some(conn) = self.server.take() {
            self.core.seq.unbound();
            self.cancel.unbind().await;
            pool::discard(conn);
        }
    }

    /// The bound connection failed while the client's request was in flight
    /// (whose answer the core has made): it is destroyed, and the request
    /// counts as answered.
    pub(super) async fn discard_failed_server(&mut self) {
        self.discard_server().await;
        if self.core.answered(true, Instant::now()) {
            self.cancel.set_running(false);
        }
    }

    /// Leaves the server connection in a state fit for the next client, or
    /// destroys it.
    pub(super) async fn finish(&mut self, end: &End) {
        // The session may end in the middle of a client burst: record what
        // it resolved, and that a statement audited ahead of its batch never
        // ran.
        self.core.settle_unexecuted_ahead();
        self.record_results().await;
        if let End::Fatal(refusal) = end {
            self.core.seq.client_out().clear();
            self.client.send_error(&refusal.to_wire()).await;
        }
        if matches!(end, End::ClientGone) && !self.idle() {
            self.settle_for_gone_client().await;
        }
        if self.server.is_none() {
            return;
        }
        if !self.idle() {
            self.abandon_server("client disconnected before the statement completed")
                .await;
            return;
        }
        if self.core.verify_due && self.verify_identity().await.is_err() {
            return;
        }
        if self.mode == PoolMode::Session {
            self.reset_session().await;
        }
        self.release().await;
    }

    /// Session pooling hands the connection to another client next: clear
    /// everything this one set (settings, prepared statements, temp tables,
    /// role); the next bind asserts the next identity.
    pub(super) async fn reset_session(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let mut out = BytesMut::new();
        messages::query(&mut out, &crate::session::state::reset_sql("DISCARD ALL"));
        server.forget_state();
        let ok = match server.write_all(&out).await {
            Ok(()) => server.drain_until_ready().await.is_ok(),
            Err(_) => false,
        };
        // Those read before `DISCARD ALL` answered were this client's.
        server.forget_notifications();
        if !ok {
            self.abandon_server("reset failed").await;
        }
    }
}
