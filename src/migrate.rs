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

use crate::auth::logins;
use crate::config::{Config, Isolation, PoolMode};
use crate::identity::policy::Policy;
use crate::identity::tag;

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

/// What `pgwarden migrate` was asked for besides the migrations.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Make a new tag key the signing key; the old one stays accepted for
    /// `grace`.
    pub rotate_tag_key: bool,
    pub grace: std::time::Duration,
    /// Audit instances to register for the service user to anchor, besides
    /// `[audit] instance`.
    pub register_instances: Vec<String>,
}

/// What a migration did, for the operator.
#[derive(Debug, Default)]
pub struct Report {
    pub granted: Vec<String>,
    pub missing_roles: Vec<String>,
    /// The signing key's id, and whether this run created it.
    pub tag_key: Option<(i32, bool)>,
    /// pgwarden's own logins made ready (tag reader, per-role logins).
    pub logins: Vec<String>,
    /// Why a login of pgwarden's is not what it must be.
    pub login_problems: Vec<String>,
    /// Row-level security policies that verify the signed tag once per row.
    pub per_row_policies: Vec<String>,
    /// Audit instances registered for the service user to anchor.
    pub instances_registered: Vec<String>,
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

/// Applies migrations and sets up the service user, the tag key and
/// pgwarden's own logins.
pub async fn run(
    config: &Config,
    admin_url: &str,
    options: Options,
) -> Result<Report, MigrateError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
        .map_err(MigrateError::Connect)?;
    sqlx::migrate!("./migrations").run(&pool).await?;

    let function = tag::client_user_function(&config.identity.client_user_setting);
    // Built from constants and the setting name quoted as a literal.
    sqlx::query(sqlx::AssertSqlSafe(function))
        .execute(&pool)
        .await?;
    sqlx::query("GRANT EXECUTE ON FUNCTION pgwarden.client_user() TO PUBLIC")
        .execute(&pool)
        .await?;
    let mut report = Report::default();
    let policy = Policy::load_dir(&config.identity.policy_dir)?;
    if let Some(secret) = &config.backend.service_password {
        report.tag_key = Some(ensure_tag_key(&pool, secret, &options).await?);
        let reader = &config.identity.tag_reader;
        prepare_login(&pool, reader, secret, None, &mut report).await?;
        exec_formatted(&pool, "REVOKE ALL ON pgwarden.tag_keys FROM %I", &[reader]).await?;
        exec_formatted(
            &pool,
            "GRANT SELECT (id, retire_at) ON pgwarden.tag_keys TO %I",
            &[reader],
        )
        .await?;
        if config.pool.isolation == Isolation::Role {
            for role in roles_served(&pool, &policy, config).await? {
                match logins::role_login(&config.pool.role_login, &role) {
                    Ok(login) => {
                        prepare_login(&pool, &login, secret, Some(&role), &mut report).await?
                    }
                    Err(problem) => report.login_problems.push(problem),
                }
            }
        }
    }

    report.per_row_policies = per_row_policies(&pool).await?;

    let service = &config.backend.service_user;
    let exists: bool = sqlx::query("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(service)
        .fetch_one(&pool)
        .await?
        .get(0);
    if !exists {
        report.missing_roles.push(service.clone());
        return Ok(report);
    }
    exec_formatted(&pool, "ALTER ROLE %I NOINHERIT", &[service]).await?;
    // The only thing the service user may do with audit checkpoints: append.
    exec_formatted(
        &pool,
        "GRANT EXECUTE ON FUNCTION pgwarden.audit_checkpoint(text, bigint, text, timestamptz) TO %I",
        &[service],
    )
    .await?;
    let configured = config.audit.instance.iter();
    for instance in configured.chain(&options.register_instances) {
        register_instance(&pool, instance, service, &mut report).await?;
    }
    drop_settings(&pool, service).await?;
    if config.pool.mode == PoolMode::Transaction {
        report.statements_hidden = Some(hide_statements(&pool).await);
    }

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

/// Registers `instance` as the service user's to anchor: with its
/// credentials, only registered instances (or a first one) can be anchored.
async fn register_instance(
    pool: &sqlx::PgPool,
    instance: &str,
    service: &str,
    report: &mut Report,
) -> Result<(), sqlx::Error> {
    if !crate::config::valid_instance(instance) {
        report.login_problems.push(format!(
            "{instance:?} is not an instance name (1 to 64 of A-Z a-z 0-9 . _ : -)"
        ));
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO pgwarden.audit_instances (instance, login) VALUES ($1, $2) ON CONFLICT (instance) DO NOTHING",
    )
    .bind(instance)
    .bind(service)
    .execute(pool)
    .await?;
    let login: String =
        sqlx::query_scalar("SELECT login::text FROM pgwarden.audit_instances WHERE instance = $1")
            .bind(instance)
            .fetch_one(pool)
            .await?;
    if login == service {
        report.instances_registered.push(instance.to_string());
    } else {
        report.login_problems.push(format!(
            "audit instance {instance} is registered to login {login}, not {service}: its checkpoints will be refused"
        ));
    }
    Ok(())
}

/// Makes sure the database has a signing key (a new one when rotating,
/// the old one then accepted for the grace period) and drops keys past
/// their grace. Returns the signing key's id and whether it is new.
async fn ensure_tag_key(
    pool: &sqlx::PgPool,
    secret: &str,
    options: &Options,
) -> Result<(i32, bool), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE pgwarden.tag_keys IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM pgwarden.tag_keys WHERE retire_at <= now()")
        .execute(&mut *tx)
        .await?;
    let current: Option<i32> = sqlx::query_scalar(
        "SELECT id FROM pgwarden.tag_keys WHERE retire_at IS NULL ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let (Some(id), false) = (current, options.rotate_tag_key) {
        tx.commit().await?;
        return Ok((id, false));
    }
    sqlx::query(
        "UPDATE pgwarden.tag_keys SET retire_at = now() + make_interval(secs => $1) \
         WHERE retire_at IS NULL",
    )
    .bind(options.grace.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    // A fresh id from the identity's sequence, never one used before (an
    // old id's values must not become good again).
    let (id, database): (i64, String) = sqlx::query_as(
        "SELECT nextval(pg_get_serial_sequence('pgwarden.tag_keys', 'id')), current_database()::text",
    )
    .fetch_one(&mut *tx)
    .await?;
    let id = i32::try_from(id).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    let (ipad, opad) = tag::pads(&tag::derive_key(secret, &database, id));
    sqlx::query(
        "INSERT INTO pgwarden.tag_keys (id, ipad, opad) OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3)",
    )
    .bind(id)
    .bind(ipad)
    .bind(opad)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((id, true))
}

/// The roles that get a login with `isolation = "role"`: those the
/// policies name, and those `{user}` rules give the cluster's login roles
/// in this database; only roles that exist.
async fn roles_served(
    pool: &sqlx::PgPool,
    policy: &Policy,
    config: &Config,
) -> Result<Vec<String>, sqlx::Error> {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await?;
    let existing: Vec<(String, bool)> =
        sqlx::query_as("SELECT rolname, rolcanlogin AND NOT rolsuper FROM pg_roles")
            .fetch_all(pool)
            .await?;
    let mut roles: Vec<String> = concrete_roles(policy)
        .into_iter()
        .map(str::to_string)
        .collect();
    for (name, client) in &existing {
        let ours = *name == config.backend.service_user
            || *name == config.identity.tag_reader
            || logins::is_role_login(&config.pool.role_login, name);
        if ours {
            continue;
        }
        if let Some(role) = client.then(|| policy.resolve(name, &database)).flatten() {
            roles.push(role);
        }
    }
    roles.retain(|r| existing.iter().any(|(name, _)| name == r));
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// Creates or updates one of pgwarden's own logins: `NOINHERIT`, no
/// attributes, the derived password (as a SCRAM verifier), member of
/// `member_of` only. A login that owns objects or holds grants is reported.
async fn prepare_login(
    pool: &sqlx::PgPool,
    login: &str,
    secret: &str,
    member_of: Option<&str>,
    report: &mut Report,
) -> Result<(), sqlx::Error> {
    let verifier = postgres_protocol::password::scram_sha_256(
        logins::derived_password(secret, login).as_bytes(),
    );
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(login)
            .fetch_one(pool)
            .await?;
    let verb = if exists { "ALTER" } else { "CREATE" };
    exec_formatted(
        pool,
        &format!("{verb} ROLE %I LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L"),
        &[login, &verifier],
    )
    .await?;
    drop_settings(pool, login).await?;
    let memberships: Vec<String> = sqlx::query_scalar(
        "SELECT r.rolname::text FROM pg_auth_members m \
         JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles u ON u.oid = m.member \
         WHERE u.rolname = $1",
    )
    .bind(login)
    .fetch_all(pool)
    .await?;
    for role in &memberships {
        if Some(role.as_str()) != member_of {
            exec_formatted(pool, "REVOKE %I FROM %I", &[role, login]).await?;
        }
    }
    if let Some(role) = member_of.filter(|r| !memberships.iter().any(|m| m == r)) {
        exec_formatted(pool, "GRANT %I TO %I", &[role, login]).await?;
    }
    let holds: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid \
         WHERE r.rolname = $1 AND d.deptype IN ('o', 'a') \
         AND NOT ($2 AND d.deptype = 'a' AND d.classid = 'pg_class'::regclass)",
    )
    .bind(login)
    // The tag reader's one grant is SELECT on pgwarden.tag_keys.
    .bind(member_of.is_none())
    .fetch_one(pool)
    .await?;
    if holds > 0 {
        report.login_problems.push(format!(
            "login {login} owns objects or holds grants ({holds}); it must have none"
        ));
    }
    report.logins.push(login.to_string());
    Ok(())
}

/// Policies that call `pgwarden.client_user()` other than as a scalar
/// subquery: PostgreSQL evaluates such a call for every row (about 20 µs
/// each), `(SELECT pgwarden.client_user())` once per statement.
async fn per_row_policies(pool: &sqlx::PgPool) -> Result<Vec<String>, sqlx::Error> {
    let policies: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT schemaname::text, tablename::text, policyname::text, \
                coalesce(qual, '') || ' ' || coalesce(with_check, '') \
         FROM pg_catalog.pg_policies WHERE coalesce(qual, '') || coalesce(with_check, '') \
         LIKE '%pgwarden.client_user()%'",
    )
    .fetch_all(pool)
    .await?;
    Ok(policies
        .into_iter()
        .filter(|(.., text)| {
            text.matches("pgwarden.client_user()").count()
                > text.matches("SELECT pgwarden.client_user()").count()
        })
        .map(|(schema, table, policy, _)| format!("{policy} on {schema}.{table}"))
        .collect())
}

/// Drops the settings `login` has of its own, in every database: a client
/// that reached one of pgwarden's logins (RESET ROLE through code that runs
/// its SQL) can set them (`ALTER ROLE CURRENT_USER IN DATABASE d SET
/// search_path = ...`), and they would apply to every session the login
/// serves. The gateway refuses connections of a login that has any.
async fn drop_settings(pool: &sqlx::PgPool, login: &str) -> Result<(), sqlx::Error> {
    let databases: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT d.datname::text FROM pg_db_role_setting s \
         JOIN pg_roles r ON r.oid = s.setrole \
         LEFT JOIN pg_database d ON d.oid = s.setdatabase WHERE r.rolname = $1",
    )
    .bind(login)
    .fetch_all(pool)
    .await?;
    for database in databases {
        match database {
            Some(db) => {
                exec_formatted(
                    pool,
                    "ALTER ROLE %I IN DATABASE %I RESET ALL",
                    &[login, &db],
                )
                .await?
            }
            None => exec_formatted(pool, "ALTER ROLE %I RESET ALL", &[login]).await?,
        }
    }
    Ok(())
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
/// can be assumed. With `[backend] hosts`, the first that answers is asked
/// (roles are the same on every host of a replicated cluster).
pub async fn check_roles(
    config: &Config,
    policy: &Policy,
) -> Result<Vec<RoleProblem>, sqlx::Error> {
    let backend = &config.backend;
    let hosts = match backend.candidates() {
        Ok(hosts) if !hosts.is_empty() => hosts,
        _ => vec![backend.configured()],
    };
    let mut last = None;
    for host in &hosts {
        match check_roles_on(config, policy, host).await {
            Err(e) => {
                tracing::debug!("policy check: {host}: {e}");
                last = Some(e);
            }
            checked => return checked,
        }
    }
    Err(last.expect("at least one host"))
}

async fn check_roles_on(
    config: &Config,
    policy: &Policy,
    host: &crate::config::primary::Host,
) -> Result<Vec<RoleProblem>, sqlx::Error> {
    let backend = &config.backend;
    let mut options = sqlx::postgres::PgConnectOptions::new()
        .host(&host.host)
        .port(host.port)
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
