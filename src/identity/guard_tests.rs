//! Unit tests of the statement guard: the shared test table, messages,
//! dialects, dynamic SQL policies and a no-panic fuzz loop.

use super::guard::{suspicious, DynamicSql, Guard, Violation};
use super::guard_cases::{
    DYNAMIC_ESCAPES, DYNAMIC_LEGITIMATE, ESCAPES, LEGITIMATE, STAGED_ESCAPES,
};
use super::runs_sql_argument;

fn guard() -> Guard {
    Guard::new("app.client_user")
}

fn refused(sql: &str) -> Violation {
    guard().check(sql.as_bytes()).expect_err(sql)
}

#[test]
fn table_sizes() {
    assert!(ESCAPES.len() >= 50, "{}", ESCAPES.len());
    assert!(LEGITIMATE.len() >= 25, "{}", LEGITIMATE.len());
}

#[test]
fn every_escape_is_refused() {
    let g = guard();
    let passed: Vec<&str> = ESCAPES
        .iter()
        .copied()
        .filter(|s| g.check(s.as_bytes()).is_ok())
        .collect();
    assert!(passed.is_empty(), "escapes that passed: {passed:#?}");
}

#[test]
fn every_legitimate_statement_passes() {
    let g = guard();
    let refused: Vec<(&str, String)> = LEGITIMATE
        .iter()
        .filter_map(|s| g.check(s.as_bytes()).err().map(|v| (*s, v.to_string())))
        .collect();
    assert!(
        refused.is_empty(),
        "legitimate statements refused: {refused:#?}"
    );
}

#[test]
fn the_tables_hold_under_the_strict_policy_too() {
    let g = guard().with_dynamic_sql(DynamicSql::Refuse);
    for s in LEGITIMATE {
        assert!(g.check(s.as_bytes()).is_ok(), "{s}");
    }
    for s in ESCAPES {
        assert!(g.check(s.as_bytes()).is_err(), "{s}");
    }
}

#[test]
fn dynamic_escapes_are_refused_by_default_naming_the_option() {
    let g = guard().with_dynamic_sql(DynamicSql::Refuse);
    for s in DYNAMIC_ESCAPES {
        let v = g.check(s.as_bytes()).expect_err(s);
        let msg = v.to_string();
        assert!(
            msg.contains("dynamic SQL") && msg.contains("allow_dynamic_sql"),
            "{s}: {msg}"
        );
    }
}

#[test]
fn legitimate_dynamic_sql_needs_the_heuristic() {
    let strict = guard().with_dynamic_sql(DynamicSql::Refuse);
    for s in DYNAMIC_LEGITIMATE {
        assert!(guard().check(s.as_bytes()).is_ok(), "{s}");
        assert!(strict.check(s.as_bytes()).is_err(), "{s}");
    }
}

#[test]
fn constant_execute_is_checked_as_sql_under_the_strict_policy() {
    let strict = guard().with_dynamic_sql(DynamicSql::Refuse);
    assert!(strict
        .check(b"DO $$BEGIN EXECUTE 'CREATE TEMP TABLE t(x int)'; END$$")
        .is_ok());
    assert!(strict
        .check(b"CREATE FUNCTION pg_temp.f() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'SELECT 1'; END$$")
        .is_ok());
    let v = strict
        .check(b"DO $$BEGIN EXECUTE 'SET ROLE x'; END$$")
        .unwrap_err();
    assert_eq!(v.what, "SET ROLE inside a DO block");
    let v = strict.check(b"DO $$BEGIN EXECUTE v; END$$").unwrap_err();
    assert_eq!(
        v.to_string(),
        "dynamic SQL (EXECUTE of SQL that is not a string constant) inside a DO block \
         is not allowed through pgwarden; set [identity] allow_dynamic_sql = true to allow dynamic SQL"
    );
}

#[test]
fn sql_runners_are_known_by_name() {
    for name in [
        "query_to_xml",
        "QUERY_TO_XMLSCHEMA",
        "pg_catalog.query_to_xml_and_xmlschema",
        "PG_CATALOG.ts_stat",
        "ts_rewrite",
    ] {
        assert!(runs_sql_argument(name), "{name}");
    }
    for name in [
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "set_config",
        "query_to",
        "public.ts_stat",
        "",
    ] {
        assert!(!runs_sql_argument(name), "{name}");
    }
}

#[test]
fn sql_runner_arguments() {
    let strict = guard().with_dynamic_sql(DynamicSql::Refuse);
    for sql in [
        "SELECT query_to_xml(q, true, true, '') FROM t",
        "SELECT query_to_xml('SELECT 1' || '', true, true, '')",
        "SELECT query_to_xml('SELECT 1'::name, true, true, '')",
        "SELECT ts_rewrite(q, s) FROM t",
        "SELECT ts_stat(ARRAY['x', 'y'][1])",
        "SELECT query_to_xml(nulls => true, query => q, tableforest => true, targetns => '')",
        "CREATE OPERATOR pg_temp.### (FUNCTION = ts_rewrite, LEFTARG = tsquery, RIGHTARG = text)",
        "CREATE OPERATOR pg_temp.### (FUNCTION = 'ts_rewrite', LEFTARG = tsquery, RIGHTARG = text)",
    ] {
        assert!(strict.check(sql.as_bytes()).is_err(), "{sql}");
    }
    for sql in [
        "SELECT query_to_xml('SELECT 1'::text, n, f, ns) FROM t",
        "SELECT ts_rewrite(q, t.a, t.b) FROM t",
        "SELECT ts_stat('SELECT v FROM t', w) FROM t",
    ] {
        assert!(strict.check(sql.as_bytes()).is_ok(), "{sql}");
    }
}

#[test]
fn staged_escapes_pass_the_setup_and_refuse_the_attack() {
    let g = guard();
    for (setup, attack) in STAGED_ESCAPES {
        assert!(g.check(setup.as_bytes()).is_ok(), "{setup}");
        assert!(
            g.check(attack).is_err(),
            "{}",
            String::from_utf8_lossy(attack)
        );
    }
}

#[test]
fn messages_name_what_was_refused() {
    let msg = |sql: &str| refused(sql).to_string();
    assert_eq!(
        msg("RESET ROLE"),
        "RESET ROLE is not allowed through pgwarden"
    );
    assert_eq!(
        msg("set role x"),
        "SET ROLE is not allowed through pgwarden"
    );
    assert_eq!(
        msg("DISCARD ALL"),
        "DISCARD ALL is not allowed through pgwarden"
    );
    assert_eq!(
        msg("RESET ALL"),
        "RESET ALL is not allowed through pgwarden"
    );
    assert_eq!(
        msg("SET app.client_user = 'x'"),
        "SET app.client_user is not allowed through pgwarden"
    );
    assert_eq!(
        msg("SET SESSION AUTHORIZATION DEFAULT"),
        "SET SESSION AUTHORIZATION is not allowed through pgwarden"
    );
    assert_eq!(
        msg("DO $$BEGIN RESET ROLE; END$$"),
        "RESET ROLE inside a DO block is not allowed through pgwarden"
    );
    assert_eq!(
        refused("SELECT set_config('Role', 'x', false)").what,
        "set_config() of ROLE"
    );
    assert!(refused("SELECT set_config($1, 'x', false)")
        .what
        .contains("not a string constant"));
    assert!(
        refused("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET role = x AS 'SELECT 1'")
            .what
            .contains("function definition")
    );
}

#[test]
fn the_setting_name_comes_from_the_configuration() {
    let g = Guard::new("myapp.end_user");
    assert!(g.check(b"SET myapp.END_USER = 'x'").is_err());
    assert!(g
        .check(b"SELECT set_config('myapp.end_user', 'x', false)")
        .is_err());
    assert!(g.check(b"SET app.client_user = 'x'").is_ok());
    assert!(g.check(b"RESET role").is_err());
}

#[test]
fn extended_protocol_parameters_are_not_constants() {
    assert!(refused("SELECT set_config($1, $2, false)")
        .what
        .contains("not a string constant"));
    assert!(guard()
        .check(b"SELECT set_config('search_path', $1, false)")
        .is_ok());
}

#[test]
fn function_set_clauses_and_role_defaults() {
    for sql in [
        "ALTER FUNCTION f() SET role = x",
        "ALTER ROUTINE f RESET role",
        "ALTER PROCEDURE p() SET app.client_user FROM CURRENT",
        "ALTER ROLE alice SET role = 'x'",
        "ALTER ROLE alice IN DATABASE d SET app.client_user = 'bob'",
        "ALTER DATABASE d SET session_authorization = 'x'",
        "CREATE PROCEDURE p() LANGUAGE sql SET SESSION AUTHORIZATION x AS 'SELECT 1'",
    ] {
        assert!(guard().check(sql.as_bytes()).is_err(), "{sql}");
    }
    for sql in [
        "ALTER FUNCTION f() SET search_path = public",
        "ALTER FUNCTION f() RESET ALL",
        "ALTER ROLE alice SET search_path = public",
        "ALTER ROLE alice RENAME TO reset",
        "ALTER USER MAPPING FOR alice SERVER s OPTIONS (SET role 'x')",
        "CREATE FUNCTION f(role text) RETURNS SETOF text LANGUAGE sql AS 'SELECT role'",
    ] {
        assert!(guard().check(sql.as_bytes()).is_ok(), "{sql}");
    }
}

#[test]
fn dynamic_sql_policies() {
    let ddl = b"DO $$BEGIN EXECUTE format('CREATE TABLE %I (id int)', 't1'); END$$";
    let fragments = b"DO $$BEGIN EXECUTE 'S' || 'ET R' || 'OLE x'; END$$";
    let via_variable = b"DO $$DECLARE q text; BEGIN q := current_setting('x.q'); EXECUTE q; END$$";
    let heuristic = guard();
    assert!(heuristic.check(ddl).is_ok());
    // The documented residual risk of the heuristic.
    assert!(heuristic.check(fragments).is_ok());
    assert!(heuristic.check(via_variable).is_ok());
    let strict = guard().with_dynamic_sql(DynamicSql::Refuse);
    assert!(strict.check(ddl).is_err());
    assert!(strict.check(fragments).is_err());
    assert!(strict.check(via_variable).is_err());
    assert!(strict
        .check(b"DO $$BEGIN EXECUTE 'SELECT 1' INTO x; END$$")
        .is_ok());
    assert!(strict.check(b"DO LANGUAGE plperl $$ 1; $$").is_err());
    assert!(heuristic.check(b"DO LANGUAGE plperl $$ 1; $$").is_ok());
    assert!(heuristic
        .check(b"DO LANGUAGE plperl $$ spi_exec_query('SET ROLE x') $$")
        .is_err());
}

#[test]
fn strings_outside_bodies_are_data() {
    for sql in [
        "SELECT 'SET ROLE x; RESET ALL'",
        "SELECT E'\\x53ET ROLE x'",
        "INSERT INTO t VALUES ($a$DO $x$BEGIN SET ROLE y; END$x$$a$)",
        "COMMENT ON FUNCTION f() IS 'calls set_config(''role'', ...)'",
    ] {
        assert!(guard().check(sql.as_bytes()).is_ok(), "{sql}");
    }
}

#[test]
fn overlong_identifiers_are_compared_after_truncation() {
    let long = format!("app.{}", "u".repeat(60));
    let g = Guard::new(&long);
    let sql = format!("SET app.{} = 'x'", "u".repeat(70));
    assert!(g.check(sql.as_bytes()).is_err());
    assert!(guard().check(sql.as_bytes()).is_ok());
}

#[test]
fn fast_path_skips_ordinary_statements() {
    assert!(!suspicious(
        b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    ));
    assert!(!suspicious(
        b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, now())"
    ));
    assert!(suspicious(
        b"UPDATE pgbench_accounts SET abalance = abalance + $1"
    ));
    assert!(suspicious(b"do $$ $$"));
    assert!(suspicious(b"SELECT u&\"x\""));
    assert!(!suspicious(b"SELECT done, todo_list FROM document"));
}

#[test]
fn deep_nesting_is_refused_not_slow() {
    let mut sql = String::from("SELECT 1");
    for _ in 0..12 {
        sql = format!("DO '{}'", sql.replace('\'', "''"));
    }
    let start = std::time::Instant::now();
    assert!(guard().check(sql.as_bytes()).is_err());
    assert!(start.elapsed().as_secs() < 5);
}

/// xorshift64*: deterministic, dependency-free randomness for the fuzz loop.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_bytes_never_panic() {
    const ALPHABET: &[u8] = b"'\"$\\;-/*()., \nEeUu&xXbBsetrolSETROL_012!0";
    let g = guard();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let corpus: Vec<&[u8]> = ESCAPES
        .iter()
        .chain(LEGITIMATE)
        .map(|s| s.as_bytes())
        .chain(STAGED_ESCAPES.iter().map(|(_, b)| *b))
        .collect();
    for round in 0..20_000 {
        let mut buf = Vec::new();
        match round % 3 {
            // Pure noise, biased toward SQL's special characters.
            0 => {
                for _ in 0..rng.below(64) {
                    let b = if rng.below(4) == 0 {
                        rng.next() as u8
                    } else {
                        ALPHABET[rng.below(ALPHABET.len())]
                    };
                    buf.push(b);
                }
            }
            // A corpus entry with a few bytes overwritten, inserted or cut.
            1 => {
                buf.extend_from_slice(corpus[rng.below(corpus.len())]);
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(buf.len() + 1);
                    match rng.below(3) {
                        0 if at < buf.len() => buf[at] = ALPHABET[rng.below(ALPHABET.len())],
                        1 => buf.insert(at, rng.next() as u8),
                        _ => buf.truncate(at),
                    }
                }
            }
            // Two corpus entries spliced at random points.
            _ => {
                let a = corpus[rng.below(corpus.len())];
                let b = corpus[rng.below(corpus.len())];
                buf.extend_from_slice(&a[..rng.below(a.len() + 1)]);
                buf.extend_from_slice(&b[rng.below(b.len() + 1)..]);
            }
        }
        let first = g.check(&buf);
        assert_eq!(first, g.check(&buf), "deterministic");
    }
}

#[test]
fn escapes_stay_refused_behind_statements_and_with_comments_between_tokens() {
    use super::lexer::tokens;
    const FILLERS: [&str; 4] = ["/**/", " /* ; */ ", "--;\n", "\n\t"];
    let g = guard();
    let mut rng = Rng(7);
    for (n, escape) in ESCAPES.iter().enumerate() {
        let prefix = LEGITIMATE[n % LEGITIMATE.len()];
        let behind = format!("{prefix}\n; {escape}");
        assert!(g.check(behind.as_bytes()).is_err(), "{behind}");
        let bounds: Vec<usize> = tokens(escape.as_bytes()).iter().map(|t| t.end).collect();
        for _ in 0..8 {
            let at = bounds[rng.below(bounds.len())];
            let filler = FILLERS[rng.below(FILLERS.len())];
            let commented = format!("{}{filler}{}", &escape[..at], &escape[at..]);
            assert!(g.check(commented.as_bytes()).is_err(), "{commented}");
        }
    }
}

#[test]
fn a_parse_may_leave_set_configs_name_to_its_bound_value() {
    let g = guard();
    for (sql, params) in [
        ("SELECT set_config($1, $2, false)", vec![1]),
        (
            "SELECT pg_catalog.set_config($2, $1, true), set_config($3, 'x', false)",
            vec![2, 3],
        ),
        (
            "WITH s AS (SELECT set_config($1, $2, false)) SELECT * FROM s",
            vec![1],
        ),
        ("VALUES (set_config($1, $2, false));", vec![1]),
        ("SELECT set_config('work_mem', $1, false)", vec![]),
    ] {
        assert_eq!(g.check_parse(sql.as_bytes()).expect(sql), params, "{sql}");
    }
    // Only where `$n` is certainly a bound value, and only as the bare name.
    for sql in [
        "SELECT set_config($1, $2, false)",
        "SELECT set_config($1 || '', 'x', false)",
        "SELECT set_config($1::text, 'x', false)",
        "SELECT set_config($0, 'x', false)",
        "CREATE FUNCTION f(text) RETURNS text RETURN set_config($1, 'engineer', false)",
        "PREPARE p(text) AS SELECT set_config($1, 'engineer', false)",
        "SELECT 1; SELECT set_config($1, 'engineer', false)",
        "DO $$BEGIN PERFORM set_config($1, 'x', false); END$$",
        "SELECT query_to_xml('SELECT set_config($1, 1, false)', true, true, '')",
    ] {
        let parse_ok = g.check_parse(sql.as_bytes()).is_ok();
        let is_plain_parse = sql == "SELECT set_config($1, $2, false)";
        assert_eq!(parse_ok, is_plain_parse, "{sql}");
        assert!(g.check(sql.as_bytes()).is_err(), "simple query: {sql}");
    }
}

#[test]
fn a_bound_setting_name_is_judged_like_a_constant_one() {
    let g = guard();
    for name in [
        "role",
        "ROLE",
        "session_authorization",
        "app.client_user",
        "App.Client_User",
        "role   ",
    ] {
        assert!(g.bound_setting_name(name.as_bytes()).is_err(), "{name}");
    }
    for name in ["work_mem", "search_path", "app.tenant", " role", ""] {
        assert!(g.bound_setting_name(name.as_bytes()).is_ok(), "{name}");
    }
}

#[test]
fn execute_of_other_statements_is_no_concern() {
    let g = guard();
    for sql in [
        "EXECUTE my_plan(1)",
        "EXECUTE pgwardenx(1)",
        "SELECT 'EXECUTE pgwarden_x'",
        "PREPARE plan AS SELECT 1",
    ] {
        assert!(g.check(sql.as_bytes()).is_ok(), "{sql}");
    }
    assert!(g.check(b"PREPARE pgwarden_0123 AS SELECT 1").is_err());
}
