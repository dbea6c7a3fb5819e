//! A session's identity as connection affinity matches it
//! ([`super::affinity`]): its pool, mapped role and client user, interned.
//!
//! Invariant: two keys are equal exactly when their parts are; the sessions
//! of one identity alive at once share one allocation, so that equality is
//! usually a pointer comparison; the map that shares them forgets an
//! identity once none of its sessions is alive, at the next sweep (it holds
//! at most 64 entries, or twice the identities alive at the last sweep).

use std::collections::HashMap;
use std::sync::Arc;

use super::PoolKey;

/// Whose connection, as affinity matches it: a pool's, carrying a (role,
/// client user) identity. A session gets it once ([`super::Pools::pool_for`]),
/// hashed, and shared with the other sessions of its identity
/// ([`Interned`]): each wait and release then clones a pointer, hashes one
/// number and compares two pointers, instead of cloning, hashing and
/// comparing four strings (at 20 clients on a pool of 4 those were about
/// 2,800 instructions per transaction). The hash is seeded per process, so
/// equal hashes of different identities cannot be chosen; two keys that are
/// not the same allocation are still compared in full.
#[derive(Clone, Debug)]
pub(super) struct IdentityKey(Arc<Hashed>);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct KeyParts {
    pub pool: PoolKey,
    pub role: Arc<str>,
    pub client_user: Arc<str>,
}

/// [`IdentityKey`]'s parts and their hash.
#[derive(Debug)]
struct Hashed {
    hash: u64,
    parts: KeyParts,
}

impl IdentityKey {
    /// The pool: (database, login).
    pub(super) fn pool(&self) -> &PoolKey {
        &self.0.parts.pool
    }
}

impl PartialEq for IdentityKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash && self.0.parts == other.0.parts)
    }
}

impl Eq for IdentityKey {}

impl std::hash::Hash for IdentityKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

/// The identity keys of the sessions alive, one allocation per identity.
/// Bounded by the identities of live sessions: an entry whose sessions are
/// all gone is dropped at the next sweep, and a sweep runs whenever the map
/// has doubled since the last one.
#[derive(Default)]
pub(super) struct Interned {
    keys: HashMap<KeyParts, std::sync::Weak<Hashed>, foldhash::quality::RandomState>,
    hasher: foldhash::quality::RandomState,
    sweep_at: usize,
}

impl Interned {
    pub(super) fn key(&mut self, parts: KeyParts) -> IdentityKey {
        if let Some(live) = self.keys.get(&parts).and_then(std::sync::Weak::upgrade) {
            return IdentityKey(live);
        }
        if self.keys.len() >= self.sweep_at {
            self.keys.retain(|_, key| key.strong_count() > 0);
            self.sweep_at = (2 * self.keys.len()).max(64);
        }
        let hash = std::hash::BuildHasher::hash_one(&self.hasher, &parts);
        let key = Arc::new(Hashed {
            hash,
            parts: parts.clone(),
        });
        self.keys.insert(parts, Arc::downgrade(&key));
        IdentityKey(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(role: &str, client_user: &str) -> KeyParts {
        KeyParts {
            pool: ("app".into(), "svc".into()),
            role: role.into(),
            client_user: client_user.into(),
        }
    }

    #[test]
    fn the_sessions_of_one_identity_share_one_key_and_others_do_not_match_it() {
        let mut interned = Interned::default();
        let alice = interned.key(parts("staff", "alice"));
        let again = interned.key(parts("staff", "alice"));
        assert!(
            Arc::ptr_eq(&alice.0, &again.0),
            "one allocation per identity"
        );
        let bob = interned.key(parts("staff", "bob"));
        let alice_as_admin = interned.key(parts("admin", "alice"));
        assert_ne!(alice, bob);
        assert_ne!(alice, alice_as_admin);
        // Another allocation of the same identity: still equal, by its parts.
        let copy = IdentityKey(Arc::new(Hashed {
            hash: alice.0.hash,
            parts: parts("staff", "alice"),
        }));
        assert_eq!(alice, copy);
        // Even a forged equal hash does not make different parts equal.
        let forged = IdentityKey(Arc::new(Hashed {
            hash: alice.0.hash,
            parts: parts("staff", "mallory"),
        }));
        assert_ne!(alice, forged);
    }

    #[test]
    fn keys_of_identities_whose_sessions_are_gone_are_swept() {
        let mut interned = Interned::default();
        let kept = interned.key(parts("staff", "kept"));
        for i in 0..1_000 {
            drop(interned.key(parts("staff", &format!("user{i}"))));
        }
        assert!(
            interned.keys.len() <= 128,
            "{} entries for 1 live identity",
            interned.keys.len()
        );
        let again = interned.key(parts("staff", "kept"));
        assert!(Arc::ptr_eq(&kept.0, &again.0), "a live key survives sweeps");
    }
}
