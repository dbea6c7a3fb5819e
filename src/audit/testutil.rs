//! Test helpers shared by the audit module's tests: stores with known
//! contents, tampering, and re-running the test binary as a child process.
//!
//! Invariant: every store built here is a valid chain unless a test tampers
//! with it afterwards through [`tamper`].

use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::chain::Chain;
use super::record::{Event, Kind, Status};
use super::store::{SledStore, Store};
use crate::config::{AuditConfig, Durability};

/// An audit config for a store at `dir`.
pub fn config(dir: &Path, durability: Durability) -> AuditConfig {
    AuditConfig {
        store: dir.to_path_buf(),
        durability,
        ..AuditConfig::default()
    }
}

/// An event with a session's identity fields filled in.
pub fn session_event(kind: Kind, user: &str, database: &str) -> Event {
    let mut ev = Event::new(kind);
    ev.session_id = Some(format!("s-{user}").into());
    ev.client_user = Some(user.into());
    ev.role = Some(format!("role_{user}").into());
    ev.database = Some(database.into());
    ev.client_addr = Some("127.0.0.1:50000".into());
    ev.application_name = Some("psql".into());
    ev
}

/// A query event.
pub fn query(user: &str, database: &str, sql: &str) -> Event {
    let mut ev = session_event(Kind::Query, user, database);
    ev.statement = Some(sql.into());
    ev
}

/// The result event of the query at `ref_seq`.
pub fn result(
    user: &str,
    database: &str,
    ref_seq: u64,
    status: Status,
    tag: Option<&str>,
) -> Event {
    let mut ev = session_event(Kind::Result, user, database);
    ev.ref_seq = Some(ref_seq);
    ev.status = Some(status);
    ev.command_tag = tag.map(str::to_string);
    ev.rows = tag.map(|_| 1);
    ev.duration_us = Some(42);
    if status == Status::Error {
        ev.sqlstate = Some("42P01".into());
        ev.message = Some("relation \"nope\" does not exist".into());
    }
    ev
}

/// Writes `events` as a valid chain with the given timestamps (the writer
/// would stamp "now"), returning the chain head. A `gateway_stop` without a
/// message gets the writer's `chain head <hex>`.
pub fn build_store(dir: &Path, events: Vec<(&str, Event)>) -> String {
    build_store_in_runs(dir, events, 1)
}

/// [`build_store`] storing `run` records per sled value, as the writer's
/// [`Store::insert_run`] does (the last run may be shorter).
pub fn build_store_in_runs(dir: &Path, events: Vec<(&str, Event)>, run: usize) -> String {
    let mut store = SledStore::open(dir).expect("open store");
    let mut chain = Chain::empty();
    let mut sealed = Vec::new();
    for (ts, mut event) in events {
        if event.kind == Kind::GatewayStop && event.message.is_none() {
            event.message = Some(format!("chain head {}", chain.head));
        }
        let s = chain.seal(event, ts.to_string());
        chain.advance(&s);
        sealed.push(s);
    }
    for group in sealed.chunks(run) {
        let values: Vec<&[u8]> = group.iter().map(|s| s.bytes.as_slice()).collect();
        store
            .insert_run(group[0].record.seq, &values)
            .expect("insert");
    }
    store.sync().expect("sync");
    chain.head
}

/// The workload most export tests read, with its seqs:
/// 1 gateway_start, 2 session_start alice, 3 query ok, 4 query error,
/// 5 result of 4, 6 result of 3, 7 query (never completes), 8 session_end,
/// 9 session_start bob, 10 query bob with a comma/quote/newline, 11 result,
/// 12 gateway_stop.
pub fn sample_store(dir: &Path) -> String {
    sample_store_in_runs(dir, 1)
}

/// [`sample_store`] with `run` records per sled value.
pub fn sample_store_in_runs(dir: &Path, run: usize) -> String {
    let mut q10 = query("bob", "sales", "select 'a,\"b\"'\n, 2");
    q10.params = Some(vec![Some("x".into()), None]);
    build_store_in_runs(
        dir,
        vec![
            (
                "2026-11-27T10:00:00.000000Z",
                Event::new(Kind::GatewayStart),
            ),
            (
                "2026-11-27T10:00:01.000000Z",
                session_event(Kind::SessionStart, "alice", "app"),
            ),
            (
                "2026-11-27T10:00:02.000000Z",
                query("alice", "app", "select 1"),
            ),
            (
                "2026-11-27T10:00:03.000000Z",
                query("alice", "app", "select * from nope"),
            ),
            (
                "2026-11-27T10:00:04.000000Z",
                result("alice", "app", 4, Status::Error, None),
            ),
            (
                "2026-11-27T10:00:05.000000Z",
                result("alice", "app", 3, Status::Ok, Some("SELECT 1")),
            ),
            (
                "2026-11-27T10:00:06.000000Z",
                query("alice", "app", "select pg_sleep(1000)"),
            ),
            (
                "2026-11-27T10:00:07.000000Z",
                session_event(Kind::SessionEnd, "alice", "app"),
            ),
            (
                "2026-11-27T11:00:00.000000Z",
                session_event(Kind::SessionStart, "bob", "sales"),
            ),
            ("2026-11-27T11:00:01.000000Z", q10),
            (
                "2026-11-27T11:00:02.000000Z",
                result("bob", "sales", 10, Status::Ok, Some("SELECT 1")),
            ),
            ("2026-11-27T12:00:00.000000Z", Event::new(Kind::GatewayStop)),
        ],
        run,
    )
}

/// Opens the store with plain sled (as an attacker would). Another test
/// forking a child at the wrong moment can hold the lock for an instant
/// (the child inherits the descriptor until it execs): retried.
pub fn open_plain(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open with plain sled: {e:?}"),
        }
    }
}

/// Opens the store with plain sled and lets `edit` change it.
pub fn tamper(dir: &Path, edit: impl FnOnce(&sled::Db)) {
    let db = open_plain(dir);
    edit(&db);
    db.flush().expect("flush tampering");
}

/// Runs the `#[ignore]`d test `name` of this test binary as a child process
/// with `PGWARDEN_TEST_CHILD=arg`; its stdout is piped.
pub fn spawn_child(name: &str, arg: &str) -> Child {
    spawn_child_in(name, arg, Path::new("."))
}

/// [`spawn_child`] with the child's working directory set to `cwd`.
pub fn spawn_child_in(name: &str, arg: &str, cwd: &Path) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    Command::new(exe)
        .current_dir(cwd)
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PGWARDEN_TEST_CHILD", arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child test process")
}

/// The child's argument, or `None` when the test runs in the normal suite
/// (then the child test does nothing).
pub fn child_arg() -> Option<String> {
    std::env::var("PGWARDEN_TEST_CHILD").ok()
}
