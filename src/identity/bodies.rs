//! The guard's rules for code: DO blocks and function bodies, which
//! PostgreSQL runs later or elsewhere, so their text is checked as code.
//!
//! Invariant: a body in PL/pgSQL or SQL is re-lexed and checked with
//! PL/pgSQL's extra statement starts, and every string constant in it is
//! checked as SQL in turn (it may be `EXECUTE`d); with `EXECUTE` present,
//! constants that look like fragments of a protected statement are refused.
//! A body in any other language is screened by words, or refused under
//! [`DynamicSql::Refuse`].

use super::guard::{Check, DynamicSql, Tokens, Violation};
use super::lexer::{is_ident_cont, Dialect};
use super::scan::find;

/// Words that, in a string constant of a body running dynamic SQL, suggest
/// a protected statement is being assembled.
const SENSITIVE_WORDS: [&str; 4] = [
    "role",
    "authorization",
    "session_authorization",
    "set_config",
];

/// `DO [LANGUAGE l] body [LANGUAGE l]`: the body is checked as code. The
/// options are read as PostgreSQL's grammar has them (strings and
/// `LANGUAGE` items, in any order); the first other token ends them, since
/// anything after is a syntax error. So the work is the statement's own
/// length even where body statements overlap (`BEGIN DO BEGIN DO ...`).
pub(super) fn do_block(
    c: &mut Check,
    t: &Tokens,
    i: usize,
    end: usize,
    depth: usize,
) -> Result<(), Violation> {
    let mut language: Option<Vec<u8>> = None;
    let mut bodies = Vec::new();
    let mut j = i;
    while j < end {
        if t.word(j, "language") {
            let Some((name, next)) = t.ident(j + 1).or_else(|| t.string(j + 1)) else {
                break;
            };
            language = Some(name.into_owned());
            j = next;
        } else if let Some((value, next)) = t.string(j) {
            bodies.push(value);
            j = next;
        } else {
            break;
        }
    }
    for b in bodies {
        body(c, &b, language.as_deref(), depth)
            .map_err(|v| within(v, " inside a DO block", depth))?;
    }
    Ok(())
}

pub(super) fn language_name(t: &Tokens, i: usize) -> Option<Vec<u8>> {
    t.ident(i)
        .or_else(|| t.string(i))
        .map(|(v, _)| v.into_owned())
}

pub(super) fn within(v: Violation, context: &str, depth: usize) -> Violation {
    if depth == 0 {
        v.map_what(|w| format!("{w}{context}"))
    } else {
        v
    }
}

/// A DO or function body in `language` (PL/pgSQL when `None`).
pub(super) fn body(
    c: &mut Check,
    text: &[u8],
    language: Option<&[u8]>,
    depth: usize,
) -> Result<(), Violation> {
    let sql_like = language
        .is_none_or(|l| l.eq_ignore_ascii_case(b"plpgsql") || l.eq_ignore_ascii_case(b"sql"));
    if sql_like {
        return c.sql(text, depth + 1, true);
    }
    let lang = String::from_utf8_lossy(language.unwrap_or_default()).into_owned();
    if c.guard.dynamic_sql() == DynamicSql::Refuse {
        return Err(Violation::dynamic(format!(
            "code in language {lang}, which the guard cannot read"
        )));
    }
    let mut words = SENSITIVE_WORDS.to_vec();
    words.extend(["reset", "discard", c.guard.setting_last()]);
    let lower = text.to_ascii_lowercase();
    if let Some(w) =
        find_word(text, &words).or_else(|| find(&lower, b"set_config").map(|_| "set_config"))
    {
        return Err(Violation::new(format!(
            "code in language {lang} mentioning {w}"
        )));
    }
    Ok(())
}

/// A string constant inside a body: checked as SQL, and with dynamic SQL
/// around, screened for fragments of protected statements.
pub(super) fn body_string(
    c: &mut Check,
    t: &Tokens,
    i: usize,
    depth: usize,
    has_execute: bool,
) -> Result<(), Violation> {
    let Some((value, _)) = t.string(i) else {
        return Ok(());
    };
    c.sql(&value, depth + 1, false)?;
    if !has_execute {
        return Ok(());
    }
    let mut words = SENSITIVE_WORDS.to_vec();
    words.push(c.guard.setting_last());
    if let Some(w) = find_word(&value, &words) {
        return Err(Violation::new(format!(
            "dynamic SQL built from a string mentioning {w}"
        )));
    }
    unfinished_command(c, &value)
}

/// Refuses a string whose last statement is a SET/RESET/DISCARD that the
/// string does not finish (`'SET '`, `'RESET app.client_'`), since
/// concatenation could complete it with anything.
fn unfinished_command(c: &mut Check, value: &[u8]) -> Result<(), Violation> {
    let toks = c.lex_default(value)?;
    let t = Tokens::new(value, &toks, Dialect::DEFAULT);
    let start = (0..t.len())
        .rev()
        .find(|&j| t.punct(j, ";"))
        .map_or(0, |j| j + 1);
    if start >= t.len()
        || !["set", "reset", "discard"]
            .iter()
            .any(|kw| t.word(start, kw))
    {
        return Ok(());
    }
    let mut i = start + 1;
    while t.word(i, "session") || t.word(i, "local") {
        i += 1;
    }
    match t.name(i, t.len()) {
        Some((_, _, next)) if next < t.len() => Ok(()),
        _ => Err(Violation::new(
            "dynamic SQL completing an unfinished SET, RESET or DISCARD",
        )),
    }
}

/// With [`DynamicSql::Refuse`]: every `EXECUTE` must run one string constant.
pub(super) fn refuse_dynamic_execute(t: &Tokens) -> Result<(), Violation> {
    for i in 0..t.len() {
        if !t.word(i, "execute") {
            continue;
        }
        let constant = t.string(i + 1).is_some_and(|(_, next)| {
            next >= t.len()
                || t.punct(next, ";")
                || ["into", "using", "loop"].iter().any(|w| t.word(next, w))
        });
        if !constant {
            return Err(Violation::dynamic(
                "EXECUTE of SQL that is not a string constant",
            ));
        }
    }
    Ok(())
}

/// The first of `words` (lower case) that occurs in `text` as a whole word,
/// ignoring ASCII case.
fn find_word<'w>(text: &[u8], words: &[&'w str]) -> Option<&'w str> {
    text.split(|&b| !is_ident_cont(b) || b == b'$')
        .filter(|w| !w.is_empty())
        .find_map(|w| {
            words
                .iter()
                .find(|k| !k.is_empty() && w.eq_ignore_ascii_case(k.as_bytes()))
                .copied()
        })
}
