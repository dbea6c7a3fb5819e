//! Requests a client pipelines in ways drivers rarely do, found by the
//! sequencer's property test (`src/session/sequencer/model_tests.rs`):
//! each must be answered as PostgreSQL answers it, and the server
//! connection must go back to the pool only once the server owes nothing.
//! Every test runs on a pool of one connection, so a connection released
//! too early (or never) shows in the next client.

use std::time::Duration;

use crate::raw::{cstr, message, RawClient};
use crate::support::{start_gateway, Opts, TestGateway};

/// Parse (unnamed), Bind, Execute of `sql`.
fn extended(sql: &str) -> Vec<u8> {
    let mut parse = cstr("");
    parse.extend(cstr(sql));
    parse.extend([0, 0]);
    [
        message(b'P', &parse),
        message(b'B', &[0; 8]),
        message(b'E', &[0, 0, 0, 0, 0]),
    ]
    .concat()
}

async fn one_connection() -> TestGateway {
    start_gateway(Opts {
        pool_size: 1,
        acquire_timeout_ms: 3000,
        ..Opts::default()
    })
    .await
}

/// Reads up to the next ReadyForQuery, failing the test if it does not
/// come (the gateway lost track of what the server owes).
async fn answered(c: &mut RawClient) -> (Vec<u8>, Option<String>, u8) {
    tokio::time::timeout(Duration::from_secs(10), c.until_ready())
        .await
        .expect("answered in time")
}

/// A gateway with one server connection, and a client that sent
/// `messages` in one write.
async fn sending(messages: &[Vec<u8>]) -> (TestGateway, RawClient) {
    let gw = one_connection().await;
    let mut c = RawClient::login(gw.addr).await;
    c.send_raw(&messages.concat()).await;
    (gw, c)
}

/// The next answer, up to its ReadyForQuery: these message tags, this
/// SQLSTATE, this transaction status.
async fn expect(c: &mut RawClient, tags: &[u8], code: Option<&str>, status: u8) {
    let (got, got_code, got_status) = answered(c).await;
    assert_eq!(
        (&got[..], got_code.as_deref(), got_status),
        (tags, code, status)
    );
}

/// Another client gets the only server connection and a clean answer.
async fn next_client_is_served(gw: &TestGateway) {
    let mut c = RawClient::login(gw.addr).await;
    c.send(b'Q', &cstr("SELECT 'next client'")).await;
    let value = tokio::time::timeout(Duration::from_secs(10), c.first_value_until_ready())
        .await
        .expect("the next client is served");
    assert_eq!(value.as_deref(), Some("next client"));
}

/// A COPY the client ends before the server's `CopyInResponse` arrives,
/// then two batches with their `Sync`s, in one write. The gateway used to
/// drop every `Sync` queued behind a starting COPY, the batches' too: it
/// took the first batch's `ReadyForQuery` as the end of everything,
/// released the connection while the second batch still ran, and the
/// client never got its answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_pipelined_behind_a_copy_is_answered_before_the_connection_goes() {
    let (gw, mut c) = sending(&[
        message(b'Q', &cstr("COPY guard_t (id) FROM STDIN")),
        message(b'd', b"-91\n"),
        message(b'f', &cstr("the client gave up")),
        extended("SELECT 'after the copy'"),
        message(b'S', b""),
        extended("SELECT pg_sleep(0.5)"),
        message(b'S', b""),
    ])
    .await;
    expect(&mut c, b"GEZ", Some("57014"), b'I').await;
    for _ in 0..2 {
        expect(&mut c, b"12DCZ", None, b'I').await;
    }
    next_client_is_served(&gw).await;
    c.send(b'Q', &cstr("SELECT 1")).await;
    let (_, code, _) = answered(&mut c).await;
    assert_eq!(code, None);
}

/// A `Query` sent inside an extended batch that fails before it: the
/// server skips it (it answers nothing until `Sync`). The gateway used to
/// take the `Sync`'s `ReadyForQuery` for the query's and wait for ever for
/// a second one, holding the only connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_query_inside_a_failed_batch_is_skipped_as_the_server_skips_it() {
    let gw = one_connection().await;
    let mut c = RawClient::login(gw.addr).await;
    let mut parse = cstr("");
    parse.extend(cstr("SELEC 1"));
    parse.extend([0, 0]);
    let burst = [
        message(b'P', &parse),
        message(b'Q', &cstr("SELECT 'skipped'")),
        message(b'S', b""),
    ]
    .concat();
    c.send_raw(&burst).await;
    expect(&mut c, b"EZ", Some("42601"), b'I').await;
    next_client_is_served(&gw).await;
}

/// The same, with the query sent after the error came back: the server
/// still skips to the `Sync`, and so does the gateway.
#[tokio::test(flavor = "multi_thread")]
async fn messages_after_a_batch_error_are_skipped_until_sync() {
    let gw = one_connection().await;
    let mut c = RawClient::login(gw.addr).await;
    let mut parse = cstr("");
    parse.extend(cstr("SELEC 1"));
    parse.extend([0, 0]);
    c.send(b'P', &parse).await;
    c.send(b'H', b"").await;
    let (tag, body) = c.read_message().await;
    assert_eq!(
        (tag, crate::raw::error_code(&body)),
        (b'E', "42601".to_string())
    );
    c.send(b'Q', &cstr("SELECT 'skipped'")).await;
    c.send_raw(&extended("SELECT 'skipped too'")).await;
    c.send(b'S', b"").await;
    expect(&mut c, b"Z", None, b'I').await;
    next_client_is_served(&gw).await;
    c.send(b'Q', &cstr("SELECT 'still usable'")).await;
    let value = c.first_value_until_ready().await;
    assert_eq!(value.as_deref(), Some("still usable"));
}

/// An extended COPY with its data, `CopyDone` and then a query, in one
/// write (red-team finding): the data must reach the server, which waits
/// for it, and the query is answered after the copy.
#[tokio::test(flavor = "multi_thread")]
async fn an_extended_copy_with_its_data_and_a_query_in_one_write_completes() {
    let gw = one_connection().await;
    let mut c = RawClient::login(gw.addr).await;
    c.send(b'Q', &cstr("BEGIN")).await;
    answered(&mut c).await;
    let burst = [
        extended("COPY guard_t (id) FROM STDIN"),
        message(b'd', b"-92\n"),
        message(b'c', b""),
        message(b'Q', &cstr("SELECT 'after the copy'")),
    ]
    .concat();
    c.send_raw(&burst).await;
    expect(&mut c, b"12GCTDCZ", None, b'T').await;
    c.send(b'Q', &cstr("ROLLBACK")).await;
    answered(&mut c).await;
    next_client_is_served(&gw).await;
}

/// A COPY with a `Sync` before its data and one after, in one write
/// (red-team finding): the gateway held the early `Sync` back with
/// everything behind it, including the data the server waited for, and
/// both sides waited for ever with the only connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_sync_pipelined_before_copy_data_does_not_stall_the_copy() {
    let (gw, mut c) = sending(&[
        message(b'Q', &cstr("COPY guard_t (id) FROM STDIN")),
        message(b'S', b""),
        message(b'd', b"-93\n"),
        message(b'f', &cstr("no rows today")),
        message(b'S', b""),
    ])
    .await;
    // As PostgreSQL: the Sync read during the copy is ignored, the last
    // one is answered.
    expect(&mut c, b"GEZ", Some("57014"), b'I').await;
    let (tags, code, _) = answered(&mut c).await;
    assert_eq!((&tags[..], code), (&b"Z"[..], None));
    next_client_is_served(&gw).await;
}

/// A COPY that fails on a bad row, a `Sync` sent during it, then a query,
/// in one write (red-team finding). Whether PostgreSQL answers that `Sync`
/// depends on whether it read it before the row failed; the gateway used to
/// forward it uncounted, took its `ReadyForQuery` for the query's, and gave
/// the connection to the next client while the query still ran. Now a
/// `Sync` sent during copy-in goes nowhere (README: "COPY").
#[tokio::test(flavor = "multi_thread")]
async fn a_sync_during_a_failing_copy_never_desynchronises_the_connection() {
    let (gw, mut c) = sending(&[
        message(b'Q', &cstr("COPY guard_t (id) FROM STDIN")),
        message(b'd', b"notanint\n"),
        message(b'S', b""),
        message(b'Q', &cstr("SELECT pg_sleep(0.3), 'after the copy'")),
    ])
    .await;
    expect(&mut c, b"GEZ", Some("22P02"), b'I').await;
    let (tags, code, _) = answered(&mut c).await;
    assert_eq!(
        (&tags[..], code),
        (&b"TDCZ"[..], None),
        "the query's own answer"
    );
    next_client_is_served(&gw).await;
}

/// An extended COPY whose data fails, then the client's `Sync` and a query
/// (red-team finding): the gateway still thought the copy ran, passed the
/// `Sync` as a copy message, kept skipping, and swallowed the query.
#[tokio::test(flavor = "multi_thread")]
async fn after_an_extended_copy_fails_the_next_query_is_answered() {
    let gw = one_connection().await;
    let mut c = RawClient::login(gw.addr).await;
    c.send_raw(&[extended("COPY guard_t (id) FROM STDIN"), message(b'S', b"")].concat())
        .await;
    for want in [b'1', b'2', b'G'] {
        assert_eq!(c.read_message().await.0, want);
    }
    c.send(b'd', b"notanint\n").await;
    let (tag, body) = c.read_message().await;
    assert_eq!(
        (tag, crate::raw::error_code(&body)),
        (b'E', "22P02".to_string())
    );
    c.send(b'S', b"").await;
    expect(&mut c, b"Z", None, b'I').await;
    c.send(b'Q', &cstr("SELECT 'after'")).await;
    let value = tokio::time::timeout(Duration::from_secs(10), c.first_value_until_ready())
        .await
        .expect("the query is answered");
    assert_eq!(value.as_deref(), Some("after"));
    next_client_is_served(&gw).await;
}

/// A query sent in the middle of a copy into the server (red-team
/// finding): the copy fails, and the query runs after it, answered as its
/// own; the copy's own messages after it go nowhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_query_during_copy_in_fails_the_copy_and_runs_after_it() {
    let (gw, mut c) = sending(&[message(b'Q', &cstr("COPY guard_t (id) FROM STDIN"))]).await;
    assert_eq!(c.read_message().await.0, b'G');
    c.send_raw(
        &[
            message(b'Q', &cstr("SELECT 'stdin'")),
            message(b'd', b"-94\n"),
            message(b'c', b""),
            message(b'Q', &cstr("SELECT 'next'")),
        ]
        .concat(),
    )
    .await;
    expect(&mut c, b"EZ", Some("57014"), b'I').await;
    for want in ["stdin", "next"] {
        let value = tokio::time::timeout(Duration::from_secs(10), c.first_value_until_ready())
            .await
            .expect("answered");
        assert_eq!(value.as_deref(), Some(want));
    }
    next_client_is_served(&gw).await;
}

/// What a client sends, and the answer it expects: message tags, SQLSTATE,
/// transaction status.
type Step = (Vec<u8>, &'static [u8], Option<&'static str>, u8);

/// Bind of `portal` to the named statement `statement`, no parameters.
fn bind_named(portal: &str, statement: &str) -> Vec<u8> {
    let mut body = cstr(portal);
    body.extend(cstr(statement));
    body.extend([0; 6]);
    message(b'B', &body)
}

fn parse_named(name: &str, sql: &str) -> Vec<u8> {
    let mut body = cstr(name);
    body.extend(cstr(sql));
    body.extend([0, 0]);
    message(b'P', &body)
}

/// A portal bound to a COPY, then "bound again" to a SELECT, which
/// PostgreSQL refuses (42P03: the COPY portal stays); its Execute with the
/// data in one write (red-team finding): the gateway had forgotten that
/// the portal starts a COPY and deadlocked with the server.
#[tokio::test(flavor = "multi_thread")]
async fn a_portal_kept_after_a_refused_bind_still_starts_its_copy() {
    let (gw, mut c) = sending(&[
        parse_named("cs", "COPY guard_t (id) FROM STDIN"),
        parse_named("ss", "SELECT 'sel'"),
        message(b'S', b""),
    ])
    .await;
    expect(&mut c, b"11Z", None, b'I').await;
    let steps: [Step; 5] = [
        (message(b'Q', &cstr("BEGIN")), b"CZ", None, b'T'),
        (
            [bind_named("p", "cs"), message(b'S', b"")].concat(),
            b"2Z",
            None,
            b'T',
        ),
        (message(b'Q', &cstr("SAVEPOINT a")), b"CZ", None, b'T'),
        (
            [bind_named("p", "ss"), message(b'S', b"")].concat(),
            b"EZ",
            Some("42P03"),
            b'E',
        ),
        (message(b'Q', &cstr("ROLLBACK TO a")), b"CZ", None, b'T'),
    ];
    for (send, tags, code, status) in steps {
        c.send_raw(&send).await;
        expect(&mut c, tags, code, status).await;
    }
    let mut execute = cstr("p");
    execute.extend([0, 0, 0, 0]);
    c.send_raw(
        &[
            message(b'E', &execute),
            message(b'S', b""),
            message(b'd', b"-95\n"),
            message(b'c', b""),
            message(b'S', b""),
        ]
        .concat(),
    )
    .await;
    // As PostgreSQL: the Sync read during the copy is ignored.
    expect(&mut c, b"GCZ", None, b'T').await;
    c.send(b'Q', &cstr("ROLLBACK")).await;
    expect(&mut c, b"CZ", None, b'I').await;
    next_client_is_served(&gw).await;
}

/// A second `Parse` of a statement name the client has (red-team
/// finding): PostgreSQL refuses it (42P05) and skips the batch; the gateway
/// used to replace the statement and run the batch.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_parse_of_a_name_is_refused_as_postgresql_refuses_it() {
    let (gw, mut c) = sending(&[parse_named("dup", "SELECT 1"), message(b'S', b"")]).await;
    expect(&mut c, b"1Z", None, b'I').await;
    c.send_raw(
        &[
            parse_named("dup", "SELECT 2"),
            bind_named("", "dup"),
            message(b'E', &[0, 0, 0, 0, 0]),
            message(b'S', b""),
        ]
        .concat(),
    )
    .await;
    expect(&mut c, b"EZ", Some("42P05"), b'I').await;
    // The first statement is still the client's.
    c.send_raw(
        &[
            bind_named("", "dup"),
            message(b'E', &[0, 0, 0, 0, 0]),
            message(b'S', b""),
        ]
        .concat(),
    )
    .await;
    let value = c.first_value_until_ready().await;
    assert_eq!(value.as_deref(), Some("1"));
    next_client_is_served(&gw).await;
}

/// Parse of the named statement `name` as `sql`, then `Sync`.
fn named(name: &str, sql: &str) -> Vec<u8> {
    let mut parse = cstr(name);
    parse.extend(cstr(sql));
    parse.extend([0, 0]);
    [message(b'P', &parse), message(b'S', b"")].concat()
}

/// Bind and Execute of the named statement `name`, then `Sync`.
fn run_named(name: &str) -> Vec<u8> {
    let mut bind = vec![0];
    bind.extend(cstr(name));
    bind.extend([0; 6]);
    [
        message(b'B', &bind),
        message(b'E', &[0, 0, 0, 0, 0]),
        message(b'S', b""),
    ]
    .concat()
}

/// A `Close` or `DEALLOCATE` of a statement that PostgreSQL skips (an
/// error earlier in the batch) or refuses (the transaction is aborted)
/// leaves the statement in place, through the gateway as directly: the
/// gateway used to forget it at once (red-team finding: it then answered
/// 26000 for a statement PostgreSQL still had).
#[tokio::test(flavor = "multi_thread")]
async fn a_close_or_deallocate_the_server_skips_or_refuses_keeps_the_statement() {
    let gw = one_connection().await;
    let mut c = RawClient::login(gw.addr).await;
    c.send_raw(&named("s1", "SELECT 'kept'")).await;
    expect(&mut c, b"1Z", None, b'I').await;
    let close = message(b'C', &[b"S".as_slice(), &cstr("s1")].concat());
    let deallocate = message(b'Q', &cstr("DEALLOCATE s1"));
    for skipped in [close, deallocate] {
        let batch = [extended("SELECT 1/0"), skipped, message(b'S', b"")].concat();
        c.send_raw(&batch).await;
        expect(&mut c, b"1EZ", Some("22012"), b'I').await;
        c.send_raw(&run_named("s1")).await;
        expect(&mut c, b"2DCZ", None, b'I').await;
    }
    for sql in ["BEGIN", "SELECT 1/0"] {
        c.send(b'Q', &cstr(sql)).await;
        answered(&mut c).await;
    }
    for refused in ["DEALLOCATE s1", "DEALLOCATE ALL"] {
        c.send(b'Q', &cstr(refused)).await;
        expect(&mut c, b"EZ", Some("25P02"), b'E').await;
    }
    c.send(b'Q', &cstr("ROLLBACK")).await;
    expect(&mut c, b"CZ", None, b'I').await;
    c.send_raw(&run_named("s1")).await;
    expect(&mut c, b"2DCZ", None, b'I').await;
    // A Close the server runs still closes it.
    let close = message(b'C', &[b"S".as_slice(), &cstr("s1")].concat());
    c.send_raw(&[close, message(b'S', b"")].concat()).await;
    expect(&mut c, b"3Z", None, b'I').await;
    c.send_raw(&run_named("s1")).await;
    expect(&mut c, b"EZ", Some("26000"), b'I').await;
    next_client_is_served(&gw).await;
}

/// In session pooling a client's statement names are the server's: its
/// records show the statement the server really runs under a name, after
/// a `Close` the server skipped (the gateway used to forget the text and
/// record ""), and after `DEALLOCATE` and a `PREPARE` of the same name
/// (the gateway used to record the old text). Red-team findings.
#[tokio::test(flavor = "multi_thread")]
async fn records_show_the_statement_a_name_runs_after_close_and_deallocate() {
    use crate::audit::{export, s};
    let gw = start_gateway(Opts {
        mode: "session",
        audit: true,
        ..Opts::default()
    })
    .await;
    let store = gw.dir.path().join("audit");
    let mut c = RawClient::login(gw.addr).await;
    c.send_raw(&named("s1", "SELECT 'survivor'")).await;
    expect(&mut c, b"1Z", None, b'I').await;
    let close = message(b'C', &[b"S".as_slice(), &cstr("s1")].concat());
    c.send_raw(&[extended("SELECT 1/0"), close, message(b'S', b"")].concat())
        .await;
    expect(&mut c, b"1EZ", Some("22012"), b'I').await;
    c.send_raw(&run_named("s1")).await;
    expect(&mut c, b"2DCZ", None, b'I').await;

    c.send_raw(&named("s2", "SELECT 'harmless'")).await;
    expect(&mut c, b"1Z", None, b'I').await;
    for sql in ["DEALLOCATE s2", "PREPARE s2 AS SELECT 'swapped'"] {
        c.send(b'Q', &cstr(sql)).await;
        expect(&mut c, b"CZ", None, b'I').await;
    }
    c.send_raw(&run_named("s2")).await;
    let value = tokio::time::timeout(Duration::from_secs(10), c.first_value_until_ready())
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("swapped"));
    drop(c);
    gw.until_clients(0).await;
    let _dir = gw.stop().await;
    let executed: Vec<String> = export(&store, &[])
        .iter()
        .filter(|r| s(r, "kind") == "query" && s(r, "command_tag") == "SELECT 1")
        .map(|r| s(r, "statement"))
        .collect();
    assert_eq!(executed.len(), 2, "{executed:?}");
    assert_eq!(executed[0], "SELECT 'survivor'");
    assert!(
        !executed[1].contains("harmless") && executed[1].contains("s2"),
        "{executed:?}"
    );
}
