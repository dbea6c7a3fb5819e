//! SQLSTATE codes as named constants: those pgwarden itself reports, and
//! (in [`backend`]) those of PostgreSQL's errors the gateway acts on.
//!
//! Codes from the backend are relayed untouched; the gateway compares them
//! only with [`backend`]'s constants (`ErrorFields::is`), never with
//! string literals.

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
pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState("42P05");
pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");
pub const CONFIGURATION_LIMIT_EXCEEDED: SqlState = SqlState("53400");
pub const OUT_OF_MEMORY: SqlState = SqlState("53200");
pub const IO_ERROR: SqlState = SqlState("58030");
pub const SYNTAX_ERROR: SqlState = SqlState("42601");
pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
pub const CONFIG_FILE_ERROR: SqlState = SqlState("F0000");

/// Codes of PostgreSQL's own errors that the gateway acts on.
pub mod backend {
    use super::SqlState;

    /// A login's password did not match (a per-role login's changed).
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    /// Among others, "cached plan must not change result type".
    pub const FEATURE_NOT_SUPPORTED: SqlState = super::FEATURE_NOT_SUPPORTED;
    /// Among others, "cache lookup failed" for a dropped object.
    pub const INTERNAL_ERROR: SqlState = super::INTERNAL_ERROR;
}
