//! What the tracker ([`crate::session::tracker`]) hands the relay: each
//! audited statement's outcome as the server reported it, how a server
//! message is routed to the client, and what it did to the connection's
//! statements.

use std::time::Instant;

use crate::protocol::messages::PgError;

/// An audited statement waiting for its outcome.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The ticket of its `query` audit record ([`crate::audit::Link`]).
    pub ticket: u64,
    pub started: Instant,
    /// What it does to its transaction ([`crate::session::ledger`]).
    pub control: crate::session::ledger::Control,
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
    /// A `FunctionCall` returned this (a number, `NULL`, or a length).
    Returned {
        value: String,
    },
    /// Skipped by the server after an earlier error in the same pipeline;
    /// `after`: the ticket of the audited statement whose error it was.
    NotExecuted {
        after: Option<u64>,
    },
    /// The server's answers to a query did not match the statements
    /// pgwarden split it into: which statement did what cannot be told.
    Unknown,
}

/// A statement resolved by the last server message.
#[derive(Debug)]
pub struct Resolved {
    pub pending: Pending,
    pub outcome: Outcome,
}

/// What the relay does with a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Forward,
    /// An answer to a message the gateway injected: the client never asked.
    Drop,
    /// The answer to a refused statement's stand-in: the client sees this.
    Replace(PgError),
}

/// A client statement name and the gateway's entry for it before a
/// `Parse` replaced it.
pub type Restore = Box<(bytes::Bytes, Option<crate::session::prepared::Statement>)>;

/// What an `Execute` of a portal is recorded as: the statement it runs and
/// the audited parameters.
#[derive(Debug, Clone, Default)]
pub struct Portal {
    pub sql: bytes::Bytes,
    pub params: Option<Vec<Option<String>>>,
    /// Its statement may start a COPY from the client.
    pub copies_in: bool,
    /// A cursor declared `WITH HOLD`: it outlives its transaction.
    pub holdable: bool,
    /// Its place among the portals the session opened
    /// ([`Names::open_portal`](crate::session::sequencer::names::Names::open_portal)).
    pub opened: u64,
    /// What its statement does to transactions, and whether it declares
    /// cursors: learnt when it runs.
    pub commits: crate::session::commits::Commits,
    pub declares: bool,
    /// Its statement runs code pgwarden cannot see, which may close and
    /// open portals.
    pub opaque: bool,
    /// Noted from a `DECLARE` sent, which may have failed: whether it
    /// exists is not known.
    pub noted: bool,
}

/// A portal name and the gateway's entry for it before a `Bind` replaced
/// it: put back when the server refuses or skips the `Bind`, since the
/// portal that then runs is not the new one.
pub type PortalRestore = Box<(bytes::Bytes, Option<Portal>)>;

/// Side effects on the server connection's statement cache.
#[derive(Debug, Default)]
pub struct CacheEffects {
    /// Client statement entries to put back, newest first: their `Parse`
    /// failed or was skipped, so the server kept the old statement.
    pub restore: Vec<Restore>,
    /// Portal entries to put back, newest first.
    pub portals: Vec<PortalRestore>,
    /// Statements whose `Parse` failed or was skipped: not on the server.
    pub not_prepared: Vec<u128>,
    /// A shared statement the server found stale (its plan's result type
    /// changed after DDL, or a type it used is gone): the connection's
    /// statements are prepared afresh before their next use.
    pub stale: bool,
}

impl CacheEffects {
    /// A `Parse` that the server refused (`failed`) or skipped. A failed
    /// `Parse` of the unnamed statement has already dropped the old one
    /// (PostgreSQL drops it before parsing).
    pub(super) fn not_parsed(&mut self, key: Option<u128>, restore: Option<Restore>, failed: bool) {
        if let Some(key) = key {
            self.not_prepared.push(key);
        }
        if let Some(mut r) = restore {
            if failed && r.0.is_empty() {
                r.1 = None;
            }
            self.restore.insert(0, r);
        }
    }
}
