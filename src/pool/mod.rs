//! The service-user pool: per-database deadpool pools of raw backend
//! connections that pgwarden logs in itself.
//!
//! Invariant: a connection handed out by [`Pools::acquire`] is logged in,
//! idle (`ReadyForQuery` `I` was its last message) and healthy as far as a
//! non-blocking probe can tell; a connection the session found broken or left
//! mid-transaction is destroyed with [`discard`], never returned.

pub mod conn;
pub mod statements;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult, Timeouts};

use crate::auth::service::{self, ServiceLogin};
use crate::config::{BackendConfig, PoolConfig};
use crate::protocol::messages::PgError;
use crate::protocol::sqlstate;
use crate::tls::BackendTls;
use conn::{BackendError, ServerConn};

/// Creates and recycles service-user connections to one database.
pub struct ServerManager {
    backend: Arc<BackendConfig>,
    tls: Option<BackendTls>,
    database: String,
}

impl managed::Manager for ServerManager {
    type Type = ServerConn;
    type Error = BackendError;

    async fn create(&self) -> Result<ServerConn, BackendError> {
        let timeout = Duration::from_millis(self.backend.connect_timeout_ms);
        let mut conn = ServerConn::connect(&self.backend, self.tls.as_ref()).await?;
        let who = ServiceLogin {
            user: &self.backend.service_user,
            password: self.backend.service_password.as_deref(),
            database: &self.database,
        };
        match tokio::time::timeout(timeout, service::login(&mut conn, &who)).await {
            Ok(result) => result?,
            Err(_) => return Err(BackendError::ConnectTimeout(self.backend.address())),
        }
        tracing::debug!(database = %self.database, backend_pid = conn.pid, "server connection created");
        Ok(conn)
    }

    async fn recycle(&self, conn: &mut ServerConn, _: &Metrics) -> RecycleResult<BackendError> {
        if conn.is_healthy() {
            Ok(())
        } else {
            tracing::debug!(
                backend_pid = conn.pid,
                "discarding a closed server connection"
            );
            Err(RecycleError::message("server connection is closed"))
        }
    }
}

/// A server connection checked out of the pool.
pub type PooledConn = Object<ServerManager>;

/// Destroys a checked-out connection instead of returning it: the socket
/// closes now, so the backend rolls back whatever it was doing.
pub fn discard(conn: PooledConn) {
    let conn = Object::take(conn);
    tracing::debug!(backend_pid = conn.pid, "server connection discarded");
    drop(conn);
}

/// One pool per database, created on first use.
pub struct Pools {
    backend: Arc<BackendConfig>,
    tls: Option<BackendTls>,
    config: PoolConfig,
    pools: Mutex<HashMap<String, managed::Pool<ServerManager>>>,
}

impl Pools {
    pub fn new(backend: BackendConfig, config: PoolConfig, tls: Option<BackendTls>) -> Pools {
        Pools {
            backend: Arc::new(backend),
            tls,
            config,
            pools: Mutex::new(HashMap::new()),
        }
    }

    fn pool(&self, database: &str) -> managed::Pool<ServerManager> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(database) {
            return pool.clone();
        }
        let manager = ServerManager {
            backend: self.backend.clone(),
            tls: self.tls.clone(),
            database: database.to_string(),
        };
        let pool = managed::Pool::builder(manager)
            .max_size(self.config.size)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("a pool with a runtime always builds");
        pools.insert(database.to_string(), pool.clone());
        pool
    }

    /// Checks out a connection to `database`, waiting at most
    /// `acquire_timeout_ms` for one to become free.
    pub async fn acquire(&self, database: &str) -> Result<PooledConn, PgError> {
        let pool = self.pool(database);
        let timeouts = Timeouts {
            wait: Some(Duration::from_millis(self.config.acquire_timeout_ms)),
            create: Some(Duration::from_millis(
                self.backend.connect_timeout_ms.saturating_mul(2),
            )),
            recycle: Some(Duration::from_secs(1)),
        };
        pool.timeout_get(&timeouts)
            .await
            .map_err(|e| acquire_error(e, &self.config))
    }

    /// Idle and total connections per database, for metrics and tests.
    pub fn status(&self) -> Vec<(String, deadpool::Status)> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .iter()
            .map(|(db, p)| (db.clone(), p.status()))
            .collect()
    }

    /// Closes every pool: idle connections are dropped, checked-out ones are
    /// dropped when returned.
    pub fn close(&self) {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        for pool in pools.values() {
            pool.close();
        }
    }
}

fn acquire_error(e: PoolError<BackendError>, config: &PoolConfig) -> PgError {
    match e {
        PoolError::Timeout(managed::TimeoutType::Wait) => PgError::error(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "no server connection became free within {} ms (pool size {})",
                config.acquire_timeout_ms, config.size
            ),
        ),
        PoolError::Backend(BackendError::Server(fields)) => PgError::error(
            sqlstate::CONNECTION_FAILURE,
            format!(
                "pgwarden cannot open a server connection: {}",
                fields.message
            ),
        )
        .with_detail(format!("PostgreSQL reported SQLSTATE {}", fields.code)),
        PoolError::Closed => PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "pgwarden is shutting down"),
        other => PgError::error(
            sqlstate::CONNECTION_FAILURE,
            format!("pgwarden cannot open a server connection: {other}"),
        ),
    }
}
