//! `pgwarden audit tail --console URL [--follow]`: a running gateway's
//! latest records, read through its admin console (`SHOW LOG AFTER seq`),
//! since sled lets only the gateway open its store.
//!
//! The records come as stored and are shown one line per record (a
//! statement and its result are two lines here: the result may not exist
//! yet). The console's own `SHOW LOG` polls are recorded in the audit like
//! every console command, and left out of this view.

use std::time::Duration;

use super::record::{Kind, Record};

/// What to show.
pub struct View {
    /// Of the first batch, the latest this many.
    pub lines: usize,
    pub follow: bool,
    pub user: Option<String>,
    pub kind: Option<Kind>,
}

/// Prints the records the console at `url` serves, as `args` asks.
pub fn tail_console(args: &View, url: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(run(args, url))
}

async fn run(args: &View, url: &str) -> Result<(), String> {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| format!("cannot open the console: {e}"))?;
    let width = super::table::terminal_width();
    let mut out = std::io::stdout();
    if !print(&mut out, &super::table::header(width))? {
        return Ok(());
    }
    let mut after: Option<u64> = None;
    loop {
        let first = after.is_none();
        let sql = match after {
            None => "SHOW LOG".to_string(),
            Some(seq) => format!("SHOW LOG AFTER {seq}"),
        };
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await
            .map_err(|e| format!("the console refused SHOW LOG: {e}"))?;
        let mut lines = Vec::new();
        for row in rows {
            let seq: String = row.try_get(0).map_err(|e| e.to_string())?;
            let stored: String = row.try_get(1).map_err(|e| e.to_string())?;
            after = seq.parse().ok().or(after);
            let record = Record::from_stored_bytes(stored.as_bytes())
                .map_err(|e| format!("record {seq} cannot be read: {e}"))?;
            if shown(args, &record) {
                lines.push(super::table::row(&record, width));
            }
        }
        // Of the first batch, the latest `-n`.
        let skip = if first {
            lines.len().saturating_sub(args.lines)
        } else {
            0
        };
        for line in &lines[skip..] {
            // The reader is gone (`tail --follow | head`): done.
            if !print(&mut out, line)? {
                return Ok(());
            }
        }
        if !args.follow {
            let _ = conn.close().await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes one line; false once the reader has gone (a closed pipe).
fn print(out: &mut std::io::Stdout, line: &str) -> Result<bool, String> {
    use std::io::Write;
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(format!("cannot write: {e}")),
    }
}

/// Whether `record` belongs in the view: the filters, and never the
/// console's own `SHOW LOG` polls.
fn shown(args: &View, record: &Record) -> bool {
    let poll = record.database.as_deref() == Some("pgwarden")
        && record
            .statement
            .as_deref()
            .is_some_and(|s| s.trim_start().to_ascii_uppercase().starts_with("SHOW LOG"));
    !poll
        && args.kind.is_none_or(|k| k == record.kind)
        && args
            .user
            .as_ref()
            .is_none_or(|u| record.client_user.as_deref() == Some(u.as_str()))
}
