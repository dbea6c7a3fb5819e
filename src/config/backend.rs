//! `[backend]`: the PostgreSQL pgwarden logs in to (one host, or with
//! `hosts` a primary and its standbys), its service user, TLS and timeouts.

use std::path::PathBuf;

use serde::Deserialize;

use super::primary;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    #[serde(default = "default_backend_host")]
    pub host: String,
    #[serde(default = "default_backend_port")]
    pub port: u16,
    pub service_user: String,
    #[serde(default)]
    pub service_password: Option<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Logins relayed to PostgreSQL at once (each holds a temporary backend
    /// connection); more wait their turn, so a burst of clients cannot
    /// exhaust PostgreSQL's `max_connections`.
    #[serde(default = "default_max_auth_connections")]
    pub max_auth_connections: usize,
    /// TLS for pgwarden's own connections to PostgreSQL (the auth relay and
    /// the pool), as libpq's sslmode.
    #[serde(default = "default_backend_tls")]
    pub tls: crate::tls::BackendTlsMode,
    /// PEM CA certificates for `tls = "verify-full"`.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Several PostgreSQL hosts (`"host:port"`), a primary and its
    /// standbys: pgwarden connects to whichever says it is the primary
    /// (`host`/`port` are then not used).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// With `hosts`: how often the primary (and every other host) is checked.
    #[serde(default = "default_health_check_interval_ms")]
    pub health_check_interval_ms: u64,
    /// With `hosts`: how long a new connection waits for a primary during a
    /// failover before it fails with 08006.
    #[serde(default = "default_failover_timeout_ms")]
    pub failover_timeout_ms: u64,
    /// With `hosts`: the database the health check logs in to.
    #[serde(default = "default_health_check_database")]
    pub health_check_database: String,
    /// Which host is the primary now (live state, not configuration).
    #[serde(skip)]
    pub primary: primary::Primary,
}

fn default_health_check_interval_ms() -> u64 {
    1_000
}
fn default_failover_timeout_ms() -> u64 {
    30_000
}
fn default_health_check_database() -> String {
    "postgres".to_string()
}

fn default_backend_tls() -> crate::tls::BackendTlsMode {
    crate::tls::BackendTlsMode::Disable
}

fn default_backend_host() -> String {
    "127.0.0.1".to_string()
}
fn default_backend_port() -> u16 {
    5432
}
fn default_max_auth_connections() -> usize {
    16
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}

impl BackendConfig {
    /// The configured address as a string that `TcpStream::connect`
    /// resolves: `host:port`, or with `hosts`, all of them.
    pub fn address(&self) -> String {
        match self.hosts.is_empty() {
            true => format!("{}:{}", self.host, self.port),
            false => self.hosts.join(", "),
        }
    }

    /// The address of the primary in use now: the configured host, or with
    /// `hosts` the one the health check found (none during a failover).
    pub fn primary_address(&self) -> Option<String> {
        let hosts = self.primary.hosts();
        if hosts.is_empty() {
            return Some(format!("{}:{}", self.host, self.port));
        }
        let current = self.primary.state().current?;
        hosts.get(current).map(|h| h.to_string())
    }

    /// The single configured host (`host`, `port`).
    pub fn configured(&self) -> primary::Host {
        primary::Host {
            host: self.host.clone(),
            port: self.port,
        }
    }

    /// `hosts`, parsed.
    pub fn candidates(&self) -> Result<Vec<primary::Host>, String> {
        self.hosts.iter().map(|h| primary::Host::parse(h)).collect()
    }
}
