//! The audit log states what PostgreSQL reported for each statement.

use serde_json::Value;

use crate::audit::{export, s};
use crate::raw::{bind, cstr, execute, message, parse, sync, RawClient};
use crate::support::{self, start_gateway, Opts, TestGateway};

/// alice, connected with this application name.
async fn alice_as(
    gw: &crate::support::TestGateway,
    application_name: &str,
) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = gw
        .url("alice", support::password_of("alice"))
        .parse()
        .unwrap();
    config.application_name(application_name);
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Stops the gateway, so that its sessions' last records are written, and
/// exports its store with these `audit export` arguments.
async fn stop_and_export(gw: TestGateway, args: &[&str]) -> Vec<Value> {
    gw.until_clients(0).await;
    let dir = gw.stop().await;
    export(&dir.path().join("audit"), args)
}

/// The exported `query` line of `statement`.
fn query_record<'a>(records: &'a [Value], statement: &str) -> &'a Value {
    records
        .iter()
        .find(|r| s(r, "kind") == "query" && s(r, "statement") == statement)
        .unwrap_or_else(|| panic!("a record of {statement}: {records:?}"))
}

/// A gateway that records every statement.
async fn audited() -> TestGateway {
    start_gateway(Opts {
        audit: true,
        ..Opts::default()
    })
    .await
}

/// The statements of the `query` records, in order.
fn statements(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .filter(|r| s(r, "kind") == "query")
        .map(|r| s(r, "statement"))
        .collect()
}

/// Parse, Bind, Describe, Execute and Sync of an unnamed statement, as
/// psycopg, asyncpg and node-postgres send one statement.
fn extended(sql: &str) -> Vec<u8> {
    crate::raw::unnamed(sql, true, b'S')
}

/// An error at `Parse` (a missing table) or at `Bind` (permission denied
/// on a table, checked when the portal starts) is recorded with the
/// SQLSTATE the client got, not as "not executed"; a statement after it in
/// the same batch is the one that was not executed.
#[tokio::test(flavor = "multi_thread")]
async fn parse_and_bind_errors_are_recorded_with_their_sqlstate() {
    support::cluster().psql(
        "app",
        "CREATE TABLE IF NOT EXISTS audit_secret (x int); REVOKE ALL ON audit_secret FROM PUBLIC",
    );
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    let cases = [
        ("SELECT * FROM audit_no_such_table", "42P01"),
        ("SELECT * FROM audit_secret", "42501"),
    ];
    for (sql, code) in cases {
        c.send_raw(&extended(sql)).await;
        let (_, got, _) = c.until_ready().await;
        assert_eq!(got.as_deref(), Some(code), "{sql}");
    }
    // A failing statement and one after it, in one batch without Sync
    // between them.
    let mut batch = extended("SELECT * FROM audit_no_such_table_2");
    batch.truncate(batch.len() - 5);
    batch.extend(extended("SELECT 'skipped'"));
    c.send_raw(&batch).await;
    c.until_ready().await;
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let query = |text: &str| query_record(&records, text).clone();
    for (sql, code) in cases
        .iter()
        .chain(&[("SELECT * FROM audit_no_such_table_2", "42P01")])
    {
        let r = query(sql);
        assert_eq!(
            (s(&r, "status"), s(&r, "sqlstate")),
            ("error".into(), code.to_string()),
            "{r}"
        );
        assert!(!s(&r, "message").contains("not executed"), "{r}");
    }
    let skipped = query("SELECT 'skipped'");
    assert_eq!(s(&skipped, "status"), "error");
    // It names the statement whose error made PostgreSQL skip it.
    let failed = query("SELECT * FROM audit_no_such_table_2");
    let cause = format!("(the statement of seq {})", failed["seq"]);
    assert!(s(&skipped, "message").contains("not executed"), "{skipped}");
    assert!(
        s(&skipped, "message").ends_with(&cause),
        "{skipped} {cause}"
    );
}

/// A `Bind` of a statement that calls a function the gateway does not know
/// may run it while planning, with no `Execute` after it: it is recorded
/// (tag `BIND`) before it is sent. An `Execute` of a portal a `DECLARE`
/// opened is recorded with the DECLARE's text, not an empty statement.
#[tokio::test(flavor = "multi_thread")]
async fn binds_and_cursor_portals_are_recorded() {
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    // Parse, Bind, Sync: no Execute.
    let mut batch = extended("SELECT pg_catalog.abs(-7)");
    let execute_and_sync = batch.len() - 5 - 10 - 7;
    batch.truncate(execute_and_sync);
    batch.extend(message(b'S', &[]));
    c.send_raw(&batch).await;
    let (tags, code, _) = c.until_ready().await;
    assert_eq!(code, None, "{tags:?}");
    assert!(tags.contains(&b'2'), "BindComplete: {tags:?}");
    // A cursor's portal, executed with the extended protocol.
    c.send_raw(&message(
        b'Q',
        &cstr("BEGIN; DECLARE audit_cur CURSOR FOR SELECT 42"),
    ))
    .await;
    c.until_ready().await;
    let mut execute = cstr("audit_cur");
    execute.extend_from_slice(&0i32.to_be_bytes());
    let mut run = message(b'E', &execute);
    run.extend(message(b'S', &[]));
    c.send_raw(&run).await;
    assert_eq!(c.first_value_until_ready().await.as_deref(), Some("42"));
    c.send_raw(&message(b'Q', &cstr("COMMIT"))).await;
    c.until_ready().await;
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let find = |text: &str| query_record(&records, text);
    let bind = find("SELECT pg_catalog.abs(-7)");
    assert_eq!(
        (s(bind, "status"), s(bind, "command_tag")),
        ("ok".into(), "BIND".into())
    );
    // The DECLARE's own record, then the Execute of its portal, recorded
    // with the same text.
    let outcomes: Vec<(String, String)> = records
        .iter()
        .filter(|r| {
            s(r, "kind") == "query" && s(r, "statement") == "DECLARE audit_cur CURSOR FOR SELECT 42"
        })
        .map(|r| (s(r, "status"), s(r, "command_tag")))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("ok".into(), "DECLARE CURSOR".into()),
            ("ok".into(), "SELECT 1".into())
        ]
    );
}

/// A client that disconnects inside a transaction: the gateway rolls it
/// back, records that ROLLBACK as its own (with why), and keeps the server
/// connection for the next client. One that disconnects mid-statement: the
/// gateway waits for PostgreSQL's answer and records the real outcome (the
/// row was committed), not "unknown".
#[tokio::test(flavor = "multi_thread")]
async fn a_vanished_client_leaves_true_outcomes_and_a_usable_connection() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        audit: true,
        ..Opts::default()
    })
    .await;
    let pg = support::cluster();
    let id = 800_000 + (rand::random::<u32>() % 100_000) as i32;
    let alice = gw.connect("alice").await;
    alice.batch_execute("BEGIN").await.unwrap();
    alice
        .batch_execute(&format!("INSERT INTO items VALUES ({id}, 'gone-tx', NULL)"))
        .await
        .unwrap();
    let pid = support::one(&alice, "SELECT pg_backend_pid()::text").await;
    drop(alice);
    gw.until_clients(0).await;
    let bob = gw.connect("bob").await;
    assert_eq!(
        support::one(&bob, "SELECT pg_backend_pid()::text").await,
        pid,
        "the server connection was rolled back and kept"
    );
    drop(bob);
    assert_eq!(
        pg.psql(
            "app",
            &format!("SELECT count(*) FROM items WHERE id = {id}")
        ),
        "0"
    );

    // Mid-statement: the INSERT commits after the client has gone.
    let mut c = RawClient::login(gw.addr).await;
    let insert = format!(
        "INSERT INTO items SELECT {}, 'gone-stmt', NULL FROM pg_sleep(0.5)",
        id + 1
    );
    c.send_raw(&message(b'Q', &cstr(&insert))).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    drop(c);
    // The session ends once the gateway has the INSERT's outcome.
    gw.until_clients(0).await;
    assert_eq!(
        pg.psql(
            "app",
            &format!("SELECT owner FROM items WHERE id = {}", id + 1)
        ),
        "gone-stmt"
    );
    let records = stop_and_export(gw, &[]).await;
    let rollback = query_record(&records, "ROLLBACK");
    assert_eq!(s(rollback, "client_user"), "alice");
    assert_eq!(s(rollback, "status"), "ok", "{rollback}");
    assert!(
        s(rollback, "message")
            .contains("issued by pgwarden: the client disconnected inside a transaction"),
        "{rollback}"
    );
    let inserted = query_record(&records, &insert);
    assert_eq!(
        (s(inserted, "status"), s(inserted, "command_tag")),
        ("ok".into(), "INSERT 0 1".into()),
        "{inserted}"
    );
}

/// A cancel record names the session whose statement was to be cancelled
/// (user, role, database) and who asked; a session's end says why; a CSV
/// export neutralises cells a spreadsheet would run as formulas.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_session_end_records_and_csv_cells() {
    let gw = audited().await;
    let store = gw.dir.path().join("audit");
    let alice = alice_as(&gw, "=HYPERLINK(\"http://x\")").await;
    let token = alice.cancel_token();
    let marker = support::marked("SELECT pg_sleep(10)");
    let sleep = marker.clone();
    let sleeper = tokio::spawn(async move { alice.simple_query(&sleep).await });
    support::until_running(&marker).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    assert!(sleeper.await.unwrap().is_err(), "cancelled");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let dir = gw.stop().await;
    let records = export(&store, &[]);
    let cancel = records
        .iter()
        .find(|r| s(r, "kind") == "cancel")
        .expect("a cancel record");
    assert_eq!(
        (
            s(cancel, "client_user"),
            s(cancel, "role"),
            s(cancel, "database")
        ),
        ("alice".into(), "analyst".into(), "app".into())
    );
    assert!(
        s(cancel, "message").starts_with("cancel request from 127.0.0.1:"),
        "{cancel}"
    );
    let end = records
        .iter()
        .find(|r| s(r, "kind") == "session_end")
        .expect("a session_end record");
    assert_eq!(s(end, "message"), "the client disconnected");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["audit", "export", "--format", "csv", "--store"])
        .arg(dir.path().join("audit"))
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(csv.contains("'=HYPERLINK("), "{csv}");
    assert!(
        !csv.contains(",=HYPERLINK(") && !csv.contains(",\"=HYPERLINK("),
        "{csv}"
    );
}

/// An extended batch the client never synced (`Execute` + `Flush`, then
/// nothing) must not commit, whether the client vanishes or the
/// idle-in-transaction timeout ends it: PostgreSQL would abort it, and so
/// does the gateway (it never sends a `Sync` the client did not send).
#[tokio::test(flavor = "multi_thread")]
async fn an_unsynced_batch_never_commits() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        server_extra: "idle_in_transaction_timeout_ms = 1000\n".into(),
        ..Opts::default()
    })
    .await;
    let pg = support::cluster();
    let base = 950_000 + (rand::random::<u32>() % 40_000) as i32;
    for (i, vanish) in [true, false].into_iter().enumerate() {
        let mut c = RawClient::login(gw.addr).await;
        let mut batch = extended(&format!(
            "INSERT INTO items VALUES ({}, 'unsynced', NULL)",
            base + i as i32
        ));
        batch.truncate(batch.len() - 5);
        batch.extend(message(b'H', &[]));
        c.send_raw(&batch).await;
        loop {
            let (tag, _) = c.read_message().await;
            if tag == b'C' {
                break;
            }
            assert_ne!(tag, b'E');
        }
        if vanish {
            drop(c);
        } else {
            // The timeout ends the session with FATAL 25P03.
            let (tag, body) = c.read_message().await;
            assert_eq!(tag, b'E');
            assert_eq!(crate::raw::error_code(&body), "25P03");
        }
        gw.until_clients(0).await;
        assert_eq!(
            pg.psql(
                "app",
                &format!("SELECT count(*) FROM items WHERE id = {}", base + i as i32)
            ),
            "0",
            "vanish: {vanish}"
        );
    }
    // The connection is still good for the next client.
    let bob = gw.connect("bob").await;
    assert_eq!(support::one(&bob, "SELECT 1").await, "1");
}

/// A statement the gateway cancelled itself says so in its record, next to
/// PostgreSQL's "canceling statement due to user request".
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_by_the_gateway_is_recorded_as_such() {
    let gw = start_gateway(Opts {
        audit: true,
        server_extra: "query_timeout_ms = 300\n".into(),
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    let err = c
        .simple_query("SELECT pg_sleep(5)")
        .await
        .expect_err("cancelled");
    assert_eq!(support::sqlstate(&err), "57014");
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let r = query_record(&records, "SELECT pg_sleep(5)");
    assert_eq!(s(r, "sqlstate"), "57014");
    assert!(
        s(r, "message").contains("cancelled by pgwarden: query_timeout_ms elapsed"),
        "{r}"
    );
}

/// `ts` is when the event happened, not when its write batch was stored: a
/// statement's `query` record is stamped when the gateway received it and
/// its `result` when the answer came, so they are a statement's duration
/// apart, and a session's records never go back in time.
#[tokio::test(flavor = "multi_thread")]
async fn records_carry_the_time_of_their_event() {
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: "durability = \"async\"\n".into(),
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    c.simple_query("SELECT pg_sleep(0.3)").await.unwrap();
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    drop(c);
    let raw = stop_and_export(gw, &["--raw"]).await;
    let ts = |r: &Value| pgwarden::audit::record::parse_ts(&s(r, "ts")).unwrap();
    let query = raw
        .iter()
        .find(|r| s(r, "statement") == "SELECT pg_sleep(0.3)")
        .unwrap();
    let result = raw
        .iter()
        .find(|r| s(r, "kind") == "result" && r["ref_seq"] == query["seq"])
        .unwrap();
    let apart = ts(result) - ts(query);
    assert!(apart >= time::Duration::milliseconds(290), "{apart}");
    let session = s(query, "session_id");
    let stamps: Vec<_> = raw
        .iter()
        .filter(|r| s(r, "session_id") == session)
        .map(ts)
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
}

/// After `SET application_name`, records carry the name the client uses
/// now, not the one it started with.
#[tokio::test(flavor = "multi_thread")]
async fn records_follow_the_clients_application_name() {
    let gw = audited().await;
    let c = alice_as(&gw, "first").await;
    c.simple_query("SELECT 'before'").await.unwrap();
    c.simple_query("SET application_name = 'second'")
        .await
        .unwrap();
    c.simple_query("SELECT 'after'").await.unwrap();
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    assert_eq!(
        s(
            query_record(&records, "SELECT 'before'"),
            "application_name"
        ),
        "first"
    );
    assert_eq!(
        s(query_record(&records, "SELECT 'after'"), "application_name"),
        "second"
    );
}

/// Every statement's result says whether its transaction's effects
/// persisted (`tx`), and the database agrees: a pipeline whose later
/// statement fails, explicit COMMIT and ROLLBACK, ROLLBACK TO SAVEPOINT,
/// COMMIT of a failed transaction, a client that vanishes mid-transaction.
#[tokio::test(flavor = "multi_thread")]
async fn each_statement_says_whether_its_transaction_committed() {
    let gw = audited().await;
    let insert = |id: u32| format!("INSERT INTO items (id, owner) VALUES ({id}, 'alice')");
    // A pipeline in one implicit transaction: the duplicate undoes both.
    let mut c = RawClient::login(gw.addr).await;
    let mut batch = extended(&insert(700301));
    batch.truncate(batch.len() - 5);
    batch.extend(extended(&format!("{} ", insert(700301))));
    c.send_raw(&batch).await;
    let (_, code, _) = c.until_ready().await;
    assert_eq!(code.as_deref(), Some("23505"));
    drop(c);
    let alice = gw.connect("alice").await;
    for sql in [
        "BEGIN".to_string(),
        insert(700302),
        "COMMIT".into(),
        "BEGIN".into(),
        insert(700303),
        "SAVEPOINT s".into(),
        insert(700304),
        "ROLLBACK TO SAVEPOINT s".into(),
        insert(700305),
        "COMMIT".into(),
        "BEGIN".into(),
        insert(700306),
        "ROLLBACK".into(),
        insert(700308),
    ] {
        alice.batch_execute(&sql).await.unwrap();
    }
    alice.batch_execute("BEGIN").await.unwrap();
    alice.batch_execute(&insert(700307)).await.unwrap();
    alice.batch_execute("SELECT 1/0").await.unwrap_err();
    alice.batch_execute("COMMIT").await.unwrap();
    let gone = gw.connect("alice").await;
    gone.batch_execute("BEGIN").await.unwrap();
    gone.batch_execute(&insert(700309)).await.unwrap();
    drop(gone);
    gw.until_clients(1).await;
    let committed: Vec<u32> = alice
        .query(
            "SELECT id FROM items WHERE id BETWEEN 700301 AND 700309 ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0) as u32)
        .collect();
    assert_eq!(committed, [700302, 700303, 700305, 700308]);
    drop(alice);
    let records = stop_and_export(gw, &[]).await;
    // Reconciliation: an INSERT's record says committed exactly when its
    // row is in the table.
    for id in 700301..=700309u32 {
        let rows: Vec<&Value> = records
            .iter()
            .filter(|r| s(r, "kind") == "query" && s(r, "statement").trim() == insert(id))
            .collect();
        assert!(!rows.is_empty(), "a record of {id}");
        for r in rows {
            let expected = if committed.contains(&id) {
                "committed"
            } else {
                "rolled_back"
            };
            assert_eq!(s(r, "tx"), expected, "{id}: {r}");
        }
    }
    assert_eq!(s(query_record(&records, "SELECT 1/0"), "tx"), "rolled_back");
    assert_eq!(s(query_record(&records, "SAVEPOINT s"), "tx"), "committed");
}

/// A simple query of several statements is one record per statement, each
/// with its own text, tag, rows, status and transaction outcome; those
/// after an error say they were not executed.
#[tokio::test(flavor = "multi_thread")]
async fn each_statement_of_a_multi_statement_query_has_its_own_record() {
    let gw = audited().await;
    let alice = gw.connect("alice").await;
    alice
        .batch_execute("INSERT INTO items (id, owner) VALUES (700511, 'alice'), (700512, 'alice')")
        .await
        .unwrap();
    let err = alice
        .batch_execute(
            "BEGIN; INSERT INTO items (id, owner) VALUES (700501, 'alice'); COMMIT; SELECT 1/0",
        )
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "22012");
    alice
        .batch_execute("UPDATE items SET owner = owner WHERE id IN (700511, 700512); SELECT * FROM items WHERE id IN (700511, 700512); SELECT 1")
        .await
        .unwrap();
    let err = alice
        .batch_execute("INSERT INTO items (id, owner) VALUES (700502, 'alice'); SELECT 1/0; INSERT INTO items (id, owner) VALUES (700503, 'alice')")
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "22012");
    let present: i64 = alice
        .query_one(
            "SELECT count(*) FROM items WHERE id IN (700501, 700502, 700503)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(present, 1, "only 700501 was committed");
    drop(alice);
    let records = stop_and_export(gw, &[]).await;
    let line = |sql: &str| {
        let r = query_record(&records, sql);
        (
            s(r, "status"),
            s(r, "command_tag"),
            r["rows"].as_u64(),
            s(r, "tx"),
        )
    };
    let ok = |tag: &str, rows: Option<u64>, tx: &str| {
        ("ok".to_string(), tag.to_string(), rows, tx.to_string())
    };
    assert_eq!(line("BEGIN"), ok("BEGIN", None, "committed"));
    assert_eq!(
        line("INSERT INTO items (id, owner) VALUES (700501, 'alice')"),
        ok("INSERT 0 1", Some(1), "committed")
    );
    let failed = query_record(&records, "SELECT 1/0");
    assert_eq!(
        (s(failed, "sqlstate"), s(failed, "tx")),
        ("22012".into(), "rolled_back".into())
    );
    assert_eq!(
        line("UPDATE items SET owner = owner WHERE id IN (700511, 700512)"),
        ok("UPDATE 2", Some(2), "committed")
    );
    assert_eq!(
        line("SELECT * FROM items WHERE id IN (700511, 700512)"),
        ok("SELECT 2", Some(2), "committed")
    );
    assert_eq!(
        line("INSERT INTO items (id, owner) VALUES (700502, 'alice')"),
        ok("INSERT 0 1", Some(1), "rolled_back")
    );
    let skipped = query_record(
        &records,
        "INSERT INTO items (id, owner) VALUES (700503, 'alice')",
    );
    assert_eq!(s(skipped, "status"), "error");
    assert!(s(skipped, "message").contains("not executed"), "{skipped}");
    let failed = records
        .iter()
        .rfind(|r| s(r, "statement") == "SELECT 1/0")
        .unwrap();
    let cause = format!("(the statement of seq {})", failed["seq"]);
    assert!(s(skipped, "message").ends_with(&cause), "{skipped} {cause}");
}

/// A portal executed a few rows at a time: each `Execute` has its own
/// record with the rows it sent (no tag while the portal is suspended).
#[tokio::test(flavor = "multi_thread")]
async fn row_limited_executes_record_the_rows_each_sent() {
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    let sql = "SELECT g FROM generate_series(1, 10) g";
    let mut batch = extended(sql);
    batch.truncate(batch.len() - 5 - 10);
    for _ in 0..3 {
        let mut execute = cstr("");
        execute.extend_from_slice(&4i32.to_be_bytes());
        batch.extend(message(b'E', &execute));
    }
    batch.extend(message(b'S', &[]));
    c.send_raw(&batch).await;
    let (tags, code, _) = c.until_ready().await;
    assert_eq!(code, None);
    assert_eq!(tags.iter().filter(|t| **t == b'D').count(), 10, "{tags:?}");
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let executes: Vec<(Option<u64>, String)> = records
        .iter()
        .filter(|r| s(r, "kind") == "query" && s(r, "statement") == sql)
        .map(|r| (r["rows"].as_u64(), s(r, "command_tag")))
        .collect();
    assert_eq!(
        executes,
        [
            (Some(4), "null".into()),
            (Some(4), "null".into()),
            (Some(2), "SELECT 2".into())
        ]
    );
}

/// Text from a client whose encoding is not UTF-8 is recorded exactly:
/// converted where the encoding's table is certain (LATIN1), kept as its
/// bytes otherwise (SJIS), never with a replacement character.
#[tokio::test(flavor = "multi_thread")]
async fn statements_of_non_utf8_clients_are_recorded_exactly() {
    let gw = audited().await;
    let mut latin1 = crate::hostile::raw_with(gw.addr, &[("client_encoding", "LATIN1")]).await;
    latin1
        .send_raw(&message(b'Q', b"SELECT 'caf\xe9' AS latin1_text\0"))
        .await;
    assert_eq!(latin1.until_ready().await.1, None);
    let mut sjis = crate::hostile::raw_with(gw.addr, &[("client_encoding", "SJIS")]).await;
    sjis.send_raw(&message(b'Q', b"SELECT '\x82\xa0' AS sjis_text\0"))
        .await;
    assert_eq!(sjis.until_ready().await.1, None);
    drop((latin1, sjis));
    let records = stop_and_export(gw, &[]).await;
    query_record(&records, "SELECT 'café' AS latin1_text");
    query_record(
        &records,
        &format!(
            "pgwarden:hex:SJIS:{}",
            hex::encode(b"SELECT '\x82\xa0' AS sjis_text")
        ),
    );
    assert!(
        !records
            .iter()
            .any(|r| s(r, "statement").contains('\u{fffd}')),
        "no replacement character"
    );
}

/// psycopg 3 and tokio-postgres write rows (autocommit, transactions
/// committed and rolled back, savepoints, pipelines with a failure,
/// multi-statement queries, executemany, a duplicate key...); then the
/// export is reconciled with the table: every row is attributable to
/// exactly one `ok`, committed statement of the client that wrote it, and
/// every statement recorded as committed has its row.
#[tokio::test(flavor = "multi_thread")]
async fn the_export_reconciles_with_the_database() {
    let table = "audit_recon";
    support::cluster().psql(
        "app",
        &format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY, who text);
             GRANT SELECT, INSERT ON {table} TO analyst, engineer"
        ),
    );
    let gw = start_gateway(Opts {
        audit: true,
        pool_size: 2,
        audit_extra: "log_parameters = true".into(),
        ..Opts::default()
    })
    .await;
    crate::drivers::run_python(
        &gw,
        "reconcile_workload.py",
        "alice",
        "bob",
        &[("PGWARDEN_RECON_TABLE", table)],
    )
    .await;
    // tokio-postgres: extended protocol, a pipeline of three, a
    // transaction rolled back by a failure, another committed.
    let bob = gw.connect("bob").await;
    let insert = format!("INSERT INTO {table} (id, who) VALUES ($1, 'bob')");
    let (a, b, c) = tokio::join!(
        bob.execute(&insert, &[&3001i32]),
        bob.execute(&insert, &[&3002i32]),
        bob.execute(&insert, &[&3001i32]),
    );
    // Whichever of the two 3001s ran second failed.
    assert!(b.is_ok() && (a.is_ok() != c.is_ok()), "{a:?} {b:?} {c:?}");
    bob.batch_execute("BEGIN").await.unwrap();
    bob.execute(&insert, &[&3003i32]).await.unwrap();
    bob.execute(&insert, &[&3003i32]).await.unwrap_err();
    bob.batch_execute("COMMIT").await.unwrap();
    bob.batch_execute("BEGIN").await.unwrap();
    bob.execute(&insert, &[&3004i32]).await.unwrap();
    bob.batch_execute("COMMIT").await.unwrap();
    let rows: Vec<(i32, String)> = bob
        .query(&format!("SELECT id, who FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    drop(bob);
    let records = stop_and_export(gw, &[]).await;
    // The id each INSERT record writes: in its text, or its first parameter.
    let inserted = |r: &Value| -> Option<i32> {
        let text = s(r, "statement");
        let rest = text.strip_prefix(&format!("INSERT INTO {table} (id, who) VALUES ("))?;
        let literal = rest.split(',').next()?.trim();
        if let Ok(id) = literal.parse() {
            return Some(id);
        }
        // A parameter: text, or binary as `\x` and big-endian hex.
        let param = r["params"][0].as_str()?;
        match param.strip_prefix("\\x") {
            Some(hex) => i32::from_str_radix(hex, 16).ok(),
            None => param.parse().ok(),
        }
    };
    let inserts: Vec<(&Value, i32)> = records
        .iter()
        .filter(|r| s(r, "kind") == "query")
        .filter_map(|r| inserted(r).map(|id| (r, id)))
        .collect();
    assert!(inserts.len() >= 40, "{}", inserts.len());
    for (id, who) in &rows {
        let committed: Vec<&&Value> = inserts
            .iter()
            .filter(|(r, i)| i == id && s(r, "status") == "ok" && s(r, "tx") == "committed")
            .map(|(r, _)| r)
            .collect();
        assert_eq!(committed.len(), 1, "row {id}: {committed:?}");
        assert_eq!(&s(committed[0], "client_user"), who, "row {id}");
    }
    for (r, id) in &inserts {
        let present = rows.iter().any(|(i, _)| i == id);
        let committed = s(r, "status") == "ok" && s(r, "tx") == "committed";
        if committed {
            assert!(present, "recorded as committed, not in the table: {r}");
        }
        if s(r, "tx") == "rolled_back" {
            let other_commit = inserts
                .iter()
                .any(|(o, i)| i == id && s(o, "tx") == "committed" && s(o, "status") == "ok");
            assert!(
                !present || other_commit,
                "recorded as rolled back, in the table: {r}"
            );
        }
        assert_ne!(s(r, "tx"), "unknown", "{r}");
    }
    let ids: Vec<i32> = rows.iter().map(|(i, _)| *i).collect();
    for expected in [
        1001, 1002, 1003, 1005, 1007, 1010, 1011, 1012, 1013, 1014, 1015, 1018, 3001, 3002, 3004,
    ] {
        assert!(ids.contains(&expected), "{expected} in {ids:?}");
    }
    for absent in [1004, 1006, 1008, 1009, 1016, 1017, 3003] {
        assert!(!ids.contains(&absent), "{absent} in {ids:?}");
    }
}

/// A `Bind` the server refused (the portal exists) once left the gateway
/// believing the portal ran the new statement: the `Execute` that then ran
/// the old portal (a DELETE) was recorded with the refused one's text.
#[tokio::test(flavor = "multi_thread")]
async fn an_execute_is_recorded_with_the_portal_the_server_ran() {
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    let delete = "DELETE FROM items WHERE id = 700601";
    c.send_raw(&message(b'Q', &cstr("BEGIN"))).await;
    c.until_ready().await;
    let mut batch = parse("evil", delete);
    batch.extend(bind("p", "evil"));
    batch.extend(sync());
    c.send_raw(&batch).await;
    assert_eq!(c.until_ready().await.1, None);
    c.send_raw(&message(b'Q', &cstr("SAVEPOINT s"))).await;
    c.until_ready().await;
    let mut batch = parse("inn", "SELECT 'innocent'");
    batch.extend(bind("p", "inn"));
    batch.extend(sync());
    c.send_raw(&batch).await;
    assert_eq!(c.until_ready().await.1.as_deref(), Some("42P03"));
    c.send_raw(&message(b'Q', &cstr("ROLLBACK TO SAVEPOINT s")))
        .await;
    c.until_ready().await;
    let mut batch = execute("p");
    batch.extend(sync());
    c.send_raw(&batch).await;
    let (tags, code, _) = c.until_ready().await;
    assert_eq!(code, None, "{tags:?}");
    c.send_raw(&message(b'Q', &cstr("COMMIT"))).await;
    c.until_ready().await;
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let executed = records
        .iter()
        .find(|r| s(r, "kind") == "query" && s(r, "command_tag").starts_with("DELETE"))
        .expect("the DELETE's record");
    assert_eq!(s(executed, "statement"), delete, "{executed}");
}

/// Text pipelined behind a change of `client_encoding` is read by the
/// server in the new encoding: until that change is answered, the gateway
/// records such text as its bytes rather than guess (it once recorded
/// 'é' for what the server stored as 'Ã©').
#[tokio::test(flavor = "multi_thread")]
async fn text_behind_an_encoding_change_is_never_misread() {
    let gw = start_gateway(Opts {
        audit: true,
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let mut c = RawClient::login(gw.addr).await;
    // The one connection carries this client's identity already: no
    // assertion runs ahead of the batch, so the gateway reads the second
    // query while the first's answer (the new encoding) is still unknown.
    c.send(b'Q', &cstr("SELECT 1")).await;
    c.until_ready().await;
    let mut batch = message(b'Q', &cstr("SET client_encoding = 'LATIN1'"));
    batch.extend(message(b'Q', "SELECT 'é' AS e01\0".as_bytes()));
    c.send_raw(&batch).await;
    c.until_ready().await;
    assert_eq!(c.until_ready().await.1, None);
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    assert!(
        !records
            .iter()
            .any(|r| s(r, "statement") == "SELECT 'é' AS e01"),
        "misread as UTF-8"
    );
    query_record(
        &records,
        &format!(
            "pgwarden:hex:unknown:{}",
            hex::encode("SELECT 'é' AS e01".as_bytes())
        ),
    );
}

/// PostgreSQL drops every portal when a transaction ends; the gateway kept
/// them for the session's life. An `Execute` of a portal of an ended
/// transaction (which fails with 34000) was recorded with that portal's
/// old statement, as if it had been tried again; and a client binding
/// portals of new names, as pgjdbc does for each fetch, grew the map
/// without bound.
#[tokio::test(flavor = "multi_thread")]
async fn portals_end_with_their_transaction() {
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    let old = "SELECT 'only once'";
    let mut batch = parse("", old);
    batch.extend(bind("p1", ""));
    batch.extend(execute("p1"));
    batch.extend(sync());
    c.send_raw(&batch).await;
    assert_eq!(c.until_ready().await.1, None);
    let mut again = execute("p1");
    again.extend(sync());
    c.send_raw(&again).await;
    assert_eq!(c.until_ready().await.1.as_deref(), Some("34000"));
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let tried = records
        .iter()
        .filter(|r| s(r, "kind") == "query" && s(r, "statement") == old)
        .count();
    assert_eq!(
        tried, 1,
        "the dead portal's Execute recorded as its statement"
    );
}

/// An `Execute` is never recorded with the text of another portal that
/// had its name: after an SQL `CLOSE` (or a `ROLLBACK`, or opaque code,
/// any of which may close a portal and open another of the same name) the
/// gateway forgets the portals it knew, and such an `Execute` is recorded
/// as unknown. A cursor declared `WITH HOLD` outlives its transaction,
/// and is still recorded with its `DECLARE` (rt39), in a session that
/// never ran opaque code.
#[tokio::test(flavor = "multi_thread")]
async fn an_execute_never_borrows_another_portals_text() {
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    let simple = |sql: &str| message(b'Q', &cstr(sql));
    let execute = |portal: &str| [execute(portal), sync()].concat();
    for sql in [
        "BEGIN",
        "DECLARE c1 CURSOR FOR SELECT 'decoy'",
        "CLOSE c1",
        "DO $$ DECLARE r refcursor := 'c1'; BEGIN OPEN r FOR SELECT 'what ran'; END $$",
    ] {
        c.send_raw(&simple(sql)).await;
        assert_eq!(c.until_ready().await.1, None, "{sql}");
    }
    c.send_raw(&execute("c1")).await;
    assert_eq!(c.until_ready().await.1, None);
    c.send_raw(&simple("COMMIT")).await;
    c.until_ready().await;
    // The same by a function run through the extended protocol (rt41).
    let alice = gw.connect("alice").await;
    alice
        .batch_execute("CREATE OR REPLACE FUNCTION reopen_c2() RETURNS void LANGUAGE plpgsql AS $f$ DECLARE r refcursor := 'c2'; BEGIN CLOSE r; OPEN r FOR SELECT 'what ran 2'; END $f$")
        .await
        .unwrap();
    let mut ext = RawClient::login(gw.addr).await;
    drop(alice);
    let run = [
        parse("", "SELECT reopen_c2()"),
        bind("", ""),
        crate::raw::execute(""),
        sync(),
    ];
    for batch in [
        simple("BEGIN"),
        simple("DECLARE c2 CURSOR FOR SELECT 'decoy2'"),
        run.concat(),
        execute("c2"),
        simple("COMMIT"),
    ] {
        ext.send_raw(&batch).await;
        assert_eq!(ext.until_ready().await.1, None);
    }
    drop(ext);
    // Opaque code may open cursors WITH HOLD, which outlive its
    // transaction: in this session a DECLARE's name may be taken without
    // the gateway knowing, and no cursor is noted any more (unknown).
    let held = "DECLARE c4 CURSOR WITH HOLD FOR SELECT 'held'";
    let mut fresh = RawClient::login(gw.addr).await;
    for c in [&mut c, &mut fresh] {
        c.send_raw(&simple(&format!("BEGIN; {held}; COMMIT"))).await;
        c.until_ready().await;
        c.send_raw(&execute("c4")).await;
        assert_eq!(c.until_ready().await.1, None);
    }
    drop((c, fresh));
    let records = stop_and_export(gw, &[]).await;
    let statements = statements(&records);
    for decoy in ["'decoy'", "'decoy2'"] {
        let decoys = statements.iter().filter(|t| t.contains(decoy)).count();
        assert_eq!(
            decoys, 1,
            "the Execute borrowed the decoy's text: {statements:?}"
        );
    }
    let unknown = "-- Execute of portal \"c1\" (unknown to pgwarden: opened by code it cannot see, or dropped)";
    assert!(statements.iter().any(|t| t == unknown), "{statements:?}");
    let declared = statements.iter().filter(|t| *t == held).count();
    assert_eq!(declared, 3, "{statements:?}");
    let unknown = unknown.replace("c1", "c4");
    assert!(statements.contains(&unknown), "{statements:?}");
}

/// PostgreSQL drops the portals opened after a savepoint when the
/// transaction rolls back to it (a cursor declared `WITH HOLD` too); an
/// `Execute` of one fails with 34000, and was recorded with the dropped
/// portal's text, as if it had run again. One opened before the savepoint
/// is still recorded with its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_to_savepoint_drops_the_portals_opened_after_it() {
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    let simple = |sql: &str| message(b'Q', &cstr(sql));
    let opened = |portal: &str, sql: &str| [parse("", sql), bind(portal, ""), sync()].concat();
    let held = "DECLARE held CURSOR WITH HOLD FOR SELECT 'held after'";
    for batch in [
        simple("BEGIN"),
        opened("before", "SELECT 'before'"),
        simple("SAVEPOINT s"),
        opened("after", "SELECT 'after'"),
        simple(held),
        simple("ROLLBACK TO SAVEPOINT s"),
    ] {
        c.send_raw(&batch).await;
        assert_eq!(c.until_ready().await.1, None);
    }
    for (portal, code) in [("before", None), ("after", Some("34000"))] {
        c.send_raw(&[execute(portal), sync()].concat()).await;
        assert_eq!(c.until_ready().await.1.as_deref(), code, "{portal}");
    }
    c.send_raw(&simple("ROLLBACK TO SAVEPOINT s")).await;
    assert_eq!(c.until_ready().await.1, None);
    c.send_raw(&[execute("held"), sync()].concat()).await;
    assert_eq!(c.until_ready().await.1.as_deref(), Some("34000"));
    c.send_raw(&simple("COMMIT")).await;
    c.until_ready().await;
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let statements = statements(&records);
    let count = |text: &str| statements.iter().filter(|t| *t == text).count();
    assert_eq!(count("SELECT 'before'"), 1, "{statements:?}");
    assert_eq!(count("SELECT 'after'"), 0, "{statements:?}");
    assert_eq!(count(held), 1, "the DECLARE only: {statements:?}");
    for portal in ["after", "held"] {
        let unknown = format!(
            "-- Execute of portal \"{portal}\" (unknown to pgwarden: opened by code it cannot see, or dropped)"
        );
        assert_eq!(count(&unknown), 1, "{statements:?}");
    }
}

/// Red team rt40: the split into statements follows PostgreSQL's grammar
/// for routine bodies. A column labelled `end` closed a `BEGIN ATOMIC`
/// body: the committed INSERT before it was recorded as rolled back, and a
/// DELETE of the body (which never ran) as run. A CTE named `begin`
/// aliased `atomic` opened one: a DELETE's record said `SELECT 1`.
#[tokio::test(flavor = "multi_thread")]
async fn statements_are_split_as_the_server_runs_them() {
    let gw = audited().await;
    let alice = gw.connect("alice").await;
    let insert = "INSERT INTO items (id, owner) VALUES (700701, 'alice')";
    let create = "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1 AS end; DELETE FROM items WHERE id = 700701 RETURNING 1; END";
    alice
        .batch_execute(&format!("{insert}; {create}"))
        .await
        .unwrap();
    let delete = "DELETE FROM items WHERE id IN (700701, 700702)";
    alice
        .batch_execute(&format!("INSERT INTO items (id, owner) VALUES (700702, 'alice'); WITH begin AS (SELECT 1) SELECT * FROM begin atomic; {delete}; SELECT 1 AS end"))
        .await
        .unwrap();
    drop(alice);
    let records = stop_and_export(gw, &[]).await;
    let line = |sql: &str| {
        let r = query_record(&records, sql);
        (s(r, "status"), s(r, "command_tag"), s(r, "tx"))
    };
    let ok = |tag: &str| ("ok".to_string(), tag.to_string(), "committed".to_string());
    assert_eq!(line(insert), ok("INSERT 0 1"));
    assert_eq!(line(create), ok("CREATE FUNCTION"));
    assert_eq!(line(delete), ok("DELETE 2"));
    let body = records
        .iter()
        .filter(|r| s(r, "statement").starts_with("DELETE FROM items WHERE id = 700701"))
        .count();
    assert_eq!(body, 0, "a statement of the body recorded as run");
}

/// Red team rt40: a savepoint name the gateway read otherwise than
/// PostgreSQL (`U&"\0061"` is `a`) rewound the wrong savepoint, and a
/// committed INSERT was exported as rolled back. A name it cannot read for
/// certain now makes the transaction's outcome unknown, never wrong.
#[tokio::test(flavor = "multi_thread")]
async fn a_savepoint_name_read_otherwise_never_makes_a_wrong_outcome() {
    let gw = audited().await;
    let alice = gw.connect("alice").await;
    let insert = "INSERT INTO items (id, owner) VALUES (700801, 'alice')";
    for sql in [
        "BEGIN",
        "SAVEPOINT a",
        insert,
        "SAVEPOINT U&\"\\0061\"",
        "ROLLBACK TO a",
        "COMMIT",
    ] {
        alice.batch_execute(sql).await.unwrap();
    }
    let kept: i64 = alice
        .query_one("SELECT count(*) FROM items WHERE id = 700801", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "PostgreSQL rolled back to the newer a");
    drop(alice);
    let records = stop_and_export(gw, &[]).await;
    let r = query_record(&records, insert);
    assert_eq!(
        (s(r, "status"), s(r, "tx")),
        ("ok".into(), "unknown".into()),
        "{r}"
    );
}

/// Red team rt41: a `DECLARE` lent its text to the portal of its cursor's
/// name before it ran (noted at its `Parse`), and when it failed because
/// the name was taken: an `Execute` of the real portal was recorded as
/// the harmless DECLARE. A cursor is noted when its DECLARE runs, and only
/// under a name no known portal holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_declare_never_lends_its_text_to_another_portal() {
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    let real = "SELECT owner FROM items WHERE id = -41";
    let decoy = "DECLARE c CURSOR FOR SELECT 'nothing to see'";
    // Bound, then a DECLARE of its name parsed but never run.
    let batch = [
        parse("s", real),
        bind("c", "s"),
        parse("d", decoy),
        execute("c"),
        sync(),
    ];
    c.send_raw(&batch.concat()).await;
    assert_eq!(c.until_ready().await.1, None);
    // Bound in a block, then a DECLARE of its name that fails (42P03),
    // undone by a rollback to a savepoint set after the Bind.
    let simple = |sql: &str| message(b'Q', &cstr(sql));
    for (batch, code) in [
        (simple("BEGIN"), None),
        ([bind("c", "s"), sync()].concat(), None),
        (simple("SAVEPOINT s"), None),
        (simple(decoy), Some("42P03")),
        (simple("ROLLBACK TO SAVEPOINT s"), None),
        ([execute("c"), sync()].concat(), None),
        (simple("COMMIT"), None),
    ] {
        c.send_raw(&batch).await;
        assert_eq!(c.until_ready().await.1.as_deref(), code);
    }
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let statements = statements(&records);
    let runs = statements.iter().filter(|t| *t == real).count();
    assert_eq!(runs, 2, "{statements:?}");
    let decoys = statements.iter().filter(|t| *t == decoy).count();
    assert_eq!(decoys, 1, "only the failed DECLARE itself: {statements:?}");
}

/// Red team rt42: a DECLARE that failed (or was skipped) was still noted,
/// and the successful DECLARE of its name after it was not: an Execute
/// of the cursor was recorded as the failed one. And a `Close` the server
/// skipped made the name look free, so a failing DECLARE of it was noted.
/// Such an Execute is now recorded as unknown.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_or_skipped_cursor_statement_never_lends_its_text() {
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    let simple = |sql: &str| message(b'Q', &cstr(sql));
    let failed = "DECLARE c CURSOR WITH HOLD FOR SELECT 'decoy1' FROM no_such_table";
    let decoy = "DECLARE x CURSOR WITH HOLD FOR SELECT 'decoy2'";
    let close_skipped = [
        parse("", "SELECT 1/0"),
        bind("", ""),
        execute(""),
        message(b'C', b"Px\0"),
        sync(),
    ];
    for (batch, code) in [
        (simple(failed), Some("42P01")),
        (
            simple("DECLARE c CURSOR WITH HOLD FOR SELECT 'ran 1'"),
            None,
        ),
        ([execute("c"), sync()].concat(), None),
        (
            simple("DECLARE x CURSOR WITH HOLD FOR SELECT 'ran 2'"),
            None,
        ),
        (close_skipped.concat(), Some("22012")),
        (simple(decoy), Some("42P03")),
        ([execute("x"), sync()].concat(), None),
    ] {
        c.send_raw(&batch).await;
        assert_eq!(c.until_ready().await.1.as_deref(), code);
    }
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let statements = statements(&records);
    for text in [failed, decoy] {
        let uses = statements.iter().filter(|t| *t == text).count();
        assert_eq!(uses, 1, "{text} lent to an Execute: {statements:?}");
    }
}

/// Red team rt43: a client that sends its next batch before the last one
/// is answered had a new cursor's `Execute` recorded as the portal of the
/// same name its last batch bound (which PostgreSQL dropped when that
/// transaction ended). And `PREPARE TRANSACTION` outside a block, which
/// PostgreSQL ignores (tag `ROLLBACK`) before committing the batch, made
/// a committed INSERT `rolled_back`.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipelined_batch_never_borrows_the_last_ones_portal() {
    let gw = audited().await;
    let mut c = RawClient::login(gw.addr).await;
    let decoy = "SELECT 'decoy'";
    let cursor = "DECLARE p CURSOR WITH HOLD FOR SELECT owner FROM items WHERE id = -43";
    let batches = [
        [parse("", decoy), bind("p", ""), sync()].concat(),
        [
            parse("", cursor),
            bind("", ""),
            execute(""),
            execute("p"),
            sync(),
        ]
        .concat(),
    ];
    c.send_raw(&batches.concat()).await;
    for _ in 0..2 {
        assert_eq!(c.until_ready().await.1, None);
    }
    // Red team rt44: a BEGIN sent but never run (its Bind fails) hid the
    // end of the transaction, and of the portal bound in it.
    let mut bad_bind = cstr("pb");
    bad_bind.extend(cstr("b"));
    bad_bind.extend([0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 0]);
    let decoy3 = "SELECT 'decoy3'";
    let cursor3 = "DECLARE p3 CURSOR WITH HOLD FOR SELECT owner FROM items WHERE id = -44";
    let batches = [
        parse("s3", decoy3),
        bind("p3", "s3"),
        parse("b", "BEGIN"),
        message(b'B', &bad_bind),
        execute("pb"),
        sync(),
        parse("", cursor3),
        bind("", ""),
        execute(""),
        execute("p3"),
        sync(),
    ];
    c.send_raw(&batches.concat()).await;
    assert_eq!(c.until_ready().await.1.as_deref(), Some("08P01"));
    assert_eq!(c.until_ready().await.1, None);
    let insert = "INSERT INTO items (id, owner) VALUES (700901, 'alice')";
    let batch = [
        parse("", insert),
        bind("", ""),
        execute(""),
        parse("", "PREPARE TRANSACTION 'rt43'"),
        bind("", ""),
        execute(""),
        sync(),
    ];
    c.send_raw(&batch.concat()).await;
    assert_eq!(c.until_ready().await.1, None);
    drop(c);
    let records = stop_and_export(gw, &[]).await;
    let statements = statements(&records);
    for decoy in [decoy, decoy3] {
        assert!(!statements.iter().any(|t| t == decoy), "{statements:?}");
    }
    let r = query_record(&records, insert);
    assert_ne!(s(r, "tx"), "rolled_back", "it committed: {r}");
}
