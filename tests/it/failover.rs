//! `[backend] hosts`: a primary and a streaming standby of its own
//! (`pg_basebackup -R`, synchronous replication), the primary killed
//! (`pg_ctl stop -m immediate`) under a read/write workload, the standby
//! promoted. Clients keep their sessions; a standby is never written to;
//! two primaries at once are refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::audit::{export, s};
use crate::support::cluster::{self, Cluster};
use crate::support::{self, start_gateway, Opts};

/// A primary with one synchronous streaming standby, in sync.
fn primary_and_standby() -> (Cluster, Cluster) {
    let primary = cluster::start_private();
    let standby = primary.standby();
    for sql in [
        "ALTER SYSTEM SET synchronous_commit = on",
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "SELECT pg_reload_conf()",
    ] {
        primary.psql("postgres", sql);
    }
    let started = Instant::now();
    while primary.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = 'sync'",
    ) != "1"
    {
        assert!(started.elapsed() < Duration::from_secs(30), "the standby never got in sync");
        std::thread::sleep(Duration::from_millis(100));
    }
    (primary, standby)
}

fn hosts(opts: Opts, ports: &[u16], timeout_ms: u64) -> Opts {
    let hosts: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    Opts {
        backend_port: Some(ports[0]),
        backend_extra: format!(
            "hosts = [{}]\nhealth_check_interval_ms = 200\nfailover_timeout_ms = {timeout_ms}\n",
            hosts.join(", ")
        ),
        ..opts
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_keep_their_sessions_through_a_failover() {
    let (primary, standby) = tokio::task::spawn_blocking(primary_and_standby)
        .await
        .unwrap();
    let gw = start_gateway(hosts(
        Opts {
            audit: true,
            pool_size: 8,
            ..Opts::default()
        },
        &[primary.port, standby.port],
        20_000,
    ))
    .await;
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<i32>::new()));
    let promoted_at = Arc::new(std::sync::OnceLock::<Instant>::new());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..20i32 {
        let user = ["alice", "bob"][w as usize % 2];
        let client = gw.connect(user).await;
        let (acknowledged, promoted_at, stop) =
            (acknowledged.clone(), promoted_at.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut first_after_promotion = None;
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let id = 7_000_000 + w * 100_000 + i;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let insert =
                    client.execute("INSERT INTO items VALUES ($1, 'failover', NULL)", &params);
                // None may hang past the failover timeout.
                let done = tokio::time::timeout(Duration::from_secs(25), insert)
                    .await
                    .expect("no statement hangs past failover_timeout_ms");
                match done {
                    Ok(_) => {
                        acknowledged.lock().unwrap().push(id);
                        if let (Some(at), None) = (promoted_at.get(), first_after_promotion) {
                            first_after_promotion = Some(at.elapsed());
                        }
                    }
                    Err(e) => errors.push(support::sqlstate(&e)),
                }
                let read = tokio::time::timeout(
                    Duration::from_secs(25),
                    client.query_one("SELECT current_user::text", &[]),
                )
                .await
                .expect("no statement hangs");
                if let Ok(row) = read {
                    let role: String = row.get(0);
                    assert_eq!(role, ["analyst", "engineer"][w as usize % 2]);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(
                !client.is_closed(),
                "worker {w}: the gateway kept the session"
            );
            (errors, first_after_promotion)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let standby_port = standby.port;
    let primary_port = primary.port;
    let promoted = tokio::task::spawn_blocking(move || {
        primary.stop_immediate();
        std::thread::sleep(Duration::from_millis(500));
        standby.promote();
        (primary, standby)
    })
    .await
    .unwrap();
    promoted_at.set(Instant::now()).unwrap();
    // For comparison: a client of PostgreSQL itself that reconnects as soon
    // as it can with target_session_attrs=read-write (libpq's way).
    let direct = tokio::spawn(async move {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .host("127.0.0.1")
            .port(primary_port)
            .port(standby_port)
            .user("postgres")
            .dbname("app")
            .connect_timeout(Duration::from_secs(1))
            .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        loop {
            if let Ok((client, conn)) = config.connect(tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await;
                if row.is_ok_and(|r| !r.get::<_, bool>(0)) {
                    return Instant::now();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // Every worker gets through after the promotion on its own session.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut recovery = Vec::new();
    for (w, worker) in workers.into_iter().enumerate() {
        let (errors, first) = worker.await.unwrap();
        for code in &errors {
            assert!(
                ["08006", "57P01", "57P02", "57P03", "25006", "40001"].contains(&code.as_str()),
                "worker {w}: unexpected error {code}"
            );
        }
        recovery.push(
            first.unwrap_or_else(|| panic!("worker {w} never succeeded after the promotion")),
        );
    }
    recovery.sort();
    eprintln!(
        "from the promotion to each client's first write through pgwarden: min {:?}, median {:?}, max {:?}",
        recovery[0],
        recovery[recovery.len() / 2],
        recovery[recovery.len() - 1]
    );
    let direct_at = direct.await.unwrap();
    eprintln!(
        "from the promotion to a direct read-write reconnection (target_session_attrs, retried every 10 ms): {:?}",
        direct_at.saturating_duration_since(*promoted_at.get().unwrap())
    );
    // Every acknowledged write is on the new primary (synchronous commit).
    let (_old, new) = promoted;
    let ids = acknowledged.lock().unwrap().clone();
    let found: usize = new
        .psql("app", "SELECT count(*) FROM items WHERE owner = 'failover'")
        .parse()
        .unwrap();
    let missing = new.psql(
        "app",
        &format!(
            "SELECT count(*) FROM unnest(ARRAY[{}]::int[]) i WHERE i NOT IN (SELECT id FROM items)",
            ids.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
        ),
    );
    assert_eq!(
        missing,
        "0",
        "every acknowledged write survived ({} of {found})",
        ids.len()
    );
    let scrape = pgwarden::metrics::render(&gw.shared.metrics, &gw.shared.metrics_snapshot());
    assert!(
        scrape.contains(&format!(
            "pgwarden_backend_primary{{host=\"127.0.0.1:{standby_port}\"}} 1"
        )),
        "{scrape}"
    );
    assert!(
        scrape.contains("pgwarden_backend_failovers_total 1"),
        "{scrape}"
    );
    let records = export(&gw.stop().await.path().join("audit"), &[]);
    let failover = records
        .iter()
        .find(|r| s(r, "kind") == "backend_failover")
        .expect("a backend_failover record");
    assert!(
        s(failover, "message").contains(&format!("to 127.0.0.1:{standby_port}")),
        "{failover:?}"
    );
}

/// A standby is never written to, and two primaries at once are refused:
/// new transactions fail with 08006 naming the hosts after the failover
/// timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_alone_or_two_primaries_serve_no_one() {
    let (primary, standby) = tokio::task::spawn_blocking(primary_and_standby)
        .await
        .unwrap();
    let other = tokio::task::spawn_blocking(cluster::start_private)
        .await
        .unwrap();
    for (ports, why) in [
        (vec![standby.port], "none is a reachable primary"),
        (vec![primary.port, other.port], "split brain"),
    ] {
        let gw = start_gateway(hosts(Opts::default(), &ports, 1_500)).await;
        let started = Instant::now();
        let err = match gw.try_connect("alice").await {
            Err(e) => e,
            Ok(client) => client
                .simple_query("SELECT 1")
                .await
                .expect_err("no primary"),
        };
        assert_eq!(support::sqlstate(&err), "08006", "{err:?}");
        let text = format!("{err:?}");
        assert!(text.contains(why), "{text}");
        for port in &ports {
            assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    assert_eq!(
        standby.psql("app", "SELECT count(*) FROM items WHERE owner = 'failover'"),
        "0"
    );
}

/// A former primary back after a promotion, still a primary on the old
/// timeline (nothing made it follow the new one): pgwarden goes on using
/// the promoted host and, once that one is gone too, waits and fails rather
/// than write to the former one.
#[tokio::test(flavor = "multi_thread")]
async fn a_former_primary_back_on_its_old_timeline_is_never_used() {
    let (primary, standby) = tokio::task::spawn_blocking(primary_and_standby)
        .await
        .unwrap();
    let gw = start_gateway(hosts(Opts::default(), &[primary.port, standby.port], 1_500)).await;
    let alice = gw.connect("alice").await;
    let port = "SELECT inet_server_port()";
    assert_eq!(support::one(&alice, port).await, primary.port.to_string());
    let (primary, standby) = tokio::task::spawn_blocking(move || {
        primary.stop_immediate();
        standby.promote();
        primary.start_again();
        (primary, standby)
    })
    .await
    .unwrap();
    // Both say they are primary; the promoted one is on the newer timeline,
    // and serves.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..5 {
        assert_eq!(support::one(&alice, port).await, standby.port.to_string());
    }
    tokio::task::spawn_blocking(move || standby.stop_immediate())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let err = alice
        .simple_query(port)
        .await
        .expect_err("the former primary is never used");
    assert_eq!(support::sqlstate(&err), "08006", "{err:?}");
    assert_eq!(
        primary.psql("postgres", "SELECT 1"),
        "1",
        "it was up all along"
    );
}
