//! The adversarial test table of the statement guard, shared by the unit
//! tests here and the end-to-end tests through the gateway.
//!
//! Invariant: every entry is SQL that PostgreSQL 15 accepts and runs as
//! written, in a database with a table `guard_t(id int, role text)`, where
//! the session is the service user (a member of `other_role`) with `role`
//! set to a client's mapped role, `app.client_user` as the client-user
//! setting, and the right to create temporary objects. Without the guard,
//! each [`ESCAPES`] entry changes `current_user` or `app.client_user`, or
//! runs code as `other_role` (entries marked "during the call" record that
//! in `app.seen_role`); the guard must refuse all of them. Each
//! [`LEGITIMATE`] entry succeeds and changes neither; the guard must pass
//! all of them. Entries that leave a transaction open say so.

/// Escape attempts: the guard must refuse every one.
pub const ESCAPES: &[&str] = &[
    // The gateway's own statements run only through Bind, whose values it
    // checks (their names show in PostgreSQL's errors).
    "EXECUTE pgwarden_0123456789abcdef0123456789abcdef('role', 'other_role')",
    "explain analyze execute PGWARDEN_0123456789abcdef0123456789abcdef('role', 'x')",
    "EXECUTE \"pgwarden_0123456789abcdef0123456789abcdef\"('role', 'x')",
    "EXECUTE U&\"pgwarden\\005f0123456789abcdef0123456789abcdef\"('role', 'x')",
    "DO $$BEGIN EXECUTE 'EXECUTE pgwarden_0123456789abcdef0123456789abcdef(''role'', ''x'')'; END$$",
    "PREPARE pgwarden_0123456789abcdef0123456789abcdef(text) AS SELECT 1",
    // The plain commands, in any case and spacing.
    "SET ROLE other_role",
    "set role other_role",
    "SeT rOlE other_role",
    "SET ROLE 'other_role'",
    "SET SESSION ROLE other_role",
    "SET ROLE NONE",
    "RESET ROLE",
    "reset role",
    "SET role TO DEFAULT",
    "SET role = 'other_role'",
    "SET \"role\" TO other_role",
    "SET \"ROLE\" = 'other_role'",
    "SET U&\"r\\006Fle\" TO other_role",
    "BEGIN; SET LOCAL ROLE other_role", // leaves the transaction open
    "BEGIN; SET LOCAL role = 'other_role'", // leaves the transaction open
    "SET SESSION AUTHORIZATION DEFAULT",
    "set session authorization default",
    "SET SESSION SESSION AUTHORIZATION DEFAULT",
    "RESET SESSION AUTHORIZATION",
    "SET session_authorization = DEFAULT",
    "RESET ALL",
    "reset/**/all",
    "DISCARD ALL",
    "discard -- all of it\n all",
    // The client-user setting, however the name is written.
    "SET app.client_user = 'mallory'",
    "SET app.client_user TO 'mallory'",
    "SET SESSION app.client_user = 'mallory'",
    "BEGIN; SET LOCAL app.client_user = 'mallory'", // leaves the transaction open
    "SET APP.CLIENT_USER = 'mallory'",
    "SET \"app\".client_user = 'mallory'",
    "SET \"app\".\"client_user\" = 'mallory'",
    "SET \"app.client_user\" = 'mallory'",
    "SET app . client_user = 'mallory'",
    "SET app./**/client_user = 'mallory'",
    "SET app.client_user = DEFAULT",
    "RESET app.client_user",
    "RESET \"app\".\"client_user\"",
    // Comments, whitespace and earlier statements in front.
    "SET/**/ROLE other_role",
    "SET /* a */ ROLE /* b */ other_role",
    "SET -- comment\nROLE other_role",
    "  \n\t SET ROLE other_role",
    "/* lead */ SET ROLE other_role",
    "-- lead\nSET ROLE other_role",
    "/* /* nested */ still a comment */ SET ROLE other_role",
    "SELECT 1; SET ROLE other_role",
    "SELECT 'a;b'; RESET ROLE",
    "SELECT 'it''s'; RESET ROLE",
    "SELECT $$;$$; SET ROLE other_role",
    "SELECT 1 /* ; */ ; SET ROLE other_role",
    "SELECT \"a;\"\"b\" FROM (SELECT 1 AS \"a;\"\"b\") s; SET ROLE other_role",
    "SELECT 1\n;\n\nRESET ROLE",
    // An E'' string continued on the next line keeps its backslash escapes.
    "SELECT E'x'\n'\\' '; SET ROLE other_role; --'",
    // set_config, however the function and its first argument are written.
    "SELECT set_config('role', 'other_role', false)",
    "SELECT set_config('ROLE', 'other_role', false)",
    "SELECT SET_CONFIG('role', 'other_role', false)",
    "SELECT pg_catalog.set_config('role', 'other_role', false)",
    "SELECT \"set_config\"('role', 'other_role', false)",
    "SELECT U&\"\\0073et_config\"('role', 'other_role', false)",
    "SELECT U&\"!0073et_config\" UESCAPE '!'('role', 'other_role', false)",
    "SELECT set_config(E'r\\x6fle', 'other_role', false)",
    "SELECT set_config($$role$$, 'other_role', false)",
    "SELECT set_config($x$role$x$, 'other_role', false)",
    "SELECT set_config(U&'r\\006Fle', 'other_role', false)",
    "SELECT set_config('ro'\n'le', 'other_role', false)",
    "SELECT set_config('app.client_user', 'mallory', false)",
    "SELECT set_config('APP.Client_User', 'mallory', false)",
    "SELECT set_config('session_authorization', session_user, false)",
    "SELECT set_config('ro' || 'le', 'other_role', false)",
    "SELECT set_config(lower('ROLE'), 'other_role', false)",
    "SELECT set_config('role'::text, 'other_role', false)",
    "SELECT set_config(n, 'other_role', false) FROM (VALUES ('role')) AS v(n)",
    "BEGIN; SELECT set_config('role', 'other_role', true)", // leaves the transaction open
    "SELECT * FROM set_config('role', 'other_role', false)",
    "VALUES (set_config('role', 'other_role', false))",
    "WITH x AS (SELECT set_config('role', 'other_role', false)) SELECT * FROM x",
    "EXPLAIN ANALYZE SELECT set_config('role', 'other_role', false)",
    "PREPARE p AS SELECT set_config('role', 'other_role', false); EXECUTE p",
    "CREATE TEMP VIEW v AS SELECT set_config('role', 'other_role', false); SELECT * FROM v",
    // SQL run from a string by a built-in function.
    "SELECT query_to_xml('SELECT set_config(''role'', ''other_role'', false)', true, true, '')",
    "SELECT ts_stat('SELECT set_config(''role'', ''other_role'', false)::tsvector')",
    "SELECT query_to_xml('SELECT set_config(' || quote_literal('role') || ', ''other_role'', false)', true, true, '')",
    "SELECT query_to_xml('SELECT pg_catalog.set_config(''role'',''other_role'',false)', true, true, '')",
    "SELECT pg_catalog.query_to_xml('SELECT set_config(''app.client_user'', ''mallory'', false)', true, true, '')",
    "SELECT \"query_to_xml\"('SELECT set_config(''role'', ''other_role'', false)', true, true, '')",
    "SELECT QUERY_TO_XMLSCHEMA('SELECT set_config(''role'', ''other_role'', false)', true, true, '')",
    "SELECT query_to_xml_and_xmlschema('SELECT set_config(''role'', ''other_role'', false)', true, true, '')",
    "SELECT query_to_xml(tableforest => true, query => 'SELECT set_config(''role'', ''other_role'', false)', nulls => true, targetns => '')",
    "SELECT ts_rewrite('a'::tsquery, 'SELECT set_config(''role'', ''other_role'', false)::tsquery, ''b''::tsquery')",
    "SELECT ts_stat('SELECT set_config(''role'', ''other_role'', false)::tsvector', 'a')",
    "DO $$BEGIN PERFORM query_to_xml('SELECT set_config(''role'', ''other_role'', false)', true, true, ''); END$$",
    // An aggregate whose state function is set_config.
    "CREATE AGGREGATE pg_temp.agg(text, boolean) (SFUNC = 'set_config', STYPE = text, INITCOND = 'role'); SELECT pg_temp.agg('other_role', false)",
    "CREATE AGGREGATE pg_temp.agg(text, boolean) (SFUNC = set_config, STYPE = text, INITCOND = 'role'); SELECT pg_temp.agg('other_role', false)",
    // DO blocks, with every way of quoting the body.
    "DO $$BEGIN SET ROLE other_role; END$$",
    "DO $body$ BEGIN RESET ROLE; END $body$",
    "DO 'BEGIN SET ROLE other_role; END'",
    "DO E'BEGIN SET ROLE other_role; END'",
    "DO E'BEGIN \\x53ET ROLE other_role; END'",
    "DO U&'BEGIN \\0053ET ROLE other_role; END'",
    "DO LANGUAGE plpgsql $$BEGIN SET ROLE other_role; END$$",
    "DO $$BEGIN SET ROLE other_role; END$$ LANGUAGE plpgsql",
    "do $$ begin if true then set role other_role; end if; end $$",
    "DO $$BEGIN SET app.client_user = 'mallory'; END$$",
    "DO $$BEGIN RESET ALL; END$$",
    "DO $$BEGIN PERFORM set_config('role', 'other_role', false); END$$",
    "DO $$DECLARE n text := 'role'; BEGIN PERFORM set_config(n, 'other_role', false); END$$",
    "DO $$BEGIN DO $i$BEGIN SET ROLE other_role; END$i$; END$$",
    // Dynamic SQL inside DO blocks.
    "DO $$BEGIN EXECUTE 'SET ROLE other_role'; END$$",
    "DO $$DECLARE q text := 'RESET ROLE'; BEGIN EXECUTE q; END$$",
    "DO $$BEGIN EXECUTE 'SET ROLE ' || quote_ident('other_role'); END$$",
    "DO $$BEGIN EXECUTE 'set ' || 'role other_role'; END$$",
    "DO $$BEGIN EXECUTE 'RESET ' || 'ROLE'; END$$",
    "DO $$BEGIN EXECUTE format('SET %I TO %L', 'role', 'other_role'); END$$",
    "DO $$BEGIN EXECUTE 'SET app.client_' || 'user = ''mallory'''; END$$",
    "DO $$BEGIN EXECUTE 'DO $i$BEGIN SET ROLE other_role; END$i$'; END$$",
    // Functions and procedures: bodies, SET clauses, SQL-standard bodies.
    "CREATE FUNCTION pg_temp.f() RETURNS void LANGUAGE plpgsql AS $$BEGIN SET ROLE other_role; END$$; SELECT pg_temp.f()",
    "CREATE OR REPLACE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS 'SELECT set_config(''role'', ''other_role'', false)'; SELECT pg_temp.f()",
    "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT set_config('role', 'other_role', false); END; SELECT pg_temp.f()",
    "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql RETURN set_config('role', 'other_role', false); SELECT pg_temp.f()",
    "CREATE PROCEDURE pg_temp.p() LANGUAGE plpgsql AS $$BEGIN SET ROLE other_role; END$$; CALL pg_temp.p()",
    // During the call: the SET clause runs the body as other_role.
    "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql SET role = other_role AS $$SELECT set_config('app.seen_role', current_user, false)$$; SELECT pg_temp.f()",
    "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql SET ROLE other_role AS $$SELECT set_config('app.seen_role', current_user, false)$$; SELECT pg_temp.f()",
    "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS $$SELECT current_user::text$$; ALTER FUNCTION pg_temp.f() SET role = other_role; SELECT set_config('app.seen_role', pg_temp.f(), false)",
];

/// Look-alikes the guard must let through. Each runs successfully and
/// leaves the identity alone.
pub const LEGITIMATE: &[&str] = &[
    "SELECT 'reset role'",
    "SELECT 'set role other_role'",
    "SELECT 'SET ROLE x' || ';'",
    "SELECT E'reset role\\n'",
    "SELECT U&'r\\006Fle'",
    "SELECT $$set role other_role$$",
    "SELECT $tag$ ; RESET ROLE; $tag$",
    "SELECT 'do $$ set role x $$'",
    "SELECT 'a' AS \"set role\"",
    "SELECT 1 AS do",
    "SELECT role FROM guard_t",
    "SELECT \"role\" FROM guard_t",
    "SELECT id, role FROM guard_t WHERE role = 'set role' OR role LIKE '%reset%'",
    "WITH reset AS (SELECT 1 AS role) SELECT role FROM reset",
    "SELECT count(*) FROM pg_roles WHERE rolname = 'set role'",
    "-- set role other_role\nSELECT 1",
    "/* reset role; discard all */ SELECT 1",
    "SELECT 1 -- ; reset role",
    "SELECT 1; SELECT 2",
    "UPDATE guard_t SET role = 'x' WHERE false",
    "UPDATE guard_t SET \"role\" = 'x', id = 1 WHERE false",
    "update guard_t as g set role = 'reset all' where false",
    "INSERT INTO guard_t (id, role) SELECT 1, 'set role' WHERE false",
    "CREATE TEMP TABLE guard_u (id int PRIMARY KEY, role text); INSERT INTO guard_u VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET role = excluded.role",
    "CREATE TEMP TABLE guard_r (role text, reset text); ALTER TABLE guard_r RENAME COLUMN role TO r",
    "CREATE TEMP TABLE guard_d (id int); ALTER TABLE guard_d ALTER COLUMN id SET DEFAULT 1",
    "CREATE TEMP TABLE guard_c (id int); COMMENT ON TABLE guard_c IS 'set role other_role'",
    "SET search_path TO public",
    "set search_path = \"$user\", public",
    "SET application_name = 'set role'",
    "SET TIME ZONE 'UTC'",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "BEGIN; SET LOCAL search_path TO public; COMMIT",
    "RESET search_path",
    "RESET application_name",
    "SHOW role",
    "DISCARD PLANS",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
    "SELECT current_setting('role')",
    "SELECT current_setting('app.client_user')",
    "SELECT set_config('search_path', 'public', false)",
    "SELECT pg_catalog.set_config('statement_timeout', '0', false)",
    "SELECT set_config('application_name', 'role', false)",
    "SELECT set_config('app.other_setting', 'x', false)",
    "SELECT set_config('search_path', current_setting('search_path'), false)",
    "SELECT query_to_xml('SELECT 1 AS role', true, true, '')",
    "SELECT query_to_xml('select 1', true, true, '')",
    "SELECT pg_catalog.query_to_xmlschema('SELECT 1 AS x', false, false, '')",
    "SELECT ts_rewrite('a & b'::tsquery, 'a'::tsquery, 'c'::tsquery)",
    "SELECT ts_rewrite('a & b'::tsquery, 'SELECT ''a''::tsquery, ''c''::tsquery')",
    "SELECT * FROM ts_stat('SELECT to_tsvector(''set role'')')",
    "SELECT query_to_xml('SELECT 1', nulls => true, tableforest => false, targetns => '')",
    "BEGIN; DECLARE guard_cur CURSOR FOR SELECT 1 AS role; SELECT cursor_to_xml('guard_cur', 1, false, true, ''); COMMIT",
    "PREPARE reset_role AS SELECT 1; EXECUTE reset_role; DEALLOCATE reset_role",
    "EXPLAIN SELECT role FROM guard_t",
    "CREATE FUNCTION pg_temp.lf() RETURNS text LANGUAGE sql AS $$SELECT role FROM guard_t LIMIT 1$$",
    "CREATE FUNCTION pg_temp.lg() RETURNS void LANGUAGE plpgsql SET search_path = public AS $$BEGIN UPDATE guard_t SET role = 'x' WHERE false; END$$",
    "DO $$BEGIN UPDATE guard_t SET role = 'x' WHERE false; END$$",
    "DO $$BEGIN PERFORM set_config('search_path', 'public', false); END$$",
    "DO $$BEGIN RAISE NOTICE 'role is %', current_user; END$$",
    "DO $$BEGIN EXECUTE 'SELECT 1'; END$$",
    "DO $$BEGIN EXECUTE 'CREATE TEMP TABLE guard_e(x int)'; END$$",
    "DO $$BEGIN SET search_path TO public; END$$",
];

/// Dynamic SQL that PostgreSQL runs and the guard cannot read: with
/// [`DynamicSql::Refuse`](super::guard::DynamicSql::Refuse), the gateway's
/// default (`[identity] allow_dynamic_sql = false`), every entry is refused.
/// Each changes `current_user` when run; some pass the heuristic. The
/// base64 strings are `SET ROLE other_role` and
/// `SELECT set_config('role', 'other_role', false)`.
pub const DYNAMIC_ESCAPES: &[&str] = &[
    "DO $$BEGIN EXECUTE convert_from(decode('U0VUIFJPTEUgb3RoZXJfcm9sZQ==', 'base64'), 'UTF8'); END$$",
    "DO $$BEGIN EXECUTE 'RES' || 'ET R' || 'OLE'; END$$",
    "DO $$DECLARE v text := 'RES' || 'ET ROLE'; BEGIN EXECUTE v; END$$",
    "DO $$BEGIN EXECUTE format('%sET %sOLE', 'RES', 'R'); END$$",
    "DO $$BEGIN EXECUTE 'DO $i$DECLARE v text := ''RES'' || ''ET ROLE''; BEGIN EXECUTE v; END$i$'; END$$",
    "CREATE FUNCTION pg_temp.f() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'RES' || 'ET ROLE'; END$$; SELECT pg_temp.f()",
    "CREATE OR REPLACE PROCEDURE pg_temp.p() LANGUAGE plpgsql AS $$BEGIN EXECUTE 'RES' || 'ET ROLE'; END$$; CALL pg_temp.p()",
    "DO $$BEGIN EXECUTE 'CREATE FUNCTION pg_temp.g() RETURNS void LANGUAGE plpgsql AS $b$BEGIN EXECUTE ''RES'' || ''ET ROLE''; END$b$'; PERFORM pg_temp.g(); END$$",
    "DO $$BEGIN PERFORM query_to_xml(convert_from(decode('U0VMRUNUIHNldF9jb25maWcoJ3JvbGUnLCAnb3RoZXJfcm9sZScsIGZhbHNlKQ==', 'base64'), 'UTF8'), true, true, ''); END$$",
    "SELECT query_to_xml(convert_from(decode('U0VMRUNUIHNldF9jb25maWcoJ3JvbGUnLCAnb3RoZXJfcm9sZScsIGZhbHNlKQ==', 'base64'), 'UTF8'), true, true, '')",
];

/// Dynamic SQL that is legitimate: it passes with `[identity]
/// allow_dynamic_sql = true` (the heuristic) and is refused by default.
pub const DYNAMIC_LEGITIMATE: &[&str] = &[
    "DO $$BEGIN EXECUTE format('SELECT %L::text', 'x'); END$$",
    "DO $$BEGIN EXECUTE format('CREATE TEMP TABLE %I (id int)', 'guard_f'); END$$",
    "DO $$DECLARE q text := 'SELECT 1'; BEGIN EXECUTE q; END$$",
    "SELECT query_to_xml(format('SELECT %s AS n', 1), true, true, '')",
];

/// Escapes in two steps: the first statement is legitimate and passes (it
/// changes how the server reads strings), the second must be refused.
/// The second statement is not valid UTF-8 in the SJIS case, so bytes.
pub const STAGED_ESCAPES: &[(&str, &[u8])] = &[
    // With standard_conforming_strings off, 'a\' ' is one string.
    (
        "SET standard_conforming_strings = off",
        b"SELECT 'a\\' '; SET ROLE other_role; --'",
    ),
    // In SJIS, 0x95 0x5C is one character: the 0x5C is not a backslash.
    (
        "SET client_encoding = 'SJIS'",
        b"SELECT E'\x95\x5c'; SET ROLE other_role; --'",
    ),
];
