//! A server connection lost under a client whose session goes on (its
//! backend terminated, as a restart or a failover ends it): the client
//! learns from an error that its transaction is gone, whatever it was
//! doing, and nothing it sends afterwards runs where it does not believe it
//! runs. Each test terminates the client's backend from outside.

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::audit::{export, s};
use crate::raw::{cstr, message, RawClient};
use crate::support::cluster::cluster;
use crate::support::{self, start_gateway, Opts, TestGateway};

async fn gateway() -> TestGateway {
    start_gateway(Opts {
        audit: true,
        pool_size: 2,
        ..Opts::default()
    })
    .await
}

/// Terminates `pid` and gives the gateway time to see its connection go.
async fn terminate(pid: &str) {
    let pid = pid.to_string();
    tokio::task::spawn_blocking(move || {
        cluster().psql("postgres", &format!("SELECT pg_terminate_backend({pid})"))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Terminates the backend running a statement that contains `marker`, once
/// it runs.
async fn terminate_running(marker: &str) {
    let sql = format!(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    );
    let pid = tokio::task::spawn_blocking(move || loop {
        let pid = cluster().psql("postgres", &sql);
        if !pid.is_empty() {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    })
    .await
    .unwrap();
    terminate(&pid).await;
}

/// The command tag of a simple query's last statement.
async fn tag(client: &Client, sql: &str) -> Result<u64, tokio_postgres::Error> {
    let rows = client.simple_query(sql).await?;
    Ok(rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .last()
        .unwrap_or(0))
}

async fn stop_and_export(gw: TestGateway) -> Vec<Value> {
    gw.until_clients(0).await;
    let dir = gw.stop().await;
    export(&dir.path().join("audit"), &[])
}

fn record<'a>(records: &'a [Value], statement: &str) -> &'a Value {
    records
        .iter()
        .find(|r| s(r, "kind") == "query" && s(r, "statement") == statement)
        .unwrap_or_else(|| panic!("a record of {statement}: {records:?}"))
}

/// Idle inside a transaction when its connection goes: the client's next
/// request gets the error (a COMMIT must not answer as if it committed, or
/// answer ROLLBACK as its only sign), and it stays in an aborted block until
/// it ends it. A ROLLBACK gets what it asked for. The lost transaction's
/// statements are recorded rolled back: without a COMMIT, PostgreSQL
/// cannot have committed them.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_lost_while_idle_is_reported_by_the_next_request() {
    let gw = gateway().await;
    let alice = gw.connect("alice").await;
    let insert = "INSERT INTO items VALUES (8100001, 'lost-idle', NULL)";
    alice.batch_execute("BEGIN").await.unwrap();
    alice.execute(insert, &[]).await.unwrap();
    terminate(&support::one(&alice, "SELECT pg_backend_pid()").await).await;

    let err = alice
        .simple_query("COMMIT")
        .await
        .expect_err("its transaction is gone: COMMIT must fail");
    assert_eq!(support::sqlstate(&err), "08006", "{err:?}");
    assert!(format!("{err:?}").contains("rolled back"), "{err:?}");
    // Still in the (now aborted) block: statements are refused, not run in
    // autocommit behind the client's back.
    let err = alice
        .execute("INSERT INTO items VALUES (8100002, 'lost-idle', NULL)", &[])
        .await
        .expect_err("aborted");
    assert_eq!(support::sqlstate(&err), "25P02");
    tag(&alice, "COMMIT").await.unwrap();
    assert_eq!(
        cluster().psql(
            "app",
            "SELECT count(*) FROM items WHERE owner = 'lost-idle'"
        ),
        "0"
    );
    assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");

    // A client whose next request is ROLLBACK is answered as it asked.
    let again = gw.connect("alice").await;
    again.batch_execute("BEGIN").await.unwrap();
    terminate(&support::one(&again, "SELECT pg_backend_pid()").await).await;
    again.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(support::one(&again, "SELECT 7").await, "7");

    drop((alice, again));
    let records = stop_and_export(gw).await;
    let inserted = record(&records, insert);
    assert_eq!(s(inserted, "status"), "ok", "{inserted}");
    assert_eq!(s(inserted, "tx"), "rolled_back", "{inserted}");
}

/// A COMMIT in flight when its connection goes: the client gets the error
/// and is no longer in a transaction block (as after a failed COMMIT in
/// PostgreSQL): its outcome is unknown, and a ROLLBACK or an aborted block
/// afterwards would claim it was undone.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_lost_in_flight_leaves_the_client_outside_a_block() {
    let setup = "CREATE TABLE IF NOT EXISTS lost_commit (x int);
        CREATE OR REPLACE FUNCTION lost_commit_slow() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN PERFORM pg_sleep(30); RETURN NULL; END$$;
        DROP TRIGGER IF EXISTS slow ON lost_commit;
        CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON lost_commit
          DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION lost_commit_slow();
        GRANT INSERT, SELECT ON lost_commit TO analyst";
    cluster().psql("app", setup);
    let gw = gateway().await;
    let alice = gw.connect("alice").await;
    alice.batch_execute("BEGIN").await.unwrap();
    alice
        .execute("INSERT INTO lost_commit VALUES (1)", &[])
        .await
        .unwrap();
    let pid = support::one(&alice, "SELECT pg_backend_pid()").await;
    let commit = tokio::spawn(async move {
        let result = alice.simple_query("COMMIT").await.map(|_| ());
        (alice, result)
    });
    // The deferred trigger sleeps inside the COMMIT.
    let sql = format!("SELECT wait_event FROM pg_stat_activity WHERE pid = {pid}");
    support::eventually("the COMMIT runs its trigger", || {
        cluster().psql("postgres", &sql) == "PgSleep"
    })
    .await;
    terminate(&pid).await;
    let (alice, result) = tokio::time::timeout(Duration::from_secs(10), commit)
        .await
        .expect("the COMMIT is answered")
        .unwrap();
    let err = result.expect_err("its connection was lost");
    assert!(
        ["08006", "57P01"].contains(&support::sqlstate(&err).as_str()),
        "{err:?}"
    );
    // Outside a block: this runs, no 25P02.
    assert_eq!(support::one(&alice, "SELECT 8").await, "8");
    drop(alice);
    let records = stop_and_export(gw).await;
    let commit = record(&records, "COMMIT");
    assert_eq!(s(commit, "status"), "unknown", "{commit}");
    let inserted = record(&records, "INSERT INTO lost_commit VALUES (1)");
    assert_eq!(s(inserted, "tx"), "unknown", "{inserted}");
}

/// A request the gateway held back behind the lost one (it waits while code
/// pgwarden cannot see into runs) is taken once the lost one is answered:
/// the session does not hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_waiting_behind_a_lost_one_runs() {
    let gw = gateway().await;
    let alice = gw.connect("alice").await;
    let slow = "DO $$BEGIN PERFORM pg_sleep(30); END$$ -- lost-behind";
    let both = async {
        tokio::join!(
            alice.simple_query(slow),
            alice.simple_query("SELECT 9"),
            terminate_running("lost-behind"),
        )
    };
    let (lost, behind, ()) = tokio::time::timeout(Duration::from_secs(20), both)
        .await
        .expect("the session does not hang");
    let err = lost.expect_err("its connection was lost");
    assert!(
        ["08006", "57P01"].contains(&support::sqlstate(&err).as_str()),
        "{err:?}"
    );
    let rows = behind.expect("the request behind runs on a new connection");
    let nine = rows
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("9")));
    assert!(nine, "{rows:?}");
}

/// A statement refused inside a transaction (the client is told its block
/// is aborted while the server's stays open), then the connection lost:
/// the session goes on in the aborted block, and ends it with ROLLBACK.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_then_a_lost_connection_keeps_the_session() {
    let gw = gateway().await;
    let alice = gw.connect("alice").await;
    alice.batch_execute("BEGIN").await.unwrap();
    let pid = support::one(&alice, "SELECT pg_backend_pid()").await;
    let err = alice
        .simple_query("SET ROLE postgres")
        .await
        .expect_err("the guard refuses it");
    assert_eq!(support::sqlstate(&err), "42501", "{err:?}");
    terminate(&pid).await;
    let err = alice.simple_query("SELECT 1").await.expect_err("aborted");
    assert_eq!(support::sqlstate(&err), "25P02", "{err:?}");
    alice.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");
}

/// Parse, Bind and Execute of `sql` (unnamed), then `Flush`: no `Sync`, so
/// its implicit transaction stays open on the server.
fn unsynced(sql: &str) -> Vec<u8> {
    crate::raw::unnamed(sql, false, b'H')
}

/// An extended batch whose statement was answered (`INSERT 0 1`, after a
/// `Flush`) but whose `Sync` had not gone when the connection was lost:
/// its implicit transaction never committed, so the `Sync` must not be
/// answered as if it did. The client gets the error (what it sent behind
/// is skipped to the `Sync`, as after any error), and the statement is
/// recorded rolled back.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_lost_before_its_sync_gets_an_error() {
    let gw = start_gateway(Opts {
        audit: true,
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let mut c = RawClient::login(gw.addr).await;
    c.send(b'Q', &cstr("SELECT pg_backend_pid()")).await;
    let pid = c.first_value_until_ready().await.expect("a pid");
    let insert = "INSERT INTO items VALUES (8100011, 'lost-unsynced', NULL)";
    c.send_raw(&unsynced(insert)).await;
    let mut tags = Vec::new();
    while tags.last() != Some(&b'C') {
        tags.push(c.read_message().await.0);
    }
    assert_eq!(tags, b"12C");
    terminate(&pid).await;
    let mut behind = unsynced("INSERT INTO items VALUES (8100012, 'lost-unsynced', NULL)");
    behind.extend(message(b'S', &[]));
    c.send_raw(&behind).await;
    let (tags, code, status) = c.until_ready().await;
    assert_eq!(code.as_deref(), Some("08006"), "{tags:?}");
    assert_eq!(status, b'I');
    assert!(
        !tags.contains(&b'C'),
        "what was sent behind is skipped: {tags:?}"
    );
    assert_eq!(
        cluster().psql(
            "app",
            "SELECT count(*) FROM items WHERE owner = 'lost-unsynced'"
        ),
        "0"
    );
    c.send(b'Q', &cstr("SELECT current_user")).await;
    assert_eq!(
        c.first_value_until_ready().await.as_deref(),
        Some("analyst")
    );
    drop(c);
    let records = stop_and_export(gw).await;
    let inserted = record(&records, insert);
    assert_eq!(s(inserted, "tx"), "rolled_back", "{inserted}");
}

/// A setting changed inside a transaction lost with its connection is
/// rolled back with it, and the client told, as PostgreSQL reports a
/// setting a rollback restores: it neither keeps the value nor believes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_setting_changed_in_a_lost_transaction_is_rolled_back() {
    let gw = gateway().await;
    let mut c = RawClient::login(gw.addr).await;
    c.send(
        b'Q',
        &cstr("BEGIN; SET DateStyle = 'German'; SELECT pg_backend_pid()"),
    )
    .await;
    let pid = c.first_value_until_ready().await.expect("a pid");
    terminate(&pid).await;
    c.send(b'Q', &cstr("ROLLBACK")).await;
    let mut reported = Vec::new();
    loop {
        let (tag, body) = c.read_message().await;
        if tag == b'S' {
            reported.push(String::from_utf8_lossy(&body).replace('\0', " "));
        }
        if tag == b'Z' {
            break;
        }
    }
    assert!(
        reported.iter().any(|r| r.trim() == "DateStyle ISO, MDY"),
        "the restored value is reported: {reported:?}"
    );
    c.send(b'Q', &cstr("SHOW DateStyle")).await;
    assert_eq!(
        c.first_value_until_ready().await.as_deref(),
        Some("ISO, MDY")
    );
}
