//! Code pgwarden cannot see into ("opaque", [`crate::session::opaque`])
//! over a session's life: when it ran, what it marks, and which requests it
//! makes the gateway refuse.
//!
//! Invariants:
//! - once a session ran opaque code (or started with settings that run
//!   some), everything it runs marks its connection: identity is asserted
//!   afresh before the next transaction, and the connection is reset
//!   before another session gets it;
//! - after opaque code, no request may commit and go on running in a new
//!   transaction (`COMMIT AND CHAIN`, a `DO` block that commits or calls
//!   a procedure, anything after `COMMIT`, or after a `CALL` outside a
//!   block, in one request or unsynced batch): the gateway asserts
//!   identity between transactions, and could not in the middle of one
//!   request.

use crate::session::commits::Commits;

/// Why a request that commits after opaque code and goes on is refused.
pub const COMMIT_THEN_MORE: &str = "a request must not start another transaction after COMMIT once code pgwarden cannot see has run in it (COMMIT AND CHAIN, a DO block that commits or calls a procedure, statements after COMMIT or after a CALL outside a block): pgwarden asserts identity afresh between transactions; send them separately";

/// Where opaque code ran.
#[derive(Debug, Default)]
pub struct Code {
    /// In this session, at any time.
    ever: bool,
    /// In the current transaction (until `ReadyForQuery` says idle).
    transaction: bool,
    /// In the extended batch since the last `Sync`.
    batch: bool,
    /// In that batch, followed by a statement that commits: nothing more
    /// may run before the `Sync`.
    batch_committed: bool,
    /// A request that ends the transaction block (`COMMIT`, `ROLLBACK`...)
    /// went out since the server last said the client was idle.
    ending: bool,
    /// The connection is in a transaction block, where no procedure may
    /// commit, as far as the gateway is certain, in the order it sends:
    /// set by a `BEGIN` that runs (not one only bound) and by a
    /// `ReadyForQuery` that answers everything sent; cleared by anything
    /// sent that may end the block (red team rt41: a `BEGIN` bound and
    /// never run, or a `ROLLBACK` earlier in the batch, left it set, and a
    /// committing `CALL` went on).
    in_block: bool,
    /// The same, but only as the server said it (a `BEGIN` sent may yet
    /// be skipped): red team rt44 had a skipped `BEGIN` hide the end of
    /// a transaction, and with it the end of its portals.
    confirmed: bool,
}

/// What a message about to be forwarded does to its connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Marking {
    /// Nothing: transparent, in a session that never ran opaque code.
    None,
    /// The connection is marked: `opaque` when this message itself runs
    /// opaque code, `first` when it is the session's first.
    Mark { opaque: bool, first: bool },
}

impl Code {
    /// A session whose startup settings run code pgwarden cannot see is
    /// opaque from the start.
    pub fn new(opaque_from_start: bool) -> Code {
        Code {
            ever: opaque_from_start,
            ..Code::default()
        }
    }

    /// A message about to be forwarded runs code that is `transparent` or not.
    pub fn note(&mut self, transparent: bool) -> Marking {
        if transparent && !self.ever {
            return Marking::None;
        }
        let first = !transparent && !self.ever;
        self.ever |= !transparent;
        self.transaction = true;
        Marking::Mark {
            opaque: !transparent,
            first,
        }
    }

    /// Whether a simple `Query` (`transparent` or not, doing `commits` to
    /// its transaction) must be refused with [`COMMIT_THEN_MORE`].
    pub fn refuses_query(&self, transparent: bool, commits: Commits) -> bool {
        let opaque = !transparent || self.ever || self.transaction;
        self.batch_committed || (opaque && commits.starts_another_transaction())
    }

    /// Whether the unsynced batch committed (or called a procedure that
    /// may) after opaque code: nothing more may run before its `Sync`, a
    /// simple query or `FunctionCall` no more than a `Bind` (red team
    /// rt42: a `Query` after such a `CALL` ran as the escaped role).
    pub fn batch_committed(&self) -> bool {
        self.batch_committed
    }

    /// A `Bind` of a statement that is `transparent` or not and does
    /// `commits`: `Err` when it must be refused with [`COMMIT_THEN_MORE`],
    /// otherwise the batch now holds it.
    pub fn bind(&mut self, transparent: bool, commits: Commits) -> Result<(), ()> {
        let chains = commits.chains || commits.block_commits;
        let opaque = !transparent || self.ever || self.transaction || self.batch;
        if self.batch_committed || (opaque && chains) {
            return Err(());
        }
        // A procedure called outside a block may commit (red team rt40:
        // what followed its CALL in the batch ran in a new transaction, as
        // the role an escape before it switched to).
        let may_commit = commits.ends || (commits.calls && !self.in_block);
        self.batch |= opaque;
        self.batch_committed |= opaque && may_commit;
        self.ending |= commits.ends_block() || may_commit;
        self.in_block &= !commits.ends_block();
        self.confirmed &= !commits.ends_block();
        Ok(())
    }

    /// An `Execute` of a portal whose statement does `commits` goes out.
    pub fn executed(&mut self, commits: Commits) {
        if commits.ends_block() {
            self.in_block = false;
            self.confirmed = false;
        } else if commits.begins {
            self.in_block = true;
        }
    }

    /// A simple query doing `commits` goes out.
    pub fn sent(&mut self, commits: Commits) {
        self.ending |= commits.ends_block() || (commits.calls && !self.in_block);
        self.executed(commits);
    }

    /// Whether a request that ends the transaction block is unanswered:
    /// if the connection is lost now, the block is over, committed or not.
    pub fn ending(&self) -> bool {
        self.ending
    }

    /// The client's `Sync` ends the batch.
    pub fn sync(&mut self) {
        self.batch = false;
        self.batch_committed = false;
    }

    /// `ReadyForQuery` with `status`.
    pub fn ready(&mut self, status: u8) {
        self.transaction &= status != b'I';
        self.ending &= status != b'I';
    }

    /// `ReadyForQuery` with `status`, with nothing sent after it still
    /// unanswered: the block is as the server says.
    pub fn settled(&mut self, status: u8) {
        self.in_block = status != b'I';
        self.confirmed = self.in_block;
    }

    /// Whether the server said the connection is in a transaction block,
    /// and nothing sent since may have ended it.
    pub fn confirmed_block(&self) -> bool {
        self.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Commits = Commits {
        ends: false,
        calls: false,
        begins: false,
        more_after: false,
        chains: false,
        block_commits: false,
        rolls_back: false,
    };
    const COMMIT: Commits = Commits { ends: true, ..NONE };
    const CHAIN: Commits = Commits {
        ends: true,
        chains: true,
        ..NONE
    };
    const COMMIT_THEN: Commits = Commits {
        ends: true,
        more_after: true,
        ..NONE
    };

    #[test]
    fn transparent_code_in_a_clean_session_marks_nothing() {
        let mut code = Code::default();
        assert_eq!(code.note(true), Marking::None);
        assert!(!code.refuses_query(true, COMMIT_THEN));
        assert!(code.bind(true, CHAIN).is_ok());
    }

    #[test]
    fn the_first_opaque_message_is_named_and_every_later_one_marks() {
        let mut code = Code::default();
        assert_eq!(
            code.note(false),
            Marking::Mark {
                opaque: true,
                first: true
            }
        );
        assert_eq!(
            code.note(false),
            Marking::Mark {
                opaque: true,
                first: false
            }
        );
        code.ready(b'I');
        // Transparent, but the session may have made objects that run
        // opaque code later.
        assert_eq!(
            code.note(true),
            Marking::Mark {
                opaque: false,
                first: false
            }
        );
    }

    #[test]
    fn opaque_startup_settings_make_the_session_opaque() {
        let mut code = Code::new(true);
        assert!(matches!(code.note(true), Marking::Mark { .. }));
        assert!(code.refuses_query(true, COMMIT_THEN));
    }

    #[test]
    fn a_query_that_commits_and_goes_on_is_refused_only_after_opaque_code() {
        let code = Code::default();
        assert!(!code.refuses_query(true, COMMIT_THEN));
        assert!(code.refuses_query(false, COMMIT_THEN));
        assert!(code.refuses_query(false, CHAIN));
        assert!(!code.refuses_query(false, COMMIT));
        assert!(!code.refuses_query(false, NONE));
    }

    #[test]
    fn opaque_code_earlier_in_the_transaction_counts_until_it_ends() {
        let mut code = Code::default();
        code.note(false);
        code.ready(b'T');
        assert!(code.refuses_query(true, COMMIT_THEN));
        code.ready(b'I');
        // The session stays opaque.
        assert!(code.refuses_query(true, COMMIT_THEN));
    }

    #[test]
    fn nothing_may_run_after_an_opaque_batch_commits_until_sync() {
        let mut code = Code::default();
        assert!(code.bind(false, NONE).is_ok());
        assert!(code.bind(true, COMMIT).is_ok());
        assert!(code.bind(true, NONE).is_err());
        code.sync();
        assert!(code.bind(true, NONE).is_ok());
    }

    #[test]
    fn a_chaining_bind_is_refused_once_the_batch_or_session_is_opaque() {
        let mut clean = Code::default();
        assert!(clean.bind(true, CHAIN).is_ok());
        let mut batch = Code::default();
        batch.bind(false, NONE).unwrap();
        assert!(batch.bind(true, CHAIN).is_err());
        let block = Commits {
            block_commits: true,
            ..NONE
        };
        assert!(Code::default().bind(false, block).is_err());
    }

    #[test]
    fn nothing_may_follow_a_call_in_its_batch_outside_a_block() {
        let call = Commits {
            calls: true,
            ..NONE
        };
        let mut code = Code::default();
        code.bind(false, call).unwrap();
        assert!(code.bind(true, NONE).is_err());
        assert!(code.refuses_query(true, NONE), "a simple query neither");
        code.sync();
        // In a transaction block no procedure commits.
        code.settled(b'T');
        code.bind(false, call).unwrap();
        assert!(code.bind(true, NONE).is_ok());
        code.sync();
        // Unless something sent before may have ended it (rt41).
        let rollback = Commits {
            rolls_back: true,
            ..NONE
        };
        code.bind(true, rollback).unwrap();
        code.bind(false, call).unwrap();
        assert!(code.bind(true, NONE).is_err(), "after a ROLLBACK");
        code.sync();
        code.settled(b'I');
        let begin = Commits {
            begins: true,
            ..NONE
        };
        // A BEGIN only bound opens nothing; one that runs does.
        code.bind(true, begin).unwrap();
        code.bind(false, call).unwrap();
        assert!(code.bind(true, NONE).is_err(), "BEGIN bound, not run");
        code.sync();
        code.bind(true, begin).unwrap();
        code.executed(begin);
        code.bind(false, call).unwrap();
        assert!(
            code.bind(true, NONE).is_ok(),
            "in the block the batch began"
        );
    }

    #[test]
    fn a_transparent_batch_that_commits_may_go_on() {
        let mut code = Code::default();
        assert!(code.bind(true, COMMIT).is_ok());
        assert!(code.bind(true, NONE).is_ok());
    }
}
