//! Linearity of the statement guard: adversarial statements of about 1 MB
//! are checked in bounded time, and four times the input costs about four
//! times the work (the review found a 960 KB DO block that took 31 s).
//!
//! Bounds are generous for debug builds on a busy machine; release timings
//! are in `benches/guard.rs`.

use std::time::{Duration, Instant};

use super::guard::{DynamicSql, Guard};

const MB: usize = 1 << 20;

fn guard() -> Guard {
    Guard::new("app.client_user")
}

/// `head` + `unit` repeated to about `size` bytes + `tail`.
fn repeat(head: &str, unit: &[u8], tail: &str, size: usize) -> Vec<u8> {
    let mut sql = head.as_bytes().to_vec();
    while sql.len() + unit.len() + tail.len() <= size {
        sql.extend_from_slice(unit);
    }
    sql.extend_from_slice(tail.as_bytes());
    sql
}

/// The adversarial shapes, each built at about `size` bytes.
fn shapes(size: usize) -> Vec<(&'static str, Vec<u8>)> {
    let half = size / 2;
    let mut nested_parens = b"SELECT ".to_vec();
    nested_parens.extend(std::iter::repeat_n(b'(', half - 16));
    nested_parens.push(b'1');
    nested_parens.extend(std::iter::repeat_n(b')', half - 16));
    nested_parens.extend_from_slice(b"; SET x.y = 1");
    vec![
        (
            "DO block of begin a",
            repeat("DO $$ ", b"begin a ", " $$", size),
        ),
        ("nested parentheses", nested_parens),
        (
            "nested runner calls",
            repeat("SELECT ", b"query_to_xml(", "", size),
        ),
        (
            "many statements",
            repeat("", b"SET search_path TO public;", "", size),
        ),
        (
            "many dollar-quoted strings",
            repeat(
                "DO $$BEGIN ",
                b"PERFORM $q$SET search_path TO x$q$; ",
                "END$$",
                size,
            ),
        ),
        ("many begin", repeat("DO $$ ", b"BEGIN ", "END $$", size)),
        (
            "begin alter",
            repeat("DO $$ ", b"begin alter ", " 'x' $$", size),
        ),
        (
            "begin create",
            repeat("DO $$ ", b"begin create ", " 'x' $$", size),
        ),
        (
            "begin do",
            repeat("DO $$ ", b"begin do ", "'SET x.y = 1' $$", size),
        ),
        (
            "begin do, every encoding",
            repeat("DO $$ '\\é' ", b"begin do ", "'SET x.y = 1' $$", size),
        ),
        (
            "backslashes and high bytes",
            repeat(
                "SELECT '",
                b"\\\x95\\'\xe9",
                "'; SET search_path TO x",
                size,
            ),
        ),
        (
            "DO body with backslashes and high bytes",
            repeat("DO 'BEGIN PERFORM ''", b"\\\x95\\''\xe9", "''; END'", size),
        ),
        (
            "EXECUTE repeated",
            repeat("DO $$BEGIN ", b"EXECUTE 'SELECT 1'; ", "END$$", size),
        ),
        (
            "SET clause names",
            repeat("ALTER ROLE r SET ", b"set.", "x = 1", size),
        ),
        (
            "function SET clauses",
            repeat(
                "CREATE FUNCTION f() RETURNS int SET ",
                b"set.",
                "x = 1 AS 'x'",
                size,
            ),
        ),
        ("dotted DISCARD", repeat("DISCARD ", b"a.", "all", size)),
        (
            "strings in strings with backslashes",
            nested_backslashes(size),
        ),
        (
            "set_config calls",
            repeat("SELECT ", b"set_config('a.b', 'c', false), ", "1", size),
        ),
    ]
}

/// DO blocks nested in constants, each level with a backslash so both
/// string readings apply at every level, padded to `size`.
fn nested_backslashes(size: usize) -> Vec<u8> {
    let mut sql = String::from("SELECT 'a\\b'");
    for level in 0..6 {
        sql = format!("DO $l{level}$BEGIN PERFORM 'x\\y'; {sql}; END$l{level}$");
    }
    let body = sql.clone();
    let mut out = String::new();
    while out.len() + body.len() + 2 <= size {
        out.push_str(&body);
        out.push_str(";\n");
    }
    out.into_bytes()
}

fn best_of(runs: usize, f: impl Fn()) -> Duration {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

#[test]
fn adversarial_megabyte_statements_are_checked_quickly() {
    let guards = [guard(), guard().with_dynamic_sql(DynamicSql::Refuse)];
    for (name, sql) in shapes(MB) {
        for g in &guards {
            let start = Instant::now();
            let (result, work) = g.check_counting(&sql);
            let took = start.elapsed();
            println!(
                "{name:<40} {:>8} bytes {:>10} work {took:>10.2?} {}",
                sql.len(),
                work,
                match &result {
                    Ok(()) => "passed".to_string(),
                    Err(v) => format!("refused: {}", v.what),
                }
            );
            // Generous: a debug build on a loaded machine; linearity is
            // asserted on work counts below.
            assert!(took < Duration::from_secs(15), "{name}: {took:?}");
        }
    }
}

#[test]
fn the_reviewed_do_block_gets_the_full_check() {
    let sql = repeat("DO $$ ", b"begin a ", " $$", 960_000);
    assert!(guard().check(&sql).is_ok());
    // The same size with a forbidden statement at the very end is refused.
    let mut bad = sql[..sql.len() - 3].to_vec();
    bad.extend_from_slice(b"; SET ROLE x; $$");
    assert!(guard().check(&bad).is_err());
}

#[test]
fn four_times_the_input_costs_about_four_times_the_work() {
    let g = guard();
    let small = shapes(MB / 4);
    let large = shapes(MB);
    for ((name, s), (_, l)) in small.iter().zip(&large) {
        let (rs, ws) = g.check_counting(s);
        let (rl, wl) = g.check_counting(l);
        if rs.is_ok() && rl.is_ok() {
            assert!(wl <= 5 * ws.max(1), "{name}: work {ws} -> {wl}");
        }
        let ts = best_of(3, || drop(g.check(s)));
        let tl = best_of(3, || drop(g.check(l)));
        println!("{name:<40} {ts:>10.2?} -> {tl:>10.2?}");
        // Quadratic would be 16x; allow noise on a shared machine.
        assert!(
            tl <= ts * 8 + Duration::from_millis(200),
            "{name}: {ts:?} -> {tl:?}"
        );
    }
}
