//! Unit tests of the sequencer, continued: refusals, large frames, opaque
//! code, pinning, the unnamed statement, cancelled statements.

use super::tests::Step::*;
use super::tests::*;
use super::*;
use crate::protocol::sqlstate;

#[test]
fn a_refusal_with_nothing_in_flight_is_answered_locally() {
    let refused = || PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "no");
    // Simple, no connection: error and ReadyForQuery at once.
    let mut seq = Sequencer::default();
    seq.refuse(Flow::Simple, refused());
    assert_eq!(take_client(&mut seq), "EZ");
    // Extended, no connection: error now, ReadyForQuery at the Sync; the
    // messages before it are skipped.
    let mut seq = Sequencer::default();
    let mut binds = Driver::default();
    seq.refuse(Flow::Extended, refused());
    client(&mut seq, &b(), &mut binds);
    client(&mut seq, &e(), &mut binds);
    assert_eq!(binds.binds, 0, "skipped messages bind nothing");
    client(&mut seq, &s(), &mut binds);
    assert_eq!(take_client(&mut seq), "EZ");
    assert_eq!(take_server(&mut seq), "");
}

/// Inside a transaction, a refusal tells the client its transaction is
/// aborted while the server's stays open; the next request first fails on
/// the server, except a simple `ROLLBACK`, which goes as it is.
#[test]
fn a_refusal_in_a_transaction_aborts_it_for_the_client_first() {
    for (next, sent) in [
        (q("ROLLBACK"), "Q"),
        (q("SELECT 1"), "QQ"),
        (p("SELECT 1"), "QP"),
    ] {
        let mut seq = Sequencer::default();
        let mut binds = Driver::default();
        client(&mut seq, &q("BEGIN"), &mut binds);
        server(&mut seq, &cc("BEGIN"));
        server(&mut seq, &z(b'T'));
        take_client(&mut seq);
        take_server(&mut seq);
        seq.refuse(
            Flow::Simple,
            PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "no"),
        );
        assert_eq!(take_client(&mut seq), "EZ");
        assert_eq!(seq.tx_status(), b'E');
        assert_eq!(take_server(&mut seq), "", "the server saw nothing");
        client(&mut seq, &next, &mut binds);
        assert_eq!(take_server(&mut seq), sent);
    }
}

/// With messages in flight, a refused message is replaced by one that
/// fails on the server, in its position.
#[test]
fn a_refusal_in_a_pipeline_fails_on_the_server_in_its_place() {
    let mut seq = Sequencer::default();
    let mut binds = Driver::default();
    client(&mut seq, &p("SELECT 1"), &mut binds);
    seq.refuse(
        Flow::Extended,
        PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "no"),
    );
    client(&mut seq, &b(), &mut binds);
    client(&mut seq, &s(), &mut binds);
    assert_eq!(take_server(&mut seq), "PPS", "a failing Parse stands in");
    server(&mut seq, &frame(b'1', b""));
    server(&mut seq, &err("42601"));
    server(&mut seq, &z(b'I'));
    assert!(seq.releasable());
    let relayed = seq.client_out().to_vec();
    assert_eq!(tags(&relayed), "1EZ");
    let text = String::from_utf8_lossy(&relayed);
    assert!(
        text.contains("42501"),
        "the client gets the gateway's error: {text}"
    );
}

#[test]
fn a_large_copy_data_streams_through_and_holds_the_connection() {
    let mut seq = Sequencer::default();
    let mut binds = Driver::default();
    client(&mut seq, &q("COPY t FROM STDIN"), &mut binds);
    server(&mut seq, &frame(b'G', &[0, 0, 0]));
    take_server(&mut seq);
    let big = copy_data(STREAM_THRESHOLD + 10);
    let mut rbuf = BytesMut::from(&big[..1000]);
    assert!(matches!(
        seq.next_client(&mut rbuf, 1 << 30, false).unwrap(),
        ClientStep::Idle
    ));
    assert_eq!(seq.to_server().len(), 1000, "streamed, not buffered");
    assert!(seq.streaming_from_client() && !seq.idle());
    rbuf.extend_from_slice(&big[1000..]);
    rbuf.extend_from_slice(&copy_done());
    match seq.next_client(&mut rbuf, 1 << 30, false).unwrap() {
        ClientStep::Frame(f) => assert_eq!(f[0], b'c'),
        other => panic!("{other:?}"),
    }
    assert_eq!(seq.to_server().len(), big.len());
    assert!(!seq.streaming_from_client());
}

#[test]
fn after_opaque_code_a_new_request_waits_for_the_server() {
    let mut seq = Sequencer::default();
    let mut binds = Driver::default();
    client(&mut seq, &q("SELECT opaque()"), &mut binds);
    let mut rbuf = BytesMut::from(&q("SELECT 2")[..]);
    assert!(matches!(
        seq.next_client(&mut rbuf, 1 << 30, true).unwrap(),
        ClientStep::Idle
    ));
    assert!(seq.deferred(), "the next request waits");
    server(&mut seq, &cc("SELECT 1"));
    server(&mut seq, &z(b'I'));
    seq.resume();
    assert!(matches!(
        seq.next_client(&mut rbuf, 1 << 30, true).unwrap(),
        ClientStep::Frame(_)
    ));
}

#[test]
fn a_pinned_client_keeps_its_connection_between_transactions() {
    let mut seq = Sequencer::default();
    let mut driver = Driver::default();
    client(&mut seq, &q("CREATE TEMP TABLE t (a int)"), &mut driver);
    assert!(seq.pin(), "pinned the first time");
    assert!(!seq.pin(), "only once");
    server(&mut seq, &cc("CREATE TABLE"));
    server(&mut seq, &z(b'I'));
    assert!(seq.idle() && !seq.releasable(), "idle, but kept");
    client(&mut seq, &q("SELECT 1"), &mut driver);
    assert_eq!(driver.binds, 1, "the same connection serves it");
}

/// The client's unnamed statement is on the bound connection only from its
/// `Parse` until the gateway runs anything of its own there (a simple query
/// drops it on the server, a failing `Parse` replaces it) or the connection
/// goes: then it is parsed again before its next use.
#[test]
fn the_unnamed_statement_is_here_only_until_the_gateway_replaces_it() {
    let refused = || PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "no");
    type Loses = fn(&mut Sequencer);
    let losers: [(&str, Loses); 4] = [
        ("own query", |seq| seq.own_query("SELECT 1")),
        ("refusal in a batch", |seq| {
            seq.refuse(
                Flow::Extended,
                PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "no"),
            )
        }),
        ("released", |seq| seq.unbound()),
        ("client left its batch", |seq| {
            seq.abort_unsynced(PgError::error(sqlstate::CONNECTION_FAILURE, "gone"));
        }),
    ];
    for (name, lose) in losers {
        let mut seq = Sequencer::default();
        let mut driver = Driver::default();
        client(&mut seq, &p("SELECT 1"), &mut driver);
        seq.unnamed_parsed();
        assert!(seq.unnamed_here(), "{name}");
        lose(&mut seq);
        assert!(!seq.unnamed_here(), "{name}");
    }
    // A refusal answered by the gateway alone leaves it in place.
    let mut seq = Sequencer::default();
    let mut driver = Driver::default();
    client(&mut seq, &q("BEGIN"), &mut driver);
    server(&mut seq, &cc("BEGIN"));
    server(&mut seq, &z(b'T'));
    seq.unnamed_parsed();
    seq.refuse(Flow::Simple, refused());
    assert!(seq.unnamed_here());
}

/// A statement cancelled while it runs (by the client's cancel request or
/// the gateway's query timeout) ends with PostgreSQL's 57014: the rest of
/// its batch is skipped, and the connection goes at the `ReadyForQuery`.
#[test]
fn a_cancelled_statement_ends_its_batch_and_the_connection_goes_at_ready() {
    run(
        "cancelled in a batch",
        vec![
            Client(p("SELECT pg_sleep(10)")),
            Client(b()),
            Client(e()),
            Client(p("SELECT 2")),
            Client(b()),
            Client(e()),
            Client(s()),
            Server(frame(b'1', b"")),
            Server(frame(b'2', b"")),
            Server(err("57014")),
            Releasable(false),
            Server(z(b'I')),
            Relayed("12EZ"),
            Releasable(true),
        ],
    );
    run(
        "cancelled copy out",
        vec![
            Client(q("COPY t TO STDOUT")),
            Server(frame(b'H', &[0, 0, 0])),
            Server(frame(b'd', b"row\n")),
            Server(err("57014")),
            Releasable(false),
            Server(z(b'I')),
            Relayed("HdEZ"),
            Releasable(true),
        ],
    );
}

/// Copy messages outside a copy go nowhere (PostgreSQL ignores them), a
/// large one too, as it arrives: a client cannot hold its connection by
/// starting one and never finishing it (red-team finding).
#[test]
fn copy_data_outside_a_copy_goes_nowhere_and_holds_nothing() {
    let mut seq = Sequencer::default();
    let mut driver = Driver::default();
    client(&mut seq, &q("SELECT 1"), &mut driver);
    server(&mut seq, &cc("SELECT 1"));
    server(&mut seq, &z(b'I'));
    take_server(&mut seq);
    for stray in [copy_data(10), copy_done(), copy_fail()] {
        client(&mut seq, &stray, &mut driver);
    }
    assert_eq!(take_server(&mut seq), "", "nothing forwarded");
    let big = copy_data(STREAM_THRESHOLD + 10);
    let mut rbuf = BytesMut::from(&big[..1000]);
    assert!(matches!(
        seq.next_client(&mut rbuf, 1 << 30, false).unwrap(),
        ClientStep::Idle
    ));
    assert!(
        seq.to_server().is_empty() && seq.releasable(),
        "dropped, not held"
    );
    rbuf.extend_from_slice(&big[1000..]);
    rbuf.extend_from_slice(&q("SELECT 2"));
    match seq.next_client(&mut rbuf, 1 << 30, false).unwrap() {
        ClientStep::Frame(f) => assert_eq!(f[0], b'Q', "the next message, intact"),
        other => panic!("{other:?}"),
    }
}

/// A request sent in the middle of a copy into the server (red-team
/// finding): the gateway fails the copy, holds the request until the
/// server has answered, then runs it as any other; nothing waits for an
/// answer that never comes, and nothing runs unaudited.
#[test]
fn a_request_during_copy_in_fails_the_copy_and_runs_after_it() {
    let mut seq = Sequencer::default();
    let mut driver = Driver::default();
    client(&mut seq, &q("COPY t FROM STDIN"), &mut driver);
    server(&mut seq, &frame(b'G', &[0, 0, 0]));
    take_server(&mut seq);
    let mut rbuf = BytesMut::from(&[q("SELECT 2"), copy_done()].concat()[..]);
    assert!(matches!(
        seq.next_client(&mut rbuf, 1 << 30, false).unwrap(),
        ClientStep::Idle
    ));
    assert_eq!(take_server(&mut seq), "f", "a CopyFail, not the query");
    assert!(seq.deferred() && !seq.copy_in());
    server(&mut seq, &err("57014"));
    server(&mut seq, &z(b'I'));
    assert!(seq.may_resume());
    seq.resume();
    match seq.next_client(&mut rbuf, 1 << 30, false).unwrap() {
        ClientStep::Frame(f) => client(&mut seq, &f, &mut driver),
        other => panic!("{other:?}"),
    }
    assert_eq!(take_server(&mut seq), "Q", "the query runs after the copy");
    match seq.next_client(&mut rbuf, 1 << 30, false).unwrap() {
        ClientStep::Frame(f) => client(&mut seq, &f, &mut driver),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        take_server(&mut seq),
        "",
        "its CopyDone is outside the copy"
    );
}

/// A COPY the server fails before reading anything (into a view): the
/// `Sync` the client sent during it is answered, as PostgreSQL, which reads
/// it after the failure, answers it (red-team finding). Once data went,
/// the `Sync`s sent during the copy were read while it ran: they go
/// nowhere.
#[test]
fn syncs_during_a_copy_go_only_if_it_failed_before_reading_anything() {
    for (data_first, sent_after_error) in [(false, "S"), (true, "")] {
        let mut seq = Sequencer::default();
        let mut driver = Driver::default();
        client(&mut seq, &q("COPY v FROM STDIN"), &mut driver);
        server(&mut seq, &frame(b'G', &[0, 0, 0]));
        if data_first {
            client(&mut seq, &copy_data(4), &mut driver);
        }
        client(&mut seq, &s(), &mut driver);
        take_server(&mut seq);
        server(&mut seq, &err("42809"));
        assert_eq!(
            take_server(&mut seq),
            sent_after_error,
            "data first: {data_first}"
        );
        server(&mut seq, &z(b'I'));
        if !data_first {
            assert!(!seq.releasable(), "the Sync's answer is owed");
            server(&mut seq, &z(b'I'));
        }
        assert!(seq.releasable());
        assert_eq!(
            take_client(&mut seq).matches('Z').count(),
            if data_first { 1 } else { 2 }
        );
    }
}
