//! The signed client tag: the value pgwarden gives the client-user setting
//! when the database holds a tag key (`pgwarden migrate` creates one).
//!
//! The value is `<client name>.<key id><nonce><mac>`, the last three in hex
//! (8 + 32 + 64 digits), where the MAC is HMAC-SHA-256 under the database's
//! tag key over the client name, the role, the backend's process id and
//! start time (so the value is good on one backend process only, not on a
//! later one that reuses the pid), the key id and a fresh nonce. `pgwarden.client_user()` (SECURITY DEFINER) recomputes it
//! with PostgreSQL's built-in `sha256()` from the HMAC pads stored beside
//! the key, and raises 42501 for a forged, copied or missing value.
//!
//! Invariants: no login a client can reach holds a key. A key is derived
//! from the service password, the database's name and the key id
//! ([`derive_key`]); the database keeps only HMAC's padded keys, readable by
//! the table's owner (and `pgwarden.client_user()`, which runs as it). The
//! gateway learns which key id signs from a login of its own
//! (`[identity] tag_reader`, member of no role, password derived from the
//! service password, granted only the columns `id` and `retire_at`), over
//! a short-lived connection. That login runs no code a client could have
//! written: its search path is `pg_catalog` only, and it reads the table
//! only once the catalog shows a plain table that a superuser owns, in a
//! schema a superuser owns (so no one else can attach code to it or swap
//! it between the check and the read). A database whose key id cannot be
//! read gets the plain client name, with a warning, as before signed tags.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::service::{self, ServiceLogin};
use crate::backend::conn::{BackendError, ServerConn};
use crate::config::{BackendConfig, IdentityConfig};
use crate::tls::BackendTls;

/// What follows the client name in a signed value: `.`, the key id (8 hex
/// digits), the nonce (32) and the MAC (64).
pub const SUFFIX_LEN: usize = 1 + 8 + 32 + 64;
/// Separates this MAC's input from every other use of the key.
const DOMAIN: &[u8] = b"pgwarden-tag-v1\0";
/// HMAC-SHA-256's block size: the pads are this long.
const BLOCK: usize = 64;
/// How soon a failed key read is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One database's signing key.
#[derive(Clone)]
pub struct TagKey {
    pub id: i32,
    key: Arc<[u8]>,
}

impl std::fmt::Debug for TagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagKey").field("id", &self.id).finish()
    }
}

impl TagKey {
    pub fn new(id: i32, key: &[u8]) -> TagKey {
        TagKey {
            id,
            key: Arc::from(key),
        }
    }

    /// The value of the client-user setting for `name` acting as `role`
    /// on `backend`.
    pub fn sign(&self, name: &str, role: &str, backend: Backend, nonce: [u8; 16]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key size");
        mac.update(&message(name, role, backend, self.id, &nonce));
        let mac: [u8; 32] = mac.finalize().into_bytes().into();
        format!(
            "{name}.{:08x}{}{}",
            self.id as u32,
            hex::encode(nonce),
            hex::encode(mac)
        )
    }

    /// Signs with a fresh random nonce.
    pub fn sign_fresh(&self, name: &str, role: &str, backend: Backend) -> String {
        self.sign(name, role, backend, rand::random())
    }
}

/// Which backend process a value is good on: its pid and its start time
/// (microseconds since the Unix epoch, as PostgreSQL reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub pid: i32,
    pub started_us: i64,
}

/// The MAC's input: domain, name, NUL, role, NUL (names never hold one),
/// pid, start time, key id, nonce. The SQL side builds the same bytes.
fn message(name: &str, role: &str, backend: Backend, key_id: i32, nonce: &[u8; 16]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + name.len() + role.len() + 34);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(name.as_bytes());
    m.push(0);
    m.extend_from_slice(role.as_bytes());
    m.push(0);
    m.extend_from_slice(&backend.pid.to_be_bytes());
    m.extend_from_slice(&backend.started_us.to_be_bytes());
    m.extend_from_slice(&key_id.to_be_bytes());
    m.extend_from_slice(nonce);
    m
}

/// The key `id` of `database`: HMAC-SHA-256 under the service password
/// (`secret`), so the gateway and `pgwarden migrate` agree on it and the
/// database never stores it.
pub fn derive_key(secret: &str, database: &str, id: i32) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key size");
    mac.update(b"pgwarden-tag-key-v1\0");
    mac.update(database.as_bytes());
    mac.update(b"\0");
    mac.update(&id.to_be_bytes());
    mac.finalize().into_bytes().into()
}

/// HMAC's inner and outer padded keys, stored instead of the key so SQL
/// can compute `sha256(opad || sha256(ipad || message))` without bit
/// operations on `bytea`.
pub fn pads(key: &[u8]) -> (Vec<u8>, Vec<u8>) {
    assert!(key.len() <= BLOCK, "tag keys are shorter than a block");
    let mut ipad = vec![0x36u8; BLOCK];
    let mut opad = vec![0x5cu8; BLOCK];
    for (i, b) in key.iter().enumerate() {
        ipad[i] ^= b;
        opad[i] ^= b;
    }
    (ipad, opad)
}

/// The SQL of `pgwarden.client_user()` reading `setting`: verifies the
/// signed value and returns the client name. A database without keys keeps
/// the plain tag (the function returns the setting, or NULL).
pub fn client_user_function(setting: &str) -> String {
    let setting = setting.replace('\'', "''");
    format!(
        r#"CREATE OR REPLACE FUNCTION pgwarden.client_user() RETURNS text
    LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v text := pg_catalog.current_setting('{setting}', true);
    n int;
    kid int;
    k record;
    msg bytea;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgwarden.tag_keys) THEN
        RETURN pg_catalog.nullif(v, '');
    END IF;
    IF v IS NULL OR v = '' THEN
        RAISE EXCEPTION 'no pgwarden client tag in this session'
            USING ERRCODE = '42501';
    END IF;
    n := pg_catalog.length(v);
    IF n <= {suffix} OR pg_catalog.substr(v, n - {dot}, 1) <> '.'
       OR pg_catalog.right(v, {hex}) !~ '^[0-9a-f]+$' THEN
        RAISE EXCEPTION 'the pgwarden client tag is not signed'
            USING ERRCODE = '42501';
    END IF;
    kid := ('x' || pg_catalog.substr(v, n - {kid_at}, 8))::bit(32)::int;
    SELECT t.ipad, t.opad INTO k FROM pgwarden.tag_keys t
     WHERE t.id = kid AND (t.retire_at IS NULL OR t.retire_at > pg_catalog.now());
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the pgwarden client tag names no current key'
            USING ERRCODE = '42501';
    END IF;
    msg := '\x{domain}'::bytea
        || pg_catalog.convert_to(pg_catalog.left(v, n - {suffix}), 'UTF8') || '\x00'::bytea
        || pg_catalog.convert_to(pg_catalog.current_setting('role'), 'UTF8') || '\x00'::bytea
        || pg_catalog.int4send(pg_catalog.pg_backend_pid())
        || pg_catalog.int8send((SELECT (EXTRACT(epoch FROM a.backend_start) * 1000000)::int8
              FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a))
        || pg_catalog.int4send(kid)
        || pg_catalog.decode(pg_catalog.substr(v, n - {nonce_at}, 32), 'hex');
    IF pg_catalog.sha256(k.opad || pg_catalog.sha256(k.ipad || msg))
       <> pg_catalog.decode(pg_catalog.right(v, 64), 'hex') THEN
        RAISE EXCEPTION 'the pgwarden client tag was forged or belongs to another session'
            USING ERRCODE = '42501';
    END IF;
    RETURN pg_catalog.left(v, n - {suffix});
END
$fn$"#,
        suffix = SUFFIX_LEN,
        dot = SUFFIX_LEN - 1,
        hex = SUFFIX_LEN - 1,
        kid_at = SUFFIX_LEN - 2,
        nonce_at = SUFFIX_LEN - 10,
        domain = hex::encode(DOMAIN),
    )
}

/// A database's signing key as last read.
struct Cached {
    key: Option<TagKey>,
    read_at: Instant,
    /// When to read again.
    fresh_for: Duration,
}

/// The signing keys of the databases this gateway serves, read by the tag
/// reader login when first needed and again every `tag_key_refresh_ms`.
pub struct TagKeys {
    /// `None`: signed tags are off (configuration, or no service password
    /// to derive keys and the reader's password from).
    reader: Option<(String, String)>,
    /// The service password, which keys are derived from.
    secret: String,
    refresh: Duration,
    backend: Arc<BackendConfig>,
    tls: Option<BackendTls>,
    cache: Mutex<HashMap<String, Cached>>,
    /// One read at a time per database.
    reading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl TagKeys {
    pub fn new(
        identity: &IdentityConfig,
        backend: Arc<BackendConfig>,
        tls: Option<BackendTls>,
    ) -> TagKeys {
        let reader = match (&backend.service_password, identity.signed_tag) {
            (Some(secret), true) => Some((
                identity.tag_reader.clone(),
                crate::auth::logins::derived_password(secret, &identity.tag_reader),
            )),
            (None, true) => {
                tracing::warn!("signed client tags need [backend] service_password (the tag reader's password is derived from it); the plain tag is set");
                None
            }
            (_, false) => None,
        };
        TagKeys {
            reader,
            secret: backend.service_password.clone().unwrap_or_default(),
            refresh: Duration::from_millis(identity.tag_key_refresh_ms),
            backend,
            tls,
            cache: Mutex::new(HashMap::new()),
            reading: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, database: &str) -> Option<Option<TagKey>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let c = cache.get(database)?;
        (c.read_at.elapsed() < c.fresh_for).then(|| c.key.clone())
    }

    /// The key to sign with in `database`, or `None` for the plain tag.
    pub async fn signing_key(&self, database: &str) -> Option<TagKey> {
        let (user, password) = self.reader.as_ref()?;
        if let Some(key) = self.cached(database) {
            return key;
        }
        // Boxed: the read is rare and its future large, and a session's
        // futures hold what they await (see `audit::auditor::queue`).
        Box::pin(self.read_key(user, password, database)).await
    }

    /// Reads `database`'s key (one reader per database at a time) and
    /// caches it.
    async fn read_key(&self, user: &str, password: &str, database: &str) -> Option<TagKey> {
        let one = {
            let mut reading = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            reading.entry(database.to_string()).or_default().clone()
        };
        let _one = one.lock().await;
        if let Some(key) = self.cached(database) {
            return key;
        }
        let previous = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.get(database).map(|c| c.key.clone())
        };
        let (key, fresh_for) = match self.read(user, password, database).await {
            Ok(id) => {
                if id.is_none() && previous.is_none() {
                    tracing::warn!(database, "the database holds no pgwarden tag key (run pgwarden migrate); the plain client tag is set");
                }
                let key = id.map(|id| TagKey::new(id, &derive_key(&self.secret, database, id)));
                (key, self.refresh)
            }
            Err(e) => {
                // A key read before stays in use until a read succeeds.
                let what = if matches!(previous, Some(Some(_))) {
                    "the key read before stays in use"
                } else {
                    "the plain client tag is set"
                };
                tracing::warn!(
                    database,
                    "cannot read the pgwarden tag key id as \"{user}\" ({e}); {what}"
                );
                (previous.flatten(), RETRY_AFTER)
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(
            database.to_string(),
            Cached {
                key: key.clone(),
                read_at: Instant::now(),
                fresh_for,
            },
        );
        key
    }

    /// Reads the id of the signing key over a connection of its own.
    async fn read(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<Option<i32>, BackendError> {
        let timeout = Duration::from_millis(self.backend.connect_timeout_ms.saturating_mul(2));
        let work = async {
            let who = ServiceLogin {
                user,
                password: Some(password),
                database,
            };
            let mut conn = service::connect_as(&self.backend, self.tls.as_ref(), &who).await?;
            let key = read_key(&mut conn, database).await;
            conn.close().await;
            key
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::ConnectTimeout(self.backend.address())),
        }
    }
}

/// Only `pg_catalog` is searched (a database's default search path could
/// put an operator of its own first); then whether `pgwarden.tag_keys` is
/// the plain table migrate makes, owned by a superuser in a schema a
/// superuser owns: nothing a client wrote (an index predicate, a rule, a
/// policy, statistics) can be attached to it, nor can it be swapped before
/// the read.
///
/// A lock held on the table (a client's `CREATE RULE ... TO
/// pgwarden.tag_keys` waits for one before PostgreSQL checks ownership, and
/// everyone queues behind it) makes the read give up within a second
/// instead of leaving a waiting backend behind.
const KEY_TABLE_CHECK: &str = "SET lock_timeout = 1000; SET statement_timeout = 5000; \
    SET search_path = pg_catalog, pg_temp; \
    SELECT c.relkind = 'r' AND NOT c.relrowsecurity AND NOT c.relhassubclass \
       AND (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = c.relowner) \
       AND (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = n.nspowner) \
       AND (SELECT count(*) FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
               AND ((a.attname = 'id' AND a.atttypid = 'pg_catalog.int4'::pg_catalog.regtype) \
                 OR (a.attname = 'retire_at' AND a.atttypid = 'pg_catalog.timestamptz'::pg_catalog.regtype))) = 2 \
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.oid = pg_catalog.to_regclass('pgwarden.tag_keys')";

/// The current keys; the newest signs.
const KEY_IDS: &str = "SELECT id FROM ONLY pgwarden.tag_keys WHERE retire_at IS NULL";

/// The signing key's id in the reader's database: none when it has no key
/// table (a database `pgwarden migrate` has not prepared), an error when
/// the table is not what migrate (run by a superuser) makes.
async fn read_key(conn: &mut ServerConn, database: &str) -> Result<Option<i32>, BackendError> {
    match conn.simple_rows(KEY_TABLE_CHECK).await?.first() {
        None => return Ok(None),
        Some(row) if row.first() == Some(&Some("t".to_string())) => {}
        Some(_) => {
            return Err(BackendError::Auth(format!(
                "pgwarden.tag_keys in database \"{database}\" is not the plain table pgwarden migrate makes, owned by a superuser; it is not read"
            )))
        }
    }
    let rows = conn.simple_rows(KEY_IDS).await?;
    Ok(rows
        .iter()
        .filter_map(|row| row.first()?.as_deref()?.parse::<i32>().ok())
        .max())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    const B: Backend = Backend {
        pid: 4242,
        started_us: 1_764_520_000_123_456,
    };

    #[test]
    fn the_pads_compute_the_same_mac_as_hmac() {
        let key = TagKey::new(7, &[0xab; 32]);
        let nonce = [3u8; 16];
        let value = key.sign("alice", "analyst", B, nonce);
        let (ipad, opad) = pads(&[0xab; 32]);
        let msg = message("alice", "analyst", B, 7, &nonce);
        let inner = Sha256::new()
            .chain_update(&ipad)
            .chain_update(&msg)
            .finalize();
        let outer = Sha256::new()
            .chain_update(&opad)
            .chain_update(inner)
            .finalize();
        assert!(value.ends_with(&hex::encode(outer)), "{value}");
        assert!(value.starts_with("alice.00000007030303"), "{value}");
        assert_eq!(value.len(), "alice".len() + SUFFIX_LEN);
    }

    #[test]
    fn the_mac_binds_name_role_backend_key_and_nonce() {
        let key = TagKey::new(1, &[9; 32]);
        let mac = |v: String| v[v.len() - 64..].to_string();
        let base = mac(key.sign("alice", "analyst", B, [0; 16]));
        let later = Backend {
            started_us: B.started_us + 1,
            ..B
        };
        let other_pid = Backend { pid: 4243, ..B };
        for other in [
            key.sign("bob", "analyst", B, [0; 16]),
            key.sign("alice", "engineer", B, [0; 16]),
            key.sign("alice", "analyst", other_pid, [0; 16]),
            key.sign("alice", "analyst", later, [0; 16]),
            key.sign("alice", "analyst", B, [1; 16]),
            TagKey::new(2, &[9; 32]).sign("alice", "analyst", B, [0; 16]),
            TagKey::new(1, &[8; 32]).sign("alice", "analyst", B, [0; 16]),
            // The NUL between name and role: no shifting of bytes across.
            key.sign("alicea", "nalyst", B, [0; 16]),
        ] {
            assert_ne!(base, mac(other));
        }
    }

    #[test]
    fn a_name_with_dots_signs_and_splits_from_the_right() {
        let key = TagKey::new(1, &[1; 32]);
        let value = key.sign("svc.a.b", "r", B, [0; 16]);
        assert_eq!(&value[..value.len() - SUFFIX_LEN], "svc.a.b");
    }

    #[test]
    fn keys_are_derived_per_database_and_id() {
        let k = derive_key("s", "app", 1);
        assert_eq!(k, derive_key("s", "app", 1));
        assert_ne!(k, derive_key("s", "app", 2));
        assert_ne!(k, derive_key("s", "app2", 1));
        assert_ne!(k, derive_key("t", "app", 1));
    }
}
