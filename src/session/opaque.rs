//! Which statements pgwarden fully understands ("transparent") and which may
//! run code it cannot see into ("opaque").
//!
//! The identity guarantees do not rest on this classification being
//! complete: anything it does not recognise is opaque, and an opaque
//! statement costs a fresh identity assertion for the next transaction and a
//! reset before the connection serves another session. A statement is
//! transparent only if every one of its statements starts with a command
//! from a fixed list, it calls no function outside a fixed list of
//! built-ins (a name followed by `(` is a call, except after the keywords
//! that take a parenthesised list), it uses only the built-in operator
//! spellings below, and its text has no backslash or non-ASCII byte (whose
//! reading depends on settings and encodings, so a call could hide in what
//! looks like a string).
//!
//! What this cannot see, and trusts because the database administrator made
//! it: views, triggers, rules, defaults, domain checks and row-level security
//! policies that call functions. A session that ever ran anything opaque
//! (it may have created such objects for itself) is opaque from then on.

use crate::identity::guard::starts_with_ci;
use crate::identity::lexer::{is_op_char, Dialect, Kind, Lexer};

/// Commands a transparent statement may start with.
const COMMANDS: &[&[u8]] = &[
    b"select",
    b"insert",
    b"update",
    b"delete",
    b"values",
    b"table",
    b"with",
    b"begin",
    b"start",
    b"commit",
    b"end",
    b"rollback",
    b"abort",
    b"savepoint",
    b"release",
    b"show",
    b"declare",
    b"fetch",
    b"move",
    b"close",
    b"set",
    b"reset",
    b"listen",
    b"unlisten",
    b"notify",
];

/// Reserved and column-name keywords (never a function name without
/// quotes) that may be followed by `(`: they take a parenthesised list or
/// subquery, or are special forms and type names the grammar handles itself.
const KEYWORDS: &[&[u8]] = &[
    b"select",
    b"from",
    b"where",
    b"and",
    b"or",
    b"not",
    b"in",
    b"exists",
    b"any",
    b"all",
    b"some",
    b"values",
    b"as",
    b"on",
    b"using",
    b"then",
    b"else",
    b"when",
    b"case",
    b"returning",
    b"distinct",
    b"having",
    b"union",
    b"intersect",
    b"except",
    b"lateral",
    b"row",
    b"array",
    b"cast",
    b"coalesce",
    b"nullif",
    b"greatest",
    b"least",
    b"extract",
    b"position",
    b"substring",
    b"trim",
    b"overlay",
    b"into",
    b"limit",
    b"offset",
    b"group",
    b"window",
    b"between",
    b"numeric",
    b"decimal",
    b"varchar",
    b"char",
    b"character",
    b"bit",
    b"time",
    b"timestamp",
    b"interval",
    b"float",
];

/// Unreserved keywords that a user may also name a function, allowed before
/// `(` only right after the word that makes them a keyword.
const AFTER: &[(&[u8], &[u8])] = &[
    (b"by", b"order"),
    (b"by", b"group"),
    (b"by", b"partition"),
    (b"varying", b"character"),
    (b"over", b")"),
    (b"filter", b")"),
];

/// Built-in functions that run no SQL and change no session state. Called
/// unqualified they resolve in `pg_catalog` first: a `search_path` that
/// names `pg_catalog` or `pg_temp` (and could put something before them)
/// is opaque.
const FUNCTIONS: &[&[u8]] = &[
    b"count",
    b"sum",
    b"avg",
    b"min",
    b"max",
    b"now",
    b"lower",
    b"upper",
    b"length",
    b"abs",
    b"round",
    b"floor",
    b"ceil",
    b"ceiling",
    b"substr",
    b"concat",
    b"concat_ws",
    b"replace",
    b"btrim",
    b"ltrim",
    b"rtrim",
    b"date_trunc",
    b"date_part",
    b"to_char",
    b"to_date",
    b"to_timestamp",
    b"to_number",
    b"array_agg",
    b"string_agg",
    b"bool_and",
    b"bool_or",
    b"json_build_object",
    b"jsonb_build_object",
    b"json_agg",
    b"jsonb_agg",
    b"to_json",
    b"to_jsonb",
    b"row_to_json",
    b"json_object_agg",
    b"jsonb_object_agg",
    b"array_length",
    b"cardinality",
    b"unnest",
    b"generate_series",
    b"md5",
    b"left",
    b"right",
    b"strpos",
    b"split_part",
    b"row_number",
    b"rank",
    b"dense_rank",
    b"lag",
    b"lead",
    b"first_value",
    b"last_value",
    b"current_setting",
    b"clock_timestamp",
    b"statement_timestamp",
    b"transaction_timestamp",
    b"age",
    b"make_interval",
    b"gen_random_uuid",
    b"mod",
    b"power",
    b"sqrt",
    b"char_length",
    b"octet_length",
    b"pg_advisory_xact_lock",
    b"pg_try_advisory_xact_lock",
    b"pg_advisory_xact_lock_shared",
    b"pg_try_advisory_xact_lock_shared",
    b"pg_advisory_lock",
    b"pg_advisory_lock_shared",
    b"pg_try_advisory_lock",
    b"pg_try_advisory_lock_shared",
    b"pg_advisory_unlock",
    b"pg_advisory_unlock_shared",
    b"pg_advisory_unlock_all",
    b"pg_notify",
    b"pg_listening_channels",
    b"pg_backend_pid",
    b"version",
    b"current_database",
];

/// Operator spellings of the built-in operators on built-in types.
const OPERATORS: &[&[u8]] = &[
    b"=", b"<", b">", b"<=", b">=", b"<>", b"!=", b"+", b"-", b"*", b"/", b"%", b"||", b"::",
    b"->", b"->>", b"@>", b"<@",
];

/// Names that make any statement opaque: `UPDATE pg_settings` changes
/// settings through the view's rules.
const OPAQUE_NAMES: &[&[u8]] = &[b"pg_settings"];

/// Settings a client may bring (startup parameters, `options`) that leave
/// its statements transparent (with a `search_path`, see
/// [`settings_transparent`]); anything else makes the session opaque.
const HARMLESS_SETTINGS: &[&[u8]] = &[
    b"application_name",
    b"client_encoding",
    b"datestyle",
    b"intervalstyle",
    b"timezone",
    b"extra_float_digits",
    b"statement_timeout",
    b"lock_timeout",
    b"idle_in_transaction_session_timeout",
];

/// Whether a session with these startup settings stays transparent: a
/// `search_path` may be set too, unless it names `pg_catalog` or `pg_temp`.
pub fn settings_transparent(settings: &[(String, String)]) -> bool {
    settings.iter().all(|(name, value)| {
        one_of(HARMLESS_SETTINGS, name.as_bytes())
            || (name.eq_ignore_ascii_case("search_path") && !names_the_catalog(value.as_bytes()))
    })
}

/// Whether a setting's text names `pg_catalog` or `pg_temp`: placed in
/// `search_path` explicitly, they change what an unqualified built-in name
/// resolves to (a function of the client's own could come before the
/// real one). Any other `SET` runs no code: pg_catalog stays first.
fn names_the_catalog(text: &[u8]) -> bool {
    static CATALOG: crate::identity::keywords::Keywords =
        crate::identity::keywords::Keywords::new(&["pg_catalog", "pg_temp"]);
    CATALOG.in_text(text)
}

fn one_of(list: &[&[u8]], word: &[u8]) -> bool {
    list.iter().any(|k| word.eq_ignore_ascii_case(k))
}

/// Words (lower case) in a set built once: the lists above are long, and a
/// statement may ask about every word it has.
/// Hashed with foldhash, not SipHash: the sets are built once from the
/// lists above, so a client's words can only look up, never crowd a bucket.
type WordSet =
    std::sync::LazyLock<std::collections::HashSet<&'static [u8], foldhash::fast::RandomState>>;

static COMMAND_SET: WordSet = WordSet::new(|| COMMANDS.iter().copied().collect());
static BEFORE_PAREN: WordSet = WordSet::new(|| KEYWORDS.iter().chain(FUNCTIONS).copied().collect());

/// Whether `word`, ignoring ASCII case, is in `set` (whose words are all
/// shorter than 32 bytes).
fn in_set(set: &WordSet, word: &[u8]) -> bool {
    let mut lower = [0u8; 32];
    let Some(buf) = lower.get_mut(..word.len()) else {
        return false;
    };
    for (l, b) in buf.iter_mut().zip(word) {
        *l = b.to_ascii_lowercase();
    }
    set.contains(&*buf)
}

/// Whether pgwarden fully understands what `sql` can do on a server
/// connection (see the module documentation). Linear in `sql`'s length;
/// allocates nothing. Statements made only of words, numbers, parameters,
/// operators and punctuation (no quotes or comments) are read by a byte
/// scanner; anything else by the guard's lexer.
pub fn transparent(sql: &[u8]) -> bool {
    // Two word-at-a-time scans; one byte-by-byte test of both costs more.
    if !sql.is_ascii() || sql.contains(&b'\\') {
        return false;
    }
    if let Some(verdict) = classify(SimpleTokens { src: sql, pos: 0 }) {
        return verdict;
    }
    let lexed =
        Lexer::new(sql, Dialect::DEFAULT).map(|t| Some((t.kind, t.text(sql), t.terminated)));
    classify(lexed).unwrap_or(false)
}

/// A token as [`classify`] reads it: kind, text, and whether it was
/// terminated; `None` when the reader cannot go on (see [`SimpleTokens`]).
type Read<'a> = Option<(Kind, &'a [u8], bool)>;

/// The classification over a stream of tokens; `None` when the stream
/// gave up before a verdict.
fn classify<'a>(tokens: impl Iterator<Item = Read<'a>>) -> Option<bool> {
    let mut at_start = true;
    // The two tokens before the current one, most recent first.
    let mut prev: Option<(Kind, &[u8])> = None;
    let mut prev2: Option<(Kind, &[u8])> = None;
    // After `INTO`: a (qualified) table name, whose `(` opens a column list.
    let mut table_name = false;
    // In a `SET`/`RESET`: its values are read too (see `names_the_catalog`).
    let mut setting = false;
    // `ON CONFLICT (...)` of an upsert, told from a call of a function
    // named `conflict` in a join condition by the `DO` after its `)`:
    // the parenthesis depth it opened at, then whether `DO` must come next.
    let mut depth = 0usize;
    let mut conflict_at: Option<usize> = None;
    let mut expect_do = false;
    for read in tokens {
        let (kind, text, terminated) = read?;
        if !terminated {
            return Some(false);
        }
        if std::mem::take(&mut expect_do)
            && !(kind == Kind::Word && text.eq_ignore_ascii_case(b"do"))
        {
            return Some(false);
        }
        match (kind, text) {
            (Kind::Punct, b"(") => depth += 1,
            (Kind::Punct, b")") => {
                depth = depth.saturating_sub(1);
                if conflict_at == Some(depth) {
                    (conflict_at, expect_do) = (None, true);
                }
            }
            _ => {}
        }
        if setting && names_the_catalog(text) {
            return Some(false);
        }
        match kind {
            Kind::Punct if text == b";" => {
                at_start = true;
                (prev, prev2, table_name, setting) = (None, None, false, false);
                continue;
            }
            Kind::Word if at_start && one_of(&[b"set", b"reset"], text) => setting = true,
            Kind::Word if at_start && !in_set(&COMMAND_SET, text) => return Some(false),
            _ if at_start && kind != Kind::Word => return Some(false),
            Kind::Word if one_of(OPAQUE_NAMES, text) || starts_with_ci(text, b"pg_temp") => {
                return Some(false)
            }
            // `SELECT ... INTO` creates a table; only `INSERT INTO` is known.
            Kind::Word
                if text.eq_ignore_ascii_case(b"into")
                    && !matches!(prev, Some((Kind::Word, w)) if w.eq_ignore_ascii_case(b"insert")) =>
            {
                return Some(false)
            }
            Kind::Punct if text == b"(" && on_conflict(prev, prev2) => {
                conflict_at = Some(depth - 1);
            }
            Kind::Punct if text == b"(" && !table_name && !call_allowed(prev, prev2) => {
                return Some(false)
            }
            Kind::Op if !one_of(OPERATORS, text) => return Some(false),
            Kind::Other | Kind::UnicodeIdent => return Some(false),
            _ => {}
        }
        table_name = in_table_name(table_name, kind, text);
        at_start = false;
        prev2 = prev;
        prev = Some((kind, text));
    }
    if expect_do || conflict_at.is_some() {
        return Some(false);
    }
    Some(true)
}

/// Whether the token after (`kind`, `text`) is still in the table name
/// that follows `INTO` (`table_name`: it was before).
fn in_table_name(table_name: bool, kind: Kind, text: &[u8]) -> bool {
    match kind {
        Kind::Word if text.eq_ignore_ascii_case(b"into") => true,
        Kind::Word | Kind::QuotedIdent => table_name,
        Kind::Punct if text == b"." => table_name,
        _ => false,
    }
}

/// Tokens of simple SQL, read byte by byte: words, numbers, parameters,
/// operators and punctuation, split as PostgreSQL's lexer splits them. At
/// the first byte that could begin anything else (a quote, a comment, a
/// dollar quote, `:=`, `..`) it yields `None`, and the caller reads the
/// statement with the full lexer instead.
struct SimpleTokens<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for SimpleTokens<'a> {
    type Item = Read<'a>;

    fn next(&mut self) -> Option<Read<'a>> {
        let s = self.src;
        let at = |i: usize| s.get(i).copied().unwrap_or(0);
        while matches!(at(self.pos), b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            self.pos += 1;
        }
        let start = self.pos;
        if start >= s.len() {
            return None;
        }
        let word_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
        let b = s[start];
        let (kind, end) = if b.is_ascii_alphabetic() || b == b'_' {
            (Kind::Word, skip_while(s, start + 1, word_char))
        } else if b.is_ascii_digit() || (b == b'.' && at(start + 1).is_ascii_digit()) {
            let end = number_end(s, start);
            if word_char(at(end)) {
                // Junk after a number (`1abc`): lexers disagree on it.
                return Some(None);
            }
            (Kind::Number, end)
        } else if b == b'$' && at(start + 1).is_ascii_digit() {
            let end = skip_while(s, start + 1, |c| c.is_ascii_digit());
            if word_char(at(end)) {
                return Some(None);
            }
            (Kind::Param, end)
        } else if b == b':' && at(start + 1) == b':' {
            (Kind::Op, start + 2)
        } else if (b == b':' && at(start + 1) == b'=') || (b == b'.' && at(start + 1) == b'.') {
            return Some(None);
        } else if is_op_char(b) {
            match operator_end(s, start) {
                Some(end) => (Kind::Op, end),
                None => return Some(None),
            }
        } else if matches!(b, b'(' | b')' | b',' | b';' | b'[' | b']' | b'.' | b':') {
            (Kind::Punct, start + 1)
        } else {
            return Some(None);
        };
        self.pos = end;
        Some(Some((kind, &s[start..end], true)))
    }
}

/// The first index from `i` whose byte does not satisfy `f`.
fn skip_while(s: &[u8], mut i: usize, f: impl Fn(u8) -> bool) -> usize {
    while i < s.len() && f(s[i]) {
        i += 1;
    }
    i
}

/// The end of a numeric constant at `start`: digits, a fraction, an
/// exponent.
fn number_end(s: &[u8], start: usize) -> usize {
    let digits = |mut i: usize| {
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = digits(start);
    if s.get(i) == Some(&b'.') && s.get(i + 1) != Some(&b'.') {
        i = digits(i + 1);
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(s.get(i + 1), Some(b'+' | b'-')));
        if s.get(i + 1 + sign).is_some_and(u8::is_ascii_digit) {
            i = digits(i + 1 + sign);
        }
    }
    i
}

/// The end of the operator at `start`, or `None` where a comment starts
/// inside it. Like the guard's lexer, it keeps a run such as `=-` whole
/// (PostgreSQL would read `=` and `-`): such a run is not a known
/// operator, so the statement is opaque, the cautious reading.
fn operator_end(s: &[u8], start: usize) -> Option<usize> {
    let mut end = start;
    while end < s.len() && is_op_char(s[end]) {
        if matches!(
            (s[end], s.get(end + 1)),
            (b'-', Some(b'-')) | (b'/', Some(b'*'))
        ) {
            return None;
        }
        end += 1;
    }
    Some(end)
}

/// Whether these tokens (most recent first) are `ON CONFLICT`.
fn on_conflict(prev: Option<(Kind, &[u8])>, prev2: Option<(Kind, &[u8])>) -> bool {
    let word = |t: Option<(Kind, &[u8])>, w: &[u8]| matches!(t, Some((Kind::Word, x)) if x.eq_ignore_ascii_case(w));
    word(prev, b"conflict") && word(prev2, b"on")
}

/// Whether a `(` after these tokens (most recent first) is not a call of a
/// function outside [`FUNCTIONS`].
fn call_allowed(prev: Option<(Kind, &[u8])>, prev2: Option<(Kind, &[u8])>) -> bool {
    fn text(t: Option<(Kind, &[u8])>) -> &[u8] {
        t.map(|(_, w)| w).unwrap_or_default()
    }
    match prev {
        // A subexpression, a list, or a subquery.
        None | Some((Kind::Punct | Kind::Op, _)) => true,
        // Qualified names may be anyone's function.
        Some((Kind::Word, _)) if text(prev2) == b"." => false,
        Some((Kind::Word, w)) => {
            in_set(&BEFORE_PAREN, w)
                || AFTER.iter().any(|(k, after)| {
                    w.eq_ignore_ascii_case(k) && text(prev2).eq_ignore_ascii_case(after)
                })
                || matches!(prev2, Some((Kind::Word, a)) if a.eq_ignore_ascii_case(b"as"))
        }
        Some(_) => false,
    }
}

#[cfg(test)]
#[path = "opaque_tests.rs"]
mod tests;
