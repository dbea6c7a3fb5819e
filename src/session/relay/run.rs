//! The driver's side of a planned client message (`session::core`): the
//! records stored, the connection bound, then `Core::apply` writes the
//! bytes; a refused message gets its guard record and its answer. Also
//! the audit store's side of the records: `query` records stored before
//! their statements go, `result` records as the server resolves them.

use super::*;
use crate::session::checks::Refused;
use crate::session::core::{Plan, Step, ToRecord};

/// What becomes of the results held for the open transaction.
pub(super) enum Held {
    /// Kept until the server says how the transaction ended.
    Resolved,
    /// Written now with `tx = unknown`.
    Unknowable,
    /// Written now with `tx = rolled_back` (its connection was lost with
    /// nothing in flight that could commit it).
    RolledBack,
}

impl QueryLoop<'_> {
    /// Performs what the core decided for a client message.
    pub(super) async fn perform(&mut self, step: Step) -> Result<(), End> {
        match step {
            Step::Done => Ok(()),
            Step::Terminate => Err(End::ClientGone),
            Step::Refuse(flow, refused) => self.refused(flow, refused).await,
            Step::Run(plan) => self.run_plan(*plan).await,
        }
    }

    /// [`Self::perform`] of a step that needs no waiting: nothing to do, or
    /// a plan with no record to store whose connection, if it needs one, is
    /// bound already mid-transaction (where binding only notes whether the
    /// transaction's end is verified). Any other step comes back.
    pub(super) fn perform_now(&mut self, step: Step) -> Result<(), Step> {
        let plan = match step {
            Step::Done => return Ok(()),
            Step::Run(plan) => plan,
            other => return Err(other),
        };
        let bound_already = self.server.is_some() && !self.core.seq.between_transactions();
        if !plan.records.is_empty() || plan.after_bind.is_some() || (plan.bind && !bound_already) {
            return Err(Step::Run(plan));
        }
        let Plan {
            mut stored,
            bind,
            then,
            ..
        } = *plan;
        if bind {
            self.note_bound();
            if let Some(Some(first)) = stored.first_mut() {
                first.started = Instant::now();
            }
        }
        let conn = self.server.as_mut().map(|s| s.state());
        self.core.apply(then, stored, None, conn);
        Ok(())
    }

    /// Stores the plan's records, binds a connection if it needs one, and
    /// has the core write the message. If a record cannot be stored or no
    /// connection can be had, the message is refused and the records
    /// already stored get that error as their result.
    async fn run_plan(&mut self, plan: Plan) -> Result<(), End> {
        let Plan {
            flow,
            mut stored,
            records,
            must_record,
            bind,
            after_bind,
            then,
        } = plan;
        for record in records {
            match self.store_query(record).await {
                // `None` (on_failure = "allow") keeps its place.
                Ok(pending) => stored.push(pending),
                Err(_) if !must_record => stored.push(None),
                Err(e) => {
                    self.core.unrun(stored, &e);
                    return self.refuse(flow, e);
                }
            }
        }
        if bind {
            if let Err(e) = self.bind_server().await {
                self.core.unrun(stored, &e);
                return self.refuse(flow, e);
            }
            // Its duration is the statement's own, not the wait for a
            // connection.
            if let Some(Some(first)) = stored.first_mut() {
                first.started = Instant::now();
            }
        }
        let after_bind = match after_bind {
            Some(record) => match self.store_query(record).await {
                Ok(pending) => pending,
                Err(e) => return self.refuse(flow, e),
            },
            None => None,
        };
        let conn = self.server.as_mut().map(|s| s.state());
        self.core.apply(then, stored, after_bind, conn);
        Ok(())
    }

    /// Answers a refused message; a statement the guard blocked gets its
    /// `guard_blocked` record first.
    async fn refused(&mut self, flow: Flow, refused: Refused) -> Result<(), End> {
        if let Refusal::Guard(_) = refused.refusal {
            crate::metrics::Metrics::inc(&self.shared.metrics.guard_blocks);
        }
        if let Some(ev) = self.core.blocked_record(&refused) {
            self.shared.auditor.append_nowait(ev).await;
        }
        self.refuse(flow, refused.refusal)
    }

    /// Answers a client message with `refusal` instead of running it; a
    /// FATAL one ends the session.
    pub(super) fn refuse(&mut self, flow: Flow, refusal: Refusal) -> Result<(), End> {
        self.core.refuse(flow, refusal).map_err(End::Fatal)
    }

    /// Between transactions, stores the `query` record of the first
    /// `Execute` of the client's buffered batch before the batch takes a
    /// server connection (see `Core::ahead`).
    pub(super) async fn audit_ahead(&mut self) {
        let Some(record) = self.core.ahead(&self.client.rbuf) else {
            return;
        };
        let stored = self.store_query(record).await;
        self.core.audited_ahead(stored);
    }

    /// Stores a `query` record before its statement is forwarded.
    pub(super) async fn store_query(
        &mut self,
        record: ToRecord,
    ) -> Result<Option<Pending>, Refusal> {
        let ToRecord { mut event, control } = record;
        let ticket = self.shared.auditor.ticket();
        event.backend_pid = self.server.as_ref().map(|s| s.pid);
        event.link = Link::Query(ticket);
        let started = Instant::now();
        // About to queue behind many others for a connection: its fsync can
        // wait for company without delaying the statement. (Only `group`
        // asks: the pool's status takes its lock.)
        let patient = self.shared.auditor.gathers()
            && self.server.is_none()
            && self.pool.as_ref().is_some_and(pool::PoolRef::crowded);
        let appended = if patient {
            self.shared.auditor.append_ahead_patient(event).await
        } else {
            self.shared.auditor.append_ahead(event).await
        };
        self.shared.metrics.audit_append(started.elapsed());
        match appended {
            Ok(()) => Ok(Some(Pending {
                ticket,
                started: Instant::now(),
                control,
            })),
            Err(e) if self.shared.auditor.on_failure() == OnFailure::Allow => {
                tracing::error!(parent: &self.span,
                    "audit store failed, statement allowed by on_failure = \"allow\": {e}"
                );
                Ok(None)
            }
            Err(e) => {
                tracing::error!(parent: &self.span, "audit store failed, statement refused: {e}");
                Err(Refusal::Audit(e.to_string()))
            }
        }
    }

    /// Records the outcomes the last server messages resolved.
    pub(super) async fn record_results(&mut self) {
        self.write_results(Held::Resolved).await;
    }

    /// Results held for a transaction whose outcome can no longer be known
    /// (the server connection is gone): written with `tx = unknown`.
    pub(super) async fn abandon_ledger(&mut self) {
        self.write_results(Held::Unknowable).await;
    }

    pub(super) async fn write_results(&mut self, held: Held) {
        let pid = self.server.as_ref().map(|s| s.pid);
        let core = &mut self.core;
        // Out of the core while `result_event` reads it.
        let mut results = std::mem::take(&mut core.results);
        let event = |p, o| core.result_event(p, o, pid);
        let events = match held {
            Held::Resolved => results.drain(event),
            Held::Unknowable => results.abandon(event),
            Held::RolledBack => results.lost_open(event),
        };
        core.results = results;
        for ev in events {
            self.shared.auditor.append_nowait(ev).await;
        }
    }
}
