//! A session's timers, without I/O: when it last moved, when the server
//! started on the client's current request, and which timeout
//! (`client_idle_timeout_ms`, `idle_in_transaction_timeout_ms`,
//! `query_timeout_ms`) fires next. The relay sleeps until
//! [`Clock::next_timeout`] and acts on the one that fired.

use std::time::{Duration, Instant};

/// Which timeout the relay is waiting on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    ClientIdle,
    IdleInTransaction,
    Query,
    /// A large message's [`allowance`](crate::session::budget::allowance)
    /// (the relay's own: the clock never names it).
    LargeMessage,
}

/// Where the session is, as the timeouts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The server is working for the client.
    Working,
    /// The server waits for the client's `COPY` data. The request's time
    /// runs, and so does the client's silence, as inside a transaction:
    /// PostgreSQL acts on a cancel only when more data comes, so a client
    /// that sends none would hold the connection for ever.
    CopyIn,
    /// A connection is held inside a transaction, or an extended batch the
    /// client has not synced.
    InTransaction,
    /// Nothing is held.
    Idle,
}

/// The configured timeouts in milliseconds (0: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub client_idle_ms: u64,
    pub idle_in_transaction_ms: u64,
    pub query_ms: u64,
}

/// The session's timers.
#[derive(Debug)]
pub struct Clock {
    /// When the session last moved: the client sent something, or the
    /// server finished the client's work. The idle timeouts count from here
    /// (as PostgreSQL's idle timeouts count from its last `ReadyForQuery`).
    last_activity: Instant,
    /// When the server started on the client's current request.
    started: Option<Instant>,
    /// The gateway cancelled the running request itself, and why: the
    /// outcome's record says so next to PostgreSQL's message.
    cancel: Option<Cancel>,
}

#[derive(Debug)]
struct Cancel {
    note: String,
    /// The query timeout sent it: it does not fire again for this request.
    by_timeout: bool,
}

impl Clock {
    pub fn new(now: Instant) -> Clock {
        Clock {
            last_activity: now,
            started: None,
            cancel: None,
        }
    }

    /// The client sent a whole message (the bytes of one it has not
    /// finished do not count, as in PostgreSQL, whose idle timers run
    /// until a message is read whole).
    pub fn client_moved(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// The gateway could not read from the client from `from` to `to`: it
    /// waited for the server to take what the client sent (a `COPY` into
    /// a table whose rows wait on a lock). That time is not the client's
    /// silence.
    pub fn gateway_waited(&mut self, from: Instant, to: Instant) {
        if to > from {
            self.last_activity = (self.last_activity + (to - from)).min(to);
        }
    }

    /// Bytes went to the server for the client: the request's time starts,
    /// unless it already runs.
    pub fn request_sent(&mut self, now: Instant) {
        if self.started.is_none() {
            self.started = Some(now);
            self.cancel = None;
        }
    }

    /// The server owes nothing more; `was_busy`: it was working for the
    /// client until now (the session moved).
    pub fn answered(&mut self, was_busy: bool, now: Instant) {
        self.started = None;
        self.cancel = None;
        if was_busy {
            self.last_activity = now;
        }
    }

    /// The gateway cancels the running request, for `why`; `by_timeout`:
    /// the query timeout did, and does not fire again for this request.
    pub fn cancelled(&mut self, why: String, by_timeout: bool) {
        let by_timeout = by_timeout || self.cancel.as_ref().is_some_and(|c| c.by_timeout);
        self.cancel = Some(Cancel {
            note: why,
            by_timeout,
        });
    }

    /// Why the gateway cancelled the running request, if it did.
    pub fn cancel_note(&self) -> Option<&str> {
        self.cancel.as_ref().map(|c| c.note.as_str())
    }

    /// The next timeout that applies in `phase`, if configured.
    pub fn next_timeout(&self, phase: Phase, limits: Limits) -> Option<(Timeout, Instant)> {
        let after = |ms: u64, from: Instant| (ms > 0).then(|| from + Duration::from_millis(ms));
        let query = || {
            let started = self.started?;
            if self.cancel.as_ref().is_some_and(|c| c.by_timeout) {
                return None;
            }
            after(limits.query_ms, started).map(|at| (Timeout::Query, at))
        };
        let idle_in_transaction = || {
            after(limits.idle_in_transaction_ms, self.last_activity)
                .map(|at| (Timeout::IdleInTransaction, at))
        };
        match phase {
            Phase::Working => query(),
            Phase::CopyIn => [query(), idle_in_transaction()]
                .into_iter()
                .flatten()
                .min_by_key(|&(_, at)| at),
            Phase::InTransaction => idle_in_transaction(),
            Phase::Idle => {
                after(limits.client_idle_ms, self.last_activity).map(|at| (Timeout::ClientIdle, at))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        client_idle_ms: 1000,
        idle_in_transaction_ms: 200,
        query_ms: 50,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn each_phase_has_its_timeout_counted_from_its_start() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        assert_eq!(
            clock.next_timeout(Phase::Idle, LIMITS),
            Some((Timeout::ClientIdle, t0 + ms(1000)))
        );
        clock.client_moved(t0 + ms(10));
        assert_eq!(
            clock.next_timeout(Phase::InTransaction, LIMITS),
            Some((Timeout::IdleInTransaction, t0 + ms(210)))
        );
        clock.request_sent(t0 + ms(20));
        // A second write of the same request does not restart its time.
        clock.request_sent(t0 + ms(30));
        assert_eq!(
            clock.next_timeout(Phase::Working, LIMITS),
            Some((Timeout::Query, t0 + ms(70)))
        );
    }

    #[test]
    fn in_a_copy_the_request_and_the_clients_silence_both_count() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        clock.request_sent(t0);
        let limits = |query_ms, idle_in_transaction_ms| Limits {
            query_ms,
            idle_in_transaction_ms,
            ..LIMITS
        };
        let next = |clock: &Clock, limits| clock.next_timeout(Phase::CopyIn, limits);
        assert_eq!(
            next(&clock, limits(50, 200)),
            Some((Timeout::Query, t0 + ms(50)))
        );
        assert_eq!(
            next(&clock, limits(0, 200)),
            Some((Timeout::IdleInTransaction, t0 + ms(200)))
        );
        clock.client_moved(t0 + ms(100));
        assert_eq!(
            next(&clock, limits(400, 200)),
            Some((Timeout::IdleInTransaction, t0 + ms(300)))
        );
        clock.cancelled("query_timeout_ms elapsed".into(), true);
        assert_eq!(
            next(&clock, limits(50, 200)),
            Some((Timeout::IdleInTransaction, t0 + ms(300)))
        );
        assert_eq!(next(&clock, limits(50, 0)), None);
        // 250 ms waiting for the server to take the client's data: not
        // the client's silence.
        clock.gateway_waited(t0 + ms(150), t0 + ms(400));
        assert_eq!(
            next(&clock, limits(0, 200)),
            Some((Timeout::IdleInTransaction, t0 + ms(550)))
        );
    }

    #[test]
    fn a_zero_limit_is_no_timeout() {
        let clock = Clock::new(Instant::now());
        for phase in [
            Phase::Idle,
            Phase::InTransaction,
            Phase::Working,
            Phase::CopyIn,
        ] {
            assert_eq!(clock.next_timeout(phase, Limits::default()), None);
        }
    }

    #[test]
    fn working_without_a_request_sent_has_no_query_timeout() {
        let clock = Clock::new(Instant::now());
        assert_eq!(clock.next_timeout(Phase::Working, LIMITS), None);
    }

    #[test]
    fn the_query_timeout_fires_once_per_request() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        clock.request_sent(t0);
        clock.cancelled("query_timeout_ms elapsed".into(), true);
        assert_eq!(clock.next_timeout(Phase::Working, LIMITS), None);
        assert_eq!(clock.cancel_note(), Some("query_timeout_ms elapsed"));
        clock.answered(true, t0 + ms(100));
        assert_eq!(clock.cancel_note(), None);
        clock.request_sent(t0 + ms(200));
        assert_eq!(
            clock.next_timeout(Phase::Working, LIMITS),
            Some((Timeout::Query, t0 + ms(250)))
        );
    }

    #[test]
    fn a_cancel_for_another_reason_leaves_the_query_timeout_armed() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        clock.request_sent(t0);
        clock.cancelled("the client disconnected".into(), false);
        assert!(clock.next_timeout(Phase::Working, LIMITS).is_some());
    }

    #[test]
    fn idle_time_counts_from_the_end_of_the_servers_work() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        clock.request_sent(t0);
        clock.answered(true, t0 + ms(500));
        assert_eq!(
            clock.next_timeout(Phase::Idle, LIMITS),
            Some((Timeout::ClientIdle, t0 + ms(1500)))
        );
        // Answers to the gateway's own exchanges are no activity.
        clock.answered(false, t0 + ms(900));
        assert_eq!(
            clock.next_timeout(Phase::Idle, LIMITS),
            Some((Timeout::ClientIdle, t0 + ms(1500)))
        );
    }
}
