//! The statement guard: refuses client SQL that would change or spoof the
//! identity pgwarden asserted on the server connection.
//!
//! Invariant: [`Guard::check`] returns `Ok` only if, under every plausible
//! reading of the bytes (both `standard_conforming_strings` settings, and
//! the multi-byte client encodings whose trail bytes can be `\`), no
//! statement it can see sets or resets `role`, `session_authorization` or
//! the client-user setting, runs `RESET ALL` / `DISCARD ALL`, or calls
//! `set_config` with a name it cannot prove harmless. The checks live in
//! `rules.rs`; this file holds the API, the fast path and the passes.
//!
//! Fast path: a statement in which none of a few byte patterns occurs
//! (`set`, `discard`, the word `do`, `u&`, `function`, `procedure`,
//! `aggregate`, `query_to`, `ts_stat`, `ts_rewrite`, `pgwarden_`, any case)
//! cannot do any
//! of that, and returns without lexing. Every rule below needs one of those
//! patterns in the text (keywords cannot be escaped; a name written with
//! escapes needs `U&`; escaped text only becomes code in DO and function
//! bodies, aggregates and the `query_to_xml` family).
//!
//! What a static check cannot see, and is therefore left to `[identity]
//! verify = "transaction"` and to the privilege model, is documented in
//! `mod.rs` ("Residual risks").

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;

use super::lexer::{Dialect, Kind, Lexer, Multibyte, StrKind, Token};
pub use super::prefilter::{starts_with_ci, suspicious};
use super::scan::{has_backslash, has_high_byte};
use super::{decode, rules};

/// Nesting limit for bodies inside strings inside bodies; deeper is refused.
pub(crate) const MAX_DEPTH: usize = 8;

/// Work allowed per input byte and client-encoding reading: a unit is a
/// byte lexed, a token produced or a token visited by a rule that scans
/// to the end of its statement. Ordinary statements need 2 to 8 (both
/// string readings, a body and its strings); one that needs more than this
/// is refused as too complex to verify, so a check takes linear time.
pub(crate) const WORK_PER_BYTE: usize = 16;

/// Work every reading may spend whatever the size, for short statements.
const WORK_BASE: usize = 64 * 1024;

/// How the guard treats dynamic SQL (`EXECUTE expr`) inside DO blocks and
/// function bodies, whose text only exists at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DynamicSql {
    /// Check every string constant in the body as SQL, and, when the body
    /// uses `EXECUTE`, refuse string constants that name `role`,
    /// `authorization`, `session_authorization`, `set_config` or the
    /// client-user setting, or that end in an unfinished `SET`/`RESET`/
    /// `DISCARD`. Legitimate dynamic DDL passes; a determined client can
    /// still assemble a forbidden statement from innocent fragments.
    #[default]
    Heuristic,
    /// Additionally refuse any `EXECUTE` whose argument is not a single
    /// string constant, and any body in a language other than PL/pgSQL or
    /// SQL. Closes the fragment gap at the cost of refusing dynamic DDL.
    Refuse,
}

/// Why a statement was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// What was refused, e.g. `RESET ROLE` or `SET ROLE inside a DO block`.
    pub what: String,
    /// How a configuration change would let it through, if one would.
    hint: Option<&'static str>,
}

/// The hint of refusals that only [`DynamicSql::Refuse`] makes.
const DYNAMIC_HINT: &str = "set [identity] allow_dynamic_sql = true to allow dynamic SQL";

impl Violation {
    pub(crate) fn new(what: impl Into<String>) -> Violation {
        Violation {
            what: what.into(),
            hint: None,
        }
    }

    /// A refusal of dynamic SQL under [`DynamicSql::Refuse`]: the message
    /// names the setting that would allow it.
    pub(crate) fn dynamic(what: impl Into<String>) -> Violation {
        Violation {
            what: format!("dynamic SQL ({})", what.into()),
            hint: Some(DYNAMIC_HINT),
        }
    }

    /// The same refusal with its description rewritten (context added).
    pub(crate) fn map_what(self, f: impl FnOnce(&str) -> String) -> Violation {
        Violation {
            what: f(&self.what),
            hint: self.hint,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not allowed through pgwarden", self.what)?;
        match self.hint {
            Some(hint) => write!(f, "; {hint}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for Violation {}

/// The statement guard. Cheap to share (`&self` only); build one per
/// configuration.
#[derive(Debug, Clone)]
pub struct Guard {
    /// The client-user setting as configured, for messages.
    setting: String,
    /// Its last dot-separated component, lower case (`client_user`).
    setting_last: String,
    dynamic_sql: DynamicSql,
}

impl Guard {
    /// A guard protecting `role`, `session_authorization` and
    /// `client_user_setting` (e.g. `"app.client_user"`), compared
    /// case-insensitively as PostgreSQL compares setting names.
    pub fn new(client_user_setting: &str) -> Guard {
        let setting = client_user_setting.trim().to_string();
        let setting_last = setting
            .rsplit('.')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        Guard {
            setting,
            setting_last,
            dynamic_sql: DynamicSql::default(),
        }
    }

    /// The same guard with another policy for dynamic SQL in bodies.
    pub fn with_dynamic_sql(mut self, policy: DynamicSql) -> Guard {
        self.dynamic_sql = policy;
        self
    }

    /// `Ok` if `sql` (one or more statements separated by `;`) may run;
    /// otherwise the first thing refused.
    ///
    /// Linear in `sql.len()`: every reading of the bytes gets a work budget
    /// of [`WORK_PER_BYTE`] per input byte (lexed bytes, tokens and rule
    /// scans), and a statement that would need more is refused.
    pub fn check(&self, sql: &[u8]) -> Result<(), Violation> {
        self.run(sql, false).0.map(drop)
    }

    /// [`Guard::check`] for the text of an extended-protocol `Parse`, whose
    /// `$n` are the values the client binds: a single `SELECT`, `VALUES` or
    /// `WITH` may pass a parameter as `set_config`'s setting name (drivers'
    /// settings code does). `Ok` lists those parameters (1-based); each
    /// `Bind` of the statement must then be checked with
    /// [`Guard::bound_setting_name`].
    pub fn check_parse(&self, sql: &[u8]) -> Result<Vec<u16>, Violation> {
        self.run(sql, true).0
    }

    /// A violation if `value`, bound to a parameter [`Guard::check_parse`]
    /// listed, names a protected setting. Trailing blanks are ignored, as a
    /// `char(n)` parameter loses them on its way to `text`.
    pub fn bound_setting_name(&self, value: &[u8]) -> Result<(), Violation> {
        let end = value.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
        match self.protected_name(&value[..end], false) {
            Some(what) => Err(Violation::new(format!("set_config() of {what}"))),
            None => Ok(()),
        }
    }

    /// [`Guard::check`] and the work it spent (for the linearity tests).
    #[cfg(test)]
    pub(crate) fn check_counting(&self, sql: &[u8]) -> (Result<(), Violation>, usize) {
        let (result, spent) = self.run(sql, false);
        (result.map(drop), spent)
    }

    /// The checks, with or without parameters as setting names (see
    /// [`Guard::check_parse`]), and the work they spent.
    fn run(&self, sql: &[u8], extended: bool) -> (Result<Vec<u16>, Violation>, usize) {
        if !suspicious(sql) {
            return (Ok(Vec::new()), 0);
        }
        let encodings: &[Multibyte] = if has_high_byte(sql) && has_backslash(sql) {
            &Multibyte::ALL
        } else {
            &Multibyte::ALL[..1]
        };
        let per_reading = sql
            .len()
            .saturating_mul(WORK_PER_BYTE)
            .saturating_add(WORK_BASE);
        let mut work = Work {
            left: per_reading.saturating_mul(encodings.len()),
            spent: 0,
            passed: HashMap::new(),
            setting_params: extended.then(Vec::new),
        };
        for &multibyte in encodings {
            let mut check = Check {
                guard: self,
                multibyte,
                work: &mut work,
            };
            if let Err(v) = check.sql(sql, 0, false) {
                return (Err(v), work.spent);
            }
        }
        let mut params = work.setting_params.take().unwrap_or_default();
        params.sort_unstable();
        params.dedup();
        (Ok(params), work.spent)
    }

    pub(crate) fn dynamic_sql(&self) -> DynamicSql {
        self.dynamic_sql
    }

    pub(crate) fn setting_last(&self) -> &str {
        &self.setting_last
    }

    /// If `name` (a joined, possibly quoted setting name) is protected, how
    /// to call it in a message. `overlong` means an identifier part was
    /// longer than PostgreSQL keeps (63 bytes), so truncation could make it
    /// match a long setting name: refuse conservatively.
    pub(crate) fn protected_name(&self, name: &[u8], overlong: bool) -> Option<String> {
        if name.eq_ignore_ascii_case(b"role") {
            Some("ROLE".into())
        } else if name.eq_ignore_ascii_case(b"session_authorization") {
            Some("SESSION AUTHORIZATION".into())
        } else if name.eq_ignore_ascii_case(self.setting.as_bytes())
            || (overlong && self.setting.len() >= 60)
        {
            Some(self.setting.clone())
        } else {
            None
        }
    }
}

/// The work budget of one [`Guard::check`], shared by its readings, and
/// the nested texts already found harmless, so a string that reads the
/// same under both `standard_conforming_strings` settings is checked once.
pub(crate) struct Work {
    left: usize,
    spent: usize,
    /// (text, checked as a body, encoding) to the deepest nesting level at
    /// which it passed; it passes at that level or shallower.
    passed: HashMap<(Vec<u8>, bool, Multibyte), usize>,
    /// Checking a `Parse`: the parameters found as `set_config`'s setting
    /// name, left to `Bind` ([`Guard::check_parse`]); `None` otherwise.
    setting_params: Option<Vec<u16>>,
}

impl Check<'_> {
    /// Whether parameter `$n` may stand for a setting name here, and if so
    /// notes it: only in a `Parse` (where every `$n` is a bound value), at
    /// the top level of its one statement.
    pub(crate) fn defer_setting_param(&mut self, n: u16, top_level: bool) -> bool {
        match self.work.setting_params.as_mut() {
            Some(params) if top_level => {
                params.push(n);
                true
            }
            _ => false,
        }
    }
}

/// One run of the guard under one client-encoding interpretation: the
/// recursion state shared by nested bodies.
pub(crate) struct Check<'g> {
    pub(crate) guard: &'g Guard,
    multibyte: Multibyte,
    /// Pathological input is refused instead of taking unbounded time.
    work: &'g mut Work,
}

impl Check<'_> {
    /// Checks `src` as SQL (`body == false`) or as a PL/pgSQL or SQL
    /// function body, under both string-escape readings when it matters.
    pub(crate) fn sql(&mut self, src: &[u8], depth: usize, body: bool) -> Result<(), Violation> {
        if depth > MAX_DEPTH {
            return Err(Violation::new("SQL nested this deeply in strings"));
        }
        if depth > 0 && !body && !suspicious(src) {
            return Ok(());
        }
        let key = (depth > 0).then(|| (src.to_vec(), body, self.multibyte));
        if let Some(k) = &key {
            self.spend(src.len())?;
            if self.work.passed.get(k).is_some_and(|&d| d >= depth) {
                return Ok(());
            }
        }
        let readings: &[bool] = if has_backslash(src) {
            &[true, false]
        } else {
            &[true]
        };
        for &standard_strings in readings {
            let dialect = Dialect {
                standard_strings,
                multibyte: self.multibyte,
            };
            self.pass(src, dialect, depth, body)?;
        }
        if let Some(k) = key {
            let d = self.work.passed.entry(k).or_insert(depth);
            *d = (*d).max(depth);
        }
        Ok(())
    }

    /// Lexes `src` under the default dialect for a heuristic look.
    pub(crate) fn lex_default(&mut self, src: &[u8]) -> Result<Vec<Token>, Violation> {
        self.spend(src.len())?;
        Ok(Lexer::new(src, Dialect::DEFAULT).collect())
    }

    /// Charges `n` units of work; refuses once the budget is used up.
    pub(crate) fn spend(&mut self, n: usize) -> Result<(), Violation> {
        let n = n.max(1);
        self.work.spent = self.work.spent.saturating_add(n);
        match self.work.left.checked_sub(n) {
            Some(left) => {
                self.work.left = left;
                Ok(())
            }
            None => Err(Violation::new(
                "a statement this complex (it could not be verified)",
            )),
        }
    }

    fn pass(
        &mut self,
        src: &[u8],
        dialect: Dialect,
        depth: usize,
        body: bool,
    ) -> Result<(), Violation> {
        self.spend(src.len())?;
        let mut toks = Vec::with_capacity(src.len() / 4 + 8);
        toks.extend(Lexer::new(src, dialect));
        self.spend(toks.len())?;
        let t = Tokens::new(src, &toks, dialect);
        rules::check_tokens(self, &t, depth, body)
    }
}

/// The tokens of one text with the helpers the rules need. Indices past the
/// end are allowed everywhere and match nothing.
pub(crate) struct Tokens<'a> {
    pub(crate) src: &'a [u8],
    pub(crate) toks: &'a [Token],
    pub(crate) dialect: Dialect,
    /// For each `(`, the index of its `)` (or the end); built on first use.
    closes: OnceCell<Vec<u32>>,
}

impl<'a> Tokens<'a> {
    pub(crate) fn new(src: &'a [u8], toks: &'a [Token], dialect: Dialect) -> Tokens<'a> {
        Tokens {
            src,
            toks,
            dialect,
            closes: OnceCell::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.toks.len()
    }

    /// Is token `i` the unquoted keyword `kw` (lower case)?
    pub(crate) fn word(&self, i: usize, kw: &str) -> bool {
        self.toks
            .get(i)
            .is_some_and(|t| t.is_word(self.src, kw.as_bytes()))
    }

    /// Is token `i` the punctuation or operator `p`?
    pub(crate) fn punct(&self, i: usize, p: &str) -> bool {
        self.toks
            .get(i)
            .is_some_and(|t| t.is_punct(self.src, p.as_bytes()))
    }

    /// The escape character given by a `UESCAPE 'c'` clause at `i`, and the
    /// index after it; `\` and `i` if there is none.
    fn uescape(&self, i: usize) -> (u8, usize) {
        if self.word(i, "uescape") {
            if let Some(tok) = self
                .toks
                .get(i + 1)
                .filter(|t| t.kind == Kind::Str(StrKind::Standard))
            {
                let v = decode::string_value(self.src, tok, self.dialect, b'\\');
                return (v.first().copied().unwrap_or(b'\\'), i + 2);
            }
        }
        (b'\\', i)
    }

    /// The value of the identifier at `i` (word, quoted or Unicode) and the
    /// index after it.
    pub(crate) fn ident(&self, i: usize) -> Option<(Cow<'a, [u8]>, usize)> {
        let tok = self.toks.get(i)?;
        match tok.kind {
            Kind::Word | Kind::QuotedIdent => {
                Some((decode::ident_value(self.src, tok, b'\\'), i + 1))
            }
            Kind::UnicodeIdent => {
                let (esc, next) = self.uescape(i + 1);
                Some((decode::ident_value(self.src, tok, esc), next))
            }
            _ => None,
        }
    }

    /// The value of the text string constant at `i` (not a bit string) and
    /// the index after it.
    pub(crate) fn string(&self, i: usize) -> Option<(Cow<'a, [u8]>, usize)> {
        let tok = self.toks.get(i)?;
        match tok.kind {
            Kind::Str(StrKind::Bits) => None,
            Kind::Str(StrKind::Unicode) => {
                let (esc, next) = self.uescape(i + 1);
                Some((decode::string_value(self.src, tok, self.dialect, esc), next))
            }
            Kind::Str(_) => Some((
                decode::string_value(self.src, tok, self.dialect, b'\\'),
                i + 1,
            )),
            _ => None,
        }
    }

    /// A dotted name (`app.client_user`, `"app"."client_user"`, `"role"`)
    /// starting at `i` and ending before `end`: its parts joined with `.`,
    /// whether a part was longer than PostgreSQL keeps, and the next index.
    pub(crate) fn name(&self, i: usize, end: usize) -> Option<(Vec<u8>, bool, usize)> {
        let mut joined = Vec::new();
        let mut overlong = false;
        let mut j = i;
        loop {
            if j >= end {
                return None;
            }
            let (part, next) = self.ident(j)?;
            overlong |= part.len() > 63;
            joined.extend_from_slice(&part);
            if next < end
                && self.punct(next, ".")
                && next + 1 < end
                && self.ident(next + 1).is_some()
            {
                joined.push(b'.');
                j = next + 1;
            } else {
                return Some((joined, overlong, next));
            }
        }
    }

    /// Index of the first `;` at or after `i`, or the end.
    pub(crate) fn statement_end(&self, i: usize) -> usize {
        (i..self.toks.len())
            .find(|&j| self.punct(j, ";"))
            .unwrap_or(self.toks.len())
    }

    /// Index of the `)` or `]` closing the `(` or `[` at `open`, or the end
    /// if it is never closed. One pass over the tokens on first use, then
    /// O(1).
    pub(crate) fn close_of(&self, open: usize) -> usize {
        let closes = self.closes.get_or_init(|| {
            let end = self.toks.len() as u32;
            let mut closes = vec![end; self.toks.len()];
            let mut stack = Vec::new();
            for j in 0..self.toks.len() {
                if self.punct(j, "(") || self.punct(j, "[") {
                    stack.push(j);
                } else if self.punct(j, ")") || self.punct(j, "]") {
                    if let Some(o) = stack.pop() {
                        closes[o] = j as u32;
                    }
                }
            }
            closes
        });
        closes.get(open).map_or(self.toks.len(), |&c| c as usize)
    }

    /// The top-level arguments of the call whose `(` is at `open`, as token
    /// ranges; nested parentheses are stepped over in O(1).
    pub(crate) fn arguments(&self, open: usize) -> Vec<(usize, usize)> {
        let close = self.close_of(open);
        let mut args = Vec::new();
        let mut start = open + 1;
        let mut j = start;
        while j < close {
            if self.punct(j, "(") || self.punct(j, "[") {
                j = self.close_of(j);
            } else if self.punct(j, ",") {
                args.push((start, j));
                start = j + 1;
            }
            j += 1;
        }
        if start < close.min(self.toks.len()) || !args.is_empty() {
            args.push((start, close.min(self.toks.len())));
        }
        args
    }

    /// The value of the argument `toks[s..e]` if it is one string constant,
    /// optionally cast to `text` (a cast to `name` would truncate it).
    pub(crate) fn constant_string(&self, s: usize, e: usize) -> Option<Cow<'a, [u8]>> {
        let (value, mut j) = self.string(s)?;
        while j + 1 < e && self.punct(j, "::") && self.word(j + 1, "text") {
            j += 2;
        }
        (j == e).then_some(value)
    }
}
