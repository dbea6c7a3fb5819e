//! The gateway process: building the shared state from a `Config`, the
//! accept loop, and graceful shutdown.
//!
//! Invariant: on shutdown no new client is accepted, idle clients get FATAL
//! 57P01 at once, clients inside a transaction finish it first (up to
//! `shutdown_timeout_ms`), and the audit log is closed with its chain head
//! only after every session has ended.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::audit::Auditor;
use crate::config::{Config, IdentityConfig};
use crate::identity::guard::{DynamicSql, Guard};
use crate::identity::policy::Policy;
use crate::pool::Pools;
use crate::session::cancel::CancelRegistry;
use crate::session::{self, Shared};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("policies: {0}")]
    Policy(#[from] crate::identity::policy::PolicyError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("audit store: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Starts shipping the audit log when `[audit.ship]` is set (the store's
/// instance id is made then, if not configured).
fn start_shipping(
    config: &Config,
    auditor: &Auditor,
) -> Result<Option<Arc<crate::audit::ship::ShipStatus>>, StartError> {
    let Some(ship) = &config.audit.ship else {
        return Ok(None);
    };
    let Some(source) = auditor.ship_source() else {
        tracing::warn!("[audit.ship] is set but the audit log is off: nothing is shipped");
        return Ok(None);
    };
    let db = source
        .db
        .get()
        .ok_or_else(|| crate::audit::AuditError::Read("the audit store is not open".into()))?;
    let instance = crate::audit::ship::instance_id(&db, config.audit.instance.as_deref())?;
    tracing::info!(address = %ship.address, %instance, "shipping the audit log");
    Ok(Some(crate::audit::ship::spawn(
        source,
        ship.clone(),
        instance,
    )))
}

/// Which gateway writes an audit store, for its `gateway_start`: the host's
/// name, the listen address and the backend.
fn origin(config: &Config) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "instance {host} listening on {}, backend {}:{}",
        config.server.listen, config.backend.host, config.backend.port
    )
}

/// A gateway ready to serve.
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Loads policies, TLS material and the audit store named by `config`.
    pub fn build(config: Config) -> Result<Gateway, StartError> {
        let auditor = if config.audit.enabled {
            Auditor::open_at(&config.audit, &origin(&config))?
        } else {
            Auditor::disabled()
        };
        Gateway::build_with_auditor(config, auditor)
    }

    /// As [`Gateway::build`], with an audit log opened by the caller (tests
    /// use a store that can be made to fail).
    pub fn build_with_auditor(config: Config, auditor: Auditor) -> Result<Gateway, StartError> {
        let policy = Policy::load_dir(&config.identity.policy_dir)?;
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => {
                Some(crate::tls::acceptor(cert, key).map_err(StartError::Tls)?)
            }
            _ => None,
        };
        let backend_tls = crate::tls::backend_connector(
            config.backend.tls,
            config.backend.tls_ca_file.as_deref(),
        )
        .map_err(StartError::Tls)?;
        let ship = start_shipping(&config, &auditor)?;
        let shared = Shared {
            pools: Pools::new(
                config.backend.clone(),
                config.pool.clone(),
                backend_tls.clone(),
            ),
            tags: crate::identity::tag::TagKeys::new(
                &config.identity,
                Arc::new(config.backend.clone()),
                backend_tls.clone(),
            ),
            backend_tls,
            guard: guard_for(&config.identity),
            policy: RwLock::new(Arc::new(policy)),
            auditor,
            cancels: CancelRegistry::default(),
            tls,
            metrics: Default::default(),
            live: RwLock::new(Arc::new(crate::session::Live::from_config(&config))),
            auth_slots: Arc::new(tokio::sync::Semaphore::new(
                config.backend.max_auth_connections,
            )),
            client_slots: Arc::new(tokio::sync::Semaphore::new(
                config.server.max_client_connections,
            )),
            ship,
            config: Arc::new(config),
        };
        Ok(Gateway {
            shared: Arc::new(shared),
        })
    }

    /// Binds the configured listen address.
    pub async fn listen(&self) -> Result<TcpListener, StartError> {
        let addr = self.shared.config.server.listen;
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })
    }

    /// Shared state, for tests and the admin side.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves clients from `listener` until `shutdown` completes, then
    /// drains sessions and closes the audit log.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let admin = match self.shared.config.admin.listen {
            Some(addr) => match TcpListener::bind(addr).await {
                Ok(l) => {
                    let shared = self.shared.clone();
                    let scrape = Arc::new(move || {
                        crate::metrics::render(&shared.metrics, &shared.metrics_snapshot())
                    });
                    Some(tokio::spawn(crate::metrics::serve(l, scrape)))
                }
                Err(e) => {
                    tracing::error!("cannot listen for metrics on {addr}: {e}");
                    None
                }
            },
            None => None,
        };
        let sweeper = self.shared.pools.idle_sweep_interval().map(|every| {
            let shared = Arc::downgrade(&self.shared);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(shared) = shared.upgrade() else {
                        break;
                    };
                    shared.pools.close_idle();
                }
            })
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let shared = self.shared.clone();
                        sessions.spawn(session::serve(shared, tcp, peer, stop_rx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        drop(listener);
        tracing::info!(sessions = sessions.len(), "shutting down");
        let _ = stop_tx.send(true);
        let deadline = Duration::from_millis(self.shared.config.server.shutdown_timeout_ms);
        let drained = tokio::time::timeout(deadline, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                remaining = sessions.len(),
                "shutdown deadline passed; closing remaining sessions"
            );
            sessions.shutdown().await;
        }
        for task in [admin, sweeper].into_iter().flatten() {
            task.abort();
        }
        self.shared.pools.close();
        match self.shared.auditor.shutdown().await {
            Ok(head) if !head.is_empty() => tracing::info!(chain_head = %head, "audit log closed"),
            Ok(_) => {}
            Err(e) => tracing::error!("closing the audit log failed: {e}"),
        }
    }
}

/// The statement guard for `[identity]`: dynamic SQL in bodies is refused
/// unless `allow_dynamic_sql` is set.
fn guard_for(identity: &IdentityConfig) -> Guard {
    let dynamic_sql = if identity.allow_dynamic_sql {
        DynamicSql::Heuristic
    } else {
        DynamicSql::Refuse
    };
    Guard::new(&identity.client_user_setting).with_dynamic_sql(dynamic_sql)
}
