//! Policies: `pgwarden policy check` against the files and the backend, and
//! SIGHUP reloads that keep the old policy when the new one is bad.

use std::process::Command;
use std::time::Duration;

use crate::support::{self, start_gateway, Opts};

fn policy_check(config: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["policy", "check", "-c"])
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_check_reports_missing_roles_and_bad_files() {
    let gw = start_gateway(Opts::default()).await;
    let config = gw.dir.path().join("pgwarden.toml");
    let (code, text) = policy_check(&config);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("role \"ghost_role_that_does_not_exist\" does not exist"),
        "{text}"
    );
    assert!(!text.contains("\"analyst\""), "{text}");

    // A role that exists but that the service user is not a member of.
    support::cluster().psql("postgres", "DO $$BEGIN CREATE ROLE lonely_role NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$");
    let policies = gw.dir.path().join("policies");
    std::fs::write(
        policies.join("10-test.toml"),
        "[[map]]\nclients = [\"alice\"]\nrole = \"lonely_role\"\n",
    )
    .unwrap();
    let (code, text) = policy_check(&config);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("cannot SET ROLE \"lonely_role\""), "{text}");

    std::fs::write(
        policies.join("10-test.toml"),
        "[[map]]\nclients = [\"alice\"]\nrole = \"analyst\"\n",
    )
    .unwrap();
    let (code, text) = policy_check(&config);
    assert_eq!(code, 0, "{text}");

    std::fs::write(
        policies.join("20-bad.toml"),
        "[[map]]\nclients = [\"alice\"]\n\nrol = \"x\"\n",
    )
    .unwrap();
    let (code, text) = policy_check(&config);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("20-bad.toml:"), "names file and line: {text}");
}

/// With `[backend] hosts`, the check asks the first host that answers: one
/// down first skips no role check.
#[tokio::test(flavor = "multi_thread")]
async fn policy_check_asks_the_first_host_that_answers() {
    let down = support::cluster::free_port();
    let up = support::cluster().port;
    let gw = start_gateway(Opts {
        backend_extra: format!("hosts = [\"127.0.0.1:{down}\", \"127.0.0.1:{up}\"]\n"),
        ..Opts::default()
    })
    .await;
    let (code, text) = policy_check(&gw.dir.path().join("pgwarden.toml"));
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("role \"ghost_role_that_does_not_exist\" does not exist"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_policies_and_keeps_them_when_bad() {
    let gw = support::BinaryGateway::start(
        "[[map]]\nclients = [\"alice\"]\nrole = \"analyst\"\n",
        "[audit]\nenabled = false\n",
    )
    .await;
    let (port, policies) = (gw.port, gw.dir.path().join("policies"));
    let who = |expect_ok: bool| {
        let out = Command::new("psql")
            .arg(format!("host=127.0.0.1 port={port} user=alice dbname=app"))
            .args(["-X", "-At", "-c", "SELECT current_user"])
            .env("PGPASSWORD", support::password_of("alice"))
            .output()
            .unwrap();
        assert_eq!(
            out.status.success(),
            expect_ok,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(who(true), "analyst");
    std::fs::write(
        policies.join("a.toml"),
        "[[map]]\nclients = [\"alice\"]\nrole = \"engineer\"\n",
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(who(true), "engineer");
    // A broken file: the reload is refused and the policy in force stays.
    std::fs::write(policies.join("a.toml"), "[[map]]\nclients = \"alice\"\n").unwrap();
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(who(true), "engineer");
    // Removing the mapping takes effect for new logins.
    std::fs::write(
        policies.join("a.toml"),
        "[[map]]\nclients = [\"bob\"]\nrole = \"engineer\"\n",
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    who(false);
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait().await.0, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_reloadable_settings_to_running_sessions() {
    let gw =
        support::BinaryGateway::start(support::TEST_POLICY, "[audit]\nenabled = false\n").await;
    let url = format!(
        "host=127.0.0.1 port={} user=alice password={} dbname=app",
        gw.port,
        support::password_of("alice")
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.simple_query("SELECT pg_sleep(0.5)").await.unwrap();
    let config = gw.dir.path().join("pgwarden.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[server]\n", "[server]\nquery_timeout_ms = 300\n"),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The same, still connected client now has its statements cut at 300 ms.
    let started = std::time::Instant::now();
    let err = client
        .simple_query("SELECT pg_sleep(10)")
        .await
        .expect_err("timed out");
    assert_eq!(support::sqlstate(&err), "57014");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(support::one(&client, "SELECT 1").await, "1");
    // An invalid file changes nothing.
    std::fs::write(&config, "[server]\nlisten = 42\n").unwrap();
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = client
        .simple_query("SELECT pg_sleep(10)")
        .await
        .expect_err("still timed out");
    assert_eq!(support::sqlstate(&err), "57014");
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait().await.0, Some(0));
}

/// `policy check` prints the policy's digest, and every `session_start`
/// record carries the digest of the policy that mapped the client: two
/// gateways can be shown to apply the same policy.
#[tokio::test(flavor = "multi_thread")]
async fn the_policy_digest_is_printed_and_recorded() {
    let gw = start_gateway(Opts {
        audit: true,
        ..Opts::default()
    })
    .await;
    let (_, text) = policy_check(&gw.dir.path().join("pgwarden.toml"));
    let digest = text
        .lines()
        .find_map(|l| l.strip_prefix("policy digest "))
        .unwrap_or_else(|| panic!("no digest in: {text}"))
        .to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    let client = gw.connect("alice").await;
    support::one(&client, "SELECT 1").await;
    drop(client);
    let dir = gw.stop().await;
    let records = crate::audit::export(&dir.path().join("audit"), &["--raw"]);
    let start = records
        .iter()
        .find(|r| r["kind"] == "session_start")
        .expect("a session_start");
    assert_eq!(start["message"], format!("policy {digest}"));
}
