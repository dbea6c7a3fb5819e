//! The offline `pgwarden audit export|verify|stats` commands: argument
//! structs for clap and functions that return the process exit code.
//!
//! Invariant: these functions never panic and never create a store; each
//! failure is one line on stderr and exit code 1 (failure: tampering, a
//! locked or unreadable store, an output error) or 2 (usage or
//! configuration error: no store given, bad config, a directory that holds
//! no store, a meaningless option combination).

use std::fmt::Display;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use time::OffsetDateTime;

use super::export::{self, ExportOptions, Filter, Format, DEFAULT_MAX_WINDOW_BYTES};
use super::record::{parse_ts, Kind};
use super::sources::{self, Source};
use super::{stats as stats_mod, verify as verify_mod, AuditError};
use crate::config::Config;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: failure (tampering found, store locked or unreadable, output error).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: i32 = 2;

/// The config file looked for in the working directory when neither
/// `--store` nor `-c` is given.
pub const DEFAULT_CONFIG_FILE: &str = "pgwarden.toml";

/// Where the store is: `--store DIR`, or `[audit] store` of `-c FILE`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Audit store directory; repeat it to read several gateways' stores
    /// together (each its own chain; export merges them by time).
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub store: Vec<PathBuf>,
    /// pgwarden.toml whose `[audit] store` to use (default: ./pgwarden.toml).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// An archive of older records (`pgwarden audit archive`), read before
    /// its store as one chain (with several stores: the store of the
    /// archive's instance); repeat it. Without a store, archives are read
    /// by themselves.
    #[arg(long = "archive", value_name = "FILE")]
    pub archives: Vec<PathBuf>,
}

/// `pgwarden audit export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    pub format: Format,
    /// One line per record exactly as stored, instead of one line per statement.
    #[arg(long)]
    pub raw: bool,
    /// Only lines with ts >= TS (RFC 3339, e.g. 2026-11-27T00:00:00Z).
    #[arg(long, value_name = "TS", value_parser = parse_time)]
    pub since: Option<OffsetDateTime>,
    /// Only lines with ts < TS (RFC 3339).
    #[arg(long, value_name = "TS", value_parser = parse_time)]
    pub until: Option<OffsetDateTime>,
    /// Only lines of this client user.
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// Only lines of this database.
    #[arg(long, value_name = "D")]
    pub database: Option<String>,
    /// Only lines of this kind (query, session_start, ...; result needs --raw).
    #[arg(long, value_name = "K")]
    pub kind: Option<Kind>,
    /// Write to FILE instead of stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

impl ExportArgs {
    /// A plain joined JSON-lines export of `store` to stdout.
    pub fn for_store(store: &std::path::Path) -> ExportArgs {
        ExportArgs {
            store: StoreArgs {
                store: vec![store.to_path_buf()],
                config: None,
                archives: Vec::new(),
            },
            format: Format::Jsonl,
            raw: false,
            since: None,
            until: None,
            user: None,
            database: None,
            kind: None,
            output: None,
        }
    }
}

/// `pgwarden audit verify`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Also compare the store with the checkpoints anchored in this
    /// database (`pgwarden.audit_checkpoints`, a PostgreSQL URL).
    #[arg(long, value_name = "URL")]
    pub anchors: Option<String>,
    /// The instance whose anchors to compare (default: the store's own id).
    #[arg(long, value_name = "ID", requires = "anchors")]
    pub instance: Option<String>,
}

/// `pgwarden audit stats`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
}

pub(super) fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    parse_ts(s).map_err(|e| format!("not an RFC 3339 timestamp like 2026-11-27T00:00:00Z ({e})"))
}

pub(super) fn fail(command: &str, code: i32, message: impl Display) -> i32 {
    eprintln!("pgwarden audit {command}: {message}");
    code
}

/// The exit code for an error of the audit module.
pub(super) fn code_of(e: &AuditError) -> i32 {
    match e {
        AuditError::NotFound { .. } => EXIT_USAGE,
        _ => EXIT_FAILURE,
    }
}

/// Resolves the store directory from `--store`, `-c` or ./pgwarden.toml
/// (one store; see [`store_paths`] for several).
pub fn store_path(args: &StoreArgs) -> Result<PathBuf, String> {
    match store_paths(args)?.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err("give one store".into()),
    }
}

/// The stores `args` name: every `--store`, or `[audit] store` of `-c` or
/// ./pgwarden.toml; none when only archives are given.
pub fn store_paths(args: &StoreArgs) -> Result<Vec<PathBuf>, String> {
    if !args.store.is_empty() {
        return Ok(args.store.clone());
    }
    let config = match &args.config {
        Some(file) => file.clone(),
        None if !args.archives.is_empty() => return Ok(Vec::new()),
        None => {
            let file = PathBuf::from(DEFAULT_CONFIG_FILE);
            if !file.is_file() {
                return Err(format!(
                    "no audit store given: use --store DIR or -c FILE (there is no {DEFAULT_CONFIG_FILE} in the current directory)"
                ));
            }
            file
        }
    };
    Config::load(&config)
        .map(|c| vec![c.audit.store])
        .map_err(|e| e.to_string())
}

/// The chains `args` name: one per instance.
fn open(command: &str, args: &StoreArgs) -> Result<Vec<Source>, i32> {
    let stores = store_paths(args).map_err(|m| fail(command, EXIT_USAGE, m))?;
    sources::open(&stores, &args.archives).map_err(|e| fail(command, code_of(&e), e))
}

/// Runs `audit export`; returns the exit code.
pub fn export(args: &ExportArgs) -> i32 {
    const CMD: &str = "export";
    if args.kind == Some(Kind::Result) && !args.raw {
        return fail(
            CMD,
            EXIT_USAGE,
            "--kind result needs --raw (a joined export folds results into their query lines)",
        );
    }
    let options = ExportOptions {
        format: args.format,
        raw: args.raw,
        filter: Filter {
            since: args.since,
            until: args.until,
            user: args.user.clone(),
            database: args.database.clone(),
            kind: args.kind,
        },
        max_window_bytes: DEFAULT_MAX_WINDOW_BYTES,
    };
    let sources = match open(CMD, &args.store) {
        Ok(sources) => sources,
        Err(code) => return code,
    };
    let write = |out: &mut dyn Write| match sources.as_slice() {
        [one] => export::export(&one.reader, &options, out),
        several => sources::export_merged(several, &options, out),
    };
    let result = match &args.output {
        Some(path) => match File::create(path) {
            Ok(mut file) => write(&mut file),
            Err(e) => {
                return fail(
                    CMD,
                    EXIT_FAILURE,
                    format_args!("cannot create {}: {e}", path.display()),
                )
            }
        },
        None => write(&mut std::io::stdout().lock()),
    };
    match result {
        Ok(_) => EXIT_OK,
        // `export | head` closed the pipe: the reader has what it wanted.
        Err(AuditError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            EXIT_OK
        }
        Err(e) => fail(CMD, code_of(&e), e),
    }
}

/// Runs `audit verify`; returns the exit code (1 names the first bad seq).
pub fn verify(args: &VerifyArgs) -> i32 {
    verify_to(args, &mut std::io::stdout().lock())
}

/// Runs `audit stats`; returns the exit code.
pub fn stats(args: &StatsArgs) -> i32 {
    stats_to(args, &mut std::io::stdout().lock())
}

fn verify_to(args: &VerifyArgs, out: &mut dyn Write) -> i32 {
    const CMD: &str = "verify";
    let sources = match open(CMD, &args.store) {
        Ok(sources) => sources,
        Err(code) => return code,
    };
    if sources.len() > 1 && args.instance.is_some() {
        return fail(
            CMD,
            EXIT_USAGE,
            "--instance is for one store; each of several is checked against its own",
        );
    }
    // Each chain is checked, and every failure named, before the exit code.
    let mut report = String::new();
    let mut code = EXIT_OK;
    for source in &sources {
        let prefix = if sources.len() > 1 {
            format!("instance {}: ", source.name())
        } else {
            String::new()
        };
        match verify_one(args, source) {
            Ok(lines) => report.extend(lines.lines().map(|l| format!("{prefix}{l}\n"))),
            Err((failed, why)) => code = code.max(fail(CMD, failed, format_args!("{prefix}{why}"))),
        }
    }
    let printed = print_to(CMD, out, &report);
    code.max(printed)
}

/// The report on one chain, or the exit code and why it failed.
fn verify_one(args: &VerifyArgs, source: &Source) -> Result<String, (i32, String)> {
    let reader = &source.reader;
    let intact = match verify_mod::verify(reader) {
        Ok(Ok(intact)) => intact,
        Ok(Err(bad)) => return Err((EXIT_FAILURE, bad.to_string())),
        Err(e) => return Err((code_of(&e), e.to_string())),
    };
    let mut report = format!(
        "audit chain intact: {} records, chain head {}\n",
        intact.records, intact.head
    );
    if intact.first > 1 {
        report.push_str(&format!(
            "records 1..={} are archived and were not checked here: give their archives with --archive\n",
            intact.first - 1
        ));
    }
    if let Some(url) = &args.anchors {
        let Some(instance) = args.instance.clone().or_else(|| source.instance.clone()) else {
            return Err((
                EXIT_USAGE,
                "this store has no instance id (it was never shipped or anchored): pass --instance"
                    .into(),
            ));
        };
        match super::anchor::check(reader, url, &instance) {
            Ok(Ok(line)) => report.push_str(&line),
            Ok(Err(tampered)) => return Err((EXIT_FAILURE, tampered)),
            Err(e) => return Err((EXIT_FAILURE, e)),
        }
    }
    Ok(report)
}

fn stats_to(args: &StatsArgs, out: &mut dyn Write) -> i32 {
    const CMD: &str = "stats";
    let sources = match open(CMD, &args.store) {
        Ok(sources) => sources,
        Err(code) => return code,
    };
    let mut report = String::new();
    for source in &sources {
        if sources.len() > 1 {
            report.push_str(&format!("instance {}:\n", source.name()));
        }
        match stats_mod::collect(&source.reader) {
            Ok(stats) => report.push_str(&stats.to_string()),
            Err(e) => return fail(CMD, code_of(&e), e),
        }
    }
    print_to(CMD, out, &report)
}

/// Writes a command's report; a closed pipe is not an error.
fn print_to(command: &str, out: &mut dyn Write, text: &str) -> i32 {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => EXIT_OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => fail(
            command,
            EXIT_FAILURE,
            format_args!("cannot write the report: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::store::{key, SledStore};
    use crate::audit::testutil::{child_arg, sample_store, spawn_child_in, tamper};
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        Export(ExportArgs),
        Verify(VerifyArgs),
        Stats(StatsArgs),
    }

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let argv = std::iter::once("audit").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.command)
    }

    fn store_args(dir: &std::path::Path) -> StoreArgs {
        StoreArgs {
            store: vec![dir.to_path_buf()],
            config: None,
            archives: Vec::new(),
        }
    }

    fn export_args(dir: &std::path::Path) -> ExportArgs {
        match parse(&["export", "--store", dir.to_str().unwrap()]).unwrap() {
            Command::Export(args) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn arguments_parse_as_documented() {
        let cmd = parse(&[
            "export",
            "-c",
            "x.toml",
            "--format",
            "csv",
            "--raw",
            "--since",
            "2026-11-27T00:00:00Z",
            "--until",
            "2026-11-28T00:00:00+01:00",
            "--user",
            "alice",
            "--database",
            "app",
            "--kind",
            "session_start",
            "-o",
            "out.csv",
        ])
        .unwrap();
        let Command::Export(args) = cmd else {
            panic!("not export");
        };
        assert_eq!(args.format, Format::Csv);
        assert!(args.raw);
        assert_eq!(args.kind, Some(Kind::SessionStart));
        assert_eq!(
            args.store.config.as_deref(),
            Some(std::path::Path::new("x.toml"))
        );
        assert!(
            parse(&["verify", "--store", "a", "-c", "b"]).is_err(),
            "mutually exclusive"
        );
        assert!(parse(&["export", "--since", "yesterday"]).is_err());
        assert!(parse(&["export", "--kind", "querry"]).is_err());
        assert!(parse(&["export", "--format", "xml"]).is_err());
        assert!(matches!(parse(&["stats"]).unwrap(), Command::Stats(_)));
    }

    #[test]
    fn verify_exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        sample_store(dir.path());
        let args = VerifyArgs {
            store: store_args(dir.path()),
            ..Default::default()
        };
        let mut out = Vec::new();
        assert_eq!(verify_to(&args, &mut out), EXIT_OK);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("audit chain intact: 12 records, chain head "),
            "{text}"
        );
        let mut out = Vec::new();
        assert_eq!(
            stats_to(
                &StatsArgs {
                    store: store_args(dir.path())
                },
                &mut out
            ),
            EXIT_OK
        );
        assert!(String::from_utf8(out).unwrap().contains("records     12\n"));
        tamper(dir.path(), |db| {
            db.remove(key(4)).unwrap();
        });
        assert_eq!(verify(&args), EXIT_FAILURE);
        let nowhere = VerifyArgs {
            store: store_args(&dir.path().join("missing")),
            ..Default::default()
        };
        assert_eq!(verify(&nowhere), EXIT_USAGE);
    }

    #[test]
    fn a_locked_store_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let _gateway = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            verify(&VerifyArgs {
                store: store_args(dir.path()),
                ..Default::default()
            }),
            EXIT_FAILURE
        );
        assert_eq!(
            stats(&StatsArgs {
                store: store_args(dir.path())
            }),
            EXIT_FAILURE
        );
        assert_eq!(export(&export_args(dir.path())), EXIT_FAILURE);
    }

    #[test]
    fn export_writes_the_output_file_and_rejects_joined_results() {
        let dir = tempfile::tempdir().unwrap();
        sample_store(dir.path());
        let out = dir.path().join("out.jsonl");
        let mut args = export_args(dir.path());
        args.output = Some(out.clone());
        assert_eq!(export(&args), EXIT_OK);
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 9);
        args.kind = Some(Kind::Result);
        assert_eq!(export(&args), EXIT_USAGE);
        args.raw = true;
        assert_eq!(export(&args), EXIT_OK);
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
        args.output = Some(dir.path().join("no/such/dir/out"));
        assert_eq!(export(&args), EXIT_FAILURE);
    }

    #[test]
    fn config_file_names_the_store() {
        let dir = tempfile::tempdir().unwrap();
        sample_store(&dir.path().join("audit"));
        let toml = dir.path().join("pgwarden.toml");
        std::fs::write(
            &toml,
            "[backend]\nservice_user = \"svc\"\n[audit]\nstore = \"audit\"\n",
        )
        .unwrap();
        let args = StoreArgs {
            store: Vec::new(),
            config: Some(toml.clone()),
            archives: Vec::new(),
        };
        assert_eq!(store_path(&args).unwrap(), dir.path().join("audit"));
        assert_eq!(
            verify_to(
                &VerifyArgs {
                    store: args,
                    ..Default::default()
                },
                &mut Vec::new()
            ),
            EXIT_OK
        );
        std::fs::write(&toml, "[audit]\nstor = \"audit\"\n").unwrap();
        let bad = StoreArgs {
            store: Vec::new(),
            config: Some(toml),
            archives: Vec::new(),
        };
        assert!(store_path(&bad).is_err());
        assert_eq!(
            verify(&VerifyArgs {
                store: bad,
                ..Default::default()
            }),
            EXIT_USAGE
        );
    }

    /// Child body: runs `audit verify` with neither `--store` nor `-c` in
    /// the working directory the parent chose, and prints the exit code.
    #[test]
    #[ignore = "runs only as a child process of other tests"]
    fn child_cli() {
        if child_arg().is_some() {
            let code = verify_to(&VerifyArgs::default(), &mut Vec::new());
            println!("@@EXIT {code}");
        }
    }

    fn exit_code_in(cwd: &std::path::Path) -> String {
        let child = spawn_child_in("audit::cli::tests::child_cli", "cli", cwd);
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (_, code) = text
            .split_once("@@EXIT ")
            .unwrap_or_else(|| panic!("{text}"));
        code.trim().lines().next().unwrap_or("").to_string()
    }

    #[test]
    fn without_store_or_config_the_working_directory_config_is_used() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(exit_code_in(dir.path()), "2");
        sample_store(&dir.path().join("pgwarden-audit"));
        std::fs::write(
            dir.path().join("pgwarden.toml"),
            "[backend]\nservice_user = \"svc\"\n",
        )
        .unwrap();
        assert_eq!(exit_code_in(dir.path()), "0");
    }
}
