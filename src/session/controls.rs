//! What an operator changes in a running gateway: the settings a reload
//! (SIGHUP, console RELOAD) applies at once ([`Live`]), the reload itself,
//! and the console's PAUSE and SHUTDOWN.

use std::sync::Arc;

use super::Shared;
use crate::config::Config;
use crate::identity::policy::Policy;

/// The settings SIGHUP can change for running sessions too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub client_idle_timeout_ms: u64,
    pub idle_in_transaction_timeout_ms: u64,
    pub query_timeout_ms: u64,
    pub client_write_timeout_ms: u64,
    pub verify: crate::config::VerifyMode,
    pub log_parameters: bool,
    /// Who may open the admin console, and where their logins are checked.
    pub admin_users: Vec<String>,
    pub admin_auth_database: String,
}

impl Live {
    pub fn from_config(config: &Config) -> Live {
        Live {
            client_idle_timeout_ms: config.server.client_idle_timeout_ms,
            idle_in_transaction_timeout_ms: config.server.idle_in_transaction_timeout_ms,
            query_timeout_ms: config.server.query_timeout_ms,
            client_write_timeout_ms: config.server.client_write_timeout_ms,
            verify: config.identity.verify,
            log_parameters: config.audit.log_parameters,
            admin_users: config.admin.users.clone(),
            admin_auth_database: config.admin.auth_database.clone(),
        }
    }
}

/// A section of the configuration as text, to tell whether it changed.
type Shown = fn(&Config) -> String;

impl Shared {
    /// Waits while the console has paused the pools.
    pub async fn while_paused(&self) {
        let mut paused = self.paused.subscribe();
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
    }

    /// SIGHUP: re-reads the config file and the policies. On any error
    /// nothing changes and the error says why. The timeouts, `verify` and
    /// `log_parameters` apply at once, to running sessions too; new logins
    /// use the new policy (sessions keep their role). Returns the keys that
    /// changed but need a restart.
    pub fn reload(&self, path: &std::path::Path) -> Result<Vec<&'static str>, String> {
        let config = Config::load(path).map_err(|e| e.to_string())?;
        let policy = Policy::load_dir(&config.identity.policy_dir).map_err(|e| e.to_string())?;
        let old = &self.config;
        let mut restart = Vec::new();
        let mut check = |changed: bool, key: &'static str| {
            if changed {
                restart.push(key);
            }
        };
        check(old.server.listen != config.server.listen, "server.listen");
        check(
            old.server.tls_cert != config.server.tls_cert,
            "server.tls_cert",
        );
        check(
            old.backend.address() != config.backend.address(),
            "backend host/port",
        );
        check(
            old.backend.service_user != config.backend.service_user,
            "backend.service_user",
        );
        // Every pool key: the pools are built at start.
        check(old.pool != config.pool, "pool");
        check(
            (old.identity.signed_tag, &old.identity.tag_reader)
                != (config.identity.signed_tag, &config.identity.tag_reader)
                || old.identity.tag_key_refresh_ms != config.identity.tag_key_refresh_ms,
            "identity.signed_tag/tag_reader/tag_key_refresh_ms",
        );
        check(old.audit.store != config.audit.store, "audit.store");
        check(
            old.audit.durability != config.audit.durability,
            "audit.durability",
        );
        check(old.audit.enabled != config.audit.enabled, "audit.enabled");
        check(
            old.identity.allow_dynamic_sql != config.identity.allow_dynamic_sql,
            "identity.allow_dynamic_sql",
        );
        // Anything else that does not reload live (the policies, the
        // timeouts, verify, log_parameters and the console's admins do)
        // needs a restart: named by its section unless a key of it is.
        let settled = |c: &Config| {
            let mut c = c.clone();
            c.server.client_idle_timeout_ms = 0;
            c.server.idle_in_transaction_timeout_ms = 0;
            c.server.query_timeout_ms = 0;
            c.server.client_write_timeout_ms = 0;
            c.identity.verify = crate::config::VerifyMode::Off;
            c.identity.policy_dir = Default::default();
            c.audit.log_parameters = false;
            c.admin.users = Vec::new();
            c.admin.auth_database = String::new();
            c
        };
        let (was, now) = (settled(old), settled(&config));
        let sections: [(&'static str, Shown); 7] = [
            ("server", |c| format!("{:?}", c.server)),
            ("backend", |c| format!("{:?}", c.backend)),
            ("identity", |c| format!("{:?}", c.identity)),
            ("audit", |c| format!("{:?}", c.audit)),
            ("log", |c| format!("{:?}", c.log)),
            ("admin.listen", |c| format!("{:?}", c.admin)),
            ("peers", |c| format!("{:?}", c.peers)),
        ];
        for (section, shown) in sections {
            let named = restart.iter().any(|k: &&str| k.starts_with(section));
            if shown(&was) != shown(&now) && !named {
                restart.push(section);
            }
        }
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        *self.live.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Live::from_config(&config));
        Ok(restart)
    }
}
