//! Cancel keys: the gateway hands each client its own random
//! `BackendKeyData` and maps it to whichever server connection serves the
//! client at the moment a `CancelRequest` arrives.
//!
//! Invariant: a cancel is forwarded only while the key's client has a
//! request running on its bound backend, and that backend is not handed to
//! anyone else until PostgreSQL has taken every cancel forwarded for it, so
//! a cancel can never reach a connection serving someone else. (The
//! statement may still finish while the cancel is in flight, a race
//! PostgreSQL itself has; the cancel then finds the backend idle and is
//! ignored, or hits this same client's next statement.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The backend a client is bound to, as far as cancelling goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// One client's cancel slot.
#[derive(Debug)]
pub struct CancelSlot {
    state: Mutex<SlotState>,
    /// Woken when the last cancel in flight has been taken.
    settled: tokio::sync::Notify,
    /// Ended by an admin (console KILL).
    kill: super::latch::Latch,
    /// The target session's identity (user, role, database, address,
    /// application name), for the audit record of a cancel.
    pub record: crate::audit::Event,
}

#[derive(Debug, Default)]
struct SlotState {
    backend: Option<BackendKey>,
    /// Since when the client has had a request on `backend` that the
    /// server has not finished answering (none: nothing running).
    running: Option<std::time::Instant>,
    /// Cancels forwarded to `backend` that PostgreSQL has not taken yet.
    in_flight: usize,
    /// A cancel to `backend` ended without PostgreSQL confirming it took it
    /// (timed out, failed midway, abandoned): it may still arrive, so the
    /// backend must not serve anyone else.
    unconfirmed: bool,
}

impl CancelSlot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bind(&self, key: BackendKey) {
        let mut state = self.state();
        state.backend = Some(key);
        state.running = None;
    }

    /// Whether the client has a request running on its backend.
    pub fn set_running(&self, running: bool) {
        let mut state = self.state();
        state.running = match running {
            true => state.running.or_else(|| Some(std::time::Instant::now())),
            false => None,
        };
    }

    /// The backend is about to go back to the pool: no new cancel may
    /// start, and those in flight are waited for (up to a few seconds).
    /// Whether the backend may serve someone else: false when a cancel to
    /// it is still in flight, or ended unconfirmed, since it could still
    /// arrive and cancel the next client's statement (destroy it instead).
    pub async fn unbind(&self) -> bool {
        {
            let mut state = self.state();
            state.backend = None;
            state.running = None;
            if state.in_flight == 0 {
                return !std::mem::take(&mut state.unconfirmed);
            }
        }
        let wait = async {
            loop {
                let notified = self.settled.notified();
                if self.state().in_flight == 0 {
                    return;
                }
                notified.await;
            }
        };
        let settled = tokio::time::timeout(std::time::Duration::from_secs(5), wait)
            .await
            .is_ok();
        let unconfirmed = std::mem::take(&mut self.state().unconfirmed);
        settled && !unconfirmed
    }

    /// The backend to cancel, if the client has a request running on it,
    /// with the guard that ends the cancel: [`InFlight::confirmed`] once
    /// PostgreSQL has taken it; dropped otherwise (the backend is then
    /// destroyed when it leaves the client).
    pub fn begin_cancel(self: &Arc<Self>) -> Option<(BackendKey, InFlight)> {
        let mut state = self.state();
        let key = state.backend.filter(|_| state.running.is_some())?;
        state.in_flight += 1;
        Some((
            key,
            InFlight {
                slot: self.clone(),
                confirmed: false,
            },
        ))
    }

    fn end_cancel(&self, confirmed: bool) {
        let mut state = self.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        state.unconfirmed |= !confirmed;
        if state.in_flight == 0 {
            self.settled.notify_waiters();
        }
    }

    /// Ends the session (console KILL): its loop sees [`CancelSlot::killed`].
    pub fn kill(&self) {
        self.kill.fire();
    }

    /// Completes once the session was killed.
    pub async fn killed(&self) {
        self.kill.fired().await
    }

    /// The backend the client is bound to (for the gateway's own cancels).
    pub fn backend(&self) -> Option<BackendKey> {
        self.state().backend
    }
}

/// Every live client's key.
#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
    /// This gateway's `[server] peer_id`, in bits 23..31 of every pid it
    /// issues (0: no peers).
    peer_id: u8,
}

/// A cancel on its way to PostgreSQL; ends when dropped.
pub struct InFlight {
    slot: Arc<CancelSlot>,
    confirmed: bool,
}

impl InFlight {
    /// PostgreSQL took the cancel (it closed the cancel connection).
    pub fn confirmed(mut self) {
        self.confirmed = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot.end_cancel(self.confirmed);
    }
}

/// The `peer_id` of the gateway that issued a key's pid.
pub fn issuer(pid: i32) -> u8 {
    ((pid >> 23) & 0xff) as u8
}

impl CancelRegistry {
    /// A registry whose keys name gateway `peer_id`.
    pub fn new(peer_id: u8) -> CancelRegistry {
        CancelRegistry {
            peer_id,
            ..CancelRegistry::default()
        }
    }

    /// This gateway's peer id (0: no peers).
    pub fn peer_id(&self) -> u8 {
        self.peer_id
    }

    /// Issues a fresh random key for a new client.
    pub fn register(&self, record: crate::audit::Event) -> (i32, i32, Arc<CancelSlot>) {
        let slot = Arc::new(CancelSlot {
            record,
            state: Mutex::default(),
            settled: tokio::sync::Notify::new(),
            kill: Default::default(),
        });
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Above Linux's largest pid (2^22): `pg_terminate_backend` or
            // `pg_cancel_backend` of the pid a client was given can never
            // reach a real backend.
            // With peers, bits 23..31 name this gateway, so a cancel that
            // lands on a peer can be sent back here.
            let pid = match self.peer_id {
                0 => (rand::random::<i32>() & 0x7fff_ffff) | 0x0040_0000,
                id => (i32::from(id) << 23) | (rand::random::<i32>() & 0x003f_ffff) | 0x0040_0000,
            };
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

    /// Every client session now: what its records name, whether it has a
    /// request running, and the server connection it is bound to.
    pub fn sessions(
        &self,
    ) -> Vec<(
        crate::audit::Event,
        Option<std::time::Duration>,
        Option<BackendKey>,
    )> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .values()
            .map(|slot| {
                let state = slot.state();
                let running = state.running.map(|since| since.elapsed());
                (slot.record.clone(), running, state.backend)
            })
            .collect()
    }

    /// Ends the session with this id (console KILL); whether there was one.
    pub fn kill(&self, session_id: &str) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let found = slots
            .values()
            .filter(|slot| slot.record.session_id.as_deref() == Some(session_id))
            .inspect(|slot| slot.kill())
            .count();
        found > 0
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

    #[tokio::test]
    async fn keys_map_to_bound_backend_only_while_running() {
        let reg = CancelRegistry::default();
        let peer = CancelRegistry::new(200);
        for _ in 0..100 {
            let (pid, _, _) = peer.register(crate::audit::Event::new(crate::audit::Kind::Cancel));
            assert_eq!(issuer(pid), 200);
            assert!(pid >= 0x0040_0000, "above every real pid");
        }
        let mut record = crate::audit::Event::new(crate::audit::Kind::Cancel);
        record.session_id = Some("s1".into());
        let (pid, secret, slot) = reg.register(record);
        assert!(reg.lookup(pid, secret).unwrap().begin_cancel().is_none());
        slot.bind(BackendKey { pid: 42, secret: 7 });
        assert!(slot.begin_cancel().is_none(), "nothing running");
        slot.set_running(true);
        let (key, in_flight) = reg.lookup(pid, secret).unwrap().begin_cancel().unwrap();
        assert_eq!(key, BackendKey { pid: 42, secret: 7 });
        // Unbinding waits for the cancel in flight.
        let unbinding = {
            let slot = slot.clone();
            tokio::spawn(async move { slot.unbind().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!unbinding.is_finished());
        assert!(
            slot.begin_cancel().is_none(),
            "no new cancel once unbinding"
        );
        in_flight.confirmed();
        assert!(
            unbinding.await.unwrap(),
            "a confirmed cancel: the backend may serve others"
        );
        // A cancel that ends unconfirmed (timed out, abandoned): the
        // backend may not serve anyone else.
        slot.bind(BackendKey { pid: 43, secret: 8 });
        slot.set_running(true);
        let (_, in_flight) = slot.begin_cancel().unwrap();
        drop(in_flight);
        assert!(
            !slot.unbind().await,
            "an unconfirmed cancel taints the backend"
        );
        slot.bind(BackendKey { pid: 44, secret: 9 });
        assert!(slot.unbind().await, "the next backend is clean");
        assert!(reg.lookup(pid, secret.wrapping_add(1)).is_none());
        reg.unregister(pid, secret);
        assert!(reg.lookup(pid, secret).is_none());
    }
}
