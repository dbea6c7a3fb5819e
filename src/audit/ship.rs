//! Shipping: every durable record, in seq order, to a syslog server over
//! TCP, as an RFC 5424 message in RFC 6587 octet-counting framing, its
//! body the record as stored (JSON) with this gateway's `instance` added.
//!
//! Invariants:
//! - at least once: the store is the buffer. The shipper reads records the
//!   writer has fsynced (never one a crash could take back and reuse the
//!   seq of), and its position (the last seq it counts as delivered) is
//!   kept in the store's meta tree. After a restart, a lost connection or a
//!   crash it resends from that position, so a record may arrive twice,
//!   identified by (`instance`, `seq`), never not at all;
//! - TCP syslog has no acknowledgement: a batch counts as delivered only
//!   once it was written [`SETTLE`] ago and the connection is still open
//!   (a server that stops closes it, and what it had not read yet is sent
//!   again on the next connection);
//! - shipping never slows statements: it runs on its own task, reads the
//!   store without the writer, and only ever waits for the server.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::reader::{scan_tree, INSTANCE_KEY, META_TREE};
use super::record::Record;
use super::store::{decode, SharedDb};
use super::writer::Counters;
use super::AuditError;
use crate::config::{ShipConfig, ShipFormat};
use crate::tls::MaybeTls;

/// A connection to the syslog server.
type Stream = MaybeTls<TlsStream<TcpStream>>;

/// How long a written batch must stay on an open connection before it
/// counts as delivered.
pub const SETTLE: Duration = Duration::from_secs(1);
/// Most records read and written at once.
const BATCH: usize = 512;
/// Reconnect backoff: first wait, and the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connect or a write that takes longer than this fails the connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const SHIPPED_KEY: &str = "shipped";
/// RFC 5424 PRI: facility 13 (log audit) * 8 + severity 6 (informational).
const PRI: u8 = 13 * 8 + 6;

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
    if let Some(id) = meta.get(INSTANCE_KEY).map_err(read_err)? {
        return Ok(String::from_utf8_lossy(&id).into_owned());
    }
    let id = format!("pgw-{:016x}", rand::random::<u64>());
    meta.insert(INSTANCE_KEY, id.as_bytes()).map_err(read_err)?;
    Ok(id)
}

fn read_err(e: sled::Error) -> AuditError {
    AuditError::Read(e.to_string())
}

/// The TLS connector `config` asks for (`tls = true`), with the name the
/// server's certificate must carry (the address's host).
pub fn tls_for(config: &ShipConfig) -> Result<Option<Tls>, String> {
    if !config.tls {
        return Ok(None);
    }
    let ca = config
        .ca_file
        .as_deref()
        .ok_or("[audit.ship] tls = true needs ca_file")?;
    let client = config.cert_file.as_deref().zip(config.key_file.as_deref());
    let connector = crate::tls::verifying_connector(ca, client)?;
    let host = config
        .address
        .rsplit_once(':')
        .map_or(config.address.as_str(), |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("[audit.ship] address: {host} is not a server name: {e}"))?;
    Ok(Some(Tls { connector, name }))
}

/// TLS towards the syslog server.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

/// Starts shipping on the current runtime; returns its status.
pub fn spawn(
    source: Source,
    config: ShipConfig,
    tls: Option<Tls>,
    instance: String,
) -> Arc<ShipStatus> {
    let status = Arc::new(ShipStatus::default());
    status.started.get_or_init(Instant::now);
    let shipper = Shipper {
        source,
        config,
        tls,
        instance,
        host: hostname(),
        status: status.clone(),
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

struct Shipper {
    source: Source,
    config: ShipConfig,
    tls: Option<Tls>,
    instance: String,
    host: String,
    status: Arc<ShipStatus>,
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
            let connected = tokio::time::timeout(IO_TIMEOUT, self.connect()).await;
            let ended = match connected {
                Ok(Ok(stream)) => {
                    if let Some(since) = down_since.take() {
                        tracing::warn!(address = %self.config.address, down_s = since.elapsed().as_secs(), "audit shipping reconnected");
                    }
                    backoff = BACKOFF_FIRST;
                    self.status.connected.store(true, Ordering::Relaxed);
                    let ended = self.serve(stream).await;
                    self.status.connected.store(false, Ordering::Relaxed);
                    ended
                }
                Ok(Err(e)) => Ended::Lost(e.to_string()),
                Err(_) => Ended::Lost("connect timed out".into()),
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

    /// A connection to the server, over TLS when configured.
    async fn connect(&self) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(&self.config.address).await?;
        match &self.tls {
            None => Ok(MaybeTls::Plain(tcp)),
            Some(tls) => {
                let stream = tls.connector.connect(tls.name.clone(), tcp).await?;
                Ok(MaybeTls::Tls(Box::new(stream)))
            }
        }
    }

    /// Ships on one connection, from the delivered position, until it ends.
    async fn serve(&self, mut stream: Stream) -> Ended {
        let Some(mut delivered) = self.position() else {
            return Ended::Store(AuditError::Read("the audit store is being reopened".into()));
        };
        let mut sent = delivered;
        // Batches written and not yet settled: (when, last seq).
        let mut unsettled: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut warned = false;
        loop {
            let grew = self.source.counters.durable_grew.notified();
            let durable = self.source.counters.durable.load(Ordering::Acquire);
            if sent < durable {
                let (bytes, last) = match self.batch(sent, durable) {
                    Ok((_, last)) if last == sent => {
                        // Durable, so stored: gone means the store was
                        // changed under the gateway. Retry, not spin.
                        return Ended::Store(AuditError::Read(format!(
                            "record {} is missing from the store",
                            sent + 1
                        )));
                    }
                    Ok(batch) => batch,
                    Err(e) => return Ended::Store(e),
                };
                let written = async {
                    stream.write_all(&bytes).await?;
                    stream.flush().await
                };
                match tokio::time::timeout(IO_TIMEOUT, written).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Ended::Lost(e.to_string()),
                    Err(_) => return Ended::Lost("write timed out".into()),
                }
                sent = last;
                unsettled.push_back((Instant::now(), last));
            } else {
                let wait = unsettled
                    .front()
                    .map_or(SETTLE, |(at, _)| SETTLE.saturating_sub(at.elapsed()));
                tokio::select! {
                    _ = grew => {}
                    _ = tokio::time::sleep(wait) => {}
                    ready = tcp(&stream).readable() => {
                        if let Err(e) = ready {
                            return Ended::Lost(e.to_string());
                        }
                    }
                }
            }
            if let Some(why) = closed(tcp(&stream)) {
                return Ended::Lost(why);
            }
            if self.stopped() {
                return Ended::Lost("the audit log is closed".into());
            }
            while let Some(&(at, last)) = unsettled.front() {
                if at.elapsed() < SETTLE {
                    break;
                }
                unsettled.pop_front();
                delivered = last;
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
        let meta = db.open_tree(META_TREE).ok()?;
        let stored = meta.get(SHIPPED_KEY).ok()?;
        Some(
            stored
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, u64::from_be_bytes),
        )
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

    /// The framed messages of the records after `sent`, up to `durable` and
    /// [`BATCH`] of them, and the last seq among them.
    fn batch(&self, sent: u64, durable: u64) -> Result<(Vec<u8>, u64), AuditError> {
        let db = self
            .source
            .db
            .get()
            .ok_or_else(|| AuditError::Read("the audit store is being reopened".into()))?;
        let mut out = Vec::new();
        let mut last = sent;
        for entry in scan_tree(&db, sent + 1).take(BATCH) {
            let (seq, value) = entry?;
            if seq > durable {
                break;
            }
            let record = decode(seq, &value)?;
            frame(&mut out, &self.message(&record, &value));
            last = seq;
        }
        Ok((out, last))
    }

    /// One RFC 5424 message: the record's time and kind in the header, the
    /// stored record with `instance` added (or its CEF event) as the body.
    fn message(&self, record: &Record, stored: &[u8]) -> Vec<u8> {
        let mut msg = format!(
            "<{PRI}>1 {} {} pgwarden {} {} - ",
            record.ts,
            self.host,
            std::process::id(),
            record.kind.as_str()
        )
        .into_bytes();
        match self.config.format {
            ShipFormat::Json => msg.extend_from_slice(&with_instance(stored, &self.instance)),
            ShipFormat::Cef => {
                msg.extend_from_slice(super::cef::event(record, &self.instance).as_bytes())
            }
        }
        msg
    }
}

/// The stored record (a JSON object) with `"instance"` as its first field.
fn with_instance(stored: &[u8], instance: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.len() + instance.len() + 16);
    out.extend_from_slice(b"{\"instance\":");
    out.extend_from_slice(
        serde_json::to_string(instance)
            .expect("a string serializes")
            .as_bytes(),
    );
    match stored.strip_prefix(b"{") {
        Some(rest) if rest.first() != Some(&b'}') => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
        Some(rest) => out.extend_from_slice(rest),
        None => out.push(b'}'),
    }
    out
}

/// RFC 6587 octet counting: the length, a space, the message.
fn frame(out: &mut Vec<u8>, msg: &[u8]) {
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
}

/// The TCP connection under `stream`.
fn tcp(stream: &Stream) -> &TcpStream {
    match stream {
        MaybeTls::Plain(s) => s,
        MaybeTls::Tls(s) => s.get_ref().0,
    }
}

/// Whether the server closed the connection (or it failed); what it sent
/// otherwise is ignored (a syslog server sends no data; under TLS this
/// reads the raw socket, where a close or an alert means the end, and a
/// session ticket is of no use to a client that never resumes).
fn closed(stream: &TcpStream) -> Option<String> {
    let mut buf = [0u8; 512];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return Some("the syslog server closed the connection".into()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_the_stored_record_with_the_instance_first() {
        let body = with_instance(br#"{"seq":1,"kind":"query"}"#, "gw-1");
        assert_eq!(body, br#"{"instance":"gw-1","seq":1,"kind":"query"}"#);
        let quoted = with_instance(b"{}", "a\"b");
        assert_eq!(quoted, br#"{"instance":"a\"b"}"#);
    }

    #[test]
    fn messages_are_framed_by_their_length_in_octets() {
        let mut out = Vec::new();
        frame(&mut out, "<110>1 é".as_bytes());
        frame(&mut out, b"x");
        assert_eq!(out, "9 <110>1 é1 x".as_bytes());
    }
}
