//! Unit tests of the response tracker: what each server message resolves.

use super::*;
use crate::protocol::messages::function_result;
use crate::protocol::sqlstate;

fn p(ticket: u64) -> Option<Pending> {
    Some(Pending {
        ticket,
        started: Instant::now(),
        control: Default::default(),
    })
}

fn error_body(code: &str) -> Vec<u8> {
    format!("SERROR\0C{code}\0Mboom\0\0").into_bytes()
}

fn route(t: &mut Tracker, tag: u8, body: &[u8], resolved: &mut Vec<Resolved>) -> Route {
    t.on_server(tag, body, resolved, &mut CacheEffects::default())
}

/// An error at `Parse` or `Bind` is its statement's outcome (with the
/// SQLSTATE the client got); only the statements after it in the batch
/// were not executed.
#[test]
fn parse_and_bind_errors_belong_to_their_statement() {
    for failing in [b'1', b'2'] {
        let mut t = Tracker::default();
        let mut r = Vec::new();
        for seq in 1..=2 {
            t.parse(false, None);
            t.bind(None, None, 0);
            t.execute(p(seq));
        }
        t.sync();
        if failing == b'2' {
            route(&mut t, b'1', b"", &mut r);
        }
        route(&mut t, b'E', &error_body("42501"), &mut r);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].pending.ticket, 1);
        assert!(matches!(&r[0].outcome, Outcome::Error { code, .. } if code == "42501"));
        assert!(matches!(r[1].outcome, Outcome::NotExecuted { .. }));
        route(&mut t, b'Z', b"I", &mut r);
        assert!(t.is_empty());
    }
}

#[test]
fn pipeline_error_skips_rest_until_sync() {
    let mut t = Tracker::default();
    let mut r = Vec::new();
    for seq in 1..=3 {
        t.parse(false, None);
        t.bind(None, None, 0);
        t.execute(p(seq));
    }
    t.sync();
    t.execute(p(4));
    t.sync();
    for tag in [b'1', b'2'] {
        assert_eq!(route(&mut t, tag, b"", &mut r), Route::Forward);
    }
    route(&mut t, b'C', b"SELECT 1\0", &mut r);
    assert_eq!(r.pop().unwrap().pending.ticket, 1);
    route(&mut t, b'1', b"", &mut r);
    route(&mut t, b'2', b"", &mut r);
    route(&mut t, b'E', &error_body("22012"), &mut r);
    assert_eq!(r.len(), 2);
    assert!(matches!(&r[0].outcome, Outcome::Error { code, .. } if code == "22012"));
    assert_eq!(r[1].pending.ticket, 3);
    assert!(matches!(r[1].outcome, Outcome::NotExecuted { .. }));
    r.clear();
    route(&mut t, b'Z', b"I", &mut r);
    assert!(!t.is_empty());
    route(&mut t, b'C', b"SELECT 1\0", &mut r);
    assert_eq!(r[0].pending.ticket, 4);
    route(&mut t, b'Z', b"I", &mut r);
    assert!(t.is_empty());
}

#[test]
fn syncs_sent_into_a_copy_in_are_not_awaited() {
    let mut t = Tracker::default();
    let mut r = Vec::new();
    t.bind(None, None, 0);
    t.execute(p(1));
    t.sync();
    route(&mut t, b'2', b"", &mut r);
    route(&mut t, b'G', b"\0\0\0", &mut r);
    // The client ends the copy and syncs again; only that Sync is answered.
    t.sync();
    route(&mut t, b'C', b"COPY 3\0", &mut r);
    assert_eq!(
        r[0].outcome,
        Outcome::Ok {
            tag: Some("COPY 3".into()),
            rows: Some(3)
        }
    );
    route(&mut t, b'Z', b"T", &mut r);
    assert!(t.is_empty());
}

#[test]
fn injected_queries_answers_never_reach_the_client() {
    let mut t = Tracker::default();
    let mut r = Vec::new();
    t.injected();
    t.query(p(5), None);
    for tag in [b'T', b'D', b'C', b'S', b'E'] {
        assert_eq!(route(&mut t, tag, b"", &mut r), Route::Drop);
    }
    assert_eq!(route(&mut t, b'Z', b"T", &mut r), Route::Drop);
    assert_eq!(route(&mut t, b'C', b"SELECT 1\0", &mut r), Route::Forward);
    assert_eq!(route(&mut t, b'Z', b"T", &mut r), Route::Forward);
    assert_eq!(r.len(), 1);
    assert!(t.is_empty());
}

#[test]
fn multi_statement_query_keeps_last_tag_and_first_error() {
    let mut t = Tracker::default();
    let mut r = Vec::new();
    t.query(p(7), None);
    route(&mut t, b'C', b"INSERT 0 2\0", &mut r);
    route(&mut t, b'E', &error_body("23505"), &mut r);
    assert!(r.is_empty());
    route(&mut t, b'Z', b"I", &mut r);
    assert!(matches!(&r[0].outcome, Outcome::Error { code, .. } if code == "23505"));
    assert!(t.is_empty());
}

#[test]
fn synthetic_answers_wait_for_their_turn() {
    let mut t = Tracker::default();
    let mut out = BytesMut::new();
    t.parse(false, Some(1));
    t.synth_parse();
    t.bind(None, None, 0);
    t.sync();
    t.emit_synthetic(b'I', &mut out);
    assert!(out.is_empty(), "the first Parse is still owed");
    route(&mut t, b'1', b"", &mut Vec::new());
    t.emit_synthetic(b'I', &mut out);
    assert_eq!(&out[..], b"1\0\0\0\x04");
    route(&mut t, b'2', b"", &mut Vec::new());
    route(&mut t, b'Z', b"I", &mut Vec::new());
    assert!(t.is_empty());
}

#[test]
fn injected_messages_answers_are_dropped_and_failed_parses_uncached() {
    let mut t = Tracker::default();
    let mut cache = CacheEffects::default();
    t.parse(true, Some(9));
    t.bind(None, None, 0);
    t.parse(false, Some(10));
    t.sync();
    assert_eq!(
        t.on_server(b'1', b"", &mut Vec::new(), &mut cache),
        Route::Drop
    );
    assert_eq!(
        t.on_server(b'E', &error_body("42P01"), &mut Vec::new(), &mut cache),
        Route::Forward
    );
    assert_eq!(cache.not_prepared, vec![10]);
}

#[test]
fn blocked_statements_get_their_substitute_error() {
    let mut t = Tracker::default();
    let mut r = Vec::new();
    let guard = PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "no");
    t.query(None, Some(guard.clone()));
    assert_eq!(
        route(&mut t, b'E', &error_body("42601"), &mut r),
        Route::Replace(guard.clone())
    );
    route(&mut t, b'Z', b"I", &mut r);
    assert!(r.is_empty() && t.is_empty());

    t.execute(p(1));
    t.blocked_parse(guard.clone());
    t.sync();
    route(&mut t, b'C', b"SELECT 1\0", &mut r);
    assert_eq!(
        route(&mut t, b'E', &error_body("42601"), &mut r),
        Route::Replace(guard)
    );
    route(&mut t, b'Z', b"I", &mut r);
    assert!(t.is_empty());
}

/// A multi-statement query: each `CommandComplete` resolves its statement
/// and moves to the next; after an error the rest were not executed; a
/// `Parse` the server skipped gives back the entry it replaced.
#[test]
fn each_statement_of_a_simple_query_resolves_in_turn() {
    let mut t = Tracker::default();
    let mut r = Vec::new();
    t.query(p(1), None);
    t.more_statements(vec![p(2), None, p(4)]);
    route(&mut t, b'C', b"INSERT 0 1\0", &mut r);
    route(&mut t, b'C', b"UPDATE 3\0", &mut r);
    route(&mut t, b'E', &error_body("22012"), &mut r);
    assert!(r.is_empty(), "held until the query's ReadyForQuery");
    route(&mut t, b'Z', b"I", &mut r);
    let ok = |tag: &str, rows| Outcome::Ok {
        tag: Some(tag.into()),
        rows: Some(rows),
    };
    // The third statement (unaudited, so no ticket to name) failed; the
    // fourth never ran.
    let got: Vec<(u64, &Outcome)> = r.iter().map(|r| (r.pending.ticket, &r.outcome)).collect();
    assert_eq!(
        got,
        [
            (1, &ok("INSERT 0 1", 1)),
            (2, &ok("UPDATE 3", 3)),
            (4, &Outcome::NotExecuted { after: None })
        ]
    );
    assert!(t.is_empty());

    let mut t = Tracker::default();
    let mut cache = CacheEffects::default();
    t.bind(None, None, 0);
    t.parse(false, None);
    t.restore_if_not_parsed(Box::new((bytes::Bytes::from_static(b"s1"), None)));
    t.parse(false, None);
    t.restore_if_not_parsed(Box::new((bytes::Bytes::new(), None)));
    t.sync();
    t.on_server(b'E', &error_body("08P01"), &mut Vec::new(), &mut cache);
    let names: Vec<&[u8]> = cache.restore.iter().map(|r| &r.0[..]).collect();
    assert_eq!(names, [&b""[..], b"s1"], "newest first");
}

#[test]
fn a_function_calls_result_is_recorded_as_a_number_or_a_length() {
    let value = |len: i32, bytes: &[u8]| {
        let mut body = len.to_be_bytes().to_vec();
        body.extend_from_slice(bytes);
        function_result(&body)
    };
    assert_eq!(value(4, &16405i32.to_be_bytes()).as_deref(), Some("16405"));
    assert_eq!(value(5, b"16405").as_deref(), Some("16405"));
    assert_eq!(value(-1, b"").as_deref(), Some("NULL"));
    assert_eq!(value(3, b"abc").as_deref(), Some("3 bytes"));
    assert_eq!(function_result(b"\0\0"), None);
}

/// The server's answers did not match the split (a `CommandComplete` more
/// than statements, or fewer without an error): which statement did what
/// cannot be told, and every record of the query says so.
#[test]
fn answers_that_do_not_match_the_split_make_every_statement_unknown() {
    for completes in [1, 3] {
        let mut t = Tracker::default();
        let mut r = Vec::new();
        t.query(p(1), None);
        t.more_statements(vec![p(2)]);
        for _ in 0..completes {
            route(&mut t, b'C', b"DELETE 5\0", &mut r);
        }
        route(&mut t, b'Z', b"I", &mut r);
        let got: Vec<(u64, &Outcome)> = r.iter().map(|r| (r.pending.ticket, &r.outcome)).collect();
        assert_eq!(
            got,
            [(1, &Outcome::Unknown), (2, &Outcome::Unknown)],
            "{completes}"
        );
    }
    // As many as statements: each its own.
    let mut t = Tracker::default();
    let mut r = Vec::new();
    t.query(p(1), None);
    t.more_statements(vec![p(2)]);
    route(&mut t, b'C', b"SELECT 1\0", &mut r);
    route(&mut t, b'C', b"DELETE 5\0", &mut r);
    route(&mut t, b'Z', b"I", &mut r);
    assert!(r.iter().all(|r| matches!(r.outcome, Outcome::Ok { .. })));
    // A query kept whole answers as many as it holds.
    let mut t = Tracker::default();
    t.query(p(1), None);
    route(&mut t, b'C', b"SELECT 1\0", &mut r);
    route(&mut t, b'C', b"DELETE 5\0", &mut r);
    r.clear();
    route(&mut t, b'Z', b"I", &mut r);
    assert!(matches!(r[0].outcome, Outcome::Ok { .. }));
}
