//! Micro-benchmark of the statement guard: nanoseconds per `Guard::check`.
//!
//! Run with `cargo bench --bench guard`. Plain `std::time` timing, best of
//! several rounds, so it needs no benchmark framework.

use std::hint::black_box;
use std::time::Instant;

use pgwarden::identity::Guard;

fn one_kb_select() -> String {
    let mut sql = String::from("SELECT a.id, a.name, a.created_at");
    let mut i = 0;
    while sql.len() < 900 {
        sql.push_str(&format!(", coalesce(b.col_{i}, 0) AS c{i}"));
        i += 1;
    }
    sql.push_str(" FROM accounts a JOIN branches b ON b.id = a.branch_id WHERE a.id = $1 ORDER BY a.id LIMIT 10");
    sql
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
/// binary without it, as a quick smoke run of the same code.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn ns_per_check(guard: &Guard, sql: &[u8]) -> f64 {
    let expected = guard.check(sql).is_ok();
    let iters: u32 = match (smoke(), sql.len()) {
        (true, n) if n > 100_000 => 1,
        (true, _) => 100,
        (false, n) if n > 100_000 => 5,
        (false, n) if n > 500 => 100_000,
        (false, _) => 400_000,
    };
    let mut best = f64::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        for _ in 0..iters {
            assert_eq!(black_box(guard).check(black_box(sql)).is_ok(), expected);
        }
        best = best.min(start.elapsed().as_nanos() as f64 / f64::from(iters));
    }
    best
}

/// `head` + `unit` repeated to about 1 MB + `tail`: the adversarial shapes
/// of the guard's linearity tests.
fn megabyte(head: &str, unit: &[u8], tail: &str) -> String {
    let mut sql = head.as_bytes().to_vec();
    while sql.len() + unit.len() + tail.len() <= 1 << 20 {
        sql.extend_from_slice(unit);
    }
    sql.extend_from_slice(tail.as_bytes());
    String::from_utf8_lossy(&sql).into_owned()
}

fn main() {
    let guard = Guard::new("app.client_user");
    let big = one_kb_select();
    let big_slow = big.replace("LIMIT 10", "OFFSET 5 LIMIT 10");
    let cases: Vec<(&str, String)> = vec![
        ("pgbench SELECT (fast path)", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into()),
        ("pgbench UPDATE ... SET (lexed)", "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;".into()),
        ("1 KB SELECT (fast path)", big),
        ("1 KB SELECT with OFFSET (lexed)", big_slow),
        ("SET search_path", "SET search_path TO app, public".into()),
        (
            "multi-statement pgbench transaction",
            "BEGIN; UPDATE pgbench_accounts SET abalance = abalance + -4021 WHERE aid = 48213; \
             SELECT abalance FROM pgbench_accounts WHERE aid = 48213; \
             UPDATE pgbench_tellers SET tbalance = tbalance + -4021 WHERE tid = 7; \
             INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 48213, -4021, CURRENT_TIMESTAMP); END;"
                .into(),
        ),
        (
            "DO block",
            "DO $$BEGIN UPDATE guard_t SET role = 'x' WHERE id = 1; RAISE NOTICE 'done %', 1; END$$".into(),
        ),
        ("refused SET ROLE", "SET ROLE other_role".into()),
        ("960 KB DO block of 'begin a' (review)", {
            let mut sql = megabyte("DO $$ ", b"begin a ", " $$");
            sql.truncate(960_000 - 3);
            sql.push_str(" $$");
            sql
        }),
        ("1 MB DO body, many EXECUTE", megabyte("DO $$BEGIN ", b"EXECUTE 'SELECT 1'; ", "END$$")),
        ("1 MB SELECT, many SET", megabyte("", b"SET search_path TO public;", "")),
        (
            "1 MB DO body, \\ and high bytes",
            megabyte("DO 'BEGIN PERFORM ''", "\\é\\''".as_bytes(), "''; END'"),
        ),
        ("1 MB begin create (over budget)", megabyte("DO $$ ", b"begin create ", " 'x' $$")),
    ];
    println!("{:<40} {:>8} {:>14}", "case", "bytes", "ns/check");
    for (name, sql) in &cases {
        let ns = ns_per_check(&guard, sql.as_bytes());
        println!("{name:<40} {:>8} {ns:>14.1}", sql.len());
    }
    // What the relay asks of every statement besides the guard: is it
    // transparent (session::opaque), may it leave sequence state, and
    // would it start another transaction after opaque code.
    println!(
        "\n{:<40} {:>8} {:>14}",
        "classification", "bytes", "ns/statement"
    );
    for (name, sql) in cases.iter().take(7) {
        let t = ns_per_call(sql.as_bytes(), pgwarden::session::opaque::transparent);
        let q = ns_per_call(sql.as_bytes(), pgwarden::session::state::may_use_sequences);
        let c = ns_per_call(sql.as_bytes(), |s| {
            pgwarden::session::commits::Commits::of(s).starts_another_transaction()
        });
        println!(
            "{name:<40} {:>8} {:>14.1}  (transparent {t:.0}, sequences {q:.0}, commits {c:.0})",
            sql.len(),
            t + q + c
        );
    }
}

fn ns_per_call(sql: &[u8], f: impl Fn(&[u8]) -> bool) -> f64 {
    let iters: u32 = if smoke() { 100 } else { 400_000 };
    let mut best = f64::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        for _ in 0..iters {
            black_box(f(black_box(sql)));
        }
        best = best.min(start.elapsed().as_nanos() as f64 / f64::from(iters));
    }
    best
}
