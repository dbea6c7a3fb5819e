//! The service-user pool: MD5 and SCRAM service logins, pool limits,
//! acquire timeouts, transaction versus session pooling, broken connections.

use std::time::{Duration, Instant};

use crate::support::{self, cluster, start_gateway, Opts};

#[tokio::test(flavor = "multi_thread")]
async fn service_user_logs_in_with_md5() {
    let gw = start_gateway(Opts {
        service_user: crate::support::cluster::SERVICE_MD5_USER,
        ..Opts::default()
    })
    .await;
    let client = gw.connect("alice").await;
    assert_eq!(
        support::one(&client, "SELECT session_user").await,
        "pgwarden_svc_md5"
    );
    assert_eq!(
        support::one(&client, "SELECT current_user").await,
        "analyst"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn transaction_mode_releases_at_idle_and_serves_the_next_client() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        acquire_timeout_ms: 500,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    let bob = gw.connect("bob").await;
    alice.batch_execute("BEGIN").await.unwrap();
    let pid = support::one(&alice, "SELECT pg_backend_pid()").await;
    // Alice holds the only connection inside her transaction: bob times out with 53300.
    let started = Instant::now();
    let err = bob
        .simple_query("SELECT 1")
        .await
        .expect_err("pool exhausted");
    assert_eq!(support::sqlstate(&err), "53300", "{err}");
    assert!(started.elapsed() >= Duration::from_millis(450));
    // ...and his session survives the error.
    alice.batch_execute("COMMIT").await.unwrap();
    assert_eq!(support::one(&bob, "SELECT pg_backend_pid()").await, pid);
    // Alice is unaffected by bob's timeout.
    assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");
}

#[tokio::test(flavor = "multi_thread")]
async fn session_mode_keeps_the_connection_until_disconnect() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        mode: "session",
        acquire_timeout_ms: 300,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    alice
        .batch_execute("SET application_name = 'kept'")
        .await
        .unwrap();
    let bob = gw.connect("bob").await;
    let err = bob
        .simple_query("SELECT 1")
        .await
        .expect_err("alice owns the connection");
    assert_eq!(support::sqlstate(&err), "53300");
    // PostgreSQL sees the name tagged with the real client.
    assert_eq!(
        support::one(&alice, "SHOW application_name").await,
        "kept [alice]"
    );
    drop(alice);
    // Once alice leaves, bob gets the connection, reset and re-asserted.
    let mut got = None;
    for _ in 0..50 {
        match bob
            .simple_query("SELECT current_user || '/' || current_setting('application_name')")
            .await
        {
            Ok(rows) => {
                got = rows.into_iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                });
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let got = got.expect("bob got the connection");
    assert!(got.starts_with("engineer/"), "{got}");
    assert!(!got.contains("kept"), "session state leaked: {got}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_server_connections_are_replaced() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let client = gw.connect("alice").await;
    let pid = support::one(&client, "SELECT pg_backend_pid()").await;
    cluster().psql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The idle connection was killed; the next transaction gets a fresh one.
    let new_pid = support::one(&client, "SELECT pg_backend_pid()").await;
    assert_ne!(pid, new_pid);
    assert_eq!(
        support::one(&client, "SELECT current_user").await,
        "analyst"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_killed_mid_transaction_fails_only_that_client() {
    let gw = start_gateway(Opts {
        pool_size: 2,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    let bob = gw.connect("bob").await;
    alice.batch_execute("BEGIN").await.unwrap();
    let pid = support::one(&alice, "SELECT pg_backend_pid()").await;
    cluster().psql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    let err = alice
        .simple_query("SELECT 1")
        .await
        .expect_err("its server is gone");
    assert!(err.code().is_some() || err.is_closed(), "{err}");
    assert_eq!(support::one(&bob, "SELECT current_user").await, "engineer");
    let alice = gw.connect("alice").await;
    assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_database_gets_its_own_pool() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let app = gw.connect("alice").await;
    let url = format!(
        "host=127.0.0.1 port={} user=alice password={} dbname=postgres",
        gw.port(),
        support::password_of("alice")
    );
    let (other, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // Both hold their database's only connection at the same time.
    app.batch_execute("BEGIN").await.unwrap();
    other.batch_execute("BEGIN").await.unwrap();
    assert_eq!(support::one(&app, "SELECT current_database()").await, "app");
    assert_eq!(
        support::one(&other, "SELECT current_database()").await,
        "postgres"
    );
    app.batch_execute("COMMIT").await.unwrap();
    other.batch_execute("COMMIT").await.unwrap();
    let mut dbs: Vec<String> = gw
        .shared
        .pools
        .status()
        .into_iter()
        .map(|((db, _), _)| db)
        .collect();
    dbs.sort();
    assert_eq!(dbs, vec!["app", "postgres"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_vanishing_mid_transaction_never_hands_it_to_another() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        acquire_timeout_ms: 3000,
        ..Opts::default()
    })
    .await;
    let marker = 7_000_000 + rand::random::<u16>() as i32;
    {
        let mut raw = crate::raw::RawClient::login(gw.addr).await;
        raw.send(b'Q', b"BEGIN\0").await;
        raw.until_ready().await;
        raw.send(
            b'Q',
            format!("INSERT INTO items VALUES ({marker}, 'vanished', NULL)\0").as_bytes(),
        )
        .await;
        let (_, code, status) = raw.until_ready().await;
        assert_eq!((code, status), (None, b'T'));
        // The client disappears without Terminate, inside its transaction.
    }
    let bob = gw.connect("bob").await;
    assert_eq!(
        support::one(
            &bob,
            "SELECT current_user || '/' || (SELECT count(*) FROM items WHERE id = 0)"
        )
        .await,
        "engineer/0"
    );
    // Not in alice's transaction: bob's BEGIN opens a fresh one, and the row is gone.
    bob.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        support::one(
            &bob,
            &format!("SELECT count(*) FROM items WHERE id = {marker}")
        )
        .await,
        "0"
    );
    bob.batch_execute("COMMIT").await.unwrap();
}

/// A released connection goes straight to a waiting session of the same
/// identity, which then runs without an identity assertion.
#[tokio::test(flavor = "multi_thread")]
async fn a_released_connection_goes_to_a_waiter_of_the_same_identity() {
    use std::sync::atomic::Ordering::Relaxed;
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let holder = gw.connect("alice").await;
    let same = gw.connect("alice").await;
    holder.batch_execute("BEGIN").await.unwrap();
    let pid = support::one(&holder, "SELECT pg_backend_pid()").await;
    let alice = tokio::spawn(async move {
        let sql = "SELECT current_setting('app.client_user') || ' ' || pg_backend_pid()";
        let got = support::one(&same, sql).await;
        let (user, pid) = got.rsplit_once(' ').unwrap();
        (user.to_string(), pid.to_string())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let assertions = gw.shared.metrics.identity_assertions.load(Relaxed);
    holder.batch_execute("COMMIT").await.unwrap();
    let (user, alice_pid) = alice.await.unwrap();
    assert!(user.starts_with("alice"), "{user}");
    assert_eq!(alice_pid, pid);
    assert_eq!(gw.shared.metrics.pool_handoffs.load(Relaxed), 1);
    // The waiting session asserted nothing.
    assert_eq!(
        gw.shared.metrics.identity_assertions.load(Relaxed),
        assertions
    );
}

/// Affinity yields to a session of another identity that has waited
/// longest, and long: a released connection goes back to the pool's
/// queue, which serves that session first.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_waiter_of_another_identity_goes_first() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let holder = gw.connect("alice").await;
    let same = gw.connect("alice").await;
    let other = gw.connect("bob").await;
    holder.batch_execute("BEGIN").await.unwrap();
    support::one(&holder, "SELECT 1").await;
    let when = "SELECT current_user || ' ' || to_char(clock_timestamp(), 'HH24:MI:SS.US')";
    // Bob waits first, then alice's second session.
    let bob = tokio::spawn(async move { support::one(&other, when).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let alice = tokio::spawn(async move { support::one(&same, when).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let bob = bob.await.unwrap();
    let alice = alice.await.unwrap();
    let (bob_role, bob_at) = bob.split_once(' ').unwrap();
    let (alice_role, alice_at) = alice.split_once(' ').unwrap();
    assert_eq!((bob_role, alice_role), ("engineer", "analyst"));
    assert!(
        bob_at < alice_at,
        "bob ran at {bob_at}, alice at {alice_at}"
    );
}

/// `n` sessions of alice running `sql` in a loop until the flag is set;
/// each task returns how many times it ran.
async fn busy_sessions(
    gw: &support::TestGateway,
    n: usize,
    sql: &'static str,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    Vec<tokio::task::JoinHandle<u32>>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut busy = Vec::new();
    for _ in 0..n {
        let client = gw.connect("alice").await;
        let stop = stop.clone();
        busy.push(tokio::spawn(async move {
            let mut runs = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client.batch_execute(sql).await.unwrap();
                runs += 1;
            }
            runs
        }));
    }
    (stop, busy)
}

/// Sessions of one identity that keep the pool's only connection busy
/// among themselves do not starve a session of another identity: the
/// connection goes back to the pool's queue after a few handoffs.
#[tokio::test(flavor = "multi_thread")]
async fn handoffs_among_one_identity_do_not_starve_another() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        acquire_timeout_ms: 5_000,
        ..Opts::default()
    })
    .await;
    let (stop, busy) = busy_sessions(&gw, 3, "SELECT pg_sleep(0.005)").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bob = gw.connect("bob").await;
    let started = Instant::now();
    assert_eq!(support::one(&bob, "SELECT current_user").await, "engineer");
    let waited = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in busy {
        assert!(task.await.unwrap() > 0);
    }
    // Three sessions of 5 ms transactions: once bob has waited FAIR_WAIT
    // (10 ms), the connection goes back to the queue, where bob is first.
    assert!(waited < Duration::from_secs(2), "bob waited {waited:?}");
}

/// Sessions of one identity that keep every connection busy still let the
/// pool grow to its size: a session whose checkout is opening a new server
/// connection is not pulled away by a handoff halfway through the login
/// (that cancelled the login, and the pool stayed at one or two
/// connections under load, at a fifth of the throughput).
#[tokio::test(flavor = "multi_thread")]
async fn handoffs_do_not_keep_the_pool_from_growing() {
    let gw = start_gateway(Opts {
        pool_size: 4,
        ..Opts::default()
    })
    .await;
    // Two sessions keep their connections busy, handing them to each
    // other; then ten more come, logged in first and started together, and
    // need the pool to grow while those handoffs go on.
    let (stop, early) = busy_sessions(&gw, 2, "SELECT 1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(gw.connect("alice").await);
    }
    let mut busy = Vec::new();
    for client in clients {
        busy.push(tokio::spawn(async move {
            let mut pids = std::collections::BTreeSet::new();
            for _ in 0..300 {
                pids.insert(support::one(&client, "SELECT pg_backend_pid()").await);
            }
            pids
        }));
    }
    let mut pids = std::collections::BTreeSet::new();
    for task in busy {
        pids.extend(task.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in early {
        assert!(task.await.unwrap() > 0);
    }
    assert_eq!(pids.len(), 4, "server connections used: {pids:?}");
}
