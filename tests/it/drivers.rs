//! The driver matrix: real client libraries run end to end through the
//! gateway in transaction pooling, always with a pool (2) smaller than the
//! number of connections they open, each checking its identity
//! (`current_user`, `app.client_user`) and doing real work.
//!
//! psycopg 3, asyncpg, node-postgres and JDBC run the scripts in
//! `tests/drivers/`, installed by `tests/drivers/install.sh` (which
//! `scripts/setup.sh` calls); psql and pgbench run as they are. A driver whose
//! runtime is missing FAILS its test and says how to install it: a silently
//! skipped driver would hide exactly the regressions this matrix exists for.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::{self, start_gateway, Opts, TestGateway};

const SETUP_HINT: &str = "run `bash scripts/setup.sh` (it installs the driver runtimes \
                          through tests/drivers/install.sh)";

/// A driver script that takes longer than this is stuck (the gateway lost a
/// message, a pool slot leaked...): it is killed and the test fails.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

/// The JDBC driver Debian's `libpostgresql-jdbc-java` installs.
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Runs of the same driver may overlap (a test and its variant):
/// each gets a number (`PGWARDEN_RUN`) that names its own table and id range.
static NEXT_RUN: AtomicU32 = AtomicU32::new(1);

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// The role `TEST_POLICY` maps a client to.
fn role_of(user: &str) -> &'static str {
    match user {
        "alice" | "md5_user" | "clear_user" => "analyst",
        "bob" => "engineer",
        other => panic!("no role known for test user {other}"),
    }
}

/// Panics with the setup hint unless `path` exists.
fn require_file(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{what} is missing ({} not found): {SETUP_HINT}",
        path.display()
    );
}

/// Panics with the setup hint unless `program` runs.
fn require_program(program: &str, version_arg: &str) {
    let ok = Command::new(program)
        .arg(version_arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{program}` is not installed or does not run: {SETUP_HINT}"
    );
}

/// The Python interpreter of the drivers' venv.
pub(crate) fn venv_python() -> PathBuf {
    let venv = std::env::var_os("PGWARDEN_DRIVERS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/drivers-venv"));
    let python = venv.join("bin/python");
    require_file(&python, "the drivers' Python venv");
    python
}

/// Points `cmd` at the gateway as `user`, with `other` as the optional
/// second client of the concurrent phases (see tests/drivers/python/common.py).
fn gateway_env(cmd: &mut Command, gw: &TestGateway, user: &str, other: Option<&str>) {
    for var in [
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGAPPNAME",
        "PGSSLMODE",
        "PGPASSFILE",
        "PGTZ",
        "PGDATESTYLE",
        "PGCLIENTENCODING",
    ] {
        cmd.env_remove(var);
    }
    let run = NEXT_RUN.fetch_add(1, Ordering::Relaxed);
    cmd.env("PGWARDEN_RUN", run.to_string())
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", gw.port().to_string())
        .env("PGDATABASE", "app")
        .env("PGUSER", user)
        .env("PGPASSWORD", support::password_of(user))
        .env("PGWARDEN_EXPECT_ROLE", role_of(user))
        .env("PGCONNECT_TIMEOUT", "10");
    if let Some(other) = other {
        cmd.env("PGWARDEN_OTHER_USER", other)
            .env("PGWARDEN_OTHER_PASSWORD", support::password_of(other))
            .env("PGWARDEN_OTHER_ROLE", role_of(other));
    }
}

/// Runs `cmd` to completion (killed after `SCRIPT_TIMEOUT`) and returns its
/// stdout; panics with everything it printed if it fails. Output goes to
/// files so that a killed process still shows how far it got.
async fn run(what: &str, mut cmd: Command) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let started = Instant::now();
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}. {SETUP_HINT}"));
    let status = match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait()).await {
        Ok(status) => Some(status.unwrap()),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let verdict = match status {
        Some(s) if s.success() => {
            println!("{what}: ok in {:.1?}\n{stdout}", started.elapsed());
            return stdout;
        }
        Some(s) => format!("failed ({s})"),
        None => format!("did not finish within {SCRIPT_TIMEOUT:?} and was killed"),
    };
    panic!("{what} {verdict}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
}

async fn small_pool() -> TestGateway {
    pool_of(2).await
}

async fn pool_of(pool_size: usize) -> TestGateway {
    start_gateway(Opts {
        pool_size,
        ..Opts::default()
    })
    .await
}

/// `[pool] isolation = "role"`: each role's transactions run on its own
/// login (the cluster has them, as `pgwarden migrate` makes them).
async fn role_isolated(pool_size: usize) -> TestGateway {
    start_gateway(Opts {
        pool_size,
        pool_extra: "isolation = \"role\"".into(),
        ..Opts::default()
    })
    .await
}

async fn python_driver(script: &str, user: &str, other: &str, env: &[(&str, &str)]) {
    python_driver_on(pool_of(2).await, script, user, other, env).await;
}

async fn python_driver_on(
    gw: TestGateway,
    script: &str,
    user: &str,
    other: &str,
    env: &[(&str, &str)],
) {
    run_python(&gw, script, user, other, env).await;
}

/// Runs a Python driver script through `gw` until it reports PASS.
pub(crate) async fn run_python(
    gw: &TestGateway,
    script: &str,
    user: &str,
    other: &str,
    env: &[(&str, &str)],
) {
    let python = venv_python();
    let mut cmd = Command::new(python);
    cmd.arg(drivers_dir().join("python").join(script))
        .current_dir(drivers_dir().join("python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    gateway_env(&mut cmd, gw, user, Some(other));
    cmd.envs(env.iter().copied());
    let out = run(script, cmd).await;
    assert!(out.contains("PASS"), "{script} did not report PASS:\n{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_psycopg3() {
    python_driver("psycopg_suite.py", "alice", "bob", &[]).await;
}

/// The paths after which psycopg, holding prepared statements, sends
/// `DEALLOCATE ALL` inside a transaction (after any command tagged ROLLBACK,
/// DROP or ALTER, e.g. a failed savepoint) or through the extended protocol
/// (after an error in pipeline mode). On a pool of one, so the statements
/// it drops are the ones the next statements need. See
/// `extended_deallocate_all_keeps_shared_statements`.
#[tokio::test(flavor = "multi_thread")]
async fn drivers_psycopg3_deallocate_all() {
    python_driver_on(
        pool_of(1).await,
        "psycopg_suite.py",
        "alice",
        "bob",
        &[("PGWARDEN_PSYCOPG_DEALLOCATE_ALL", "1")],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_psycopg3_role_isolation() {
    python_driver_on(
        role_isolated(2).await,
        "psycopg_suite.py",
        "alice",
        "bob",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_asyncpg_role_isolation() {
    python_driver_on(
        role_isolated(2).await,
        "asyncpg_suite.py",
        "alice",
        "md5_user",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_asyncpg() {
    python_driver("asyncpg_suite.py", "alice", "md5_user", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_node_postgres() {
    require_program("node", "--version");
    let node = drivers_dir().join("node");
    require_file(&node.join("node_modules/pg"), "node-postgres (npm `pg`)");
    for gw in [small_pool().await, role_isolated(2).await] {
        node_postgres(&gw, &node).await;
    }
}

async fn node_postgres(gw: &TestGateway, node: &Path) {
    let mut cmd = Command::new("node");
    cmd.arg(node.join("pg_suite.js")).current_dir(node);
    gateway_env(&mut cmd, gw, "alice", Some("clear_user"));
    let out = run("node-postgres", cmd).await;
    assert!(
        out.contains("PASS"),
        "pg_suite.js did not report PASS:\n{out}"
    );
}

/// Compiles tests/drivers/java/JdbcSuite.java and runs it through a gateway.
async fn jdbc(env: &[(&str, &str)]) {
    require_program("javac", "-version");
    require_program("java", "-version");
    require_file(
        Path::new(JDBC_JAR),
        "the JDBC driver (libpostgresql-jdbc-java)",
    );
    let classes = tempfile::tempdir().unwrap();
    let mut javac = Command::new("javac");
    javac
        .args(["-nowarn", "-cp", JDBC_JAR, "-d"])
        .arg(classes.path())
        .arg(drivers_dir().join("java/JdbcSuite.java"));
    run("javac JdbcSuite.java", javac).await;
    let gw = small_pool().await;
    let mut java = Command::new("java");
    java.args(["-XX:TieredStopAtLevel=1", "-cp"])
        .arg(format!("{}:{JDBC_JAR}", classes.path().display()))
        .arg("JdbcSuite");
    gateway_env(&mut java, &gw, "alice", Some("bob"));
    java.envs(env.iter().copied());
    let out = run("JDBC", java).await;
    assert!(
        out.contains("PASS"),
        "JdbcSuite did not report PASS:\n{out}"
    );
}

/// JDBC with its application name in the StartupMessage
/// (`assumeMinServerVersion=9.0`); see the next test for pgjdbc's default.
#[tokio::test(flavor = "multi_thread")]
async fn drivers_jdbc() {
    jdbc(&[("PGWARDEN_JDBC_APPNAME", "startup")]).await;
}

/// pgjdbc's default: `ApplicationName` is sent as `SET application_name =
/// 'drv-jdbc'` right after login; the gateway re-applies it as
/// `drv-jdbc [alice]` on the serving connection right away, so
/// `pg_stat_activity` keeps the real client. See
/// `set_application_name_keeps_the_client_tag`.
#[tokio::test(flavor = "multi_thread")]
async fn drivers_jdbc_default_application_name() {
    jdbc(&[]).await;
}

/// The previous test without Java: the tag stays on the connection where
/// the client ran `SET application_name` (it once went missing there).
#[tokio::test(flavor = "multi_thread")]
async fn set_application_name_keeps_the_client_tag() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    alice
        .batch_execute("SET application_name = 'renamed'")
        .await
        .unwrap();
    assert_eq!(
        support::one(
            &alice,
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        .await,
        "renamed [alice]"
    );
    // PostgreSQL keeps 63 bytes: a long name is cut so that the client's
    // own name still shows, not one the client spelled (red team rt40).
    let spoof = format!("{}nightly-etl [bob]", " ".repeat(46));
    alice
        .batch_execute(&format!("SET application_name = '{spoof}'"))
        .await
        .unwrap();
    let shown = support::one(
        &alice,
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .await;
    assert!(shown.ends_with(" [alice]"), "{shown:?}");
}

/// psql through the gateway: the catalog queries behind `\d`, `\copy` in
/// and out, from several concurrent sessions of two users.
#[tokio::test(flavor = "multi_thread")]
async fn drivers_psql() {
    require_program("psql", "--version");
    let gw = small_pool().await;
    let sessions = [("alice", 1), ("bob", 2), ("alice", 3), ("bob", 4)];
    let dir = tempfile::tempdir().unwrap();
    let runs = sessions.iter().map(|&(user, n)| {
        let script = dir.path().join(format!("s{n}.sql"));
        std::fs::write(&script, psql_script(n)).unwrap();
        let mut cmd = Command::new("psql");
        cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-f"]).arg(&script);
        gateway_env(&mut cmd, &gw, user, None);
        async move {
            (
                user,
                n,
                run(&format!("psql session {n} ({user})"), cmd).await,
            )
        }
    });
    for (user, n, out) in futures_util::future::join_all(runs).await {
        let rows = psql_rows(&out);
        for want in [
            &["id", "integer", "", "not null", ""][..],
            &["owner", "text", "", "", ""],
            &["payload", "bytea", "", "", ""],
            &[role_of(user), user],
        ] {
            assert!(
                rows.iter().any(|r| r == want),
                "psql session {n} ({user}): no row {want:?}:\n{out}"
            );
        }
        for want in [
            "Table \"public.items\"",
            "\"items_pkey\" PRIMARY KEY, btree (id)",
            &format!("1\tone\t{user}\n2\ttwo\t{user}\n3\tthree\t{user}\n"),
            &format!("Table \"public.drv_psql_{n}\""),
        ] {
            assert!(
                out.contains(want),
                "psql session {n} ({user}): output lacks {want:?}:\n{out}"
            );
        }
    }
}

/// The cells of psql's aligned output, one trimmed vector per table row.
fn psql_rows(out: &str) -> Vec<Vec<&str>> {
    out.lines()
        .filter(|l| l.contains('|'))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect()
}

fn psql_script(n: u32) -> String {
    format!(
        "\\d items
DROP TABLE IF EXISTS drv_psql_{n};
CREATE TABLE drv_psql_{n} (id int PRIMARY KEY, owner text);
\\copy drv_psql_{n} from stdin
1\tone
2\ttwo
3\tthree
\\.
\\copy (SELECT id, owner, current_setting('app.client_user') FROM drv_psql_{n} ORDER BY id) to stdout
SELECT current_user AS role, current_setting('app.client_user') AS client;
\\d drv_psql_{n}
DROP TABLE drv_psql_{n};
"
    )
}

/// Creates the `bench` database with `pgbench -i -s 1` directly against the
/// cluster (as the superuser: initializing needs DDL the mapped roles lack)
/// and lets analyst run the built-in scripts on it.
fn bench_database() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let pg = support::cluster();
        pg.psql("postgres", "CREATE DATABASE bench");
        let out = Command::new("pgbench")
            .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &pg.port.to_string(), "bench"])
            .output()
            .expect("run pgbench -i");
        assert!(
            out.status.success(),
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.psql(
            "bench",
            "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO analyst",
        );
    });
}

/// A short pgbench run through a pool of 2 with 4 clients: the TPC-B-like
/// built-in script plus a script that fails the run (1/0 aborts the client)
/// if a transaction ever runs under another identity.
///
/// One thread per client (`-j` = `-c`): with `-M prepared`, pgbench prepares
/// each statement with a blocking `PQprepare` the first time a connection
/// runs it (every transaction under `-C`). A thread blocked there while
/// another of its clients sits inside a transaction, holding a server
/// connection, can wait for a connection only its own thread would free:
/// with fewer server connections than clients, any transaction-mode pooler
/// then answers 53300 after `acquire_timeout_ms`. Seen as "no server
/// connection became free" followed by `prepared statement "P_0" does not
/// exist` (pgbench ignores the failed Parse and binds anyway).
async fn pgbench(protocol: &str, connect_per_transaction: bool) {
    pgbench_on(small_pool().await, protocol, connect_per_transaction).await;
}

async fn pgbench_on(gw: TestGateway, protocol: &str, connect_per_transaction: bool) {
    require_program("pgbench", "--version");
    let user = "alice";
    tokio::task::spawn_blocking(bench_database).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("identity.sql");
    std::fs::write(
        &identity,
        format!(
            "SELECT 1 / (current_user = '{}' AND current_setting('app.client_user') = '{user}')::int;\n",
            role_of(user)
        ),
    )
    .unwrap();
    let mut cmd = Command::new("pgbench");
    cmd.args(["-n", "-T", "2", "-c", "4", "-j", "4", "-M", protocol])
        .args(["-b", "tpcb-like@4", "-f"])
        .arg(format!("{}@1", identity.display()));
    if connect_per_transaction {
        cmd.arg("-C");
    }
    gateway_env(&mut cmd, &gw, user, None);
    cmd.env("PGDATABASE", "bench");
    let what = format!(
        "pgbench -M {protocol}{}",
        if connect_per_transaction { " -C" } else { "" }
    );
    let out = run(&what, cmd).await;
    assert!(
        out.contains("number of failed transactions: 0 (0.000%)"),
        "{what}: failed transactions:\n{out}"
    );
    let processed: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no transaction count:\n{out}"));
    assert!(processed > 0, "{what}: no transaction ran:\n{out}");
    // The identity script is the second one; it must have run too.
    let identity_runs: u64 = out
        .split("SQL script 2:")
        .nth(1)
        .and_then(|s| {
            s.lines()
                .filter(|l| l.contains(" transactions ("))
                .find_map(|l| l.trim().strip_prefix("- "))
        })
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no statistics for the identity script:\n{out}"));
    assert!(
        identity_runs > 0,
        "{what}: the identity script never ran:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_pgbench_simple() {
    pgbench("simple", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_pgbench_extended() {
    pgbench("extended", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_pgbench_prepared() {
    pgbench("prepared", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_pgbench_prepared_role_isolation() {
    pgbench_on(role_isolated(2).await, "prepared", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drivers_pgbench_connect_per_transaction() {
    pgbench("prepared", true).await;
}

/// psycopg, after an error in pipeline mode, sends `ROLLBACK` and
/// `DEALLOCATE ALL` through the extended protocol (pipeline mode has no
/// simple Query). It reaches PostgreSQL and drops every `pgwarden_*`
/// statement on that server connection; the gateway must then stop trusting
/// its cache for that connection (it once answered the next client's Parse
/// from it, and Bind failed with 26000).
#[tokio::test(flavor = "multi_thread")]
async fn extended_deallocate_all_keeps_shared_statements() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let a = gw.connect("alice").await;
    let b = gw.connect("bob").await;
    let text = "SELECT 'shared after deallocate'::text";
    let row = a.query_one(text, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "shared after deallocate");
    // tokio-postgres runs this with Parse/Bind/Execute, like psycopg's
    // pipeline mode does.
    a.execute("DEALLOCATE ALL", &[]).await.unwrap();
    let row = b
        .query_one(text, &[])
        .await
        .unwrap_or_else(|e| panic!("bob's statement after alice's DEALLOCATE ALL: {e:?}"));
    assert_eq!(row.get::<_, String>(0), "shared after deallocate");
}
