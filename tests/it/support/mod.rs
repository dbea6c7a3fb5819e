//! Test support: the shared throwaway PostgreSQL cluster, an in-process
//! gateway on port 0, and small client helpers.

pub mod cluster;
pub mod rsyslog;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};

use pgwarden::config::Config;
use pgwarden::server::Gateway;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use cluster::cluster;

/// The policy every test gateway loads unless a test writes its own.
pub const TEST_POLICY: &str = r#"
[[map]]
clients = ["alice"]
role = "analyst"

[[map]]
clients = ["bob"]
role = "engineer"

[[map]]
clients = ["md5_user", "clear_user"]
role = "analyst"

[[map]]
clients = ["ghost_user"]
role = "ghost_role_that_does_not_exist"
"#;

/// How a test gateway is configured.
#[derive(Clone)]
pub struct Opts {
    pub pool_size: usize,
    pub mode: &'static str,
    pub acquire_timeout_ms: u64,
    pub audit: bool,
    pub service_user: &'static str,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub policy: &'static str,
    /// Extra TOML appended to the `[server]` table.
    pub server_extra: String,
    /// `[identity] verify = "transaction"`.
    pub verify: bool,
    /// Extra TOML appended to the `[audit]` table.
    pub audit_extra: String,
    /// Use an in-memory audit store whose failures the test controls.
    pub memory_store: Option<std::sync::Arc<pgwarden::audit::MemoryControl>>,
    /// Point the gateway at this port instead of the cluster's.
    pub backend_port: Option<u16>,
    /// Extra TOML appended to the `[backend]` table.
    pub backend_extra: String,
    /// Extra TOML appended to the `[identity]` table.
    pub identity_extra: String,
    /// Extra TOML appended to the `[pool]` table.
    pub pool_extra: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            pool_size: 4,
            mode: "transaction",
            acquire_timeout_ms: 5000,
            audit: false,
            service_user: cluster::SERVICE_USER,
            tls: None,
            policy: TEST_POLICY,
            server_extra: String::new(),
            verify: false,
            audit_extra: String::new(),
            memory_store: None,
            backend_port: None,
            backend_extra: String::new(),
            identity_extra: String::new(),
            pool_extra: String::new(),
        }
    }
}

/// A gateway running inside the test process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub shared: std::sync::Arc<pgwarden::session::Shared>,
}

/// Polls `cond` every 10 ms until it holds, instead of sleeping for a
/// guessed time; panics with `what` after 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A statement text no other test sends: `sql` with a random comment.
pub fn marked(sql: &str) -> String {
    format!("{sql} -- {}", rand::random::<u32>())
}

/// Returns once PostgreSQL runs `query` (exactly that text, e.g. from
/// [`marked`]) on database `app`: a cancel sent before that finds nothing
/// to cancel, and on a loaded machine a fixed wait is not always enough.
pub async fn until_running(query: &str) {
    let running = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '{}'",
        query.replace('\'', "''")
    );
    eventually("the statement runs", || {
        cluster().psql("app", &running) == "1"
    })
    .await;
}

/// psql (no psqlrc, unaligned, tuples only) on 127.0.0.1:`port`, database
/// `database`, as `user` with `password`; add the rest and run it.
pub fn psql_command(port: u16, user: &str, password: &str, database: &str) -> Command {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-At", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", user, "-d", database])
        .env("PGPASSWORD", password);
    cmd
}

/// [`eventually`] for a condition that has to wait itself (a connection,
/// a request).
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

impl TestGateway {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits until `n` clients are logged in: the gateway noticed the
    /// others leave and finished their sessions (rollbacks included).
    pub async fn until_clients(&self, n: u64) {
        let clients = &self.shared.metrics.clients;
        eventually(&format!("{n} clients remain"), || {
            clients.load(std::sync::atomic::Ordering::Relaxed) == n
        })
        .await;
    }

    /// A libpq-style connection string for `user` through the gateway.
    pub fn url(&self, user: &str, password: &str) -> String {
        url_at(self.port(), user, password)
    }

    pub async fn connect(&self, user: &str) -> tokio_postgres::Client {
        connect_at(self.port(), user).await
    }

    pub async fn try_connect(
        &self,
        user: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        try_connect_at(self.port(), user).await
    }

    /// Stops the gateway gracefully and waits for it; returns its directory
    /// (config, policies, audit store), which lives as long as the caller
    /// keeps it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Runs psql through the gateway.
    pub fn psql(&self, user: &str, args: &[&str]) -> Output {
        psql_command(self.port(), user, password_of(user), "app")
            .args(args)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn password_of(user: &str) -> &'static str {
    cluster::USERS
        .iter()
        .find(|(u, _)| *u == user)
        .map(|(_, p)| *p)
        .unwrap_or("wrong")
}

/// Logs of the gateway under test go to stderr when PGWARDEN_TEST_LOG is set
/// (an EnvFilter, e.g. `debug`).
fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("PGWARDEN_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Starts a gateway against the shared cluster.
pub async fn start_gateway(opts: Opts) -> TestGateway {
    init_logging();
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("10-test.toml"), opts.policy).unwrap();
    let tls = match &opts.tls {
        Some((cert, key)) => format!("tls_cert = {:?}\ntls_key = {:?}\n", cert, key),
        None => String::new(),
    };
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout_ms = 10000
{tls}{extra}
[backend]
host = "127.0.0.1"
port = {port}
service_user = "{svc}"
service_password = "{pw}"
{backend_extra}

[pool]
mode = "{mode}"
size = {size}
acquire_timeout_ms = {acquire}
{pool_extra}

[identity]
policy_dir = "policies"
verify = "{verify}"
{identity_extra}

[audit]
enabled = {audit}
store = "audit"
{audit_extra}
"#,
        audit_extra = opts.audit_extra,
        extra = opts.server_extra,
        port = opts.backend_port.unwrap_or(pg.port),
        backend_extra = opts.backend_extra,
        identity_extra = opts.identity_extra,
        pool_extra = opts.pool_extra,
        svc = opts.service_user,
        pw = cluster::SERVICE_PASSWORD,
        mode = opts.mode,
        size = opts.pool_size,
        acquire = opts.acquire_timeout_ms,
        audit = opts.audit,
        verify = if opts.verify { "transaction" } else { "off" },
    );
    let path = dir.path().join("pgwarden.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::parse(&text, &path, None).expect("test config");
    let gateway = match &opts.memory_store {
        None => Gateway::build(config).expect("gateway builds"),
        Some(control) => {
            let store = pgwarden::audit::MemoryStore {
                records: Default::default(),
                control: control.clone(),
            };
            let auditor =
                pgwarden::audit::Auditor::with_store(Box::new(store), &config.audit).unwrap();
            Gateway::build_with_auditor(config, auditor).expect("gateway builds")
        }
    };
    let shared = gateway.shared().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(gateway.serve(listener, async move {
        let _ = stopped.await;
    }));
    TestGateway {
        addr,
        dir,
        stop: Some(stop),
        task: Some(task),
        shared,
    }
}

/// Reads the first column of the first row as text.
pub async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    for msg in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = msg {
            return row.get(0).unwrap_or("NULL").to_string();
        }
    }
    panic!("{sql}: no rows");
}

/// The SQLSTATE of a failed statement.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no sqlstate: {e}"))
}

/// The `pgwarden serve` binary running as a child process; killed on drop
/// if a test ends without waiting for it.
pub struct BinaryGateway {
    pub child: Option<std::process::Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl BinaryGateway {
    /// Starts `pgwarden serve` with `policy` and `extra` TOML tables after
    /// `[server]` and `[backend]` (the service password comes from the
    /// environment, as an operator would pass it), and waits until it listens.
    pub async fn start(policy: &str, extra: &str) -> BinaryGateway {
        BinaryGateway::start_with(policy, "", extra).await
    }

    /// [`BinaryGateway::start`] with `server` lines in its `[server]` table.
    pub async fn start_with(policy: &str, server: &str, extra: &str) -> BinaryGateway {
        let pg = cluster();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/a.toml"), policy).unwrap();
        let port = cluster::free_port();
        std::fs::write(
            dir.path().join("pgwarden.toml"),
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n{server}\n[backend]\nport = {}\nservice_user = \"pgwarden_svc\"\n{extra}",
                pg.port
            ),
        )
        .unwrap();
        BinaryGateway::start_in(dir, port).await
    }

    /// Starts `pgwarden serve` again on a directory (and port) a gateway
    /// started by [`BinaryGateway::start`] used: same config, same store.
    pub async fn start_in(dir: tempfile::TempDir, port: u16) -> BinaryGateway {
        let child = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
            .args(["serve", "-c"])
            .arg(dir.path().join("pgwarden.toml"))
            .env("PGWARDEN_SERVICE_PASSWORD", cluster::SERVICE_PASSWORD)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let gw = BinaryGateway {
            child: Some(child),
            port,
            dir,
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return gw;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("pgwarden serve never listened on {port}");
    }

    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Waits for the process to exit: its exit code, and its directory.
    pub async fn wait(mut self) -> (Option<i32>, tempfile::TempDir) {
        let mut child = self.child.take().expect("running");
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (status.code(), dir)
    }
}

impl Drop for BinaryGateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The gateway's Prometheus page, served on `[admin] listen` at `port`.
pub async fn scrape_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Held, no `pgwarden migrate` runs (it changes cluster-wide roles: a
/// test that plants something on one must hold this while it looks).
pub fn no_migrate_meanwhile() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `pgwarden migrate` with the gateway's config on database `db` of
/// the shared cluster, one run at a time (runs create cluster-wide roles).
pub fn migrate(config_dir: &std::path::Path, db: &str, args: &[&str]) -> Output {
    let _one = no_migrate_meanwhile();
    let pg = cluster();
    Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["migrate", "-c"])
        .arg(config_dir.join("pgwarden.toml"))
        .arg("--admin-url")
        .arg(format!("postgres://postgres@127.0.0.1:{}/{db}", pg.port))
        .args(args)
        .output()
        .unwrap()
}

/// A libpq-style connection string for `user` through the gateway
/// listening on `port`.
pub fn url_at(port: u16, user: &str, password: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} password={password} dbname=app")
}

/// Connects `user` (with its test password) through the gateway listening
/// on `port`, in-process or a [`BinaryGateway`].
pub async fn connect_at(port: u16, user: &str) -> tokio_postgres::Client {
    try_connect_at(port, user)
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

pub async fn try_connect_at(
    port: u16,
    user: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let url = url_at(port, user, password_of(user));
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A fresh database of the shared cluster (each test's own).
pub fn create_db(db: &str) {
    cluster().psql("postgres", &format!("CREATE DATABASE {db}"));
}

/// Connects `user` through the gateway to database `db`.
pub async fn connect_to(gw: &TestGateway, user: &str, db: &str) -> tokio_postgres::Client {
    let url = gw
        .url(user, password_of(user))
        .replace("dbname=app", &format!("dbname={db}"));
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {user} to {db}: {e}"));
    tokio::spawn(conn);
    client
}
