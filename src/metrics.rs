//! Prometheus metrics: counters the sessions bump, gauges read at scrape
//! time, and a minimal HTTP endpoint (`[admin] listen`, off by default).
//!
//! Invariant: recording a metric never blocks a session for longer than an
//! atomic add or a short uncontended lock, and never fails.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Counters kept by the gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    pub clients: AtomicU64,
    pub auth_failures: AtomicU64,
    pub denied: AtomicU64,
    pub guard_blocks: AtomicU64,
    pub identity_violations: AtomicU64,
    pub pool_waits: AtomicU64,
    pub pool_timeouts: AtomicU64,
    /// Connections handed straight to a session of the same identity.
    pub pool_handoffs: AtomicU64,
    /// Server connections reset before serving another session.
    pub server_resets: AtomicU64,
    /// Identity assertions run (a new identity, or after opaque code).
    pub identity_assertions: AtomicU64,
    pub audit_append_seconds_sum_us: AtomicU64,
    pub audit_appends: AtomicU64,
    /// (transactions, statements) per client user.
    per_user: Mutex<BTreeMap<String, (u64, u64)>>,
    /// PgBouncer's `SHOW STATS` figures per database.
    per_db: Mutex<BTreeMap<String, DbStats>>,
    /// When the gateway started (for per-second averages).
    pub started: std::sync::OnceLock<std::time::Instant>,
}

/// One database's traffic, as PgBouncer's `SHOW STATS` counts it: client
/// transactions and requests, bytes from and to clients, and microseconds
/// spent in transactions, in requests and waiting for a server connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DbStats {
    pub xacts: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
}

impl DbStats {
    fn add(&mut self, other: &DbStats) {
        self.xacts += other.xacts;
        self.queries += other.queries;
        self.received += other.received;
        self.sent += other.sent;
        self.xact_us += other.xact_us;
        self.query_us += other.query_us;
        self.wait_us += other.wait_us;
    }
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    /// Adds a session's (transactions, statements) to its user's totals.
    /// Sessions count locally and add in batches, so the hot path takes no
    /// shared lock.
    pub fn add_user_counts(&self, user: &str, transactions: u64, statements: u64) {
        if transactions == 0 && statements == 0 {
            return;
        }
        self.per_user(user, |e| {
            e.0 += transactions;
            e.1 += statements;
        });
    }

    /// Adds a session's figures (counted locally, added in batches) to its
    /// database's.
    pub fn add_db_stats(&self, database: &str, stats: &DbStats) {
        if *stats == DbStats::default() {
            return;
        }
        let mut map = self.per_db.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(database) {
            Some(entry) => entry.add(stats),
            None => {
                map.insert(database.to_string(), *stats);
            }
        }
    }

    /// Every database's figures so far.
    pub fn db_stats(&self) -> BTreeMap<String, DbStats> {
        self.per_db
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn audit_append(&self, took: Duration) {
        self.audit_appends.fetch_add(1, Ordering::Relaxed);
        self.audit_append_seconds_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    fn per_user(&self, user: &str, f: impl FnOnce(&mut (u64, u64))) {
        let mut map = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(user) {
            Some(e) => f(e),
            None => {
                let mut e = (0, 0);
                f(&mut e);
                map.insert(user.to_string(), e);
            }
        }
    }
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What the rest of the gateway contributes to a scrape, read at scrape
/// time: metrics takes this snapshot, never the sessions' shared state.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub audit: crate::audit::AuditCounters,
    pub audit_queue_depth: u64,
    /// Shipping, when on: (records not yet delivered, seconds the oldest
    /// of them has waited, records shipped cut to `max_message_bytes`).
    pub ship: Option<(u64, u64, u64)>,
    /// (database, idle, total) server connections.
    pub pools: Vec<(String, u64, u64)>,
    /// `[backend] hosts`: each host and whether it is the primary in use,
    /// and the failovers so far (empty for a single host).
    pub backend: (Vec<(String, bool)>, u64),
    /// Bytes of `large_message_memory` held by messages now, and the
    /// messages that waited for it.
    pub large_messages: (u64, u64),
}

/// Prometheus metric types used here.
#[derive(Clone, Copy)]
enum Type {
    Counter,
    Gauge,
}

/// Where a series' value is: a counter of [`Metrics`], or a number of the
/// [`Snapshot`].
type CounterOf = fn(&Metrics) -> &AtomicU64;
type ValueOf = fn(&Snapshot) -> u64;

/// The gateway's own counters: name, help, type, where the value is.
const COUNTERS: &[(&str, &str, Type, CounterOf)] = &[
    (
        "pgwarden_clients",
        "Clients connected and logged in.",
        Type::Gauge,
        |m| &m.clients,
    ),
    (
        "pgwarden_auth_failures_total",
        "Logins PostgreSQL refused.",
        Type::Counter,
        |m| &m.auth_failures,
    ),
    (
        "pgwarden_denied_total",
        "Logins without a role mapping.",
        Type::Counter,
        |m| &m.denied,
    ),
    (
        "pgwarden_guard_blocks_total",
        "Statements refused by the statement guard.",
        Type::Counter,
        |m| &m.guard_blocks,
    ),
    (
        "pgwarden_identity_violations_total",
        "Sessions ended by verify = transaction.",
        Type::Counter,
        |m| &m.identity_violations,
    ),
    (
        "pgwarden_pool_waits_total",
        "Server connection checkouts.",
        Type::Counter,
        |m| &m.pool_waits,
    ),
    (
        "pgwarden_pool_timeouts_total",
        "Checkouts that timed out (53300).",
        Type::Counter,
        |m| &m.pool_timeouts,
    ),
    (
        "pgwarden_pool_handoffs_total",
        "Server connections handed straight to a waiting session of the same identity.",
        Type::Counter,
        |m| &m.pool_handoffs,
    ),
    (
        "pgwarden_server_resets_total",
        "Server connections reset before serving another session.",
        Type::Counter,
        |m| &m.server_resets,
    ),
    (
        "pgwarden_identity_assertions_total",
        "Identity assertions run on server connections.",
        Type::Counter,
        |m| &m.identity_assertions,
    ),
];

/// The gateway's numbers kept outside [`Metrics`]: name, help, type, where
/// the value is.
const SNAPSHOT: &[(&str, &str, Type, ValueOf)] = &[
    (
        "pgwarden_large_message_bytes",
        "Bytes of [server] large_message_memory held by client messages over 64 KiB being read or handled.",
        Type::Gauge,
        |s| s.large_messages.0,
    ),
    (
        "pgwarden_large_message_waits_total",
        "Client messages over 64 KiB that waited for large_message_memory.",
        Type::Counter,
        |s| s.large_messages.1,
    ),
];

/// The audit log's numbers: name, help, type, where the value is.
const AUDIT: &[(&str, &str, Type, ValueOf)] = &[
    (
        "pgwarden_audit_queue_depth",
        "Audit records waiting for the writer.",
        Type::Gauge,
        |s| s.audit_queue_depth,
    ),
    (
        "pgwarden_audit_appended_total",
        "Audit records stored.",
        Type::Counter,
        |s| s.audit.appended,
    ),
    (
        "pgwarden_audit_failures_total",
        "Audit records that could not be stored.",
        Type::Counter,
        |s| s.audit.failed,
    ),
    (
        "pgwarden_audit_fsyncs_total",
        "fsyncs of the audit store.",
        Type::Counter,
        |s| s.audit.syncs,
    ),
    (
        "pgwarden_audit_gathered_batches_total",
        "group: commits whose fsync waited up to 1 ms for more records because their sessions queue for a crowded pool.",
        Type::Counter,
        |s| s.audit.gathered,
    ),
    (
        "pgwarden_audit_ship_lag_records",
        "Durable audit records not yet delivered to the syslog server (0 without shipping).",
        Type::Gauge,
        |s| s.ship.map_or(0, |(records, _, _)| records),
    ),
    (
        "pgwarden_audit_ship_lag_seconds",
        "How long the oldest undelivered audit record has waited for shipping.",
        Type::Gauge,
        |s| s.ship.map_or(0, |(_, seconds, _)| seconds),
    ),
    (
        "pgwarden_audit_ship_truncated_total",
        "Audit records shipped cut to [audit.ship] max_message_bytes (the store keeps them whole).",
        Type::Counter,
        |s| s.ship.map_or(0, |(_, _, cut)| cut),
    ),
];

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn type_name(t: Type) -> &'static str {
    match t {
        Type::Counter => "counter",
        Type::Gauge => "gauge",
    }
}

/// The Prometheus text exposition of the counters and of `snapshot`.
pub fn render(m: &Metrics, snapshot: &Snapshot) -> String {
    let mut out = String::new();
    for (name, help, kind, value) in COUNTERS {
        header(&mut out, name, help, type_name(*kind));
        let _ = writeln!(out, "{name} {}", value(m).load(Ordering::Relaxed));
    }
    for (name, help, kind, value) in SNAPSHOT.iter().chain(AUDIT) {
        header(&mut out, name, help, type_name(*kind));
        let _ = writeln!(out, "{name} {}", value(snapshot));
    }
    header(
        &mut out,
        "pgwarden_audit_append_seconds",
        "Write-ahead append latency.",
        "summary",
    );
    let _ = writeln!(
        out,
        "pgwarden_audit_append_seconds_sum {}\npgwarden_audit_append_seconds_count {}",
        m.audit_append_seconds_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        m.audit_appends.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "pgwarden_server_connections",
        "Server connections per database and state.",
        "gauge",
    );
    for (db, idle, total) in &snapshot.pools {
        let db = label(db);
        for (state, n) in [("idle", *idle), ("active", total.saturating_sub(*idle))] {
            let _ = writeln!(
                out,
                "pgwarden_server_connections{{database=\"{db}\",state=\"{state}\"}} {n}"
            );
        }
    }
    let (hosts, failovers) = &snapshot.backend;
    if !hosts.is_empty() {
        header(
            &mut out,
            "pgwarden_backend_primary",
            "1 for the host in use as the primary, 0 for the others ([backend] hosts).",
            "gauge",
        );
        for (host, primary) in hosts {
            let _ = writeln!(
                out,
                "pgwarden_backend_primary{{host=\"{}\"}} {}",
                label(host),
                u8::from(*primary)
            );
        }
        header(
            &mut out,
            "pgwarden_backend_failovers_total",
            "Changes of primary from one host to another.",
            "counter",
        );
        let _ = writeln!(out, "pgwarden_backend_failovers_total {failovers}");
    }
    let per_user = m.per_user.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (name, help, pick) in [
        (
            "pgwarden_transactions_total",
            "Transactions per client user.",
            0,
        ),
        (
            "pgwarden_statements_total",
            "Statements per client user.",
            1,
        ),
    ] {
        header(&mut out, name, help, "counter");
        for (user, counts) in &per_user {
            let n = if pick == 0 { counts.0 } else { counts.1 };
            let _ = writeln!(out, "{name}{{client_user=\"{}\"}} {n}", label(user));
        }
    }
    out
}

/// An admin endpoint's answer: HTTP status and body (text).
pub type Answer = (u16, String);

/// What the admin listener answers, by path (`/metrics`, `/healthz`,
/// `/readyz`; any other path gets the metrics, as before these existed).
pub type Handler = Arc<
    dyn Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>
        + Send
        + Sync,
>;

/// Serves HTTP GETs on `listener` until dropped, each answered by
/// `handler` with the request's path.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let read =
                tokio::time::timeout(Duration::from_secs(5), socket.read(&mut request)).await;
            let Ok(Ok(n)) = read else {
                return;
            };
            if n == 0 {
                return;
            }
            let (status, body) = handler(path_of(&request[..n]).to_string()).await;
            let reason = match status {
                200 => "OK",
                503 => "Service Unavailable",
                _ => "Error",
            };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// The path of an HTTP request line (`GET /readyz HTTP/1.1`); "/" if none.
fn path_of(request: &[u8]) -> &str {
    let line = request
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let mut parts = line.split(|&b| b == b' ');
    let _method = parts.next();
    let target = parts
        .next()
        .and_then(|t| std::str::from_utf8(t).ok())
        .unwrap_or("/");
    target.split('?').next().unwrap_or("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_comes_from_the_request_line() {
        assert_eq!(
            path_of(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"),
            "/readyz"
        );
        assert_eq!(path_of(b"GET /healthz?verbose HTTP/1.0\r\n"), "/healthz");
        assert_eq!(path_of(b"garbage"), "/");
    }

    #[test]
    fn renders_every_series_with_its_help_and_type() {
        let m = Metrics::default();
        Metrics::inc(&m.guard_blocks);
        m.add_user_counts("a\"lice", 2, 5);
        let snapshot = Snapshot {
            audit: crate::audit::AuditCounters {
                appended: 7,
                failed: 0,
                syncs: 3,
                gathered: 2,
            },
            audit_queue_depth: 1,
            ship: None,
            pools: vec![("app".into(), 1, 4)],
            backend: (
                vec![("db1:5432".into(), false), ("db2:5432".into(), true)],
                1,
            ),
            large_messages: (70_000, 2),
        };
        let text = render(&m, &snapshot);
        for line in [
            "# TYPE pgwarden_guard_blocks_total counter",
            "pgwarden_guard_blocks_total 1",
            "# TYPE pgwarden_clients gauge",
            "pgwarden_audit_appended_total 7",
            "pgwarden_audit_fsyncs_total 3",
            "pgwarden_audit_gathered_batches_total 2",
            "pgwarden_server_connections{database=\"app\",state=\"active\"} 3",
            "pgwarden_statements_total{client_user=\"a\\\"lice\"} 5",
            "pgwarden_transactions_total{client_user=\"a\\\"lice\"} 2",
            "pgwarden_backend_primary{host=\"db2:5432\"} 1",
            "pgwarden_backend_failovers_total 1",
            "# TYPE pgwarden_large_message_bytes gauge",
            "pgwarden_large_message_bytes 70000",
            "pgwarden_large_message_waits_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        let helps = text.lines().filter(|l| l.starts_with("# HELP")).count();
        let types = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(helps, types);
        // And the backend's two series, as hosts are given.
        assert_eq!(helps, COUNTERS.len() + SNAPSHOT.len() + AUDIT.len() + 4 + 2);
    }
}
