//! Tests of the audit trail against real sled stores: durability modes,
//! reopening, locking and crashes (the last two in child processes, since a
//! lock held by another process and a `kill -9` cannot be faked in-process).
//!
//! Invariant kept by these tests: whatever `append` acknowledged is in the
//! store after a reopen or a crash, with contiguous seqs and a valid chain.

use std::io::{BufRead, BufReader};
use std::path::Path;

use super::reader::StoreReader;
use super::record::{Event, Kind};
use super::store::SledStore;
use super::testutil::{child_arg, config, spawn_child};
use super::verify::verify;
use super::{AuditError, Auditor};
use crate::config::Durability;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn read_all(dir: &Path) -> Vec<super::Record> {
    let reader = StoreReader::open(dir).unwrap();
    reader
        .scan_from(1)
        .map(|e| {
            let (seq, raw) = e.unwrap();
            super::store::decode(seq, &raw).unwrap()
        })
        .collect()
}

fn assert_intact(dir: &Path) -> u64 {
    let reader = StoreReader::open(dir).unwrap();
    match verify(&reader).unwrap() {
        Ok(intact) => intact.records,
        Err(bad) => panic!("{bad}"),
    }
}

#[test]
fn every_mode_stores_records_that_survive_reopen() {
    for durability in [Durability::Group, Durability::Sync, Durability::Async] {
        let dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            for round in 0..2u64 {
                let auditor = Auditor::open(&config(dir.path(), durability)).unwrap();
                for i in 0..20u64 {
                    let mut ev = Event::new(Kind::Query);
                    ev.statement = Some(format!("select {i}"));
                    let seq = auditor.append(ev).await.unwrap();
                    // gateway_start, 20 queries, session_end, gateway_stop per round.
                    assert_eq!(seq, round * 23 + i + 2, "{durability:?}");
                }
                auditor.append_nowait(Event::new(Kind::SessionEnd)).await;
                auditor.shutdown().await.unwrap();
            }
        });
        let records = read_all(dir.path());
        assert_eq!(records.len(), 46, "{durability:?}");
        assert_eq!(records[2].statement.as_deref(), Some("select 1"));
        assert_eq!(records[23].kind, Kind::GatewayStart);
        assert_eq!(assert_intact(dir.path()), 46);
    }
}

#[test]
fn group_commit_shares_fsyncs_on_a_real_disk() {
    let dir = tempfile::tempdir().unwrap();
    let counters = runtime().block_on(async {
        let auditor = Auditor::open(&config(dir.path(), Durability::Group)).unwrap();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let a = auditor.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        a.append(Event::new(Kind::Query)).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        auditor.shutdown().await.unwrap();
        auditor.counters()
    });
    assert_eq!(counters.appended, 1002);
    assert!(
        counters.syncs * 4 < counters.appended,
        "{} fsyncs for {} records",
        counters.syncs,
        counters.appended
    );
    assert_eq!(assert_intact(dir.path()), 1002);
    let values = crate::audit::testutil::open_plain(dir.path()).len();
    assert!(
        values * 2 < 1002,
        "{values} sled values for 1002 records: a commit's records were not packed into runs"
    );
}

#[test]
fn large_records_go_to_sled_blobs_and_are_synced() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let auditor = Auditor::open(&config(dir.path(), Durability::Group)).unwrap();
        for i in 0..40 {
            let mut ev = Event::new(Kind::Query);
            ev.statement = Some(format!("select '{}' -- {i}", "x".repeat(20_000)));
            auditor.append(ev).await.unwrap();
        }
        auditor.shutdown().await.unwrap();
    });
    let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
    assert!(blobs > 0, "expected sled to use blob files for big pages");
    assert_eq!(assert_intact(dir.path()), 42);
}

#[test]
fn a_second_open_in_the_same_process_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _held = SledStore::open(dir.path()).unwrap();
    let err = SledStore::open(dir.path()).err().unwrap();
    assert!(matches!(err, AuditError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("is a gateway running?"));
    let err = StoreReader::open(dir.path()).err().unwrap();
    assert!(matches!(err, AuditError::Locked { .. }), "{err}");
}

#[test]
fn the_offline_reader_never_creates_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    assert!(matches!(
        StoreReader::open(&missing),
        Err(AuditError::NotFound { .. })
    ));
    assert!(matches!(
        StoreReader::open(dir.path()),
        Err(AuditError::NotFound { .. })
    ));
    assert!(!missing.exists());
}

/// Child process body: `hold:DIR` opens the store as a gateway and waits to
/// be killed; `load:MODE:DIR` appends from 20 tasks and prints `ACK seq
/// task n` for each acknowledged record until killed; `fsize:DIR` appends
/// under a 1 MiB file size limit until an error, lifts the limit and waits
/// for appends to work again.
#[test]
#[ignore = "runs only as a child process of other tests"]
fn child_process() {
    let Some(arg) = child_arg() else {
        return;
    };
    let (what, rest) = arg.split_once(':').unwrap();
    match what {
        "hold" => {
            let auditor = Auditor::open(&config(Path::new(rest), Durability::Group)).unwrap();
            println!("@@READY");
            std::thread::sleep(std::time::Duration::from_secs(60));
            drop(auditor);
        }
        "load" => {
            let (mode, dir) = rest.split_once(':').unwrap();
            let durability = if mode == "sync" {
                Durability::Sync
            } else {
                Durability::Group
            };
            child_load(Path::new(dir), durability);
        }
        "fsize" => child_fsize(Path::new(rest)),
        _ => panic!("unknown child mode {what}"),
    }
}

fn child_load(dir: &Path, durability: Durability) {
    runtime().block_on(async {
        let auditor = Auditor::open(&config(dir, durability)).unwrap();
        let tasks: Vec<_> = (0..20)
            .map(|task| {
                let a = auditor.clone();
                tokio::spawn(async move {
                    for n in 0.. {
                        let mut ev = Event::new(Kind::Query);
                        ev.statement = Some(format!("task {task} n {n}"));
                        let seq = a.append(ev).await.unwrap();
                        println!("@@ACK {seq} task {task} n {n}");
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
}

fn child_fsize(dir: &Path) {
    // A full disk, for real: writes past 1 MiB fail with EFBIG (soft limit,
    // so the process can lift it again without privileges).
    let set_limit = |bytes| {
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain libc call on this process.
        unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }
    };
    // SAFETY: ignoring SIGXFSZ turns "killed" into an EFBIG error.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    set_limit(1 << 20);
    runtime().block_on(async {
        let auditor = Auditor::open(&config(dir, Durability::Group)).unwrap();
        let event = |i: u64| {
            let mut ev = Event::new(Kind::Query);
            ev.statement = Some(format!("select '{}' -- {i}", "y".repeat(500)));
            ev
        };
        let mut last_ok = 0;
        for i in 0..100_000 {
            match auditor.append(event(i)).await {
                Ok(seq) => last_ok = seq,
                Err(e) => {
                    println!("@@ERR {e}");
                    break;
                }
            }
        }
        let again = auditor.append(event(0)).await;
        println!("@@AGAIN {}", again.is_err());
        // The disk has space again: the writer heals by reopening the store.
        set_limit(libc::RLIM_INFINITY);
        let start = std::time::Instant::now();
        let healed = loop {
            match auditor.append(event(1)).await {
                Ok(seq) => break Some(seq),
                Err(_) if start.elapsed() < std::time::Duration::from_secs(10) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                Err(_) => break None,
            }
        };
        println!("@@HEALED {} {last_ok} {healed:?}", healed.is_some());
        auditor.shutdown().await.unwrap();
    });
}

/// The child's own lines (after `@@`; libtest may print before them).
fn child_lines(child: &mut std::process::Child) -> impl Iterator<Item = String> {
    let stdout = child.stdout.take().unwrap();
    BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split_once("@@").map(|(_, mine)| mine.to_string()))
}

#[test]
fn a_store_held_by_another_process_is_reported_locked() {
    let dir = tempfile::tempdir().unwrap();
    let arg = format!("hold:{}", dir.path().display());
    let mut child = spawn_child("audit::tests::child_process", &arg);
    let ready = child_lines(&mut child).any(|l| l == "READY");
    assert!(ready, "child did not open the store");

    let err = Auditor::open(&config(dir.path(), Durability::Group))
        .err()
        .unwrap();
    assert!(matches!(err, AuditError::Locked { .. }), "{err}");
    let err = StoreReader::open(dir.path()).err().unwrap();
    assert!(matches!(err, AuditError::Locked { .. }), "{err}");

    child.kill().unwrap();
    child.wait().unwrap();
    // The kernel drops the flock with the process; the store opens again.
    assert_eq!(assert_intact(dir.path()), 1);
}

#[test]
fn kill_9_loses_no_acknowledged_record() {
    for mode in ["group", "sync"] {
        let dir = tempfile::tempdir().unwrap();
        let arg = format!("load:{mode}:{}", dir.path().display());
        let mut child = spawn_child("audit::tests::child_process", &arg);
        let acks: Vec<String> = child_lines(&mut child)
            .filter(|l| l.starts_with("ACK "))
            .take(if mode == "sync" { 150 } else { 600 })
            .collect();
        child.kill().unwrap();
        child.wait().unwrap();

        let records = assert_intact(dir.path());
        let reader = StoreReader::open(dir.path()).unwrap();
        for ack in &acks {
            let mut words = ack.split(' ').skip(1);
            let seq: u64 = words.next().unwrap().parse().unwrap();
            let rest: Vec<&str> = words.collect();
            let record = reader
                .get(seq)
                .unwrap()
                .unwrap_or_else(|| panic!("{mode}: seq {seq} lost"));
            assert_eq!(record.statement.unwrap(), rest.join(" "), "{mode}");
        }
        assert!(records as usize > acks.len(), "{mode}: {records} records");
    }
}

#[test]
fn a_full_disk_fails_appends_and_heals_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let arg = format!("fsize:{}", dir.path().display());
    let mut child = spawn_child("audit::tests::child_process", &arg);
    let lines: Vec<String> = child_lines(&mut child).collect();
    assert!(child.wait().unwrap().success(), "{lines:?}");
    let err = lines.iter().find(|l| l.starts_with("ERR "));
    let err = err.unwrap_or_else(|| panic!("no write error: {lines:?}"));
    assert!(err.contains("audit store write failed"), "{err}");
    assert!(lines.contains(&"AGAIN true".to_string()), "{lines:?}");
    let healed = lines.iter().find(|l| l.starts_with("HEALED true"));
    let healed = healed.unwrap_or_else(|| panic!("did not heal: {lines:?}"));
    // Everything acknowledged before the failure is there, and the chain
    // goes on right after it.
    let words: Vec<&str> = healed.split(' ').collect();
    let last_ok: u64 = words[2].parse().unwrap();
    assert_eq!(words[3], format!("Some({})", last_ok + 1));
    assert_eq!(assert_intact(dir.path()), last_ok + 2);
}

/// A record's `ts` is its event's time, not its write batch's: events made
/// a known time apart and stored together keep their own times.
#[test]
fn records_keep_the_time_of_their_event() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let auditor = Auditor::open(&config(dir.path(), Durability::Async)).unwrap();
        let base = time::OffsetDateTime::now_utc() - time::Duration::seconds(60);
        for i in 0..5i64 {
            let mut ev = Event::new(Kind::Query);
            ev.statement = Some(format!("select {i}"));
            ev.at = base + time::Duration::milliseconds(i * 7);
            auditor.append_nowait(ev).await;
        }
        auditor.shutdown().await.unwrap();
    });
    let stamps: Vec<String> = read_all(dir.path())
        .into_iter()
        .filter(|r| {
            r.statement
                .as_deref()
                .is_some_and(|s| s.starts_with("select "))
        })
        .map(|r| r.ts)
        .collect();
    assert_eq!(stamps.len(), 5);
    let times: Vec<_> = stamps
        .iter()
        .map(|t| super::record::parse_ts(t).unwrap())
        .collect();
    for (i, w) in times.windows(2).enumerate() {
        assert_eq!(
            w[1] - w[0],
            time::Duration::milliseconds(7),
            "{i}: {stamps:?}"
        );
    }
}
