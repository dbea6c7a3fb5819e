//! TEMPORARY stand-in for the audit module (being written separately):
//! same API, records nothing.
use crate::config::{AuditConfig, OnFailure};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SessionStart,
    AuthFailed,
    Denied,
    Query,
    Result,
    GuardBlocked,
    IdentityViolation,
    Cancel,
    SessionEnd,
    GatewayStart,
    GatewayStop,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Error,
    Unknown,
}
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    pub session_id: Option<String>,
    pub client_user: Option<String>,
    pub role: Option<String>,
    pub database: Option<String>,
    pub client_addr: Option<String>,
    pub application_name: Option<String>,
    pub statement: Option<String>,
    pub params: Option<Vec<Option<String>>>,
    pub status: Option<Status>,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
    pub command_tag: Option<String>,
    pub rows: Option<u64>,
    pub duration_us: Option<u64>,
    pub backend_pid: Option<i32>,
    pub ref_seq: Option<u64>,
}
impl Event {
    pub fn new(kind: Kind) -> Event {
        Event {
            kind,
            session_id: None,
            client_user: None,
            role: None,
            database: None,
            client_addr: None,
            application_name: None,
            statement: None,
            params: None,
            status: None,
            sqlstate: None,
            message: None,
            command_tag: None,
            rows: None,
            duration_us: None,
            backend_pid: None,
            ref_seq: None,
        }
    }
}
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(String),
}
#[derive(Clone)]
pub struct Auditor {
    on_failure: OnFailure,
}
impl Auditor {
    pub fn open(cfg: &AuditConfig) -> Result<Auditor, AuditError> {
        Ok(Auditor {
            on_failure: cfg.on_failure,
        })
    }
    pub fn disabled() -> Auditor {
        Auditor {
            on_failure: OnFailure::Allow,
        }
    }
    pub fn enabled(&self) -> bool {
        false
    }
    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }
    pub async fn append(&self, _ev: Event) -> Result<u64, AuditError> {
        Ok(0)
    }
    pub async fn append_nowait(&self, _ev: Event) {}
    pub async fn shutdown(&self) -> Result<String, AuditError> {
        Ok(String::new())
    }
    pub fn queue_depth(&self) -> usize {
        0
    }
}
