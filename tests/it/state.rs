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
