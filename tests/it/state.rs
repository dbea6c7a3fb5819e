//! Session state in transaction pooling: what one client leaves on a server
//! connection never reaches the next client; each client's own settings
//! follow it from connection to connection.

use crate::support::{self, start_gateway, Opts};

async fn connect_with(
    gw: &support::TestGateway,
    user: &str,
    app: &str,
    options: &str,
) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(gw.port())
        .user(user)
        .password(support::password_of(user))
        .dbname("app")
        .application_name(app)
        .options(options);
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn state_left_by_one_client_never_reaches_the_next() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    let pid = support::one(&alice, "SELECT pg_backend_pid()").await;
    for sql in [
        "SET statement_timeout = '1234ms'",
        "SET search_path = pg_catalog, public",
        "CREATE TEMP TABLE alice_tmp(x int)",
        "SELECT pg_advisory_lock(42)",
        "LISTEN alice_channel",
        "PREPARE alice_sql AS SELECT 1",
    ] {
        alice
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    // Temp tables, LISTEN, advisory locks and PREPARE pin alice to the only
    // connection until she leaves; then it is reset for the next client.
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let bob = gw.connect("bob").await;
    assert_eq!(
        support::one(&bob, "SELECT pg_backend_pid()").await,
        pid,
        "same server connection"
    );
    assert_eq!(support::one(&bob, "SHOW statement_timeout").await, "0");
    assert_eq!(
        support::one(&bob, "SHOW search_path").await,
        "\"$user\", public"
    );
    assert_eq!(
        support::one(&bob, "SELECT to_regclass('pg_temp.alice_tmp') IS NULL").await,
        "t"
    );
    assert_eq!(
        support::one(
            &bob,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        .await,
        "0"
    );
    assert_eq!(
        support::one(&bob, "SELECT count(*) FROM pg_listening_channels()").await,
        "0"
    );
    let err = bob.batch_execute("EXECUTE alice_sql").await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "26000");
    assert_eq!(
        support::one(
            &bob,
            "SELECT current_user || '/' || current_setting('app.client_user')"
        )
        .await,
        "engineer/bob"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_settings_follow_it_to_every_connection() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let alice = connect_with(
        &gw,
        "alice",
        "ledger",
        "-c statement_timeout=4321 -c app.client_user=mallory",
    )
    .await;
    assert_eq!(
        support::one(&alice, "SHOW statement_timeout").await,
        "4321ms"
    );
    assert_eq!(
        support::one(
            &alice,
            "SELECT current_user || '/' || current_setting('app.client_user')"
        )
        .await,
        "analyst/alice"
    );
    assert_eq!(
        support::one(
            &alice,
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        .await,
        "ledger [alice]"
    );
    alice
        .batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    // Bob takes the connection (and it is reset for him)...
    let bob = connect_with(&gw, "bob", "report", "").await;
    assert_eq!(
        support::one(&bob, "SHOW TimeZone").await,
        support::one(
            &bob,
            "SELECT reset_val FROM pg_settings WHERE name = 'TimeZone'"
        )
        .await
    );
    assert_eq!(support::one(&bob, "SHOW statement_timeout").await, "0");
    assert_eq!(
        support::one(
            &bob,
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        .await,
        "report [bob]"
    );
    // ...and alice's settings come back with her.
    assert_eq!(support::one(&alice, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(
        support::one(&alice, "SHOW statement_timeout").await,
        "4321ms"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn temp_tables_and_listen_pin_the_client_to_its_connection() {
    use futures_util::StreamExt;
    let gw = start_gateway(Opts {
        pool_size: 2,
        acquire_timeout_ms: 3000,
        ..Opts::default()
    })
    .await;
    let url = gw.url("alice", support::password_of("alice"));
    let (alice, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    alice
        .batch_execute("CREATE TEMP TABLE scratch(x int)")
        .await
        .unwrap();
    alice.batch_execute("LISTEN pinned_channel").await.unwrap();
    let bob = gw.connect("bob").await;
    for i in 0..20 {
        alice
            .batch_execute(&format!("INSERT INTO scratch VALUES ({i})"))
            .await
            .unwrap();
        // Bob keeps working on the other connection meanwhile.
        assert_eq!(support::one(&bob, "SELECT current_user").await, "engineer");
    }
    assert_eq!(
        support::one(&alice, "SELECT count(*) FROM scratch").await,
        "20"
    );
    bob.batch_execute("NOTIFY pinned_channel, 'hello alice'")
        .await
        .unwrap();
    let note = tokio::time::timeout(std::time::Duration::from_secs(5), notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(note, "hello alice");
    // When alice leaves, her connection is reset before anyone else uses it.
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let carol_like = gw.connect("md5_user").await;
    let b = gw.connect("bob").await;
    b.batch_execute("BEGIN").await.unwrap();
    support::one(&b, "SELECT 1").await;
    assert_eq!(
        support::one(&carol_like, "SELECT to_regclass('pg_temp.scratch') IS NULL").await,
        "t"
    );
    assert_eq!(
        support::one(&carol_like, "SELECT count(*) FROM pg_listening_channels()").await,
        "0"
    );
    b.batch_execute("COMMIT").await.unwrap();
}

/// `[pool] session_set = "keep"` (the default): a setting a client changes
/// for its session stays with it on every connection, as on a direct
/// connection, whatever connection served the change, and never reaches
/// another client.
#[tokio::test(flavor = "multi_thread")]
async fn session_settings_are_kept_for_the_client_in_transaction_mode() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    let bob = gw.connect("bob").await;
    let default_work_mem = support::one(&bob, "SHOW work_mem").await;
    // Simple protocol, outside a transaction.
    alice
        .batch_execute("SET work_mem = '1234kB'")
        .await
        .unwrap();
    // Extended protocol (tokio-postgres prepares, binds and executes).
    alice
        .execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", &[])
        .await
        .unwrap();
    alice
        .query(
            "SELECT set_config($1, $2, false)",
            &[&"lock_timeout", &"4321ms"],
        )
        .await
        .unwrap();
    // Inside a transaction that commits, and one that rolls back.
    alice
        .batch_execute("BEGIN; SET myapp.tenant = 'north'; COMMIT")
        .await
        .unwrap();
    alice
        .batch_execute("BEGIN; SET statement_timeout = '9s'; ROLLBACK")
        .await
        .unwrap();
    // A setting this role may not read, named but never set, does not
    // lose the others (it once failed the whole read-back).
    alice
        .batch_execute("BEGIN; SET idle_in_transaction_session_timeout = '777s'; SELECT CASE WHEN false THEN set_config('data_directory', 'x', false) END; COMMIT")
        .await
        .unwrap();
    // Bob takes the only connection in between: he sees none of it, and
    // alice gets it all back on the connection he leaves.
    for _ in 0..2 {
        assert_eq!(support::one(&bob, "SHOW work_mem").await, default_work_mem);
        assert_eq!(
            support::one(&bob, "SHOW default_transaction_read_only").await,
            "off"
        );
        assert_eq!(support::one(&bob, "SHOW lock_timeout").await, "0");
        assert_eq!(
            support::one(
                &bob,
                "SELECT coalesce(current_setting('myapp.tenant', true), '')"
            )
            .await,
            ""
        );
        assert_eq!(support::one(&alice, "SHOW work_mem").await, "1234kB");
        assert_eq!(
            support::one(&alice, "SHOW default_transaction_read_only").await,
            "on"
        );
        assert_eq!(support::one(&alice, "SHOW lock_timeout").await, "4321ms");
        assert_eq!(support::one(&alice, "SHOW myapp.tenant").await, "north");
        assert_eq!(support::one(&alice, "SHOW statement_timeout").await, "0");
        assert_eq!(
            support::one(&alice, "SHOW idle_in_transaction_session_timeout").await,
            "777s"
        );
    }
    let err = alice
        .batch_execute("INSERT INTO items (id, owner) VALUES (700101, 'alice')")
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "25006", "read-only by default");
    // A prepared SET run in a later transaction is kept too; RESET undoes.
    let set = alice.prepare("SET work_mem = '2345kB'").await.unwrap();
    assert_eq!(support::one(&bob, "SHOW work_mem").await, default_work_mem);
    alice.execute(&set, &[]).await.unwrap();
    assert_eq!(support::one(&bob, "SHOW work_mem").await, default_work_mem);
    assert_eq!(support::one(&alice, "SHOW work_mem").await, "2345kB");
    alice.batch_execute("RESET work_mem").await.unwrap();
    assert_eq!(support::one(&bob, "SHOW work_mem").await, default_work_mem);
    assert_eq!(
        support::one(&alice, "SHOW work_mem").await,
        default_work_mem
    );
}

/// `[pool] session_set = "error"`: a session-level SET is refused with
/// 0A000 instead of silently lasting one transaction; SET LOCAL and
/// reportable settings still work.
#[tokio::test(flavor = "multi_thread")]
async fn session_settings_can_be_refused_instead() {
    let gw = start_gateway(Opts {
        pool_extra: "session_set = \"error\"".into(),
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    for sql in [
        "SET work_mem = '1234kB'",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SELECT set_config('lock_timeout', '1s', false)",
    ] {
        let err = alice.batch_execute(sql).await.unwrap_err();
        assert_eq!(support::sqlstate(&err), "0A000", "simple: {sql}");
        let err = alice.execute(sql, &[]).await.unwrap_err();
        assert_eq!(support::sqlstate(&err), "0A000", "extended: {sql}");
    }
    alice
        .batch_execute("BEGIN; SET LOCAL work_mem = '1234kB'; SELECT set_config('lock_timeout', '1s', true); COMMIT")
        .await
        .unwrap();
    alice
        .batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    assert_eq!(support::one(&alice, "SHOW TimeZone").await, "Asia/Tokyo");
}

/// A notification the client's own session sent names the process id the
/// client was given (psycopg's `test_notify` compares the two).
#[tokio::test(flavor = "multi_thread")]
async fn own_notifications_carry_the_clients_pid() {
    for mode in ["transaction", "session"] {
        let gw = start_gateway(Opts {
            mode,
            ..Opts::default()
        })
        .await;
        let mut c = crate::raw::RawClient::login(gw.addr).await;
        c.send(b'Q', b"LISTEN pgw_chan; NOTIFY pgw_chan, 'hi'\0")
            .await;
        let mut pid = None;
        loop {
            let (tag, body) = c.read_message().await;
            if tag == b'A' {
                pid = Some(i32::from_be_bytes(body[..4].try_into().unwrap()));
            }
            if tag == b'Z' {
                break;
            }
        }
        assert_eq!(pid, Some(c.key.0), "{mode}");
    }
}

/// A notification that reaches the listening client's connection while the
/// gateway runs its own exchange there (the identity assertion before the
/// client's next transaction) still reaches the client: psycopg's
/// `test_first_notify_not_lost` lost it 1 time in 7 before.
#[tokio::test(flavor = "multi_thread")]
async fn notifications_are_never_lost_to_the_gateways_own_exchanges() {
    let gw = start_gateway(Opts::default()).await;
    let mut listener = crate::raw::RawClient::login(gw.addr).await;
    listener.send(b'Q', b"LISTEN pgw_lost\0").await;
    listener.until_ready().await;
    let notifier = gw.connect("bob").await;
    for i in 0..40 {
        notifier
            .batch_execute(&format!("NOTIFY pgw_lost, '{i}'"))
            .await
            .unwrap();
        listener.send(b'Q', b"SELECT 1\0").await;
        let mut got = false;
        loop {
            let (tag, _) = listener.read_message().await;
            got |= tag == b'A';
            if tag == b'Z' {
                break;
            }
        }
        if !got {
            // Not yet delivered: it must come on its own.
            let (tag, _) = listener.read_message().await;
            assert_eq!(tag, b'A', "notification {i} lost");
        }
    }
}

/// LISTEN, NOTIFY and the advisory-lock functions run no code pgwarden
/// cannot see: a listening client's later transactions are not asserted
/// afresh one by one (a round trip each, and a window for notifications).
#[tokio::test(flavor = "multi_thread")]
async fn listen_and_advisory_locks_cost_no_assertion_per_transaction() {
    let gw = start_gateway(Opts::default()).await;
    let c = gw.connect("alice").await;
    c.batch_execute("LISTEN pgw_cheap; SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let assertions = || {
        gw.shared
            .metrics
            .identity_assertions
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = assertions();
    for _ in 0..5 {
        c.batch_execute("SELECT 1").await.unwrap();
    }
    assert_eq!(assertions(), before);
    c.batch_execute("SELECT pg_advisory_unlock(4242); UNLISTEN *")
        .await
        .unwrap();
}

/// A client that seeds `random()` (`SET seed`, `setseed()`) cannot know the
/// next client's random numbers: the reset between them reseeds it.
#[tokio::test(flavor = "multi_thread")]
async fn the_random_seed_never_reaches_the_next_client() {
    let predicted = support::cluster().psql(
        "app",
        "SELECT setseed(0.42); SELECT string_agg(random()::text, ',') FROM generate_series(1, 3)",
    );
    for mode in ["transaction", "session"] {
        let gw = start_gateway(Opts {
            pool_size: 1,
            mode,
            ..Opts::default()
        })
        .await;
        for seeding in ["SET seed = 0.42", "SELECT setseed(0.42)"] {
            let alice = gw.connect("alice").await;
            alice.batch_execute(seeding).await.unwrap();
            drop(alice);
            gw.until_clients(0).await;
            let bob = gw.connect("bob").await;
            let got = support::one(
                &bob,
                "SELECT string_agg(random()::text, ',') FROM generate_series(1, 3)",
            )
            .await;
            assert!(!predicted.ends_with(&got), "{mode}, {seeding}: {got}");
        }
    }
}

/// Notifications for a session's `LISTEN` that PostgreSQL had already sent
/// when the session ended reach no other session: the next one gets the
/// connection reset, and what the gateway read meanwhile is dropped
/// (red-team finding: up to 32 reached the next session, of the same user
/// through a pool handoff, or of another user of the role).
#[tokio::test(flavor = "multi_thread")]
async fn notifications_of_an_ended_session_reach_no_one_else() {
    use tokio::io::AsyncWriteExt;
    let gw = start_gateway(Opts {
        pool_size: 1,
        acquire_timeout_ms: 10_000,
        ..Opts::default()
    })
    .await;
    for round in 0..4 {
        let mut a = crate::raw::RawClient::login(gw.addr).await;
        a.send(b'Q', b"LISTEN leaky\0").await;
        a.until_ready().await;
        // B waits for the only connection, which A's LISTEN pins.
        let mut b = crate::raw::RawClient::login(gw.addr).await;
        b.send(b'Q', b"SELECT 'b'\0").await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Thousands of notifications, each its own transaction: they keep
        // arriving while A leaves and B's connection is reset.
        let flood = std::thread::spawn(|| {
            use std::io::Write;
            let port = crate::support::cluster().port.to_string();
            let mut psql = std::process::Command::new("psql")
                .args([
                    "-X",
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "app",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let script = "NOTIFY leaky, 'for A';\n".repeat(3000);
            psql.stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            psql.wait().unwrap();
        });
        tokio::time::sleep(std::time::Duration::from_millis(20 + 10 * round)).await;
        a.stream.shutdown().await.unwrap();
        drop(a);
        let (tags, code, _) = b.until_ready().await;
        flood.join().unwrap();
        assert_eq!(code, None);
        // Anything that comes after B's answer, too.
        b.send(b'Q', b"SELECT 1\0").await;
        let (more, _, _) = b.until_ready().await;
        let notes = tags.iter().chain(&more).filter(|t| **t == b'A').count();
        assert_eq!(notes, 0, "round {round}: {notes} notifications reached B");
    }
}
