//! Built-in functions that run SQL handed to them as text
//! (`query_to_xml('SELECT ...', ...)`): the guard's rule for their calls.
//!
//! Invariant: the SQL argument of such a call is either one string
//! constant, which is checked as SQL one nesting level down (like the
//! constant of an `EXECUTE`), or the call is refused under
//! [`DynamicSql::Refuse`]; under [`DynamicSql::Heuristic`] its strings are
//! screened like the strings of a body that runs `EXECUTE`. With named
//! arguments every argument is treated as the SQL one. Work is linear: each
//! call walks only its own top-level tokens, and strings are screened once.

use super::bodies::body_string;
use super::guard::{Check, DynamicSql, Tokens, Violation};
use super::lexer::Kind;

/// Functions that parse and run SQL given to them as text, and which of
/// their positional arguments holds it. `cursor_to_xml` and
/// `cursor_to_xmlschema` take a cursor name, not SQL, and are not listed.
const SQL_RUNNERS: [(&str, usize); 5] = [
    ("query_to_xml", 0),
    ("query_to_xmlschema", 0),
    ("query_to_xml_and_xmlschema", 0),
    ("ts_stat", 0),
    // ts_rewrite(query tsquery, select text); the three-argument form
    // takes tsqueries only.
    ("ts_rewrite", 1),
];

/// Whether the built-in function `name` runs SQL passed to it as an
/// argument (`query_to_xml`, `query_to_xmlschema`,
/// `query_to_xml_and_xmlschema`, `ts_stat`, `ts_rewrite`). `name` may be
/// schema-qualified with `pg_catalog.` and is compared ignoring ASCII case,
/// so the session code can apply the same rule to a FunctionCall by OID.
pub fn runs_sql_argument(name: &str) -> bool {
    sql_argument(name).is_some()
}

fn sql_argument(name: &str) -> Option<usize> {
    let name = match name.get(..11) {
        Some(p) if p.eq_ignore_ascii_case("pg_catalog.") => &name[11..],
        _ => name,
    };
    SQL_RUNNERS
        .iter()
        .find(|(r, _)| name.eq_ignore_ascii_case(r))
        .map(|&(_, arg)| arg)
}

/// A mention of the runner `runner` (lower case) whose next token is at
/// `open`: a call's SQL argument is checked; any other mention (`CREATE
/// OPERATOR ... FUNCTION = ts_rewrite`) is refused.
pub(super) fn sql_runner_call(
    c: &mut Check,
    t: &Tokens,
    runner: &str,
    open: usize,
    depth: usize,
    screened: &mut usize,
) -> Result<(), Violation> {
    if !t.punct(open, "(") {
        return Err(Violation::new(format!(
            "a reference to {runner} that is not a plain call"
        )));
    }
    let args = t.arguments(open);
    let named = |&(s, _): &(usize, usize)| {
        t.ident(s)
            .is_some_and(|(_, n)| t.punct(n, "=>") || t.punct(n, ":="))
    };
    if args.iter().any(named) {
        for arg in &args {
            let (s, e) = *arg;
            let value_start = match t.ident(s) {
                Some((_, n)) if named(arg) => n + 1,
                _ => s,
            };
            if !plain_constant(t, value_start, e) {
                sql_argument_value(c, t, runner, (value_start, e), depth, screened)?;
            }
        }
        return Ok(());
    }
    let index = sql_argument(runner).unwrap_or(0);
    if runner == "ts_rewrite" && args.len() == 3 {
        return Ok(());
    }
    match args.get(index) {
        Some(&range) => sql_argument_value(c, t, runner, range, depth, screened),
        None => Ok(()),
    }
}

/// One number, boolean or NULL: never SQL text.
fn plain_constant(t: &Tokens, s: usize, e: usize) -> bool {
    e == s + 1
        && (t.toks.get(s).is_some_and(|tok| tok.kind == Kind::Number)
            || ["true", "false", "null"].iter().any(|w| t.word(s, w)))
}

/// The SQL argument `toks[s..e]` of a call of `runner`.
fn sql_argument_value(
    c: &mut Check,
    t: &Tokens,
    runner: &str,
    (s, e): (usize, usize),
    depth: usize,
    screened: &mut usize,
) -> Result<(), Violation> {
    if let Some(value) = t.constant_string(s, e) {
        return c
            .sql(&value, depth + 1, false)
            .map_err(|v| v.map_what(|w| format!("{w} in SQL passed to {runner}()")));
    }
    if c.guard.dynamic_sql() == DynamicSql::Refuse {
        return Err(Violation::dynamic(format!(
            "{runner}() of SQL that is not a string constant"
        )));
    }
    // Heuristic: screen the strings it is built from, each once even when
    // calls nest.
    for j in s.max(*screened)..e {
        if matches!(t.toks[j].kind, Kind::Str(_)) {
            body_string(c, t, j, depth, true)
                .map_err(|v| v.map_what(|w| format!("{w} passed to {runner}()")))?;
        }
    }
    *screened = (*screened).max(e);
    Ok(())
}
