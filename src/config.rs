//! `pgwarden.toml`: the gateway's configuration, with defaults and
//! environment overrides.
//!
//! Invariant: a `Config` that `load` returned is complete and valid. Every key
//! has a default except the service credentials, unknown keys are an error
//! naming the key, and relative paths are already resolved against the
//! directory of the config file, so nothing downstream re-validates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod audit;
mod backend;
pub mod primary;
pub use audit::{
    shown_instance, valid_instance, AuditConfig, Durability, OnFailure, ShipConfig, ShipFormat,
    ShipTransport, DEFAULT_MAX_VALUE_BYTES, MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES,
};
pub use backend::BackendConfig;
mod server;
pub use server::ServerConfig;

/// Environment variable that overrides `[backend] service_password`.
pub const SERVICE_PASSWORD_ENV: &str = "PGWARDEN_SERVICE_PASSWORD";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub backend: BackendConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// The other gateways behind the same load balancer (`[[peers]]`), for
    /// cancel requests that land on the wrong one.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

/// Another gateway: its `[server] peer_id` and its client address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u8,
    pub address: String,
    /// Forward cancels to it over TLS (its `[server] tls_cert`), its
    /// certificate chained to `ca_file` and naming the address's host.
    #[serde(default)]
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
}

/// The operator side: a Prometheus endpoint (off unless `listen` is set),
/// and the admin console (the virtual database `pgwarden`, for `users`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// Who may open the console; their login is relayed to PostgreSQL.
    pub users: Vec<String>,
    /// The database the console's logins are checked against.
    pub auth_database: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: None,
            users: Vec::new(),
            auth_database: "postgres".into(),
        }
    }
}

/// How the gateway's own log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `pgwarden=debug`; the env var
    /// `PGWARDEN_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// Most `[server] worker_threads`: more is a typo, not a machine.
const MAX_WORKER_THREADS: usize = 1024;

/// When a server connection is returned to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Bound at the first message of a transaction, released at `ReadyForQuery` `I`.
    Transaction,
    /// Bound from the first statement until the client disconnects.
    Session,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections per database.
    pub size: usize,
    pub acquire_timeout_ms: u64,
    /// What a session-level `SET` does in transaction pooling.
    pub session_set: SessionSet,
    /// Which login the pooled connections use.
    pub isolation: Isolation,
    /// `isolation = "role"`: the login of each mapped role, `{role}`
    /// replaced by the role's name.
    pub role_login: String,
    /// Server connections per database across all its pools (0 = only
    /// `size` per pool limits them); an idle connection of another pool
    /// is closed to make room.
    pub max_db_connections: usize,
    /// An idle server connection is closed after this long (0 = never), so
    /// pools of roles no client uses shrink.
    pub idle_timeout_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            size: 20,
            acquire_timeout_ms: 5_000,
            session_set: SessionSet::Keep,
            isolation: Isolation::Shared,
            role_login: "pgwarden_svc_{role}".to_string(),
            max_db_connections: 0,
            idle_timeout_ms: 600_000,
        }
    }
}

/// Which PostgreSQL login runs the clients' transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// One service user, member of every mapped role.
    Shared,
    /// One login per mapped role (`role_login`), member of that role
    /// only: no SQL can switch to another mapped role.
    Role,
}

/// In transaction pooling, what happens to a setting a client changes for
/// its session (`SET`, `RESET`, `set_config(..., false)`), which on a
/// direct connection outlasts the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionSet {
    /// The gateway reads the setting's value back when the transaction ends
    /// and applies it to every connection that serves the client, as on a
    /// direct connection.
    Keep,
    /// The statement is refused with 0A000 (reportable settings such as
    /// `TimeZone` still follow the client).
    Error,
}

/// Whether identity is re-checked before a server connection is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    Off,
    Transaction,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    pub policy_dir: PathBuf,
    pub client_user_setting: String,
    pub verify: VerifyMode,
    /// Let DO blocks and function bodies sent through pgwarden run dynamic
    /// SQL (`EXECUTE` of anything but one string constant, SQL runners such
    /// as `query_to_xml` with a computed query). Off by default: the guard
    /// cannot see SQL assembled at run time, so with it on, a client can
    /// change its identity until the end of the transaction (the gateway
    /// re-asserts identity and resets the connection afterwards).
    pub allow_dynamic_sql: bool,
    /// Sign the client-user value when the database holds a tag key
    /// (`pgwarden migrate` creates one), so `pgwarden.client_user()`
    /// cannot be fooled by a forged setting.
    pub signed_tag: bool,
    /// The login that reads the tag key (its password is derived from the
    /// service password; `pgwarden migrate` creates it).
    pub tag_reader: String,
    /// How often the tag key is read again (to follow a key rotation).
    pub tag_key_refresh_ms: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            policy_dir: PathBuf::from("policies"),
            client_user_setting: "app.client_user".to_string(),
            verify: VerifyMode::Off,
            allow_dynamic_sql: false,
            signed_tag: true,
            tag_reader: "pgwarden_tag_reader".to_string(),
            tag_key_refresh_ms: 60_000,
        }
    }
}

impl Config {
    /// Reads, validates and resolves `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let env_password = std::env::var(SERVICE_PASSWORD_ENV).ok();
        Config::parse(&text, path, env_password)
    }

    /// Parses `text` as if read from `path` (for relative paths and messages).
    pub fn parse(
        text: &str,
        path: &Path,
        env_password: Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        if let Some(password) = env_password {
            config.backend.service_password = Some(password);
        }
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.resolve_paths(&base);
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.identity.policy_dir);
        resolve(&mut self.audit.store);
        for p in [&mut self.audit.archive_dir, &mut self.audit.signing_key]
            .into_iter()
            .flatten()
        {
            resolve(p);
        }
        for peer in &mut self.peers {
            if let Some(p) = peer.ca_file.as_mut() {
                resolve(p);
            }
        }
        if let Some(p) = self.server.tls_cert.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.server.tls_key.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.backend.tls_ca_file.as_mut() {
            resolve(p);
        }
        if let Some(ship) = self.audit.ship.as_mut() {
            for p in [&mut ship.ca_file, &mut ship.cert_file, &mut ship.key_file]
                .into_iter()
                .flatten()
            {
                resolve(p);
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.backend.service_user.is_empty() {
            return Err("[backend] service_user must not be empty".into());
        }
        self.backend.candidates()?;
        if !self.backend.hosts.is_empty() && self.backend.health_check_interval_ms == 0 {
            return Err("[backend] health_check_interval_ms must be at least 1".into());
        }
        if self.backend.max_auth_connections == 0 {
            return Err("[backend] max_auth_connections must be at least 1".into());
        }
        if self.pool.size == 0 {
            return Err("[pool] size must be at least 1".into());
        }
        if self.server.worker_threads > MAX_WORKER_THREADS {
            return Err(format!(
                "[server] worker_threads must be 0 (one per CPU core) to {MAX_WORKER_THREADS}"
            ));
        }
        if !self.pool.role_login.contains("{role}") {
            return Err("[pool] role_login must contain {role}".into());
        }
        if self.pool.isolation == Isolation::Role && self.backend.service_password.is_none() {
            return Err("[pool] isolation = \"role\" needs [backend] service_password (the per-role logins' passwords are derived from it)".into());
        }
        if !self.peers.is_empty() && self.server.peer_id == 0 {
            return Err("[[peers]] needs [server] peer_id (1 to 255)".into());
        }
        let mut ids = std::collections::HashSet::from([self.server.peer_id]);
        for peer in &self.peers {
            if peer.tls != peer.ca_file.is_some() {
                return Err(format!(
                    "[[peers]] id {}: tls = true and ca_file go together",
                    peer.id
                ));
            }
            if peer.id == 0 || !ids.insert(peer.id) {
                return Err(format!(
                    "[[peers]] id {} must be 1 to 255 and differ from [server] peer_id and every other peer's",
                    peer.id
                ));
            }
        }
        if let Some(instance) = &self.audit.instance {
            if !valid_instance(instance) {
                return Err("[audit] instance must be 1 to 64 of A-Z a-z 0-9 . _ : -".into());
            }
        }
        if let Some(ship) = &self.audit.ship {
            if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&ship.max_message_bytes) {
                return Err(format!(
                    "[audit.ship] max_message_bytes must be between {} and {}",
                    MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES
                ));
            }
            if ship.tls && ship.ca_file.is_none() {
                return Err("[audit.ship] tls = true needs ca_file".into());
            }
            if ship.cert_file.is_some() != ship.key_file.is_some() {
                return Err("[audit.ship] cert_file and key_file must be set together".into());
            }
            if !ship.tls && (ship.ca_file.is_some() || ship.cert_file.is_some()) {
                return Err("[audit.ship] ca_file, cert_file and key_file need tls = true".into());
            }
        }
        if self.audit.archive_dir.is_some()
            && (self.audit.archive_interval_s == 0
                || !(self.audit.archive_after_days >= 0.0 && self.audit.archive_after_days < 1e6))
        {
            return Err(
                "[audit] archive_interval_s must be at least 1 and archive_after_days 0 or more"
                    .into(),
            );
        }
        if self.audit.signing_key.is_some() && self.audit.ship.is_none() {
            return Err("[audit] signing_key signs the checkpoints that [audit.ship] sends: set [audit.ship] too".into());
        }
        if self.audit.checkpoint_database.is_some() && self.audit.checkpoint_interval_s == 0 {
            return Err("[audit] checkpoint_interval_s must be at least 1".into());
        }
        if self.identity.tag_key_refresh_ms < 1_000 {
            return Err("[identity] tag_key_refresh_ms must be at least 1000".into());
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err("[server] tls_cert and tls_key must be set together".into());
        }
        if self.server.max_message_size < 1024 {
            return Err("[server] max_message_size must be at least 1024".into());
        }
        let memory = self.server.large_message_memory;
        if memory != 0 && memory < self.server.max_message_size {
            // A message the budget can never hold would wait forever.
            return Err(
                "[server] large_message_memory must be 0 or at least max_message_size".into(),
            );
        }
        if self.identity.client_user_setting.is_empty()
            || !self.identity.client_user_setting.contains('.')
        {
            return Err(
                "[identity] client_user_setting must be a custom setting name like \"app.client_user\""
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/pgwarden/pgwarden.toml"), None)
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let c = parse("[backend]\nservice_user = \"svc\"\n").unwrap();
        assert_eq!(c.pool.mode, PoolMode::Transaction);
        assert_eq!(c.pool.size, 20);
        assert_eq!(c.audit.durability, Durability::Group);
        assert_eq!(c.identity.client_user_setting, "app.client_user");
        assert_eq!(c.audit.store, PathBuf::from("/etc/pgwarden/pgwarden-audit"));
        assert_eq!(
            c.identity.policy_dir,
            PathBuf::from("/etc/pgwarden/policies")
        );
    }

    #[test]
    fn peers_need_distinct_ids_and_one_of_our_own() {
        let base = "[backend]\nservice_user = \"svc\"\n";
        let peer = |id: u8| format!("[[peers]]\nid = {id}\naddress = \"10.0.0.{id}:6432\"\n");
        let ok = format!("[server]\npeer_id = 1\n{base}{}{}", peer(2), peer(3));
        assert_eq!(parse(&ok).unwrap().peers.len(), 2);
        for bad in [
            format!("{base}{}", peer(2)),
            format!("[server]\npeer_id = 1\n{base}{}", peer(1)),
            format!("[server]\npeer_id = 1\n{base}{}{}", peer(2), peer(2)),
            format!("[server]\npeer_id = 1\n{base}{}", peer(0)),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn worker_threads_are_bounded() {
        let with = |n: usize| {
            parse(&format!(
                "[server]\nworker_threads = {n}\n[backend]\nservice_user = \"svc\"\n"
            ))
        };
        assert_eq!(with(0).unwrap().server.worker_threads, 0);
        assert_eq!(with(1).unwrap().server.worker_threads, 1);
        let err = with(MAX_WORKER_THREADS + 1).unwrap_err();
        assert!(err.to_string().contains("worker_threads"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[backend]\nservice_user = \"svc\"\n[pool]\nsizee = 3\n").unwrap_err();
        assert!(err.to_string().contains("sizee"), "{err}");
    }

    #[test]
    fn env_password_overrides_file() {
        let c = Config::parse(
            "[backend]\nservice_user = \"svc\"\nservice_password = \"file\"\n",
            Path::new("x.toml"),
            Some("env".into()),
        )
        .unwrap();
        assert_eq!(c.backend.service_password.as_deref(), Some("env"));
    }

    #[test]
    fn the_example_config_in_the_repository_parses() {
        let text = include_str!("../pgwarden.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.server.listen.port(), 6432);
        assert_eq!(c.audit.flush_interval_ms, 5);
        assert!(!c.identity.allow_dynamic_sql);
    }

    #[test]
    fn checkpoint_interval_is_read_by_either_name() {
        for key in ["checkpoint_interval", "checkpoint_interval_s"] {
            let c = parse(&format!(
                "[backend]\nservice_user = \"s\"\n[audit]\n{key} = 7\n"
            ))
            .unwrap();
            assert_eq!(c.audit.checkpoint_interval_s, 7, "{key}");
        }
    }

    #[test]
    fn dynamic_sql_is_refused_unless_allowed() {
        let c = parse("[backend]\nservice_user = \"svc\"\n").unwrap();
        assert!(!c.identity.allow_dynamic_sql);
        let c = parse("[backend]\nservice_user = \"svc\"\n[identity]\nallow_dynamic_sql = true\n")
            .unwrap();
        assert!(c.identity.allow_dynamic_sql);
        assert!(parse(
            "[backend]\nservice_user = \"svc\"\n[identity]\nallow_dynamic_sql = \"yes\"\n"
        )
        .is_err());
    }

    #[test]
    fn large_message_memory_holds_a_largest_message_or_is_unlimited() {
        let with = |memory: &str| {
            let toml = "[server]\nmax_message_size = 2048\nlarge_message_memory = ";
            parse(&format!(
                "{toml}{memory}\n[backend]\nservice_user = \"s\"\n"
            ))
        };
        assert!(with("2047").is_err());
        assert!(with("2048").is_ok() && with("0").is_ok());
    }

    #[test]
    fn missing_service_user_is_an_error() {
        assert!(parse("[backend]\nhost = \"h\"\n").is_err());
        assert!(parse("[backend]\nservice_user = \"s\"\n[pool]\nsize = 0\n").is_err());
    }
}
