//! `pgwarden demo`: a throwaway PostgreSQL, two demo users mapped to two
//! roles, row-level security on a demo table, and a gateway in front of it,
//! with the exact psql commands to try. Ctrl-C stops everything and removes
//! every file it made.
//!
//! Invariant: the demo touches nothing outside its own temporary directory
//! and the ports it picked, and it cleans up on every way out.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::Config;
use crate::server::Gateway;

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("PostgreSQL server binaries not found in {0} (set PGWARDEN_PG_BIN, or run scripts/setup.sh)")]
    NoPostgres(PathBuf),
    #[error("{what} failed: {detail}")]
    Step { what: &'static str, detail: String },
    #[error("database setup failed: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("{0}")]
    Gateway(String),
}

fn step(what: &'static str) -> impl Fn(std::io::Error) -> DemoError {
    move |e| DemoError::Step {
        what,
        detail: e.to_string(),
    }
}

const DEMO_PASSWORDS: [(&str, &str); 2] = [("alice", "alice-demo"), ("bob", "bob-demo")];
const SERVICE_PASSWORD: &str = "svc-demo";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command for a PostgreSQL server binary, run as `postgres` when root
/// (PostgreSQL refuses to run as root).
fn pg_command(bin_dir: &Path, bin: &str) -> Command {
    let path = bin_dir.join(bin);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut cmd: Command, what: &'static str) -> Result<(), DemoError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(step(what))?;
    if !out.status.success() {
        return Err(DemoError::Step {
            what,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn free_port(preferred: u16) -> u16 {
    if StdListener::bind(("127.0.0.1", preferred)).is_ok() {
        return preferred;
    }
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(preferred)
}

/// The throwaway cluster; stopped and removed on drop.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    started: bool,
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn start(bin: PathBuf) -> Result<Cluster, DemoError> {
        if !bin.join("initdb").exists() {
            return Err(DemoError::NoPostgres(bin));
        }
        let dir = std::env::temp_dir().join(format!("pgwarden-demo-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).map_err(step("creating the demo directory"))?;
        let mut cluster = Cluster {
            bin,
            dir,
            port: free_port(5499),
            started: false,
        };
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&cluster.dir);
            run(chown, "chown of the demo directory")?;
        }
        let mut initdb = pg_command(&cluster.bin, "initdb");
        initdb.arg("-D").arg(cluster.data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run(initdb, "initdb")?;
        let hba = "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n";
        cluster.write_owned("pg_hba.conf", hba, false)?;
        let conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nlog_line_prefix = '%m [%a] '\n",
            cluster.port,
            cluster.dir.display()
        );
        cluster.write_owned("postgresql.conf", &conf, true)?;
        let mut pg_ctl = pg_command(&cluster.bin, "pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(cluster.data())
            .arg("-l")
            .arg(cluster.dir.join("postgres.log"))
            .args(["-w", "start"]);
        run(pg_ctl, "starting PostgreSQL")?;
        cluster.started = true;
        Ok(cluster)
    }

    fn write_owned(&self, name: &str, text: &str, append: bool) -> Result<(), DemoError> {
        let path = self.data().join(name);
        let text = if append {
            let old = std::fs::read_to_string(&path).map_err(step("reading postgresql.conf"))?;
            format!("{old}\n{text}")
        } else {
            text.to_string()
        };
        std::fs::write(&path, text).map_err(step("writing the cluster configuration"))?;
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&path);
            run(chown, "chown of the cluster configuration")?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started {
            let mut stop = pg_command(&self.bin, "pg_ctl");
            stop.arg("-D").arg(self.data()).args(["-m", "fast", "stop"]);
            let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SETUP_SQL: &[&str] = &[
    "CREATE ROLE analyst NOLOGIN",
    "CREATE ROLE support NOLOGIN",
    "CREATE ROLE alice LOGIN PASSWORD 'alice-demo'",
    "CREATE ROLE bob LOGIN PASSWORD 'bob-demo'",
    "CREATE ROLE pgwarden_demo_svc LOGIN NOINHERIT PASSWORD 'svc-demo'",
    "CREATE DATABASE demo",
];

const DEMO_SQL: &[&str] = &[
    "CREATE TABLE tickets (id serial PRIMARY KEY, owner text NOT NULL DEFAULT pgwarden.client_user(), title text)",
    "INSERT INTO tickets (owner, title) VALUES ('alice', 'VPN is down'), ('alice', 'New laptop'), ('bob', 'Printer jam')",
    "ALTER TABLE tickets ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY own_tickets ON tickets USING (owner = pgwarden.client_user())",
    "CREATE POLICY support_sees_all ON tickets FOR SELECT TO support USING (true)",
    "GRANT SELECT, INSERT ON tickets TO analyst, support",
    "GRANT USAGE ON SEQUENCE tickets_id_seq TO analyst, support",
];

async fn admin_pool(port: u16, database: &str) -> Result<sqlx::PgPool, sqlx::Error> {
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username("postgres")
        .database(database);
    PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
}

async fn execute_all(pool: &sqlx::PgPool, statements: &[&'static str]) -> Result<(), sqlx::Error> {
    for sql in statements {
        sqlx::query(*sql).execute(pool).await?;
    }
    Ok(())
}

/// Runs the demo until Ctrl-C.
pub async fn run_demo() -> Result<(), DemoError> {
    let bin = std::env::var_os("PGWARDEN_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    println!("starting a throwaway PostgreSQL...");
    let cluster = Cluster::start(bin)?;
    execute_all(&admin_pool(cluster.port, "postgres").await?, SETUP_SQL).await?;

    let policies = cluster.dir.join("policies");
    std::fs::create_dir_all(&policies).map_err(step("writing the demo policy"))?;
    std::fs::write(
        policies.join("demo.toml"),
        "[[map]]\nclients = [\"alice\"]\nrole = \"analyst\"\n\n[[map]]\nclients = [\"bob\"]\nrole = \"support\"\n",
    )
    .map_err(step("writing the demo policy"))?;
    let listen_port = free_port(6432);
    let config_path = cluster.dir.join("pgwarden.toml");
    let config_text = format!(
        "[server]\nlisten = \"127.0.0.1:{listen_port}\"\n[backend]\nport = {}\nservice_user = \"pgwarden_demo_svc\"\nservice_password = \"{SERVICE_PASSWORD}\"\n[pool]\nsize = 4\n[audit]\nstore = \"audit\"\n",
        cluster.port
    );
    std::fs::write(&config_path, &config_text).map_err(step("writing the demo configuration"))?;
    let config = Config::parse(&config_text, &config_path, None)
        .map_err(|e| DemoError::Gateway(e.to_string()))?;

    let admin_url = format!("postgres://postgres@127.0.0.1:{}/demo", cluster.port);
    crate::migrate::run(&config, &admin_url, Default::default())
        .await
        .map_err(|e| DemoError::Gateway(e.to_string()))?;
    execute_all(&admin_pool(cluster.port, "demo").await?, DEMO_SQL).await?;

    let audit_dir = config.audit.store.clone();
    let gateway = Gateway::build(config).map_err(|e| DemoError::Gateway(e.to_string()))?;
    let listener = gateway
        .listen()
        .await
        .map_err(|e| DemoError::Gateway(e.to_string()))?;
    print_instructions(listen_port, &audit_dir);
    gateway
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    println!("\nstopped. The audit log of this demo, one line per statement:");
    // The store's lock goes with the last handle to it, which tasks still
    // ending may hold a moment after the gateway stops (under load, longer
    // than the export's own retry: the demo then printed no audit at all).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while crate::audit::store::is_locked(&audit_dir) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut export = crate::audit::cli::ExportArgs::for_store(&audit_dir);
    export.format = crate::audit::export::Format::Table;
    crate::audit::cli::export(&export);
    drop(cluster);
    println!("demo cluster and audit log removed.");
    Ok(())
}

fn print_instructions(port: u16, audit: &Path) {
    let [(alice, alice_pw), (bob, bob_pw)] = DEMO_PASSWORDS;
    println!(
        "\npgwarden is listening on 127.0.0.1:{port}, in front of a demo database.\n\
         alice maps to role analyst, bob to role support; the table tickets has\n\
         row-level security on pgwarden.client_user().\n\n\
         Try:\n\
         \x20 PGPASSWORD={alice_pw} psql \"host=127.0.0.1 port={port} user={alice} dbname=demo\" -c \"SELECT current_user, session_user, pgwarden.client_user(), * FROM tickets\"\n\
         \x20 PGPASSWORD={bob_pw} psql \"host=127.0.0.1 port={port} user={bob} dbname=demo\" -c \"SELECT current_user, pgwarden.client_user(), * FROM tickets\"\n\
         \x20 PGPASSWORD={alice_pw} psql \"host=127.0.0.1 port={port} user={alice} dbname=demo\" -c \"SET ROLE support\"   # refused: 42501\n\n\
         The audit log is {} (printed when you stop).\n\
         Press Ctrl-C to stop and remove everything.",
        audit.display()
    );
}
