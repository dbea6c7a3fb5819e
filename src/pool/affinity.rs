//! Identity affinity: a connection a session releases goes straight to a
//! session waiting for a connection under the same identity, when one
//! waits, instead of back to the pool's queue. The connection already
//! carries that identity, so the next transaction starts without the
//! identity assertion's round trip. With many users sharing a small pool,
//! most transactions would otherwise get a connection that last served
//! someone else.
//!
//! Invariants:
//! - affinity decides only *which* waiting session gets a connection; what
//!   the connection needs before it serves that session (a reset, an
//!   assertion) is still decided by its custody at binding, as for any
//!   connection;
//! - a connection passes from session to session at most [`MAX_HANDOFFS`]
//!   times in a row, then goes back to the pool's queue: sessions of other
//!   identities, waiting in that queue, are never starved;
//! - a connection is never lost: one offered to a waiter that has stopped
//!   waiting comes back to the caller.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// How many times in a row a connection may pass directly from session to
/// session before it goes back to the pool's queue.
pub const MAX_HANDOFFS: u32 = 8;

/// Sessions waiting for a connection, by identity.
pub struct Affinity<K, T> {
    waiting: Mutex<Waiting<K, T>>,
}

struct Waiting<K, T> {
    next_id: u64,
    by_key: HashMap<K, VecDeque<(u64, oneshot::Sender<T>)>>,
}

/// A session's place among the waiters; it receives a connection handed
/// over by [`Affinity::offer`].
pub struct Ticket<T> {
    id: u64,
    pub handed: oneshot::Receiver<T>,
}

impl<K: Eq + Hash + Clone, T> Default for Affinity<K, T> {
    fn default() -> Self {
        Affinity {
            waiting: Mutex::new(Waiting {
                next_id: 0,
                by_key: HashMap::new(),
            }),
        }
    }
}

impl<K: Eq + Hash + Clone, T> Affinity<K, T> {
    /// A session starts waiting for a connection under `key`.
    pub fn wait(&self, key: &K) -> Ticket<T> {
        let (tx, rx) = oneshot::channel();
        let mut waiting = self.lock();
        let id = waiting.next_id;
        waiting.next_id += 1;
        waiting
            .by_key
            .entry(key.clone())
            .or_default()
            .push_back((id, tx));
        Ticket { id, handed: rx }
    }

    /// The session stopped waiting (it got a connection from the pool, or
    /// gave up). A connection handed to it meanwhile is returned: the
    /// caller gives it back to the pool.
    pub fn leave(&self, key: &K, mut ticket: Ticket<T>) -> Option<T> {
        {
            let mut waiting = self.lock();
            if let Some(queue) = waiting.by_key.get_mut(key) {
                queue.retain(|(id, _)| *id != ticket.id);
                if queue.is_empty() {
                    waiting.by_key.remove(key);
                }
            }
        }
        ticket.handed.close();
        ticket.handed.try_recv().ok()
    }

    /// A session releases `conn`, which carries `key`'s identity and has
    /// passed directly between sessions `handoffs` times in a row: the
    /// longest-waiting session of that identity gets it. `Err(conn)` when
    /// none waits (or it has passed too often): it goes back to the pool.
    pub fn offer(&self, key: &K, conn: T, handoffs: u32) -> Result<(), T> {
        if handoffs >= MAX_HANDOFFS {
            return Err(conn);
        }
        let mut conn = conn;
        loop {
            let waiter = {
                let mut waiting = self.lock();
                let Some(queue) = waiting.by_key.get_mut(key) else {
                    return Err(conn);
                };
                let waiter = queue.pop_front();
                if queue.is_empty() {
                    waiting.by_key.remove(key);
                }
                waiter
            };
            let Some((_, tx)) = waiter else {
                return Err(conn);
            };
            match tx.send(conn) {
                Ok(()) => return Ok(()),
                // It stopped waiting in the meantime: the next one.
                Err(back) => conn = back,
            }
        }
    }

    /// Whether a session waits under `key`.
    pub fn waits(&self, key: &K) -> bool {
        self.lock().by_key.contains_key(key)
    }

    /// How many sessions wait.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock().by_key.values().map(VecDeque::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting<K, T>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_released_connection_goes_to_the_longest_waiter_of_its_identity() {
        let affinity: Affinity<&str, u32> = Affinity::default();
        let first = affinity.wait(&"alice");
        let second = affinity.wait(&"alice");
        let bob = affinity.wait(&"bob");
        assert_eq!(affinity.offer(&"alice", 7, 0), Ok(()));
        assert_eq!(first.handed.await, Ok(7));
        assert_eq!(affinity.offer(&"alice", 8, 0), Ok(()));
        assert_eq!(second.handed.await, Ok(8));
        // Nobody of alice's waits now: back to the pool.
        assert_eq!(affinity.offer(&"alice", 9, 0), Err(9));
        assert_eq!(affinity.leave(&"bob", bob), None);
        assert_eq!(affinity.waiting(), 0);
    }

    #[test]
    fn a_connection_goes_back_to_the_pool_after_its_handoffs() {
        let affinity: Affinity<&str, u32> = Affinity::default();
        let _waiter = affinity.wait(&"alice");
        assert_eq!(affinity.offer(&"alice", 1, MAX_HANDOFFS), Err(1));
        assert_eq!(affinity.waiting(), 1, "the waiter still waits");
    }

    #[test]
    fn a_waiter_that_left_is_skipped_and_nothing_is_lost() {
        let affinity: Affinity<&str, u32> = Affinity::default();
        let gone = affinity.wait(&"alice");
        drop(gone);
        let next = affinity.wait(&"alice");
        assert_eq!(affinity.offer(&"alice", 5, 0), Ok(()));
        // It got one from the pool at the same moment: the handed one
        // comes back to be returned.
        assert_eq!(affinity.leave(&"alice", next), Some(5));
        assert_eq!(affinity.offer(&"alice", 6, 0), Err(6));
    }
}
