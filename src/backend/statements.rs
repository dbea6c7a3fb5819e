//! The prepared statements a server connection holds on behalf of clients.
//!
//! In transaction pooling a client's named statement must exist on whichever
//! server connection serves it next. Statements are named on the server by a
//! digest of their `Parse` body (query text and parameter types), so clients
//! preparing the same statement share one server-side statement, and a name
//! can never refer to different text.
//!
//! Invariant: a key is in the cache only while the server is believed to hold
//! the statement; the cache is bounded in statements and in the bytes of
//! their `Parse` bodies, and the least recently used entries are evicted
//! (and closed on the server) to make room. A connection outlives the
//! clients whose statements it holds: without the bound in bytes, one
//! client's 512 statements of 1 MB each kept 1.5 GB of PostgreSQL's memory
//! per pooled connection after it left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// Server-side statements kept per connection before the oldest is closed.
pub const CAPACITY: usize = 512;

/// Bytes of `Parse` bodies (query text, parameter types) kept per
/// connection before the oldest statements are closed. PostgreSQL holds
/// about three times a statement's text for it (text, parse tree, plan).
pub const CAPACITY_BYTES: usize = 16 * 1024 * 1024;

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
    /// When each statement was last used, and the bytes of its `Parse` body.
    last_used: HashMap<u128, (u64, usize)>,
    /// The bytes of all of them.
    bytes: usize,
    clock: u64,
    uncertain: bool,
}

impl StatementCache {
    /// Whether the server holds `key`; marks it used.
    pub fn touch(&mut self, key: u128) -> bool {
        self.clock += 1;
        match self.last_used.get_mut(&key) {
            Some((t, _)) => {
                *t = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records that the server now holds `key`, whose `Parse` body is
    /// `bytes` long; returns the keys evicted to make room, oldest first,
    /// which the caller must close on the server. The new statement itself
    /// is never evicted, however long.
    pub fn insert(&mut self, key: u128, bytes: usize) -> Vec<u128> {
        self.clock += 1;
        self.remove(key);
        let mut evicted = Vec::new();
        while !self.last_used.is_empty()
            && (self.last_used.len() >= CAPACITY || self.bytes + bytes > CAPACITY_BYTES)
        {
            let oldest = self
                .last_used
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| *k)
                .expect("not empty");
            self.remove(oldest);
            evicted.push(oldest);
        }
        self.last_used.insert(key, (self.clock, bytes));
        self.bytes += bytes;
        evicted
    }

    pub fn remove(&mut self, key: u128) {
        if let Some((_, bytes)) = self.last_used.remove(&key) {
            self.bytes -= bytes;
        }
    }

    pub fn clear(&mut self) {
        self.last_used.clear();
        self.bytes = 0;
        self.uncertain = false;
    }

    /// A client statement may have deallocated some of our statements
    /// behind our back (`DEALLOCATE` reached the server). Forget them all;
    /// until the connection is reset, every `Parse` of a shared statement is
    /// preceded by a `Close` of the same name (closing a statement that does
    /// not exist is not an error), so a survivor cannot make it fail.
    pub fn mark_uncertain(&mut self) {
        self.last_used.clear();
        self.bytes = 0;
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
            assert_eq!(c.insert(k, 10), vec![]);
        }
        assert!(c.touch(0));
        assert_eq!(c.insert(10_000, 10), vec![1]);
        assert!(!c.touch(1));
        assert_eq!(c.len(), CAPACITY);
        // Inserting a statement it holds evicts nothing.
        assert_eq!(c.insert(10_000, 10), vec![]);
    }

    #[test]
    fn the_bytes_kept_are_bounded_too() {
        let mut c = StatementCache::default();
        let mb = 1024 * 1024;
        for k in 0..16 {
            assert_eq!(c.insert(k, mb), vec![]);
        }
        assert!(c.touch(0));
        // 3 MB more: the three oldest but the one just used go.
        assert_eq!(c.insert(100, 3 * mb), vec![1, 2, 3]);
        assert_eq!(c.bytes, CAPACITY_BYTES);
        c.remove(100);
        assert_eq!((c.bytes, c.len()), (13 * mb, 13));
        // A statement longer than the bound is kept alone.
        let evicted = c.insert(200, CAPACITY_BYTES + 1);
        assert_eq!((evicted.len(), c.len(), c.touch(200)), (13, 1, true));
        c.mark_uncertain();
        assert_eq!((c.bytes, c.len()), (0, 0));
    }
}
