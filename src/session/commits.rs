//! What a statement does to its transaction, as far as identity goes: after
//! opaque code (see [`super::opaque`]) a request must not start another
//! transaction before pgwarden asserts identity afresh, so the relay needs
//! to know whether a query string or prepared statement commits, goes on
//! after a commit, or commits and at once starts a transaction.
//!
//! Invariant: one lexing pass answers every question, and none at all for
//! the statements (most of them) that name no transaction control.

use crate::identity::decode::string_value;
use crate::identity::lexer::{Dialect, Kind, Lexer};
use crate::session::split::{Bodies, Place};

/// What the statements of one text do to transactions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Commits {
    /// A statement ends its transaction keeping its effects (`COMMIT`,
    /// `END`, `PREPARE TRANSACTION`, `... AND CHAIN`).
    pub ends: bool,
    /// The text is one statement, a `CALL`: outside a transaction block
    /// its procedure may commit, and what follows it then runs in a new
    /// transaction. (In a text of several statements PostgreSQL lets no
    /// procedure commit: 2D000.)
    pub calls: bool,
    /// The text starts with `BEGIN` or `START`: a transaction block, where
    /// no procedure may commit, follows.
    pub begins: bool,
    /// Another statement follows one that ends its transaction.
    pub more_after: bool,
    /// A statement commits and at once starts a new transaction (`COMMIT
    /// AND CHAIN`, `END AND CHAIN`; not `AND NO CHAIN`).
    pub chains: bool,
    /// A `DO` block controls transactions inside (`COMMIT` or `ROLLBACK`,
    /// or a `CALL` of a procedure that may): its code after the `COMMIT`
    /// runs in a new transaction.
    pub block_commits: bool,
    /// A statement ends its transaction undoing it (`ROLLBACK`, `ABORT`;
    /// not `ROLLBACK TO SAVEPOINT` or `ROLLBACK PREPARED`).
    pub rolls_back: bool,
}

impl Commits {
    /// What `sql` does to transactions, under either setting of
    /// `standard_conforming_strings`: with it off, a backslash in `'...'`
    /// escapes, so `'a\'; COMMIT; ...'` is no longer one string, and a
    /// session can turn it off in the very request it sends the text in
    /// (the gateway learns the setting only from the server's answer). A
    /// text with a backslash counts what either reading does, as the
    /// statement guard reads both.
    pub fn of(sql: &[u8]) -> Commits {
        let begins = begins(sql);
        if !mentions_transaction_control(sql) {
            return Commits {
                begins,
                ..Commits::default()
            };
        }
        let standard = Commits::read(sql, Dialect::DEFAULT);
        let commits = match sql.contains(&b'\\') {
            false => standard,
            true => {
                let escaping = Dialect {
                    standard_strings: false,
                    ..Dialect::DEFAULT
                };
                standard.or(Commits::read(sql, escaping))
            }
        };
        Commits { begins, ..commits }
    }

    /// What either of `self` and `other` does.
    fn or(self, other: Commits) -> Commits {
        Commits {
            ends: self.ends || other.ends,
            calls: self.calls || other.calls,
            begins: self.begins || other.begins,
            more_after: self.more_after || other.more_after,
            chains: self.chains || other.chains,
            block_commits: self.block_commits || other.block_commits,
            rolls_back: self.rolls_back || other.rolls_back,
        }
    }

    /// What `sql`, read in `dialect`, does to transactions.
    fn read(sql: &[u8], dialect: Dialect) -> Commits {
        let (commits, balanced) = Commits::read_as(sql, dialect, true);
        match balanced {
            true => commits,
            // A body left open (the server refuses such a text): what its
            // statements would do counts too.
            false => commits.or(Commits::read_as(sql, dialect, false).0),
        }
    }

    /// What `sql` does to transactions, the statements inside routine
    /// bodies left out when `bodies` ([`Bodies`]); and whether the text
    /// ends outside every body.
    fn read_as(sql: &[u8], dialect: Dialect, bodies: bool) -> (Commits, bool) {
        let mut places = Bodies::default();
        let mut c = Commits::default();
        // The current statement: its first token, whether it ends its
        // transaction, whether it is a `DO`; the token before this one.
        let mut first: Option<&[u8]> = None;
        let mut statements = 0usize;
        let mut ends = false;
        let mut rolls_back = false;
        let mut in_do = false;
        let mut prev: &[u8] = b"";
        for tok in Lexer::new(sql, dialect) {
            let text = tok.text(sql);
            let place = match bodies {
                true => places.place(&tok, sql),
                false if tok.is_punct(sql, b";") => Place::End,
                false => Place::Statement,
            };
            if place == Place::Body {
                continue;
            }
            if place == Place::End {
                c.ends |= ends;
                c.rolls_back |= rolls_back;
                (first, ends, rolls_back, in_do) = (None, false, false, false);
                continue;
            }
            let first = match first {
                Some(first) => first,
                None => {
                    c.more_after |= c.ends;
                    statements += 1;
                    c.calls = statements == 1 && tok.is_word(sql, b"call");
                    ends = one_of(&[b"commit", b"end"], text);
                    rolls_back = one_of(&[b"rollback", b"abort"], text);
                    in_do = tok.is_word(sql, b"do");
                    *first.insert(text)
                }
            };
            if tok.kind == Kind::Word && text.eq_ignore_ascii_case(b"chain") {
                ends = true;
                c.chains |=
                    one_of(&[b"commit", b"end"], first) && !prev.eq_ignore_ascii_case(b"no");
            }
            if tok.kind == Kind::Word
                && text.eq_ignore_ascii_case(b"transaction")
                && first.eq_ignore_ascii_case(b"prepare")
            {
                ends = true;
            }
            if tok.kind == Kind::Word && one_of(&[b"to", b"prepared"], text) {
                rolls_back = false;
            }
            if in_do && matches!(tok.kind, Kind::Str(_)) {
                let body = string_value(sql, &tok, dialect, b'\\');
                c.block_commits |= Lexer::new(&body, dialect).any(|b| {
                    let word = |w: &[u8]| b.is_word(&body, w);
                    word(b"commit") || word(b"rollback") || word(b"call")
                });
            }
            prev = text;
        }
        c.ends |= ends;
        c.rolls_back |= rolls_back;
        (c, places.balanced())
    }

    /// A statement ends its transaction block, committed or not.
    pub fn ends_block(&self) -> bool {
        self.ends || self.rolls_back
    }

    /// Whether, after opaque code, this text would start a transaction
    /// before pgwarden could assert identity afresh: it commits and goes
    /// on, commits and chains, or runs a `DO` block that commits inside.
    pub fn starts_another_transaction(&self) -> bool {
        self.more_after || self.chains || self.block_commits
    }

    /// Whether the first statement of `sql` is `ROLLBACK` or `ABORT` (with
    /// `TO SAVEPOINT`, `AND CHAIN`...; not `ROLLBACK PREPARED`): what
    /// PostgreSQL still runs in an aborted transaction, besides `COMMIT`.
    pub fn rolls_back_first(sql: &[u8]) -> bool {
        let mut words = Lexer::new(sql, Dialect::DEFAULT).take(2);
        let first = words.next();
        let second = words.next();
        first.is_some_and(|t| t.is_word(sql, b"rollback") || t.is_word(sql, b"abort"))
            && !second.is_some_and(|t| t.is_word(sql, b"prepared"))
    }
}

/// Whether `sql` starts with `BEGIN` or `START` (read without lexing
/// unless a comment comes first: every simple query asks).
fn begins(sql: &[u8]) -> bool {
    let start = sql.iter().position(|b| !b.is_ascii_whitespace());
    let rest = &sql[start.unwrap_or(sql.len())..];
    if rest.starts_with(b"--") || rest.starts_with(b"/*") {
        let first = Lexer::new(sql, Dialect::DEFAULT).next();
        return first.is_some_and(|t| t.is_word(sql, b"begin") || t.is_word(sql, b"start"));
    }
    let word = |w: &[u8]| {
        rest.len() >= w.len()
            && rest[..w.len()].eq_ignore_ascii_case(w)
            && !rest.get(w.len()).is_some_and(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$') || *b >= 0x80
            })
    };
    word(b"begin") || word(b"start")
}

fn one_of(list: &[&[u8]], word: &[u8]) -> bool {
    list.iter().any(|k| word.eq_ignore_ascii_case(k))
}

/// Whether `sql` may control transactions: it contains `commit`, `end`,
/// `chain`, `prepare`, `rollback`, `abort` or `call`, ignoring ASCII case.
fn mentions_transaction_control(sql: &[u8]) -> bool {
    static CONTROL: crate::identity::keywords::Keywords =
        crate::identity::keywords::Keywords::new(&[
            "commit", "end", "chain", "prepare", "rollback", "abort", "call",
        ]);
    CONTROL.in_text(sql)
}

#[cfg(test)]
mod tests {
    use super::Commits;

    #[test]
    fn what_rolls_back_first() {
        for sql in [
            "ROLLBACK",
            "rollback;",
            "ABORT WORK",
            "ROLLBACK TO SAVEPOINT s",
            "/* c */ Rollback AND CHAIN; SELECT 1",
        ] {
            assert!(Commits::rolls_back_first(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "COMMIT",
            "SELECT 1; ROLLBACK",
            "ROLLBACK PREPARED 'x'",
            "",
            "END",
        ] {
            assert!(!Commits::rolls_back_first(sql.as_bytes()), "{sql}");
        }
    }

    fn continues_after_commit(sql: &[u8]) -> bool {
        Commits::of(sql).more_after
    }

    fn ends_transaction(sql: &[u8]) -> bool {
        Commits::of(sql).ends
    }

    fn commits_and_chains(sql: &[u8]) -> bool {
        Commits::of(sql).chains
    }

    fn do_block_commits(sql: &[u8]) -> bool {
        Commits::of(sql).block_commits
    }

    #[test]
    fn commits_followed_by_more() {
        for sql in [
            "SELECT f(); COMMIT; SELECT 1",
            "BEGIN; DO $$ $$; END; SELECT 1",
            "COMMIT AND CHAIN; SELECT 1",
            "PREPARE TRANSACTION 'x'; SELECT 1",
        ] {
            assert!(continues_after_commit(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "BEGIN; CREATE TABLE t (x int); COMMIT",
            "COMMIT;",
            "SELECT 'commit'; SELECT 1",
            "ROLLBACK; SELECT 1",
        ] {
            assert!(!continues_after_commit(sql.as_bytes()), "{sql}");
        }
        assert!(ends_transaction(b"COMMIT"));
        assert!(ends_transaction(b"end"));
        assert!(ends_transaction(b"COMMIT AND CHAIN"));
        assert!(!ends_transaction(b"SELECT 1"));
        assert!(!ends_transaction(b"ROLLBACK"));
    }

    #[test]
    fn a_backslash_counts_both_readings_of_a_string() {
        // With standard_conforming_strings off the server reads
        // `'a\'; SELECT '` as one string, then COMMIT, then a SELECT in a
        // new transaction (red team, stop 33).
        let hidden = br"SELECT 'a\'; SELECT '; COMMIT; SELECT current_user --'";
        assert!(continues_after_commit(hidden));
        assert!(ends_transaction(hidden));
        // Read with the setting on: a COMMIT in one of the readings.
        assert!(continues_after_commit(
            br"SELECT 'a\'; COMMIT; SELECT 1 --'"
        ));
        // Neither reading commits: nothing to count.
        let plain = br"SELECT 'a\b'; SELECT 'commit'";
        assert!(!continues_after_commit(plain));
        assert!(!ends_transaction(plain));
    }

    #[test]
    fn what_ends_a_block() {
        for sql in [
            "ROLLBACK",
            "abort work",
            "SELECT 1; ROLLBACK",
            "COMMIT",
            "END",
            "PREPARE TRANSACTION 'x'",
        ] {
            assert!(Commits::of(sql.as_bytes()).ends_block(), "{sql}");
        }
        for sql in [
            "ROLLBACK TO SAVEPOINT s",
            "rollback work to s",
            "ROLLBACK PREPARED 'x'",
            "SELECT 'rollback'",
            "SAVEPOINT abort",
            "SELECT 1",
        ] {
            assert!(!Commits::of(sql.as_bytes()).ends_block(), "{sql}");
        }
    }

    #[test]
    fn chains_and_do_commits() {
        assert!(commits_and_chains(b"BEGIN; SELECT 1; COMMIT AND CHAIN"));
        assert!(commits_and_chains(b"end and chain"));
        assert!(!commits_and_chains(b"COMMIT AND NO CHAIN"));
        assert!(!commits_and_chains(b"ROLLBACK AND CHAIN"));
        assert!(!commits_and_chains(b"SELECT 'commit and chain'"));
        assert!(do_block_commits(b"DO $$BEGIN PERFORM 1; COMMIT; END$$"));
        assert!(do_block_commits(b"do 'begin rollback; end'"));
        assert!(!do_block_commits(
            b"DO $$BEGIN RAISE NOTICE 'commit'; END$$"
        ));
        assert!(!do_block_commits(b"SELECT 'do $$ commit $$'"));
    }

    /// Red team rt40: a procedure may commit, and what follows its `CALL`
    /// in the same unsynced batch then runs in a new transaction.
    #[test]
    fn a_call_alone_may_commit() {
        let calls = |sql: &[u8]| Commits::of(sql).calls;
        assert!(calls(b"CALL p()"));
        assert!(calls(b"/* x */ call p(1);"));
        // Several statements: PostgreSQL lets no procedure commit.
        assert!(!calls(b"SELECT f(); CALL p()"));
        assert!(!calls(b"CALL p(); SELECT 1"));
        assert!(!calls(b"SELECT recall FROM called"));
        let begins = |sql: &[u8]| Commits::of(sql).begins;
        assert!(begins(b"BEGIN") && begins(b" -- x\n start transaction"));
        assert!(begins(b"BEGIN; COMMIT") && !begins(b"SELECT 1; BEGIN"));
        assert!(!begins(b"SELECT 'begin'") && !begins(b"set x = 1"));
        assert!(begins(b"begin;") && begins(b"START\tTRANSACTION") && !begins(b"started"));
        assert!(!begins(b"begin_x") && !begins(b"BEGIN\xc3\xa9"));
        // A DO block that calls a procedure may commit inside.
        assert!(do_block_commits(b"DO $$BEGIN CALL pg_temp.p(); END$$"));
    }

    /// Statements inside a routine's body run when it is called, not now:
    /// its `END` commits nothing (read as PostgreSQL's grammar reads it).
    #[test]
    fn a_routine_body_is_not_run_by_its_creation() {
        let create = b"CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1 AS end; COMMIT; SELECT 2; END";
        assert!(!ends_transaction(create));
        let mut after = create.to_vec();
        after.extend_from_slice(b"; COMMIT; SELECT 1");
        assert!(continues_after_commit(&after));
        // A body left open counts its statements, as a plain text would.
        assert!(continues_after_commit(
            b"CREATE FUNCTION f() BEGIN ATOMIC SELECT 1; COMMIT; SELECT 1;"
        ));
    }
}
