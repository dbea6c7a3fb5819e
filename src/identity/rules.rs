//! The guard's rules over one lexed text: which statements start where, and
//! what each kind of statement may not do.
//!
//! Invariant: every position where PostgreSQL could start a statement is
//! treated as one (after `;` at top level; inside PL/pgSQL and SQL bodies
//! also after `BEGIN`, `THEN`, `ELSE`, `LOOP`, `DECLARE`, `EXCEPTION` and a
//! `>>` label), and `SET`/`RESET`/`DISCARD`/`DO` are judged only there, so
//! `UPDATE t SET role = ...` is not mistaken for the SET command. Calls of
//! `set_config` and of the functions that run SQL from a string are judged
//! wherever they occur. Every refusal is a [`Violation`].

use super::bodies::{body, body_string, do_block, language_name, refuse_dynamic_execute, within};
use super::guard::{Check, DynamicSql, Tokens, Violation};
use super::lexer::{Kind, StrKind};
use super::runners::{runs_sql_argument, sql_runner_call};

/// Where a SET or RESET appears, which decides what it may name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clause {
    /// The SET/RESET command itself.
    Command,
    /// A function or procedure's `SET` clause: applies whenever it is called.
    Routine,
    /// `ALTER ROLE/DATABASE/SYSTEM ... SET`: applies to later sessions.
    Default,
}

impl Clause {
    fn suffix(self) -> &'static str {
        match self {
            Clause::Command => "",
            Clause::Routine => " in a function definition",
            Clause::Default => " as a role or database default",
        }
    }
}

/// Entry point: all rules over the tokens of one text. Linear in the
/// number of tokens (statement ends are found with one moving cursor).
pub(crate) fn check_tokens(
    c: &mut Check,
    t: &Tokens,
    depth: usize,
    body: bool,
) -> Result<(), Violation> {
    let has_execute = body && (0..t.len()).any(|i| t.word(i, "execute"));
    if has_execute && c.guard.dynamic_sql() == DynamicSql::Refuse {
        refuse_dynamic_execute(t)?;
    }
    // Strings up to here were already screened as dynamic SQL fragments.
    let mut screened = 0;
    let top_level = depth == 0 && !body && bound_values_only(t);
    for i in 0..t.len() {
        match t.toks[i].kind {
            Kind::Word if t.word(i, "execute") || t.word(i, "prepare") => {
                gateway_statement_name(t, i)?
            }
            Kind::Word | Kind::QuotedIdent | Kind::UnicodeIdent => {
                check_ident_use(c, t, i, depth, top_level, &mut screened)?
            }
            Kind::Str(kind) if body && kind != StrKind::Bits => {
                body_string(c, t, i, depth, has_execute)?
            }
            _ => {}
        }
    }
    let mut at_start = true;
    let mut end = 0;
    for i in 0..t.len() {
        if at_start {
            if i >= end {
                end = t.statement_end(i);
            }
            statement(c, t, i, end, depth)?;
        }
        at_start = t.punct(i, ";") || (body && starts_body_statement(t, i));
    }
    Ok(())
}

/// `EXECUTE pgwarden_...` and `PREPARE pgwarden_...`: the gateway's own
/// prepared statements run only through `Bind`, whose values it checks (a
/// statement may take `set_config`'s setting name as a parameter, and
/// SQL-level `EXECUTE` would pass any value), and only with the text it
/// prepared and recorded under that name. Their names are not secret:
/// PostgreSQL's errors show them.
fn gateway_statement_name(t: &Tokens, i: usize) -> Result<(), Violation> {
    match t.ident(i + 1) {
        Some((name, _)) if name.len() >= 9 && name[..9].eq_ignore_ascii_case(b"pgwarden_") => Err(
            Violation::new("EXECUTE or PREPARE of a statement name reserved for pgwarden"),
        ),
        _ => Ok(()),
    }
}

/// Whether the text is one `SELECT`, `VALUES` or `WITH` statement, in
/// which every `$n` is a value bound by the client (not a routine's
/// argument, as in `CREATE FUNCTION ... RETURN` or `PREPARE`).
fn bound_values_only(t: &Tokens) -> bool {
    let one_statement = (0..t.len()).all(|i| !t.punct(i, ";") || i + 1 == t.len());
    one_statement && ["select", "values", "with"].iter().any(|kw| t.word(0, kw))
}

fn starts_body_statement(t: &Tokens, i: usize) -> bool {
    ["begin", "then", "else", "loop", "declare", "exception"]
        .iter()
        .any(|kw| t.word(i, kw))
        || t.punct(i, ">>")
}

/// Rules for an identifier anywhere: `set_config` and the SQL runners.
fn check_ident_use(
    c: &mut Check,
    t: &Tokens,
    i: usize,
    depth: usize,
    top_level: bool,
    screened: &mut usize,
) -> Result<(), Violation> {
    let tok = &t.toks[i];
    if tok.kind == Kind::Word && !matches!(tok.text(t.src)[0] | 0x20, b's' | b'q' | b't') {
        return Ok(());
    }
    let Some((name, next)) = t.ident(i) else {
        return Ok(());
    };
    if name.eq_ignore_ascii_case(b"set_config") {
        return set_config_call(c, t, next, top_level);
    }
    match std::str::from_utf8(&name) {
        Ok(name) if runs_sql_argument(name) => {
            sql_runner_call(c, t, &name.to_ascii_lowercase(), next, depth, screened)
        }
        _ => Ok(()),
    }
}

/// `set_config(<name>, ...)`: the name must be a string constant naming an
/// unprotected setting, or (`top_level` in a `Parse`) a parameter whose
/// bound value is checked at `Bind`.
fn set_config_call(
    c: &mut Check,
    t: &Tokens,
    open: usize,
    top_level: bool,
) -> Result<(), Violation> {
    if !t.punct(open, "(") {
        return Err(Violation::new(
            "a reference to set_config that is not a plain call",
        ));
    }
    let param = t
        .toks
        .get(open + 1)
        .filter(|tok| tok.kind == Kind::Param && (t.punct(open + 2, ",") || t.punct(open + 2, ")")))
        .and_then(|tok| {
            std::str::from_utf8(&tok.text(t.src)[1..])
                .ok()?
                .parse::<u16>()
                .ok()
        })
        .filter(|&n| n >= 1);
    if let Some(n) = param {
        if c.defer_setting_param(n, top_level) {
            return Ok(());
        }
    }
    match t.string(open + 1) {
        Some((value, next)) if t.punct(next, ",") || t.punct(next, ")") => {
            match c.guard.protected_name(&value, false) {
                Some(what) => Err(Violation::new(format!("set_config() of {what}"))),
                None => Ok(()),
            }
        }
        _ => Err(Violation::new(
            "set_config() with a setting name that is not a string constant",
        )),
    }
}

/// Dispatch on the first word of a statement starting at `i` and ending
/// before `end` (its `;`). In bodies, statements may start inside another
/// one's range, so the rules that scan to `end` charge the work budget.
pub(super) fn statement(
    c: &mut Check,
    t: &Tokens,
    i: usize,
    end: usize,
    depth: usize,
) -> Result<(), Violation> {
    if t.toks.get(i).is_none_or(|tok| tok.kind != Kind::Word) {
        return Ok(());
    }
    let first = t.toks[i].text(t.src)[0] | 0x20;
    if !matches!(first, b's' | b'r' | b'd' | b'c' | b'a') {
        return Ok(());
    }
    if t.word(i, "set") {
        set(c, t, i + 1, end, Clause::Command).map(drop)
    } else if t.word(i, "reset") {
        reset(c, t, i + 1, end, Clause::Command).map(drop)
    } else if t.word(i, "discard") {
        match t.name(i + 1, end) {
            Some((name, _, _)) if name.eq_ignore_ascii_case(b"all") => {
                Err(Violation::new("DISCARD ALL"))
            }
            _ => Ok(()),
        }
    } else if t.word(i, "do") {
        do_block(c, t, i + 1, end, depth)
    } else if t.word(i, "create") {
        c.spend(2 * (end - i))?;
        create(c, t, i + 1, end, depth)
    } else if t.word(i, "alter") {
        c.spend(2 * (end - i))?;
        alter(c, t, i + 1, end)
    } else {
        Ok(())
    }
}

/// `SET [SESSION|LOCAL] ...` from `i` (the token after SET). Returns the
/// index after the setting name, so callers scanning a clause list skip it.
fn set(
    c: &mut Check,
    t: &Tokens,
    mut i: usize,
    end: usize,
    clause: Clause,
) -> Result<usize, Violation> {
    while i < end {
        if t.word(i, "session") {
            if t.word(i + 1, "authorization") {
                return Err(Violation::new(format!(
                    "SET SESSION AUTHORIZATION{}",
                    clause.suffix()
                )));
            }
            if t.word(i + 1, "characteristics") {
                return Ok(i + 2);
            }
        } else if !t.word(i, "local") {
            break;
        }
        i += 1;
    }
    match t.name(i, end) {
        Some((name, overlong, next)) => match c.guard.protected_name(&name, overlong) {
            Some(what) => Err(Violation::new(format!("SET {what}{}", clause.suffix()))),
            None => Ok(next),
        },
        None => Ok(i),
    }
}

/// `RESET ...` from `i` (the token after RESET). Returns the index after
/// the setting name.
fn reset(
    c: &mut Check,
    t: &Tokens,
    i: usize,
    end: usize,
    clause: Clause,
) -> Result<usize, Violation> {
    if t.word(i, "session") && t.word(i + 1, "authorization") {
        return Err(Violation::new(format!(
            "RESET SESSION AUTHORIZATION{}",
            clause.suffix()
        )));
    }
    let Some((name, overlong, next)) = t.name(i, end) else {
        return Ok(i);
    };
    if name.eq_ignore_ascii_case(b"all") {
        // In ALTER ROLE/FUNCTION, RESET ALL only drops stored defaults.
        return match clause {
            Clause::Command => Err(Violation::new("RESET ALL")),
            _ => Ok(next),
        };
    }
    match c.guard.protected_name(&name, overlong) {
        Some(what) => Err(Violation::new(format!("RESET {what}{}", clause.suffix()))),
        None => Ok(next),
    }
}

/// `CREATE ...` from `i` (the token after CREATE).
fn create(c: &mut Check, t: &Tokens, i: usize, end: usize, depth: usize) -> Result<(), Violation> {
    names_set_config(t, i, end)?;
    let mut j = i;
    if t.word(j, "or") && t.word(j + 1, "replace") {
        j += 2;
    }
    if t.word(j, "function") || t.word(j, "procedure") {
        routine(c, t, j + 1, end, depth)?;
    }
    Ok(())
}

/// `ALTER ...` from `i`: SET/RESET clauses of functions, roles, databases.
fn alter(c: &mut Check, t: &Tokens, i: usize, end: usize) -> Result<(), Violation> {
    names_set_config(t, i, end)?;
    let clause = if ["function", "procedure", "routine"]
        .iter()
        .any(|w| t.word(i, w))
    {
        Clause::Routine
    } else if ["role", "user", "database", "system"]
        .iter()
        .any(|w| t.word(i, w))
    {
        Clause::Default
    } else {
        return Ok(());
    };
    let mut parens = 0usize;
    let mut j = i + 1;
    while j < end {
        if t.punct(j, "(") {
            parens += 1;
        } else if t.punct(j, ")") {
            parens = parens.saturating_sub(1);
        } else if parens == 0 && t.word(j, "set") {
            j = set(c, t, j + 1, end, clause)?;
            continue;
        } else if parens == 0 && t.word(j, "reset") {
            j = reset(c, t, j + 1, end, clause)?;
            continue;
        }
        j += 1;
    }
    Ok(())
}

/// In CREATE/ALTER, a string constant that names `set_config` or an SQL
/// runner could make it a support function (`CREATE AGGREGATE ... SFUNC =
/// 'set_config'`, `CREATE OPERATOR ... (FUNCTION = 'ts_rewrite')`).
fn names_set_config(t: &Tokens, i: usize, end: usize) -> Result<(), Violation> {
    for j in i..end {
        // PostgreSQL takes such a string as one whole name, so only a short
        // one can match; long ones are not decoded (statements in bodies
        // can overlap, and this must stay cheap).
        if t.toks.get(j).is_none_or(|tok| tok.end - tok.start > 1024) {
            continue;
        }
        let Some((value, _)) = t.string(j) else {
            continue;
        };
        let squeezed: Vec<u8> = value
            .iter()
            .filter(|b| !b.is_ascii_whitespace() && **b != b'"')
            .map(u8::to_ascii_lowercase)
            .collect();
        let name = squeezed.strip_prefix(b"pg_catalog.").unwrap_or(&squeezed);
        let name = name.split(|&b| b == b'(').next().unwrap_or_default();
        let name = std::str::from_utf8(name).unwrap_or_default();
        if name == "set_config" || runs_sql_argument(name) {
            return Err(Violation::new(format!(
                "a reference to {name} that is not a plain call"
            )));
        }
    }
    Ok(())
}

/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE` after the keyword: SET clauses,
/// the body after AS, and a `BEGIN ATOMIC` body's first statement.
fn routine(c: &mut Check, t: &Tokens, i: usize, end: usize, depth: usize) -> Result<(), Violation> {
    let mut parens = 0usize;
    let mut language: Option<Vec<u8>> = None;
    let mut bodies = Vec::new();
    let mut j = i;
    while j < end {
        if t.punct(j, "(") || t.punct(j, "[") {
            parens += 1;
        } else if t.punct(j, ")") || t.punct(j, "]") {
            parens = parens.saturating_sub(1);
        } else if parens > 0 {
            // Argument lists and RETURNS TABLE (...) hold no clauses.
        } else if t.word(j, "language") {
            language = language_name(t, j + 1);
        } else if t.word(j, "as") {
            if let Some((value, next)) = t.string(j + 1) {
                bodies.push(value);
                if t.punct(next, ",") {
                    if let Some((link, _)) = t.string(next + 1) {
                        bodies.push(link);
                    }
                }
            }
        } else if t.word(j, "set") {
            j = set(c, t, j + 1, end, Clause::Routine)?;
            continue;
        } else if t.word(j, "reset") {
            j = reset(c, t, j + 1, end, Clause::Routine)?;
            continue;
        } else if t.word(j, "begin") && t.word(j + 1, "atomic") {
            statement(c, t, j + 2, end, depth)?;
            break;
        }
        j += 1;
    }
    for b in bodies {
        body(c, &b, language.as_deref(), depth)
            .map_err(|v| within(v, " inside a function body", depth))?;
    }
    Ok(())
}
