//! Every error the gateway itself answers a client with, typed from where
//! it arises (the pool, the identity assertion, the login relay, the
//! startup packet, the policies) up to one place that decides its SQLSTATE,
//! severity and text: [`Refusal::to_wire`]. Errors PostgreSQL defines for a
//! message, that the gateway gives in PostgreSQL's place (a statement name
//! that does not exist, a refused statement in the position of its own
//! error), are already in PostgreSQL's terms and pass through as
//! [`Refusal::Answer`].

pub use crate::auth::relay::RelayFailure;
use crate::identity::assert::AssertError;
use crate::pool::AcquireError;
use crate::protocol::frame::ProtocolError;
use crate::protocol::messages::PgError;
use crate::protocol::sqlstate;
use crate::session::conn_limits::Over;

/// Why `[pool] session_set = "error"` refuses a statement.
const SESSION_SET_REFUSED: &str = "a setting changed for the session lasts only until the end of the transaction in transaction pooling, and pgwarden is configured to refuse it ([pool] session_set = \"error\"): use SET LOCAL inside a transaction, or pass the setting when connecting (options=-c name=value)";

#[derive(Debug)]
pub enum Refusal {
    /// No server connection could be had.
    Acquire(AcquireError),
    /// The identity assertion failed: the statement did not run.
    Assertion(AssertError),
    /// The login could not be relayed to PostgreSQL.
    Relay(RelayFailure),
    /// The client broke the protocol: the session ends.
    Protocol(ProtocolError),
    /// No policy rule maps this client to a role on this database.
    Unmapped { user: String, database: String },
    /// This user is not in `[admin] users` and asked for the console.
    NotAdmin { user: String },
    /// `max_client_connections` clients are connected.
    TooManyClients,
    /// The client's role, or its database, has as many sessions as
    /// PostgreSQL's connection limit for it (the client user, the database).
    ConnectionLimit(crate::session::conn_limits::Over, String, String),
    /// A startup packet the gateway cannot serve.
    Startup(StartupRefusal),
    /// The statement guard refused the statement (why).
    Guard(String),
    /// The audit store could not write the statement's record
    /// (`on_failure = "deny"`); what the store said.
    Audit(String),
    /// A statement changes a setting for the session while
    /// `[pool] session_set = "error"`.
    SessionSet,
    /// A setting beyond the ones kept per session (`max` of them).
    TooManyKept { name: String, max: usize },
    /// A statement text longer than a record keeps (`[audit]
    /// max_value_bytes`): refused rather than run with part of it recorded.
    TooLongToRecord { len: usize, max: usize },
    /// A session's prepared statements would keep `bytes`, more than
    /// `[server] prepared_statement_memory` (`max`).
    TooMuchPrepared { bytes: usize, max: usize },
    /// The gateway is shutting down and the session is idle.
    Shutdown,
    /// The server connection failed under the client's session.
    ServerLost,
    /// `verify = "transaction"` found another identity on the connection.
    IdentityChanged(String),
    /// `client_idle_timeout_ms` elapsed.
    ClientIdle,
    /// `idle_in_transaction_timeout_ms` elapsed (the gateway rolled back).
    IdleInTransaction,
    /// A frontend message type the protocol does not have.
    UnknownMessage(u8),
    /// A bug the gateway caught before it could do harm.
    Internal(&'static str),
    /// An error already in PostgreSQL's terms.
    Answer(PgError),
}

/// What is wrong with a startup packet.
#[derive(Debug)]
pub enum StartupRefusal {
    /// A parameter given twice (PostgreSQL takes the last `user`, a gateway
    /// reading the first would authenticate one user and map another).
    Repeated(String),
    /// The `user` or `database` name would be cut inside a character at
    /// PostgreSQL's 63 bytes.
    CutName(&'static str),
    NoUser,
    Replication,
}

impl From<PgError> for Refusal {
    fn from(e: PgError) -> Self {
        Refusal::Answer(e)
    }
}

impl From<ProtocolError> for Refusal {
    fn from(e: ProtocolError) -> Self {
        Refusal::Protocol(e)
    }
}

impl From<AcquireError> for Refusal {
    fn from(e: AcquireError) -> Self {
        Refusal::Acquire(e)
    }
}

impl From<AssertError> for Refusal {
    fn from(e: AssertError) -> Self {
        Refusal::Assertion(e)
    }
}

impl Refusal {
    /// The error the client receives.
    pub fn to_wire(&self) -> PgError {
        match self {
            Refusal::Acquire(e) => acquire(e),
            Refusal::Assertion(e) => PgError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!(
                    "pgwarden could not switch to role \"{}\" for user \"{}\"; the statement was not run",
                    e.role, e.client_user
                ),
            )
            .with_detail(e.cause.clone()),
            Refusal::Relay(e) => relay(e),
            Refusal::Protocol(e) => e.to_fatal(),
            Refusal::Unmapped { user, database } => PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("no role mapping for user \"{user}\" on database \"{database}\""),
            ),
            Refusal::NotAdmin { user } => PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("user \"{user}\" may not open the pgwarden console (not in [admin] users)"),
            ),
            Refusal::Startup(e) => startup(e),
            Refusal::TooManyClients => PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
            ),
            Refusal::ConnectionLimit(over, user, database) => PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                match over {
                    Over::Role => format!("too many connections for role \"{user}\""),
                    Over::Database => format!("too many connections for database \"{database}\""),
                },
            ),
            Refusal::Guard(why) => PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, why.clone()),
            Refusal::Audit(why) => PgError::error(
                sqlstate::IO_ERROR,
                "pgwarden cannot write its audit log; the statement was not run",
            )
            .with_detail(why.clone()),
            Refusal::SessionSet => {
                PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, SESSION_SET_REFUSED)
            }
            Refusal::TooManyKept { name, max } => PgError::error(
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!(
                    "pgwarden keeps at most {max} settings per session; set \"{name}\" with SET LOCAL instead"
                ),
            ),
            Refusal::TooMuchPrepared { bytes, max } => PgError::error(
                sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                format!(
                    "prepared statements and portals of this session would keep {bytes} bytes, more than pgwarden's [server] prepared_statement_memory ({max}); close some first"
                ),
            ),
            Refusal::TooLongToRecord { len, max } => PgError::error(
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!(
                    "statement of {len} bytes is longer than pgwarden's audit log records ([audit] max_value_bytes = {max})"
                ),
            ),
            Refusal::Shutdown => PgError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            ),
            Refusal::ServerLost => PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "pgwarden lost its connection to PostgreSQL; your transaction, if any, was rolled back",
            ),
            Refusal::IdentityChanged(message) => {
                PgError::fatal(sqlstate::INSUFFICIENT_PRIVILEGE, message.clone())
            }
            Refusal::ClientIdle => PgError::fatal(
                sqlstate::IDLE_SESSION_TIMEOUT,
                "terminating connection due to client_idle_timeout",
            ),
            Refusal::IdleInTransaction => PgError::fatal(
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                "terminating connection due to idle_in_transaction_timeout; the transaction was rolled back",
            ),
            Refusal::UnknownMessage(tag) => PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid frontend message type {tag}"),
            ),
            Refusal::Internal(what) => PgError::fatal(
                sqlstate::INTERNAL_ERROR,
                format!("pgwarden ended the session: internal error ({what})"),
            ),
            Refusal::Answer(e) => e.clone(),
        }
    }
}

fn relay(e: &RelayFailure) -> PgError {
    match e {
        RelayFailure::Backend(why) => PgError::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!("pgwarden cannot authenticate you with PostgreSQL: {why}"),
        ),
        RelayFailure::Method(code) => PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("authentication method (request code {code}) cannot be relayed by pgwarden"),
        ),
        RelayFailure::UnexpectedAnswer(tag) => PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!(
                "expected a password or SASL response, got message type {:?}",
                *tag as char
            ),
        ),
    }
}

fn startup(e: &StartupRefusal) -> PgError {
    match e {
        StartupRefusal::Repeated(key) => PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("startup parameter \"{key}\" is given more than once"),
        ),
        StartupRefusal::CutName(key) => PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("the {key} name is longer than 63 bytes and would be cut inside a character"),
        ),
        StartupRefusal::NoUser => PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        ),
        StartupRefusal::Replication => PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by pgwarden",
        ),
    }
}

fn acquire(e: &AcquireError) -> PgError {
    match e {
        AcquireError::NoLogin(why) => PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, why.clone()),
        AcquireError::Timeout { waited_ms, size } => PgError::error(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!("no server connection became free within {waited_ms} ms (pool size {size})"),
        ),
        AcquireError::Capped { max } => PgError::error(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "the database's {max} server connections are all in use ([pool] max_db_connections)"
            ),
        ),
        AcquireError::Refused {
            fields,
            password_changed,
        } => {
            let hint = match password_changed {
                true => {
                    "; if this is a per-role login, its password was changed: run pgwarden migrate"
                }
                false => "",
            };
            PgError::error(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "pgwarden cannot open a server connection: {}",
                    fields.message
                ),
            )
            .with_detail(format!(
                "PostgreSQL reported SQLSTATE {}{hint}",
                fields.code
            ))
        }
        AcquireError::Closed => {
            PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "pgwarden is shutting down")
        }
        AcquireError::Unreachable(why) => PgError::error(
            sqlstate::CONNECTION_FAILURE,
            format!("pgwarden cannot open a server connection: {why}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cases: Vec<(Refusal, &str, bool)>) {
        for (refusal, code, fatal) in cases {
            let wire = refusal.to_wire();
            assert_eq!(
                (wire.code.code(), wire.is_fatal()),
                (code, fatal),
                "{refusal:?}"
            );
        }
    }

    /// Each login and connection refusal's SQLSTATE and severity, as
    /// clients and tests rely on.
    #[test]
    fn every_pool_and_assertion_refusal_has_its_sqlstate_and_severity() {
        let fields = crate::protocol::messages::ErrorFields {
            severity: "FATAL".into(),
            code: "28P01".into(),
            message: "password authentication failed".into(),
        };
        let cases: Vec<(Refusal, &str, bool)> = vec![
            (
                AcquireError::NoLogin("bad name".into()).into(),
                "42501",
                false,
            ),
            (
                AcquireError::Timeout {
                    waited_ms: 5,
                    size: 1,
                }
                .into(),
                "53300",
                false,
            ),
            (AcquireError::Capped { max: 2 }.into(), "53300", false),
            (
                AcquireError::Refused {
                    fields,
                    password_changed: true,
                }
                .into(),
                "08006",
                false,
            ),
            (AcquireError::Closed.into(), "57P01", true),
            (
                AcquireError::Unreachable("refused".into()).into(),
                "08006",
                false,
            ),
            (
                AssertError {
                    role: "analyst".into(),
                    client_user: "alice".into(),
                    cause: "permission denied".into(),
                }
                .into(),
                "42501",
                false,
            ),
        ];
        check(cases);
    }

    /// The refusals of a login and its startup packet.
    #[test]
    fn every_login_refusal_has_its_sqlstate_and_severity() {
        let cases: Vec<(Refusal, &str, bool)> = vec![
            (
                Refusal::Relay(RelayFailure::Backend("down".into())),
                "08006",
                true,
            ),
            (Refusal::Relay(RelayFailure::Method(7)), "0A000", true),
            (
                Refusal::Relay(RelayFailure::UnexpectedAnswer(b'Q')),
                "08P01",
                true,
            ),
            (
                Refusal::Protocol(ProtocolError::InvalidLength(2)),
                "08P01",
                true,
            ),
            (
                Refusal::Unmapped {
                    user: "eve".into(),
                    database: "app".into(),
                },
                "28000",
                true,
            ),
            (Refusal::NotAdmin { user: "eve".into() }, "28000", true),
            (Refusal::TooManyClients, "53300", true),
            (
                Refusal::Startup(StartupRefusal::Repeated("user".into())),
                "08P01",
                true,
            ),
            (
                Refusal::Startup(StartupRefusal::CutName("user")),
                "28000",
                true,
            ),
            (Refusal::Startup(StartupRefusal::NoUser), "28000", true),
            (Refusal::Startup(StartupRefusal::Replication), "0A000", true),
        ];
        check(cases);
    }

    /// The refusals of a running session.
    #[test]
    fn every_session_refusal_has_its_sqlstate_and_severity() {
        let cases: Vec<(Refusal, &str, bool)> = vec![
            (Refusal::Guard("no".into()), "42501", false),
            (Refusal::Shutdown, "57P01", true),
            (Refusal::SessionSet, "0A000", false),
            (
                Refusal::TooManyKept {
                    name: "x".into(),
                    max: 64,
                },
                "54000",
                false,
            ),
            (Refusal::TooLongToRecord { len: 9, max: 8 }, "54000", false),
            (
                Refusal::TooMuchPrepared { bytes: 9, max: 8 },
                "53400",
                false,
            ),
            (Refusal::ServerLost, "08006", true),
            (Refusal::IdentityChanged("x".into()), "42501", true),
            (Refusal::ClientIdle, "57P05", true),
            (Refusal::IdleInTransaction, "25P03", true),
            (Refusal::UnknownMessage(b'z'), "08P01", true),
            (Refusal::Internal("x"), "XX000", true),
            (Refusal::Audit("disk full".into()), "58030", false),
        ];
        check(cases);
        let hint = Refusal::Acquire(AcquireError::Refused {
            fields: Default::default(),
            password_changed: true,
        })
        .to_wire();
        assert!(format!("{hint:?}").contains("run pgwarden migrate"));
    }
}
