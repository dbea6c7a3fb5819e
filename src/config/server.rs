//! `[server]`: where clients connect, and what one client may take.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain; when set (with `tls_key`), clients may use TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest frame a client may send, in bytes; larger gets FATAL 08P01.
    pub max_message_size: usize,
    /// Bytes that client messages over 64 KiB may hold at once, across
    /// all sessions; a session whose message would pass it waits. 0: no
    /// limit.
    pub large_message_memory: usize,
    /// Bytes a session's prepared statements may keep; a `Parse` past it is
    /// refused (53400). 0: no limit.
    pub prepared_statement_memory: usize,
    /// How long a client may take to finish startup and authentication.
    pub login_timeout_ms: u64,
    /// Clients served at once; more get FATAL 53300.
    pub max_client_connections: usize,
    /// A client idle outside a transaction this long is closed (FATAL
    /// 57P05); 0 = never.
    pub client_idle_timeout_ms: u64,
    /// A client idle inside a transaction this long is closed (FATAL 25P03)
    /// and its server connection rolled back and freed; 0 = never.
    pub idle_in_transaction_timeout_ms: u64,
    /// A statement running this long is cancelled (ERROR 57014); 0 = never.
    pub query_timeout_ms: u64,
    /// A client that takes nothing of what it is sent this long is closed
    /// (FATAL 08006) and its server connection given up; 0 = never.
    pub client_write_timeout_ms: u64,
    /// How long a graceful shutdown waits for in-flight transactions.
    pub shutdown_timeout_ms: u64,
    /// This gateway's id among its `[[peers]]` (1 to 255), carried in the
    /// cancel keys it hands out; 0: no peers.
    pub peer_id: u8,
    /// Threads that run sessions; 0: one per CPU core.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:6432".parse().expect("valid default address"),
            tls_cert: None,
            tls_key: None,
            max_message_size: 256 * 1024 * 1024,
            large_message_memory: 1024 * 1024 * 1024,
            prepared_statement_memory: 64 * 1024 * 1024,
            login_timeout_ms: 60_000,
            max_client_connections: 5_000,
            client_idle_timeout_ms: 0,
            idle_in_transaction_timeout_ms: 0,
            query_timeout_ms: 0,
            client_write_timeout_ms: 0,
            shutdown_timeout_ms: 30_000,
            peer_id: 0,
            worker_threads: 0,
        }
    }
}
