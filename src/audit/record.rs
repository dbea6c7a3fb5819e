//! Audit records: what the gateway reports ([`Event`]), what the store keeps
//! ([`Record`]), and the one canonical byte encoding of a record.
//!
//! Invariant: a stored value is exactly [`Record::to_stored_bytes`] of the
//! record it decodes to, and its hash covers [`Record::canonical_bytes`].
//! Both are produced by the hand-written encoder below, never by a generic
//! serializer, so the bytes stay the same whatever serde_json version reads
//! them later.
//!
//! # Canonical bytes (what an auditor re-implements)
//!
//! The canonical bytes of a record are a compact UTF-8 JSON object with
//! exactly these keys, in this order, separated by `,` with no whitespace:
//!
//! `seq, ts, kind, session_id, client_user, role, database, client_addr,
//! application_name, statement, params, status, sqlstate, message,
//! command_tag, rows, duration_us, backend_pid, ref_seq, tx, prev_hash`
//!
//! Each member is `"key":value`. An absent value is `null`, except `tx`,
//! which is left out when absent (records written before it existed have
//! none). Numbers (`seq`,
//! `rows`, `duration_us`, `ref_seq`, `backend_pid`) are plain decimal
//! integers (a `-` only for a negative `backend_pid`). `params` is a JSON
//! array of strings or `null`s. Every other value is a JSON string: `"` and
//! `\` are escaped as `\"` and `\\`; U+0008, U+0009, U+000A, U+000C, U+000D
//! as `\b`, `\t`, `\n`, `\f`, `\r`; any other character below U+0020 as
//! `\u00xx` (lowercase hex); every other character, including non-ASCII and
//! `/`, is written as its UTF-8 bytes. `ts` is RFC 3339 UTC with exactly six
//! fractional digits and a `Z` (`2026-11-27T12:00:00.123456Z`); `kind` and
//! `status` and `tx` are the snake_case names; `prev_hash` is 64 lowercase hex digits.
//!
//! `hash = lowercase_hex(SHA-256(raw 32 bytes of prev_hash || canonical bytes))`.
//! The first record's `prev_hash` is 64 zeros.
//!
//! The stored value (and a `--raw` JSON line) is the canonical bytes with
//! `,"hash":"<hash>"` inserted before the final `}`.

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What happened. Serialized as the snake_case name (`session_start`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    SessionStart,
    AuthFailed,
    Denied,
    Query,
    Result,
    GuardBlocked,
    IdentityViolation,
    Cancel,
    SessionEnd,
    GatewayStart,
    GatewayStop,
    /// `[backend] hosts`: the primary moved to another host.
    BackendFailover,
}

impl Kind {
    /// Every kind, in declaration order (for help texts and stats).
    pub const ALL: [Kind; 12] = [
        Kind::SessionStart,
        Kind::AuthFailed,
        Kind::Denied,
        Kind::Query,
        Kind::Result,
        Kind::GuardBlocked,
        Kind::IdentityViolation,
        Kind::Cancel,
        Kind::SessionEnd,
        Kind::GatewayStart,
        Kind::GatewayStop,
        Kind::BackendFailover,
    ];

    /// The name used in records, exports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SessionStart => "session_start",
            Kind::AuthFailed => "auth_failed",
            Kind::Denied => "denied",
            Kind::Query => "query",
            Kind::Result => "result",
            Kind::GuardBlocked => "guard_blocked",
            Kind::IdentityViolation => "identity_violation",
            Kind::Cancel => "cancel",
            Kind::SessionEnd => "session_end",
            Kind::GatewayStart => "gateway_start",
            Kind::GatewayStop => "gateway_stop",
            Kind::BackendFailover => "backend_failover",
        }
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown record kind {s:?} (one of {})", names.join(", "))
            })
    }
}

/// Outcome of a statement. Serialized as `ok`, `error` or `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Error,
    /// The statement never reported completion (e.g. the gateway died).
    Unknown,
}

impl Status {
    /// The name used in records and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::Unknown => "unknown",
        }
    }
}

/// What became of the transaction a statement ran in, on its `result`
/// record: whether its effects persisted. Serialized as `committed`,
/// `rolled_back`, `prepared` (`PREPARE TRANSACTION`: decided later by
/// `COMMIT PREPARED` or `ROLLBACK PREPARED`) or `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxOutcome {
    Committed,
    RolledBack,
    Prepared,
    Unknown,
}

impl TxOutcome {
    /// The name used in records and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            TxOutcome::Committed => "committed",
            TxOutcome::RolledBack => "rolled_back",
            TxOutcome::Prepared => "prepared",
            TxOutcome::Unknown => "unknown",
        }
    }
}

/// What the gateway fills in; `seq`, `ts`, `prev_hash` and `hash` are
/// assigned by the writer so that chain order is seq order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub session_id: Option<Arc<str>>,
    pub client_user: Option<Arc<str>>,
    pub role: Option<Arc<str>>,
    pub database: Option<Arc<str>>,
    pub client_addr: Option<Arc<str>>,
    pub application_name: Option<Arc<str>>,
    pub statement: Option<String>,
    /// Bound parameters (text as text, binary as hex); only with `log_parameters`.
    pub params: Option<Vec<Option<String>>>,
    pub status: Option<Status>,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
    pub command_tag: Option<String>,
    pub rows: Option<u64>,
    pub duration_us: Option<u64>,
    pub backend_pid: Option<i32>,
    /// On a `result`: the `seq` of its `query`.
    pub ref_seq: Option<u64>,
    /// On a `result`: what became of the statement's transaction.
    pub tx: Option<TxOutcome>,
    /// Not stored: on a `result` of a statement PostgreSQL skipped, the
    /// ticket of the statement whose error made it skip; the writer names
    /// that statement's seq in `message`.
    pub cause: Option<u64>,
    /// Not stored: lets a `result` find its `query`'s seq in the writer when
    /// the appender did not wait to learn it.
    pub link: Link,
    /// When the event happened (the gateway received the statement, the
    /// result arrived...): the record's `ts`. Set by [`Event::new`].
    pub at: OffsetDateTime,
}

/// A ticket that ties a `result` to its `query` inside the writer, so an
/// appender need not wait for the query's seq (see [`super::Auditor::ticket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Link {
    #[default]
    None,
    /// A `query`: the writer remembers its seq under this ticket.
    Query(u64),
    /// A `result`: its `ref_seq` is the seq remembered under this ticket.
    Result(u64),
}

impl Event {
    /// An event of `kind` with every other field absent.
    pub fn new(kind: Kind) -> Event {
        Event {
            kind,
            session_id: None,
            client_user: None,
            role: None,
            database: None,
            client_addr: None,
            application_name: None,
            statement: None,
            params: None,
            status: None,
            sqlstate: None,
            message: None,
            command_tag: None,
            rows: None,
            duration_us: None,
            backend_pid: None,
            ref_seq: None,
            tx: None,
            cause: None,
            link: Link::None,
            at: OffsetDateTime::now_utc(),
        }
    }
}

/// One stored audit record: an [`Event`] plus its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    /// RFC 3339 UTC with microseconds, as written by [`format_ts`].
    pub ts: String,
    pub kind: Kind,
    pub session_id: Option<Arc<str>>,
    pub client_user: Option<Arc<str>>,
    pub role: Option<Arc<str>>,
    pub database: Option<Arc<str>>,
    pub client_addr: Option<Arc<str>>,
    pub application_name: Option<Arc<str>>,
    pub statement: Option<String>,
    pub params: Option<Vec<Option<String>>>,
    pub status: Option<Status>,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
    pub command_tag: Option<String>,
    pub rows: Option<u64>,
    pub duration_us: Option<u64>,
    pub backend_pid: Option<i32>,
    pub ref_seq: Option<u64>,
    /// Absent from records written before it existed, and from all but
    /// statement outcomes.
    #[serde(default)]
    pub tx: Option<TxOutcome>,
    /// Hex hash of the record before this one (64 zeros for seq 1).
    pub prev_hash: String,
    /// Hex SHA-256 over `prev_hash` bytes and [`Record::canonical_bytes`].
    pub hash: String,
}

/// Column names of records and exports, in canonical order (`hash` last).
pub const FIELDS: [&str; 22] = [
    "seq",
    "ts",
    "kind",
    "session_id",
    "client_user",
    "role",
    "database",
    "client_addr",
    "application_name",
    "statement",
    "params",
    "status",
    "sqlstate",
    "message",
    "command_tag",
    "rows",
    "duration_us",
    "backend_pid",
    "ref_seq",
    "tx",
    "prev_hash",
    "hash",
];

/// What precedes each field's value in the canonical bytes: `{` or `,`, then
/// its quoted name and `:` (so the writer appends one string per field).
const MEMBER_OPENINGS: [&str; 22] = [
    "{\"seq\":",
    ",\"ts\":",
    ",\"kind\":",
    ",\"session_id\":",
    ",\"client_user\":",
    ",\"role\":",
    ",\"database\":",
    ",\"client_addr\":",
    ",\"application_name\":",
    ",\"statement\":",
    ",\"params\":",
    ",\"status\":",
    ",\"sqlstate\":",
    ",\"message\":",
    ",\"command_tag\":",
    ",\"rows\":",
    ",\"duration_us\":",
    ",\"backend_pid\":",
    ",\"ref_seq\":",
    ",\"tx\":",
    ",\"prev_hash\":",
    ",\"hash\":",
];
/// Where `tx` is in [`FIELDS`]: the one member left out when absent.
const TX_FIELD: usize = 19;

/// One field value, as the encoders see it.
pub enum Value<'a> {
    Null,
    Str(&'a str),
    UInt(u64),
    Int(i64),
    List(&'a [Option<String>]),
}

impl Record {
    /// Builds the record for `event` at `seq`, without its hash yet.
    pub fn from_event(event: Event, seq: u64, ts: String, prev_hash: String) -> Record {
        Record {
            seq,
            ts,
            kind: event.kind,
            session_id: event.session_id,
            client_user: event.client_user,
            role: event.role,
            database: event.database,
            client_addr: event.client_addr,
            application_name: event.application_name,
            statement: event.statement,
            params: event.params,
            status: event.status,
            sqlstate: event.sqlstate,
            message: event.message,
            command_tag: event.command_tag,
            rows: event.rows,
            duration_us: event.duration_us,
            backend_pid: event.backend_pid,
            ref_seq: event.ref_seq,
            tx: event.tx,
            prev_hash,
            hash: String::new(),
        }
    }

    /// The values of [`FIELDS`], in the same order.
    pub fn values(&self) -> [Value<'_>; 22] {
        fn s<T: AsRef<str>>(v: &Option<T>) -> Value<'_> {
            v.as_ref().map_or(Value::Null, |v| Value::Str(v.as_ref()))
        }
        fn u(v: Option<u64>) -> Value<'static> {
            v.map_or(Value::Null, Value::UInt)
        }
        [
            Value::UInt(self.seq),
            Value::Str(&self.ts),
            Value::Str(self.kind.as_str()),
            s(&self.session_id),
            s(&self.client_user),
            s(&self.role),
            s(&self.database),
            s(&self.client_addr),
            s(&self.application_name),
            s(&self.statement),
            self.params.as_deref().map_or(Value::Null, Value::List),
            self.status
                .map_or(Value::Null, |st| Value::Str(st.as_str())),
            s(&self.sqlstate),
            s(&self.message),
            s(&self.command_tag),
            u(self.rows),
            u(self.duration_us),
            self.backend_pid
                .map_or(Value::Null, |p| Value::Int(i64::from(p))),
            u(self.ref_seq),
            self.tx.map_or(Value::Null, |t| Value::Str(t.as_str())),
            Value::Str(&self.prev_hash),
            Value::Str(&self.hash),
        ]
    }

    /// The bytes the hash covers: every field but `hash` (see module docs).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        self.canonical_string().into_bytes()
    }

    /// [`Record::canonical_bytes`] as the `String` they are built in.
    pub fn canonical_string(&self) -> String {
        let values = self.values();
        let mut out = String::with_capacity(stored_size_hint(&values));
        let without_hash = FIELDS.len() - 1;
        for (i, (opening, value)) in MEMBER_OPENINGS
            .iter()
            .zip(values)
            .take(without_hash)
            .enumerate()
        {
            // `tx` is written only when present, so records that have none
            // (all of them before it existed) keep their canonical bytes.
            if i == TX_FIELD && matches!(value, Value::Null) {
                continue;
            }
            out.push_str(opening);
            write_json_value(&mut out, &value);
        }
        out.push('}');
        out
    }

    /// The stored value: the canonical bytes plus `hash`, one JSON object.
    pub fn to_stored_bytes(&self) -> Vec<u8> {
        Record::stored_from_canonical(self.canonical_string(), &self.hash)
    }

    /// The stored value from already computed canonical bytes (saves the
    /// writer a second encoding): `,"hash":"<hash>"` before the final `}`.
    pub fn stored_from_canonical(canonical: String, hash: &str) -> Vec<u8> {
        let mut out = canonical;
        out.pop();
        out.push_str(",\"hash\":");
        write_json_string(&mut out, hash);
        out.push('}');
        out.into_bytes()
    }

    /// Decodes a stored value; unknown keys are an error.
    pub fn from_stored_bytes(bytes: &[u8]) -> Result<Record, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// About how many bytes the stored value of a record with `values` takes
/// (exactly, unless its strings need escapes), so that it is built without
/// growing its buffer.
fn stored_size_hint(values: &[Value<'_>; 22]) -> usize {
    // Keys, quotes, colons and commas of every field, and "hash":"<64 hex>".
    const FIXED: usize = 360;
    let value_size = |value: &Value<'_>| match value {
        Value::Null => 4,
        Value::Str(s) => s.len(),
        Value::UInt(_) | Value::Int(_) => 20,
        Value::List(items) => items
            .iter()
            .map(|item| item.as_ref().map_or(4, |s| s.len() + 3))
            .sum(),
    };
    FIXED + values.iter().map(value_size).sum::<usize>()
}

/// Appends `value` as canonical JSON (see module docs).
pub fn write_json_value(out: &mut String, value: &Value<'_>) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Str(s) => write_json_string(out, s),
        Value::UInt(n) => out.push_str(itoa::Buffer::new().format(*n)),
        Value::Int(n) => out.push_str(itoa::Buffer::new().format(*n)),
        Value::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match item {
                    Some(s) => write_json_string(out, s),
                    None => out.push_str("null"),
                }
            }
            out.push(']');
        }
    }
}

/// Appends `s` as a JSON string with the canonical escapes. Every byte that
/// needs escaping is ASCII, so scanning bytes never splits a character.
pub fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    // Most values need no escape at all: one plain scan, one copy. The scan
    // has no early exit so that it compiles to vector instructions.
    let needs_escape = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    if !bytes.iter().fold(false, |any, &b| any | needs_escape(b)) {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            b'\t' => "\\t",
            b'\n' => "\\n",
            0x0c => "\\f",
            b'\r' => "\\r",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Format of `ts`: RFC 3339 UTC with exactly six fractional digits.
const TS_FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

/// `t` in the record timestamp format (converted to UTC).
///
/// The writer stamps every record, so the usual case (a four-digit year) is
/// written digit by digit; `time`'s general formatter, which [`TS_FORMAT`]
/// drives, costs ten times as much and writes the same bytes (a unit test
/// compares the two).
pub fn format_ts(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return t
            .format(TS_FORMAT)
            .unwrap_or_else(|_| "1970-01-01T00:00:00.000000Z".to_string());
    }
    let mut out = [0u8; 27];
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, u8::from(t.month()).into());
    put(8, 2, t.day().into());
    put(11, 2, t.hour().into());
    put(14, 2, t.minute().into());
    put(17, 2, t.second().into());
    put(20, 6, t.microsecond());
    for (at, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        out[at] = sep;
    }
    std::str::from_utf8(&out)
        .expect("digits and separators are ASCII")
        .to_owned()
}

/// Parses any RFC 3339 timestamp (records' `ts` and `--since`/`--until`).
pub fn parse_ts(s: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
}

#[cfg(test)]
#[path = "record_tests.rs"]
mod tests;
