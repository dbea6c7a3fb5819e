//! The prepared statements a server connection holds on behalf of clients.
//!
//! In transaction pooling a client's named statement must exist on whichever
//! server connection serves it next. Statements are named on the server by a
//! digest of their `Parse` body (query text and parameter types), so clients
//! preparing the same statement share one server-side statement, and a name
//! can never refer to different text.
//!
//! Invariant: a key is in the cache only while the server is believed to hold
//! the statement; the cache is bounded, and the least recently used entry is
//! evicted (and closed on the server) to make room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// Server-side statements kept per connection before the oldest is closed.
pub const CAPACITY: usize = 512;

/// The server-side identity of a statement: 128 bits of SHA-256 of a
/// secret chosen at startup and the `Parse` body after the client's name.
/// The secret keeps a client from predicting the name another client's
/// statement will have (and preparing its own SQL under it first).
///
/// The key also covers the [stale epoch](found_stale) of the `Parse`: once
/// any connection has found a statement stale (DDL changed what it returns,
/// or a type it used is gone), a `Parse` of the same text names a new
/// server-side statement, prepared afresh on whichever connection serves
/// it, as a `Parse` on a direct connection gets a fresh plan; statements
/// parsed before keep theirs and get PostgreSQL's error, as directly.
pub fn key(parse_rest: &[u8]) -> u128 {
    static SECRET: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    let secret = SECRET.get_or_init(rand::random);
    let mut hasher = Sha256::new().chain_update(secret);
    let epoch = STALE_EPOCH.load(Ordering::Relaxed);
    if epoch > 0 {
        hasher.update(epoch.to_be_bytes());
    }
    let digest = hasher.chain_update(parse_rest).finalize();
    u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"))
}

/// Bumped each time a connection finds a shared statement stale; part of
/// every key made after ([`key`]).
static STALE_EPOCH: AtomicU64 = AtomicU64::new(0);

/// A connection found a shared statement stale: `Parse`s from now on get
/// fresh server-side statements everywhere ([`key`]).
pub fn found_stale() {
    STALE_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// The statement's name on every server connection.
pub fn server_name(key: u128) -> String {
    format!("pgwarden_{key:032x}")
}

#[derive(Debug, Default)]
pub struct StatementCache {
    last_used: HashMap<u128, u64>,
    clock: u64,
    uncertain: bool,
}

impl StatementCache {
    /// Whether the server holds `key`; marks it used.
    pub fn touch(&mut self, key: u128) -> bool {
        self.clock += 1;
        match self.last_used.get_mut(&key) {
            Some(t) => {
                *t = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records that the server now holds `key`; returns the key evicted to
    /// make room, which the caller must close on the server.
    pub fn insert(&mut self, key: u128) -> Option<u128> {
        self.clock += 1;
        let evicted = if self.last_used.len() >= CAPACITY && !self.last_used.contains_key(&key) {
            let oldest = self
                .last_used
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.last_used.remove(&k);
            }
            oldest
        } else {
            None
        };
        self.last_used.insert(key, self.clock);
        evicted
    }

    pub fn remove(&mut self, key: u128) {
        self.last_used.remove(&key);
    }

    pub fn clear(&mut self) {
        self.last_used.clear();
        self.uncertain = false;
    }

    /// A client statement may have deallocated some of our statements
    /// behind our back (`DEALLOCATE` reached the server). Forget them all;
    /// until the connection is reset, every `Parse` of a shared statement is
    /// preceded by a `Close` of the same name (closing a statement that does
    /// not exist is not an error), so a survivor cannot make it fail.
    pub fn mark_uncertain(&mut self) {
        self.last_used.clear();
        self.uncertain = true;
    }

    pub fn is_uncertain(&self) -> bool {
        self.uncertain
    }

    pub fn len(&self) -> usize {
        self.last_used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_body_same_name_different_body_different_name() {
        assert_eq!(key(b"SELECT 1\0\0\0"), key(b"SELECT 1\0\0\0"));
        assert_ne!(key(b"SELECT 1\0\0\0"), key(b"SELECT 2\0\0\0"));
        assert_ne!(
            key(b"SELECT $1\0\0\x01\0\0\0\x17"),
            key(b"SELECT $1\0\0\x01\0\0\0\x19")
        );
        assert_eq!(server_name(1).len(), "pgwarden_".len() + 32);
    }

    #[test]
    fn least_recently_used_is_evicted() {
        let mut c = StatementCache::default();
        for k in 0..CAPACITY as u128 {
            assert_eq!(c.insert(k), None);
        }
        assert!(c.touch(0));
        assert_eq!(c.insert(10_000), Some(1));
        assert!(!c.touch(1));
        assert_eq!(c.len(), CAPACITY);
    }
}
