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
//!   times in a row, and never to a session that started waiting
//!   [`FAIR_WAIT`] or more after the longest waiter, when that one is of
//!   another identity: it goes back to the pool's queue, which serves the
//!   longest waiter first. A handoff thus lets a session jump ahead of
//!   others by less than [`FAIR_WAIT`] (the wait itself may be long: with
//!   many sessions per connection every session waits, and a rule on the
//!   wait alone would end every handoff), and sessions of other identities
//!   are never starved;
//! - a connection is never lost: one offered to a waiter that has stopped
//!   waiting comes back to the caller, and a waiter that went away without
//!   [`Affinity::leave`] (its task was dropped) is forgotten at the next
//!   offer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How many times in a row a connection may pass directly from session to
/// session before it goes back to the pool's queue.
pub const MAX_HANDOFFS: u32 = 32;

/// How far a handoff may let a session jump ahead of the longest waiter of
/// another identity: by less than this much waiting time.
pub const FAIR_WAIT: Duration = Duration::from_millis(10);

/// Sessions waiting for a connection, by identity.
pub struct Affinity<K, T> {
    waiting: Mutex<Waiting<K, T>>,
}

struct Waiting<K, T> {
    next_id: u64,
    /// Every waiter by ticket id: ids grow, so the first waits longest.
    order: BTreeMap<u64, Waiter<K, T>>,
    /// The ids of each identity's waiters, longest-waiting first (an id no
    /// longer in `order` is skipped). Hashed with foldhash, not SipHash:
    /// every release looks its identity up two or three times, and SipHash
    /// over the identity's four strings was a sixteenth of the gateway's
    /// instructions per transaction at 20 clients on a pool of 4. The
    /// pool's keys now hash as one number (`pool::key`), which foldhash
    /// mixes in a few instructions. foldhash is seeded per process, and
    /// only sessions that logged in can add keys.
    by_key: HashMap<K, VecDeque<u64>, foldhash::fast::RandomState>,
}

struct Waiter<K, T> {
    key: K,
    since: Instant,
    tx: oneshot::Sender<T>,
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
                order: BTreeMap::new(),
                by_key: HashMap::default(),
            }),
        }
    }
}

impl<K: Eq + Hash + Clone, T> Waiting<K, T> {
    /// Removes waiter `id`, and its identity's queue once empty.
    fn remove(&mut self, id: u64) -> Option<Waiter<K, T>> {
        let waiter = self.order.remove(&id)?;
        if let Some(queue) = self.by_key.get_mut(&waiter.key) {
            queue.retain(|&other| other != id);
            if queue.is_empty() {
                self.by_key.remove(&waiter.key);
            }
        }
        Some(waiter)
    }

    /// The longest waiter that still waits (those whose task went away
    /// are forgotten on the way).
    fn longest(&mut self) -> Option<&Waiter<K, T>> {
        while let Some(entry) = self.order.first_entry() {
            if !entry.get().tx.is_closed() {
                break;
            }
            let id = *entry.key();
            self.remove(id);
        }
        self.order.first_key_value().map(|(_, waiter)| waiter)
    }

    /// Since when the longest waiter of `key` that still waits has waited
    /// (those whose task went away are forgotten on the way).
    fn first_since(&mut self, key: &K) -> Option<Instant> {
        let Waiting { order, by_key, .. } = self;
        let queue = by_key.get_mut(key)?;
        let since = loop {
            let Some(&id) = queue.front() else {
                break None;
            };
            match order.get(&id) {
                Some(waiter) if !waiter.tx.is_closed() => break Some(waiter.since),
                _ => {
                    queue.pop_front();
                    order.remove(&id);
                }
            }
        };
        if since.is_none() {
            by_key.remove(key);
        }
        since
    }

    /// The longest waiter of `key`, taken out of the queues.
    fn take_first(&mut self, key: &K) -> Option<Waiter<K, T>> {
        loop {
            let queue = self.by_key.get_mut(key)?;
            let Some(id) = queue.pop_front() else {
                self.by_key.remove(key);
                return None;
            };
            if queue.is_empty() {
                self.by_key.remove(key);
            }
            if let Some(waiter) = self.order.remove(&id) {
                return Some(waiter);
            }
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
        waiting.by_key.entry(key.clone()).or_default().push_back(id);
        let since = Instant::now();
        waiting.order.insert(
            id,
            Waiter {
                key: key.clone(),
                since,
                tx,
            },
        );
        Ticket { id, handed: rx }
    }

    /// The session stopped waiting (it got a connection from the pool, or
    /// gave up). A connection handed to it meanwhile is returned: the
    /// caller gives it back to the pool.
    pub fn leave(&self, mut ticket: Ticket<T>) -> Option<T> {
        self.lock().remove(ticket.id);
        ticket.handed.close();
        ticket.handed.try_recv().ok()
    }

    /// A session releases `conn`, which carries `key`'s identity and has
    /// passed directly between sessions `handoffs` times in a row: the
    /// longest-waiting session of that identity gets it. `Err(conn)` when
    /// none waits, when it has passed too often, or when a session of
    /// another identity has waited [`FAIR_WAIT`] longer than that one: it
    /// goes back to the pool.
    pub fn offer(&self, key: &K, conn: T, handoffs: u32) -> Result<(), T> {
        if handoffs >= MAX_HANDOFFS {
            return Err(conn);
        }
        let mut conn = conn;
        loop {
            let waiter = {
                let mut waiting = self.lock();
                let other = waiting
                    .longest()
                    .filter(|longest| longest.key != *key)
                    .map(|longest| longest.since);
                let Some(mine) = waiting.first_since(key) else {
                    return Err(conn);
                };
                if other.is_some_and(|other| mine.saturating_duration_since(other) >= FAIR_WAIT) {
                    return Err(conn);
                }
                waiting.take_first(key)
            };
            let Some(waiter) = waiter else {
                return Err(conn);
            };
            match waiter.tx.send(conn) {
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
        self.lock().order.len()
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
        assert_eq!(affinity.leave(bob), None);
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
    fn a_handoff_jumps_no_waiter_of_another_identity_by_fair_wait() {
        let affinity: Affinity<&str, u32> = Affinity::default();
        let _bob = affinity.wait(&"bob");
        let alice = affinity.wait(&"alice");
        std::thread::sleep(FAIR_WAIT);
        // Bob has waited long, and alice's session nearly as long: it
        // gets it (with many sessions per connection, everyone waits).
        assert_eq!(affinity.offer(&"alice", 1, 0), Ok(()));
        assert_eq!(affinity.leave(alice), Some(1));
        // Alice's next session started FAIR_WAIT after bob: bob goes first.
        let _alice = affinity.wait(&"alice");
        assert_eq!(
            affinity.offer(&"alice", 2, 0),
            Err(2),
            "back to the queue, for bob"
        );
        assert_eq!(affinity.waiting(), 2);
    }

    #[test]
    fn a_waiter_whose_task_went_away_is_forgotten() {
        let affinity: Affinity<&str, u32> = Affinity::default();
        // Bob's session was dropped while it waited, without leaving.
        drop(affinity.wait(&"bob"));
        let alice = affinity.wait(&"alice");
        std::thread::sleep(FAIR_WAIT);
        assert_eq!(affinity.offer(&"alice", 3, 0), Ok(()));
        assert_eq!(affinity.leave(alice), Some(3));
        assert_eq!(affinity.waiting(), 0);
        assert!(!affinity.waits(&"bob"));
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
        assert_eq!(affinity.leave(next), Some(5));
        assert_eq!(affinity.offer(&"alice", 6, 0), Err(6));
    }
}
