//! The admin console (`[admin] users`, the virtual database `pgwarden`):
//! admins log in with their PostgreSQL password and read the gateway's
//! state; anyone else gets FATAL 28000; every command is recorded.

use std::process::{Command, Output};

use crate::support::{self, cluster, start_gateway, Opts};

/// psql on the console of the gateway on `port`, as `user`.
fn console(port: u16, user: &str, password: &str, sql: &str) -> Output {
    support::psql_command(port, user, password, "pgwarden")
        .args(["-F", "|", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap()
}

/// A console connection as alice, left idle.
async fn connect_console(port: u16) -> tokio_postgres::Client {
    let url = format!("host=127.0.0.1 port={port} user=alice password=alice-pw dbname=pgwarden");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn admins_read_the_gateway_state_and_everyone_else_is_refused() {
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: "[admin]\nusers = [\"alice\"]\n".into(),
        ..Opts::default()
    })
    .await;
    let port = gw.port();
    let bob = gw.connect("bob").await;
    support::one(&bob, "SELECT 'bob is here'").await;

    let version = console(port, "alice", "alice-pw", "SHOW VERSION");
    assert!(version.status.success(), "{}", said(&version));
    assert_eq!(
        said(&version).trim(),
        format!("pgwarden {}", env!("CARGO_PKG_VERSION"))
    );
    let clients = console(port, "alice", "alice-pw", "show clients;");
    assert!(clients.status.success(), "{}", said(&clients));
    assert!(
        said(&clients)
            .lines()
            .any(|l| l.starts_with("C|bob|app|idle|127.0.0.1|") && l.contains("|engineer|")),
        "{}",
        said(&clients)
    );
    let pools = console(port, "alice", "alice-pw", "SHOW POOLS");
    assert!(
        said(&pools)
            .lines()
            .any(|l| l.starts_with("app|pgwarden_svc|")),
        "{}",
        said(&pools)
    );
    let audit = console(port, "alice", "alice-pw", "SHOW AUDIT");
    assert!(
        said(&audit).contains("records appended|"),
        "{}",
        said(&audit)
    );
    let config = console(port, "alice", "alice-pw", "SHOW CONFIG");
    assert!(
        said(&config).contains("policy_digest|sha256:"),
        "{}",
        said(&config)
    );
    assert!(!said(&config).contains(cluster::SERVICE_PASSWORD));

    // Unknown commands are errors, and nothing reaches PostgreSQL.
    let unknown = console(port, "alice", "alice-pw", "SELECT 1");
    assert!(!unknown.status.success());
    assert!(
        said(&unknown).contains("unknown console command"),
        "{}",
        said(&unknown)
    );
    // Not an admin: FATAL 28000. A wrong password: PostgreSQL's refusal.
    let refused = console(port, "bob", "bob-pw", "SHOW VERSION");
    assert!(!refused.status.success());
    assert!(
        said(&refused).contains("may not open the pgwarden console"),
        "{}",
        said(&refused)
    );
    let wrong = console(port, "alice", "not-her-password", "SHOW VERSION");
    assert!(!wrong.status.success());
    assert!(
        said(&wrong).contains("password authentication failed"),
        "{}",
        said(&wrong)
    );

    // The extended protocol is refused with 08P01, the session goes on.
    let url = format!("host=127.0.0.1 port={port} user=alice password=alice-pw dbname=pgwarden");
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let err = admin.query("SHOW VERSION", &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("08P01"), "{err:?}");
    let rows = admin.simple_query("SHOW VERSION").await.unwrap();
    assert!(!rows.is_empty());
    drop((admin, bob));

    // Every command is in the audit log, with the admin's identity, before
    // it ran (its query record) and with how it ended (its result).
    let dir = gw.stop().await;
    let records = crate::audit::export(&dir.path().join("audit"), &["--raw"]);
    for command in [
        "SHOW VERSION",
        "show clients;",
        "SHOW POOLS",
        "SHOW AUDIT",
        "SHOW CONFIG",
        "SELECT 1",
    ] {
        let query = records
            .iter()
            .find(|r| {
                r["kind"] == "query" && r["database"] == "pgwarden" && r["statement"] == command
            })
            .unwrap_or_else(|| panic!("{command} is not in the audit"));
        assert_eq!(query["client_user"], "alice");
        let result = records
            .iter()
            .find(|r| r["kind"] == "result" && r["ref_seq"] == query["seq"])
            .unwrap_or_else(|| panic!("{command} has no result"));
        let expected = if command == "SELECT 1" { "error" } else { "ok" };
        assert_eq!(result["status"], expected, "{command}");
    }
    assert!(records.iter().any(|r| r["kind"] == "denied"
        && r["client_user"] == "bob"
        && r["database"] == "pgwarden"));
}

/// SHOW DATABASES, SHOW TOTALS and SHOW STATS read the pools and
/// counters; RELOAD
/// re-reads the configuration file and the policies, as SIGHUP does: a
/// client no policy mapped gets in once a policy file maps it.
#[tokio::test(flavor = "multi_thread")]
async fn reload_from_the_console_applies_a_new_policy() {
    let gw =
        support::BinaryGateway::start(support::TEST_POLICY, "[admin]\nusers = [\"alice\"]\n").await;
    let port = gw.port;
    let carol = |expect_ok: bool| {
        let out = support::psql_command(port, "carol", "carol-pw", "app")
            .args(["-c", "SELECT current_user"])
            .output()
            .unwrap();
        assert_eq!(out.status.success(), expect_ok, "{}", said(&out));
    };
    carol(false);
    let databases = console(port, "alice", "alice-pw", "SHOW DATABASES");
    assert!(databases.status.success(), "{}", said(&databases));
    let stats = console(port, "alice", "alice-pw", "SHOW TOTALS");
    assert!(
        said(&stats).contains("clients denied by the policy|1"),
        "{}",
        said(&stats)
    );
    std::fs::write(
        gw.dir.path().join("policies/b.toml"),
        "[[map]]\nclients = [\"carol\"]\nrole = \"analyst\"\n",
    )
    .unwrap();
    let reload = console(port, "alice", "alice-pw", "RELOAD");
    assert!(reload.status.success(), "{}", said(&reload));
    assert!(
        said(&reload).contains("configuration and policies reloaded"),
        "{}",
        said(&reload)
    );
    carol(true);
    // PgBouncer's SHOW STATS columns, per database, with carol's
    // transaction counted once her session ended.
    let stats = console(port, "alice", "alice-pw", "SHOW STATS");
    let text = said(&stats);
    let app = text
        .lines()
        .find(|l| l.starts_with("app|"))
        .unwrap_or_else(|| panic!("{text}"));
    let columns: Vec<u64> = app.split('|').skip(1).map(|v| v.parse().unwrap()).collect();
    assert_eq!(columns.len(), 14, "{text}");
    let (xacts, queries, received, sent) = (columns[0], columns[1], columns[2], columns[3]);
    assert!(
        xacts >= 1 && queries >= 1 && received > 0 && sent > 0,
        "{text}"
    );

    // A configuration that does not parse, on a line with a secret: the
    // console says only that it failed (the gateway's log says why).
    let path = gw.dir.path().join("pgwarden.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace(
            "[backend]\n",
            "[backend]\nservice_password = \"hunter2\"x\n",
        ),
    )
    .unwrap();
    let broken = console(port, "alice", "alice-pw", "RELOAD");
    assert!(!broken.status.success());
    assert!(
        said(&broken).contains("could not be read"),
        "{}",
        said(&broken)
    );
    assert!(!said(&broken).contains("hunter2"), "{}", said(&broken));

    // An admin removed is out at the next login.
    std::fs::write(
        &path,
        good.replace("users = [\"alice\"]", "users = [\"bob\"]"),
    )
    .unwrap();
    let reload = console(port, "alice", "alice-pw", "RELOAD");
    assert!(reload.status.success(), "{}", said(&reload));
    let out = console(port, "alice", "alice-pw", "SHOW VERSION");
    assert!(!out.status.success(), "{}", said(&out));
    assert!(console(port, "bob", "bob-pw", "SHOW VERSION")
        .status
        .success());
}

/// With the audit store failing and `on_failure = "deny"`, a console
/// command does not run: its record comes first, as a client's statement's.
#[tokio::test(flavor = "multi_thread")]
async fn a_console_command_whose_record_cannot_be_stored_does_not_run() {
    let control = std::sync::Arc::new(pgwarden::audit::MemoryControl::default());
    let gw = start_gateway(Opts {
        audit: true,
        memory_store: Some(control.clone()),
        audit_extra: "[admin]\nusers = [\"alice\"]\n".into(),
        ..Opts::default()
    })
    .await;
    let admin = connect_console(gw.port()).await;
    control
        .fail_inserts
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = admin.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("58030"), "{err:?}");
    assert!(!*gw.shared.paused.borrow(), "PAUSE ran without its record");
    control
        .fail_inserts
        .store(false, std::sync::atomic::Ordering::SeqCst);
    drop(admin);
    gw.stop().await;
}

/// SHOW SERVERS names the server connection a client holds; PAUSE holds
/// new transactions until RESUME; KILL ends one client's session (57P01,
/// recorded); SHUTDOWN stops the gateway as SIGTERM does.
#[tokio::test(flavor = "multi_thread")]
async fn admins_pause_kill_and_shut_down() {
    let gw = support::BinaryGateway::start(
        support::TEST_POLICY,
        "[admin]\nusers = [\"alice\"]\n[audit]\nstore = \"audit\"\n",
    )
    .await;
    let port = gw.port;
    let connect = |user: &'static str| async move {
        let url = format!(
            "host=127.0.0.1 port={port} user={user} password={} dbname=app",
            support::password_of(user)
        );
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    let bob = connect("bob").await;
    // A request running shows as active, with its age.
    let carol = connect("alice").await;
    let sleeping = tokio::spawn(async move {
        carol
            .simple_query("SELECT pg_sleep(2)")
            .await
            .map(|_| carol)
    });
    // Polled until the request has run a while (on a loaded machine it may
    // start late): its age grows past 0.2 s while it runs.
    let asked = std::time::Instant::now();
    let clients = loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let clients = console(port, "alice", "alice-pw", "SHOW CLIENTS");
        let active = said(&clients)
            .lines()
            .find(|l| l.starts_with("C|alice|app|active|"))
            .map(|l| l.split('|').nth(9).unwrap_or("").to_string())
            .unwrap_or_default();
        if active.parse::<f64>().is_ok_and(|age| age > 0.2)
            || asked.elapsed() > std::time::Duration::from_millis(1800)
        {
            break (clients, active);
        }
    };
    assert!(
        clients.1.parse::<f64>().is_ok_and(|age| age > 0.2),
        "{}",
        said(&clients.0)
    );
    sleeping.await.unwrap().unwrap();
    bob.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let servers = console(port, "alice", "alice-pw", "SHOW SERVERS");
    assert!(
        said(&servers)
            .lines()
            .any(|l| l.starts_with("S|pgwarden_svc|app|used|") && l.contains("|bob|engineer|")),
        "{}",
        said(&servers)
    );
    bob.batch_execute("COMMIT").await.unwrap();

    // PAUSE: a new transaction waits; RESUME lets it run.
    let paused = console(port, "alice", "alice-pw", "PAUSE");
    assert!(paused.status.success(), "{}", said(&paused));
    let waiting = tokio::spawn(async move {
        bob.simple_query("SELECT 'after resume'").await.unwrap();
        bob
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a transaction ran while paused");
    let resumed = console(port, "alice", "alice-pw", "RESUME");
    assert!(resumed.status.success(), "{}", said(&resumed));
    let bob = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
        .await
        .expect("resumed")
        .unwrap();

    // KILL bob's session by its id.
    let clients = console(port, "alice", "alice-pw", "SHOW CLIENTS");
    let session = said(&clients)
        .lines()
        .find(|l| l.starts_with("C|bob|"))
        .and_then(|l| l.split('|').nth(8))
        .expect("bob is a client")
        .to_string();
    let killed = console(port, "alice", "alice-pw", &format!("KILL {session}"));
    assert!(killed.status.success(), "{}", said(&killed));
    let err = bob.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.code().map(|c| c.code()) == Some("57P01") || err.is_closed(),
        "{err:?}"
    );
    let unknown = console(port, "alice", "alice-pw", "KILL no-such-session");
    assert!(
        said(&unknown).contains("no client session"),
        "{}",
        said(&unknown)
    );

    // SHUTDOWN: the gateway drains and exits, an idle console included.
    let idle_console = connect_console(port).await;
    let down = console(port, "alice", "alice-pw", "SHUTDOWN");
    assert!(down.status.success(), "{}", said(&down));
    let (code, dir) = tokio::time::timeout(std::time::Duration::from_secs(10), gw.wait())
        .await
        .expect("the gateway stopped");
    drop(idle_console);
    assert_eq!(code, Some(0));
    let records = crate::audit::export(&dir.path().join("audit"), &["--raw"]);
    assert!(records.iter().any(|r| r["kind"] == "session_end"
        && r["client_user"] == "bob"
        && r["sqlstate"] == "57P01"));
    for command in ["PAUSE", "RESUME", "SHUTDOWN"] {
        assert!(records
            .iter()
            .any(|r| r["statement"] == command && r["client_user"] == "alice"));
    }
}

/// psycopg 3, as operators script it: a query without parameters travels
/// in the simple query protocol, so the console answers `execute` and a
/// `ClientCursor` alike.
#[tokio::test(flavor = "multi_thread")]
async fn psycopg_reads_the_console_with_a_client_cursor() {
    let gw = start_gateway(Opts {
        audit_extra: "[admin]\nusers = [\"alice\"]\n".into(),
        ..Opts::default()
    })
    .await;
    let script = format!(
        r#"
import psycopg
conn = psycopg.connect("host=127.0.0.1 port={port} user=alice password=alice-pw dbname=pgwarden", autocommit=True)
print("plain", conn.execute("SHOW VERSION").fetchone()[0])
cur = psycopg.ClientCursor(conn)
cur.execute("SHOW POOLS")
print("columns", [d.name for d in cur.description])
cur.execute("SHOW VERSION")
print("version", cur.fetchone()[0])
"#,
        port = gw.port()
    );
    let out = Command::new(crate::drivers::venv_python())
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = said(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("plain pgwarden"), "{text}");
    assert!(
        text.contains("columns ['database', 'user', 'cl_active', 'cl_idle', 'sv_active', 'sv_idle', 'pool_mode']"),
        "{text}"
    );
    assert!(
        text.contains(&format!("version pgwarden {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}

/// `client_idle_timeout_ms` holds for consoles too: an idle console is
/// closed with FATAL 57P05 and does not keep a client slot.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_console_is_closed_after_the_client_idle_timeout() {
    let gw = start_gateway(Opts {
        server_extra: "client_idle_timeout_ms = 300".into(),
        audit_extra: "[admin]\nusers = [\"alice\"]\n".into(),
        ..Opts::default()
    })
    .await;
    let admin = connect_console(gw.addr.port()).await;
    admin.simple_query("SHOW VERSION").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let err = admin
        .simple_query("SHOW VERSION")
        .await
        .expect_err("closed");
    assert!(
        err.code().map(|c| c.code()) == Some("57P05") || err.is_closed(),
        "{err:?}"
    );
    gw.until_clients(0).await;
}
