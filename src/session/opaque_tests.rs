//! Unit tests of the statement classifier: what is transparent, what is
//! opaque, and the byte scanner against the lexer.

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
        "INSERT INTO t VALUES (1) ON CONFLICT (lower(name), (id + 1)) DO NOTHING",
        "SET statement_timeout = '5s'",
        "SET SESSION TIME ZONE 'UTC'",
        "SET search_path = tenant_1, public",
        "RESET work_mem",
        "SET LOCAL lock_timeout TO 1000",
        "LISTEN jobs",
        "NOTIFY jobs, 'payload'",
        "UNLISTEN *",
        "SELECT pg_notify('jobs', 'x')",
        "SELECT pg_advisory_lock(42), pg_try_advisory_lock_shared(1, 2)",
        "SELECT pg_advisory_unlock_all()",
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
        "SET search_path = 'evil, pg_catalog'",
        "SET search_path TO \"pg_temp\", public",
        "SET SCHEMA 'pg_catalog'",
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
        "SELECT 1 FROM t a JOIN t b ON conflict(a.id) LIMIT 1",
        "SELECT 1 FROM t a JOIN t b ON conflict(a.id) WHERE true",
        "SELECT 1 FROM t a JOIN t b ON conflict(a.id)",
        "",
    ] {
        // The empty statement runs nothing, and is transparent.
        assert_eq!(transparent(sql.as_bytes()), sql.is_empty(), "{sql}");
    }
}

#[test]
fn select_into_and_temp_schemas_are_opaque() {
    assert!(!transparent(
        b"SELECT * INTO pg_temp_3.tickets FROM tickets"
    ));
    assert!(!transparent(b"SELECT * INTO newtable FROM tickets"));
    assert!(!transparent(b"SELECT * FROM pg_temp_3.tickets"));
    assert!(transparent(b"INSERT INTO t (a) VALUES (1)"));
}

/// The verdict of the full lexer alone, for comparison.
fn lexed(sql: &[u8]) -> bool {
    use crate::identity::lexer::{Dialect, Lexer};
    let tokens =
        Lexer::new(sql, Dialect::DEFAULT).map(|t| Some((t.kind, t.text(sql), t.terminated)));
    super::classify(tokens).unwrap_or(false)
}

proptest::proptest! {
    /// The byte scanner of simple statements reaches the verdict the
    /// full lexer reaches, whatever the words, numbers, operators and
    /// punctuation (comments and quotes make it give up, never decide).
    #[test]
    fn the_simple_scanner_agrees_with_the_lexer(
        parts in proptest::collection::vec(proptest::sample::select(vec![
            "select", "insert", "into", "t", "(", ")", ",", ";", "=", "<>", "+", "-",
            "*", "/", "::", ".", "1", "1.5", "2e3", ".5", "$1", "count", "lower",
            "evil", "x", "as", "from", "where", "in", "values", "pg_temp", "=-",
            "||", "->>", "@>", "-1", "--", "/*", "'", "\"", "$$", ":", "[", "]",
            "update", "set", "by", "order", "on", "conflict", "begin", "commit",
            "e1", "1e", "1..2", ":=", "!", "<=>", "+-", "~-",
        ]), 0..14),
        spaces in proptest::collection::vec(proptest::bool::ANY, 14),
    ) {
        let mut sql = String::new();
        for (i, p) in parts.iter().enumerate() {
            sql.push_str(p);
            if spaces[i] {
                sql.push(' ');
            }
        }
        let fast = super::classify(super::SimpleTokens { src: sql.as_bytes(), pos: 0 });
        if let Some(verdict) = fast {
            proptest::prop_assert_eq!(verdict, lexed(sql.as_bytes()), "{}", sql);
        }
    }
}

proptest::proptest! {
    /// Whatever the bytes, a statement that names a function outside the
    /// list, followed by `(`, outside strings and comments, is opaque.
    #[test]
    fn a_call_of_an_unknown_function_is_never_transparent(
        prefix in "[a-z0-9 ,=*()']{0,30}",
        name in "[a-z_]{1,12}",
    ) {
        // After an operator, so the name is never an alias (`AS x(...)`).
        let sql = format!("SELECT {prefix} + zz{name}(1)");
        let balanced_quotes = prefix.matches('\'').count() % 2 == 0;
        if balanced_quotes {
            proptest::prop_assert!(!transparent(sql.as_bytes()), "{}", sql);
        }
    }
}
