//! [`Auditor`]: the handle every session holds to append audit records.
//!
//! Invariant: all appends go through one bounded queue to one writer thread,
//! so the order records are stored in is the order appends were queued, and
//! back-pressure (a full queue) makes appenders wait instead of losing
//! records. After [`Auditor::shutdown`] every append fails with
//! [`AuditError::Closed`] (or is logged and counted when nobody waits).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Mutex};

use super::record::{Event, Kind};
use super::store::{SledStore, Store};
use super::writer::{Counters, Msg, Writer};
use super::AuditError;
use crate::config::{AuditConfig, Durability, OnFailure};

/// Records that may wait for the writer before appenders wait too.
const QUEUE_CAPACITY: usize = 8192;
/// `async`: while more records than this wait for the writer, statements
/// wait for their own record to be stored, so a writer that falls behind
/// cannot leave more than this many queued records to lose in a crash.
const ASYNC_BACKLOG: usize = 1024;

/// Cheap to clone; shared by all sessions.
#[derive(Clone)]
pub struct Auditor {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    on_failure: OnFailure,
    durability: Durability,
    /// The next ticket handed out by [`Auditor::ticket`].
    next_ticket: AtomicU64,
    counters: Arc<Counters>,
    /// The store, for the shipper's reads.
    shared: Option<super::store::SharedDb>,
    /// The final chain head, once shut down (makes shutdown idempotent).
    stopped: Mutex<Option<String>>,
}

/// A snapshot of the writer's counters, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditCounters {
    /// Records stored and acknowledged.
    pub appended: u64,
    /// Records whose append failed (returned `Err`, or logged for `append_nowait`).
    pub failed: u64,
    /// fsyncs done; with `group`, far fewer than `appended` under load.
    pub syncs: u64,
    /// `group` batches whose fsync waited for company (a crowded pool).
    pub gathered: u64,
}

impl Auditor {
    /// Opens (creates) the sled store at `cfg.store`, continues its chain,
    /// appends and fsyncs `gateway_start`, and starts the writer thread.
    /// Fails with [`AuditError::Locked`] if another process holds the store.
    /// `cfg.enabled == false` gives [`Auditor::disabled`].
    pub fn open(cfg: &AuditConfig) -> Result<Auditor, AuditError> {
        Auditor::open_at(cfg, "")
    }

    /// [`Auditor::open`], with `origin` (which gateway instance, which
    /// backend) said in `gateway_start`, so every record of the run that
    /// follows it is attributable to them.
    pub fn open_at(cfg: &AuditConfig, origin: &str) -> Result<Auditor, AuditError> {
        if !cfg.enabled {
            return Ok(Auditor::disabled());
        }
        let store = SledStore::open(&cfg.store)?;
        Auditor::with_store_at(Box::new(store), cfg, origin)
    }

    /// Like [`Auditor::open`] on any [`Store`] (tests inject failing stores);
    /// `cfg.store` and `cfg.enabled` are ignored.
    pub fn with_store(store: Box<dyn Store>, cfg: &AuditConfig) -> Result<Auditor, AuditError> {
        Auditor::with_store_at(store, cfg, "")
    }

    /// [`Auditor::with_store`] whose writer lets a patient `group` batch
    /// gather for `gather` instead of [`super::writer::GROUP_GATHER`].
    #[cfg(test)]
    pub(super) fn with_store_gathering(
        store: Box<dyn Store>,
        cfg: &AuditConfig,
        gather: Duration,
    ) -> Result<Auditor, AuditError> {
        Auditor::launch(store, cfg, "", |writer| writer.set_group_gather(gather))
    }

    fn with_store_at(
        store: Box<dyn Store>,
        cfg: &AuditConfig,
        origin: &str,
    ) -> Result<Auditor, AuditError> {
        Auditor::launch(store, cfg, origin, |_| {})
    }

    fn launch(
        store: Box<dyn Store>,
        cfg: &AuditConfig,
        origin: &str,
        adjust: impl FnOnce(&mut Writer),
    ) -> Result<Auditor, AuditError> {
        let counters = Arc::new(Counters::default());
        let shared = store.shared();
        let interval = Duration::from_millis(cfg.flush_interval_ms.max(1));
        let mut writer = Writer::recover(store, cfg.durability, interval, counters.clone())?;
        adjust(&mut writer);
        let mut start = Event::new(Kind::GatewayStart);
        let mut message = format!(
            "pgwarden {} durability {}",
            env!("CARGO_PKG_VERSION"),
            durability_name(cfg.durability)
        );
        if !origin.is_empty() {
            message.push_str("; ");
            message.push_str(origin);
        }
        if let Some((seq, kind)) = writer.unclean_end() {
            message.push_str(&format!(
                "; the previous run ended without gateway_stop: its last record is seq {seq} ({})",
                kind.as_str()
            ));
        }
        start.message = Some(message);
        writer.append_now(start)?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("pgwarden-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer thread: {e}")))?;
        Ok(Auditor {
            inner: Some(Arc::new(Inner {
                tx,
                on_failure: cfg.on_failure,
                durability: cfg.durability,
                next_ticket: AtomicU64::new(1),
                counters,
                shared,
                stopped: Mutex::new(None),
            })),
        })
    }

    /// What the shipper reads: the store and the writer's counters (the
    /// durable seq). `None` when disabled or on a store without a shared
    /// handle.
    pub fn ship_source(&self) -> Option<super::ship::Source> {
        let inner = self.inner.as_ref()?;
        Some(super::ship::Source {
            db: inner.shared.clone()?,
            counters: inner.counters.clone(),
        })
    }

    /// An auditor that records nothing: appends return `Ok(0)`.
    pub fn disabled() -> Auditor {
        Auditor { inner: None }
    }

    /// Whether records are being written.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// What the gateway does with a statement whose record cannot be stored
    /// (`Allow` when disabled: nothing can fail).
    pub fn on_failure(&self) -> OnFailure {
        self.inner
            .as_ref()
            .map_or(OnFailure::Allow, |i| i.on_failure)
    }

    /// Whether a patient record can be stored later than another
    /// ([`Auditor::append_ahead_patient`]): only `group` gathers, so in the
    /// other modes (and when disabled) nobody need ask whether it waits.
    pub fn gathers(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.durability == Durability::Group)
    }

    /// Write-ahead append: returns the record's seq once it is stored as
    /// `durability` defines (see [`super::writer`]). Waits while the queue
    /// is full. `Err` if the store cannot be written or the writer stopped.
    /// Cancel-safe in the sense that matters: if this future is dropped, the
    /// record is still stored once queued, and nothing else is affected.
    pub async fn append(&self, event: Event) -> Result<u64, AuditError> {
        self.append_waiting(event, false).await
    }

    /// [`Auditor::append`]; `patient`: see [`Msg::Append`].
    async fn append_waiting(&self, event: Event, patient: bool) -> Result<u64, AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(0);
        };
        let (tx, rx) = oneshot::channel();
        let msg = Msg::Append {
            event,
            reply: Some(tx),
            patient,
        };
        inner.tx.send(msg).await.map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// A ticket for a `query` event ([`super::Link::Query`]), whose `result`
    /// then names it ([`super::Link::Result`]) instead of the query's seq:
    /// the writer fills in `ref_seq`, so the appender need not wait for it.
    pub fn ticket(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.next_ticket.fetch_add(1, Ordering::Relaxed))
    }

    /// Write-ahead append of a statement's record, as far as the durability
    /// mode asks before the statement may be forwarded: `group` and `sync`
    /// wait for [`Auditor::append`]; `async` only queues it (the writer
    /// stores it within a millisecond and fsyncs it within
    /// `flush_interval_ms` of queueing), unless the store is failing, when
    /// it waits for the verdict like the others so that a broken store
    /// refuses statements, or the writer lags [`ASYNC_BACKLOG`] records
    /// behind, when it waits for its record to be stored. `Err` means the
    /// statement must not be forwarded (unless `on_failure = "allow"`).
    pub async fn append_ahead(&self, event: Event) -> Result<(), AuditError> {
        self.append_ahead_as(event, false).await
    }

    /// [`Auditor::append_ahead`] for a session that will queue for a
    /// crowded pool once its record is stored: in `group` mode the writer may hold
    /// the record's fsync up to [`super::writer::GROUP_GATHER`] so that more
    /// records share it. The record is still on disk before the statement
    /// is forwarded; only the fsync count per record goes down.
    pub async fn append_ahead_patient(&self, event: Event) -> Result<(), AuditError> {
        self.append_ahead_as(event, true).await
    }

    async fn append_ahead_as(&self, event: Event, patient: bool) -> Result<(), AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let backlog = inner.tx.max_capacity() - inner.tx.capacity();
        if inner.durability == Durability::Async
            && !inner.counters.failing.load(Ordering::Relaxed)
            && backlog < ASYNC_BACKLOG
        {
            let msg = Msg::Append {
                event,
                reply: None,
                patient,
            };
            return queue(&inner.tx, msg).await.map_err(|_| AuditError::Closed);
        }
        // Boxed, like `queue`'s wait (see there); `group` and `sync` wait
        // for the fsync anyway.
        Box::pin(self.append_waiting(event, patient))
            .await
            .map(|_| ())
    }

    /// Same ordering and chaining as [`Auditor::append`] without waiting for
    /// the store (for `result`, `session_end`, ...). Waits only while the
    /// queue is full. Failures are logged with `tracing::error!` and counted
    /// in [`AuditCounters::failed`].
    pub async fn append_nowait(&self, event: Event) {
        let Some(inner) = &self.inner else {
            return;
        };
        let kind = event.kind;
        let msg = Msg::Append {
            event,
            reply: None,
            patient: true,
        };
        if queue(&inner.tx, msg).await.is_err() {
            inner.counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                kind = kind.as_str(),
                "audit writer is stopped; record not stored"
            );
        }
    }

    /// Appends `gateway_stop` (its `message` is `chain head <hex>`, the hash
    /// of the record before it), fsyncs, stops the writer and releases the
    /// store. Returns the final chain head: the hash of `gateway_stop`
    /// itself, the value to pin elsewhere. Idempotent; a disabled auditor
    /// returns an empty string.
    pub async fn shutdown(&self) -> Result<String, AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(String::new());
        };
        let mut stopped = inner.stopped.lock().await;
        if let Some(head) = stopped.as_ref() {
            return Ok(head.clone());
        }
        let (tx, rx) = oneshot::channel();
        inner
            .tx
            .send(Msg::Shutdown { reply: tx })
            .await
            .map_err(|_| AuditError::Closed)?;
        let head = rx.await.map_err(|_| AuditError::Closed)??;
        *stopped = Some(head.clone());
        Ok(head)
    }

    /// Number of records waiting in the writer queue (for metrics).
    pub fn queue_depth(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.tx.max_capacity() - i.tx.capacity())
    }

    /// Whether statements are being refused because the store cannot be
    /// written (`on_failure = "deny"` and the last insert or fsync failed).
    pub fn refusing(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| {
            i.on_failure == OnFailure::Deny && i.counters.failing.load(Ordering::Relaxed)
        })
    }

    /// The writer's counters so far (zeros when disabled).
    pub fn counters(&self) -> AuditCounters {
        self.inner
            .as_ref()
            .map_or_else(AuditCounters::default, |i| AuditCounters {
                appended: i.counters.appended.load(Ordering::Relaxed),
                failed: i.counters.failed.load(Ordering::Relaxed),
                syncs: i.counters.syncs.load(Ordering::Relaxed),
                gathered: i.counters.gathered.load(Ordering::Relaxed),
            })
    }
}

/// Queues `msg` for the writer: at once when the queue has room, else
/// waiting for room in a boxed future. A session's futures hold what they
/// await, and `Sender::send`'s holds the message: unboxed, every future on
/// the way from a client message to its record (one per message of an
/// extended-protocol batch) carried and copied it.
async fn queue(tx: &mpsc::Sender<Msg>, msg: Msg) -> Result<(), ()> {
    match tx.try_send(msg) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(msg)) => Box::pin(tx.send(msg)).await.map_err(|_| ()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
    }
}

fn durability_name(d: Durability) -> &'static str {
    match d {
        Durability::Group => "group",
        Durability::Sync => "sync",
        Durability::Async => "async",
    }
}

#[cfg(test)]
#[path = "auditor_tests.rs"]
mod tests;
