//! What the server still owes the client: the queue of forwarded messages
//! that end in a response the gateway must see (a statement's completion, a
//! `ReadyForQuery`), in the order the server will answer them.
//!
//! Invariant: the queue is empty exactly when every forwarded `Query`,
//! `FunctionCall` and `Sync` has had its `ReadyForQuery`; only then may a
//! server connection be released. Each audited statement leaves the queue
//! with exactly one outcome, also when the server skipped it after an
//! earlier error in the same pipeline.

use std::collections::VecDeque;
use std::time::Instant;

use crate::protocol::messages::{ErrorFields, PgError};

/// An audited statement waiting for its outcome.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The `seq` of its `query` audit record.
    pub seq: u64,
    pub started: Instant,
}

/// How a statement ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok {
        tag: Option<String>,
        rows: Option<u64>,
    },
    Error {
        code: String,
        message: String,
    },
    /// Skipped by the server after an earlier error in the same pipeline.
    NotExecuted,
}

/// A statement resolved by the last server message.
#[derive(Debug)]
pub struct Resolved {
    pub pending: Pending,
    pub outcome: Outcome,
}

#[derive(Debug)]
enum Expect {
    /// A simple `Query` or `FunctionCall`: ends at `ReadyForQuery`.
    Query {
        pending: Option<Pending>,
        /// Set when the guard replaced the client's query: the server's
        /// error for the replacement is swapped for this one.
        blocked: Option<PgError>,
        tag: Option<String>,
        rows: Option<u64>,
        error: Option<ErrorFields>,
    },
    /// An `Execute`: ends at `CommandComplete`, `EmptyQueryResponse`,
    /// `PortalSuspended` or `ErrorResponse`.
    Execute { pending: Option<Pending> },
    /// A `Parse` the guard replaced: ends at the replacement's error.
    BlockedParse { error: PgError },
    /// A `Sync`: ends at `ReadyForQuery`.
    Sync,
}

/// The queue itself.
#[derive(Debug, Default)]
pub struct Tracker {
    queue: VecDeque<Expect>,
}

impl Tracker {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn query(&mut self, pending: Option<Pending>, blocked: Option<PgError>) {
        self.queue.push_back(Expect::Query {
            pending,
            blocked,
            tag: None,
            rows: None,
            error: None,
        });
    }

    pub fn execute(&mut self, pending: Option<Pending>) {
        self.queue.push_back(Expect::Execute { pending });
    }

    pub fn blocked_parse(&mut self, error: PgError) {
        self.queue.push_back(Expect::BlockedParse { error });
    }

    pub fn sync(&mut self) {
        self.queue.push_back(Expect::Sync);
    }

    /// `CommandComplete` (with its tag) or `EmptyQueryResponse` /
    /// `PortalSuspended` (without).
    pub fn on_complete(&mut self, tag: Option<String>, rows: Option<u64>) -> Option<Resolved> {
        match self.queue.front_mut()? {
            Expect::Query {
                tag: t, rows: r, ..
            } => {
                *t = tag;
                *r = rows;
                None
            }
            Expect::Execute { .. } => match self.queue.pop_front() {
                Some(Expect::Execute { pending }) => pending.map(|pending| Resolved {
                    pending,
                    outcome: Outcome::Ok { tag, rows },
                }),
                _ => None,
            },
            _ => None,
        }
    }

    /// `ErrorResponse`. Returns the statement it ended (if audited) and, when
    /// the error answers a guard replacement, the error the client must see
    /// instead.
    pub fn on_error(&mut self, fields: &ErrorFields) -> (Option<Resolved>, Option<PgError>) {
        match self.queue.front_mut() {
            Some(Expect::Query { blocked, error, .. }) => {
                if let Some(b) = blocked.take() {
                    return (None, Some(b));
                }
                if error.is_none() {
                    *error = Some(fields.clone());
                }
                (None, None)
            }
            Some(Expect::Execute { .. }) => match self.queue.pop_front() {
                Some(Expect::Execute { pending }) => (
                    pending.map(|pending| Resolved {
                        pending,
                        outcome: Outcome::Error {
                            code: fields.code.clone(),
                            message: fields.message.clone(),
                        },
                    }),
                    None,
                ),
                _ => (None, None),
            },
            Some(Expect::BlockedParse { .. }) => match self.queue.pop_front() {
                Some(Expect::BlockedParse { error }) => (None, Some(error)),
                _ => (None, None),
            },
            Some(Expect::Sync) | None => (None, None),
        }
    }

    /// `ReadyForQuery`: ends the first `Query` or `Sync` in the queue and
    /// everything before it that the server skipped.
    pub fn on_ready(&mut self, resolved: &mut Vec<Resolved>) {
        while let Some(expect) = self.queue.pop_front() {
            match expect {
                Expect::Query {
                    pending,
                    tag,
                    rows,
                    error,
                    ..
                } => {
                    if let Some(pending) = pending {
                        let outcome = match error {
                            Some(e) => Outcome::Error {
                                code: e.code,
                                message: e.message,
                            },
                            None => Outcome::Ok { tag, rows },
                        };
                        resolved.push(Resolved { pending, outcome });
                    }
                    return;
                }
                Expect::Sync => return,
                Expect::Execute { pending } => resolved.extend(pending.map(|pending| Resolved {
                    pending,
                    outcome: Outcome::NotExecuted,
                })),
                Expect::BlockedParse { .. } => {}
            }
        }
    }

    /// Every statement still waiting, for when the server connection is lost.
    pub fn drain(&mut self) -> Vec<Pending> {
        self.queue
            .drain(..)
            .filter_map(|e| match e {
                Expect::Query { pending, .. } | Expect::Execute { pending } => pending,
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::sqlstate;

    fn p(seq: u64) -> Option<Pending> {
        Some(Pending {
            seq,
            started: Instant::now(),
        })
    }

    fn err(code: &str) -> ErrorFields {
        ErrorFields {
            severity: "ERROR".into(),
            code: code.into(),
            message: "boom".into(),
        }
    }

    #[test]
    fn pipeline_error_skips_rest_until_sync() {
        let mut t = Tracker::default();
        t.execute(p(1));
        t.execute(p(2));
        t.execute(p(3));
        t.sync();
        t.execute(p(4));
        t.sync();
        let r = t.on_complete(Some("SELECT 1".into()), Some(1)).unwrap();
        assert_eq!(r.pending.seq, 1);
        let (r, sub) = t.on_error(&err("22012"));
        assert_eq!(r.unwrap().pending.seq, 2);
        assert!(sub.is_none());
        let mut resolved = Vec::new();
        t.on_ready(&mut resolved);
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].pending.seq, 3);
        assert_eq!(resolved[0].outcome, Outcome::NotExecuted);
        assert!(!t.is_empty());
        assert_eq!(t.on_complete(None, None).unwrap().pending.seq, 4);
        t.on_ready(&mut resolved);
        assert!(t.is_empty());
    }

    #[test]
    fn multi_statement_query_keeps_last_tag_and_first_error() {
        let mut t = Tracker::default();
        t.query(p(7), None);
        assert!(t.on_complete(Some("INSERT 0 2".into()), Some(2)).is_none());
        let (r, _) = t.on_error(&err("23505"));
        assert!(r.is_none());
        let mut resolved = Vec::new();
        t.on_ready(&mut resolved);
        assert!(matches!(&resolved[0].outcome, Outcome::Error { code, .. } if code == "23505"));
        assert!(t.is_empty());
    }

    #[test]
    fn blocked_statements_get_their_substitute_error() {
        let mut t = Tracker::default();
        let guard = PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "no");
        t.query(None, Some(guard.clone()));
        assert_eq!(t.on_error(&err("42601")).1, Some(guard.clone()));
        let mut resolved = Vec::new();
        t.on_ready(&mut resolved);
        assert!(resolved.is_empty() && t.is_empty());

        t.execute(p(1));
        t.blocked_parse(guard.clone());
        t.sync();
        t.on_complete(Some("SELECT 1".into()), Some(1));
        assert_eq!(t.on_error(&err("42601")).1, Some(guard));
        t.on_ready(&mut resolved);
        assert!(t.is_empty());
    }
}
