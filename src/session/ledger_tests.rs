//! The ledger without a server: which results leave with which outcome.

use super::{Control, Ledger, MAX_HELD};
use crate::audit::{Event, Kind, Status, TxOutcome};

fn result(statement: &str, tag: Option<&str>) -> Event {
    let mut ev = Event::new(Kind::Result);
    ev.statement = Some(statement.into());
    ev.status = Some(if tag.is_some() {
        Status::Ok
    } else {
        Status::Error
    });
    ev.command_tag = tag.map(String::from);
    ev
}

/// Feeds `(sql, tag or None for an error)` and `ReadyForQuery` statuses
/// (`sql` = "Z" + status), returns (statement, tx) in the order released.
fn run(steps: &[(&str, Option<&str>)]) -> Vec<(String, Option<TxOutcome>)> {
    let mut ledger = Ledger::default();
    let mut out = Vec::new();
    for (sql, tag) in steps {
        let released = match sql.strip_prefix('Z') {
            Some(status) => ledger.ready(status.as_bytes()[0]),
            None => ledger.statement(result(sql, *tag), &Control::of(sql.as_bytes())),
        };
        out.extend(released);
    }
    out.extend(ledger.abandon());
    out.into_iter()
        .map(|ev| (ev.statement.unwrap(), ev.tx))
        .collect()
}

fn tx(list: &[(String, Option<TxOutcome>)], sql: &str) -> Option<TxOutcome> {
    list.iter().find(|(s, _)| s == sql).and_then(|(_, t)| *t)
}

use TxOutcome::*;

#[test]
fn explicit_transactions_end_at_their_tag() {
    let out = run(&[
        ("BEGIN", Some("BEGIN")),
        ("INSERT a", Some("INSERT 0 1")),
        ("ZT", None),
        ("COMMIT", Some("COMMIT")),
        ("ZI", None),
        ("BEGIN", Some("BEGIN")),
        ("INSERT b", Some("INSERT 0 1")),
        ("ROLLBACK", Some("ROLLBACK")),
        ("ZI", None),
    ]);
    assert_eq!(tx(&out, "INSERT a"), Some(Committed));
    assert_eq!(tx(&out, "INSERT b"), Some(RolledBack));
    assert_eq!(out.len(), 6, "every result released once: {out:?}");
}

#[test]
fn an_error_rolls_back_the_implicit_transaction_and_commit_of_a_failed_one() {
    // A pipeline: the later error undoes the earlier insert.
    let out = run(&[
        ("INSERT a", Some("INSERT 0 1")),
        ("SELECT 1/0", None),
        ("ZI", None),
        ("INSERT b", Some("INSERT 0 1")),
        ("ZI", None),
    ]);
    assert_eq!(tx(&out, "INSERT a"), Some(RolledBack));
    assert_eq!(tx(&out, "SELECT 1/0"), Some(RolledBack));
    assert_eq!(tx(&out, "INSERT b"), Some(Committed));
    // COMMIT of an aborted transaction answers ROLLBACK.
    let out = run(&[
        ("BEGIN", Some("BEGIN")),
        ("INSERT a", Some("INSERT 0 1")),
        ("SELECT 1/0", None),
        ("ZE", None),
        ("COMMIT", Some("ROLLBACK")),
        ("ZI", None),
    ]);
    assert_eq!(tx(&out, "INSERT a"), Some(RolledBack));
    // A commit at Sync that failed (a deferred constraint).
    let mut ledger = Ledger::default();
    assert!(ledger
        .statement(result("INSERT a", Some("INSERT 0 1")), &Control::Other)
        .is_empty());
    ledger.error();
    let out = ledger.ready(b'I');
    assert_eq!(out[0].tx, Some(RolledBack));
}

#[test]
fn rollback_to_savepoint_undoes_only_what_followed_it() {
    let out = run(&[
        ("BEGIN", Some("BEGIN")),
        ("INSERT a", Some("INSERT 0 1")),
        ("SAVEPOINT \"S1\"", Some("SAVEPOINT")),
        ("INSERT b", Some("INSERT 0 1")),
        ("INSERT dup", None),
        ("ROLLBACK TO SAVEPOINT \"S1\"", Some("ROLLBACK")),
        ("INSERT c", Some("INSERT 0 1")),
        ("RELEASE S1", Some("RELEASE")),
        ("COMMIT", Some("COMMIT")),
        ("ZI", None),
    ]);
    assert_eq!(tx(&out, "INSERT a"), Some(Committed));
    assert_eq!(tx(&out, "INSERT b"), Some(RolledBack));
    assert_eq!(tx(&out, "INSERT dup"), Some(RolledBack));
    assert_eq!(tx(&out, "INSERT c"), Some(Committed));
    // A savepoint the ledger never saw: unknown rather than a guess.
    let out = run(&[
        ("BEGIN", Some("BEGIN")),
        ("INSERT a", Some("INSERT 0 1")),
        ("ROLLBACK TO other", Some("ROLLBACK")),
        ("COMMIT", Some("COMMIT")),
    ]);
    assert_eq!(tx(&out, "INSERT a"), Some(Unknown));
}

#[test]
fn prepared_mixed_and_abandoned_transactions() {
    let out = run(&[
        ("BEGIN", Some("BEGIN")),
        ("INSERT a", Some("INSERT 0 1")),
        ("PREPARE TRANSACTION 'x'", Some("PREPARE TRANSACTION")),
    ]);
    assert_eq!(tx(&out, "INSERT a"), Some(Prepared));
    let out = run(&[
        ("INSERT a; COMMIT; SELECT 1", Some("SELECT 1")),
        ("ZI", None),
    ]);
    assert_eq!(tx(&out, "INSERT a; COMMIT; SELECT 1"), Some(Unknown));
    let out = run(&[("BEGIN", Some("BEGIN")), ("INSERT a", Some("INSERT 0 1"))]);
    assert_eq!(
        tx(&out, "INSERT a"),
        Some(Unknown),
        "the server connection was lost"
    );
}

#[test]
fn a_long_transaction_spills_its_oldest_results() {
    let mut ledger = Ledger::default();
    let mut early = Vec::new();
    for i in 0..MAX_HELD + 1 {
        early.extend(ledger.statement(
            result(&format!("INSERT {i}"), Some("INSERT 0 1")),
            &Control::Other,
        ));
    }
    assert_eq!(early.len(), MAX_HELD / 2);
    assert!(early.iter().all(|ev| ev.tx.is_none()));
    let rest = ledger.statement(result("COMMIT", Some("COMMIT")), &Control::Other);
    assert_eq!(early.len() + rest.len(), MAX_HELD + 2);
    assert!(rest.iter().all(|ev| ev.tx == Some(Committed)));
}

#[test]
fn control_reads_the_last_statement() {
    assert_eq!(Control::of(b"SAVEPOINT a"), Control::Savepoint("a".into()));
    let long = format!("SAVEPOINT {}", "x".repeat(1 << 20));
    assert_eq!(
        Control::of(long.as_bytes()),
        Control::Savepoint("x".repeat(63).into())
    );
    assert_eq!(
        Control::of(b"savepoint \"A b\";"),
        Control::Savepoint("A b".into())
    );
    assert_eq!(
        Control::of(b"ROLLBACK TO SAVEPOINT A"),
        Control::RollbackTo("a".into())
    );
    assert_eq!(
        Control::of(b"rollback work to b"),
        Control::RollbackTo("b".into())
    );
    assert_eq!(
        Control::of(b"RELEASE SAVEPOINT c"),
        Control::Release("c".into())
    );
    assert_eq!(Control::of(b"ROLLBACK"), Control::Other);
    assert_eq!(
        Control::of(b"prepare transaction 'x'"),
        Control::PrepareTransaction
    );
    assert_eq!(Control::of(b"PREPARE s AS SELECT 1"), Control::Other);
    assert_eq!(Control::of(b"SELECT 'savepoint x'"), Control::Other);
    assert_eq!(Control::of(b"COMMIT; SELECT 1"), Control::Mixed);
    assert_eq!(
        Control::of(b"ROLLBACK; INSERT INTO t VALUES (1)"),
        Control::Mixed
    );
    assert_eq!(Control::of(b"CALL p_commits()"), Control::Unseen);
    // Red team rt40: names the gateway cannot read for certain make the
    // outcome unknown (U&"\0061" is `a`; LATIN1 bytes read lossily were
    // one name).
    assert_eq!(Control::of(b"SAVEPOINT U&\"\\0061\""), Control::Unseen);
    assert_eq!(Control::of(b"ROLLBACK TO \"x\xc9\""), Control::Unseen);
    assert_eq!(Control::of(b"release caf\xc3\xa9"), Control::Unseen);
    // A routine's body runs when it is called: its END controls nothing.
    let body =
        b"CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1 AS end; SELECT 2; END";
    assert_eq!(Control::of(body), Control::Other);
    assert_eq!(
        Control::of(b"DO $$BEGIN CALL pg_temp.p(); END$$"),
        Control::Unseen
    );
    assert_eq!(Control::of(b"DO $$BEGIN COMMIT; END$$"), Control::Unseen);
    // Several statements kept as one record (the gateway splits texts
    // it can): which of them controls the transaction cannot be told.
    assert_eq!(
        Control::of(b"BEGIN; INSERT INTO t VALUES (1); SAVEPOINT s"),
        Control::Mixed
    );
}

/// Red team rt43: `PREPARE TRANSACTION` outside a block is ignored (tag
/// `ROLLBACK`) and the batch commits; in a failed block the same tag
/// means rolled back. The tag cannot tell: unknown, never wrong.
#[test]
fn a_prepare_transaction_tagged_rollback_is_unknown() {
    let out = run(&[
        ("INSERT a", Some("INSERT 0 1")),
        ("PREPARE TRANSACTION 'x'", Some("ROLLBACK")),
        ("ZI", None),
        ("BEGIN", Some("BEGIN")),
        ("INSERT b", Some("INSERT 0 1")),
        ("PREPARE TRANSACTION 'y'", Some("PREPARE TRANSACTION")),
        ("ZI", None),
    ]);
    assert_eq!(tx(&out, "INSERT a"), Some(Unknown));
    assert_eq!(tx(&out, "INSERT b"), Some(Prepared));
}
