//! The health check of `[backend] hosts`: which host is the one primary
//! (`SELECT pg_is_in_recovery()` is false, as libpq's
//! `target_session_attrs=read-write` decides), kept in
//! `config::primary::Primary` for every connection pgwarden opens.
//!
//! Every host is checked, all at once, each `health_check_interval_ms`
//! (at once when a connection to the primary fails, and every 50 ms while
//! there is none) over a connection of the service user's kept open for
//! it. Two hosts that both say they are primary are a split brain: neither
//! is used until only one says so, and the log says so loudly. A host
//! primary on an older timeline than one seen since (a former primary back
//! without following the promotion) is never used either. A move of the
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
    // The newest timeline any primary was seen on, and the hosts found
    // primary on an older one (logged once each time they turn up).
    let mut newest = 0u32;
    let mut stale = vec![false; hosts.len()];
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let backend = &shared.config.backend;
        // All hosts at once: one that does not answer delays no other.
        let probes = futures_util::future::join_all(
            hosts
                .iter()
                .zip(checks.iter_mut())
                .map(|(host, conn)| check(&shared, host, conn)),
        )
        .await;
        let primaries = fresh_primaries(&probes, &mut newest, &mut stale, &hosts);
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

/// What one host said of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Standby,
    /// A primary, writing on this timeline.
    Primary(u32),
}

/// The hosts that say they are primary on the newest timeline seen (the
/// indexes of `probes`); `newest` is raised to the newest one here. A host
/// primary on an older timeline is a former primary back without having
/// followed the promotion (its writes since then are not on the new
/// primary's timeline): it is never used, and the log says so.
fn fresh_primaries(
    probes: &[Option<Probe>],
    newest: &mut u32,
    stale: &mut [bool],
    hosts: &[Host],
) -> Vec<usize> {
    for probe in probes {
        if let Some(Probe::Primary(timeline)) = probe {
            *newest = (*newest).max(*timeline);
        }
    }
    let mut fresh = Vec::new();
    for (i, probe) in probes.iter().enumerate() {
        let Some(Probe::Primary(timeline)) = *probe else {
            stale[i] = false;
            continue;
        };
        if timeline == *newest {
            fresh.push(i);
            stale[i] = false;
        } else if !std::mem::replace(&mut stale[i], true) {
            tracing::error!(
                "{} says it is a primary on timeline {timeline}, older than timeline {} of a primary seen since: a former primary back without following the promotion; pgwarden never uses it",
                hosts[i],
                *newest
            );
        }
    }
    fresh
}

/// What `host` says of itself (`None`: it did not answer), over `conn`,
/// opened (or reopened) as needed.
async fn check(shared: &Shared, host: &Host, conn: &mut Option<ServerConn>) -> Option<Probe> {
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
    // A primary's timeline is the one it writes WAL on: the first eight
    // hex digits of its current WAL file's name.
    let asked = tokio::time::timeout(timeout, c.simple_rows(PROBE_SQL)).await;
    let row = match asked {
        Ok(Ok(rows)) => rows.into_iter().next(),
        _ => None,
    };
    let probe = match row.as_deref() {
        Some([Some(recovery), _]) if recovery == "t" => Some(Probe::Standby),
        Some([Some(recovery), Some(wal)]) if recovery == "f" => wal
            .get(..8)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .map(Probe::Primary),
        _ => None,
    };
    if probe.is_none() {
        *conn = None;
    }
    probe
}

const PROBE_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery(), \
    CASE WHEN NOT pg_catalog.pg_is_in_recovery() \
    THEN pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()) END";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_on_an_older_timeline_is_never_used() {
        let hosts = vec![Host::parse("a:1").unwrap(), Host::parse("b:2").unwrap()];
        let (mut newest, mut stale) = (0, vec![false; 2]);
        let mut fresh =
            |probes: &[Option<Probe>]| fresh_primaries(probes, &mut newest, &mut stale, &hosts);
        assert_eq!(fresh(&[Some(Probe::Primary(1)), Some(Probe::Standby)]), [0]);
        // Promoted: the old primary back on timeline 1 is stale.
        assert_eq!(
            fresh(&[Some(Probe::Primary(1)), Some(Probe::Primary(2))]),
            [1]
        );
        // Alone, it is still never used.
        assert!(fresh(&[Some(Probe::Primary(1)), None]).is_empty());
        // Two on the same timeline are a split brain, for the caller.
        assert_eq!(
            fresh(&[Some(Probe::Primary(2)), Some(Probe::Primary(2))]),
            [0, 1]
        );
        assert_eq!(fresh(&[Some(Probe::Standby), Some(Probe::Primary(3))]), [1]);
    }
}
