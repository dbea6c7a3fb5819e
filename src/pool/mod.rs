//! The server pools: deadpool pools of raw backend connections that
//! pgwarden logs in itself, one per (database, login).
//!
//! Invariant: a connection handed out by [`Pools::acquire`] is logged in,
//! idle (`ReadyForQuery` `I` was its last message) and healthy as far as a
//! non-blocking probe can tell; a connection the session found broken or left
//! mid-transaction is destroyed with [`discard`], never returned.

mod affinity;
mod key;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult, Timeouts};

use crate::auth::logins;
use crate::auth::service::{self, ServiceLogin};
use crate::backend::conn::{BackendError, ServerConn};
use crate::config::{BackendConfig, Isolation, PoolConfig};
use crate::protocol::sqlstate;
use crate::tls::BackendTls;
use key::{IdentityKey, Interned, KeyParts};

/// How long a new connection waits for the database's cap at a time
/// before the checkout looks for an idle connection to close again.
const CAP_RETRY: Duration = Duration::from_millis(100);

/// A pool is crowded when at least this many sessions per connection wait
/// for one: a session that queues behind them waits longer for a connection
/// than its audit record's fsync could be delayed (`audit::writer::GROUP_GATHER`),
/// however the connections are passed on.
const CROWDED_WAITERS_PER_CONNECTION: usize = 8;

/// Whether a pool in `status` is crowded (see [`CROWDED_WAITERS_PER_CONNECTION`]).
fn crowded(status: deadpool::Status) -> bool {
    status.max_size > 0
        && status.size >= status.max_size
        && status.available == 0
        && status.waiting >= CROWDED_WAITERS_PER_CONNECTION * status.max_size
}

/// Creates and recycles connections of one login to one database.
pub struct ServerManager {
    backend: Arc<BackendConfig>,
    tls: Option<BackendTls>,
    database: String,
    user: String,
    password: Option<String>,
    /// The database's cap across its pools (`max_db_connections`).
    cap: Option<Arc<Semaphore>>,
    cap_wait: Duration,
}

impl managed::Manager for ServerManager {
    type Type = ServerConn;
    type Error = BackendError;

    /// Boxed: the login's future is a few KiB, and unboxed it would make
    /// every future that can await a checkout (the session's whole relay,
    /// down to each client read) that much larger, and copied that much at
    /// each of their starts (about 6 KiB per transaction, 12% of the
    /// instructions at 20 clients on a pool of 4).
    async fn create(&self) -> Result<ServerConn, BackendError> {
        Box::pin(self.open()).await
    }

    async fn recycle(&self, conn: &mut ServerConn, _: &Metrics) -> RecycleResult<BackendError> {
        if conn.generation != self.backend.primary.generation() {
            tracing::debug!(
                backend_pid = conn.pid,
                "discarding a server connection to a former primary"
            );
            return Err(RecycleError::message("the primary changed"));
        }
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

impl ServerManager {
    /// A new connection, logged in as the pool's login.
    async fn open(&self) -> Result<ServerConn, BackendError> {
        let permit = match &self.cap {
            Some(cap) => Some(
                tokio::time::timeout(self.cap_wait, cap.clone().acquire_owned())
                    .await
                    .map_err(|_| BackendError::Capped)?
                    .map_err(|_| BackendError::Closed)?,
            ),
            None => None,
        };
        let timeout = Duration::from_millis(self.backend.connect_timeout_ms);
        let mut conn = ServerConn::connect(&self.backend, self.tls.as_ref()).await?;
        let who = ServiceLogin {
            user: &self.user,
            password: self.password.as_deref(),
            database: &self.database,
        };
        match tokio::time::timeout(timeout, service::login(&mut conn, &who)).await {
            Ok(result) => result?,
            Err(_) => return Err(BackendError::ConnectTimeout(self.backend.address())),
        }
        conn.permit = permit;
        conn.started_us = conn.check_new_backend().await?;
        tracing::debug!(database = %self.database, login = %self.user, backend_pid = conn.pid, "server connection created");
        Ok(conn)
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

/// Which pool: a database and the login its connections use.
type PoolKey = (String, String);

/// One pool, as a session holds it, with the session's identity (whose
/// key names the pool's database and login).
#[derive(Clone)]
pub struct PoolRef {
    pool: managed::Pool<ServerManager>,
    key: IdentityKey,
}

impl PoolRef {
    /// Whether the pool is crowded: every connection is out and many
    /// sessions wait for one, so a session that is about to wait too can
    /// let its audit record's fsync be shared
    /// ([`crate::audit::Auditor::append_ahead_patient`]).
    pub fn crowded(&self) -> bool {
        crowded(self.pool.status())
    }
}

/// One pool per (database, login), created on first use: with
/// `isolation = "shared"` the login is always the service user, with
/// `"role"` it is the mapped role's own login.
pub struct Pools {
    backend: Arc<BackendConfig>,
    tls: Option<BackendTls>,
    config: PoolConfig,
    pools: Mutex<HashMap<PoolKey, managed::Pool<ServerManager>>>,
    caps: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Sessions waiting for a connection, by identity.
    affinity: affinity::Affinity<IdentityKey, PooledConn>,
    /// The sessions' identity keys.
    keys: Mutex<Interned>,
}

impl Pools {
    pub fn new(backend: BackendConfig, config: PoolConfig, tls: Option<BackendTls>) -> Pools {
        Pools {
            backend: Arc::new(backend),
            tls,
            config,
            pools: Mutex::new(HashMap::new()),
            caps: Mutex::new(HashMap::new()),
            affinity: affinity::Affinity::default(),
            keys: Default::default(),
        }
    }

    /// The login that runs transactions for `role`.
    pub fn login_for(&self, role: &str) -> Result<String, AcquireError> {
        match self.config.isolation {
            Isolation::Shared => Ok(self.backend.service_user.clone()),
            Isolation::Role => logins::role_login(&self.config.role_login, role)
                .map_err(|e| AcquireError::NoLogin(e.to_string())),
        }
    }

    fn cap(&self, database: &str) -> Option<Arc<Semaphore>> {
        if self.config.max_db_connections == 0 {
            return None;
        }
        let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        let cap = caps
            .entry(database.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.max_db_connections)));
        Some(cap.clone())
    }

    fn pool(&self, database: &str, login: &str) -> managed::Pool<ServerManager> {
        let key = (database.to_string(), login.to_string());
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(&key) {
            return pool.clone();
        }
        let password = match self.config.isolation {
            Isolation::Shared => self.backend.service_password.clone(),
            Isolation::Role => self
                .backend
                .service_password
                .as_deref()
                .map(|secret| logins::derived_password(secret, login)),
        };
        let manager = ServerManager {
            backend: self.backend.clone(),
            tls: self.tls.clone(),
            database: database.to_string(),
            user: login.to_string(),
            password,
            cap: self.cap(database),
            cap_wait: CAP_RETRY.min(Duration::from_millis(self.config.acquire_timeout_ms)),
        };
        let pool = managed::Pool::builder(manager)
            .max_size(self.config.size)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("a pool with a runtime always builds");
        pools.insert(key, pool.clone());
        pool
    }

    /// The pool that serves `role` in `database`, for a session of
    /// `client_user` (a session resolves it once and keeps it).
    pub fn pool_for(
        &self,
        database: &str,
        role: &Arc<str>,
        client_user: &Arc<str>,
    ) -> Result<PoolRef, AcquireError> {
        let login = self.login_for(role)?;
        let pool = self.pool(database, &login);
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let key = keys.key(KeyParts {
            pool: (database.to_string(), login),
            role: role.clone(),
            client_user: client_user.clone(),
        });
        drop(keys);
        Ok(PoolRef { pool, key })
    }

    /// Checks out a connection of `pool` for a session of identity `who`,
    /// waiting at most `acquire_timeout_ms` for one to become free: from
    /// the pool's queue, or handed over by a session of the same identity
    /// that releases one ([`Pools::release`]), whichever comes first.
    ///
    /// While the pool can still grow or has a connection idle, the session
    /// takes the pool's queue alone: a checkout may be opening a new server
    /// connection, and a handoff winning the race would cancel that login
    /// halfway (under load the pool then never grew past one or two
    /// connections).
    pub async fn acquire(&self, pool: &PoolRef) -> Result<PooledConn, AcquireError> {
        let status = pool.pool.status();
        if status.size < status.max_size || status.available > 0 {
            return self.checkout(pool).await;
        }
        let mut ticket = self.affinity.wait(&pool.key);
        let got = tokio::select! {
            Ok(conn) = &mut ticket.handed => Ok(conn),
            got = self.checkout(pool) => got,
        };
        // Either way it waits no more; a connection handed over meanwhile
        // goes back to the pool. (A session dropped while it waits leaves
        // without this; the next offer forgets it.)
        drop(self.affinity.leave(ticket));
        got
    }

    /// A session of identity `who` is done with `conn`, idle and fit for
    /// reuse: it goes to a session waiting for the same identity, if one
    /// waits (and it has not passed between sessions too often, and no
    /// session of another identity has waited longer and too long), otherwise
    /// back to the pool. Returns whether it was handed over.
    pub fn release(&self, pool: &PoolRef, mut conn: PooledConn) -> bool {
        let key = &pool.key;
        // Handed over, it would skip the pool's check on its next checkout
        // (anything unread, such as a late notification, or a broken
        // socket): the same check, only when someone waits for it; the
        // pool's recycling gets one that fails it.
        if !self.affinity.waits(key) || !conn.is_healthy() {
            conn.handoffs = 0;
            drop(conn);
            return false;
        }
        let handoffs = conn.handoffs;
        conn.handoffs += 1;
        match self.affinity.offer(key, conn, handoffs) {
            Ok(()) => true,
            Err(mut conn) => {
                conn.handoffs = 0;
                drop(conn);
                false
            }
        }
    }

    /// A connection from `pool`'s queue.
    ///
    /// At the database's cap, a new connection waits for a permit only
    /// [`CAP_RETRY`] at a time: between tries another pool's connection may
    /// have gone idle, which [`Self::make_room`] closes (an idle connection
    /// never gives its permit back by itself).
    async fn checkout(&self, pool: &PoolRef) -> Result<PooledConn, AcquireError> {
        let capped = self.config.max_db_connections > 0;
        let budget = Duration::from_millis(self.config.acquire_timeout_ms);
        let started = std::time::Instant::now();
        loop {
            if capped && pool.pool.status().available == 0 {
                let (database, login) = pool.key.pool();
                self.make_room(database, login);
            }
            let cap_wait = if capped { CAP_RETRY } else { Duration::ZERO };
            let timeouts = Timeouts {
                wait: Some(budget.saturating_sub(started.elapsed())),
                create: Some(
                    Duration::from_millis(self.backend.connect_timeout_ms.saturating_mul(2))
                        + cap_wait,
                ),
                recycle: Some(Duration::from_secs(1)),
            };
            match pool.pool.timeout_get(&timeouts).await {
                Err(PoolError::Backend(BackendError::Capped)) if started.elapsed() < budget => {}
                got => return got.map_err(|e| acquire_error(e, &self.config)),
            }
        }
    }

    /// The database is at `max_db_connections` and this pool has nothing
    /// idle: closes one idle connection of another pool of the database,
    /// the one unused the longest, so this pool can open one.
    fn make_room(&self, database: &str, login: &str) {
        let Some(cap) = self.cap(database) else {
            return;
        };
        if cap.available_permits() > 0 {
            return;
        }
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut oldest: Option<(&managed::Pool<ServerManager>, Duration)> = None;
        for ((db, other), pool) in pools.iter() {
            if db != database || other == login || pool.status().available == 0 {
                continue;
            }
            let mut longest = Duration::ZERO;
            pool.retain(|_, m| {
                longest = longest.max(m.last_used());
                true
            });
            if oldest.is_none_or(|(_, d)| longest > d) {
                oldest = Some((pool, longest));
            }
        }
        if let Some((pool, longest)) = oldest {
            let mut evicted = false;
            let removed = pool.retain(|_, m| {
                let evict = !evicted && m.last_used() >= longest;
                evicted |= evict;
                !evict
            });
            tracing::debug!(
                database,
                closed = removed.removed.len(),
                "closed an idle server connection of another pool (max_db_connections)"
            );
        }
    }

    /// Closes server connections idle longer than `idle_timeout_ms`.
    pub fn close_idle(&self) {
        if self.config.idle_timeout_ms == 0 {
            return;
        }
        let idle = Duration::from_millis(self.config.idle_timeout_ms);
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        for pool in pools.values() {
            pool.retain(|_, m| m.last_used() < idle);
        }
    }

    /// How often [`Self::close_idle`] should run, if at all.
    pub fn idle_sweep_interval(&self) -> Option<Duration> {
        (self.config.idle_timeout_ms > 0)
            .then(|| Duration::from_millis((self.config.idle_timeout_ms / 2).clamp(100, 30_000)))
    }

    /// Idle and total connections per (database, login), for metrics and
    /// tests.
    pub fn status(&self) -> Vec<(PoolKey, deadpool::Status)> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.iter().map(|(k, p)| (k.clone(), p.status())).collect()
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

/// Why no server connection could be had; `session::refusal` says it
/// to the client.
#[derive(Debug)]
pub enum AcquireError {
    /// The mapped role has no valid login name (`isolation = "role"`).
    NoLogin(String),
    /// None became free within `acquire_timeout_ms`.
    Timeout { waited_ms: u64, size: usize },
    /// The database is at `max_db_connections` and none is idle.
    Capped { max: usize },
    /// PostgreSQL refused a new connection; `password_changed`: a per-role
    /// login's password is not the derived one (`pgwarden migrate` sets it).
    Refused {
        fields: crate::protocol::messages::ErrorFields,
        password_changed: bool,
    },
    /// The gateway is shutting down.
    Closed,
    /// Anything else on the way to PostgreSQL (network, TLS, timeouts).
    Unreachable(String),
}

impl AcquireError {
    /// No connection was free (the pool or the database cap is full).
    pub fn is_exhausted(&self) -> bool {
        matches!(
            self,
            AcquireError::Timeout { .. } | AcquireError::Capped { .. }
        )
    }
}

fn acquire_error(e: PoolError<BackendError>, config: &PoolConfig) -> AcquireError {
    match e {
        PoolError::Timeout(managed::TimeoutType::Wait) => AcquireError::Timeout {
            waited_ms: config.acquire_timeout_ms,
            size: config.size,
        },
        PoolError::Backend(BackendError::Server(fields)) => AcquireError::Refused {
            // A per-role login's password is derived; a session that
            // reached the login (RESET ROLE through an administrator's
            // function) can change it.
            password_changed: fields.is(sqlstate::backend::INVALID_PASSWORD)
                && config.isolation == Isolation::Role,
            fields,
        },
        PoolError::Backend(BackendError::Capped) => AcquireError::Capped {
            max: config.max_db_connections,
        },
        PoolError::Closed => AcquireError::Closed,
        other => AcquireError::Unreachable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(size: usize, available: usize, waiting: usize) -> deadpool::Status {
        deadpool::Status {
            max_size: 4,
            size,
            available,
            waiting,
        }
    }

    #[test]
    fn a_pool_is_crowded_only_when_full_and_many_wait_per_connection() {
        let many = CROWDED_WAITERS_PER_CONNECTION * 4;
        assert!(crowded(status(4, 0, many)));
        assert!(crowded(status(4, 0, 10 * many)));
        // Fewer waiters than that: a delayed fsync could idle a connection.
        assert!(!crowded(status(4, 0, many - 1)));
        // A connection is idle, or the pool can still grow: nobody queues.
        assert!(!crowded(status(4, 1, many)));
        assert!(!crowded(status(3, 0, many)));
        assert!(!crowded(deadpool::Status {
            max_size: 0,
            size: 0,
            available: 0,
            waiting: 0,
        }));
    }
}
