//! Shipping: every durable record, in seq order, to a syslog server as an
//! RFC 5424 message ([`message`]), over TCP in RFC 6587 octet-counting
//! framing or over RELP ([`relp`]), its body the record as stored (JSON)
//! with this gateway's `instance` added, or a CEF event.
//!
//! Invariants:
//! - at least once: the store is the buffer. The shipper reads records the
//!   writer has fsynced (never one a crash could take back and reuse the
//!   seq of), and its position (the last seq it counts as delivered) is
//!   kept in the store's meta tree. After a restart, a lost connection or a
//!   crash it resends from that position, so a record may arrive twice,
//!   identified by (`instance`, `seq`), never not at all;
//! - over RELP a record counts as delivered only once the server
//!   acknowledged it; a server that stops answering for [`IO_TIMEOUT`]
//!   loses the connection, and everything unacknowledged is sent again;
//! - plain TCP syslog has no acknowledgement: a batch counts as delivered
//!   once it was written [`SETTLE`] ago and the connection is still open.
//!   A server that closes resends what it had not read; one that stalls
//!   and then dies loses what sat in its socket buffers (use RELP);
//! - shipping never slows statements: it runs on its own task, reads the
//!   store without the writer, and only ever waits for the server.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::checkpoint::{Checkpoint, Head, Signer};
use super::reader::{scan_tree, stored_instance, INSTANCE_KEY, META_TREE};
use super::store::{decode, SharedDb};
use super::writer::Counters;
use super::AuditError;
use crate::config::{ShipConfig, ShipTransport};

pub mod message;
pub mod relp;
mod wire;

use crate::tls::MaybeTls;
use wire::{timed, Wire};

/// A connection to the syslog server.
type Stream = MaybeTls<TlsStream<TcpStream>>;

/// How long a written batch must stay on an open connection before it
/// counts as delivered.
pub const SETTLE: Duration = Duration::from_secs(1);
/// Most records read and written at once, and about the most bytes.
const BATCH: usize = 512;
const BATCH_BYTES: usize = 1 << 20;
/// Reconnect backoff: first wait, and the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connect or a write that takes longer than this, or a RELP server that
/// answers nothing for this long, fails the connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The meta tree's key for the last seq delivered.
pub const SHIPPED_KEY: &str = "shipped";

/// The last seq the shipper delivered from the store `db`, if it ever did.
pub fn shipped(db: &sled::Db) -> Option<u64> {
    let meta = db.open_tree(META_TREE).ok()?;
    let stored = meta.get(SHIPPED_KEY).ok()??;
    <[u8; 8]>::try_from(stored.as_ref())
        .ok()
        .map(u64::from_be_bytes)
}

/// What the shipper reads: the writer's store and counters.
#[derive(Clone)]
pub struct Source {
    pub db: SharedDb,
    pub counters: Arc<Counters>,
}

/// The shipper's progress, for metrics and tests.
#[derive(Debug, Default)]
pub struct ShipStatus {
    /// The last seq counted as delivered.
    pub shipped: AtomicU64,
    /// Durable records not yet counted as delivered.
    pub lag_records: AtomicU64,
    /// Since when (ms since the shipper started) records have waited; 0
    /// while nothing waits.
    behind_since_ms: AtomicU64,
    pub connected: AtomicBool,
    /// Records shipped cut to `max_message_bytes`.
    pub truncated: AtomicU64,
    started: std::sync::OnceLock<Instant>,
}

impl ShipStatus {
    /// How long the oldest undelivered record has waited, in seconds.
    pub fn lag_seconds(&self) -> f64 {
        let since = self.behind_since_ms.load(Ordering::Relaxed);
        match self.started.get() {
            Some(started) if since > 0 => {
                (started.elapsed().as_millis() as u64).saturating_sub(since) as f64 / 1000.0
            }
            _ => 0.0,
        }
    }

    fn set_lag(&self, durable: u64, shipped: u64) {
        let lag = durable.saturating_sub(shipped);
        self.lag_records.store(lag, Ordering::Relaxed);
        self.shipped.store(shipped, Ordering::Relaxed);
        let started = self.started.get_or_init(Instant::now);
        if lag == 0 {
            self.behind_since_ms.store(0, Ordering::Relaxed);
        } else if self.behind_since_ms.load(Ordering::Relaxed) == 0 {
            let now = (started.elapsed().as_millis() as u64).max(1);
            self.behind_since_ms.store(now, Ordering::Relaxed);
        }
    }
}

/// This store's instance id: `configured`, or the one made when shipping
/// or anchoring first ran on this store. Either is kept in its meta tree,
/// where `audit verify --anchors` finds it.
pub fn instance_id(db: &sled::Db, configured: Option<&str>) -> Result<String, AuditError> {
    let meta = db.open_tree(META_TREE).map_err(read_err)?;
    if let Some(id) = configured {
        meta.insert(INSTANCE_KEY, id.as_bytes()).map_err(read_err)?;
        return Ok(id.to_string());
    }
    if let Some(id) = stored_instance(db)? {
        return Ok(id);
    }
    let id = format!("pgw-{:016x}", rand::random::<u64>());
    meta.insert(INSTANCE_KEY, id.as_bytes()).map_err(read_err)?;
    Ok(id)
}

fn read_err(e: sled::Error) -> AuditError {
    AuditError::Read(e.to_string())
}

/// TLS towards the syslog server.
pub type Tls = crate::tls::ClientTls;

/// The TLS `config` asks for (`tls = true`), with the name the server's
/// certificate must carry (the address's host).
pub fn tls_for(config: &ShipConfig) -> Result<Option<Tls>, String> {
    if !config.tls {
        return Ok(None);
    }
    let ca = config
        .ca_file
        .as_deref()
        .ok_or("[audit.ship] tls = true needs ca_file")?;
    let client = config.cert_file.as_deref().zip(config.key_file.as_deref());
    Tls::new(&config.address, ca, client)
        .map(Some)
        .map_err(|e| format!("[audit.ship] {e}"))
}

/// Starts shipping on the current runtime; returns its status.
pub fn spawn(
    source: Source,
    config: ShipConfig,
    tls: Option<Tls>,
    instance: String,
    checkpoints: Checkpoints,
) -> Arc<ShipStatus> {
    let status = Arc::new(ShipStatus::default());
    status.started.get_or_init(Instant::now);
    // A store that ships has a position from the start (0: nothing yet), so
    // that offline archiving never takes records the shipper has not sent.
    if let Some(db) = source.db.get() {
        let meta = db.open_tree(META_TREE);
        let marked = meta.and_then(|meta| {
            meta.compare_and_swap(
                SHIPPED_KEY,
                None as Option<&[u8]>,
                Some(&0u64.to_be_bytes()),
            )
            .map(|_| ())
        });
        if let Err(e) = marked {
            tracing::warn!(error = %e, "audit shipping could not keep its position");
        }
    }
    let shipper = Shipper {
        source,
        config,
        tls,
        instance,
        host: hostname(),
        status: status.clone(),
        checkpoints,
    };
    tokio::spawn(shipper.run());
    status
}

/// The syslog HOSTNAME: the host's name, or the nil value `-` when it is
/// not printable ASCII (RFC 5424).
fn hostname() -> String {
    host_name()
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "-".to_string())
}

/// This host's name, if it has one.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// Checkpoints in the shipped stream ([`super::checkpoint`]).
pub struct Checkpoints {
    /// At most this often, after records were sent since the last one.
    pub every: Duration,
    pub signer: Option<Arc<Signer>>,
}

struct Shipper {
    source: Source,
    config: ShipConfig,
    tls: Option<Tls>,
    instance: String,
    host: String,
    status: Arc<ShipStatus>,
    checkpoints: Checkpoints,
}

/// The checkpoints of one connection: the head of what was sent, and when
/// and at which seq the last checkpoint went.
struct Heads {
    sent: Option<Head>,
    last_at: Instant,
    last_seq: u64,
}

/// Why a connection ended.
enum Ended {
    /// The server closed it, or a write failed: reconnect and resend.
    Lost(String),
    /// The store cannot be read: wait and try again.
    Store(AuditError),
}

impl Shipper {
    async fn run(self) {
        let mut backoff = BACKOFF_FIRST;
        let mut down_since: Option<Instant> = None;
        loop {
            if self.stopped() {
                return;
            }
            let ended = match timed(self.connect()).await {
                Ok(Ok(wire)) => {
                    if let Some(since) = down_since.take() {
                        tracing::warn!(address = %self.config.address, down_s = since.elapsed().as_secs(), "audit shipping reconnected");
                    }
                    backoff = BACKOFF_FIRST;
                    self.status.connected.store(true, Ordering::Relaxed);
                    let ended = self.serve(wire).await;
                    self.status.connected.store(false, Ordering::Relaxed);
                    ended
                }
                Ok(Err(e)) => Ended::Lost(e),
                Err(e) => Ended::Lost(format!("connect: {e}")),
            };
            let message = match ended {
                Ended::Lost(m) => m,
                Ended::Store(e) => e.to_string(),
            };
            // While no connection holds, the lag still grows.
            if let Some(delivered) = self.position() {
                let durable = self.source.counters.durable.load(Ordering::Acquire);
                self.status.set_lag(durable, delivered);
            }
            if down_since.is_none() {
                tracing::warn!(address = %self.config.address, error = %message, "audit shipping: the syslog server is unreachable; records wait in the store");
                down_since = Some(Instant::now());
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// A connection to the server, over TLS when configured, its RELP
    /// session open when RELP is the transport.
    async fn connect(&self) -> Result<Wire, String> {
        let tcp = TcpStream::connect(&self.config.address)
            .await
            .map_err(|e| e.to_string())?;
        let stream = match &self.tls {
            None => MaybeTls::Plain(tcp),
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                MaybeTls::Tls(Box::new(stream))
            }
        };
        Ok(match self.config.transport {
            ShipTransport::Tcp => Wire::Tcp {
                stream,
                unsettled: VecDeque::new(),
            },
            ShipTransport::Relp => Wire::Relp {
                session: relp::Session::open(stream)
                    .await
                    .map_err(|e| e.to_string())?,
                heard: Instant::now(),
            },
        })
    }

    /// Ships on one connection, from the delivered position, until it ends.
    async fn serve(&self, mut wire: Wire) -> Ended {
        let Some(mut delivered) = self.position() else {
            return Ended::Store(AuditError::Read("the audit store is being reopened".into()));
        };
        let mut sent = delivered;
        let mut warned = false;
        let mut heads = Heads {
            sent: None,
            last_at: Instant::now(),
            last_seq: delivered,
        };
        loop {
            let grew = self.source.counters.durable_grew.notified();
            let durable = self.source.counters.durable.load(Ordering::Acquire);
            let mut heard = None;
            let room = wire.room();
            let checkpoint = if room > 0 {
                self.checkpoint_due(&mut heads)
            } else {
                None
            };
            if let Some(checkpoint) = checkpoint {
                if let Err(e) = wire.send(&[checkpoint]).await {
                    return Ended::Lost(e);
                }
            } else if sent < durable && room > 0 {
                let (messages, head) = match self.batch(sent, durable, room) {
                    Ok(batch) => batch,
                    Err(e) => return Ended::Store(e),
                };
                heads.sent = head.or(heads.sent);
                let Some(&(last, _)) = messages.last() else {
                    // Durable, so stored: gone means the store was
                    // changed under the gateway. Retry, not spin.
                    return Ended::Store(AuditError::Read(format!(
                        "record {} is missing from the store",
                        sent + 1
                    )));
                };
                if let Err(e) = wire.send(&messages).await {
                    return Ended::Lost(e);
                }
                sent = last;
            } else {
                let wait = match &heads.sent {
                    Some(head) if head.seq > heads.last_seq => wire.patience().min(
                        self.checkpoints
                            .every
                            .saturating_sub(heads.last_at.elapsed()),
                    ),
                    _ => wire.patience(),
                };
                tokio::select! {
                    _ = grew => {}
                    _ = tokio::time::sleep(wait) => {}
                    answer = wire.hear() => match answer {
                        Ok(acked) => heard = acked,
                        Err(e) => return Ended::Lost(e),
                    },
                }
            }
            match wire.settled() {
                Ok(settled) => heard = heard.max(settled),
                Err(e) => return Ended::Lost(e),
            }
            if self.stopped() {
                return Ended::Lost("the audit log is closed".into());
            }
            if let Some(seq) = heard.filter(|seq| *seq > delivered) {
                delivered = seq;
                self.save_position(delivered);
            }
            self.status.set_lag(durable, delivered);
            let lag = durable.saturating_sub(delivered);
            if lag > self.config.lag_warning_records && !warned {
                tracing::warn!(lag, "audit shipping is behind");
                warned = true;
            } else if lag <= self.config.lag_warning_records {
                warned = false;
            }
        }
    }

    /// The gateway stopped its audit log: shipping resumes at the next start.
    fn stopped(&self) -> bool {
        self.source.counters.stopped.load(Ordering::Acquire)
    }

    /// The last delivered seq, from the meta tree (0: nothing yet).
    fn position(&self) -> Option<u64> {
        let db = self.source.db.get()?;
        Some(shipped(&db).unwrap_or(0))
    }

    /// Keeps `seq` as delivered; durable with the writer's next fsync (a
    /// crash before it only resends).
    fn save_position(&self, seq: u64) {
        let Some(db) = self.source.db.get() else {
            return;
        };
        if let Err(e) = db
            .open_tree(META_TREE)
            .and_then(|meta| meta.insert(SHIPPED_KEY, &seq.to_be_bytes()))
        {
            tracing::warn!(error = %e, "audit shipping could not keep its position");
        }
    }

    /// The checkpoint message of the head sent, when one is due: records
    /// were sent since the last and `every` has passed.
    fn checkpoint_due(&self, heads: &mut Heads) -> Option<(u64, Vec<u8>)> {
        let head = heads.sent.as_ref()?;
        if head.seq <= heads.last_seq || heads.last_at.elapsed() < self.checkpoints.every {
            return None;
        }
        let checkpoint = match &self.checkpoints.signer {
            Some(signer) => signer.sign(&self.instance, head.clone()),
            None => Checkpoint {
                instance: self.instance.clone(),
                checkpoint: head.clone(),
                key: None,
                signature: None,
            },
        };
        heads.last_at = Instant::now();
        heads.last_seq = head.seq;
        Some((head.seq, self.format().checkpoint(&checkpoint)))
    }

    fn format(&self) -> message::Format<'_> {
        message::Format {
            format: self.config.format,
            instance: &self.instance,
            host: &self.host,
            max_bytes: self.config.max_message_bytes,
        }
    }

    /// The messages of the records after `sent`, up to `durable`, at most
    /// `most` of them and about [`BATCH_BYTES`] (at least one), and the
    /// head among them.
    #[allow(clippy::type_complexity)]
    fn batch(
        &self,
        sent: u64,
        durable: u64,
        most: usize,
    ) -> Result<(Vec<(u64, Vec<u8>)>, Option<Head>), AuditError> {
        let db = self
            .source
            .db
            .get()
            .ok_or_else(|| AuditError::Read("the audit store is being reopened".into()))?;
        let format = self.format();
        let mut messages = Vec::new();
        let mut bytes = 0;
        let mut head = None;
        for entry in scan_tree(&db, sent + 1).take(most) {
            let (seq, value) = entry?;
            if seq > durable || bytes >= BATCH_BYTES {
                break;
            }
            if messages.is_empty() && seq > sent + 1 {
                // Gone from the store before they were shipped (archived
                // by hand, or removed): they can never be sent from here.
                tracing::error!(first = sent + 1, last = seq - 1, "audit records missing from the store were never shipped: send them from their archive");
            }
            let record = decode(seq, &value)?;
            let (msg, cut) = format.message(&record, &value);
            if cut {
                self.status.truncated.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(seq, bytes = value.len(), max = format.max_bytes, "audit shipping: a record longer than max_message_bytes is shipped cut (the store keeps it whole)");
            }
            bytes += msg.len();
            messages.push((seq, msg));
            head = Some(Head {
                seq,
                hash: record.hash,
                ts: record.ts,
            });
        }
        Ok((messages, head))
    }
}
