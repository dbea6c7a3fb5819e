//! The statements of a simple query, as PostgreSQL will run them one after
//! the other, so that each gets its own audit record (text, tag, rows,
//! outcome).
//!
//! Invariant: a split is returned only when it is certain to match the
//! server's: statements end at `;` outside parentheses and outside the
//! `BEGIN ATOMIC ... END` body of a `CREATE [OR REPLACE] FUNCTION` or
//! `PROCEDURE` ([`Bodies`]); a text whose reading depends on session
//! settings (any backslash) or that ends inside a quote, a parenthesis or
//! a body is not split (one record, as for a single statement).

use std::ops::Range;

use crate::identity::lexer::{Dialect, Lexer, Token};

/// Where a token stands, as PostgreSQL's grammar reads a text of several
/// statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A `;` that ends a statement.
    End,
    /// A token of a statement.
    Statement,
    /// A token inside the body of a routine being created: it runs only
    /// when the routine is called.
    Body,
}

/// Follows the `BEGIN ATOMIC ... END` bodies of `CREATE [OR REPLACE]
/// FUNCTION | PROCEDURE`, inside which a `;` ends no statement of the text.
/// As in PostgreSQL's grammar, a body's statements are each followed by
/// `;`, and the body's `END` stands where a statement would start (no
/// statement of a body starts with `END`): a `CASE ... END` or a column
/// labelled `end` (`SELECT 1 AS end`) never closes it. Red team rt40
/// closed bodies at `AS end`, and opened one at a `WITH begin AS (...)
/// SELECT * FROM begin atomic`.
#[derive(Debug, Default)]
pub struct Bodies {
    /// Bodies open now.
    depth: usize,
    parens: usize,
    /// The leading words of the current statement, as far as they say
    /// whether it creates a routine.
    lead: Lead,
    prev_begin: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Lead {
    /// No word yet: a statement starts.
    #[default]
    Start,
    Create,
    CreateOr,
    CreateOrReplace,
    /// `CREATE [OR REPLACE] FUNCTION | PROCEDURE`.
    Routine,
    Other,
}

impl Lead {
    fn next(self, tok: &Token, sql: &[u8]) -> Lead {
        let word = |w: &[u8]| tok.is_word(sql, w);
        match self {
            Lead::Start if word(b"create") => Lead::Create,
            Lead::Create if word(b"or") => Lead::CreateOr,
            Lead::CreateOr if word(b"replace") => Lead::CreateOrReplace,
            Lead::Create | Lead::CreateOrReplace if word(b"function") || word(b"procedure") => {
                Lead::Routine
            }
            Lead::Routine => Lead::Routine,
            _ => Lead::Other,
        }
    }
}

impl Bodies {
    /// Where `tok`, the next token of `sql`, stands.
    pub fn place(&mut self, tok: &Token, sql: &[u8]) -> Place {
        let at_start = self.lead == Lead::Start;
        let inside = self.depth > 0;
        if tok.is_punct(sql, b";") && self.parens == 0 {
            self.lead = Lead::Start;
            self.prev_begin = false;
            return if inside { Place::Body } else { Place::End };
        }
        if tok.is_punct(sql, b"(") {
            self.parens += 1;
        } else if tok.is_punct(sql, b")") {
            self.parens = self.parens.saturating_sub(1);
        }
        if inside && at_start && self.parens == 0 && tok.is_word(sql, b"end") {
            // The body's own END: the statement that created it goes on.
            self.depth -= 1;
            self.lead = Lead::Routine;
            return Place::Body;
        }
        self.lead = self.lead.next(tok, sql);
        if self.lead == Lead::Routine && self.prev_begin && tok.is_word(sql, b"atomic") {
            self.depth += 1;
            self.lead = Lead::Start;
        }
        self.prev_begin = self.parens == 0 && tok.is_word(sql, b"begin");
        match inside || self.depth > 0 {
            true => Place::Body,
            false => Place::Statement,
        }
    }

    /// Whether the text so far ends where a statement may end: outside
    /// every parenthesis and body.
    pub fn balanced(&self) -> bool {
        self.depth == 0 && self.parens == 0
    }
}

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
    let mut bodies = Bodies::default();
    for tok in Lexer::new(sql, dialect) {
        if !tok.terminated {
            return None;
        }
        if bodies.place(&tok, sql) == Place::End {
            parts.extend(current.take());
            continue;
        }
        match current.as_mut() {
            Some(range) => range.end = tok.end,
            None => current = Some(tok.start..tok.end),
        }
    }
    if !bodies.balanced() {
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

    /// Red team rt40: a column labelled `end` closed a body, and a CTE
    /// named `begin` aliased `atomic` opened one.
    #[test]
    fn bodies_are_read_as_the_grammar_reads_them() {
        let body = "CREATE OR REPLACE PROCEDURE pg_temp.f() LANGUAGE sql BEGIN ATOMIC SELECT 1 AS end; SELECT t.end FROM t; SELECT CASE WHEN true THEN 1 END; END";
        assert_eq!(
            split(&format!("INSERT INTO t VALUES (4); {body}; SELECT 3")),
            Some(vec!["INSERT INTO t VALUES (4)", body, "SELECT 3"])
        );
        assert_eq!(
            split("SELECT 1; WITH begin AS (SELECT 1) SELECT * FROM begin atomic; DELETE FROM t; SELECT 1 AS end; SELECT 2"),
            Some(vec![
                "SELECT 1",
                "WITH begin AS (SELECT 1) SELECT * FROM begin atomic",
                "DELETE FROM t",
                "SELECT 1 AS end",
                "SELECT 2"
            ])
        );
        // Not closed: one record.
        assert_eq!(
            split(
                "SELECT 1; CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; SELECT 2 AS end;"
            ),
            None
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
