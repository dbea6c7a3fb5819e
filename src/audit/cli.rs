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

/// `pgwarden audit tail`.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// How many of the latest lines.
    #[arg(short = 'n', long = "lines", default_value_t = 20)]
    pub lines: usize,
    /// Only lines of this client user.
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// Only lines of this kind (query, session_start, ...).
    #[arg(long, value_name = "K")]
    pub kind: Option<Kind>,
    /// Read a running gateway's records through its admin console (a
    /// PostgreSQL URL to database `pgwarden` as an admin), since its store
    /// cannot be opened while it runs.
    #[arg(long, value_name = "URL", conflicts_with_all = ["store", "config", "archives"])]
    pub console: Option<String>,
    /// Keep printing records as they are written: through the admin
    /// console of the gateway `-c FILE` (or ./pgwarden.toml) describes, as
    /// PGUSER with PGPASSWORD (an admin of `[admin] users`), or --console
    /// URL; with --store, from a store no gateway holds.
    #[arg(long)]
    pub follow: bool,
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
    /// Also compare the store with checkpoints: a PostgreSQL URL (as
    /// `--anchors`), or a file holding a copy of the shipped stream (its
    /// checkpoint messages, JSON or CEF, one per line).
    #[arg(long, value_name = "URL|FILE")]
    pub checkpoints: Option<String>,
    /// The Ed25519 public key that must have signed every checkpoint in the
    /// file: 64 hex digits (as the gateway logs it) or a PEM file.
    #[arg(long, value_name = "KEY", requires = "checkpoints")]
    pub public_key: Option<String>,
    /// The instance whose anchors or checkpoints to compare (default: the
    /// store's own id).
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
    /// Anchors and checkpoints of archived records not given with
    /// --archive are counted but do not fail (the store's own records are
    /// still checked). Without it they fail: a store whose oldest records
    /// were removed must not pass unnoticed.
    #[arg(long)]
    pub skip_archived: bool,
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
        // A table on a terminal is cut to its width; to a file, whole.
        width: match (args.format, &args.output) {
            (Format::Table, None) => super::table::terminal_width(),
            _ => 0,
        },
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

/// Runs `audit tail`: the latest statements as an aligned table. A store a
/// running gateway holds cannot be read (sled lets one process open it):
/// the message says so and where to look instead.
pub fn tail(args: &TailArgs) -> i32 {
    const CMD: &str = "tail";
    let view = super::follow::View {
        lines: args.lines,
        follow: args.follow,
        user: args.user.clone(),
        kind: args.kind,
    };
    let followed = match (&args.console, args.follow, args.store.store.as_slice()) {
        (Some(url), _, _) => Some(super::follow::tail_console(
            &view,
            &super::follow::Console::Url(url.clone()),
        )),
        // A store named: followed while no gateway holds it.
        (None, true, [store]) => Some(super::follow::follow_store(store, &view)),
        (None, true, []) => Some(
            console_of_config(&args.store)
                .and_then(|console| super::follow::tail_console(&view, &console)),
        ),
        (None, true, _) => Some(Err("--follow takes one store".into())),
        (None, false, _) => None,
    };
    if let Some(followed) = followed {
        return match followed {
            Ok(()) => EXIT_OK,
            Err(e) => fail(CMD, EXIT_FAILURE, e),
        };
    }
    if args.kind == Some(Kind::Result) {
        return fail(
            CMD,
            EXIT_USAGE,
            "result records are folded into their query lines",
        );
    }
    let stores = store_paths(&args.store).unwrap_or_default();
    if let Some(held) = stores.iter().find(|s| super::store::is_locked(s)) {
        return fail(
            CMD,
            EXIT_FAILURE,
            format_args!("{} is held by a running gateway (sled lets one process open a store): read it through the gateway's admin console (tail --console postgres://ADMIN@GATEWAY/pgwarden [--follow]), or tail the store once the gateway stops", held.display()),
        );
    }
    let sources = match open(CMD, &args.store) {
        Ok(sources) => sources,
        Err(code) => return code,
    };
    let options = ExportOptions {
        format: Format::Table,
        filter: Filter {
            user: args.user.clone(),
            kind: args.kind,
            ..Filter::default()
        },
        width: super::table::terminal_width(),
        ..ExportOptions::default()
    };
    let mut latest = std::collections::VecDeque::with_capacity(args.lines + 1);
    for source in &sources {
        let kept = export::each_line(&source.reader, &options, |line| {
            latest.push_back(super::table::row(line.record(), options.width));
            if latest.len() > args.lines {
                latest.pop_front();
            }
            Ok(())
        });
        if let Err(e) = kept {
            return fail(CMD, code_of(&e), e);
        }
    }
    let mut report = super::table::header(options.width);
    report.push('\n');
    for line in latest {
        report.push_str(&line);
        report.push('\n');
    }
    print_to(CMD, &mut std::io::stdout().lock(), &report)
}

/// The console of the gateway the configuration (`-c FILE`, or
/// ./pgwarden.toml) describes: the running gateway holds its store.
fn console_of_config(args: &StoreArgs) -> Result<super::follow::Console, String> {
    let file = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
    let config = Config::load(&file).map_err(|e| e.to_string())?;
    Ok(super::follow::Console::Listen(config.server.listen))
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
            format!("instance {}: ", source.shown())
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
    let is_url = |s: &str| s.starts_with("postgres://") || s.starts_with("postgresql://");
    let file = args.checkpoints.as_deref().filter(|c| !is_url(c));
    let url = args
        .anchors
        .as_deref()
        .or(args.checkpoints.as_deref().filter(|c| is_url(c)));
    if url.is_none() && file.is_none() {
        return Ok(report);
    }
    let Some(instance) = args.instance.clone().or_else(|| source.instance.clone()) else {
        return Err((
            EXIT_USAGE,
            "this store has no instance id (a gateway older than instance ids wrote it): pass --instance"
                .into(),
        ));
    };
    let key = match args
        .public_key
        .as_deref()
        .map(super::checkpoint::public_key)
    {
        Some(Ok(key)) => Some(key),
        Some(Err(e)) => return Err((EXIT_USAGE, e)),
        None => None,
    };
    let checks = [
        url.map(|url| super::anchor::check(reader, url, &instance, args.skip_archived)),
        file.map(|path| {
            let (path, key) = (path.as_ref(), key.as_deref());
            super::checkpoint::check_file(reader, path, &instance, key, args.skip_archived)
        }),
    ];
    for check in checks.into_iter().flatten() {
        match check {
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
            report.push_str(&format!("instance {}:\n", source.shown()));
        } else if source.instance.is_some() {
            report.push_str(&format!("instance    {}\n", source.shown()));
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
#[path = "cli_tests.rs"]
mod tests;
