//! The gateway process: graceful shutdown, TLS to clients, and the binary.

use std::time::Duration;

use crate::support::{self, start_gateway, Opts};

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_transactions_and_fatals_idle_clients() {
    let gw = start_gateway(Opts::default()).await;
    let idle = gw.connect("alice").await;
    let busy = gw.connect("bob").await;
    let id: i32 = 3_000_000 + rand::random::<u16>() as i32;
    busy.batch_execute("BEGIN").await.unwrap();
    busy.execute("INSERT INTO items VALUES ($1, 'shutdown', NULL)", &[&id])
        .await
        .unwrap();
    let addr = gw.addr;
    let stopping = tokio::spawn(async move { drop(gw.stop().await) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New clients are no longer accepted.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // The idle client was told why it goes away.
    let err = idle
        .simple_query("SELECT 1")
        .await
        .expect_err("idle client is disconnected");
    assert!(
        err.is_closed() || support::sqlstate(&err) == "57P01",
        "{err}"
    );
    // The transaction in flight completes.
    busy.execute("UPDATE items SET owner = 'done' WHERE id = $1", &[&id])
        .await
        .unwrap();
    busy.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        support::cluster().psql("app", &format!("SELECT owner FROM items WHERE id = {id}")),
        "done"
    );
    support::cluster().psql("app", &format!("DELETE FROM items WHERE id = {id}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_client_gets_fatal_57p01_on_shutdown() {
    use tokio::io::AsyncReadExt;
    let gw = start_gateway(Opts::default()).await;
    let mut raw = crate::raw::RawClient::login(gw.addr).await;
    let stop = tokio::spawn(async move { drop(gw.stop().await) });
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.stream.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf[0], b'E');
    let text = String::from_utf8_lossy(&buf);
    assert!(text.contains("57P01") && text.contains("FATAL"), "{text}");
    stop.await.unwrap();
}

fn write_test_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_with_sslmode_require_uses_tls() {
    let certs = tempfile::tempdir().unwrap();
    let gw = start_gateway(Opts {
        tls: Some(write_test_cert(certs.path())),
        ..Opts::default()
    })
    .await;
    let out = std::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=alice dbname=app sslmode=require",
            gw.port()
        ))
        .args(["-X", "-At", "-c", "SELECT current_user", "-c", "\\conninfo"])
        .env("PGPASSWORD", support::password_of("alice"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("analyst"), "{stdout}");
    assert!(stdout.contains("SSL connection"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_certificate_ssl_request_gets_n() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start_gateway(Opts::default()).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut req = 8i32.to_be_bytes().to_vec();
    req.extend_from_slice(&80877103i32.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    // psql with sslmode=require refuses to go on; sslmode=prefer falls back.
    let out = std::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=alice dbname=app sslmode=prefer",
            gw.port()
        ))
        .args(["-X", "-At", "-c", "SELECT 1"])
        .env("PGPASSWORD", support::password_of("alice"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_and_exits_0_on_sigterm() {
    let gw =
        support::BinaryGateway::start(support::TEST_POLICY, "[audit]\nenabled = false\n").await;
    let out = std::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=alice dbname=app",
            gw.port
        ))
        .args([
            "-X",
            "-At",
            "-c",
            "SELECT current_setting('app.client_user')",
        ])
        .env("PGPASSWORD", support::password_of("alice"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "alice",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait().await.0, Some(0));
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgwarden.toml");
    std::fs::write(
        &path,
        "[backend]\nservice_user = \"x\"\n[pool]\nsizee = 1\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["serve", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sizee"));
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_serves_two_users_with_rls_and_cleans_up() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut port, mut dir) = (None, None);
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
            port = rest.split(',').next().map(str::to_string);
        }
        if let Some(rest) = line.strip_prefix("The audit log is ") {
            dir = rest.split("/audit").next().map(std::path::PathBuf::from);
        }
        let done = line.starts_with("Press Ctrl-C");
        seen.push(line);
        if done {
            break;
        }
    }
    let (port, dir) = (port.expect("port printed"), dir.expect("store printed"));
    assert!(dir.exists(), "{seen:?}");
    let out = std::process::Command::new("psql")
        .arg(format!("host=127.0.0.1 port={port} user=alice dbname=demo"))
        .args([
            "-X",
            "-At",
            "-c",
            "SELECT current_user, pgwarden.client_user(), count(*) FROM tickets GROUP BY 1, 2",
        ])
        .env("PGPASSWORD", "alice-demo")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "analyst|alice|2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    // The demo's audit, printed as a table: a header, and alice's
    // statement on the tickets table in its line.
    assert!(rest.iter().any(|l| l.starts_with("time ")), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("alice") && l.contains("analyst") && l.contains("tickets")),
        "{rest:?}"
    );
    assert!(!dir.exists(), "demo directory left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_beyond_max_client_connections_get_fatal_53300() {
    let gw = start_gateway(Opts {
        server_extra: "max_client_connections = 2\n".into(),
        ..Opts::default()
    })
    .await;
    let a = gw.connect("alice").await;
    let b = gw.connect("bob").await;
    let Err(err) = gw.try_connect("alice").await else {
        panic!("a third client was accepted");
    };
    assert_eq!(support::sqlstate(&err), "53300");
    // Cancel requests are still served while full.
    let token = a.cancel_token();
    let marker = support::marked("SELECT pg_sleep(20)");
    let sleep = marker.clone();
    let sleeper = tokio::spawn(async move { a.simple_query(&sleep).await.map(|_| ()) });
    support::until_running(&marker).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    assert_eq!(
        support::sqlstate(&sleeper.await.unwrap().unwrap_err()),
        "57014"
    );
    // A slot frees when a client leaves.
    drop(b);
    let mut admitted = false;
    for _ in 0..50 {
        if gw.try_connect("bob").await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line() {
    let pg = support::cluster();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/a.toml"), support::TEST_POLICY).unwrap();
    let port = support::cluster::free_port();
    let config = dir.path().join("pgwarden.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[backend]\nport = {}\nservice_user = \"pgwarden_svc\"\nservice_password = \"{}\"\n[audit]\nenabled = false\n[log]\nformat = \"json\"\n",
            pg.port,
            support::cluster::SERVICE_PASSWORD
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["serve", "-c"])
        .arg(&config)
        .env_remove("PGWARDEN_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut served = false;
    for _ in 0..100 {
        let out = std::process::Command::new("psql")
            .arg(format!("host=127.0.0.1 port={port} user=alice dbname=app"))
            .args(["-X", "-At", "-c", "SELECT 1"])
            .env("PGPASSWORD", support::password_of("alice"))
            .output()
            .unwrap();
        if out.status.success() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(served);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "session started" && v["span"]["user"] == "alice"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_metrics_count_what_happened() {
    let admin = support::cluster::free_port();
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n"),
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    for _ in 0..3 {
        support::one(&alice, "SELECT 1").await;
    }
    alice.simple_query("RESET ROLE").await.unwrap_err();
    let _ = tokio_postgres::connect(&gw.url("bob", "wrong"), tokio_postgres::NoTls).await;
    let _ = gw.try_connect("carol").await;
    let body = support::scrape_metrics(admin).await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    for line in [
        "pgwarden_clients 1",
        "pgwarden_guard_blocks_total 1",
        "pgwarden_auth_failures_total 1",
        "pgwarden_denied_total 1",
        "pgwarden_server_connections{database=\"app\",state=\"idle\"} 1",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line}:\n{body}");
    }
    drop(alice);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = support::scrape_metrics(admin).await;
    assert!(body.lines().any(|l| l == "pgwarden_clients 0"), "{body}");
    assert!(
        body.lines()
            .any(|l| l == "pgwarden_statements_total{client_user=\"alice\"} 4"),
        "{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("pgwarden_audit_appended_total ") && !l.ends_with(" 0")),
        "{body}"
    );
}

/// Whether the server connection serving `user` uses TLS, as PostgreSQL
/// itself reports it (read as superuser: pg_stat_ssl hides other roles').
async fn backend_ssl(
    gw: &support::TestGateway,
    user: &str,
) -> Result<String, tokio_postgres::Error> {
    let c = gw.try_connect(user).await?;
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    Ok(support::cluster().psql(
        "postgres",
        &format!("SELECT ssl::text FROM pg_stat_ssl WHERE pid = {pid}"),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_tls_modes() {
    let ca = support::cluster().ca_file.clone();
    // disable (the default): plain TCP to PostgreSQL.
    let gw = start_gateway(Opts::default()).await;
    assert_eq!(backend_ssl(&gw, "alice").await.unwrap(), "false");
    // require: TLS for the pool and the auth relay (SCRAM, MD5, cleartext).
    let gw = start_gateway(Opts {
        backend_extra: "tls = \"require\"\n".into(),
        ..Opts::default()
    })
    .await;
    for user in ["alice", "md5_user", "clear_user"] {
        assert_eq!(backend_ssl(&gw, user).await.unwrap(), "true", "{user}");
    }
    // verify-full against the server's CA.
    let gw = start_gateway(Opts {
        backend_extra: format!("tls = \"verify-full\"\ntls_ca_file = {ca:?}\n"),
        ..Opts::default()
    })
    .await;
    assert_eq!(backend_ssl(&gw, "alice").await.unwrap(), "true");
    // verify-full against another CA: no login, a clear 08006.
    let certs = tempfile::tempdir().unwrap();
    let (other_ca, _) = write_test_cert(certs.path());
    let gw = start_gateway(Opts {
        backend_extra: format!("tls = \"verify-full\"\ntls_ca_file = {other_ca:?}\n"),
        ..Opts::default()
    })
    .await;
    let err = backend_ssl(&gw, "alice")
        .await
        .expect_err("untrusted server certificate");
    assert_eq!(support::sqlstate(&err), "08006", "{err:?}");
}
