//! Which of the configured PostgreSQL hosts is the primary now (`[backend]
//! hosts`): the live state every connection pgwarden opens asks for its
//! address. The pool's health check (`pool::failover`) keeps it.
//!
//! Invariants:
//! - with one host configured the way it always was (`host`, `port`), the
//!   address is that host's, and nothing waits;
//! - with `hosts`, a connection is opened only to the host the last check
//!   found to be the one primary; with none (a failover, or two hosts that
//!   both say they are primary), it waits up to `failover_timeout_ms`, then
//!   fails naming the hosts tried;
//! - each change of primary (or loss of it) starts a new generation: a
//!   pooled connection of an older one is never handed out again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

/// One PostgreSQL host, as `[backend] hosts` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Host {
    /// `host:port` (port 5432 when left out; `[v6]:port` for IPv6).
    pub fn parse(text: &str) -> Result<Host, String> {
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("[backend] hosts: {text:?} has no valid port"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (text, 5432),
        };
        if host.is_empty() {
            return Err(format!("[backend] hosts: {text:?} names no host"));
        }
        Ok(Host {
            host: host.to_string(),
            port,
        })
    }
}

/// What the health check last found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// The index in `hosts` of the one primary, if there is one.
    pub current: Option<usize>,
    /// Changes each time `current` does.
    pub generation: u64,
    /// Changes of primary from one host to another.
    pub failovers: u64,
    /// More than one host says it is primary: none is used.
    pub split: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Empty until the health check runs (single-host configurations).
    hosts: std::sync::OnceLock<Vec<Host>>,
    state: watch::Sender<State>,
    /// Asks the health check to look now (a connection to the primary failed).
    recheck: Notify,
    timeout: std::sync::OnceLock<Duration>,
}

/// The shared handle (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Primary(Arc<Inner>);

impl Primary {
    /// From now on connections go to whichever of `hosts` the health check
    /// finds primary, waiting up to `timeout` for one.
    pub fn follow(&self, hosts: Vec<Host>, timeout: Duration) {
        let _ = self.0.hosts.set(hosts);
        let _ = self.0.timeout.set(timeout);
    }

    /// The hosts followed (empty for a single configured host).
    pub fn hosts(&self) -> &[Host] {
        self.0.hosts.get().map(Vec::as_slice).unwrap_or_default()
    }

    pub fn state(&self) -> State {
        self.0.state.borrow().clone()
    }

    /// The current generation (see the module invariants).
    pub fn generation(&self) -> u64 {
        self.0.state.borrow().generation
    }

    /// The health check's verdict.
    pub fn set(&self, state: State) {
        self.0.state.send_replace(state);
    }

    /// Asks the health check to look now.
    pub fn recheck(&self) {
        self.0.recheck.notify_one();
    }

    /// Waits for [`Self::recheck`] or `interval`.
    pub async fn until_recheck(&self, interval: Duration) {
        let _ = tokio::time::timeout(interval, self.0.recheck.notified()).await;
    }

    /// The primary to connect to, and its generation: `configured` when no
    /// hosts are followed; else waits for one, up to the failover timeout.
    pub async fn target(&self, configured: &Host) -> Result<(Host, u64), String> {
        let hosts = self.hosts();
        if hosts.is_empty() {
            return Ok((configured.clone(), 0));
        }
        let timeout = self.0.timeout.get().copied().unwrap_or_default();
        let started = Instant::now();
        let mut changes = self.0.state.subscribe();
        loop {
            let state = changes.borrow_and_update().clone();
            if let Some(host) = state.current.and_then(|i| hosts.get(i)) {
                return Ok((host.clone(), state.generation));
            }
            let left = timeout.saturating_sub(started.elapsed());
            let changed = tokio::time::timeout(left, changes.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                let names: Vec<String> = hosts.iter().map(Host::to_string).collect();
                let why = match state.split {
                    true => "more than one says it is primary (split brain: pgwarden uses none)",
                    false => "none is a reachable primary",
                };
                return Err(format!(
                    "no PostgreSQL primary within {} ms among {}: {why}",
                    timeout.as_millis(),
                    names.join(", ")
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_with_and_without_ports() {
        assert_eq!(
            Host::parse("db1:5433").unwrap(),
            Host {
                host: "db1".into(),
                port: 5433
            }
        );
        assert_eq!(
            Host::parse("db2").unwrap(),
            Host {
                host: "db2".into(),
                port: 5432
            }
        );
        assert_eq!(
            Host::parse("[::1]:6000").unwrap(),
            Host {
                host: "::1".into(),
                port: 6000
            }
        );
        assert!(Host::parse("db:x").is_err());
        assert!(Host::parse(":5432").is_err());
    }

    #[tokio::test]
    async fn a_connection_waits_for_a_primary_and_then_gives_up_naming_the_hosts() {
        let primary = Primary::default();
        let configured = Host {
            host: "solo".into(),
            port: 1,
        };
        assert_eq!(primary.target(&configured).await.unwrap().0, configured);
        let hosts = vec![Host::parse("a:1").unwrap(), Host::parse("b:2").unwrap()];
        primary.follow(hosts, Duration::from_millis(200));
        let err = primary.target(&configured).await.unwrap_err();
        assert!(err.contains("a:1, b:2") && err.contains("200 ms"), "{err}");
        let waiting = {
            let primary = primary.clone();
            let configured = configured.clone();
            tokio::spawn(async move { primary.target(&configured).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        primary.set(State {
            current: Some(1),
            generation: 7,
            ..State::default()
        });
        let (host, generation) = waiting.await.unwrap().unwrap();
        assert_eq!((host.to_string(), generation), ("b:2".to_string(), 7));
    }
}
