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

/// Which console to read.
pub enum Console {
    /// A PostgreSQL URL (`--console`).
    Url(String),
    /// The console of the gateway that listens at this address (from its
    /// configuration), as `PGUSER` with `PGPASSWORD`, as libpq would.
    Listen(std::net::SocketAddr),
}

/// Prints the records the console serves, as `args` asks.
pub fn tail_console(args: &View, console: &Console) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(run(args, console))
}

async fn run(args: &View, console: &Console) -> Result<(), String> {
    use sqlx::{ConnectOptions, Connection, Row};
    let connected = match console {
        Console::Url(url) => sqlx::PgConnection::connect(url).await,
        Console::Listen(addr) => {
            let host = match addr.ip() {
                ip if ip.is_unspecified() => "127.0.0.1".to_string(),
                ip => ip.to_string(),
            };
            // PGUSER, PGPASSWORD and the rest of libpq's environment.
            sqlx::postgres::PgConnectOptions::new()
                .host(&host)
                .port(addr.port())
                // The console's virtual database (session::console).
                .database("pgwarden")
                .connect()
                .await
        }
    };
    let mut conn = connected.map_err(|e| {
        format!("cannot open the gateway's admin console (an admin of [admin] users, as PGUSER with PGPASSWORD, or --console URL): {e}")
    })?;
    let Some(mut table) = Table::start(args)? else {
        return Ok(());
    };
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
        let mut records = Vec::new();
        for row in rows {
            let seq: String = row.try_get(0).map_err(|e| e.to_string())?;
            let stored: String = row.try_get(1).map_err(|e| e.to_string())?;
            after = seq.parse().ok().or(after);
            let record = Record::from_stored_bytes(stored.as_bytes())
                .map_err(|e| format!("record {seq} cannot be read: {e}"))?;
            records.push(record);
        }
        // The reader is gone (`tail --follow | head`): done.
        if !table.batch(&records, first)? {
            return Ok(());
        }
        if !args.follow {
            let _ = conn.close().await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `tail --store DIR --follow`: the latest records, then new ones as they
/// come, read from a store no gateway holds (each look opens it briefly);
/// once a gateway holds it, says where to follow instead.
pub fn follow_store(path: &std::path::Path, args: &View) -> Result<(), String> {
    let Some(mut table) = Table::start(args)? else {
        return Ok(());
    };
    let mut after: Option<u64> = None;
    loop {
        if super::store::is_locked(path) {
            return Err(format!(
                "{} is now held by a running gateway: follow it through its console (tail -c FILE --follow, or --console URL)",
                path.display()
            ));
        }
        let reader = super::StoreReader::open(path).map_err(|e| e.to_string())?;
        let first = after.is_none();
        let mut records = Vec::new();
        for entry in reader.scan_from(after.map_or(1, |seq| seq + 1)) {
            let (seq, raw) = entry.map_err(|e| e.to_string())?;
            after = Some(seq);
            records.push(super::store::decode(seq, &raw).map_err(|e| e.to_string())?);
        }
        drop(reader);
        if !table.batch(&records, first)? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The table being followed on stdout.
struct Table<'a> {
    args: &'a View,
    width: usize,
    out: std::io::Stdout,
}

impl<'a> Table<'a> {
    /// Prints the header; `None` when the reader is already gone.
    fn start(args: &'a View) -> Result<Option<Table<'a>>, String> {
        let mut table = Table {
            args,
            width: super::table::terminal_width(),
            out: std::io::stdout(),
        };
        let header = super::table::header(table.width);
        Ok(print(&mut table.out, &header)?.then_some(table))
    }

    /// Prints the lines of `records` the view shows (of the first batch,
    /// the latest `-n`); false once the reader is gone.
    fn batch(&mut self, records: &[Record], first: bool) -> Result<bool, String> {
        let lines: Vec<String> = records
            .iter()
            .filter(|record| shown(self.args, record))
            .map(|record| super::table::row(record, self.width))
            .collect();
        let skip = match first {
            true => lines.len().saturating_sub(self.args.lines),
            false => 0,
        };
        for line in &lines[skip..] {
            if !print(&mut self.out, line)? {
                return Ok(false);
            }
        }
        Ok(true)
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
