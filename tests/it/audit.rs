//! The audit trail end to end: a known workload through the gateway, then
//! the exported records checked one by one; durability under kill -9; and
//! fail-closed behaviour when the store cannot be written.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio_postgres::types::Type;

use crate::raw::message;
use crate::support::{self, cluster, start_gateway, Opts, TestGateway};

fn pgwarden(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(args)
        .output()
        .unwrap()
}

pub fn export(store: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "export", "--store", store.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = pgwarden(&args);
    assert!(
        out.status.success(),
        "export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn s(v: &Value, k: &str) -> String {
    v[k].as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v[k].to_string())
}

/// A gateway with audit on and `log_parameters = true`, and its store.
async fn gateway_logging_parameters() -> (TestGateway, std::path::PathBuf) {
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: "log_parameters = true\n".into(),
        ..Opts::default()
    })
    .await;
    let store = gw.dir.path().join("audit");
    (gw, store)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_known_workload_is_exported_statement_by_statement() {
    let (gw, store) = gateway_logging_parameters().await;
    let c = gw.connect("alice").await;
    c.simple_query("SELECT 1").await.unwrap();
    c.simple_query("CREATE TEMP TABLE w(x int); INSERT INTO w VALUES (1), (2)")
        .await
        .unwrap();
    c.simple_query("SELECT 1/0").await.unwrap_err();
    let row = c.query_one("SELECT $1::int + 1", &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    c.batch_execute("BEGIN; CREATE TEMP TABLE cw(x int)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY cw FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"1\n2\n3\n")).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 3);
    c.batch_execute("COMMIT").await.unwrap();
    c.simple_query("SET ROLE other_role").await.unwrap_err();
    drop(c);
    gw.until_clients(0).await;
    let _dir = gw.stop().await;

    let verify = pgwarden(&["audit", "verify", "--store", store.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let records = export(&store, &[]);
    let kinds: Vec<String> = records.iter().map(|r| s(r, "kind")).collect();
    assert_eq!(kinds.first().map(String::as_str), Some("gateway_start"));
    // It names the instance and the backend its run's records come from.
    let start = s(&records[0], "message");
    let backend = format!("backend 127.0.0.1:{}", crate::support::cluster().port);
    assert!(
        start.contains("instance ") && start.contains(&backend),
        "{start}"
    );
    assert_eq!(kinds.last().map(String::as_str), Some("gateway_stop"));
    assert!(kinds.contains(&"session_start".to_string()));
    assert!(kinds.contains(&"session_end".to_string()));
    assert!(
        !kinds.contains(&"result".to_string()),
        "results are joined into their queries"
    );
    for r in records
        .iter()
        .filter(|r| s(r, "kind") != "gateway_start" && s(r, "kind") != "gateway_stop")
    {
        assert_eq!(s(r, "client_user"), "alice", "{r}");
        assert_eq!(s(r, "role"), "analyst", "{r}");
        assert_eq!(s(r, "database"), "app", "{r}");
        assert!(s(r, "client_addr").starts_with("127.0.0.1:"), "{r}");
        assert!(r["session_id"].is_string(), "{r}");
    }
    let queries: Vec<&Value> = records.iter().filter(|r| s(r, "kind") == "query").collect();
    let find = |text: &str| -> &Value {
        queries
            .iter()
            .find(|q| s(q, "statement") == text)
            .unwrap_or_else(|| panic!("no query record for {text}: {queries:#?}"))
    };
    let q = find("SELECT 1");
    assert_eq!(
        (s(q, "status"), s(q, "command_tag"), q["rows"].as_u64()),
        ("ok".into(), "SELECT 1".into(), Some(1))
    );
    assert!(q["duration_us"].is_u64());
    // Stored before a connection was taken, the query names its backend
    // through its result.
    assert!(q["backend_pid"].is_i64(), "{q}");
    // One record per statement of a multi-statement query.
    let q = find("CREATE TEMP TABLE w(x int)");
    assert_eq!(
        (s(q, "status"), s(q, "command_tag")),
        ("ok".into(), "CREATE TABLE".into())
    );
    let q = find("INSERT INTO w VALUES (1), (2)");
    assert_eq!(
        (s(q, "status"), s(q, "command_tag")),
        ("ok".into(), "INSERT 0 2".into())
    );
    let q = find("SELECT 1/0");
    assert_eq!(
        (s(q, "status"), s(q, "sqlstate")),
        ("error".into(), "22012".into())
    );
    assert_eq!(s(q, "message"), "division by zero");
    let q = find("SELECT $1::int + 1");
    assert_eq!(s(q, "status"), "ok");
    // tokio-postgres binds an int4 in binary: exported as hex.
    assert_eq!(q["params"], serde_json::json!(["\\x00000029"]));
    let q = find("COPY cw FROM STDIN");
    assert_eq!(
        (s(q, "status"), s(q, "command_tag")),
        ("ok".into(), "COPY 3".into())
    );
    let blocked = records
        .iter()
        .find(|r| s(r, "kind") == "guard_blocked")
        .expect("guard_blocked record");
    assert_eq!(s(blocked, "statement"), "SET ROLE other_role");
    assert_eq!(s(blocked, "sqlstate"), "42501");
    // Raw export: every record, seq contiguous from 1, results included.
    let raw = export(&store, &["--raw"]);
    for (i, r) in raw.iter().enumerate() {
        assert_eq!(r["seq"].as_u64(), Some(i as u64 + 1));
    }
    assert!(raw.iter().any(|r| s(r, "kind") == "result"));
    // CSV has a header row and the same statements.
    let out = pgwarden(&[
        "audit",
        "export",
        "--store",
        store.to_str().unwrap(),
        "--format",
        "csv",
        "--kind",
        "query",
    ]);
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(
        csv.starts_with("seq,ts,kind,session_id,client_user,role,database"),
        "{csv}"
    );
    assert!(csv.contains("SELECT 1/0"));
    let stats = pgwarden(&["audit", "stats", "--store", store.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&stats.stdout).contains("alice"));
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_failures_and_denials_are_recorded() {
    let gw = start_gateway(Opts {
        audit: true,
        ..Opts::default()
    })
    .await;
    let store = gw.dir.path().join("audit");
    let _ = tokio_postgres::connect(&gw.url("alice", "wrong"), tokio_postgres::NoTls).await;
    let _ = gw.try_connect("carol").await;
    let _dir = gw.stop().await;
    let records = export(&store, &[]);
    let failed = records
        .iter()
        .find(|r| s(r, "kind") == "auth_failed")
        .expect("auth_failed");
    assert_eq!(
        (s(failed, "client_user"), s(failed, "sqlstate")),
        ("alice".into(), "28P01".into())
    );
    let denied = records
        .iter()
        .find(|r| s(r, "kind") == "denied")
        .expect("denied");
    assert_eq!(
        (s(denied, "client_user"), s(denied, "sqlstate")),
        ("carol".into(), "28000".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_that_gets_no_server_connection_is_logged_with_its_error() {
    // Between transactions the record is stored before a connection is
    // taken; when none comes, the statement's result says why.
    let gw = start_gateway(Opts {
        audit: true,
        pool_size: 1,
        acquire_timeout_ms: 500,
        ..Opts::default()
    })
    .await;
    let store = gw.dir.path().join("audit");
    let alice = gw.connect("alice").await;
    let bob = gw.connect("bob").await;
    alice.batch_execute("BEGIN").await.unwrap();
    let err = bob
        .simple_query("SELECT 'bob waited'")
        .await
        .expect_err("the only connection is in alice's transaction");
    assert_eq!(support::sqlstate(&err), "53300", "{err}");
    // Parse/Bind/Describe/Execute/Sync in one batch: its record is written
    // ahead of the batch.
    let err = bob
        .query_typed("SELECT 'bob extended' || $1::text", &[(&"!", Type::TEXT)])
        .await
        .expect_err("the only connection is in alice's transaction");
    assert_eq!(support::sqlstate(&err), "53300", "{err}");
    alice.batch_execute("COMMIT").await.unwrap();
    // A batch the guard refuses is not written ahead as a query.
    let err = bob
        .query_typed(
            "SELECT set_config('role', $1, false)",
            &[(&"postgres", Type::TEXT)],
        )
        .await
        .expect_err("guard");
    assert_eq!(support::sqlstate(&err), "42501", "{err}");
    drop((alice, bob));
    gw.until_clients(0).await;
    let _dir = gw.stop().await;
    let records = export(&store, &[]);
    let q = records
        .iter()
        .find(|r| s(r, "kind") == "query" && s(r, "statement") == "SELECT 'bob waited'")
        .unwrap_or_else(|| panic!("bob's statement is not in the log: {records:#?}"));
    assert_eq!(
        (s(q, "client_user"), s(q, "status"), s(q, "sqlstate")),
        ("bob".into(), "error".into(), "53300".into()),
        "{q}"
    );
    assert!(
        q["backend_pid"].is_null(),
        "it never reached a backend: {q}"
    );
    let q = records
        .iter()
        .find(|r| {
            s(r, "kind") == "query" && s(r, "statement") == "SELECT 'bob extended' || $1::text"
        })
        .unwrap_or_else(|| panic!("bob's extended statement is not in the log: {records:#?}"));
    assert_eq!(
        (s(q, "status"), s(q, "sqlstate")),
        ("error".into(), "53300".into()),
        "{q}"
    );
    let blocked = "SELECT set_config('role', $1, false)";
    assert!(
        !records
            .iter()
            .any(|r| s(r, "kind") == "query" && s(r, "statement") == blocked),
        "a refused statement was logged as a query: {records:#?}"
    );
    assert!(
        records
            .iter()
            .any(|r| s(r, "kind") == "guard_blocked" && s(r, "statement") == blocked),
        "{records:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_pooled_connection_waits_for_an_audit_fsync_between_transactions() {
    // With `group`, a record waits for an fsync. A statement that starts a
    // transaction must wait for it before it takes a server connection, or a
    // pool of N serves at most N fsync waits at a time.
    let admin = support::cluster::free_port();
    let control = Arc::new(pgwarden::audit::MemoryControl::default());
    let gw = start_gateway(Opts {
        audit: true,
        pool_size: 1,
        memory_store: Some(control.clone()),
        audit_extra: format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n"),
        ..Opts::default()
    })
    .await;
    let alice = Arc::new(gw.connect("alice").await);
    assert_eq!(support::one(&alice, "SELECT 1").await, "1");
    let prepared = alice.prepare("SELECT $1::int + 1").await.unwrap();
    // A simple Query; Parse/Bind/Describe/Execute/Sync in one batch; and
    // Bind/Execute/Sync of a prepared statement.
    for way in ["simple", "batch", "prepared"] {
        control.sync_delay_us.store(2_000_000, Ordering::SeqCst);
        let (c, stmt) = (alice.clone(), prepared.clone());
        let waiting = tokio::spawn(async move {
            match way {
                "simple" => support::one(&c, "SELECT 2").await,
                "batch" => c
                    .query_typed_one("SELECT $1::text", &[(&"2", Type::TEXT)])
                    .await
                    .unwrap()
                    .get(0),
                _ => c
                    .query_one(&stmt, &[&1i32])
                    .await
                    .unwrap()
                    .get::<_, i32>(0)
                    .to_string(),
            }
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        let body = support::scrape_metrics(admin).await;
        control.sync_delay_us.store(0, Ordering::SeqCst);
        for line in [
            "pgwarden_server_connections{database=\"app\",state=\"active\"} 0",
            "pgwarden_server_connections{database=\"app\",state=\"idle\"} 1",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "{way}: missing {line}:\n{body}"
            );
        }
        assert_eq!(waiting.await.unwrap(), "2", "{way}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_store_refuses_statements_unless_allowed() {
    let control = Arc::new(pgwarden::audit::MemoryControl::default());
    let gw = start_gateway(Opts {
        audit: true,
        memory_store: Some(control.clone()),
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    let marker = 4_000_000 + rand::random::<u16>() as i32;
    control.fail_inserts.store(true, Ordering::SeqCst);
    let err = c
        .simple_query(&format!(
            "INSERT INTO items VALUES ({marker}, 'unaudited', NULL)"
        ))
        .await
        .expect_err("fail closed");
    assert_eq!(support::sqlstate(&err), "58030");
    let err = c
        .query("SELECT 1", &[])
        .await
        .expect_err("fail closed, extended");
    assert_eq!(support::sqlstate(&err), "58030");
    assert_eq!(
        cluster().psql(
            "app",
            &format!("SELECT count(*) FROM items WHERE id = {marker}")
        ),
        "0"
    );
    // The store heals: statements run again.
    control.fail_inserts.store(false, Ordering::SeqCst);
    assert_eq!(support::one(&c, "SELECT 7").await, "7");

    let control = Arc::new(pgwarden::audit::MemoryControl::default());
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: "on_failure = \"allow\"\n".into(),
        memory_store: Some(control.clone()),
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    control.fail_inserts.store(true, Ordering::SeqCst);
    assert_eq!(support::one(&c, "SELECT 8").await, "8");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_no_acknowledged_statement() {
    // `async` may lose what was queued shortly before the crash: the flush
    // interval, an fsync, and what the writer had not reached (at most 1,024
    // records: a few hundred ms in a debug build under load). Everything
    // acknowledged well before must be there, and the chain must verify.
    for (durability, grace) in [
        ("group", Duration::ZERO),
        ("sync", Duration::ZERO),
        ("async", Duration::from_secs(1)),
    ] {
        kill_9_run(durability, grace, 4, "", None).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_no_acknowledged_statement_of_a_crowded_pool() {
    // 48 clients on a pool of 2: sessions queue many deep for a connection,
    // so `group` lets their records' fsyncs gather for more records. Still,
    // no statement may run before its record is on disk.
    let gathered = kill_9_run(
        "group",
        Duration::ZERO,
        48,
        "[pool]\nsize = 2\n",
        Some(cluster::free_port()),
    )
    .await;
    assert!(
        gathered > 0,
        "no commit gathered: the crowded path was not taken"
    );
}

/// Runs load through the real binary from `clients` clients, kills it with
/// SIGKILL, and checks that every statement acknowledged more than `grace`
/// before the kill is in the audit log and the chain verifies. `extra`
/// configures it further; with an `[admin]` listener on `admin`, returns
/// the `group` commits that gathered for a crowded pool before the kill.
async fn kill_9_run(
    durability: &str,
    grace: Duration,
    clients: usize,
    extra: &str,
    admin: Option<u16>,
) -> u64 {
    let listener = admin.map_or(String::new(), |port| {
        format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n")
    });
    let gw = support::BinaryGateway::start(
        support::TEST_POLICY,
        &format!("[audit]\nstore = \"audit\"\ndurability = \"{durability}\"\n{extra}{listener}"),
    )
    .await;
    let mut connected = Vec::new();
    for _ in 0..clients {
        connected.push(support::connect_at(gw.port, "alice").await);
    }
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tag = rand::random::<u32>();
    let mut tasks = Vec::new();
    for (w, c) in connected.into_iter().enumerate() {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let sql = format!("SELECT 'k9-{tag}-{w}-{i}'");
                if c.simple_query(&sql).await.is_err() {
                    break;
                }
                acked.lock().unwrap().push((sql, std::time::Instant::now()));
            }
        }));
    }
    // At least 1.5 s of load, and on a loaded machine until 200 statements
    // were acknowledged (at most 30 s): the kill must land mid-load.
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let enough = acked.lock().unwrap().len() >= 200;
        let elapsed = started.elapsed();
        if (enough && elapsed >= Duration::from_millis(1500)) || elapsed >= Duration::from_secs(30)
        {
            break;
        }
    }
    let gathered = match admin {
        Some(port) => support::scrape_metrics(port)
            .await
            .lines()
            .find_map(|l| l.strip_prefix("pgwarden_audit_gathered_batches_total "))
            .map_or(0, |n| n.trim().parse().unwrap()),
        None => 0,
    };
    let killed_at = std::time::Instant::now();
    gw.signal(libc::SIGKILL);
    let (_, dir) = gw.wait().await;
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "{durability}: too little load: {}",
        acked.len()
    );
    let store = dir.path().join("audit");
    let verify = pgwarden(&["audit", "verify", "--store", store.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{durability}: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let stored: std::collections::HashSet<String> = export(&store, &["--raw", "--kind", "query"])
        .iter()
        .map(|r| s(r, "statement"))
        .collect();
    let mut within_grace = 0;
    for (sql, at) in &acked {
        if killed_at.saturating_duration_since(*at) < grace {
            within_grace += usize::from(!stored.contains(sql));
            continue;
        }
        assert!(
            stored.contains(sql),
            "{durability}: acknowledged {:?} before the kill but not in the audit log: {sql}",
            killed_at.saturating_duration_since(*at)
        );
    }
    eprintln!(
        "{durability}: {} statements acknowledged, {within_grace} of the last {grace:?} not stored, {gathered} commits gathered",
        acked.len()
    );
    gathered
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_recorded_ahead_matches_the_same_batch_inside_a_transaction() {
    // Outside a transaction the first Execute's record is built by reading
    // the batch ahead; inside one it is built as the messages are handled.
    // Both must log the same statement and parameters.
    let (gw, store) = gateway_logging_parameters().await;
    let c = gw.connect("alice").await;
    let sql = "SELECT $1::text || $2::int || 'ahead'";
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
        [(&"x\u{e9}", Type::TEXT), (&7i32, Type::INT4)];
    let prepared = c.prepare(sql).await.unwrap();
    for in_transaction in [false, true] {
        if in_transaction {
            c.batch_execute("BEGIN").await.unwrap();
        }
        c.query_typed(sql, &params).await.unwrap();
        c.query(&prepared, &[&"x\u{e9}", &7i32]).await.unwrap();
        if in_transaction {
            c.batch_execute("COMMIT").await.unwrap();
        }
    }
    drop(c);
    gw.until_clients(0).await;
    let _dir = gw.stop().await;
    let logged: Vec<(String, String, String)> = export(&store, &[])
        .iter()
        .filter(|r| s(r, "kind") == "query" && s(r, "statement") == sql)
        .map(|r| (s(r, "params"), s(r, "status"), s(r, "rows")))
        .collect();
    assert_eq!(logged.len(), 4, "{logged:?}");
    assert!(logged.iter().all(|l| *l == logged[0]), "{logged:?}");
    assert_eq!(logged[0].1, "ok");
    // tokio-postgres binds both in binary: exported as hex.
    assert_eq!(logged[0].0, r#"["\\x78c3a9","\\x00000007"]"#, "{logged:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_the_gateway_refuses_is_not_recorded_ahead() {
    // Bind or Describe of an unnamed statement this transaction never
    // parsed is refused with 26000 before anything runs: no `query` record
    // may be written for it ahead of the batch.
    let gw = start_gateway(Opts {
        audit: true,
        ..Opts::default()
    })
    .await;
    let store = gw.dir.path().join("audit");
    let mut c = crate::raw::RawClient::login(gw.addr).await;
    let bind = message(b'B', b"\0\0\0\0\0\0\0\0");
    let execute = message(b'E', b"\0\0\0\0\0");
    let sync = message(b'S', b"");
    for first in [bind.clone(), message(b'D', b"S\0")] {
        // One write: the whole batch is buffered when the gateway reads it.
        let batch = [first, bind.clone(), execute.clone(), sync.clone()].concat();
        c.stream.write_all(&batch).await.unwrap();
        let (_, code, status) = c.until_ready().await;
        assert_eq!((code.as_deref(), status), (Some("26000"), b'I'));
    }
    drop(c);
    gw.until_clients(0).await;
    let _dir = gw.stop().await;
    let queries: Vec<Value> = export(&store, &["--raw"])
        .into_iter()
        .filter(|r| s(r, "kind") == "query")
        .collect();
    assert!(queries.is_empty(), "{queries:#?}");
}

/// The first batch of a session, sent in one write, is audited before it
/// takes a connection; its record still shows the bound parameters
/// (`log_parameters`), as every later batch's does.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_batch_of_a_session_is_recorded_with_its_parameters() {
    let (gw, store) = gateway_logging_parameters().await;
    let mut c = crate::raw::RawClient::login(gw.addr).await;
    let parse = message(b'P', b"\0SELECT $1::int + 1\0\0\0");
    let mut bind = b"\0\0\0\0\0\x01\0\0\0\x0241".to_vec();
    bind.extend_from_slice(b"\0\0");
    let batch = [
        parse,
        message(b'B', &bind),
        message(b'E', b"\0\0\0\0\0"),
        message(b'S', b""),
    ]
    .concat();
    for _ in 0..2 {
        c.stream.write_all(&batch).await.unwrap();
        let (_, code, status) = c.until_ready().await;
        assert_eq!((code, status), (None, b'I'));
    }
    drop(c);
    gw.until_clients(0).await;
    let _dir = gw.stop().await;
    let queries: Vec<Value> = export(&store, &[])
        .into_iter()
        .filter(|r| s(r, "kind") == "query")
        .collect();
    assert_eq!(queries.len(), 2, "{queries:#?}");
    for q in &queries {
        assert_eq!(s(q, "statement"), "SELECT $1::int + 1", "{q}");
        assert_eq!(q["params"], serde_json::json!(["41"]), "{q}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statements_duration_leaves_out_its_wait_for_a_connection() {
    // Recorded before it takes a connection, the statement's duration must
    // still be its own, not the time it queued for the pool.
    let gw = start_gateway(Opts {
        audit: true,
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let store = gw.dir.path().join("audit");
    let alice = gw.connect("alice").await;
    let bob = Arc::new(gw.connect("bob").await);
    let statements = ["SELECT 'bob queued'", "SELECT 'bob queued, extended'"];
    for (i, sql) in statements.into_iter().enumerate() {
        alice.batch_execute("BEGIN").await.unwrap();
        let bob = bob.clone();
        let waiting = tokio::spawn(async move {
            if i == 0 {
                bob.simple_query(sql).await.unwrap();
            } else {
                bob.query_typed(sql, &[]).await.unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(1200)).await;
        alice.batch_execute("COMMIT").await.unwrap();
        waiting.await.unwrap();
    }
    drop((alice, bob));
    gw.until_clients(0).await;
    let _dir = gw.stop().await;
    let records = export(&store, &[]);
    for sql in statements {
        let q = records
            .iter()
            .find(|r| s(r, "statement") == sql)
            .unwrap_or_else(|| panic!("no record of {sql}"));
        let took = q["duration_us"].as_u64().expect("a duration");
        assert!(took < 900_000, "the 1.2 s pool wait was counted: {q}");
    }
}
