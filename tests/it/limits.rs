//! Timeouts: idle clients, idle transactions, long statements.

use std::time::{Duration, Instant};

use crate::support::{self, cluster, start_gateway, Opts};

#[tokio::test(flavor = "multi_thread")]
async fn idle_clients_are_closed_after_client_idle_timeout() {
    let gw = start_gateway(Opts {
        server_extra: "client_idle_timeout_ms = 300\n".into(),
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    assert_eq!(support::one(&c, "SELECT 1").await, "1");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let err = c
        .simple_query("SELECT 1")
        .await
        .expect_err("closed while idle");
    assert!(
        err.is_closed() || support::sqlstate(&err) == "57P05",
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_transactions_are_rolled_back_and_their_connection_freed() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        acquire_timeout_ms: 3000,
        server_extra: "idle_in_transaction_timeout_ms = 1000\n".into(),
        ..Opts::default()
    })
    .await;
    let marker = 6_000_000 + rand::random::<u16>() as i32;
    let alice = gw.connect("alice").await;
    alice.batch_execute("BEGIN").await.unwrap();
    alice
        .batch_execute(&format!(
            "INSERT INTO items VALUES ({marker}, 'idle', NULL)"
        ))
        .await
        .unwrap();
    let bob = gw.connect("bob").await;
    let started = Instant::now();
    // Bob waits for the only connection; alice's idle transaction is cut.
    assert_eq!(support::one(&bob, "SELECT current_user").await, "engineer");
    assert!(started.elapsed() < Duration::from_secs(3));
    let err = alice
        .simple_query("SELECT 1")
        .await
        .expect_err("alice was closed");
    assert!(
        err.is_closed() || support::sqlstate(&err) == "25P03",
        "{err:?}"
    );
    assert_eq!(
        cluster().psql(
            "app",
            &format!("SELECT count(*) FROM items WHERE id = {marker}")
        ),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn long_statements_are_cancelled_after_query_timeout() {
    let gw = start_gateway(Opts {
        server_extra: "query_timeout_ms = 300\n".into(),
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    let started = Instant::now();
    let err = c
        .simple_query("SELECT pg_sleep(10)")
        .await
        .expect_err("cancelled");
    assert_eq!(support::sqlstate(&err), "57014");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The session goes on, and short statements are untouched.
    for _ in 0..5 {
        assert_eq!(support::one(&c, "SELECT 2").await, "2");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_never_finish_login_are_closed() {
    use tokio::io::AsyncReadExt;
    let gw = start_gateway(Opts {
        // Long enough for a real login on a loaded machine.
        server_extra: "login_timeout_ms = 2000\n".into(),
        ..Opts::default()
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the gateway closes a silent client");
    assert_eq!(
        support::one(&gw.connect("alice").await, "SELECT 1").await,
        "1"
    );
}

/// Forwards 127.0.0.1:`port` to the test cluster once started.
async fn proxy_to_cluster(listener: tokio::net::TcpListener) {
    let target = cluster().port;
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_postgres_gives_08006_and_recovers() {
    let port = crate::support::cluster::free_port();
    let gw = start_gateway(Opts {
        backend_port: Some(port),
        ..Opts::default()
    })
    .await;
    // PostgreSQL is not there: the gateway serves and says so.
    let Err(err) = gw.try_connect("alice").await else {
        panic!("login succeeded without a backend");
    };
    assert_eq!(support::sqlstate(&err), "08006", "{err:?}");
    // It comes back: new logins and the pool work without restarting pgwarden.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(proxy_to_cluster(listener));
    let c = gw.connect("alice").await;
    assert_eq!(support::one(&c, "SELECT current_user").await, "analyst");
}

fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_clients_at_once_on_a_pool_of_ten() {
    raise_open_files_limit();
    let gw = start_gateway(Opts {
        pool_size: 10,
        acquire_timeout_ms: 20_000,
        ..Opts::default()
    })
    .await;
    let url = gw.url("clear_user", support::password_of("clear_user"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let row = c
                .query_one("SELECT current_setting('app.client_user')", &[])
                .await?;
            Ok::<_, tokio_postgres::Error>((c, row.get::<_, String>(0)))
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        let (c, who) = t.await.unwrap().expect("every client logs in and runs");
        assert_eq!(who, "clear_user");
        clients.push(c);
    }
    let total: usize = gw.shared.pools.status().iter().map(|(_, s)| s.size).sum();
    assert!(total <= 10, "pool grew to {total}");
    assert_eq!(
        gw.shared
            .metrics
            .clients
            .load(std::sync::atomic::Ordering::Relaxed),
        1000
    );
    eprintln!(
        "1000 clients logged in and served in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restart_under_load_fails_in_flight_work_and_heals() {
    let pg = tokio::task::spawn_blocking(crate::support::cluster::start_private)
        .await
        .unwrap();
    let gw = start_gateway(Opts {
        pool_size: 4,
        backend_port: Some(pg.port),
        ..Opts::default()
    })
    .await;
    let idle = gw.connect("alice").await;
    assert_eq!(support::one(&idle, "SELECT 1").await, "1");
    let busy = gw.connect("bob").await;
    let in_flight =
        tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();
    // The statement in flight gets an error, not a hang.
    let err = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("in-flight work does not hang")
        .unwrap()
        .expect_err("its server went away");
    assert!(err.code().is_some() || err.is_closed(), "{err:?}");
    // The idle client's next transaction succeeds within a few seconds.
    let started = Instant::now();
    let mut healed = false;
    while started.elapsed() < Duration::from_secs(10) {
        if let Ok(rows) = idle.simple_query("SELECT current_user").await {
            healed = rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("analyst")));
            if healed {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(healed, "the pool did not heal");
    // New clients log in and work.
    let fresh = gw.connect("bob").await;
    assert_eq!(
        support::one(&fresh, "SELECT current_user").await,
        "engineer"
    );
    drop(pg);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_statement_in_a_transaction_is_not_idle_time() {
    // The idle-in-transaction clock starts when the server has answered,
    // not when the client's last message arrived: a statement that runs
    // longer than the timeout must not get its session cut right after.
    let gw = start_gateway(Opts {
        server_extra: "idle_in_transaction_timeout_ms = 1000\n".into(),
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    alice.batch_execute("BEGIN").await.unwrap();
    alice.batch_execute("SELECT pg_sleep(1.5)").await.unwrap();
    assert_eq!(support::one(&alice, "SELECT 1").await, "1");
    alice.batch_execute("COMMIT").await.unwrap();
}

/// A client that starts `COPY … FROM STDIN` and then sends nothing held
/// its server connection for ever, whatever the timeouts: PostgreSQL acts
/// on a cancel only when more data comes, and no idle timeout applied
/// while the server waited for the copy. Now the client's silence counts
/// against `idle_in_transaction_timeout_ms` (FATAL 25P03), and
/// `query_timeout_ms` fails the copy (`CopyFail`: ERROR 57014, the session
/// goes on). In the middle of a `CopyData` the server cannot be told, and
/// the connection is given up (FATAL).
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_copy_is_ended_by_the_timeouts() {
    use crate::raw::{cstr, error_code, RawClient};
    use tokio::io::AsyncWriteExt;
    for (timeout, code, mid_message) in [
        ("idle_in_transaction_timeout_ms", "25P03", false),
        ("idle_in_transaction_timeout_ms", "25P03", true),
        ("query_timeout_ms", "57014", false),
        ("query_timeout_ms", "57014", true),
    ] {
        let case = format!("{timeout}, in the middle of a message: {mid_message}");
        let gw = one_connection_after(&format!("{timeout} = 500")).await;
        let mut c = RawClient::login(gw.addr).await;
        c.send(b'Q', &cstr("COPY items (id, owner) FROM STDIN"))
            .await;
        while c.read_message().await.0 != b'G' {}
        if mid_message {
            // The start of a CopyData over 64 KiB, passed on as it comes.
            let mut start = vec![b'd'];
            start.extend_from_slice(&200_000i32.to_be_bytes());
            start.extend(std::iter::repeat_n(b'x', 70_000));
            c.stream.write_all(&start).await.unwrap();
        }
        // The only server connection is freed for another client.
        let bob = gw.connect("bob").await;
        assert_eq!(support::one(&bob, "SELECT 1").await, "1", "{case}");
        let (tag, body) = c.read_message().await;
        assert_eq!((tag, error_code(&body)), (b'E', code.into()), "{case}");
        let fatal = body.windows(6).any(|w| w == b"SFATAL");
        assert_eq!(fatal, mid_message || code == "25P03", "{case}");
        if !fatal {
            assert_eq!(c.read_message().await.0, b'Z', "{case}");
            c.send(b'Q', &cstr("SELECT 1")).await;
            let (tags, code, _) = c.until_ready().await;
            assert_eq!(code, None, "{case}: the session goes on: {tags:?}");
        }
    }
}

/// Only whole messages count as the client moving, as in PostgreSQL: a
/// message trickled a byte at a time kept a transaction (and its server
/// connection) past `idle_in_transaction_timeout_ms`, and an idle client
/// past `client_idle_timeout_ms`, for as long as the trickle lasted.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_trickled_a_byte_at_a_time_is_idle_time() {
    use crate::raw::{cstr, error_code, RawClient};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (timeout, begin, code) in [
        ("idle_in_transaction_timeout_ms", true, "25P03"),
        ("client_idle_timeout_ms", false, "57P05"),
    ] {
        let gw = one_connection_after(&format!("{timeout} = 500")).await;
        let mut c = RawClient::login(gw.addr).await;
        if begin {
            c.send(b'Q', &cstr("BEGIN")).await;
            c.until_ready().await;
        }
        let (mut read, mut write) = c.stream.into_split();
        let trickle = tokio::spawn(async move {
            let _ = write.write_all(&[b'Q', 0, 0, 0x03, 0xe8]).await;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if write.write_all(b"x").await.is_err() {
                    break;
                }
            }
        });
        // Read on this side while the other trickles.
        let started = Instant::now();
        let mut head = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), read.read_exact(&mut head))
            .await
            .expect("ended within 5 s")
            .unwrap();
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        read.read_exact(&mut body).await.unwrap();
        assert_eq!(
            (head[0], error_code(&body)),
            (b'E', code.into()),
            "{timeout}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "{timeout}");
        trickle.abort();
        // The server connection went back to the pool.
        let bob = gw.connect("bob").await;
        assert_eq!(support::one(&bob, "SELECT 1").await, "1");
    }
}

/// A client that reads nothing of a large result held its server
/// connection for ever: the gateway's write to it waited, PostgreSQL's
/// send waited for the gateway, and no timeout or cancel could act on
/// either. Now a client that takes nothing for `client_write_timeout_ms`
/// is ended and the connection given up; another client gets one. A
/// client reading slowly but steadily is not ended: a first version,
/// which timed each write, ended one reading 390 KB/s (a write waits for
/// half the socket's send buffer to be free).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reads_nothing_is_ended_after_client_write_timeout() {
    use crate::raw::{cstr, RawClient};
    use tokio::io::AsyncReadExt;
    let gw = one_connection_after("client_write_timeout_ms = 300").await;
    // About 8 MB of rows, read 16 KB every 10 ms.
    let rows = "SELECT repeat('x', 1000) FROM generate_series(1, 8000)";
    let mut slow = RawClient::login(gw.addr).await;
    slow.send(b'Q', &cstr(rows)).await;
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail = Vec::new();
    loop {
        let n = slow.stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "a steady reader was ended");
        tail.extend_from_slice(&buf[..n]);
        tail.drain(..tail.len().saturating_sub(6));
        if tail == b"Z\0\0\0\x05I" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One that reads nothing.
    let mut c = RawClient::login(gw.addr).await;
    c.send(b'Q', &cstr(&rows.replace("8000", "100000"))).await;
    let started = Instant::now();
    let bob = gw.connect("bob").await;
    assert_eq!(support::one(&bob, "SELECT 1").await, "1");
    assert!(started.elapsed() < Duration::from_secs(8));
    drop(c);
}

/// A gateway of one server connection, with `timeout` (a `[server]`
/// setting): another client waits up to 10 s for the connection it holds.
async fn one_connection_after(timeout: &str) -> crate::support::TestGateway {
    start_gateway(Opts {
        pool_size: 1,
        acquire_timeout_ms: 10_000,
        server_extra: format!("{timeout}\n"),
        ..Opts::default()
    })
    .await
}

/// During a COPY, the time the gateway waits for PostgreSQL to take the
/// client's data is not the client's silence: a COPY whose rows waited on
/// another client's lock was ended by `idle_in_transaction_timeout_ms`
/// though its client never paused, where PostgreSQL would have let it
/// finish.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_waiting_on_postgresql_is_not_idle() {
    use crate::raw::{cstr, message, RawClient};
    use tokio::io::AsyncWriteExt;
    let gw = start_gateway(Opts {
        pool_size: 2,
        server_extra: "idle_in_transaction_timeout_ms = 1000\n".into(),
        ..Opts::default()
    })
    .await;
    let base = 20_000_000 + i32::from(rand::random::<u16>()) * 1_000;
    // bob holds the first row's key for 2.5 s, working all the while.
    let bob = gw.connect("bob").await;
    bob.batch_execute(&format!(
        "BEGIN; INSERT INTO items (id, owner) VALUES ({base}, 'bob')"
    ))
    .await
    .unwrap();
    let holder = tokio::spawn(async move {
        bob.batch_execute("SELECT pg_sleep(2.5); ROLLBACK")
            .await
            .unwrap();
    });
    let mut c = RawClient::login(gw.addr).await;
    c.send(b'Q', &cstr("COPY items (id, owner) FROM STDIN"))
        .await;
    while c.read_message().await.0 != b'G' {}
    // 8 MB of rows, more than PostgreSQL's socket takes while it waits.
    let mut data = Vec::new();
    for id in base..base + 400_000 {
        data.extend(message(b'd', format!("{id}\tcopied\n").as_bytes()));
    }
    data.extend(message(b'c', b""));
    // It blocks until PostgreSQL takes the rows again.
    c.stream.write_all(&data).await.unwrap();
    let (tags, code, _) = c.until_ready().await;
    assert_eq!(code, None, "the COPY was ended: {tags:?}");
    holder.await.unwrap();
    cluster().psql(
        "app",
        &format!(
            "DELETE FROM items WHERE id >= {base} AND id < {}",
            base + 400_000
        ),
    );
}
