//! Retention, as an operator runs it: `pgwarden audit archive` on a
//! stopped gateway's store, and the gateway's own archiving of a running
//! one (`[audit] archive_dir`): sled lets one process hold a store, so the
//! gateway that holds it moves its old records itself, on its own task,
//! beside the writer (which only ever touches the tail).
//!
//! Invariant: a record not yet shipped (when the store has a shipping
//! position) or not yet durable is never archived; see [`super::archive`]
//! for the rest.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use time::OffsetDateTime;

use super::archive::{archive_store, Manifest};
use super::cli::{
    code_of, fail, parse_time, store_path, StoreArgs, EXIT_FAILURE, EXIT_OK, EXIT_USAGE,
};
use super::ship::{shipped, Source};
use super::store::open_db;

/// `pgwarden audit archive`.
#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Archive the records written before TS (RFC 3339), whole runs of
    /// them; the run holding the last record always stays.
    #[arg(long, value_name = "TS", value_parser = parse_time)]
    pub before: OffsetDateTime,
    /// The archive file to write (it must not exist).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
}

/// Runs `audit archive`; returns the exit code.
pub fn archive(args: &ArchiveArgs) -> i32 {
    const CMD: &str = "archive";
    if !args.store.archives.is_empty() {
        return fail(
            CMD,
            EXIT_USAGE,
            "--archive is for reading; archive takes a store",
        );
    }
    let path = match store_path(&args.store) {
        Ok(path) => path,
        Err(m) => return fail(CMD, EXIT_USAGE, m),
    };
    if !path.join("db").is_file() {
        return fail(
            CMD,
            EXIT_USAGE,
            format_args!("no audit store at {}", path.display()),
        );
    }
    let db = match open_db(&path, super::store::READER_CACHE_BYTES) {
        Ok(db) => db,
        Err(e @ super::AuditError::Locked { .. }) => {
            return fail(
                CMD,
                EXIT_FAILURE,
                format_args!("{e}; a running gateway archives its own store ([audit] archive_dir)"),
            )
        }
        Err(e) => return fail(CMD, code_of(&e), e),
    };
    let keep_after = shipped(&db).unwrap_or(u64::MAX);
    let instance = super::StoreReader::instance_of(&db);
    match archive_store(
        &db,
        args.before,
        keep_after,
        &args.output,
        instance.as_deref(),
    ) {
        Ok(Some(manifest)) => {
            println!("{}", summary(&manifest, &args.output));
            EXIT_OK
        }
        Ok(None) => {
            println!(
                "nothing to archive before {} (records not yet shipped, and the last run, stay)",
                super::record::format_ts(args.before)
            );
            EXIT_OK
        }
        Err(e) => fail(CMD, code_of(&e), e),
    }
}

fn summary(manifest: &Manifest, path: &std::path::Path) -> String {
    format!(
        "archived records {}..={} ({} records, head {}) to {}; the store now starts at seq {}",
        manifest.first_seq,
        manifest.last_seq,
        manifest.records,
        manifest.head,
        path.display(),
        manifest.last_seq + 1
    )
}

/// What the gateway's archiving needs.
pub struct Retention {
    pub dir: PathBuf,
    pub after: Duration,
    pub interval: Duration,
    pub instance: Option<String>,
    /// Records wait for the shipper before they may leave the store.
    pub shipping: bool,
}

/// Archives, every `interval`, the records older than `after` into new
/// files in `dir`, until the audit log stops.
pub fn spawn(source: Source, retention: Retention) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(retention.interval).await;
            if source.counters.stopped.load(Ordering::Acquire) {
                return;
            }
            let Some(db) = source.db.get() else {
                continue;
            };
            let durable = source.counters.durable.load(Ordering::Acquire);
            let keep_after = if retention.shipping {
                shipped(&db).unwrap_or(0).min(durable)
            } else {
                durable
            };
            let before = OffsetDateTime::now_utc() - retention.after;
            let dir = retention.dir.clone();
            let instance = retention.instance.clone();
            // File and tree work: off the runtime's workers.
            let done = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let name = format!(
                    "{}-{}.pgwarchive",
                    instance.as_deref().unwrap_or("pgwarden"),
                    OffsetDateTime::now_utc().unix_timestamp_nanos()
                );
                let path = dir.join(name);
                archive_store(&db, before, keep_after, &path, instance.as_deref())
                    .map(|m| m.map(|m| summary(&m, &path)))
                    .map_err(|e| e.to_string())
            })
            .await;
            match done {
                Ok(Ok(Some(summary))) => tracing::info!("audit retention: {summary}"),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "audit retention failed"),
                Err(e) => tracing::error!(error = %e, "audit retention failed"),
            }
        }
    });
}
