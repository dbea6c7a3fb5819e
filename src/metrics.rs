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

use crate::session::Shared;

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
    /// Server connections reset before serving another session.
    pub server_resets: AtomicU64,
    /// Identity assertions run (a new identity, or after opaque code).
    pub identity_assertions: AtomicU64,
    pub audit_append_seconds_sum_us: AtomicU64,
    pub audit_appends: AtomicU64,
    /// (transactions, statements) per client user.
    per_user: Mutex<BTreeMap<String, (u64, u64)>>,
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

/// The Prometheus text exposition of everything the gateway knows now.
pub fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, kind: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    counter(
        "pgwarden_clients",
        "Clients connected and logged in.",
        "gauge",
        load(&m.clients),
    );
    counter(
        "pgwarden_auth_failures_total",
        "Logins PostgreSQL refused.",
        "counter",
        load(&m.auth_failures),
    );
    counter(
        "pgwarden_denied_total",
        "Logins without a role mapping.",
        "counter",
        load(&m.denied),
    );
    counter(
        "pgwarden_guard_blocks_total",
        "Statements refused by the statement guard.",
        "counter",
        load(&m.guard_blocks),
    );
    counter(
        "pgwarden_identity_violations_total",
        "Sessions ended by verify = transaction.",
        "counter",
        load(&m.identity_violations),
    );
    counter(
        "pgwarden_pool_waits_total",
        "Server connection checkouts.",
        "counter",
        load(&m.pool_waits),
    );
    counter(
        "pgwarden_pool_timeouts_total",
        "Checkouts that timed out (53300).",
        "counter",
        load(&m.pool_timeouts),
    );
    counter(
        "pgwarden_server_resets_total",
        "Server connections reset before serving another session.",
        "counter",
        load(&m.server_resets),
    );
    counter(
        "pgwarden_identity_assertions_total",
        "Identity assertions run on server connections.",
        "counter",
        load(&m.identity_assertions),
    );
    let audit = shared.auditor.counters();
    counter(
        "pgwarden_audit_queue_depth",
        "Audit records waiting for the writer.",
        "gauge",
        shared.auditor.queue_depth() as u64,
    );
    counter(
        "pgwarden_audit_appended_total",
        "Audit records stored.",
        "counter",
        audit.appended,
    );
    counter(
        "pgwarden_audit_failures_total",
        "Audit records that could not be stored.",
        "counter",
        audit.failed,
    );
    counter(
        "pgwarden_audit_fsyncs_total",
        "fsyncs of the audit store.",
        "counter",
        audit.syncs,
    );
    let appends = load(&m.audit_appends);
    let _ = writeln!(
        out,
        "# HELP pgwarden_audit_append_seconds Write-ahead append latency.\n# TYPE pgwarden_audit_append_seconds summary\npgwarden_audit_append_seconds_sum {}\npgwarden_audit_append_seconds_count {appends}",
        load(&m.audit_append_seconds_sum_us) as f64 / 1e6
    );
    let _ = writeln!(out, "# HELP pgwarden_server_connections Server connections per database and state.\n# TYPE pgwarden_server_connections gauge");
    for (db, status) in shared.pools.status() {
        let db = label(&db);
        let idle = status.available as u64;
        let total = status.size as u64;
        let _ = writeln!(
            out,
            "pgwarden_server_connections{{database=\"{db}\",state=\"idle\"}} {idle}"
        );
        let _ = writeln!(
            out,
            "pgwarden_server_connections{{database=\"{db}\",state=\"active\"}} {}",
            total.saturating_sub(idle)
        );
    }
    let per_user = m.per_user.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let _ = writeln!(out, "# HELP pgwarden_transactions_total Transactions per client user.\n# TYPE pgwarden_transactions_total counter");
    for (user, (tx, _)) in &per_user {
        let _ = writeln!(
            out,
            "pgwarden_transactions_total{{client_user=\"{}\"}} {tx}",
            label(user)
        );
    }
    let _ = writeln!(out, "# HELP pgwarden_statements_total Statements per client user.\n# TYPE pgwarden_statements_total counter");
    for (user, (_, st)) in &per_user {
        let _ = writeln!(
            out,
            "pgwarden_statements_total{{client_user=\"{}\"}} {st}",
            label(user)
        );
    }
    out
}

/// Serves `GET /metrics` (any path, in fact) on `listener` until dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let read =
                tokio::time::timeout(Duration::from_secs(5), socket.read(&mut request)).await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return;
            }
            let body = render(&shared);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
