//! A throwaway PostgreSQL 15 cluster for the whole test binary.
//!
//! Started once (initdb in a temp directory, a free port, fsync off), with
//! SCRAM, MD5 and cleartext users, the NOINHERIT service users and the
//! mapped roles. When run as root, PostgreSQL runs as the `postgres` OS user.
//! A detached watchdog stops the cluster and removes its directory when the
//! test process exits, however it exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const SERVICE_USER: &str = "pgwarden_svc";
pub const SERVICE_PASSWORD: &str = "svc-secret";
pub const SERVICE_MD5_USER: &str = "pgwarden_svc_md5";

/// Login users: (name, password, how pg_hba authenticates them).
pub const USERS: &[(&str, &str)] = &[
    ("alice", "alice-pw"),
    ("bob", "bob-pw"),
    ("md5_user", "md5-pw"),
    ("clear_user", "clear-pw"),
    ("carol", "carol-pw"),
    ("ghost_user", "ghost-pw"),
];

pub struct Cluster {
    pub port: u16,
    data: PathBuf,
    /// The server's self-signed certificate (PostgreSQL runs with ssl = on).
    pub ca_file: PathBuf,
}

impl Cluster {
    /// What the server wrote to its log so far.
    pub fn server_log(&self) -> String {
        let log = self.data.parent().expect("data has a parent").join("log");
        String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned()
    }

    /// Runs SQL as the superuser through psql, panicking with its output on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed: {}\n{}",
            sql,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The shared cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(start)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command for a PostgreSQL server binary, as the postgres OS user if root.
fn pg_command(bin: &str) -> Command {
    let path = format!("{PG_BIN}/{bin}");
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A cluster of the test's own, for tests that stop or restart PostgreSQL;
/// removed when the test process exits, like the shared one.
pub fn start_private() -> Cluster {
    start()
}

impl Cluster {
    /// Restarts PostgreSQL (fast shutdown: sessions are terminated) and
    /// waits until it accepts connections again.
    pub fn restart(&self) {
        let mut pg_ctl = pg_command("pg_ctl");
        pg_ctl.args([
            "-D",
            self.data.to_str().unwrap(),
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "restart",
        ]);
        pg_ctl.stdout(Stdio::null()).stderr(Stdio::null());
        run(pg_ctl, "pg_ctl restart");
    }
}

/// A directory of the test's own for a cluster, owned by PostgreSQL's user.
fn cluster_dir() -> PathBuf {
    let dir = PathBuf::from(format!(
        "/tmp/pgwarden-test-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["postgres:postgres", dir.to_str().unwrap()]);
                c
            },
            "chown",
        );
    }
    dir
}

/// Starts the cluster in `data` (logging beside it) and waits until it
/// accepts connections.
fn pg_start(dir: &Path, data: &Path) {
    spawn_watchdog(dir, data);
    let mut pg_ctl = pg_command("pg_ctl");
    pg_ctl.args([
        "-D",
        data.to_str().unwrap(),
        "-l",
        dir.join("log").to_str().unwrap(),
        "-w",
        "-t",
        "60",
        "start",
    ]);
    run(pg_ctl, "pg_ctl start");
}

impl Cluster {
    /// A streaming standby of this cluster (`pg_basebackup -R`), started
    /// on a port of its own.
    pub fn standby(&self) -> Cluster {
        let dir = cluster_dir();
        let data = dir.join("data");
        let mut backup = pg_command("pg_basebackup");
        backup.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-D",
            data.to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        ]);
        run(backup, "pg_basebackup");
        let port = free_port();
        let existing = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        write_as_postgres(
            &data.join("postgresql.conf"),
            &format!(
                "{existing}\nport = {port}\nunix_socket_directories = '{}'\n",
                dir.display()
            ),
        );
        pg_start(&dir, &data);
        Cluster {
            port,
            ca_file: data.join("server.crt"),
            data,
        }
    }

    /// `pg_ctl stop -m immediate`: the server is gone at once, as in a crash.
    pub fn stop_immediate(&self) {
        let mut pg_ctl = pg_command("pg_ctl");
        pg_ctl.args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"]);
        run(pg_ctl, "pg_ctl stop");
    }

    /// Starts the cluster again after [`Self::stop_immediate`].
    pub fn start_again(&self) {
        pg_start(self.data.parent().unwrap(), &self.data);
    }

    /// `pg_ctl promote` of a standby, waiting until it is a primary.
    pub fn promote(&self) {
        let mut pg_ctl = pg_command("pg_ctl");
        pg_ctl.args(["-D", self.data.to_str().unwrap(), "-w", "promote"]);
        run(pg_ctl, "pg_ctl promote");
    }
}

fn start() -> Cluster {
    let dir = cluster_dir();
    let data = dir.join("data");
    let mut initdb = pg_command("initdb");
    initdb.args([
        "-D",
        data.to_str().unwrap(),
        "-U",
        "postgres",
        "-A",
        "trust",
        "--no-sync",
        "-E",
        "UTF8",
        "--locale=C",
    ]);
    run(initdb, "initdb");
    let port = free_port();
    write_as_postgres(&data.join("pg_hba.conf"), HBA);
    let conf = format!(
        "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 400\nshared_buffers = 64MB\nlog_min_messages = warning\n",
        dir.display()
    );
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    write_as_postgres(&data.join("server.crt"), &cert.cert.pem());
    write_as_postgres(&data.join("server.key"), &cert.signing_key.serialize_pem());
    std::fs::set_permissions(
        data.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let conf =
        format!("{conf}ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    let existing = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    write_as_postgres(
        &data.join("postgresql.conf"),
        &format!("{existing}\n{conf}"),
    );
    pg_start(&dir, &data);
    let ca_file = data.join("server.crt");
    let cluster = Cluster {
        port,
        data,
        ca_file,
    };
    cluster.psql("postgres", &setup_sql());
    cluster.psql("postgres", "CREATE DATABASE app");
    cluster.psql("app", APP_SQL);
    cluster
}

fn write_as_postgres(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    if is_root() {
        let mut c = Command::new("chown");
        c.args(["postgres:postgres", path.to_str().unwrap()]);
        run(c, "chown");
    }
}

/// Stops the cluster and removes its directory once this process is gone.
fn spawn_watchdog(dir: &Path, data: &Path) {
    let stop = if is_root() {
        format!(
            "runuser -u postgres -- {PG_BIN}/pg_ctl -D {} -m immediate stop",
            data.display()
        )
    } else {
        format!("{PG_BIN}/pg_ctl -D {} -m immediate stop", data.display())
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    // Deliberately never waited for: it must outlive this process.
    #[allow(clippy::zombie_processes)]
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watchdog");
}

const HBA: &str = "\
local all all trust
host replication postgres 127.0.0.1/32 trust
host all postgres 127.0.0.1/32 trust
host all md5_user 127.0.0.1/32 md5
host all pgwarden_svc_md5 127.0.0.1/32 md5
host all clear_user 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
";

fn setup_sql() -> String {
    let mut sql = String::from(
        "CREATE ROLE analyst NOLOGIN; CREATE ROLE engineer NOLOGIN; CREATE ROLE other_role NOLOGIN;
         SET password_encryption = 'scram-sha-256';
         CREATE ROLE pgwarden_svc LOGIN NOINHERIT PASSWORD 'svc-secret';
         GRANT analyst, engineer, other_role TO pgwarden_svc;\n",
    );
    for (user, password) in USERS {
        let enc = if *user == "md5_user" {
            "md5"
        } else {
            "scram-sha-256"
        };
        sql.push_str(&format!(
            "SET password_encryption = '{enc}'; CREATE ROLE {user} LOGIN PASSWORD '{password}';\n"
        ));
    }
    // `[pool] isolation = "role"`: each mapped role's own login, as
    // `pgwarden migrate` makes them (password derived from the service
    // password), so role-isolated gateways serve every database.
    sql.push_str("SET password_encryption = 'scram-sha-256';\n");
    for role in ["analyst", "engineer", "other_role"] {
        let login = format!("pgwarden_svc_{role}");
        let password = pgwarden::auth::logins::derived_password(SERVICE_PASSWORD, &login);
        sql.push_str(&format!(
            "CREATE ROLE {login} LOGIN NOINHERIT PASSWORD '{password}'; GRANT {role} TO {login};\n"
        ));
    }
    sql.push_str(
        "SET password_encryption = 'md5';
         CREATE ROLE pgwarden_svc_md5 LOGIN NOINHERIT PASSWORD 'svc-secret';
         GRANT analyst, engineer, other_role TO pgwarden_svc_md5;",
    );
    sql
}

const APP_SQL: &str = "
GRANT CREATE, USAGE ON SCHEMA public TO analyst, engineer;
CREATE TABLE items (id int PRIMARY KEY, owner text, payload bytea);
GRANT SELECT, INSERT, UPDATE, DELETE ON items TO analyst, engineer;
CREATE TABLE guard_t (id int, role text);
-- A function the DBA created that changes identity from inside: no static
-- guard can see it; verify = transaction catches it.
CREATE FUNCTION sneaky_switch() RETURNS text LANGUAGE sql
  AS $$ SELECT pg_catalog.set_config('role', 'engineer', false) $$;
REVOKE ALL ON FUNCTION sneaky_switch() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sneaky_switch() TO analyst;
GRANT SELECT, INSERT, UPDATE, DELETE ON guard_t TO analyst, engineer;
";
