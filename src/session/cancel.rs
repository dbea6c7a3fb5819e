//! Cancel keys: the gateway hands each client its own random
//! `BackendKeyData` and maps it to whichever server connection serves the
//! client at the moment a `CancelRequest` arrives.
//!
//! Invariant: a key maps to a backend only while that backend is bound to the
//! key's client, so a cancel can never reach a connection serving someone
//! else (short of the unavoidable race where the statement finishes while
//! the cancel is in flight, which PostgreSQL itself has too).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The backend a client is bound to, as far as cancelling goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// One client's cancel slot.
#[derive(Debug, Default)]
pub struct CancelSlot {
    backend: Mutex<Option<BackendKey>>,
    /// Session id, for the audit record of a cancel.
    pub session_id: String,
}

impl CancelSlot {
    pub fn bind(&self, key: BackendKey) {
        *self.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    pub fn unbind(&self) {
        *self.backend.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn backend(&self) -> Option<BackendKey> {
        *self.backend.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every live client's key.
#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

impl CancelRegistry {
    /// Issues a fresh random key for a new client.
    pub fn register(&self, session_id: &str) -> (i32, i32, Arc<CancelSlot>) {
        let slot = Arc::new(CancelSlot {
            backend: Mutex::new(None),
            session_id: session_id.to_string(),
        });
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            let secret = rand::random::<i32>();
            if pid != 0 && !slots.contains_key(&(pid, secret)) {
                slots.insert((pid, secret), slot.clone());
                return (pid, secret, slot);
            }
        }
    }

    pub fn unregister(&self, pid: i32, secret: i32) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(pid, secret));
    }

    /// The slot for a key a client presented, if it is one we issued.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<Arc<CancelSlot>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, secret))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_bound_backend_only() {
        let reg = CancelRegistry::default();
        let (pid, secret, slot) = reg.register("s1");
        assert!(reg.lookup(pid, secret).unwrap().backend().is_none());
        slot.bind(BackendKey { pid: 42, secret: 7 });
        assert_eq!(
            reg.lookup(pid, secret).unwrap().backend(),
            Some(BackendKey { pid: 42, secret: 7 })
        );
        assert!(reg.lookup(pid, secret.wrapping_add(1)).is_none());
        reg.unregister(pid, secret);
        assert!(reg.lookup(pid, secret).is_none());
    }
}
