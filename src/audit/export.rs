//! `audit export`: streams the store as JSON lines or CSV, joined (one line
//! per statement, see [`super::join`]) or raw (one line per record, exactly
//! as stored), with filters.
//!
//! Invariant: the export streams. It holds one record at a time (raw) or the
//! join window (bounded by [`ExportOptions::max_window_bytes`]) plus sled's
//! page cache (bounded when the store is opened by [`StoreReader`]), so its
//! memory does not grow with the store.
//!
//! Columns, in this order, in both formats: [`FIELDS`]. JSON lines use the
//! canonical encoding of [`super::record`] (absent = `null`, but an absent
//! `tx` is left out); a raw JSON line
//! is the stored value itself. CSV is RFC 4180 with a header row; an absent
//! value is an empty field and an empty string is `""`, `params` is its
//! JSON array text.

use std::io::Write;

use time::OffsetDateTime;

use super::join::{Joiner, Line};
use super::reader::StoreReader;
use super::record::{parse_ts, write_json_value, Kind, Record, Value, FIELDS};
use super::store::decode;
use super::AuditError;

/// Default bound of the join window.
pub const DEFAULT_MAX_WINDOW_BYTES: usize = 16 * 1024 * 1024;

/// Output format of `audit export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Jsonl,
    /// RFC 4180 CSV with a header row.
    Csv,
    /// Aligned columns for a person (time, client, role, database, status,
    /// duration, statement), one line per statement.
    Table,
}

/// Which lines to write. In a joined export the filters apply to the
/// statement's `query` record (its `ts`, user, database).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Lines with `ts >= since` (inclusive).
    pub since: Option<OffsetDateTime>,
    /// Lines with `ts < until` (exclusive).
    pub until: Option<OffsetDateTime>,
    /// Lines whose `client_user` is this.
    pub user: Option<String>,
    /// Lines whose `database` is this.
    pub database: Option<String>,
    /// Lines of this kind.
    pub kind: Option<Kind>,
}

impl Filter {
    /// Whether `record` is to be written. A `ts` that does not parse matches
    /// no time filter (it is still written when there is none).
    pub fn matches(&self, record: &Record) -> bool {
        if self.kind.is_some_and(|k| k != record.kind) {
            return false;
        }
        if self
            .user
            .as_ref()
            .is_some_and(|u| record.client_user.as_deref() != Some(u.as_str()))
        {
            return false;
        }
        if self
            .database
            .as_ref()
            .is_some_and(|d| record.database.as_deref() != Some(d.as_str()))
        {
            return false;
        }
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Ok(ts) = parse_ts(&record.ts) else {
            return false;
        };
        self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts < u)
    }
}

/// Everything `export` needs besides the store and the output.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub format: Format,
    /// One line per record, exactly as stored, instead of one per statement.
    pub raw: bool,
    pub filter: Filter,
    /// Bound of the join window (see [`super::join`]).
    pub max_window_bytes: usize,
    /// `table`: cut lines to this many columns (0: whole).
    pub width: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            format: Format::Jsonl,
            raw: false,
            filter: Filter::default(),
            max_window_bytes: DEFAULT_MAX_WINDOW_BYTES,
            width: 0,
        }
    }
}

/// What an export did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportSummary {
    /// Records read from the store.
    pub records: u64,
    /// Lines written (after filters; the CSV header not counted).
    pub lines: u64,
}

/// Streams `reader` to `out` as `options` say.
pub fn export<W: Write>(
    reader: &StoreReader,
    options: &ExportOptions,
    out: W,
) -> Result<ExportSummary, AuditError> {
    let mut sink = Sink::new(options.format, out, false, options.width)?;
    let mut lines = 0;
    let records = each_line(reader, options, |line| {
        sink.write(line.record(), line.raw(), None)?;
        lines += 1;
        Ok(())
    })?;
    sink.finish()?;
    Ok(ExportSummary { records, lines })
}

/// Calls `emit` with each line of `reader` that `options` select, in the
/// order an export writes them; returns how many records were read.
pub(super) fn each_line(
    reader: &StoreReader,
    options: &ExportOptions,
    mut emit: impl FnMut(Line) -> Result<(), AuditError>,
) -> Result<u64, AuditError> {
    let mut records = 0;
    let mut keep = |line: Line| -> Result<(), AuditError> {
        if options.filter.matches(line.record()) {
            emit(line)?;
        }
        Ok(())
    };
    let mut joiner = (!options.raw).then(|| Joiner::new(reader, options.max_window_bytes));
    for entry in reader.scan_from(1) {
        let (seq, raw) = entry?;
        let record = decode(seq, &raw)?;
        records += 1;
        match joiner.as_mut() {
            Some(joiner) => joiner.push(record, raw, &mut keep)?,
            None => keep(Line::AsStored(record, raw))?,
        }
    }
    if let Some(joiner) = joiner {
        joiner.finish(&mut keep)?;
    }
    Ok(records)
}

fn out_err(source: std::io::Error) -> AuditError {
    AuditError::Io {
        context: "cannot write the export".into(),
        source,
    }
}

/// Where lines go, as JSON lines or CSV.
pub(super) enum Sink<W: Write> {
    Jsonl(std::io::BufWriter<W>),
    Csv(std::io::BufWriter<W>),
    /// Aligned lines cut to a width (0: whole).
    Table(std::io::BufWriter<W>, usize),
}

/// One CSV row (RFC 4180): an absent value is an empty field, an empty
/// string is `""`, and a field holding a quote, comma, CR or LF is quoted
/// with its quotes doubled. The csv crate quotes by one rule for all
/// fields, so it cannot tell the first two apart.
fn write_csv_row<'a>(
    out: &mut impl Write,
    cells: impl Iterator<Item = Option<std::borrow::Cow<'a, str>>>,
) -> std::io::Result<()> {
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        let Some(text) = cell else {
            continue;
        };
        if text.is_empty() || text.contains(['"', ',', '\r', '\n']) {
            out.write_all(b"\"")?;
            out.write_all(text.replace('"', "\"\"").as_bytes())?;
            out.write_all(b"\"")?;
        } else {
            out.write_all(text.as_bytes())?;
        }
    }
    out.write_all(b"\n")
}

impl<W: Write> Sink<W> {
    /// A sink writing to `out`; with `instances`, every line starts with the
    /// gateway instance it came from (an `instance` column first).
    pub(super) fn new(
        format: Format,
        out: W,
        instances: bool,
        width: usize,
    ) -> Result<Sink<W>, AuditError> {
        Ok(match format {
            Format::Table => {
                let mut w = std::io::BufWriter::with_capacity(64 * 1024, out);
                let head = super::table::header(width);
                let head = if instances {
                    format!("instance  {head}")
                } else {
                    head
                };
                writeln!(w, "{head}").map_err(out_err)?;
                Sink::Table(w, width)
            }
            Format::Jsonl => Sink::Jsonl(std::io::BufWriter::with_capacity(256 * 1024, out)),
            Format::Csv => {
                let mut w = std::io::BufWriter::with_capacity(256 * 1024, out);
                let first = instances.then(|| "instance".into());
                let header = first.into_iter().chain(FIELDS.iter().map(|f| (*f).into()));
                write_csv_row(&mut w, header.map(Some)).map_err(out_err)?;
                Sink::Csv(w)
            }
        })
    }

    /// Writes one line; `raw` (the stored value) is written as is in JSON,
    /// after `"instance"` when one is given.
    pub(super) fn write(
        &mut self,
        record: &Record,
        raw: Option<&[u8]>,
        instance: Option<&str>,
    ) -> Result<(), AuditError> {
        match self {
            Sink::Jsonl(w) => {
                let own;
                let bytes = match raw {
                    Some(bytes) => bytes,
                    None => {
                        own = record.to_stored_bytes();
                        &own
                    }
                };
                match instance {
                    Some(id) => w.write_all(&super::ship::message::with_instance(bytes, id, None)),
                    None => w.write_all(bytes),
                }
                .and_then(|()| w.write_all(b"\n"))
                .map_err(out_err)
            }
            Sink::Table(w, width) => {
                let row = super::table::row(record, *width);
                match instance {
                    Some(id) => writeln!(w, "{id:<8}  {row}"),
                    None => writeln!(w, "{row}"),
                }
                .map_err(out_err)
            }
            Sink::Csv(w) => {
                let values = record.values();
                // The instance is data too (a store's or an archive's).
                let first = instance.map(|id| csv_field(&Value::Str(id)));
                let cells = first.into_iter().chain(values.iter().map(csv_field));
                write_csv_row(w, cells).map_err(out_err)
            }
        }
    }

    pub(super) fn finish(self) -> Result<(), AuditError> {
        match self {
            Sink::Jsonl(mut w) | Sink::Csv(mut w) | Sink::Table(mut w, _) => {
                w.flush().map_err(out_err)
            }
        }
    }
}

fn csv_field<'a>(value: &Value<'a>) -> Option<std::borrow::Cow<'a, str>> {
    Some(match value {
        Value::Null => return None,
        // A cell a spreadsheet would read as a formula is prefixed with `'`
        // (OWASP's rule for CSV injection): statement text is the client's.
        Value::Str(s) if s.starts_with(['=', '+', '-', '@', '\t', '\r']) => format!("'{s}").into(),
        Value::Str(s) => (*s).into(),
        Value::UInt(n) => n.to_string().into(),
        Value::Int(n) => n.to_string().into(),
        Value::List(_) => {
            let mut s = String::new();
            write_json_value(&mut s, value);
            s.into()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Event, Status};
    use crate::audit::testutil::{build_store, query, result, sample_store};
    use serde_json::Value as Json;

    fn run(dir: &std::path::Path, options: &ExportOptions) -> String {
        let reader = StoreReader::open(dir).unwrap();
        let mut out = Vec::new();
        export(&reader, options, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn json_lines(dir: &std::path::Path, options: &ExportOptions) -> Vec<Json> {
        run(dir, options)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn seqs(lines: &[Json]) -> Vec<u64> {
        lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect()
    }

    fn sample() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        sample_store(dir.path());
        dir
    }

    fn filtered(filter: Filter, raw: bool) -> ExportOptions {
        ExportOptions {
            raw,
            filter,
            ..ExportOptions::default()
        }
    }

    #[test]
    fn joined_export_folds_results_into_their_queries() {
        let dir = sample();
        let lines = json_lines(dir.path(), &ExportOptions::default());
        assert_eq!(seqs(&lines), vec![1, 2, 3, 4, 7, 8, 9, 10, 12]);
        let q3 = &lines[2];
        assert_eq!(q3["statement"], "select 1");
        assert_eq!(q3["status"], "ok");
        assert_eq!(q3["command_tag"], "SELECT 1");
        assert_eq!(q3["rows"], 1);
        assert_eq!(q3["duration_us"], 42);
        assert_eq!(q3["ref_seq"], 6);
        assert_eq!(q3["ts"], "2026-11-27T10:00:02.000000Z");
        let q4 = &lines[3];
        assert_eq!(q4["status"], "error");
        assert_eq!(q4["sqlstate"], "42P01");
        assert_eq!(q4["message"], "relation \"nope\" does not exist");
        let q7 = &lines[4];
        assert_eq!(q7["status"], "unknown");
        assert_eq!(q7["ref_seq"], Json::Null);
        assert_eq!(q7["command_tag"], Json::Null);
        // Every column is present, absent ones as null (but `tx`, written
        // only when present: these sample results carry none).
        let keys: Vec<&str> = lines[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected: Vec<&str> = FIELDS.iter().copied().filter(|f| *f != "tx").collect();
        expected.sort_unstable();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        assert_eq!(keys_sorted, expected);
    }

    #[test]
    fn raw_export_is_the_stored_records() {
        let dir = sample();
        let text = run(dir.path(), &filtered(Filter::default(), true));
        let reader = StoreReader::open(dir.path()).unwrap();
        let stored: Vec<String> = reader
            .scan_from(1)
            .map(|e| String::from_utf8(e.unwrap().1.to_vec()).unwrap())
            .collect();
        assert_eq!(text.lines().collect::<Vec<_>>(), stored);
        assert_eq!(stored.len(), 12);
    }

    #[test]
    fn csv_has_a_header_and_quotes_per_rfc_4180() {
        let dir = sample();
        let options = ExportOptions {
            format: Format::Csv,
            ..ExportOptions::default()
        };
        let text = run(dir.path(), &options);
        assert!(text.starts_with("seq,ts,kind,session_id,client_user,role,database,"));
        assert!(text.contains("\"select 'a,\"\"b\"\"'\n, 2\""), "{text}");
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header, FIELDS);
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 9);
        let bob = &rows[7];
        assert_eq!(&bob[0], "10");
        assert_eq!(&bob[9], "select 'a,\"b\"'\n, 2");
        assert_eq!(&bob[10], "[\"x\",null]");
        assert_eq!(&bob[11], "ok");
        assert_eq!(&bob[12], "", "absent sqlstate is an empty field");
    }

    #[test]
    fn csv_tells_absent_from_empty() {
        let mut out = Vec::new();
        let cells = [
            None,
            Some(""),
            Some("a,b"),
            Some("x\"y"),
            Some("plain"),
            None,
        ];
        write_csv_row(&mut out, cells.into_iter().map(|c| c.map(Into::into))).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            ",\"\",\"a,b\",\"x\"\"y\",plain,\n"
        );
    }

    #[test]
    fn filters_select_lines() {
        let dir = sample();
        let ts = |s| Some(crate::audit::record::parse_ts(s).unwrap());
        let by_user = Filter {
            user: Some("bob".into()),
            ..Filter::default()
        };
        assert_eq!(
            seqs(&json_lines(dir.path(), &filtered(by_user, false))),
            vec![9, 10]
        );
        let by_db = Filter {
            database: Some("app".into()),
            kind: Some(Kind::Query),
            ..Filter::default()
        };
        assert_eq!(
            seqs(&json_lines(dir.path(), &filtered(by_db, false))),
            vec![3, 4, 7]
        );
        let since = Filter {
            since: ts("2026-11-27T11:00:00Z"),
            ..Filter::default()
        };
        assert_eq!(
            seqs(&json_lines(dir.path(), &filtered(since, false))),
            vec![9, 10, 12]
        );
        let until = Filter {
            until: ts("2026-11-27T12:00:03+02:00"),
            ..Filter::default()
        };
        assert_eq!(
            seqs(&json_lines(dir.path(), &filtered(until, false))),
            vec![1, 2, 3]
        );
        let results = Filter {
            kind: Some(Kind::Result),
            ..Filter::default()
        };
        assert_eq!(
            seqs(&json_lines(dir.path(), &filtered(results, true))),
            vec![5, 6, 11]
        );
    }

    #[test]
    fn a_tiny_window_gives_the_same_join_by_lookups() {
        let dir = sample();
        let normal = run(dir.path(), &ExportOptions::default());
        let tiny = ExportOptions {
            max_window_bytes: 1,
            ..ExportOptions::default()
        };
        assert_eq!(run(dir.path(), &tiny), normal);
    }

    #[test]
    fn open_queries_at_the_end_and_orphan_results_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ts = "2026-11-27T10:00:00.000000Z";
        build_store(
            dir.path(),
            vec![
                (ts, Event::new(Kind::GatewayStart)),
                (ts, query("a", "d", "select 1")),
                (ts, result("a", "d", 99, Status::Ok, Some("SELECT 1"))),
                (ts, query("a", "d", "select 2")),
                (ts, result("a", "d", 4, Status::Ok, Some("SELECT 1"))),
            ],
        );
        for max_window_bytes in [1, DEFAULT_MAX_WINDOW_BYTES] {
            let options = ExportOptions {
                max_window_bytes,
                ..ExportOptions::default()
            };
            let lines = json_lines(dir.path(), &options);
            assert_eq!(seqs(&lines), vec![1, 2, 3, 4]);
            assert_eq!(lines[1]["status"], "unknown");
            assert_eq!(lines[2]["kind"], "result", "orphan result kept as stored");
            assert_eq!(lines[3]["ref_seq"], 5);
        }
    }
}
