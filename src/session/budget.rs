//! The memory that large client messages may hold at once, across every
//! session (`[server] large_message_memory`).
//!
//! The gateway reads a client's message whole before it relays it (the
//! guard and the audit log read statements whole), so without a bound a
//! few clients each announcing a message of `max_message_size` could take
//! all of the machine's memory, and every session with it.
//!
//! Invariant: a session reads no more of a message longer than [`LARGE`]
//! until it holds a [`Grant`] of the message's length; the grant is held
//! while the message waits in the session's buffer and given back once it
//! has been handled. A session that cannot have one waits, reading nothing
//! more from its client; messages of at most [`LARGE`] bytes never wait.
//! `CopyData` is not counted: a long one is passed on as it arrives.
//!
//! One client user holds at most a quarter of the budget (or one largest
//! message, if that is more): four connections of one login, each sending
//! the first bytes of a 256 MB message and nothing more, took the whole
//! budget, and every other client's large message waited for ever.
//!
//! A grant must also be used: while another session waits for the budget,
//! a message must arrive whole within [`allowance`] of its grant (at
//! least [`MIN_RATE`]), or its session is ended. Four logins each sending
//! the first bytes of a 256 MB message and nothing more held the whole
//! default budget for as long as they liked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use crate::protocol::frame::FrameHeader;

/// Messages longer than this need a grant; a `CopyData` this long is
/// streamed rather than buffered (`sequencer::STREAM_THRESHOLD`).
pub const LARGE: usize = 64 * 1024;

/// Permits count kibibytes, so that one message's fit in a `u32`.
const UNIT: usize = 1024;

/// The permits `bytes` take.
fn units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

/// While others wait, a message holding a grant must arrive at least
/// this fast (bytes a second), or in [`MIN_ALLOWANCE`].
pub const MIN_RATE: usize = 1 << 20;
pub const MIN_ALLOWANCE: Duration = Duration::from_secs(10);

/// How long a message of `bytes` may take to arrive once granted, while
/// others wait for the budget.
pub fn allowance(bytes: usize) -> Duration {
    Duration::from_secs((bytes / MIN_RATE) as u64).max(MIN_ALLOWANCE)
}

/// The gateway's budget for large client messages.
pub struct MessageBudget {
    permits: Semaphore,
    /// The most one client user may hold, and the permits of each one
    /// that holds or waits for a grant now.
    share: u32,
    users: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    /// Sessions waiting for a grant now.
    waiting: AtomicUsize,
    /// Bytes granted now, and grants that had to wait (for `/metrics`).
    pub held: AtomicU64,
    pub waits: AtomicU64,
}

/// A share of the budget, given back when dropped.
pub struct Grant<'a> {
    permit: Option<(SemaphorePermit<'a>, OwnedSemaphorePermit)>,
    budget: &'a MessageBudget,
    user: Arc<str>,
    bytes: usize,
    /// When the message must be whole if others wait ([`allowance`]).
    pub until: Instant,
}

impl Grant<'_> {
    /// The length of the message it was granted for.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        self.budget
            .held
            .fetch_sub(self.bytes as u64, Ordering::Relaxed);
        self.permit = None;
        self.budget.forget_idle(&self.user);
    }
}

/// Forgets a user's permits, if unused, when dropped.
struct Forget<'a>(&'a MessageBudget, &'a Arc<str>);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget_idle(self.1);
    }
}

/// Counts a session among those waiting for a grant while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a session must do about the message at the front of its buffer
/// before it reads more from its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing large is buffered or being read: any grant goes back.
    Release,
    /// A large message is buffered whole, or its grant is held: keep it.
    Keep,
    /// A large message is being read: a grant of this many bytes first.
    Grant(usize),
}

impl MessageBudget {
    /// A budget of `bytes` (0: no limit) for messages of at most
    /// `max_message` bytes.
    pub fn new(bytes: usize, max_message: usize) -> MessageBudget {
        let all = match bytes {
            0 => u32::MAX,
            n => units(n),
        };
        // A message's grant counts its tag byte too.
        let share = (all / 4).max(units(max_message.saturating_add(1)));
        MessageBudget {
            permits: Semaphore::new(all as usize),
            share: share.min(all),
            users: Mutex::default(),
            waiting: AtomicUsize::new(0),
            held: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// A grant of `bytes` for a message of `user`, waiting for its other
    /// sessions, then for anyone's, to give theirs back if it must.
    /// Cancel-safe (a dropped wait holds nothing). A message longer than
    /// the share waits for all of it.
    pub async fn grant(&self, user: &Arc<str>, bytes: usize) -> Grant<'_> {
        let units = units(bytes).min(self.share);
        // Declared first so that it runs last, when `mine` is gone: a wait
        // dropped half way (its client left) leaves no entry behind.
        let _forget = Forget(self, user);
        let mine = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let share = self.share as usize;
            users
                .entry(user.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(share)))
                .clone()
        };
        let user_permit = match mine.clone().try_acquire_many_owned(units) {
            Ok(permit) => permit,
            Err(_) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                mine.acquire_many_owned(units)
                    .await
                    .expect("a user's semaphore is never closed")
            }
        };
        let permit = match self.permits.try_acquire_many(units) {
            Ok(permit) => permit,
            Err(_) => {
                // Only a wait for everyone's memory counts: one for the
                // user's own share is not helped by ending another user's
                // session (and a login must not be able to make others'
                // allowances count by waiting on itself).
                let _waiting = Waiting::new(&self.waiting);
                self.waits.fetch_add(1, Ordering::Relaxed);
                self.permits
                    .acquire_many(units)
                    .await
                    .expect("the budget's semaphore is never closed")
            }
        };
        self.held.fetch_add(bytes as u64, Ordering::Relaxed);
        Grant {
            permit: Some((permit, user_permit)),
            budget: self,
            user: user.clone(),
            bytes,
            until: Instant::now() + allowance(bytes),
        }
    }

    /// Whether a session waits for a grant of everyone's memory now.
    pub fn others_wait(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Forgets `user`'s permits when no session holds or waits for them
    /// (the map would otherwise keep every user that ever sent a large
    /// message).
    fn forget_idle(&self, user: &Arc<str>) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if users.get(user).is_some_and(|s| Arc::strong_count(s) == 1) {
            users.remove(user);
        }
    }

    #[cfg(test)]
    fn users(&self) -> usize {
        self.users.lock().unwrap().len()
    }
}

/// What the message at the front of `rbuf` needs, given the grant the
/// session holds. `raw`: the buffer's front is the rest of a `CopyData`
/// being passed on, not a message. A header that is not valid needs
/// nothing: reading it fails the session.
pub fn need(rbuf: &[u8], max: usize, raw: bool, held: Option<&Grant<'_>>) -> Need {
    let header = match FrameHeader::peek(rbuf, max) {
        Ok(Some(header)) if !raw && header.total > LARGE => header,
        _ => return Need::Release,
    };
    let granted = held.is_some_and(|g| g.bytes >= header.total);
    match (rbuf.len() >= header.total, header.tag) {
        (true, _) => Need::Keep,
        // Passed on as it arrives (or dropped), never held whole.
        (false, b'd') => Need::Release,
        (false, _) if granted => Need::Keep,
        (false, _) => Need::Grant(header.total),
    }
}

/// Whether the message at the front of `rbuf` is still arriving.
pub fn arriving(rbuf: &[u8], max: usize) -> bool {
    matches!(FrameHeader::peek(rbuf, max), Ok(Some(h)) if rbuf.len() < h.total)
}

/// Buffers that grew for a large message are given back once it is gone;
/// a buffer keeps its memory otherwise, for the life of its session.
const KEEP: usize = 2 * LARGE;

/// Gives `buf`'s memory back when it is far larger than what it holds,
/// keeping what it holds.
pub fn shrink(buf: &mut BytesMut) {
    if buf.capacity() > KEEP {
        renew(buf);
    }
}

/// Moves what `buf` holds (at most [`LARGE`] bytes) to a buffer of its
/// own. A read buffer that a large message was split from still shares
/// that message's memory, though its own capacity is small: the message
/// is freed only when both are gone.
pub fn renew(buf: &mut BytesMut) {
    if buf.len() <= LARGE {
        let mut fresh = BytesMut::with_capacity(buf.len().max(8 * 1024));
        fresh.extend_from_slice(buf);
        *buf = fresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(tag: u8, total: usize) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((total - 1) as i32).to_be_bytes());
        out
    }

    fn user(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[tokio::test]
    async fn a_large_message_needs_a_grant_of_its_length_until_it_is_handled() {
        let budget = MessageBudget::new(1 << 20, 1 << 20);
        let max = 1 << 30;
        assert_eq!(need(b"", max, false, None), Need::Release);
        assert_eq!(need(&header(b'Q', LARGE), max, false, None), Need::Release);
        let big = header(b'Q', LARGE + 1);
        assert_eq!(need(&big, max, false, None), Need::Grant(LARGE + 1));
        assert_eq!(need(&big, max, true, None), Need::Release, "raw copy bytes");
        assert_eq!(
            need(&header(b'd', LARGE + 1), max, false, None),
            Need::Release
        );
        let grant = budget.grant(&user("a"), LARGE + 1).await;
        assert_eq!(budget.held.load(Ordering::Relaxed), LARGE as u64 + 1);
        assert_eq!(need(&big, max, false, Some(&grant)), Need::Keep);
        let bigger = header(b'Q', LARGE + 2);
        assert_eq!(
            need(&bigger, max, false, Some(&grant)),
            Need::Grant(LARGE + 2)
        );
        let mut whole = big.clone();
        whole.resize(LARGE + 1, b'x');
        assert_eq!(need(&whole, max, false, None), Need::Keep, "buffered whole");
        drop(grant);
        assert_eq!(budget.held.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_grant_waits_while_others_hold_the_budget() {
        let budget = MessageBudget::new(3 * LARGE, 2 * LARGE);
        let (a, b) = (user("a"), user("b"));
        let first = budget.grant(&a, 2 * LARGE).await;
        let mut second = Box::pin(budget.grant(&b, 2 * LARGE));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), &mut second).await;
        assert!(waited.is_err(), "granted past the budget");
        assert_eq!(budget.waits.load(Ordering::Relaxed), 1);
        drop(first);
        let second = second.await;
        assert_eq!(budget.held.load(Ordering::Relaxed), 2 * LARGE as u64);
        drop(second);
        // A message longer than the budget waits for all of it, not for ever.
        let small = MessageBudget::new(2 * LARGE, 2 * LARGE);
        let whole = small.grant(&a, 2 * LARGE + 1).await;
        let mut next = Box::pin(small.grant(&b, LARGE + 1));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), &mut next).await;
        assert!(waited.is_err(), "granted past the budget");
        drop(whole);
        next.await;
        // No limit: anything is granted at once.
        let unlimited = MessageBudget::new(0, 1 << 30);
        let _a = unlimited.grant(&a, 1 << 30).await;
        let _b = unlimited.grant(&a, 1 << 30).await;
        assert_eq!(unlimited.waits.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn one_user_holds_at_most_a_quarter_of_the_budget() {
        let budget = MessageBudget::new(8 * LARGE, LARGE);
        let (a, b) = (user("a"), user("b"));
        let first = budget.grant(&a, 2 * LARGE).await;
        let mut more = Box::pin(budget.grant(&a, LARGE + 1));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), &mut more).await;
        assert!(waited.is_err(), "a user took more than its share");
        // Another user is not held up by it.
        let other = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            budget.grant(&b, 2 * LARGE),
        )
        .await;
        assert!(other.is_ok(), "another user waited");
        drop(first);
        more.await;
    }

    #[tokio::test]
    async fn waits_are_counted_and_users_forgotten_when_done() {
        let budget = MessageBudget::new(2 * LARGE, 2 * LARGE);
        let (a, b) = (user("a"), user("b"));
        let first = budget.grant(&a, 2 * LARGE).await;
        assert!(!budget.others_wait());
        assert!(first.until >= Instant::now() + allowance(2 * LARGE) - Duration::from_secs(1));
        let mut second = Box::pin(budget.grant(&b, 2 * LARGE));
        let waited = tokio::time::timeout(Duration::from_millis(50), &mut second).await;
        assert!(waited.is_err(), "granted past the budget");
        assert!(budget.others_wait());
        assert_eq!(budget.users(), 2);
        // The waiting client leaves: neither its wait nor its user stays.
        drop(second);
        assert!(!budget.others_wait());
        assert_eq!(budget.users(), 1);
        drop(first);
        assert_eq!(budget.users(), 0, "a user is kept after its last grant");
        // A wait for the user's own share is not a wait for everyone's.
        let shared = MessageBudget::new(8 * LARGE, LARGE);
        let _mine = shared.grant(&a, 2 * LARGE).await;
        let mut more = Box::pin(shared.grant(&a, LARGE + 1));
        let waited = tokio::time::timeout(Duration::from_millis(50), &mut more).await;
        assert!(waited.is_err() && !shared.others_wait());
        // Many users one after the other leave nothing behind.
        for n in 0..100 {
            drop(budget.grant(&user(&format!("u{n}")), LARGE + 1).await);
        }
        assert_eq!(budget.users(), 0);
    }

    #[test]
    fn a_message_may_take_longer_the_longer_it_is() {
        assert_eq!(allowance(LARGE + 1), MIN_ALLOWANCE);
        assert_eq!(allowance(256 * MIN_RATE), Duration::from_secs(256));
    }

    #[test]
    fn shrinking_keeps_what_the_buffer_holds() {
        let mut buf = BytesMut::with_capacity(10 * LARGE);
        buf.extend_from_slice(b"abc");
        shrink(&mut buf);
        assert_eq!((&buf[..], buf.capacity() <= KEEP), (&b"abc"[..], true));
        let mut busy = BytesMut::with_capacity(10 * LARGE);
        busy.resize(LARGE + 1, b'x');
        shrink(&mut busy);
        assert!(
            busy.capacity() >= 10 * LARGE,
            "a large message being read stays"
        );
        // What is split off a buffer shares its memory; renewing the rest
        // leaves the message the only owner.
        let mut rbuf = BytesMut::with_capacity(10 * LARGE);
        rbuf.resize(10 * LARGE, b'x');
        let message = rbuf.split_to(10 * LARGE - 3).freeze();
        renew(&mut rbuf);
        assert_eq!((rbuf.len(), message.is_unique()), (3, true));
    }
}
