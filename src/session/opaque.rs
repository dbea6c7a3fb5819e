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
use crate::identity::lexer::{Dialect, Kind, Lexer};

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
    (b"conflict", b"on"),
    (b"varying", b"character"),
    (b"over", b")"),
    (b"filter", b")"),
];

/// Built-in functions that run no SQL and change no session state. Called
/// unqualified they resolve in `pg_catalog` first, since a session that
/// changes `search_path` is opaque.
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
/// its statements transparent: anything else (`search_path` first of all,
/// which decides what an unqualified name calls) makes the session opaque.
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

/// Whether a session with these startup settings stays transparent.
pub fn settings_transparent(settings: &[(String, String)]) -> bool {
    settings
        .iter()
        .all(|(name, _)| one_of(HARMLESS_SETTINGS, name.as_bytes()))
}

fn one_of(list: &[&[u8]], word: &[u8]) -> bool {
    list.iter().any(|k| word.eq_ignore_ascii_case(k))
}

/// Whether pgwarden fully understands what `sql` can do on a server
/// connection (see the module documentation). Linear in `sql`'s length;
/// allocates nothing.
pub fn transparent(sql: &[u8]) -> bool {
    if sql.iter().any(|&b| b == b'\\' || b >= 0x80) {
        return false;
    }
    let mut at_start = true;
    // The two tokens before the current one, most recent first.
    let mut prev: Option<(Kind, &[u8])> = None;
    let mut prev2: Option<(Kind, &[u8])> = None;
    // After `INTO`: a (qualified) table name, whose `(` opens a column list.
    let mut table_name = false;
    for tok in Lexer::new(sql, Dialect::DEFAULT) {
        let text = tok.text(sql);
        if !tok.terminated {
            return false;
        }
        match tok.kind {
            Kind::Punct if text == b";" => {
                at_start = true;
                (prev, prev2, table_name) = (None, None, false);
                continue;
            }
            Kind::Word if at_start && !one_of(COMMANDS, text) => return false,
            _ if at_start && tok.kind != Kind::Word => return false,
            Kind::Word if one_of(OPAQUE_NAMES, text) || starts_with_ci(text, b"pg_temp") => {
                return false
            }
            // `SELECT ... INTO` creates a table; only `INSERT INTO` is known.
            Kind::Word
                if text.eq_ignore_ascii_case(b"into")
                    && !matches!(prev, Some((Kind::Word, w)) if w.eq_ignore_ascii_case(b"insert")) =>
            {
                return false
            }
            Kind::Punct if text == b"(" && !table_name && !call_allowed(prev, prev2) => {
                return false
            }
            Kind::Op if !one_of(OPERATORS, text) => return false,
            Kind::Other | Kind::UnicodeIdent => return false,
            _ => {}
        }
        table_name = match tok.kind {
            Kind::Word if text.eq_ignore_ascii_case(b"into") => true,
            Kind::Word | Kind::QuotedIdent => table_name,
            Kind::Punct if text == b"." => table_name,
            _ => false,
        };
        at_start = false;
        prev2 = prev;
        prev = Some((tok.kind, text));
    }
    true
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
            one_of(KEYWORDS, w)
                || one_of(FUNCTIONS, w)
                || AFTER.iter().any(|(k, after)| {
                    w.eq_ignore_ascii_case(k) && text(prev2).eq_ignore_ascii_case(after)
                })
                || matches!(prev2, Some((Kind::Word, a)) if a.eq_ignore_ascii_case(b"as"))
        }
        Some(_) => false,
    }
}

/// `None` if no statement of `sql` ends its transaction keeping its
/// effects (`COMMIT`, `END`, `PREPARE TRANSACTION`, `... AND CHAIN`);
/// otherwise whether another statement follows one that does.
fn commit_then_more(sql: &[u8]) -> Option<bool> {
    let mut ended = false;
    let mut first: Option<&[u8]> = None;
    let mut ends = false;
    for tok in Lexer::new(sql, Dialect::DEFAULT) {
        let text = tok.text(sql);
        if tok.is_punct(sql, b";") {
            ended |= ends;
            (first, ends) = (None, false);
            continue;
        }
        if first.is_none() {
            if ended {
                return Some(true);
            }
            first = Some(text);
            ends = one_of(&[b"commit", b"end"], text);
        }
        let prepare = first.is_some_and(|f| f.eq_ignore_ascii_case(b"prepare"));
        if tok.kind == Kind::Word
            && (text.eq_ignore_ascii_case(b"chain")
                || (prepare && text.eq_ignore_ascii_case(b"transaction")))
        {
            ends = true;
        }
    }
    (ended || ends).then_some(false)
}

/// Whether a statement of `sql` commits and at once starts a new
/// transaction (`COMMIT AND CHAIN`, `END AND CHAIN`; not `AND NO CHAIN`):
/// after opaque code, that transaction would run before pgwarden could
/// assert identity afresh.
pub fn commits_and_chains(sql: &[u8]) -> bool {
    let mut first: Option<&[u8]> = None;
    let mut prev: &[u8] = b"";
    for tok in Lexer::new(sql, Dialect::DEFAULT) {
        let text = tok.text(sql);
        if tok.is_punct(sql, b";") {
            first = None;
            continue;
        }
        let first = *first.get_or_insert(text);
        if tok.kind == Kind::Word
            && text.eq_ignore_ascii_case(b"chain")
            && one_of(&[b"commit", b"end"], first)
            && !prev.eq_ignore_ascii_case(b"no")
        {
            return true;
        }
        prev = text;
    }
    false
}

/// Whether `sql` runs a `DO` block whose body controls transactions
/// (`COMMIT` or `ROLLBACK` inside): code after its COMMIT would run in a
/// new transaction before pgwarden could assert identity afresh.
pub fn do_block_commits(sql: &[u8]) -> bool {
    if !crate::session::state::contains_ci(sql, b"do") {
        return false;
    }
    let toks: Vec<_> = Lexer::new(sql, Dialect::DEFAULT).collect();
    let mut at_start = true;
    let mut in_do = false;
    for t in &toks {
        if t.is_punct(sql, b";") {
            (at_start, in_do) = (true, false);
            continue;
        }
        if at_start && t.is_word(sql, b"do") {
            in_do = true;
        } else if in_do && matches!(t.kind, Kind::Str(_)) {
            let body = crate::identity::decode::string_value(sql, t, Dialect::DEFAULT, b'\\');
            let controls = Lexer::new(&body, Dialect::DEFAULT)
                .any(|b| b.is_word(&body, b"commit") || b.is_word(&body, b"rollback"));
            if controls {
                return true;
            }
        }
        at_start = false;
    }
    false
}

/// Whether `sql` ends a transaction (and keeps its effects): see
/// [`continues_after_commit`].
pub fn ends_transaction(sql: &[u8]) -> bool {
    commit_then_more(sql).is_some()
}

/// Whether `sql` commits a transaction and then runs more statements: after
/// opaque code, those would run in a new transaction before pgwarden could
/// assert identity afresh, so such a string is refused.
pub fn continues_after_commit(sql: &[u8]) -> bool {
    commit_then_more(sql) == Some(true)
}

#[cfg(test)]
mod tests {
    use super::transparent;

    #[test]
    fn plain_statements_are_transparent() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "select 1",
            "BEGIN",
            "END;",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP)",
            "INSERT INTO public.t (a) VALUES ($1) RETURNING id",
            "SELECT count(*), max(x) FROM t WHERE y IN (1, 2) AND EXISTS (SELECT 1)",
            "SELECT 'set_config(''role'', ''x'')'",
            "SELECT x::numeric(10, 2) FROM t",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "SELECT 1; SELECT 2",
            "SELECT $$ evil() $$",
            "DECLARE c CURSOR FOR SELECT * FROM t; FETCH 10 FROM c",
            "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET x = 2",
        ] {
            assert!(transparent(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn anything_that_may_run_unseen_code_is_opaque() {
        for sql in [
            "DO $$BEGIN PERFORM 1; END$$",
            "SELECT my_function()",
            "SELECT set_config('role', 'x', false)",
            "SELECT \"set_config\"('work_mem', '1MB', false)",
            "SELECT public.lower(x) FROM t",
            "SELECT pg_catalog.query_to_xml('select 1', true, true, '')",
            "SELECT * FROM generate_series(1, 3) g, evil(g)",
            "SELECT 1 === 2",
            "SELECT OPERATOR(pg_catalog.+)(1, 2)",
            "UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'",
            "CREATE TEMP TABLE t (x int)",
            "SET search_path = evil, pg_catalog",
            "SELECT 1; CALL p()",
            "SELECT 'unterminated",
            "SELECT E'\\x41'",
            "SELECT 'é'",
            "PREPARE p AS SELECT 1",
            "EXECUTE p",
            "COPY t FROM STDIN",
            "SELECT x FROM t WHERE evil(x)",
            "SELECT pg_catalog.lower(name) FROM t",
            "SELECT set(1)",
            "SELECT * FROM a JOIN (SELECT 1) b ON true",
            "",
        ] {
            // The empty statement runs nothing, and is transparent.
            assert_eq!(transparent(sql.as_bytes()), sql.is_empty(), "{sql}");
        }
    }

    #[test]
    fn commits_followed_by_more() {
        use super::{continues_after_commit, ends_transaction};
        for sql in [
            "SELECT f(); COMMIT; SELECT 1",
            "BEGIN; DO $$ $$; END; SELECT 1",
            "COMMIT AND CHAIN; SELECT 1",
            "PREPARE TRANSACTION 'x'; SELECT 1",
        ] {
            assert!(continues_after_commit(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "BEGIN; CREATE TABLE t (x int); COMMIT",
            "COMMIT;",
            "SELECT 'commit'; SELECT 1",
            "ROLLBACK; SELECT 1",
        ] {
            assert!(!continues_after_commit(sql.as_bytes()), "{sql}");
        }
        assert!(ends_transaction(b"COMMIT"));
        assert!(ends_transaction(b"end"));
        assert!(ends_transaction(b"COMMIT AND CHAIN"));
        assert!(!ends_transaction(b"SELECT 1"));
        assert!(!ends_transaction(b"ROLLBACK"));
    }

    #[test]
    fn chains_into_do_commits_and_select_into() {
        use super::{commits_and_chains, do_block_commits};
        assert!(commits_and_chains(b"BEGIN; SELECT 1; COMMIT AND CHAIN"));
        assert!(commits_and_chains(b"end and chain"));
        assert!(!commits_and_chains(b"COMMIT AND NO CHAIN"));
        assert!(!commits_and_chains(b"ROLLBACK AND CHAIN"));
        assert!(!commits_and_chains(b"SELECT 'commit and chain'"));
        assert!(do_block_commits(b"DO $$BEGIN PERFORM 1; COMMIT; END$$"));
        assert!(do_block_commits(b"do 'begin rollback; end'"));
        assert!(!do_block_commits(
            b"DO $$BEGIN RAISE NOTICE 'commit'; END$$"
        ));
        assert!(!do_block_commits(b"SELECT 'do $$ commit $$'"));
        assert!(!transparent(
            b"SELECT * INTO pg_temp_3.tickets FROM tickets"
        ));
        assert!(!transparent(b"SELECT * INTO newtable FROM tickets"));
        assert!(!transparent(b"SELECT * FROM pg_temp_3.tickets"));
        assert!(transparent(b"INSERT INTO t (a) VALUES (1)"));
    }

    proptest::proptest! {
        /// Whatever the bytes, a statement that names a function outside the
        /// list, followed by `(`, outside strings and comments, is opaque.
        #[test]
        fn a_call_of_an_unknown_function_is_never_transparent(
            prefix in "[a-z0-9 ,=*()']{0,30}",
            name in "[a-z_]{1,12}",
        ) {
            let sql = format!("SELECT {prefix} zz{name}(1)");
            let balanced_quotes = prefix.matches('\'').count() % 2 == 0;
            if balanced_quotes {
                proptest::prop_assert!(!transparent(sql.as_bytes()), "{}", sql);
            }
        }
    }
}
