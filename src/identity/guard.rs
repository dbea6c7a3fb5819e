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
//! `aggregate`, `query_to`, `ts_stat`, `ts_rewrite`, any case) cannot do any
//! of that, and returns without lexing. Every rule below needs one of those
//! patterns in the text (keywords cannot be escaped; a name written with
//! escapes needs `U&`; escaped text only becomes code in DO and function
//! bodies, aggregates and the `query_to_xml` family).
//!
//! What a static check cannot see, and is therefore left to `[identity]
//! verify = "transaction"` and to the privilege model, is documented in
//! `mod.rs` ("Residual risks").

use std::borrow::Cow;
use std::fmt;

use super::lexer::{Dialect, Kind, Lexer, Multibyte, StrKind, Token};
use super::scan::{has_backslash, has_high_byte};
use super::{decode, rules};

/// Nesting limit for bodies inside strings inside bodies; deeper is refused.
pub(crate) const MAX_DEPTH: usize = 8;

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
}

impl Violation {
    pub(crate) fn new(what: impl Into<String>) -> Violation {
        Violation { what: what.into() }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not allowed through pgwarden", self.what)
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
    pub fn check(&self, sql: &[u8]) -> Result<(), Violation> {
        if !suspicious(sql) {
            return Ok(());
        }
        let encodings: &[Multibyte] = if has_high_byte(sql) && has_backslash(sql) {
            &Multibyte::ALL
        } else {
            &Multibyte::ALL[..1]
        };
        let mut budget = sql.len().saturating_mul(256).saturating_add(1 << 20);
        for &multibyte in encodings {
            let mut check = Check {
                guard: self,
                multibyte,
                budget: &mut budget,
            };
            check.sql(sql, 0, false)?;
        }
        Ok(())
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

/// The two-byte openings of the fast-path patterns, in every ASCII case,
/// as a bitmap indexed by `first << 8 | second`.
static OPENINGS: [u64; 1024] = openings();

const fn openings() -> [u64; 1024] {
    const PAIRS: [[u8; 2]; 9] = [
        *b"se", *b"di", *b"fu", *b"pr", *b"ag", *b"qu", *b"ts", *b"do", *b"u&",
    ];
    let mut table = [0u64; 1024];
    let mut k = 0;
    while k < PAIRS.len() {
        let [a, b] = PAIRS[k];
        let firsts = [a, a.to_ascii_uppercase()];
        let seconds = [b, b.to_ascii_uppercase()];
        let mut x = 0;
        while x < 2 {
            let mut y = 0;
            while y < 2 {
                let key = (firsts[x] as usize) << 8 | seconds[y] as usize;
                table[key >> 6] |= 1 << (key & 63);
                y += 1;
            }
            x += 1;
        }
        k += 1;
    }
    table
}

/// The fast path: could `sql` contain anything the guard refuses?
/// Case-insensitive search for the patterns listed in the module header:
/// one bitmap probe per byte, a full comparison only at their openings.
pub fn suspicious(sql: &[u8]) -> bool {
    let Some((&first, rest)) = sql.split_first() else {
        return false;
    };
    let mut prev = first;
    for (i, &b) in rest.iter().enumerate() {
        let key = usize::from(prev) << 8 | usize::from(b);
        if OPENINGS[key >> 6] & (1 << (key & 63)) != 0 && pattern_at(sql, i) {
            return true;
        }
        prev = b;
    }
    false
}

fn pattern_at(sql: &[u8], i: usize) -> bool {
    let rest = &sql[i..];
    match rest[0] | 0x20 {
        b's' => starts_with_ci(rest, b"set"),
        b'd' => {
            starts_with_ci(rest, b"discard")
                || (rest[1] | 0x20 == b'o' && is_word_boundary(sql, i, 2))
        }
        b'f' => starts_with_ci(rest, b"function"),
        b'p' => starts_with_ci(rest, b"procedure"),
        b'a' => starts_with_ci(rest, b"aggregate"),
        b'q' => starts_with_ci(rest, b"query_to"),
        b't' => starts_with_ci(rest, b"ts_stat") || starts_with_ci(rest, b"ts_rewrite"),
        _ => true, // u&
    }
}

/// Whether `hay` starts with `lower` (letters in lowercase), ignoring the
/// case of ASCII letters.
pub(crate) fn starts_with_ci(hay: &[u8], lower: &[u8]) -> bool {
    hay.len() >= lower.len()
        && hay.iter().zip(lower).all(|(&h, &l)| {
            if l.is_ascii_alphabetic() {
                h | 0x20 == l
            } else {
                h == l
            }
        })
}

/// Is `sql[i..i+len]` a whole word (not inside a longer identifier)?
fn is_word_boundary(sql: &[u8], i: usize, len: usize) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    let before = i == 0 || !word(sql[i - 1]);
    let after = sql.get(i + len).is_none_or(|&b| !word(b));
    before && after
}

/// One run of the guard under one client-encoding interpretation: the
/// recursion state shared by nested bodies.
pub(crate) struct Check<'g> {
    pub(crate) guard: &'g Guard,
    multibyte: Multibyte,
    /// Bytes and tokens still allowed to be lexed; pathological nesting is
    /// refused instead of taking unbounded time.
    budget: &'g mut usize,
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
        Ok(())
    }

    /// Lexes `src` under the default dialect for a heuristic look.
    pub(crate) fn lex_default(&mut self, src: &[u8]) -> Result<Vec<Token>, Violation> {
        self.spend(src.len())?;
        Ok(Lexer::new(src, Dialect::DEFAULT).collect())
    }

    fn spend(&mut self, n: usize) -> Result<(), Violation> {
        match self.budget.checked_sub(n.max(1)) {
            Some(left) => {
                *self.budget = left;
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
        let t = Tokens {
            src,
            toks: &toks,
            dialect,
        };
        rules::check_tokens(self, &t, depth, body)
    }
}

/// The tokens of one text with the helpers the rules need. Indices past the
/// end are allowed everywhere and match nothing.
pub(crate) struct Tokens<'a> {
    pub(crate) src: &'a [u8],
    pub(crate) toks: &'a [Token],
    pub(crate) dialect: Dialect,
}

impl<'a> Tokens<'a> {
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

    /// Index of the `;` ending the statement that contains `i`, or the end.
    pub(crate) fn statement_end(&self, i: usize) -> usize {
        (i..self.toks.len())
            .find(|&j| self.punct(j, ";"))
            .unwrap_or(self.toks.len())
    }

    /// Index of the `)` matching the `(` at `open`, if any.
    pub(crate) fn matching_paren(&self, open: usize) -> Option<usize> {
        let mut depth = 0usize;
        for j in open..self.toks.len() {
            if self.punct(j, "(") {
                depth += 1;
            } else if self.punct(j, ")") {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(j);
                }
            }
        }
        None
    }
}
