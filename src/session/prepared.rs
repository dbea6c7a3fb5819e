//! Client-side prepared statements in transaction pooling: the client's names
//! map to shared server-side names (see `pool::statements`), and the messages
//! that name a statement are rewritten on their way to the server.
//!
//! Invariant: a client's named statement is only ever executed under the
//! server name derived from the exact `Parse` body the client sent.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::messages::write_frame;
use crate::session::commits::Commits;

/// What the gateway remembers of one client statement.
#[derive(Debug, Clone)]
pub struct Statement {
    /// Query text, for the audit log.
    pub sql: Bytes,
    /// For named statements: the shared key and the `Parse` body after the
    /// name (query, parameter types), to prepare it on another connection.
    pub shared: Option<(u128, Bytes)>,
    /// What it does, as far as pgwarden can tell.
    pub nature: Nature,
    /// Parameters (1-based) that name the setting of a `set_config` call:
    /// every `Bind` is checked against the statement guard
    /// ([`crate::identity::Guard::check_parse`]).
    pub setting_params: Vec<u16>,
    /// Settings it may change for the session
    /// ([`crate::session::kept::session_sets`]).
    pub session_sets: Vec<String>,
    /// The unnamed statement's `Parse` body (query, parameter types): in
    /// transaction pooling it is parsed again on the connection of a later
    /// transaction that binds it, as PostgreSQL keeps it until the next
    /// unnamed `Parse`.
    pub unnamed_parse: Option<Bytes>,
}

/// What pgwarden knows a statement does, worked out once when it is parsed.
#[derive(Debug, Clone, Copy)]
pub struct Nature {
    /// It runs only what pgwarden understands
    /// ([`crate::session::opaque::transparent`]).
    pub transparent: bool,
    /// It may leave sequence state
    /// ([`crate::session::state::may_use_sequences`]).
    pub uses_sequences: bool,
    /// What it does to its transaction.
    pub commits: Commits,
    /// It may start a `COPY ... FROM STDIN`
    /// ([`crate::session::state::may_copy_in`]).
    pub copies_in: bool,
    /// It may declare cursors ([`declared_cursors`]).
    pub declares: bool,
}

impl Nature {
    /// A statement pgwarden did not see prepared (an SQL-level `PREPARE`):
    /// it may run anything and leave sequence state.
    pub const UNKNOWN: Nature = Nature {
        transparent: false,
        uses_sequences: true,
        commits: Commits {
            ends: false,
            calls: false,
            begins: false,
            more_after: false,
            chains: false,
            block_commits: false,
            rolls_back: false,
        },
        // `PREPARE` takes no COPY.
        copies_in: false,
        declares: false,
    };

    pub fn of(sql: &[u8]) -> Nature {
        Nature {
            transparent: crate::session::opaque::transparent(sql),
            uses_sequences: crate::session::state::may_use_sequences(sql),
            copies_in: crate::session::state::may_copy_in(sql),
            commits: Commits::of(sql),
            declares: DECLARE.in_text(sql),
        }
    }
}

static DECLARE: crate::identity::keywords::Keywords =
    crate::identity::keywords::Keywords::new(&["declare"]);

/// `Parse` of `rest` (query and parameter types) under `name`.
pub fn parse(out: &mut BytesMut, name: &str, rest: &[u8]) {
    write_frame(out, b'P', |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(rest);
    });
}

/// `Bind` with the statement name replaced.
pub fn bind(out: &mut BytesMut, portal: &[u8], statement: &str, rest: &[u8]) {
    write_frame(out, b'B', |b| {
        b.put_slice(portal);
        b.put_u8(0);
        b.put_slice(statement.as_bytes());
        b.put_u8(0);
        b.put_slice(rest);
    });
}

/// `Describe` or `Close` (`tag`) of statement `name`.
pub fn statement_message(out: &mut BytesMut, tag: u8, name: &str) {
    write_frame(out, tag, |b| {
        b.put_u8(b'S');
        b.put_slice(name.as_bytes());
        b.put_u8(0);
    });
}

/// A simple-query `DEALLOCATE` the gateway answers itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Deallocate {
    Name(Vec<u8>),
    All,
}

/// Recognizes `DEALLOCATE [PREPARE] {name | ALL} [;]`, nothing else.
pub fn parse_deallocate(sql: &[u8]) -> Option<Deallocate> {
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    if !crate::identity::guard::starts_with_ci(&sql[start..], b"deallocate") {
        return None;
    }
    let text = std::str::from_utf8(sql).ok()?.trim();
    let text = text.strip_suffix(';').unwrap_or(text).trim_end();
    let (word, rest) = split_word(text)?;
    if !word.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let (mut word, mut rest) = split_word(rest)?;
    if word.eq_ignore_ascii_case("prepare") {
        (word, rest) = split_word(rest)?;
    }
    if !rest.is_empty() {
        return None;
    }
    if word.eq_ignore_ascii_case("all") {
        return Some(Deallocate::All);
    }
    if let Some(quoted) = word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        if quoted.is_empty() {
            return None;
        }
        return Some(Deallocate::Name(quoted.replace("\"\"", "\"").into_bytes()));
    }
    if word
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
    {
        return Some(Deallocate::Name(word.to_ascii_lowercase().into_bytes()));
    }
    None
}

/// The first whitespace-separated word (a quoted identifier counts as one
/// word) and the rest, trimmed.
fn split_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = if let Some(stripped) = s.strip_prefix('"') {
        let mut i = 0;
        let b = stripped.as_bytes();
        loop {
            if i >= b.len() {
                return None;
            }
            if b[i] == b'"' {
                if b.get(i + 1) == Some(&b'"') {
                    i += 2;
                    continue;
                }
                break i + 2;
            }
            i += 1;
        }
    } else {
        s.find(|c: char| c.is_whitespace()).unwrap_or(s.len())
    };
    Some((&s[..end], s[end..].trim_start()))
}

impl Statement {
    /// The bytes of the client's `Parse` it keeps: its text, and the body
    /// kept to prepare it again, which holds the text (slices of one
    /// message).
    pub fn size(&self) -> usize {
        let shared = self.shared.as_ref().map_or(0, |(_, rest)| rest.len());
        let unnamed = self.unnamed_parse.as_ref().map_or(0, Bytes::len);
        self.sql.len().max(shared).max(unnamed)
    }

    /// A statement and what pgwarden knows of what it does.
    pub fn new(sql: Bytes, shared: Option<(u128, Bytes)>, setting_params: Vec<u16>) -> Statement {
        Statement {
            nature: Nature::of(&sql),
            session_sets: crate::session::kept::session_sets(&sql),
            sql,
            shared,
            setting_params,
            unnamed_parse: None,
        }
    }

    /// [`Statement::new`], taking what `previous` worked out when it has
    /// the same text: both are functions of the text alone. A driver that
    /// sends the same unnamed `Parse` for every execution (pgbench `-M
    /// extended`, most drivers' unprepared queries) has it analysed once.
    pub fn new_after(
        previous: Option<&Statement>,
        sql: Bytes,
        shared: Option<(u128, Bytes)>,
        setting_params: Vec<u16>,
    ) -> Statement {
        match previous.filter(|p| p.sql == sql) {
            Some(p) => Statement {
                nature: p.nature,
                session_sets: p.session_sets.clone(),
                sql,
                shared,
                setting_params,
                unnamed_parse: None,
            },
            None => Statement::new(sql, shared, setting_params),
        }
    }
}

/// The cursors `sql` declares (`DECLARE name ... CURSOR ... FOR ...`), as
/// (portal name, the DECLARE statement's text): an `Execute` of such a
/// portal runs that statement. Unquoted names are lower-cased, as the
/// server folds them.
pub fn declared_cursors(sql: &[u8]) -> Vec<(Vec<u8>, &[u8])> {
    use crate::identity::lexer::{tokens, Kind};
    if !DECLARE.in_text(sql) {
        return Vec::new();
    }
    let toks = tokens(sql);
    let mut out = Vec::new();
    let mut start = 0;
    for (i, t) in toks.iter().enumerate() {
        let at_start = i == 0 || toks[i - 1].is_punct(sql, b";");
        if at_start {
            start = t.start;
        }
        if !(at_start && t.is_word(sql, b"declare")) {
            continue;
        }
        let Some(name) = toks.get(i + 1) else {
            continue;
        };
        let name = match name.kind {
            Kind::Word => name.text(sql).to_ascii_lowercase(),
            Kind::QuotedIdent => {
                crate::identity::decode::ident_value(sql, name, b'\\').into_owned()
            }
            _ => continue,
        };
        let end = toks[i..]
            .iter()
            .find(|t| t.is_punct(sql, b";"))
            .map_or(sql.len(), |t| t.start);
        out.push((name, &sql[start..end]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_takes_the_previous_analysis_only_for_the_same_text() {
        let sets = Statement::new(
            Bytes::from_static(b"SET work_mem = '1MB'"),
            None,
            Vec::new(),
        );
        assert_eq!(sets.session_sets, ["work_mem"]);
        let again = Statement::new_after(
            Some(&sets),
            Bytes::from_static(b"SET work_mem = '1MB'"),
            None,
            vec![1],
        );
        assert_eq!(again.session_sets, ["work_mem"]);
        assert_eq!(again.setting_params, [1]);
        // Another text is analysed afresh, whatever came before.
        let select = Statement::new_after(
            Some(&sets),
            Bytes::from_static(b"SELECT 1"),
            None,
            Vec::new(),
        );
        assert!(select.session_sets.is_empty());
        assert!(select.nature.transparent);
        let copy = Statement::new_after(
            Some(&select),
            Bytes::from_static(b"COPY t FROM STDIN"),
            None,
            Vec::new(),
        );
        assert!(copy.nature.copies_in && !copy.nature.transparent);
    }

    #[test]
    fn declared_cursors_by_portal_name() {
        let sql =
            b"BEGIN; DECLARE Cur CURSOR FOR SELECT 1; declare \"Q\" scroll cursor for select 2";
        let found = declared_cursors(sql);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0, b"cur");
        assert_eq!(found[0].1, b"DECLARE Cur CURSOR FOR SELECT 1");
        assert_eq!(found[1].0, b"Q");
        assert!(declared_cursors(b"SELECT 'declare x cursor for'").is_empty());
    }

    #[test]
    fn deallocate_forms() {
        assert_eq!(
            parse_deallocate(b"DEALLOCATE s1"),
            Some(Deallocate::Name(b"s1".to_vec()))
        );
        assert_eq!(
            parse_deallocate(b"  deallocate prepare S1 ; "),
            Some(Deallocate::Name(b"s1".to_vec()))
        );
        assert_eq!(
            parse_deallocate(b"DEALLOCATE \"Q\"\"x\""),
            Some(Deallocate::Name(b"Q\"x".to_vec()))
        );
        assert_eq!(parse_deallocate(b"DEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(
            parse_deallocate(b"DEALLOCATE PREPARE ALL;"),
            Some(Deallocate::All)
        );
        assert_eq!(parse_deallocate(b"DEALLOCATE a; SELECT 1"), None);
        assert_eq!(parse_deallocate(b"SELECT 1"), None);
        assert_eq!(parse_deallocate(b"DEALLOCATE"), None);
        assert_eq!(parse_deallocate(b"DEALLOCATE /* c */ x"), None);
    }

    #[test]
    fn rewritten_bind_keeps_parameters() {
        let mut out = BytesMut::new();
        bind(&mut out, b"p", "pgwarden_x", b"\0\0\0\0\0\0");
        assert_eq!(&out[5..], b"p\0pgwarden_x\0\0\0\0\0\0\0");
        let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
    }
}
