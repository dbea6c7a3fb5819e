//! Transaction outcomes for the audit log: which statements' effects
//! persisted. Every `result` record of a statement that ran on the server
//! carries `tx` (committed, rolled back, prepared, unknown), so the ledger
//! holds a transaction's results until its outcome is known and then
//! releases them together.
//!
//! Driven, in the order the server produced them, by the statements the
//! tracker resolved and by each `ReadyForQuery` and error; does no I/O.
//!
//! Invariants:
//! - a transaction ends at a statement whose tag is `COMMIT` (committed),
//!   `ROLLBACK` (rolled back; `ROLLBACK TO SAVEPOINT` only undoes the
//!   statements after the savepoint), `PREPARE TRANSACTION` (prepared), or
//!   at `ReadyForQuery` `I` (an implicit transaction, or one ended by code
//!   pgwarden cannot see: committed unless an error was reported in it);
//! - a result is released only with its `tx` decided, except when a
//!   transaction holds more than [`MAX_HELD`] results (the oldest go out
//!   without `tx`) or the outcome cannot be known (`unknown`).

use crate::audit::{Event, TxOutcome};
use crate::identity::lexer::{tokens, Dialect, Kind, Lexer, Token};

/// Results held for one transaction at most; beyond, the oldest are
/// written without `tx` so that memory stays bounded.
pub const MAX_HELD: usize = 1024;

/// What a statement's text does to its transaction, as far as the ledger
/// needs to know (its last statement: the tag the server reports is that
/// statement's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Control {
    #[default]
    Other,
    Savepoint(Box<str>),
    RollbackTo(Box<str>),
    Release(Box<str>),
    /// A text that ends its transaction and goes on (`COMMIT; SELECT 1`):
    /// its one record cannot say which of its statements persisted.
    Mixed,
    /// Code that may end its transaction where the ledger cannot see
    /// (`CALL` of a procedure, a `DO` block that commits or rolls back):
    /// the transaction's outcome is unknown.
    Unseen,
    /// `PREPARE TRANSACTION`: its tag `ROLLBACK` cannot tell what
    /// happened. Outside a block PostgreSQL ignores it (WARNING 25P01) and
    /// the transaction goes on to commit; in a failed block it did roll
    /// back (red team rt43: a committed INSERT was exported rolled_back).
    PrepareTransaction,
}

impl Control {
    /// The control of `sql`'s last statement (savepoint names as the
    /// server folds them), or [`Control::Mixed`].
    pub fn of(sql: &[u8]) -> Control {
        let several = crate::session::split::may_hold_several(sql);
        let commits = crate::session::commits::Commits::of(sql);
        if commits.block_commits || starts_with_word(sql, b"call") {
            return Control::Unseen;
        }
        // Several statements kept as one record: whether any of them ends
        // or rewinds the transaction, the record cannot say for which.
        if several && (commits.more_after || controls_transactions(sql)) {
            return Control::Mixed;
        }
        if commits.ends && starts_with_word(sql, b"prepare") {
            return Control::PrepareTransaction;
        }
        static SAVEPOINTS: crate::identity::keywords::Keywords =
            crate::identity::keywords::Keywords::new(&["savepoint", "rollback", "release"]);
        if !SAVEPOINTS.in_text(sql) {
            return Control::Other;
        }
        let toks = tokens(sql);
        let last = toks
            .iter()
            .rposition(|t| !t.is_punct(sql, b";"))
            .map_or(0, |end| {
                toks[..end]
                    .iter()
                    .rposition(|t| t.is_punct(sql, b";"))
                    .map_or(0, |i| i + 1)
            });
        let t: Vec<&Token> = toks[last..]
            .iter()
            .filter(|t| !t.is_punct(sql, b";"))
            .collect();
        let word = |i: usize, w: &[u8]| t.get(i).is_some_and(|t| t.is_word(sql, w));
        // A name exactly as PostgreSQL reads it, or none when the gateway
        // cannot be certain (red team rt40): a Unicode escape (`U&"\0061"`
        // is `a`), or a byte outside ASCII, which PostgreSQL reads in the
        // client's encoding (two LATIN1 names were one name read lossily).
        // A savepoint statement with such a name makes the outcome unknown.
        let name = |t: Option<&&Token>| -> Option<Box<str>> {
            let t = t?;
            let text = t.text(sql);
            let mut name = match t.kind {
                Kind::QuotedIdent => std::str::from_utf8(&text[1..text.len() - 1])
                    .ok()?
                    .replace("\"\"", "\""),
                // PostgreSQL folds unquoted identifiers in ASCII only.
                Kind::Word => std::str::from_utf8(text).ok()?.to_ascii_lowercase(),
                _ => return None,
            };
            if !name.is_ascii() {
                return None;
            }
            // PostgreSQL keeps 63 bytes of an identifier (NAMEDATALEN - 1).
            name.truncate(name.len().min(63));
            Some(name.into())
        };
        let control = |name: Option<Box<str>>, make: fn(Box<str>) -> Control| {
            name.map_or(Control::Unseen, make)
        };
        if word(0, b"savepoint") {
            return control(name(t.get(1)), Control::Savepoint);
        }
        if word(0, b"release") {
            return control(name(t.last()), Control::Release);
        }
        if word(0, b"rollback") && t.iter().any(|x| x.is_word(sql, b"to")) {
            return control(name(t.last()), Control::RollbackTo);
        }
        Control::Other
    }
}

fn starts_with_word(sql: &[u8], word: &[u8]) -> bool {
    Lexer::new(sql, Dialect::DEFAULT)
        .next()
        .is_some_and(|t| t.is_word(sql, word))
}

/// Whether `sql` names a transaction-control word anywhere.
/// Not inside a routine's body, which runs when it is called (its `END`
/// controls nothing); a body left open counts.
fn controls_transactions(sql: &[u8]) -> bool {
    let mut bodies = crate::session::split::Bodies::default();
    let toks = tokens(sql);
    let outside: Vec<&Token> = toks
        .iter()
        .filter(|t| bodies.place(t, sql) != crate::session::split::Place::Body)
        .collect();
    let words = if bodies.balanced() {
        outside
    } else {
        toks.iter().collect()
    };
    words.into_iter().any(|t| {
        [
            &b"rollback"[..],
            b"abort",
            b"savepoint",
            b"release",
            b"commit",
            b"end",
            b"prepare",
        ]
        .iter()
        .any(|w| t.is_word(sql, w))
    })
}

/// A transaction's results waiting for its outcome.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Results of the open transaction, with the outcome already decided
    /// for those a `ROLLBACK TO SAVEPOINT` undid.
    held: Vec<Event>,
    /// A statement resolved since the last end: a transaction is open.
    open: bool,
    /// The server reported an error in it.
    failed: bool,
    /// Its outcome cannot be told (see [`Control::Mixed`]).
    unknowable: bool,
    /// Savepoints: name, how many results were held when it was set, and
    /// whether the transaction had failed by then.
    savepoints: Vec<(Box<str>, usize, bool)>,
}

impl Ledger {
    /// A statement resolved with `result` (its `status` and `command_tag`
    /// set) and `control`. Returns the results to write now.
    pub fn statement(&mut self, result: Event, control: &Control) -> Vec<Event> {
        self.open = true;
        let ok = result.status == Some(crate::audit::Status::Ok);
        let unknown = result.status == Some(crate::audit::Status::Unknown);
        let tag = result.command_tag.clone().unwrap_or_default();
        // What a statement of unknown outcome did cannot be told, nor so
        // its transaction's outcome.
        self.failed |= !ok && !unknown;
        self.unknowable |= unknown;
        self.held.push(result);
        if matches!(control, Control::Mixed | Control::Unseen) {
            self.unknowable = true;
        }
        if !ok {
            return self.spill();
        }
        match (tag.as_str(), control) {
            ("COMMIT", _) => self.end(TxOutcome::Committed),
            ("ROLLBACK", Control::RollbackTo(name)) => {
                self.rewind(name);
                self.spill()
            }
            ("ROLLBACK", Control::PrepareTransaction) => {
                self.unknowable = true;
                self.spill()
            }
            ("ROLLBACK", _) => self.end(TxOutcome::RolledBack),
            ("PREPARE TRANSACTION", _) => self.end(TxOutcome::Prepared),
            ("SAVEPOINT", Control::Savepoint(name)) => {
                self.savepoints
                    .push((name.clone(), self.held.len(), self.failed));
                self.spill()
            }
            ("RELEASE", Control::Release(name)) => {
                if let Some(i) = self.savepoints.iter().rposition(|(n, ..)| n == name) {
                    self.savepoints.truncate(i);
                }
                self.spill()
            }
            _ => self.spill(),
        }
    }

    /// The server reported an error that is no statement's own (a commit
    /// at `Sync` that failed): the transaction rolls back.
    pub fn error(&mut self) {
        self.failed = true;
    }

    /// `ReadyForQuery` with `status`: at `I` any open transaction is over.
    pub fn ready(&mut self, status: u8) -> Vec<Event> {
        if status != b'I' {
            return Vec::new();
        }
        if !self.open {
            // An error that ended no statement of ours (a refusal) is over.
            *self = Ledger::default();
            return Vec::new();
        }
        let outcome = if self.failed {
            TxOutcome::RolledBack
        } else {
            TxOutcome::Committed
        };
        self.end(outcome)
    }

    /// The server connection was lost with nothing in flight that could
    /// end the transaction: it rolled back (unless its outcome was
    /// unknowable already).
    pub fn lost(&mut self) -> Vec<Event> {
        if self.held.is_empty() && !self.open {
            return Vec::new();
        }
        self.end(TxOutcome::RolledBack)
    }

    /// The outcome can no longer be known (the server connection was lost,
    /// or the session ends with results still held).
    pub fn abandon(&mut self) -> Vec<Event> {
        if self.held.is_empty() && !self.open {
            return Vec::new();
        }
        self.unknowable = true;
        self.end(TxOutcome::Unknown)
    }

    fn end(&mut self, outcome: TxOutcome) -> Vec<Event> {
        let outcome = if self.unknowable {
            TxOutcome::Unknown
        } else {
            outcome
        };
        let mut out = std::mem::take(&mut self.held);
        for ev in &mut out {
            ev.tx.get_or_insert(outcome);
        }
        *self = Ledger::default();
        out
    }

    /// `ROLLBACK TO SAVEPOINT name`: the results after the savepoint (not
    /// the `ROLLBACK TO` itself) were undone. The savepoint stays.
    fn rewind(&mut self, name: &str) {
        if self.unknowable {
            // A savepoint may have been set that the list lacks (a name
            // the gateway could not read for certain): the rewind may be
            // to it.
            return;
        }
        let Some(i) = self.savepoints.iter().rposition(|(n, ..)| **n == *name) else {
            // Set by code pgwarden cannot see: which statements it undid
            // cannot be told.
            self.unknowable = true;
            return;
        };
        let (_, from, failed) = self.savepoints[i];
        self.savepoints.truncate(i + 1);
        let to = self.held.len() - 1;
        for ev in &mut self.held[from..to] {
            ev.tx.get_or_insert(TxOutcome::RolledBack);
        }
        // Errors after the savepoint are undone with it.
        self.failed = failed;
    }

    /// Bounds memory: beyond [`MAX_HELD`] results, the oldest half goes
    /// out now, without `tx` (or with the one a rewind decided).
    fn spill(&mut self) -> Vec<Event> {
        if self.held.len() <= MAX_HELD {
            return Vec::new();
        }
        let n = MAX_HELD / 2;
        // A rewind to a savepoint set before the cut could no longer mark
        // the results it undoes.
        self.unknowable |= self.savepoints.iter().any(|sp| sp.1 < n);
        for sp in &mut self.savepoints {
            sp.1 = sp.1.saturating_sub(n);
        }
        self.held.drain(..n).collect()
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
