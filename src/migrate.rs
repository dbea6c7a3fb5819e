//! `pgwarden migrate`: applies the SQL migrations in `migrations/` (embedded
//! with sqlx) and prepares the service user, over an administrator
//! connection.
//!
//! Invariant: running it again changes nothing; it never grants the service
//! user a privilege of its own, only membership in the roles the policies
//! name, and it makes the service user `NOINHERIT` so that membership gives
//! nothing until pgwarden switches to a role.

use sqlx::postgres::PgPoolOptions;
use sqlx::Row;

use crate::config::{Config, PoolMode};
use crate::identity::policy::Policy;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect with --admin-url: {0}")]
    Connect(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Sql(#[from] sqlx::Error),
    #[error("policies: {0}")]
    Policy(#[from] crate::identity::policy::PolicyError),
}

/// What a migration did, for the operator.
#[derive(Debug, Default)]
pub struct Report {
    pub granted: Vec<String>,
    pub missing_roles: Vec<String>,
    /// Transaction pooling: whether `pg_prepared_statements` was hidden
    /// from everyone but superusers, or why it could not be.
    pub statements_hidden: Option<Result<(), String>>,
}

/// In transaction pooling the clients that share a server connection share
/// its prepared statements, whose texts `pg_prepared_statements` would show
/// to every client on it: take `PUBLIC`'s access to the view and to the
/// function behind it away (in this database; the catalog's owner, a
/// superuser, must run it), so PostgreSQL refuses every mapped role.
const HIDE_STATEMENTS: [&str; 2] = [
    "REVOKE SELECT ON pg_catalog.pg_prepared_statements FROM PUBLIC",
    "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_prepared_statement() FROM PUBLIC",
];

/// Applies migrations and sets up the service user.
pub async fn run(config: &Config, admin_url: &str) -> Result<Report, MigrateError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
        .map_err(MigrateError::Connect)?;
    sqlx::migrate!("./migrations").run(&pool).await?;

    exec_formatted(
        &pool,
        "CREATE OR REPLACE FUNCTION pgwarden.client_user() RETURNS text \
         LANGUAGE sql STABLE PARALLEL SAFE \
         AS $$ SELECT nullif(pg_catalog.current_setting(%L, true), '') $$",
        &[&config.identity.client_user_setting],
    )
    .await?;

    let service = &config.backend.service_user;
    let exists: bool = sqlx::query("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(service)
        .fetch_one(&pool)
        .await?
        .get(0);
    let mut report = Report::default();
    if !exists {
        report.missing_roles.push(service.clone());
        return Ok(report);
    }
    exec_formatted(&pool, "ALTER ROLE %I NOINHERIT", &[service]).await?;
    if config.pool.mode == PoolMode::Transaction {
        report.statements_hidden = Some(hide_statements(&pool).await);
    }

    let policy = Policy::load_dir(&config.identity.policy_dir)?;
    for role in concrete_roles(&policy) {
        let (exists, member) = role_status(&pool, role, service).await?;
        if !exists {
            report.missing_roles.push(role.to_string());
        } else if !member {
            exec_formatted(&pool, "GRANT %I TO %I", &[role, service]).await?;
            report.granted.push(role.to_string());
        }
    }
    pool.close().await;
    Ok(report)
}

/// Runs [`HIDE_STATEMENTS`]; a refusal (an administrator who is not a
/// superuser) is reported, not fatal.
async fn hide_statements(pool: &sqlx::PgPool) -> Result<(), String> {
    for sql in HIDE_STATEMENTS {
        sqlx::query(sql)
            .execute(pool)
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
    }
    Ok(())
}

/// Runs `format(template, args...)` on the server, so identifiers are quoted
/// by PostgreSQL's own `%I`, then executes the result.
async fn exec_formatted(
    pool: &sqlx::PgPool,
    template: &str,
    args: &[&str],
) -> Result<(), sqlx::Error> {
    let placeholders: Vec<String> = (2..args.len() + 2).map(|i| format!("${i}")).collect();
    // Only `$n` placeholders are spliced here; every value is bound.
    let select = format!("SELECT format($1, {})", placeholders.join(", "));
    let mut q = sqlx::query(sqlx::AssertSqlSafe(select)).bind(template);
    for a in args {
        q = q.bind(*a);
    }
    let sql: String = q.fetch_one(pool).await?.get(0);
    // `sql` was built by PostgreSQL's format() with %I/%L quoting.
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
    Ok(())
}

/// A mapped role the service user cannot switch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleProblem {
    Missing(String),
    NotMember { role: String, service_user: String },
}

impl std::fmt::Display for RoleProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoleProblem::Missing(role) => write!(f, "role \"{role}\" does not exist"),
            RoleProblem::NotMember { role, service_user } => write!(
                f,
                "service user \"{service_user}\" cannot SET ROLE \"{role}\" (not a member; GRANT \"{role}\" TO \"{service_user}\")"
            ),
        }
    }
}

/// Checks, logged in as the service user, that every role the policies name
/// (other than `{user}` templates, which depend on the client) exists and
/// can be assumed.
pub async fn check_roles(
    config: &Config,
    policy: &Policy,
) -> Result<Vec<RoleProblem>, sqlx::Error> {
    let backend = &config.backend;
    let mut options = sqlx::postgres::PgConnectOptions::new()
        .host(&backend.host)
        .port(backend.port)
        .username(&backend.service_user)
        .database("postgres")
        .application_name("pgwarden policy check");
    if let Some(password) = &backend.service_password {
        options = options.password(password);
    }
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_millis(backend.connect_timeout_ms))
        .connect_with(options)
        .await?;
    let mut problems = Vec::new();
    for role in concrete_roles(policy) {
        match role_status(&pool, role, &backend.service_user).await? {
            (false, _) => problems.push(RoleProblem::Missing(role.to_string())),
            (true, false) => problems.push(RoleProblem::NotMember {
                role: role.to_string(),
                service_user: backend.service_user.clone(),
            }),
            (true, true) => {}
        }
    }
    pool.close().await;
    Ok(problems)
}

/// The roles the policies name, without `{user}` templates (those depend on
/// the client), sorted and deduplicated.
fn concrete_roles(policy: &Policy) -> Vec<&str> {
    let mut roles: Vec<&str> = policy
        .rules()
        .iter()
        .map(|r| r.role.as_str())
        .filter(|r| !r.contains("{user}"))
        .collect();
    roles.sort();
    roles.dedup();
    roles
}

/// Whether `role` exists, and whether `member` can `SET ROLE` to it.
async fn role_status(
    pool: &sqlx::PgPool,
    role: &str,
    member: &str,
) -> Result<(bool, bool), sqlx::Error> {
    let row = sqlx::query(
        "SELECT r.oid IS NOT NULL, coalesce(pg_has_role($2, r.oid, 'MEMBER'), false) \
         FROM (SELECT 1) one LEFT JOIN pg_roles r ON r.rolname = $1",
    )
    .bind(role)
    .bind(member)
    .fetch_one(pool)
    .await?;
    Ok((row.get(0), row.get(1)))
}
