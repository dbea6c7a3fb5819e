//! Reading the audit as a person: `pgwarden audit tail` and `export
//! --format table` print aligned lines, one per statement, with its
//! outcome; a running gateway's store is refused with a reason.

use std::process::{Command, Output};

use crate::support::{self, start_gateway, Opts};

fn pgwarden(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_and_table_show_one_aligned_line_per_statement() {
    let gw = start_gateway(Opts {
        audit: true,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    let bob = gw.connect("bob").await;
    for i in 0..5 {
        support::one(&alice, &format!("SELECT 'alice-{i}'")).await;
    }
    support::one(&bob, "SELECT 'bob-1',\n  'second line'").await;
    assert!(bob
        .simple_query("SELECT * FROM no_such_table")
        .await
        .is_err());
    let store = gw.dir.path().join("audit");
    let held = pgwarden(&["audit", "tail", "--store", store.to_str().unwrap()]);
    assert_eq!(held.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&held.stderr).contains("held by a running gateway"),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    drop((alice, bob));
    let dir = gw.stop().await;
    let store = dir.path().join("audit");
    let store = store.to_str().unwrap();

    let tail = stdout(&pgwarden(&[
        "audit", "tail", "--store", store, "-n", "4", "--kind", "query",
    ]));
    let lines: Vec<&str> = tail.lines().collect();
    assert_eq!(lines.len(), 5, "{tail}");
    assert!(
        lines[0].starts_with("time") && lines[0].contains("statement"),
        "{tail}"
    );
    let column = lines[0].find("statement").unwrap();
    assert!(
        lines[3].contains("bob") && lines[3].contains("SELECT 'bob-1', 'second line'"),
        "{tail}"
    );
    assert_eq!(lines[3].find("SELECT"), Some(column), "{tail}");
    assert!(
        lines[4].contains("error") && lines[4].contains("(42P01)"),
        "{tail}"
    );
    let bobs = stdout(&pgwarden(&[
        "audit", "tail", "--store", store, "--user", "bob",
    ]));
    assert!(bobs.lines().skip(1).all(|l| l.contains("bob")), "{bobs}");

    let file = dir.path().join("audit.txt");
    stdout(&pgwarden(&[
        "audit",
        "export",
        "--store",
        store,
        "--format",
        "table",
        "-o",
        file.to_str().unwrap(),
    ]));
    let table = std::fs::read_to_string(&file).unwrap();
    for i in 0..5 {
        assert_eq!(
            table.matches(&format!("SELECT 'alice-{i}'")).count(),
            1,
            "{table}"
        );
    }
    assert!(
        table.lines().any(|l| l.contains("[session_start]")),
        "{table}"
    );
}

/// A running gateway's store cannot be opened, so `tail --console URL`
/// reads its records through the admin console (`SHOW LOG AFTER seq`), and
/// `--follow` keeps printing them as they are written.
#[tokio::test(flavor = "multi_thread")]
async fn tail_follows_a_running_gateway_through_its_console() {
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: "[admin]\nusers = [\"alice\"]\n".into(),
        ..Opts::default()
    })
    .await;
    let bob = gw.connect("bob").await;
    support::one(&bob, "SELECT 'before follow'").await;
    let url = format!("postgres://alice:alice-pw@127.0.0.1:{}/pgwarden", gw.port());
    let once = stdout(&pgwarden(&["audit", "tail", "--console", &url, "-n", "5"]));
    assert!(once.contains("SELECT 'before follow'"), "{once}");
    assert!(!once.contains("SHOW LOG"), "{once}");

    let mut follower = Command::new(env!("CARGO_BIN_EXE_pgwarden"));
    follower.args([
        "audit",
        "tail",
        "--console",
        &url,
        "--follow",
        "--user",
        "bob",
    ]);
    let seen = follow_until(follower, "SELECT 'while following'", || {
        let bob = &bob;
        async move {
            support::one(bob, "SELECT 'while following'").await;
        }
    })
    .await;
    assert!(seen.contains("SELECT 'while following'"), "{seen}");
    assert!(seen.lines().skip(1).all(|l| l.contains("bob")), "{seen}");
    drop(bob);
    gw.stop().await;
}

/// Runs `cmd` (a `tail --follow`), does `then`, and returns what it printed
/// up to the first line holding `needle` (or all it printed in 10 s).
async fn follow_until<F: std::future::Future<Output = ()>>(
    mut cmd: Command,
    needle: &'static str,
    then: impl FnOnce() -> F,
) -> String {
    let mut follower = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let pipe = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(pipe).lines() {
            let line = line.unwrap();
            let done = line.contains(needle);
            lines.push(line);
            if done {
                break;
            }
        }
        lines.join("\n")
    });
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    then().await;
    let mut seen = String::new();
    for _ in 0..100 {
        if reader.is_finished() {
            seen = reader.join().unwrap();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = follower.kill();
    let _ = follower.wait();
    seen
}

/// `tail -c FILE --follow` follows the running gateway the configuration
/// describes, through its console, as PGUSER with PGPASSWORD (libpq's
/// environment); `tail --store DIR --follow` reads a store no gateway holds
/// and says where to go once one does.
#[tokio::test(flavor = "multi_thread")]
async fn tail_follows_by_configuration_and_a_free_store() {
    let gw = support::BinaryGateway::start(
        support::TEST_POLICY,
        "[admin]\nusers = [\"alice\"]\n[audit]\nstore = \"audit\"\n",
    )
    .await;
    let port = gw.port;
    let config = gw.dir.path().join("pgwarden.toml");
    let mut follower = Command::new(env!("CARGO_BIN_EXE_pgwarden"));
    follower
        .args(["audit", "tail", "--follow", "-c"])
        .arg(&config)
        .env("PGUSER", "alice")
        .env("PGPASSWORD", "alice-pw");
    let seen = follow_until(follower, "SELECT 'by config'", || async move {
        let url = format!("host=127.0.0.1 port={port} user=bob password=bob-pw dbname=app");
        let (bob, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        support::one(&bob, "SELECT 'by config'").await;
    })
    .await;
    assert!(seen.contains("SELECT 'by config'"), "{seen}");

    gw.signal(libc::SIGTERM);
    let (_, dir) = gw.wait().await;
    let store = dir.path().join("audit");
    let mut follower = Command::new(env!("CARGO_BIN_EXE_pgwarden"));
    follower
        .args(["audit", "tail", "--follow", "-n", "50", "--store"])
        .arg(&store);
    let seen = follow_until(follower, "SELECT 'by config'", || async {}).await;
    assert!(seen.contains("SELECT 'by config'"), "{seen}");
}
