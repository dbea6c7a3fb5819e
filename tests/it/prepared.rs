//! Named prepared statements in transaction pooling: a statement prepared on
//! one server connection runs when the client is bound to another; clients
//! share server-side statements; Close and DEALLOCATE behave as expected.

use crate::support::{self, start_gateway, Opts};

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_follow_the_client_across_connections() {
    let gw = start_gateway(Opts {
        pool_size: 2,
        ..Opts::default()
    })
    .await;
    let a = gw.connect("alice").await;
    let b = gw.connect("bob").await;
    // Hold one connection in a transaction so statements land on both.
    let stmt = a
        .prepare("SELECT $1::int + 1, pg_backend_pid()")
        .await
        .unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    let mut pids = std::collections::HashSet::new();
    for i in 0..50 {
        if i == 25 {
            b.batch_execute("COMMIT").await.unwrap();
        }
        let row = a.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
        pids.insert(row.get::<_, i32>(1));
    }
    // Statements prepared by many concurrent clients on a small pool.
    let mut tasks = Vec::new();
    for user in ["alice", "bob", "alice", "bob", "alice"] {
        let c = gw.connect(user).await;
        tasks.push(tokio::spawn(async move {
            let s = c
                .prepare("SELECT current_setting('app.client_user')")
                .await
                .unwrap();
            for _ in 0..100 {
                let who: String = c.query_one(&s, &[]).await.unwrap().get(0);
                assert_eq!(who, user);
                // tokio-postgres also prepares a fresh named statement per call.
                let n: i64 = c
                    .query_one("SELECT count(*) FROM items WHERE id < $1", &[&0i32])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, 0);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn close_and_deallocate_forget_the_clients_name() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    let s = c.prepare("SELECT 1").await.unwrap();
    c.query_one(&s, &[]).await.unwrap();
    drop(s); // tokio-postgres sends Close for the statement
    c.query_one("SELECT 2", &[]).await.unwrap();
    // SQL-level DEALLOCATE of a protocol-level name.
    let raw_name = {
        let mut raw = crate::raw::RawClient::login(gw.addr).await;
        let mut parse = b"mystmt\0SELECT 41 + 1\0".to_vec();
        parse.extend_from_slice(&0i16.to_be_bytes());
        raw.send(b'P', &parse).await;
        raw.send(b'S', b"").await;
        let (tags, code, _) = raw.until_ready().await;
        assert_eq!((tags, code), (b"1Z".to_vec(), None));
        raw.send(b'Q', b"DEALLOCATE mystmt\0").await;
        let (tags, code, status) = raw.until_ready().await;
        assert_eq!((tags, code, status), (b"CZ".to_vec(), None, b'I'));
        // Now the name is unknown to the client's session: Bind fails with 26000.
        raw.send(b'B', b"\0mystmt\0\0\0\0\0\0\0").await;
        raw.send(b'S', b"").await;
        let (_, code, _) = raw.until_ready().await;
        code
    };
    assert_eq!(raw_name.as_deref(), Some("26000"));
}

#[tokio::test(flavor = "multi_thread")]
async fn parse_errors_reach_the_right_client() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let a = gw.connect("alice").await;
    let b = gw.connect("bob").await;
    let err = a.prepare("SELEC broken").await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "42601");
    let ok = b.prepare("SELECT 1").await;
    assert!(ok.is_ok());
    // The same text prepared again after a failure still fails properly.
    let err = b.prepare("SELEC broken").await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "42601");
}

#[tokio::test(flavor = "multi_thread")]
async fn unnamed_statement_of_another_transaction_is_never_reused() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    // Client A leaves an unnamed statement on the only server connection.
    let mut a = crate::raw::RawClient::login(gw.addr).await;
    let mut parse = b"\0SELECT 'written by a'\0".to_vec();
    parse.extend_from_slice(&0i16.to_be_bytes());
    a.send(b'P', &parse).await;
    a.send(b'S', b"").await;
    assert_eq!(a.until_ready().await.1, None);
    // Client B binds the unnamed statement without parsing it: on a direct
    // connection that statement would not exist, and B must not run A's SQL.
    let mut b = crate::raw::RawClient::login(gw.addr).await;
    b.send(b'B', b"\0\0\0\0\0\0\0\0").await;
    b.send(b'E', b"\0\0\0\0\0").await;
    b.send(b'S', b"").await;
    let (tags, code, status) = b.until_ready().await;
    assert_eq!(
        (tags, code.as_deref(), status),
        (b"EZ".to_vec(), Some("26000"), b'I')
    );
    // Within one transaction the unnamed statement works as usual.
    b.send(b'P', &parse).await;
    b.send(b'B', b"\0\0\0\0\0\0\0\0").await;
    b.send(b'E', b"\0\0\0\0\0").await;
    b.send(b'S', b"").await;
    let (tags, code, _) = b.until_ready().await;
    assert_eq!((tags, code), (b"12DCZ".to_vec(), None));
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlx_pool_larger_than_the_gateway_pool() {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use sqlx::Row;
    let gw = start_gateway(Opts {
        pool_size: 2,
        ..Opts::default()
    })
    .await;
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(gw.port())
        .username("bob")
        .password(support::password_of("bob"))
        .database("app");
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .connect_with(options)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for task in 0..6i32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40i32 {
                // sqlx prepares every query as a named statement and caches it.
                let row = sqlx::query(
                    "SELECT $1::int4 * 2, current_user::text, current_setting('app.client_user')",
                )
                .bind(task * 1000 + i)
                .fetch_one(&pool)
                .await
                .unwrap();
                assert_eq!(row.get::<i32, _>(0), (task * 1000 + i) * 2);
                assert_eq!(row.get::<String, _>(1), "engineer");
                assert_eq!(row.get::<String, _>(2), "bob");
            }
            let mut tx = pool.begin().await.unwrap();
            let id = 5_000_000 + task * 1000 + rand::random::<u8>() as i32;
            sqlx::query("INSERT INTO items (id, owner) VALUES ($1, 'sqlx')")
                .bind(id)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            let n: i64 = sqlx::query("SELECT count(*) FROM items WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A table of one row and one column, of this test's own, readable by the
/// mapped roles; and the cluster, for the DDL.
fn one_row_table() -> (String, &'static crate::support::cluster::Cluster) {
    let table = format!("stale_{}", rand::random::<u32>());
    let pg = crate::support::cluster();
    pg.psql(
        "app",
        &format!("CREATE TABLE {table} (x int); INSERT INTO {table} VALUES (1); GRANT SELECT ON {table} TO analyst, engineer"),
    );
    (table, pg)
}

/// After DDL changes a shared statement's result type, the connection that
/// finds it stale prepares its statements afresh: the failure PostgreSQL
/// reports once does not stick to every later client preparing the same
/// text.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_shared_statement_is_prepared_afresh() {
    let (table, pg) = one_row_table();
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let sql = format!("SELECT * FROM {table}");
    let bob = gw.connect("bob").await;
    let st = bob.prepare(&sql).await.unwrap();
    assert_eq!(bob.query(&st, &[]).await.unwrap().len(), 1);
    pg.psql("app", &format!("ALTER TABLE {table} ADD COLUMN y int"));
    // The statement bob holds is stale, through pgwarden as directly.
    let err = bob.query(&st, &[]).await.expect_err("stale");
    assert_eq!(crate::support::sqlstate(&err), "0A000");
    // Everyone who prepares the text now gets the new shape.
    for user in ["alice", "bob", "alice"] {
        let c = gw.connect(user).await;
        let st = c.prepare(&sql).await.unwrap();
        let rows = c.query(&st, &[]).await.unwrap();
        assert_eq!(rows[0].len(), 2, "{user}");
    }
}

/// In session pooling the client owns its server connection: its named
/// statements are prepared, closed and deallocated there under its own
/// names, so a driver that counts or evicts its statements sees exactly
/// what it did.
#[tokio::test(flavor = "multi_thread")]
async fn session_mode_statements_are_the_clients_own() {
    let gw = start_gateway(Opts {
        mode: "session",
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    let count = "SELECT count(*) FROM pg_prepared_statements WHERE from_sql = false";
    let before: i64 = support::one(&c, count).await.parse().unwrap();
    let a = c.prepare("SELECT 1").await.unwrap();
    let b = c.prepare("SELECT 2").await.unwrap();
    let names = support::one(
        &c,
        "SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements WHERE from_sql = false",
    )
    .await;
    assert!(!names.contains("pgwarden_"), "{names}");
    assert_eq!(
        support::one(&c, count).await.parse::<i64>().unwrap(),
        before + 2
    );
    drop(a);
    drop(b);
    // tokio-postgres closes dropped statements with its next request.
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(
        support::one(&c, count).await.parse::<i64>().unwrap(),
        before
    );
}

/// The unnamed statement outlives its transaction, as on a direct
/// connection (libpq's `PQprepare(conn, "", ...)` then `PQexecPrepared`):
/// a later transaction binds the client's own, parsed again on whatever
/// connection serves it, never the one another client left there.
#[tokio::test(flavor = "multi_thread")]
async fn the_unnamed_statement_lasts_until_the_next_one() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let parse = |sql: &str| {
        let mut body = vec![0u8];
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        body.extend_from_slice(&0i16.to_be_bytes());
        body
    };
    let mut a = crate::raw::RawClient::login(gw.addr).await;
    a.send(b'P', &parse("SELECT 'mine'")).await;
    a.send(b'S', b"").await;
    assert_eq!(a.until_ready().await.1, None);
    let mut b = crate::raw::RawClient::login(gw.addr).await;
    b.send(b'P', &parse("SELECT 'not yours'")).await;
    b.send(b'S', b"").await;
    assert_eq!(b.until_ready().await.1, None);
    for _ in 0..2 {
        a.send(b'B', b"\0\0\0\0\0\0\0\0").await;
        a.send(b'E', b"\0\0\0\0\0").await;
        a.send(b'S', b"").await;
        assert_eq!(a.first_value_until_ready().await.as_deref(), Some("mine"));
    }
    a.send(b'D', b"S\0").await;
    a.send(b'S', b"").await;
    let (tags, code, _) = a.until_ready().await;
    assert_eq!((tags, code), (b"tTZ".to_vec(), None), "Describe works too");
}

/// Once a statement is found stale on one connection, a `Parse` of it gets
/// a fresh plan on every connection, not only there: the next client on
/// another connection does not hit the same error.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_statement_is_invalidated_on_every_connection() {
    let (table, pg) = one_row_table();
    let gw = start_gateway(Opts {
        pool_size: 2,
        ..Opts::default()
    })
    .await;
    let sql = format!("SELECT * FROM {table}");
    let alice = gw.connect("alice").await;
    let bob = gw.connect("bob").await;
    // Both connections hold the shared statement.
    alice.batch_execute("BEGIN").await.unwrap();
    let st_a = alice.prepare(&sql).await.unwrap();
    alice.query(&st_a, &[]).await.unwrap();
    let st_b = bob.prepare(&sql).await.unwrap();
    bob.query(&st_b, &[]).await.unwrap();
    alice.batch_execute("COMMIT").await.unwrap();
    pg.psql("app", &format!("ALTER TABLE {table} ADD COLUMN y int"));
    // Bob finds it stale on one connection and keeps that one...
    bob.batch_execute("BEGIN").await.unwrap();
    let err = bob.query(&st_b, &[]).await.expect_err("stale");
    assert_eq!(support::sqlstate(&err), "0A000");
    // ...so alice gets the other, where the statement was never found
    // stale: what she prepares now gets a fresh plan there too, as it would
    // directly (before, it got the connection's stale statement: 0A000).
    let fresh = alice.prepare(&sql).await.unwrap();
    let rows = alice.query(&fresh, &[]).await.unwrap();
    assert_eq!(rows[0].len(), 2);
    bob.batch_execute("ROLLBACK").await.unwrap();
    drop(st_a);
}

/// A pooled connection outlives the clients whose statements it holds:
/// it keeps at most 16 MiB of their text, not 512 statements of any size
/// (one client's 512 statements of 1 MB each kept 1.5 GB of PostgreSQL's
/// memory after it left).
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_keeps_a_bounded_size_of_statements_after_their_client_left() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    let padding = "x".repeat(1024 * 1024);
    for i in 0..24 {
        let text = format!("SELECT {i}, length('{padding}')");
        let statement = alice.prepare(&text).await.unwrap();
        alice.query_one(&statement, &[]).await.unwrap();
    }
    drop(alice);
    gw.until_clients(0).await;
    let bob = gw.connect("bob").await;
    let (count, bytes) = {
        let row = bob
            .query_one(
                "SELECT count(*)::int, coalesce(sum(length(statement)), 0)::int \
                 FROM pg_prepared_statements WHERE name LIKE 'pgwarden\\_%'",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i32>(0), row.get::<_, i32>(1))
    };
    assert!(count >= 1, "the newest stays");
    assert!(
        bytes <= 16 * 1024 * 1024,
        "{count} statements, {bytes} bytes"
    );
}

/// The gateway keeps every statement a client prepares (to prepare it
/// again on whichever connection serves it): one client's 1 MB named
/// statements grew the gateway by 1.1 MB each, without bound. A session
/// keeps at most `prepared_statement_memory` of them; a `Parse` past it
/// is refused (53400) and the session goes on, and closing statements
/// makes room.
#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_prepared_statements_are_bounded_in_bytes() {
    let gw = start_gateway(Opts {
        server_extra: "prepared_statement_memory = 1048576\n".into(),
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    let padding = "x".repeat(300 * 1024);
    let text = |i: usize| format!("SELECT {i}, length('{padding}')");
    let mut kept = Vec::new();
    for i in 0..3 {
        kept.push(alice.prepare(&text(i)).await.unwrap());
    }
    let refused = alice.prepare(&text(3)).await.unwrap_err();
    assert_eq!(support::sqlstate(&refused), "53400", "{refused:?}");
    assert_eq!(support::one(&alice, "SELECT 1").await, "1");
    let row = alice.query_one(&kept[0], &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 0);
    // tokio-postgres closes a statement it drops.
    kept.pop();
    support::eventually_async("room again", || async {
        alice.prepare(&text(4)).await.is_ok()
    })
    .await;
    // Others have their own.
    let bob = gw.connect("bob").await;
    bob.prepare(&text(5)).await.unwrap();
}

/// Named portals count too: inside one transaction, 3000 portals bound
/// with parameters of 100 KB (kept for their records) took 733 MB of the
/// gateway. A named `Bind` past `prepared_statement_memory` is refused
/// (53400), and the transaction's portals end with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_portals_are_bounded_in_bytes_too() {
    use crate::raw::{cstr, message, RawClient};
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: "log_parameters = true\n".into(),
        server_extra: "prepared_statement_memory = 1048576\n".into(),
        ..Opts::default()
    })
    .await;
    let mut c = RawClient::login(gw.addr).await;
    let value = "v".repeat(300 * 1024);
    let bind = |portal: &str| {
        let mut body = cstr(portal);
        body.extend(cstr("big"));
        body.extend(0i16.to_be_bytes());
        body.extend(1i16.to_be_bytes());
        body.extend((value.len() as i32).to_be_bytes());
        body.extend(value.as_bytes());
        body.extend(0i16.to_be_bytes());
        message(b'B', &body)
    };
    let mut parse = cstr("big");
    parse.extend(cstr("SELECT length($1::text)"));
    parse.extend(0i16.to_be_bytes());
    let mut batch = message(b'Q', &cstr("BEGIN"));
    batch.extend(message(b'P', &parse));
    for i in 0..3 {
        batch.extend(bind(&format!("p{i}")));
    }
    batch.extend(message(b'S', &[]));
    c.send_raw(&batch).await;
    c.until_ready().await;
    let (_, code, _) = c.until_ready().await;
    assert_eq!(code, None);
    let mut fourth = bind("p3");
    fourth.extend(message(b'S', &[]));
    c.send_raw(&fourth).await;
    let (_, code, _) = c.until_ready().await;
    assert_eq!(code.as_deref(), Some("53400"));
    // The transaction (aborted by the refusal) ends, and its portals with it.
    c.send_raw(&message(b'Q', &cstr("ROLLBACK"))).await;
    c.until_ready().await;
    let mut again = message(b'Q', &cstr("BEGIN"));
    for i in 0..3 {
        again.extend(bind(&format!("q{i}")));
    }
    again.extend(message(b'S', &[]));
    c.send_raw(&again).await;
    c.until_ready().await;
    let (_, code, _) = c.until_ready().await;
    assert_eq!(code, None, "room again after the transaction");
}
