//! The health check of `[backend] hosts`: which host is the one primary
//! (`SELECT pg_is_in_recovery()` is false, as libpq's
//! `target_session_attrs=read-write` decides), kept in
//! `config::primary::Primary` for every connection pgwarden opens.
//!
//! Every host is checked each `health_check_interval_ms` (at once when a
//! connection to the primary fails, and every 50 ms while there is none)
//! over a connection of the service user's kept open for it. Two hosts
//! that both say they are primary are a split brain: neither is used
//! until only one says so, and the log says so loudly. A move of the
//! primary to another host is a `backend_failover` record.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::audit::{Event, Kind};
use crate::auth::service::{self, ServiceLogin};
use crate::backend::conn::ServerConn;
use crate::config::primary::{Host, State};
use crate::session::Shared;

/// How often hosts are checked while no primary is in use.
const SEARCHING: Duration = Duration::from_millis(50);

/// Starts the health check when `[backend] hosts` is set; it ends with the
/// gateway.
pub fn start(shared: &Arc<Shared>) -> Option<tokio::task::JoinHandle<()>> {
    let hosts = shared.config.backend.primary.hosts().to_vec();
    if hosts.is_empty() {
        return None;
    }
    let shared = Arc::downgrade(shared);
    Some(tokio::spawn(watch(shared, hosts)))
}

async fn watch(shared: Weak<Shared>, hosts: Vec<Host>) {
    let mut checks: Vec<Option<ServerConn>> = hosts.iter().map(|_| None).collect();
    let mut state = State::default();
    // The primary last in use, and since when there has been none.
    let mut last: Option<usize> = None;
    let mut lost_at = Instant::now();
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let backend = &shared.config.backend;
        let mut primaries = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            if check(&shared, host, &mut checks[i]).await == Some(true) {
                primaries.push(i);
            }
        }
        let split = primaries.len() > 1;
        let next = match primaries.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        if split && !state.split {
            let names: Vec<String> = primaries.iter().map(|i| hosts[*i].to_string()).collect();
            tracing::error!(
                "split brain: {} all say they are the primary; pgwarden uses none of them until only one does",
                names.join(" and ")
            );
        }
        if next != state.current || split != state.split {
            if next != state.current {
                state.generation += 1;
            }
            match next {
                None if state.current.is_some() => {
                    lost_at = Instant::now();
                    tracing::warn!(
                        "the primary {} is gone; new transactions wait for one",
                        hosts[state.current.unwrap_or_default()]
                    );
                }
                None => {}
                Some(new) => {
                    let without = lost_at.elapsed();
                    tracing::info!("the primary is {}", hosts[new]);
                    if let Some(old) = last.filter(|old| *old != new) {
                        state.failovers += 1;
                        record(&shared, &hosts[old], &hosts[new], without).await;
                    }
                    last = Some(new);
                }
            }
            state.current = next;
            state.split = split;
            backend.primary.set(state.clone());
        }
        let interval = match state.current {
            Some(_) => Duration::from_millis(backend.health_check_interval_ms),
            None => SEARCHING.min(Duration::from_millis(backend.health_check_interval_ms)),
        };
        let primary = backend.primary.clone();
        drop(shared);
        primary.until_recheck(interval).await;
    }
}

/// Whether `host` says it is the primary (`None`: it did not answer),
/// over `conn`, opened (or reopened) as needed.
async fn check(shared: &Shared, host: &Host, conn: &mut Option<ServerConn>) -> Option<bool> {
    let backend = &shared.config.backend;
    let timeout = Duration::from_millis(backend.connect_timeout_ms);
    if conn.is_none() {
        let who = ServiceLogin {
            user: &backend.service_user,
            password: backend.service_password.as_deref(),
            database: &backend.health_check_database,
        };
        let opened = async {
            let mut c = ServerConn::connect_to(backend, shared.backend_tls.as_ref(), host).await?;
            service::login(&mut c, &who).await?;
            Ok::<_, crate::backend::conn::BackendError>(c)
        };
        match tokio::time::timeout(timeout, opened).await {
            Ok(Ok(c)) => *conn = Some(c),
            Ok(Err(e)) => {
                tracing::debug!("health check of {host}: {e}");
                return None;
            }
            Err(_) => {
                tracing::debug!("health check of {host}: no answer in time");
                return None;
            }
        }
    }
    let c = conn.as_mut()?;
    let asked = tokio::time::timeout(
        timeout,
        c.simple_rows("SELECT pg_catalog.pg_is_in_recovery()"),
    )
    .await;
    match asked {
        Ok(Ok(rows)) => rows
            .first()
            .and_then(|r| r.first())
            .cloned()
            .flatten()
            .map(|v| v == "f"),
        _ => {
            *conn = None;
            None
        }
    }
}

/// The `backend_failover` record: the old primary, the new one, and how
/// long there was none.
async fn record(shared: &Shared, old: &Host, new: &Host, without: Duration) {
    if !shared.auditor.enabled() {
        return;
    }
    let mut ev = Event::new(Kind::BackendFailover);
    ev.message = Some(format!(
        "primary moved from {old} to {new}; {} ms without a primary",
        without.as_millis()
    ));
    shared.auditor.append_nowait(ev).await;
}
