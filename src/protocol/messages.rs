//! Builders for the backend messages pgwarden originates, and borrowed views
//! of the few messages it must read while relaying.
//!
//! Invariant: `PgError::encode` is the only way the gateway's own errors are
//! put on the wire, so every such error carries a severity (localized `S`
//! and non-localized `V`), a SQLSTATE from [`super::sqlstate`] and a message.

use bytes::{BufMut, BytesMut};

use super::frame::{ProtocolError, Reader};
use super::sqlstate::SqlState;

/// Severity of an error the gateway reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends after this message.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error raised by the gateway itself, ready to become an `ErrorResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
}

impl PgError {
    pub fn error(code: SqlState, message: impl Into<String>) -> PgError {
        PgError {
            severity: Severity::Error,
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn fatal(code: SqlState, message: impl Into<String>) -> PgError {
        PgError {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> PgError {
        self.detail = Some(detail.into());
        self
    }

    pub fn is_fatal(&self) -> bool {
        self.severity == Severity::Fatal
    }

    /// Appends the `ErrorResponse` frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let severity = self.severity.as_str();
        let mut fields: Vec<(u8, &str)> = vec![
            (b'S', severity),
            (b'V', severity),
            (b'C', self.code.code()),
            (b'M', &self.message),
        ];
        if let Some(detail) = &self.detail {
            fields.push((b'D', detail));
        }
        write_frame(out, b'E', |body| {
            for (field, value) in fields {
                body.put_u8(field);
                put_cstr(body, value.as_bytes());
            }
            body.put_u8(0);
        });
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity.as_str(),
            self.code.code(),
            self.message
        )
    }
}

impl ProtocolError {
    /// The FATAL a client gets for bytes that are not the protocol: the one
    /// mapping of protocol errors to the wire.
    pub fn to_fatal(&self) -> PgError {
        let code = match self {
            ProtocolError::UnsupportedVersion { .. } => super::sqlstate::FEATURE_NOT_SUPPORTED,
            _ => super::sqlstate::PROTOCOL_VIOLATION,
        };
        PgError::fatal(code, self.to_string())
    }
}

/// Appends a frame with `tag`, filling its body with `body` and patching the length.
pub fn write_frame(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - len_at) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    // A NUL inside would end the string early on the wire; the gateway's own
    // texts never contain one, but relayed names might, so cut there.
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    out.put_slice(&s[..end]);
    out.put_u8(0);
}

/// `ReadyForQuery` with the given transaction status (`I`, `T` or `E`).
/// The (name, value) of every `ParameterStatus` among the whole messages
/// in `buf` (a greeting on its way to a client).
pub fn parameter_statuses(buf: &[u8]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = buf;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        let total = 1 + len.max(4) as usize;
        let Some(frame) = rest.get(..total) else {
            break;
        };
        if frame[0] == b'S' {
            let mut r = Reader::new(&frame[5..], "ParameterStatus");
            if let (Ok(name), Ok(value)) = (r.cstr(), r.cstr()) {
                found.push((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                ));
            }
        }
        rest = &rest[total..];
    }
    found
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    write_frame(out, b'Z', |b| b.put_u8(status));
}

/// `BackendKeyData` with the gateway's own key for this client.
pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    write_frame(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

/// `ParameterStatus`.
pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    write_frame(out, b'S', |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

/// A simple `Query` message.
pub fn query(out: &mut BytesMut, sql: &str) {
    write_frame(out, b'Q', |b| put_cstr(b, sql.as_bytes()));
}

/// A `Parse` of the unnamed statement, without parameter types.
pub fn parse(out: &mut BytesMut, sql: &str) {
    write_frame(out, b'P', |b| {
        put_cstr(b, b"");
        put_cstr(b, sql.as_bytes());
        b.put_i16(0);
    });
}

/// `Sync`.
pub fn sync(out: &mut BytesMut) {
    write_frame(out, b'S', |_| {});
}

pub fn flush(out: &mut BytesMut) {
    write_frame(out, b'H', |_| {});
}

/// `CopyFail` with a reason.
pub fn copy_fail(out: &mut BytesMut, reason: &str) {
    write_frame(out, b'f', |b| put_cstr(b, reason.as_bytes()));
}

/// `Terminate`.
pub fn terminate(out: &mut BytesMut) {
    write_frame(out, b'X', |_| {});
}

/// The fields of an `ErrorResponse` or `NoticeResponse` that the gateway reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    /// Whether PostgreSQL reported `state`.
    pub fn is(&self, state: SqlState) -> bool {
        self.code == state.code()
    }
}

/// Reads an `ErrorResponse`/`NoticeResponse` body.
pub fn parse_error_fields(body: &[u8]) -> Result<ErrorFields, ProtocolError> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut fields = ErrorFields::default();
    loop {
        let field = r.u8()?;
        if field == 0 {
            return Ok(fields);
        }
        let value = String::from_utf8_lossy(r.cstr()?).into_owned();
        match field {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
    }
}

/// An `ErrorResponse` frame with a FATAL or PANIC severity made ERROR:
/// the server connection ends, the client's session need not (the gateway
/// decides that). Every other field is kept as it is.
pub fn downgrade_fatal(frame: &[u8]) -> BytesMut {
    let mut fields = Vec::new();
    let mut rest = frame.get(5..).unwrap_or_default();
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        let value = &tail[..end];
        let value: &[u8] = match (field, value) {
            (b'S' | b'V', b"FATAL" | b"PANIC") => b"ERROR",
            _ => value,
        };
        fields.push((field, value));
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    let mut out = BytesMut::new();
    write_frame(&mut out, b'E', |b| {
        for (field, value) in fields {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
    out
}

/// The command tag of a `CommandComplete` and the row count it reports, if any.
/// A `DataRow`'s columns as text (lossy UTF-8; `None` for NULL), for the
/// gateway's own small queries.
pub fn text_columns(body: &[u8]) -> Result<Vec<Option<String>>, ProtocolError> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.i16()?;
    let mut columns = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32()?;
        columns.push(if len < 0 {
            None
        } else {
            Some(String::from_utf8_lossy(r.bytes(len as usize)?).into_owned())
        });
    }
    Ok(columns)
}

/// A `FunctionCallResponse` as the audit log shows it: an `int4` (the
/// large-object functions' OIDs, descriptors, positions and counts) as a
/// number, NULL, and other values by their length only (`loread`'s data is
/// the object's content, not evidence of the call).
pub fn function_result(body: &[u8]) -> Option<String> {
    let len = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    let value = body.get(4..)?;
    let text_number = !value.is_empty()
        && value.len() <= 11
        && value
            .iter()
            .enumerate()
            .all(|(i, b)| b.is_ascii_digit() || (i == 0 && *b == b'-'));
    Some(match (len, value) {
        (-1, _) => "NULL".into(),
        // A text-format result (libpq asks for binary).
        _ if text_number => String::from_utf8_lossy(value).into_owned(),
        (4, [a, b, c, d]) => i32::from_be_bytes([*a, *b, *c, *d]).to_string(),
        (n, _) => format!("{n} bytes"),
    })
}

/// PostgreSQL's errors for a prepared statement that DDL made unusable:
/// its result type changed, or an object it used is gone. Preparing it
/// again cures both.
pub fn stale_plan(fields: &ErrorFields) -> bool {
    (fields.is(super::sqlstate::backend::FEATURE_NOT_SUPPORTED)
        && fields
            .message
            .starts_with("cached plan must not change result type"))
        || (fields.is(super::sqlstate::backend::INTERNAL_ERROR)
            && fields.message.starts_with("cache lookup failed"))
}

pub fn parse_command_complete(body: &[u8]) -> Result<(String, Option<u64>), ProtocolError> {
    let tag = Reader::new(body, "CommandComplete").cstr()?;
    let tag = String::from_utf8_lossy(tag).into_owned();
    let rows = tag
        .rsplit(' ')
        .next()
        .and_then(|last| last.parse::<u64>().ok())
        .filter(|_| tag.contains(' '));
    Ok((tag, rows))
}

/// A borrowed view of a `Parse` message.
pub struct ParseView<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
}

pub fn parse_parse(body: &[u8]) -> Result<ParseView<'_>, ProtocolError> {
    let mut r = Reader::new(body, "Parse");
    let name = r.cstr()?;
    let query = r.cstr()?;
    Ok(ParseView { name, query })
}

/// A borrowed view of a `Bind` message; parameters are decoded on demand.
pub struct BindView<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    rest: &'a [u8],
}

impl<'a> BindView<'a> {
    /// Parameter values rendered for the audit log: text-format values as
    /// text in the client's `encoding` ([`super::encoding::client_text`]),
    /// binary ones as hex, NULL as `None`.
    pub fn params_for_audit(&self, encoding: &str) -> Result<Vec<Option<String>>, ProtocolError> {
        formatted_values(&mut Reader::new(self.rest, "Bind"), encoding)
    }

    /// The bytes of parameter `index` (0-based) as sent, whatever its
    /// format; `None` for NULL; an error if the message has fewer.
    pub fn raw_param(&self, index: usize) -> Result<Option<&'a [u8]>, ProtocolError> {
        let mut r = Reader::new(self.rest, "Bind");
        let nformats = r.count16()?;
        r.bytes(nformats * 2)?;
        let nparams = r.count16()?;
        if index >= nparams {
            return Err(ProtocolError::Malformed { what: "Bind" });
        }
        for _ in 0..index {
            let len = r.i32()?;
            r.bytes(len.max(0) as usize)?;
        }
        let len = r.i32()?;
        Ok(if len < 0 {
            None
        } else {
            Some(r.bytes(len as usize)?)
        })
    }
}

/// Format codes, then values, as `Bind` and `FunctionCall` carry them:
/// text values as text in `encoding`, binary ones as `\x` and hex.
fn formatted_values(
    r: &mut Reader<'_>,
    encoding: &str,
) -> Result<Vec<Option<String>>, ProtocolError> {
    let nformats = r.count16()?;
    let mut formats = Vec::with_capacity(nformats);
    for _ in 0..nformats {
        formats.push(r.i16()?);
    }
    let nparams = r.count16()?;
    let mut out = Vec::with_capacity(nparams);
    for i in 0..nparams {
        let len = r.i32()?;
        if len < 0 {
            out.push(None);
            continue;
        }
        let value = r.bytes(len as usize)?;
        let format = match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => *formats.get(i).unwrap_or(&0),
        };
        out.push(Some(if format == 1 {
            format!("\\x{}", hex::encode(value))
        } else {
            super::encoding::client_text(value, encoding).into_owned()
        }));
    }
    Ok(out)
}

/// The arguments of a `FunctionCall` (after its function OID), as the
/// audit log shows them.
pub fn function_call_args(
    body: &[u8],
    encoding: &str,
) -> Result<Vec<Option<String>>, ProtocolError> {
    let mut r = Reader::new(body, "FunctionCall");
    r.i32()?;
    formatted_values(&mut r, encoding)
}

pub fn parse_bind(body: &[u8]) -> Result<BindView<'_>, ProtocolError> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let rest = r.bytes(r.remaining())?;
    Ok(BindView {
        portal,
        statement,
        rest,
    })
}

/// The portal name of an `Execute`.
pub fn parse_execute(body: &[u8]) -> Result<&[u8], ProtocolError> {
    Reader::new(body, "Execute").cstr()
}

/// `Close` or `Describe`: the kind (`S` statement or `P` portal) and the name.
pub fn parse_close_or_describe(body: &[u8]) -> Result<(u8, &[u8]), ProtocolError> {
    let mut r = Reader::new(body, "Close");
    let kind = r.u8()?;
    Ok((kind, r.cstr()?))
}

/// The text of a simple `Query`.
pub fn parse_query(body: &[u8]) -> Result<&[u8], ProtocolError> {
    Reader::new(body, "Query").cstr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::sqlstate;

    #[test]
    fn error_response_round_trips() {
        let mut out = BytesMut::new();
        PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "bye").encode(&mut out);
        assert_eq!(out[0], b'E');
        let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
        let fields = parse_error_fields(&out[5..]).unwrap();
        assert_eq!(fields.severity, "FATAL");
        assert_eq!(fields.code, "57P01");
        assert_eq!(fields.message, "bye");
    }

    #[test]
    fn command_complete_rows() {
        assert_eq!(
            parse_command_complete(b"INSERT 0 5\0").unwrap(),
            ("INSERT 0 5".into(), Some(5))
        );
        assert_eq!(
            parse_command_complete(b"SELECT 1\0").unwrap(),
            ("SELECT 1".into(), Some(1))
        );
        assert_eq!(
            parse_command_complete(b"BEGIN\0").unwrap(),
            ("BEGIN".into(), None)
        );
    }

    #[test]
    fn bind_params_text_binary_and_null() {
        let mut body = BytesMut::new();
        body.put_slice(b"p\0s\0");
        body.put_i16(2);
        body.put_i16(0);
        body.put_i16(1);
        body.put_i16(3);
        body.put_i32(2);
        body.put_slice(b"hi");
        body.put_i32(2);
        body.put_slice(&[0xde, 0xad]);
        body.put_i32(-1);
        body.put_i16(0);
        let bind = parse_bind(&body).unwrap();
        assert_eq!(bind.portal, b"p");
        assert_eq!(bind.statement, b"s");
        assert_eq!(
            bind.params_for_audit("UTF8").unwrap(),
            vec![Some("hi".into()), Some("\\xdead".into()), None]
        );
    }

    #[test]
    fn truncated_bind_is_an_error_not_a_panic() {
        let bind = parse_bind(b"\0\0\0\x01").unwrap();
        assert!(bind.params_for_audit("UTF8").is_err());
    }
}
