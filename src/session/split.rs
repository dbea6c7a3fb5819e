//! The statements of a simple query, as PostgreSQL will run them one after
//! the other, so that each gets its own audit record (text, tag, rows,
//! outcome).
//!
//! Invariant: a split is returned only when it is certain to match the
//! server's: statements end at `;` outside parentheses and outside a
//! `BEGIN ATOMIC ... END` body; a text whose reading depends on session
//! settings (any backslash) or that ends inside a quote is not split (one
//! record, as for a single statement).

use std::ops::Range;

use crate::identity::lexer::{Dialect, Kind, Lexer};

/// Whether `sql` has a `;` before its last statement's end: most texts
/// hold one statement and none, and need no lexing.
pub fn may_hold_several(sql: &[u8]) -> bool {
    sql.iter()
        .rposition(|b| !b.is_ascii_whitespace() && *b != b';')
        .is_some_and(|end| sql[..end].contains(&b';'))
}

/// The byte ranges of `sql`'s statements (comments around them left out),
/// when there are at least two; `None` for one statement (or none), or
/// when the split is not certain. `standard_strings`: the session's
/// `standard_conforming_strings`.
pub fn statements(sql: &[u8], standard_strings: bool) -> Option<Vec<Range<usize>>> {
    if !may_hold_several(sql) {
        return None;
    }
    // A backslash may or may not escape a quote, depending on settings the
    // gateway learns only after the fact (`standard_conforming_strings`,
    // the client encoding): such a text stays one record, whole.
    if sql.contains(&b'\\') {
        return None;
    }
    let dialect = Dialect {
        standard_strings,
        ..Dialect::DEFAULT
    };
    let mut parts = Vec::new();
    let mut current: Option<Range<usize>> = None;
    let mut parens = 0usize;
    // Inside `BEGIN ATOMIC`: its depth, counting `CASE ... END` within.
    let mut atomic = 0usize;
    let mut prev_begin = false;
    for tok in Lexer::new(sql, dialect) {
        if !tok.terminated {
            return None;
        }
        let word = |w: &[u8]| tok.is_word(sql, w);
        if tok.kind == Kind::Punct && tok.text(sql) == b";" && parens == 0 && atomic == 0 {
            parts.extend(current.take());
            prev_begin = false;
            continue;
        }
        match tok.kind {
            Kind::Punct if tok.text(sql) == b"(" => parens += 1,
            Kind::Punct if tok.text(sql) == b")" => parens = parens.saturating_sub(1),
            _ if prev_begin && word(b"atomic") => atomic += 1,
            _ if atomic > 0 && word(b"case") => atomic += 1,
            _ if atomic > 0 && word(b"end") => atomic -= 1,
            _ => {}
        }
        prev_begin = word(b"begin");
        match current.as_mut() {
            Some(range) => range.end = tok.end,
            None => current = Some(tok.start..tok.end),
        }
    }
    if parens != 0 || atomic != 0 {
        return None;
    }
    parts.extend(current);
    (parts.len() >= 2).then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::statements;

    fn split(sql: &str) -> Option<Vec<&str>> {
        statements(sql.as_bytes(), true).map(|parts| parts.into_iter().map(|r| &sql[r]).collect())
    }

    #[test]
    fn splits_at_top_level_semicolons() {
        assert_eq!(
            split("BEGIN; INSERT INTO t VALUES (1) ;COMMIT; SELECT 1/0"),
            Some(vec![
                "BEGIN",
                "INSERT INTO t VALUES (1)",
                "COMMIT",
                "SELECT 1/0"
            ])
        );
        assert_eq!(
            split("/* a */ SELECT ';' ; ;; -- b\n SELECT $x$;$x$, \"a;b\"; "),
            Some(vec!["SELECT ';'", "SELECT $x$;$x$, \"a;b\""])
        );
        assert_eq!(
            split("CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); INSERT INTO u VALUES (2)); SELECT 1"),
            Some(vec![
                "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); INSERT INTO u VALUES (2))",
                "SELECT 1"
            ])
        );
        assert_eq!(
            split("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END; SELECT f()"),
            Some(vec![
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END",
                "SELECT f()"
            ])
        );
    }

    #[test]
    fn one_statement_or_an_uncertain_text_is_not_split() {
        for sql in [
            "SELECT 1",
            "SELECT 1;",
            "SELECT ';'",
            "SELECT 1; /* nothing */ ;",
            "",
            ";",
            "SELECT 'open; SELECT 2",
            "SELECT (1; SELECT 2",
            "SELECT 'é\\'; SELECT 2",
        ] {
            assert_eq!(split(sql), None, "{sql}");
        }
        // A backslash may escape a quote or not: one record.
        assert_eq!(
            statements(b"SELECT 'a\\'; SELECT 2'; SELECT 3", false),
            None
        );
        assert_eq!(statements(b"SELECT 'a\\'; SELECT 2'; SELECT 3", true), None);
    }
}
