//! The writer: one OS thread that owns the store, assigns seqs, extends the
//! hash chain and decides when records are durable.
//!
//! Invariant: records are sealed, inserted and acknowledged in the order
//! they left the queue, so seq order = chain order = queue order, and a
//! waiter hears `Ok(seq)` only once its record is "stored" as the durability
//! mode defines it:
//! - `group`: every record of a batch (all that queued up while the previous
//!   fsync ran) is inserted, then one fsync, then all waiters are answered.
//!   A batch with a waiter whose session queues for a crowded pool next
//!   ([`super::Auditor::append_ahead_patient`]) may gather for up to
//!   [`GROUP_GATHER`] before its fsync, until a waiter that is not patient
//!   arrives: fewer fsyncs per record, and nobody it delays could have had
//!   a server connection sooner. Records nobody waits for never start a
//!   gathering, nor end one;
//! - `sync`: insert, fsync, answer, one record at a time;
//! - `async`: appenders only queue their record ([`super::Auditor::append_ahead`]);
//!   the writer lets records gather for up to a millisecond, inserts them
//!   and fsyncs at the latest `flush_interval_ms` after the first unsynced
//!   record arrived. After a failed insert or fsync, appenders wait for
//!   their verdict and the writer behaves like `group` until an fsync
//!   succeeds, so callers see the failure (fail closed) instead of `Ok`.
//!
//! The records of one commit are stored in runs (see [`super::store`]), and
//! a `result` whose appender did not wait for its query's seq names the
//! query by ticket ([`super::Link`]); the writer fills in `ref_seq`.
//!
//! No record is dropped silently: every failure is answered to its waiter,
//! or logged with `tracing::error!` and counted when nobody waits. After a
//! failure the writer reopens the store (at most once per second) and
//! continues the chain after its last durable record, so a full disk that
//! gets space again heals without a restart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::chain::{compute_hash, Chain};
use super::links::Links;
use super::record::{format_ts, Event, Kind, Link};
use super::store::{decode, Store, RUN_BYTES};
use super::AuditError;
use crate::config::Durability;

/// Most records committed with one fsync; bounds the wait of the first one.
const MAX_BATCH: usize = 4096;
/// `async`: how long the writer lets records gather before storing them
/// (at most half of `flush_interval_ms`).
const ASYNC_GATHER: Duration = Duration::from_millis(1);
/// `group`: how long a batch of patient records may wait for company
/// before its fsync. Under pgbench with 200 clients on a pool of 4, 0.5 ms
/// took batches from 24 to 82 records per fsync; 1.5 ms took them to 131
/// for little more.
pub const GROUP_GATHER: Duration = Duration::from_millis(1);
/// How often a gathering writer looks for a record that is not patient.
const GATHER_SLICE: Duration = Duration::from_micros(100);
/// After a store failure, how often the writer tries to reopen the store.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// Where an append's outcome goes: a waiting `append`, or nobody.
pub type Reply = Option<oneshot::Sender<Result<u64, AuditError>>>;

/// What the [`super::Auditor`] sends to the writer thread.
#[allow(
    clippy::large_enum_variant,
    reason = "Append is nearly every message; boxing it would add an allocation per record"
)]
pub enum Msg {
    /// Store `event`; answer on `reply` when stored. `patient`: whoever
    /// waits for `reply` will queue for a crowded pool next, so its fsync
    /// may wait [`GROUP_GATHER`] for other records.
    Append {
        event: Event,
        reply: Reply,
        patient: bool,
    },
    /// Append `gateway_stop`, sync, release the store, answer the head.
    Shutdown {
        reply: oneshot::Sender<Result<String, AuditError>>,
    },
}

impl Msg {
    /// Whether storing it may wait for more records: nobody waits for it,
    /// or whoever waits said it can.
    fn may_wait(&self) -> bool {
        match self {
            Msg::Append { reply, patient, .. } => reply.is_none() || *patient,
            Msg::Shutdown { .. } => false,
        }
    }

    /// Whether it is a reason to gather: its appender waits for it and
    /// queues for a crowded pool next.
    fn is_patient_waiter(&self) -> bool {
        matches!(
            self,
            Msg::Append {
                reply: Some(_),
                patient: true,
                ..
            }
        )
    }
}

/// Counters shared with the [`super::Auditor`] (for metrics and tests).
#[derive(Debug, Default)]
pub struct Counters {
    /// Records stored and acknowledged.
    pub appended: AtomicU64,
    /// Records whose append failed (answered `Err`, or logged when nobody waited).
    pub failed: AtomicU64,
    /// fsyncs that succeeded.
    pub syncs: AtomicU64,
    /// `group` batches whose fsync waited for more records because their
    /// sessions queue for a crowded pool ([`GROUP_GATHER`]).
    pub gathered: AtomicU64,
    /// The last insert or fsync failed and none has succeeded since: `async`
    /// appenders wait for their record's verdict instead of only queueing it.
    pub failing: AtomicBool,
    /// The highest seq known to be durable (fsynced); 0 before any.
    pub durable: AtomicU64,
    /// Notified whenever `durable` grows (the shipper waits on it).
    pub durable_grew: tokio::sync::Notify,
    /// The writer has stopped and released the store.
    pub stopped: AtomicBool,
}

/// The writer's state; lives on its own thread once [`Writer::run`] starts.
pub struct Writer {
    store: Box<dyn Store>,
    chain: Chain,
    /// The store's last record when it was opened, if it is not a
    /// `gateway_stop`: the previous run ended without one (a crash, a
    /// `kill -9`, a lost power supply).
    unclean_end: Option<(u64, Kind)>,
    durability: Durability,
    flush_interval: Duration,
    /// `group`: see [`GROUP_GATHER`].
    group_gather: Duration,
    counters: Arc<Counters>,
    /// Async mode: when the oldest unsynced record was inserted.
    unsynced_since: Option<Instant>,
    /// Async mode: the last background fsync failed.
    degraded: bool,
    /// When the store last failed (or a reopen failed); `None` when healthy.
    broken_at: Option<Instant>,
    /// Tickets of stored `query` records, until their `result` comes.
    links: Links,
    /// The messages of the batch being gathered, and its records, in
    /// vectors kept from batch to batch. Made afresh for each batch, they
    /// grew while records kept arriving, and each growth copied the batch
    /// onto pages the kernel had to zero first (perf of the writer thread,
    /// `async` at 20 clients: memmove 7.8% and page zeroing 7.2% of its
    /// samples before, 7.4% and 4.4% after).
    gathered: Vec<Msg>,
    batch: Vec<(Event, Reply)>,
}

/// The chain continuing after `store`'s last record, whose own hash is
/// re-checked (a damaged tail is refused, not extended).
fn chain_of(store: &dyn Store) -> Result<Chain, AuditError> {
    Ok(last_of(store)?.map_or_else(Chain::empty, |last| Chain::after(&last)))
}

/// The store's last record, checked against its hash.
fn last_of(store: &dyn Store) -> Result<Option<super::Record>, AuditError> {
    let Some((seq, value)) = store.last()? else {
        return Ok(None);
    };
    let last = decode(seq, &value)?;
    if last.seq != seq || compute_hash(&last) != last.hash {
        return Err(AuditError::Corrupt {
            seq,
            message: "the last record does not match its hash; run `pgwarden audit verify`".into(),
        });
    }
    Ok(Some(last))
}

impl Writer {
    /// Takes over `store` and continues its chain after its last record.
    pub fn recover(
        store: Box<dyn Store>,
        durability: Durability,
        flush_interval: Duration,
        counters: Arc<Counters>,
    ) -> Result<Writer, AuditError> {
        let last = last_of(&*store)?;
        let chain = last.as_ref().map_or_else(Chain::empty, Chain::after);
        let unclean_end = last
            .filter(|r| r.kind != Kind::GatewayStop)
            .map(|r| (r.seq, r.kind));
        Ok(Writer {
            unclean_end,
            store,
            chain,
            durability,
            flush_interval,
            group_gather: GROUP_GATHER,
            counters,
            unsynced_since: None,
            degraded: false,
            broken_at: None,
            links: Links::default(),
            gathered: Vec::new(),
            batch: Vec::new(),
        })
    }

    /// The previous run's last record, `(seq, kind)`, when that run ended
    /// without a `gateway_stop`.
    pub fn unclean_end(&self) -> Option<(u64, Kind)> {
        self.unclean_end
    }

    /// After a failure, at most once per [`REOPEN_INTERVAL`]: reopens the
    /// store and continues after its last durable record. Records that were
    /// inserted but never fsynced are gone with the old store; in `group`
    /// and `sync` mode none of them was acknowledged.
    fn heal(&mut self) {
        let Some(at) = self.broken_at else {
            return;
        };
        if at.elapsed() < REOPEN_INTERVAL {
            return;
        }
        let reopened = self.store.reopen().and_then(|()| chain_of(&*self.store));
        match reopened {
            Ok(chain) => {
                tracing::warn!(
                    next_seq = chain.next_seq,
                    dropped = self.chain.next_seq.saturating_sub(chain.next_seq),
                    "audit store reopened after a failure"
                );
                self.chain = chain;
                // Records that were not fsynced are gone: so are their tickets.
                self.links.clear();
                self.broken_at = None;
                self.unsynced_since = None;
                self.degraded = false;
            }
            Err(e) => {
                tracing::error!(error = %e, "audit store still cannot be reopened");
                self.broken_at = Some(Instant::now());
            }
        }
    }

    /// Stores `event` and fsyncs before returning (startup records).
    pub fn append_now(&mut self, event: Event) -> Result<u64, AuditError> {
        let seq = self.insert(event)?;
        self.sync()?;
        self.counters.appended.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    /// How long a patient batch may gather in `group` mode (tests lengthen
    /// it to make the gathering observable).
    #[cfg(test)]
    pub fn set_group_gather(&mut self, gather: Duration) {
        self.group_gather = gather;
    }

    /// Serves `rx` until shutdown or until every sender is gone.
    pub fn run(self, rx: mpsc::Receiver<Msg>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build();
        match runtime {
            Ok(rt) => rt.block_on(self.serve(rx)),
            Err(e) => tracing::error!(error = %e, "audit writer cannot start its timer runtime"),
        }
    }

    async fn serve(mut self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            let first = match self.unsynced_since {
                Some(since) => {
                    match tokio::time::timeout_at(since + self.flush_interval, rx.recv()).await {
                        Ok(msg) => msg,
                        Err(_elapsed) => {
                            self.background_sync();
                            continue;
                        }
                    }
                }
                None => rx.recv().await,
            };
            let Some(first) = first else {
                // Every Auditor is gone without a shutdown: make it durable.
                if self.unsynced_since.is_some() {
                    self.background_sync();
                }
                return;
            };
            if self.durability == Durability::Async && !self.degraded {
                // Nobody waits for an async record: let a busy gateway's
                // records gather, so the writer wakes once per batch. The
                // fsync deadline counts from now, when the first arrived.
                self.unsynced_since.get_or_insert_with(Instant::now);
                std::thread::sleep(ASYNC_GATHER.min(self.flush_interval / 2));
            }
            let mut gathered = std::mem::take(&mut self.gathered);
            let mut batch = std::mem::take(&mut self.batch);
            gathered.push(first);
            if self.durability == Durability::Group {
                self.gather_patient(&mut rx, &mut gathered);
            }
            let mut shutdown = None;
            let mut gathering = gathered.drain(..);
            loop {
                let msg = match gathering.next() {
                    Some(msg) => msg,
                    None if batch.len() < MAX_BATCH => match rx.try_recv() {
                        Ok(msg) => msg,
                        Err(_) => break,
                    },
                    None => break,
                };
                match msg {
                    Msg::Append { event, reply, .. } => batch.push((event, reply)),
                    Msg::Shutdown { reply } => {
                        shutdown = Some(reply);
                        break;
                    }
                }
            }
            // A shutdown ends the gathering, so nothing was gathered after it.
            debug_assert!(gathering.next().is_none());
            drop(gathering);
            self.gathered = gathered;
            self.commit(&mut batch);
            self.batch = batch;
            if let Some(reply) = shutdown {
                self.stop(reply, rx);
                return;
            }
        }
    }

    /// `group`: while a waiter of the batch queues for a crowded pool and
    /// no waiter that is not patient (nor a shutdown) has come, waits for
    /// more records, up to [`GROUP_GATHER`] after the first and
    /// [`MAX_BATCH`] records; a waiter that is not patient ends the wait
    /// within a [`GATHER_SLICE`]. It sleeps in slices rather than awaiting
    /// each record: a wake-up per record cost more than the fsyncs it saved.
    fn gather_patient(&self, rx: &mut mpsc::Receiver<Msg>, gathered: &mut Vec<Msg>) {
        let until = Instant::now() + self.group_gather;
        let mut reason = gathered.iter().any(Msg::is_patient_waiter);
        let mut waited = false;
        while gathered.len() < MAX_BATCH
            && gathered.last().is_some_and(Msg::may_wait)
            && Instant::now() < until
        {
            match rx.try_recv() {
                Ok(msg) => {
                    reason |= msg.is_patient_waiter();
                    gathered.push(msg);
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if reason => {
                    waited = true;
                    let left = until.saturating_duration_since(Instant::now());
                    std::thread::sleep(GATHER_SLICE.min(left));
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
        if waited {
            self.counters.gathered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stores a batch and answers it according to the durability mode. The
    /// records go to the store in runs of about [`RUN_BYTES`] (one record
    /// per run with `sync`), each stored all or nothing.
    fn commit(&mut self, batch: &mut Vec<(Event, Reply)>) {
        self.heal();
        let run_records = match self.durability {
            Durability::Sync => 1,
            Durability::Group | Durability::Async => usize::MAX,
        };
        let mut waiting_for_sync = Vec::new();
        let mut batch = batch.drain(..).peekable();
        while batch.peek().is_some() {
            let mut chain = self.chain.clone();
            let mut values = Vec::new();
            let mut replies = Vec::new();
            let mut tickets = Vec::new();
            let mut size = 0;
            while size < RUN_BYTES && replies.len() < run_records {
                let Some((mut event, reply)) = batch.next() else {
                    break;
                };
                self.links.resolve(&mut event);
                let link = event.link;
                let ts = format_ts(event.at);
                let sealed = chain.seal(event, ts);
                chain.advance(&sealed);
                if let Link::Query(ticket) = link {
                    self.links.stored(ticket, sealed.record.seq);
                    tickets.push(ticket);
                }
                size += sealed.bytes.len();
                replies.push((sealed.record.seq, reply));
                values.push(sealed.bytes);
            }
            let run: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            if let Err(e) = self.store.insert_run(self.chain.next_seq, &run) {
                self.broke();
                for ticket in tickets {
                    self.links.forget(ticket);
                }
                for (_, reply) in replies {
                    self.answer(reply, Err(AuditError::Write(e.to_string())));
                }
                continue;
            }
            self.chain = chain;
            for (seq, reply) in replies {
                match self.durability {
                    Durability::Sync => {
                        let result = self.sync().map(|()| seq);
                        self.answer(reply, result);
                    }
                    Durability::Group => waiting_for_sync.push((seq, reply)),
                    Durability::Async if self.degraded => waiting_for_sync.push((seq, reply)),
                    Durability::Async => {
                        self.unsynced_since.get_or_insert_with(Instant::now);
                        self.answer(reply, Ok(seq));
                    }
                }
            }
        }
        self.sync_and_answer(waiting_for_sync);
        if let Some(since) = self.unsynced_since {
            if since.elapsed() >= self.flush_interval {
                self.background_sync();
            }
        }
    }

    /// One fsync for the records that wait for it, then their answers.
    fn sync_and_answer(&mut self, waiting: Vec<(u64, Reply)>) {
        if waiting.is_empty() {
            return;
        }
        let synced = self.sync();
        if synced.is_ok() {
            self.degraded = false;
        }
        for (seq, reply) in waiting {
            let result = match &synced {
                Ok(()) => Ok(seq),
                Err(AuditError::Write(message)) => Err(AuditError::Write(message.clone())),
                Err(e) => Err(AuditError::Write(e.to_string())),
            };
            self.answer(reply, result);
        }
    }

    /// Notes a failed insert or fsync: appenders stop trusting the queue.
    fn broke(&mut self) {
        self.broken_at.get_or_insert_with(Instant::now);
        self.counters.failing.store(true, Ordering::Relaxed);
    }

    /// Seals `event` as the next record and inserts it; the chain advances
    /// only if the insert succeeded, so a failed seq is reused, never skipped.
    fn insert(&mut self, event: Event) -> Result<u64, AuditError> {
        let ts = format_ts(event.at);
        let sealed = self.chain.seal(event, ts);
        if let Err(e) = self.store.insert(sealed.record.seq, &sealed.bytes) {
            self.broke();
            return Err(e);
        }
        self.chain.advance(&sealed);
        Ok(sealed.record.seq)
    }

    fn sync(&mut self) -> Result<(), AuditError> {
        if let Err(e) = self.store.sync() {
            self.broke();
            return Err(e);
        }
        // A store that fsyncs again needs no reopening.
        self.broken_at = None;
        self.counters.failing.store(false, Ordering::Relaxed);
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        self.unsynced_since = None;
        let durable = self.chain.next_seq.saturating_sub(1);
        if self.counters.durable.swap(durable, Ordering::Release) != durable {
            self.counters.durable_grew.notify_waiters();
        }
        Ok(())
    }

    /// The async mode's timed fsync; nobody waits for it, so a failure is
    /// logged, and the writer stays degraded until an fsync succeeds.
    fn background_sync(&mut self) {
        self.heal();
        if self.unsynced_since.is_none() {
            // Reopening dropped what was unsynced: nothing left to fsync.
            return;
        }
        match self.sync() {
            Ok(()) => self.degraded = false,
            Err(e) => {
                tracing::error!(error = %e, "audit store fsync failed; acknowledged records are not yet on disk");
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.counters.failing.store(true, Ordering::Relaxed);
                self.degraded = true;
                // Retry at the next interval, not in a tight loop.
                self.unsynced_since = Some(Instant::now());
            }
        }
    }

    fn answer(&self, reply: Reply, result: Result<u64, AuditError>) {
        match &result {
            Ok(_) => self.counters.appended.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.failed.fetch_add(1, Ordering::Relaxed),
        };
        match reply {
            Some(tx) => {
                // A waiter that went away (cancelled) needs no answer; its
                // record is stored all the same.
                let _ = tx.send(result);
            }
            None => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "audit record could not be stored");
                }
            }
        }
    }

    /// Appends `gateway_stop` with the head before it, fsyncs, refuses what
    /// is still queued, releases the store, then answers the final head.
    fn stop(
        mut self,
        reply: oneshot::Sender<Result<String, AuditError>>,
        mut rx: mpsc::Receiver<Msg>,
    ) {
        let mut event = Event::new(Kind::GatewayStop);
        event.message = Some(format!("chain head {}", self.chain.head));
        let result = self
            .insert(event)
            .and_then(|_| self.sync())
            .map(|()| self.chain.head.clone());
        match &result {
            Ok(_) => self.counters.appended.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.failed.fetch_add(1, Ordering::Relaxed),
        };
        rx.close();
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Append { reply, .. } => self.answer(reply, Err(AuditError::Closed)),
                Msg::Shutdown { reply } => {
                    let _ = reply.send(Err(AuditError::Closed));
                }
            }
        }
        // Dropping the store releases sled's lock before anyone hears
        // "stopped" (and the shipper lets go of it too).
        self.counters.stopped.store(true, Ordering::Release);
        self.counters.durable_grew.notify_waiters();
        drop(self);
        let _ = reply.send(result);
    }
}
