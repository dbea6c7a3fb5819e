//! Protocol coverage through the gateway: simple and extended queries,
//! pipelining, errors, transactions, COPY, large rows, notices, cancel.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::SimpleQueryMessage;

use crate::support::{self, start_gateway, Opts};

fn tags(msgs: &[SimpleQueryMessage]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_statement_simple_query() {
    let gw = start_gateway(Opts::default()).await;
    let c = gw.connect("alice").await;
    let msgs = c
        .simple_query("CREATE TEMP TABLE m(x int); INSERT INTO m VALUES (1),(2),(3); SELECT * FROM m; DROP TABLE m")
        .await
        .unwrap();
    assert_eq!(tags(&msgs), vec![0, 3, 3, 0]);
    // An error stops the rest of the string, and the session goes on.
    let err = c
        .simple_query("SELECT 1; SELECT 1/0; SELECT 3")
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "22012");
    assert_eq!(support::one(&c, "SELECT 42").await, "42");
    // An empty query gets EmptyQueryResponse and ReadyForQuery.
    c.simple_query("").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn extended_protocol_pipelines() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    let stmt = c.prepare("SELECT $1::int * 2").await.unwrap();
    // tokio-postgres pipelines concurrent requests on one connection.
    let values: Vec<i32> = (0..20).collect();
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> =
        values.iter().map(|i| [i as _]).collect();
    let futures: Vec<_> = params.iter().map(|p| c.query_one(&stmt, p)).collect();
    let results = futures_util::future::join_all(futures).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap().get::<_, i32>(0), i as i32 * 2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn error_in_the_middle_of_a_pipeline() {
    let gw = start_gateway(Opts::default()).await;
    let c = gw.connect("alice").await;
    let (a, b, d) = tokio::join!(
        c.query_one("SELECT 1::int", &[]),
        c.query_one("SELECT 1/0", &[]),
        c.query_one("SELECT 3::int", &[]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(support::sqlstate(&b.unwrap_err()), "22012");
    assert_eq!(d.unwrap().get::<_, i32>(0), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_and_failed_transaction_state() {
    let gw = start_gateway(Opts::default()).await;
    let c = gw.connect("alice").await;
    let id: i32 = 1_000_000 + rand::random::<u16>() as i32;
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO items VALUES ($1, 'tx', NULL)", &[&id])
        .await
        .unwrap();
    let err = c.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "22012");
    // In a failed transaction everything is refused until ROLLBACK.
    let err = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM items WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // COMMIT keeps the row.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO items VALUES ($1, 'tx', NULL)", &[&id])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM items WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    c.execute("DELETE FROM items WHERE id = $1", &[&id])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_and_out() {
    let gw = start_gateway(Opts::default()).await;
    let c = gw.connect("alice").await;
    c.batch_execute("CREATE TEMP TABLE cp(id int, t text)")
        .await
        .ok();
    c.batch_execute("BEGIN; CREATE TEMP TABLE cp2(id int, t text)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY cp2 FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i}\trow {i}\n"));
    }
    sink.send(Bytes::from(data.clone())).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 10_000);
    let stream = c.copy_out("COPY cp2 TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(out).unwrap(), data);
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_copy_from_stdin_and_to_stdout() {
    let gw = start_gateway(Opts::default()).await;
    let script = "BEGIN;\nCREATE TEMP TABLE pc(a int, b text);\nCOPY pc FROM STDIN;\n1\tone\n2\ttwo\n\\.\nCOPY pc TO STDOUT;\nCOMMIT;\n";
    let mut child = std::process::Command::new("psql")
        .args([
            "-X",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &gw.port().to_string(),
            "-U",
            "alice",
            "-d",
            "app",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .env("PGPASSWORD", support::password_of("alice"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1\tone\n2\ttwo"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_megabyte_bytea_round_trips() {
    let gw = start_gateway(Opts::default()).await;
    let c = gw.connect("alice").await;
    let big: Vec<u8> = (0..50 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let id: i32 = 2_000_000 + rand::random::<u16>() as i32;
    c.execute("INSERT INTO items VALUES ($1, 'big', $2)", &[&id, &big])
        .await
        .unwrap();
    let row = c
        .query_one("SELECT payload FROM items WHERE id = $1", &[&id])
        .await
        .unwrap();
    let back: Vec<u8> = row.get(0);
    assert!(back == big, "payload differs");
    // And as text through the simple protocol (about 100 MB of hex).
    let len = support::one(
        &c,
        &format!("SELECT length(payload::text) FROM items WHERE id = {id}"),
    )
    .await;
    assert_eq!(len, (2 + 2 * big.len()).to_string());
    c.execute("DELETE FROM items WHERE id = $1", &[&id])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn notices_are_relayed() {
    let gw = start_gateway(Opts::default()).await;
    let url = gw.url("alice", support::password_of("alice"));
    let (client, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = msg {
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from %', current_user; END $$")
        .await
        .unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notice, "hello from analyst");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_request_stops_pg_sleep() {
    let gw = start_gateway(Opts::default()).await;
    let c = gw.connect("alice").await;
    let token = c.cancel_token();
    let started = Instant::now();
    let marker = support::marked("SELECT pg_sleep(30)");
    let sleep = marker.clone();
    let sleeper = tokio::spawn(async move { c.simple_query(&sleep).await.map(|_| ()) });
    support::until_running(&marker).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeper.await.unwrap().expect_err("cancelled");
    assert_eq!(support::sqlstate(&err), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_cancel_with_sigint() {
    let gw = start_gateway(Opts::default()).await;
    let child = std::process::Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &gw.port().to_string(),
            "-U",
            "alice",
            "-d",
            "app",
            "-c",
            "SELECT pg_sleep(30)",
        ])
        .env("PGPASSWORD", support::password_of("alice"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
}
