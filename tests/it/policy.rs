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

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_policies_and_keeps_them_when_bad() {
    let pg = support::cluster();
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("a.toml"),
        "[[map]]\nclients = [\"alice\"]\nrole = \"analyst\"\n",
    )
    .unwrap();
    let port = support::cluster::free_port();
    std::fs::write(
        dir.path().join("pgwarden.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[backend]\nport = {}\nservice_user = \"pgwarden_svc\"\nservice_password = \"{}\"\n[audit]\nenabled = false\n",
            pg.port,
            support::cluster::SERVICE_PASSWORD
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["serve", "-c"])
        .arg(dir.path().join("pgwarden.toml"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
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
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up);
    assert_eq!(who(true), "analyst");
    let hup = |pid: u32| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    };
    std::fs::write(
        policies.join("a.toml"),
        "[[map]]\nclients = [\"alice\"]\nrole = \"engineer\"\n",
    )
    .unwrap();
    hup(child.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(who(true), "engineer");
    // A broken file: the reload is refused and the policy in force stays.
    std::fs::write(policies.join("a.toml"), "[[map]]\nclients = \"alice\"\n").unwrap();
    hup(child.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(who(true), "engineer");
    // Removing the mapping takes effect for new logins.
    std::fs::write(
        policies.join("a.toml"),
        "[[map]]\nclients = [\"bob\"]\nrole = \"engineer\"\n",
    )
    .unwrap();
    hup(child.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    who(false);
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
