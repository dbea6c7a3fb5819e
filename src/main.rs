//! The `pgwarden` command line: parses arguments and calls into the library.
//! Exit status: 0 success, 1 failure, 2 usage or configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use pgwarden::config::Config;
use pgwarden::server::Gateway;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "pgwarden",
    version,
    about = "PostgreSQL gateway with per-client identity and a tamper-evident audit log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(short = 'c', long = "config", default_value = "pgwarden.toml")]
        config: PathBuf,
    },
    /// Start a throwaway PostgreSQL with two demo users and row-level
    /// security, and pgwarden in front of it; Ctrl-C removes everything.
    Demo,
    /// Offline audit-log tools (work on the store directory).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Apply the database-side migrations and prepare the service user.
    Migrate {
        #[arg(short = 'c', long = "config", default_value = "pgwarden.toml")]
        config: PathBuf,
        /// A superuser (or database owner) connection URL, e.g. postgres://postgres@host/db.
        #[arg(long = "admin-url")]
        admin_url: String,
        /// Make a new client-tag signing key; the old one stays accepted for --grace-seconds.
        #[arg(long = "rotate-tag-key")]
        rotate_tag_key: bool,
        /// How long a rotated-out tag key is still accepted.
        #[arg(long = "grace-seconds", default_value_t = 3600)]
        grace_seconds: u64,
        /// Register an audit instance for the service user to anchor (as
        /// `[audit] instance` is); repeat it for several gateways.
        #[arg(long = "register-instance", value_name = "ID")]
        register_instances: Vec<String>,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Export records as JSON lines or CSV, one line per statement with its outcome.
    Export(pgwarden::audit::cli::ExportArgs),
    /// Walk the hash chain; exit 1 naming the first record that does not match.
    Verify(pgwarden::audit::cli::VerifyArgs),
    /// Counts by kind, user and database, first and last timestamps, chain head.
    Stats(pgwarden::audit::cli::StatsArgs),
    /// The latest statements as an aligned table (time, client, role, status, statement).
    Tail(pgwarden::audit::cli::TailArgs),
    /// Move the records written before a time into an archive file (retention).
    Archive(pgwarden::audit::retention::ArchiveArgs),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate the policy files.
    Check {
        #[arg(short = 'c', long = "config", default_value = "pgwarden.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let code = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Policy {
            command: PolicyCommand::Check { config },
        } => policy_check(&config),
        Command::Migrate {
            config,
            admin_url,
            rotate_tag_key,
            grace_seconds,
            register_instances,
        } => migrate(
            &config,
            &admin_url,
            pgwarden::migrate::Options {
                rotate_tag_key,
                grace: std::time::Duration::from_secs(grace_seconds),
                register_instances,
            },
        ),
        Command::Demo => demo(),
        Command::Audit { command } => {
            use pgwarden::audit::cli;
            let code = match command {
                AuditCommand::Export(args) => cli::export(&args),
                AuditCommand::Verify(args) => cli::verify(&args),
                AuditCommand::Stats(args) => cli::stats(&args),
                AuditCommand::Archive(args) => pgwarden::audit::retention::archive(&args),
                AuditCommand::Tail(args) => cli::tail(&args),
            };
            code.clamp(0, 255) as u8
        }
    };
    ExitCode::from(code)
}

fn load_config(path: &std::path::Path) -> Result<Config, u8> {
    Config::load(path).map_err(|e| {
        eprintln!("pgwarden: {e}");
        2
    })
}

fn init_logging(log: &pgwarden::config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGWARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match log.format {
        pgwarden::config::LogFormat::Json => builder.json().init(),
        pgwarden::config::LogFormat::Text => builder.init(),
    }
}

fn serve(path: &std::path::Path) -> u8 {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log);
    raise_fd_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        builder.worker_threads(config.server.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgwarden: cannot start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async {
        let gateway = match Gateway::build(config) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("pgwarden: {e}");
                return 2;
            }
        };
        let listener = match gateway.listen().await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("pgwarden: {e}");
                return 1;
            }
        };
        tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "pgwarden serving");
        let _ = gateway.shared().config_path.set(path.to_path_buf());
        spawn_reload_on_sighup(gateway.shared().clone(), path.to_path_buf());
        // On a worker thread, a spawned session starts on the accepting
        // worker without waking another thread (`block_on` runs on none).
        match tokio::spawn(gateway.serve(listener, shutdown_signal())).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("pgwarden: the accept loop failed: {e}");
                1
            }
        }
    })
}

/// Every client holds a socket: raise the soft open-files limit to the hard
/// one (commonly 1024 -> 1048576), as PgBouncer does, so 1,000 clients fit.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("could not raise the open-files limit");
            }
        }
    }
}

/// SIGHUP re-reads the configuration and the policies; anything invalid
/// keeps what is in force.
fn spawn_reload_on_sighup(shared: std::sync::Arc<pgwarden::session::Shared>, path: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; policy reload disabled");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match shared.reload(&path) {
                Ok(restart) if restart.is_empty() => {
                    tracing::info!("configuration and policies reloaded")
                }
                Ok(restart) => tracing::warn!(
                    "configuration and policies reloaded; changed keys that need a restart: {}",
                    restart.join(", ")
                ),
                Err(e) => tracing::error!(
                    "reload failed, keeping the configuration and policies in force: {e}"
                ),
            }
        }
    });
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn policy_check(path: &std::path::Path) -> u8 {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let policy = match pgwarden::identity::policy::Policy::load_dir(&config.identity.policy_dir) {
        Ok(policy) => policy,
        Err(e) => {
            eprintln!("pgwarden: {e}");
            return 2;
        }
    };
    println!(
        "{}: {} rule(s) parse",
        config.identity.policy_dir.display(),
        policy.rules().len()
    );
    println!("policy digest {}", policy.digest());
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(pgwarden::migrate::check_roles(&config, &policy)) {
        Err(e) => {
            println!("backend not reachable as the service user ({e}); role checks skipped");
            0
        }
        Ok(problems) if problems.is_empty() => {
            println!("every mapped role exists and the service user can assume it");
            0
        }
        Ok(problems) => {
            for p in &problems {
                println!("problem: {p}");
            }
            1
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("pgwarden: cannot start the runtime: {e}");
            1
        })
}

fn migrate(path: &std::path::Path, admin_url: &str, options: pgwarden::migrate::Options) -> u8 {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(pgwarden::migrate::run(&config, admin_url, options)) {
        Ok(report) => {
            println!(
                "migrations applied; pgwarden.client_user() reads {}",
                config.identity.client_user_setting
            );
            for role in &report.granted {
                println!("granted {role} to {}", config.backend.service_user);
            }
            for role in &report.missing_roles {
                println!("warning: role {role} does not exist");
            }
            match report.tag_key {
                Some((id, true)) => println!("client tags are signed with the new key {id}"),
                Some((id, false)) => println!("client tags are signed with key {id}"),
                None => {}
            }
            if config.backend.service_password.is_none() {
                println!("warning: no [backend] service_password: no tag key or tag reader login was made (both derive from it), so the gateway sets the plain client tag");
            }
            for login in &report.logins {
                println!("login {login} ready");
            }
            for instance in &report.instances_registered {
                println!(
                    "audit instance {instance} may be anchored by {}",
                    config.backend.service_user
                );
            }
            for problem in &report.login_problems {
                println!("warning: {problem}");
            }
            for policy in &report.per_row_policies {
                println!("note: policy {policy} verifies pgwarden.client_user() for every row; (SELECT pgwarden.client_user()) verifies it once per statement");
            }
            match &report.statements_hidden {
                Some(Ok(())) => println!(
                    "pg_prepared_statements hidden from non-superusers (transaction pooling shares statements)"
                ),
                Some(Err(why)) => println!(
                    "warning: could not hide pg_prepared_statements (run migrate as a superuser): {why}"
                ),
                None => {}
            }
            let hidden = !matches!(report.statements_hidden, Some(Err(_)));
            if report.missing_roles.is_empty() && report.login_problems.is_empty() && hidden {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("pgwarden: {e}");
            1
        }
    }
}

fn demo() -> u8 {
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(pgwarden::demo::run_demo()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pgwarden demo: {e}");
            1
        }
    }
}
