//! SQLSTATE codes that pgwarden itself reports, as named constants.
//!
//! Codes from the backend are relayed untouched; these are only for errors
//! the gateway raises, so every one of them appears here exactly once.

/// A five-character SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const fn code(&self) -> &'static str {
        self.0
    }
}

pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
pub const INVALID_AUTHORIZATION_SPECIFICATION: SqlState = SqlState("28000");
pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");
pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = SqlState("25P03");
pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState("57P05");
pub const QUERY_CANCELED: SqlState = SqlState("57014");
pub const INVALID_SQL_STATEMENT_NAME: SqlState = SqlState("26000");
pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");
pub const IO_ERROR: SqlState = SqlState("58030");
