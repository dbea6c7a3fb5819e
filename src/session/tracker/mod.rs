//! What the server still owes the client: one entry per forwarded (or
//! answered-by-the-gateway) message that produces a response, in the order
//! the responses come back. Every server message is routed through it.
//!
//! Invariants:
//! - the queue is empty exactly when every forwarded `Query`, `FunctionCall`
//!   and `Sync` has had its `ReadyForQuery` and every gateway-made answer
//!   has been sent; only then may a server connection be released;
//! - answers the gateway makes itself (a `ParseComplete` for a statement the
//!   server connection already has, a `CloseComplete` for a client-side
//!   close, a refused statement's error) are emitted exactly when they reach
//!   the front, so the client sees responses in the order of its messages;
//! - after an error the server skips to `Sync`; so does the queue, and each
//!   skipped audited statement leaves with `NotExecuted`.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{BufMut, BytesMut};

use crate::protocol::messages::{self, ErrorFields, PgError};
pub use crate::session::outcome::{
    CacheEffects, Outcome, Pending, PortalRestore, Resolved, Restore, Route,
};

/// The statements of a split query answered so far. Their results wait for
/// the query's `ReadyForQuery`: if the server's answers did not match the
/// split (a `CommandComplete` more, or fewer without an error), the split
/// was wrong, and no record may say which statement did what: every one of
/// the query's is then `unknown`. The split follows PostgreSQL's grammar
/// (`session::split`); this holds even where it missed something.
#[derive(Debug, Default)]
pub struct Pieces {
    done: Vec<Resolved>,
    /// The last statement's `CommandComplete` came.
    last_done: bool,
    /// Another came after it.
    extra: bool,
}

#[derive(Debug)]
enum Expect {
    /// `ParseComplete` expected. `injected`: the gateway sent this Parse
    /// (the answer is dropped). `key`: the server-side statement it creates.
    Parse {
        injected: bool,
        key: Option<u128>,
        restore: Option<Restore>,
    },
    /// The gateway answers `ParseComplete` itself: the statement exists.
    SynthParse {
        restore: Option<Restore>,
    },
    /// `BindComplete` expected. `pending`: the Bind plans a statement that
    /// may run functions the gateway cannot see, so it has its own record.
    Bind {
        pending: Option<Pending>,
        /// The shared statement it binds, if any.
        key: Option<u128>,
        /// The portal entry it replaced.
        portal: Option<PortalRestore>,
        /// The number of the portal it opens (`Portal::opened`).
        opened: u64,
    },
    /// `Describe`: ends at `RowDescription` or `NoData`.
    Describe,
    Execute {
        pending: Option<Pending>,
    },
    /// `CloseComplete` expected; `injected` as for `Parse`. `portal`: the
    /// entry of the portal it closes, put back if the server skips it.
    Close {
        injected: bool,
        portal: Option<PortalRestore>,
    },
    /// The gateway answers `CloseComplete` itself (client-side close).
    SynthClose,
    /// A `Parse` refused by the gateway and replaced by one that fails.
    BlockedParse {
        error: PgError,
    },
    Sync,
    /// A simple `Query` or `FunctionCall`: ends at `ReadyForQuery`.
    Query {
        pending: Option<Pending>,
        /// The statements after `pending` in a multi-statement query, each
        /// with its own record: a `CommandComplete` resolves `pending` and
        /// moves to the next.
        more: VecDeque<Option<Pending>>,
        blocked: Option<Box<PgError>>,
        tag: Option<String>,
        rows: Option<u64>,
        error: Option<Box<ErrorFields>>,
        /// A `FunctionCall`'s result, as the audit log shows it.
        returned: Option<String>,
        /// A query split into statements: how the server's answers matched
        /// the split ([`Pieces`]).
        pieces: Option<Box<Pieces>>,
    },
    /// A simple query the gateway answers itself: `CommandComplete` with
    /// this tag, then `ReadyForQuery` with the current status.
    SynthQuery {
        tag: &'static str,
    },
    /// A simple query the gateway sent on its own behalf: everything up to
    /// and including its `ReadyForQuery` is the gateway's, not the client's.
    Injected,
}

impl Expect {
    fn is_synthetic(&self) -> bool {
        matches!(
            self,
            Expect::SynthParse { .. } | Expect::SynthClose | Expect::SynthQuery { .. }
        )
    }
}

/// The queue itself.
#[derive(Debug, Default)]
pub struct Tracker {
    queue: VecDeque<Expect>,
    /// `DataRow`s the `Execute` in front has sent so far.
    rows_sent: u64,
    /// An extended-protocol error found no `Sync` queued behind it: the
    /// server skips whatever the client sends until its next `Sync`
    /// ([`Tracker::server_skips`]).
    server_skips: bool,
}

impl Tracker {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// How many answers (or answered exchanges) are owed.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether the oldest outstanding request is an extended-protocol
    /// `Execute` (so a COPY it starts ends only at a `Sync` sent after the
    /// copy).
    pub fn front_is_execute(&self) -> bool {
        matches!(self.queue.front(), Some(Expect::Execute { .. }))
    }

    pub fn parse(&mut self, injected: bool, key: Option<u128>) {
        self.queue.push_back(Expect::Parse {
            injected,
            key,
            restore: None,
        });
    }
    pub fn synth_parse(&mut self) {
        self.queue.push_back(Expect::SynthParse { restore: None });
    }
    /// The client's last `Parse` (the newest entry) replaced the gateway's
    /// entry for a statement name: if the server refuses or skips it, the
    /// server still has the old statement, and so must the gateway.
    pub fn restore_if_not_parsed(&mut self, restore: Restore) {
        if let Some(Expect::Parse { restore: r, .. } | Expect::SynthParse { restore: r }) =
            self.queue.back_mut()
        {
            *r = Some(restore);
        }
    }
    pub fn bind(&mut self, pending: Option<Pending>, key: Option<u128>, opened: u64) {
        self.queue.push_back(Expect::Bind {
            pending,
            key,
            portal: None,
            opened,
        });
    }

    /// The number of the oldest portal a `Bind` not yet answered opens:
    /// it, and those opened after it, are not of a transaction the server
    /// has ended so far.
    pub fn first_unanswered_portal(&self) -> Option<u64> {
        self.queue.iter().find_map(|e| match e {
            Expect::Bind { opened, .. } => Some(*opened),
            _ => None,
        })
    }
    /// The last `Bind` (the newest entry) replaced the gateway's entry for
    /// a portal: put it back if the server refuses or skips the `Bind`.
    pub fn restore_if_not_bound(&mut self, restore: PortalRestore) {
        if let Some(Expect::Bind { portal, .. }) = self.queue.back_mut() {
            *portal = Some(restore);
        }
    }
    /// The last `Close` (the newest entry) dropped the gateway's entry for
    /// a portal: put it back if the server skips the `Close` (red team
    /// rt42: the name looked free, and a failed DECLARE of it lent its
    /// text to the portal).
    pub fn restore_if_not_closed(&mut self, restore: PortalRestore) {
        if let Some(Expect::Close { portal, .. }) = self.queue.back_mut() {
            *portal = Some(restore);
        }
    }
    pub fn describe(&mut self) {
        self.queue.push_back(Expect::Describe);
    }
    pub fn execute(&mut self, pending: Option<Pending>) {
        self.queue.push_back(Expect::Execute { pending });
    }
    pub fn close(&mut self, injected: bool) {
        self.queue.push_back(Expect::Close {
            injected,
            portal: None,
        });
    }
    pub fn synth_close(&mut self) {
        self.queue.push_back(Expect::SynthClose);
    }
    pub fn blocked_parse(&mut self, error: PgError) {
        self.queue.push_back(Expect::BlockedParse { error });
    }
    pub fn sync(&mut self) {
        self.queue.push_back(Expect::Sync);
    }
    pub fn query(&mut self, pending: Option<Pending>, blocked: Option<PgError>) {
        self.queue.push_back(Expect::Query {
            pending,
            more: VecDeque::new(),
            blocked: blocked.map(Box::new),
            tag: None,
            rows: None,
            error: None,
            returned: None,
            pieces: None,
        });
    }
    /// The statements after the first of the last `query` (each with its
    /// own record), in order.
    pub fn more_statements(&mut self, statements: Vec<Option<Pending>>) {
        if statements.is_empty() {
            return;
        }
        if let Some(Expect::Query { more, pieces, .. }) = self.queue.back_mut() {
            more.extend(statements);
            pieces.get_or_insert_with(Box::default);
        }
    }
    pub fn synth_query(&mut self, tag: &'static str) {
        self.queue.push_back(Expect::SynthQuery { tag });
    }
    pub fn injected(&mut self) {
        self.queue.push_back(Expect::Injected);
    }

    /// What PostgreSQL would answer next if the first message now owed an
    /// answer had failed: `E` for a message that has not failed yet, `Z`
    /// for a `Sync`, a simple query that already failed or the gateway's
    /// own query; `None` when nothing is owed or the gateway answers the
    /// front itself.
    pub fn failure_answer(&self) -> Option<u8> {
        match self.queue.front()? {
            Expect::Sync | Expect::Injected | Expect::Query { error: Some(_), .. } => Some(b'Z'),
            e if e.is_synthetic() => None,
            _ => Some(b'E'),
        }
    }

    /// The next answer the server owes (the gateway's own aside) is a
    /// `Sync`'s: everything before it in its batch was answered.
    pub fn sync_first(&self) -> bool {
        matches!(
            self.queue.iter().find(|e| !e.is_synthetic()),
            Some(Expect::Sync)
        )
    }

    /// Takes every statement still waiting out of the queue, leaving the
    /// answers owed in place: the server connection is gone, so their
    /// outcome is unknown, but the client is still answered in order.
    pub fn take_pendings(&mut self) -> Vec<Pending> {
        let mut taken = Vec::new();
        for expect in self.queue.iter_mut() {
            match expect {
                Expect::Query {
                    pending,
                    more,
                    pieces,
                    ..
                } => {
                    if let Some(pieces) = pieces {
                        taken.extend(pieces.done.drain(..).map(|r| r.pending));
                    }
                    taken.extend(pending.take());
                    taken.extend(more.iter_mut().filter_map(Option::take));
                }
                Expect::Execute { pending } | Expect::Bind { pending, .. } => {
                    taken.extend(pending.take())
                }
                _ => {}
            }
        }
        taken
    }

    /// Writes the answers of gateway-made entries now at the front.
    pub fn emit_synthetic(&mut self, tx_status: u8, out: &mut BytesMut) {
        while self.queue.front().is_some_and(Expect::is_synthetic) {
            match self.queue.pop_front() {
                Some(Expect::SynthParse { .. }) => messages::write_frame(out, b'1', |_| {}),
                Some(Expect::SynthClose) => messages::write_frame(out, b'3', |_| {}),
                Some(Expect::SynthQuery { tag }) => {
                    messages::write_frame(out, b'C', |b| {
                        b.put_slice(tag.as_bytes());
                        b.put_u8(0);
                    });
                    messages::ready_for_query(out, tx_status);
                }
                _ => unreachable!("front was synthetic"),
            }
        }
    }

    /// Routes one server message (`tag`, `body`), resolving what it ends.
    pub fn on_server(
        &mut self,
        tag: u8,
        body: &[u8],
        resolved: &mut Vec<Resolved>,
        cache: &mut CacheEffects,
    ) -> Route {
        if matches!(self.queue.front(), Some(Expect::Injected)) {
            if tag == b'Z' {
                self.queue.pop_front();
            }
            return Route::Drop;
        }
        match tag {
            b'1' => match self.pop_if(|e| matches!(e, Expect::Parse { .. })) {
                Some(Expect::Parse { injected: true, .. }) => Route::Drop,
                _ => Route::Forward,
            },
            b'2' => {
                self.on_bind_complete(resolved);
                Route::Forward
            }
            b'T' | b'n' => {
                self.pop_if(|e| matches!(e, Expect::Describe));
                Route::Forward
            }
            b'3' => match self.pop_if(|e| matches!(e, Expect::Close { .. })) {
                Some(Expect::Close { injected: true, .. }) => Route::Drop,
                _ => Route::Forward,
            },
            b'C' | b'I' | b's' => {
                // Only an audited statement's outcome needs the tag.
                let (tag, rows) = if tag == b'C' && self.front_is_audited() {
                    let (t, r) = messages::parse_command_complete(body).unwrap_or_default();
                    (Some(t), r)
                } else {
                    (None, None)
                };
                self.on_complete(tag, rows, resolved);
                Route::Forward
            }
            b'D' => {
                self.data_row();
                Route::Forward
            }
            b'V' => {
                if let Some(Expect::Query { returned, .. }) = self.queue.front_mut() {
                    *returned = messages::function_result(body);
                }
                Route::Forward
            }
            b'E' => {
                self.rows_sent = 0;
                self.on_error(body, resolved, cache)
            }
            b'Z' => {
                self.on_ready(resolved);
                Route::Forward
            }
            b'G' => {
                self.on_copy_in();
                Route::Forward
            }
            b'K' => Route::Drop,
            _ => Route::Forward,
        }
    }

    /// `BindComplete`: a `Bind` whose outcome is recorded succeeded.
    fn on_bind_complete(&mut self, resolved: &mut Vec<Resolved>) {
        if let Some(Expect::Bind {
            pending: Some(pending),
            ..
        }) = self.pop_if(|e| matches!(e, Expect::Bind { .. }))
        {
            resolved.push(Resolved {
                pending,
                outcome: Outcome::Ok {
                    tag: Some("BIND".into()),
                    rows: None,
                },
            });
        }
    }

    /// Whether the statement the next completion answers is audited.
    fn front_is_audited(&self) -> bool {
        match self.queue.front() {
            Some(Expect::Query { pending, more, .. }) => {
                pending.is_some() || more.iter().any(Option::is_some)
            }
            Some(Expect::Execute { pending }) => pending.is_some(),
            _ => false,
        }
    }

    /// `CopyInResponse`: PostgreSQL ignores `Sync` during copy-in, so a
    /// `Sync` queued behind the COPY would never be answered. The
    /// sequencer holds everything a client sends after a request that may
    /// start a COPY until the server says, so there is none; should one be
    /// there, it goes.
    fn on_copy_in(&mut self) {
        let mut i = 1;
        while i < self.queue.len() {
            match self.queue[i] {
                Expect::Sync => {
                    self.queue.remove(i);
                }
                _ => i += 1,
            }
        }
    }

    fn pop_if(&mut self, pred: impl Fn(&Expect) -> bool) -> Option<Expect> {
        if self.queue.front().is_some_and(pred) {
            self.queue.pop_front()
        } else {
            None
        }
    }

    /// A `DataRow` reached the client (also for rows streamed past the
    /// tracker): counted for the `Execute` in front.
    pub fn data_row(&mut self) {
        if matches!(self.queue.front(), Some(Expect::Execute { .. })) {
            self.rows_sent += 1;
        }
    }
}

mod resolve;

#[cfg(test)]
mod tests;
