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
    #[error("{0}")]
    SigningKey(String),
    #[error("audit store: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What takes the audit log off the box: the shipper (`[audit.ship]`), the
/// anchoring of checkpoints (`[audit] checkpoint_database`) and retention
/// (`[audit] archive_dir`), started when configured. The store's instance
/// id is made then, if not configured.
type OffBox = (
    Option<Arc<crate::audit::ship::ShipStatus>>,
    Option<crate::audit::anchor::Target>,
);

fn start_off_box(
    config: &Config,
    auditor: &Auditor,
    backend_tls: &Option<crate::tls::BackendTls>,
) -> Result<OffBox, StartError> {
    let audit = &config.audit;
    let off_box =
        audit.ship.is_some() || audit.checkpoint_database.is_some() || audit.archive_dir.is_some();
    let Some(source) = auditor.ship_source() else {
        if off_box {
            tracing::warn!(
                "[audit.ship], checkpoint_database or archive_dir is set but the audit log is off"
            );
        }
        return Ok((None, None));
    };
    // Every store names its gateway (export and verify of several stores
    // tell them apart by it), whether or not its records leave the box.
    let db = source
        .db
        .get()
        .ok_or_else(|| crate::audit::AuditError::Read("the audit store is not open".into()))?;
    let instance = crate::audit::ship::instance_id(&db, config.audit.instance.as_deref())?;
    drop(db);
    if !off_box {
        return Ok((None, None));
    }
    let target =
        config
            .audit
            .checkpoint_database
            .as_ref()
            .map(|database| crate::audit::anchor::Target {
                backend: Arc::new(config.backend.clone()),
                tls: backend_tls.clone(),
                database: database.clone(),
                instance: instance.clone(),
            });
    if let Some(target) = &target {
        tracing::info!(database = %target.database, %instance, "anchoring audit checkpoints");
        let interval = Duration::from_secs(config.audit.checkpoint_interval_s);
        crate::audit::anchor::spawn(source.clone(), target.clone(), interval);
    }
    if let Some(dir) = &audit.archive_dir {
        tracing::info!(dir = %dir.display(), after_days = audit.archive_after_days, "archiving old audit records");
        let retention = crate::audit::retention::Retention {
            dir: dir.clone(),
            after: Duration::from_secs_f64(audit.archive_after_days * 86_400.0),
            interval: Duration::from_secs(audit.archive_interval_s),
            instance: Some(instance.clone()),
            shipping: audit.ship.is_some(),
        };
        crate::audit::retention::spawn(source.clone(), retention);
    }
    let ship = match &config.audit.ship {
        Some(ship) => {
            let tls = crate::audit::ship::tls_for(ship).map_err(StartError::Tls)?;
            tracing::info!(address = %ship.address, tls = tls.is_some(), %instance, "shipping the audit log");
            let signer = match &audit.signing_key {
                Some(path) => {
                    let signer = crate::audit::checkpoint::Signer::load(path)
                        .map_err(StartError::SigningKey)?;
                    tracing::info!(public_key = %signer.public_hex(), "shipped audit checkpoints are signed");
                    Some(Arc::new(signer))
                }
                None => None,
            };
            let checkpoints = crate::audit::ship::Checkpoints {
                every: Duration::from_secs(audit.checkpoint_interval_s.max(1)),
                signer,
            };
            Some(crate::audit::ship::spawn(
                source,
                ship.clone(),
                tls,
                instance,
                checkpoints,
            ))
        }
        None => None,
    };
    Ok((ship, target))
}

/// After the audit log closed: anchors its last record (the
/// `gateway_stop`), read back from the released store.
async fn anchor_at_stop(target: &crate::audit::anchor::Target, store: &std::path::Path) {
    let last = crate::audit::StoreReader::open(store).and_then(|reader| {
        let seq = reader.last_seq()?;
        seq.map(|seq| reader.get(seq))
            .transpose()
            .map(Option::flatten)
    });
    let anchored = match last {
        Ok(Some(record)) => target.anchor(&record).await,
        Ok(None) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = anchored {
        tracing::warn!(error = %e, "the last audit checkpoint could not be anchored");
    }
}

/// Which gateway writes an audit store, for its `gateway_start`: the host's
/// name, the listen address and the backend.
fn origin(config: &Config) -> String {
    let host = crate::audit::ship::host_name().unwrap_or_else(|| "unknown".into());
    format!(
        "instance {host} listening on {}, backend {}",
        config.server.listen,
        config.backend.address()
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
        let mut peer_tls = std::collections::HashMap::new();
        for peer in config.peers.iter().filter(|p| p.tls) {
            let ca = peer
                .ca_file
                .as_deref()
                .expect("validated: tls needs ca_file");
            let tls = crate::tls::ClientTls::new(&peer.address, ca, None)
                .map_err(|e| StartError::Tls(format!("[[peers]] id {}: {e}", peer.id)))?;
            peer_tls.insert(peer.id, tls);
        }
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
        if let Ok(hosts) = config.backend.candidates() {
            if !hosts.is_empty() {
                let timeout = std::time::Duration::from_millis(config.backend.failover_timeout_ms);
                config.backend.primary.follow(hosts, timeout);
            }
        }
        let (ship, anchor) = start_off_box(&config, &auditor, &backend_tls)?;
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
            cancels: CancelRegistry::new(config.server.peer_id),
            tls,
            metrics: Default::default(),
            live: RwLock::new(Arc::new(crate::session::Live::from_config(&config))),
            auth_slots: Arc::new(tokio::sync::Semaphore::new(
                config.backend.max_auth_connections,
            )),
            client_slots: Arc::new(tokio::sync::Semaphore::new(
                config.server.max_client_connections,
            )),
            conn_counts: Default::default(),
            message_budget: crate::session::budget::MessageBudget::new(
                config.server.large_message_memory,
                config.server.max_message_size,
            ),
            ship,
            anchor,
            draining: Default::default(),
            peer_tls,
            config_path: Default::default(),
            peer_forwards: Arc::new(tokio::sync::Semaphore::new(crate::session::PEER_FORWARDS)),
            paused: tokio::sync::watch::channel(false).0,
            shutdown: Default::default(),
            config: Arc::new(config),
        };
        let _ = shared.metrics.started.set(std::time::Instant::now());
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
                    let handler: crate::metrics::Handler = Arc::new(move |path| {
                        let shared = shared.clone();
                        Box::pin(async move { admin_answer(&shared, &path).await })
                    });
                    Some(tokio::spawn(crate::metrics::serve(l, handler)))
                }
                Err(e) => {
                    tracing::error!("cannot listen for metrics on {addr}: {e}");
                    None
                }
            },
            None => None,
        };
        let health = crate::failover::start(&self.shared);
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
                _ = self.shared.shutdown.fired() => break,
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
        // Load balancers see /readyz fail from now on.
        self.shared
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
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
        for task in [admin, sweeper, health].into_iter().flatten() {
            task.abort();
        }
        self.shared.pools.close();
        match self.shared.auditor.shutdown().await {
            Ok(head) if !head.is_empty() => tracing::info!(chain_head = %head, "audit log closed"),
            Ok(_) => {}
            Err(e) => tracing::error!("closing the audit log failed: {e}"),
        }
        if let Some(target) = &self.shared.anchor {
            anchor_at_stop(target, &self.shared.config.audit.store).await;
        }
    }
}

/// The admin listener's answer for `path`: `/healthz` (the process
/// answers), `/readyz` (it accepts clients: not draining, PostgreSQL
/// reachable, the audit store writable where statements need it), anything
/// else the metrics.
async fn admin_answer(shared: &Shared, path: &str) -> crate::metrics::Answer {
    match path {
        "/healthz" => (200, "ok\n".into()),
        "/readyz" => match not_ready(shared).await {
            None => (200, "ready\n".into()),
            Some(why) => (503, format!("not ready: {why}\n")),
        },
        _ => (
            200,
            crate::metrics::render(&shared.metrics, &shared.metrics_snapshot()),
        ),
    }
}

/// Why the gateway should get no new clients now, if it should not.
async fn not_ready(shared: &Shared) -> Option<String> {
    if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Some("draining (shutting down)".into());
    }
    if shared.auditor.refusing() {
        return Some("the audit store cannot be written (on_failure = \"deny\")".into());
    }
    let Some(backend) = shared.config.backend.primary_address() else {
        return Some(format!(
            "no PostgreSQL primary among {}",
            shared.config.backend.address()
        ));
    };
    let timeout = Duration::from_millis(shared.config.backend.connect_timeout_ms.min(2_000));
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&backend)).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("PostgreSQL at {backend} is unreachable: {e}")),
        Err(_) => Some(format!("PostgreSQL at {backend} does not answer")),
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
