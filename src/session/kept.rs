//! Session-level settings in transaction pooling (`[pool] session_set`):
//! which settings a statement may change for the rest of the session, so
//! the gateway can keep them for the client (read back from the server
//! when the transaction ends, then applied to every connection that serves
//! it) or refuse the statement.
//!
//! Reportable settings (`TimeZone`, `DateStyle`...) are not listed: the
//! server reports their changes, and they already follow the client
//! ([`crate::session::state::TRACKED`]). Settings changed by code pgwarden
//! cannot see into (a function, a `DO` block) are not listed either.

use bytes::BytesMut;

use crate::backend::conn::{BackendError, ServerConn};
use crate::identity::lexer::{tokens, Kind, Token};
use crate::protocol::frame::{ProtocolError, Reader};
use crate::protocol::messages;
use crate::session::state::TRACKED;

/// At most this many settings are kept per client: each is applied on every
/// connection that serves it.
pub const MAX_KEPT: usize = 64;

/// The names of the non-reportable settings `sql` may change beyond its
/// transaction: `SET [SESSION] name ...`, `SET SCHEMA`, `SET XML OPTION`,
/// `SET SESSION CHARACTERISTICS`, `RESET name`, and `set_config('name',
/// ..., <anything but true>)`. Unquoted names are lower-cased.
pub fn session_sets(sql: &[u8]) -> Vec<String> {
    static SETS: crate::identity::keywords::Keywords =
        crate::identity::keywords::Keywords::new(&["set", "reset"]);
    if !SETS.in_text(sql) {
        return Vec::new();
    }
    let toks = tokens(sql);
    let t = Toks { sql, toks: &toks };
    let mut names = Vec::new();
    let mut at_start = true;
    for i in 0..toks.len() {
        if at_start {
            if t.word(i, "set") {
                set_command(&t, i + 1, &mut names);
            } else if t.word(i, "reset") {
                names.extend(t.name(i + 1).map(|(name, _)| name));
            }
        }
        if t.word(i, "set_config") && t.punct(i + 1, "(") {
            names.extend(set_config_call(&t, i + 2));
        }
        at_start = t.punct(i, ";");
    }
    names.retain(|n| !reportable(n) && n != "all");
    names.sort();
    names.dedup();
    names
}

fn reportable(name: &str) -> bool {
    TRACKED.iter().any(|t| t.eq_ignore_ascii_case(name))
}

/// The names a `SET` changes for the session, its arguments from `i`.
fn set_command(t: &Toks, i: usize, names: &mut Vec<String>) {
    let i = if t.word(i, "session") { i + 1 } else { i };
    if t.word(i, "local") {
        return;
    }
    if t.word(i, "characteristics") {
        names.extend(
            [
                "default_transaction_isolation",
                "default_transaction_read_only",
                "default_transaction_deferrable",
            ]
            .map(String::from),
        );
        return;
    }
    let special = [
        ("schema", "search_path"),
        ("xml", "xmloption"),
        // Reportable or refused: nothing to keep.
        ("time", ""),
        ("names", ""),
        ("transaction", ""),
        ("constraints", ""),
        ("role", ""),
        ("authorization", ""),
    ];
    if let Some((_, name)) = special.iter().find(|(kw, _)| t.word(i, kw)) {
        if !name.is_empty() {
            names.push(name.to_string());
        }
        return;
    }
    if let Some((name, next)) = t.name(i) {
        if t.word(next, "to") || t.op(next, "=") {
            names.push(name);
        }
    }
}

/// `set_config(` arguments from `i`: the name, unless the third argument
/// is `true` (the change ends with the transaction).
fn set_config_call(t: &Toks, i: usize) -> Option<String> {
    let name = t.string(i)?;
    let mut depth = 0usize;
    let mut commas = 0;
    let mut j = i;
    while j < t.toks.len() {
        if t.punct(j, "(") {
            depth += 1;
        } else if t.punct(j, ")") {
            if depth == 0 {
                break;
            }
            depth -= 1;
        } else if depth == 0 && t.punct(j, ",") {
            commas += 1;
            if commas == 2 {
                let local = t.word(j + 1, "true") && t.punct(j + 2, ")");
                return (!local).then_some(name);
            }
        }
        j += 1;
    }
    Some(name)
}

/// Just enough of a token reader for the statements above.
struct Toks<'a> {
    sql: &'a [u8],
    toks: &'a [Token],
}

impl Toks<'_> {
    fn text(&self, i: usize) -> Option<&[u8]> {
        self.toks.get(i).map(|t| t.text(self.sql))
    }

    fn word(&self, i: usize, kw: &str) -> bool {
        self.toks.get(i).is_some_and(|t| t.kind == Kind::Word)
            && self
                .text(i)
                .is_some_and(|w| w.eq_ignore_ascii_case(kw.as_bytes()))
    }

    fn punct(&self, i: usize, p: &str) -> bool {
        self.toks.get(i).is_some_and(|t| t.kind == Kind::Punct)
            && self.text(i) == Some(p.as_bytes())
    }

    fn op(&self, i: usize, p: &str) -> bool {
        self.toks.get(i).is_some_and(|t| t.kind == Kind::Op) && self.text(i) == Some(p.as_bytes())
    }

    /// One name part: a word (lower-cased) or a quoted identifier.
    fn part(&self, i: usize) -> Option<String> {
        let tok = self.toks.get(i)?;
        let text = tok.text(self.sql);
        match tok.kind {
            Kind::Word => Some(String::from_utf8_lossy(text).to_ascii_lowercase()),
            Kind::QuotedIdent if text.len() >= 2 => {
                Some(String::from_utf8_lossy(&text[1..text.len() - 1]).replace("\"\"", "\""))
            }
            _ => None,
        }
    }

    /// A setting name at `i` (`a` or `a.b`), and the index after it.
    fn name(&self, i: usize) -> Option<(String, usize)> {
        let mut name = self.part(i)?;
        let mut next = i + 1;
        while self.punct(next, ".") {
            name.push('.');
            name.push_str(&self.part(next + 1)?);
            next += 2;
        }
        Some((name, next))
    }

    /// A plain `'...'` string constant's value.
    fn string(&self, i: usize) -> Option<String> {
        let tok = self.toks.get(i)?;
        let text = tok.text(self.sql);
        match tok.kind {
            Kind::Str(_) if text.first() == Some(&b'\'') && text.len() >= 2 => {
                Some(String::from_utf8_lossy(&text[1..text.len() - 1]).replace("''", "'"))
            }
            _ => None,
        }
    }
}

/// Whether `name` can be a setting's name: ASCII letters, digits, `_`
/// and `$`, in dot-separated parts that do not start with a digit. Only
/// such names are kept and read back, so a name never needs quoting in
/// any client encoding.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.split('.').all(|part| {
            part.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
        })
}

/// Reads the current values of `names` (each [`valid_name`]) on `conn`
/// (one round trip, nothing else in flight), as (name, value) for the
/// names asked; settings the server does not know or does not show this
/// role are left out. `pg_settings` rather than `current_setting()`, which
/// fails the whole query for a setting the role may not read
/// (`data_directory`).
pub async fn read(
    conn: &mut ServerConn,
    names: &[String],
) -> Result<Vec<(String, String)>, BackendError> {
    let names: Vec<&String> = names.iter().filter(|n| valid_name(n)).collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    // Schema-qualified, operators too: the session's search_path is the
    // client's.
    // Custom settings (`myapp.tenant`) are not in pg_settings; any role
    // may read them with current_setting(), only reached for them.
    let sql = format!(
        "SELECT n, coalesce((SELECT s.setting FROM pg_catalog.pg_settings s WHERE pg_catalog.lower(s.name) OPERATOR(pg_catalog.=) n), \
         CASE WHEN pg_catalog.strpos(n, '.') OPERATOR(pg_catalog.>) 0 THEN pg_catalog.current_setting(n, true) END) \
         FROM pg_catalog.unnest(ARRAY[{}]::pg_catalog.text[]) n",
        list.join(", ").to_ascii_lowercase()
    );
    let mut out = BytesMut::new();
    messages::query(&mut out, &sql);
    conn.write_all(&out).await?;
    let mut values = Vec::new();
    let mut error = None;
    let status = loop {
        let frame = conn.read_frame().await?;
        match frame[0] {
            b'D' => values.extend(name_and_value(&frame[5..])?),
            b'E' if error.is_none() => error = Some(messages::parse_error_fields(&frame[5..])?),
            b'Z' => break frame.get(5).copied(),
            _ => {}
        }
    };
    if status != Some(b'I') {
        return Err(BackendError::Protocol(ProtocolError::UnexpectedMessage(
            'Z',
        )));
    }
    if let Some(fields) = error {
        return Err(BackendError::Server(fields));
    }
    values.retain(|(name, _)| names.iter().any(|n| n.eq_ignore_ascii_case(name)));
    Ok(values)
}

/// A `DataRow` of (name, value), `None` when the value is NULL.
fn name_and_value(body: &[u8]) -> Result<Option<(String, String)>, BackendError> {
    let mut r = Reader::new(body, "DataRow");
    if r.i16()? != 2 {
        return Ok(None);
    }
    let mut column = || -> Result<Option<String>, BackendError> {
        let len = r.i32()?;
        Ok((len >= 0)
            .then(|| r.bytes(len as usize))
            .transpose()?
            .map(|b| String::from_utf8_lossy(b).into_owned()))
    };
    let name = column()?;
    let value = column()?;
    Ok(name.zip(value))
}

/// Records `value` for setting `name` in a client's settings, replacing
/// an earlier value (names compare case-insensitively, as PostgreSQL's).
pub fn keep(settings: &mut Vec<(String, String)>, name: String, value: String) {
    match settings
        .iter_mut()
        .find(|(k, _)| k.eq_ignore_ascii_case(&name))
    {
        Some((_, v)) => *v = value,
        None => settings.push((name, value)),
    }
}

#[cfg(test)]
mod tests {
    use super::session_sets;

    #[test]
    fn names_the_settings_a_statement_keeps_for_the_session() {
        for (sql, names) in [
            ("SET work_mem = '64MB'", vec!["work_mem"]),
            (
                "set SESSION Statement_Timeout TO 5000",
                vec!["statement_timeout"],
            ),
            (
                "SET myapp.Tenant = 'x'; SET \"MyApp\".\"T\" TO 1",
                vec!["MyApp.T", "myapp.tenant"],
            ),
            ("SET search_path TO a, b", vec!["search_path"]),
            ("SET SCHEMA 'a'", vec!["search_path"]),
            ("SET XML OPTION DOCUMENT", vec!["xmloption"]),
            ("RESET work_mem", vec!["work_mem"]),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                vec![
                    "default_transaction_deferrable",
                    "default_transaction_isolation",
                    "default_transaction_read_only",
                ],
            ),
            (
                "SELECT set_config('lock_timeout', '1s', false)",
                vec!["lock_timeout"],
            ),
            (
                "SELECT pg_catalog.set_config('lock_timeout', f(1, 2), is_local)",
                vec!["lock_timeout"],
            ),
            (
                "BEGIN; SET default_transaction_read_only = on; COMMIT",
                vec!["default_transaction_read_only"],
            ),
        ] {
            assert_eq!(session_sets(sql.as_bytes()), names, "{sql}");
        }
    }

    #[test]
    fn only_plain_names_are_kept() {
        use super::valid_name;
        for name in ["work_mem", "myapp.tenant", "a$b._c", "DateStyle"] {
            assert!(valid_name(name), "{name}");
        }
        for name in [
            "", "a b", "a'b", "a\\b", "1a", "a..b", ".a", "\u{141}", "a\"b",
        ] {
            assert!(!valid_name(name), "{name:?}");
        }
    }

    #[test]
    fn ignores_what_ends_with_the_transaction_or_follows_the_client_anyway() {
        for sql in [
            "SELECT 1",
            "SET LOCAL work_mem = '1MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SET TIME ZONE 'UTC'",
            "SET TimeZone = 'UTC'",
            "SET NAMES 'LATIN1'",
            "SET application_name = 'x'",
            "RESET DateStyle",
            "UPDATE t SET work_mem = 1",
            "SELECT set_config('work_mem', '1MB', true)",
            "SELECT 'SET work_mem = 1'",
        ] {
            assert!(session_sets(sql.as_bytes()).is_empty(), "{sql}");
        }
    }
}
