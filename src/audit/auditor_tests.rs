use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::audit::record::{Event, Kind, Link, Record};
use crate::audit::store::MemoryStore;
use crate::audit::{AuditError, Auditor};
use crate::config::{AuditConfig, Durability};

fn cfg(durability: Durability) -> AuditConfig {
    AuditConfig {
        durability,
        flush_interval_ms: 20,
        ..AuditConfig::default()
    }
}

fn open(store: &MemoryStore, durability: Durability) -> Auditor {
    let copy = MemoryStore {
        records: store.records.clone(),
        control: store.control.clone(),
    };
    Auditor::with_store(Box::new(copy), &cfg(durability)).unwrap()
}

fn stored(store: &MemoryStore) -> Vec<Record> {
    let records = store.records.lock().unwrap();
    records
        .iter()
        .map(|(seq, v)| {
            let r = Record::from_stored_bytes(v).unwrap();
            assert_eq!(r.seq, *seq);
            r
        })
        .collect()
}

async fn concurrent_appends(auditor: &Auditor, n: usize) -> Vec<u64> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let a = auditor.clone();
            tokio::spawn(async move {
                let mut ev = Event::new(Kind::Query);
                ev.statement = Some(format!("select {i}"));
                a.append(ev).await.unwrap()
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort_unstable();
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_one_fsync_among_queued_records() {
    let store = MemoryStore::default();
    store.control.sync_delay_us.store(3_000, Ordering::SeqCst);
    let auditor = open(&store, Durability::Group);
    let seqs = concurrent_appends(&auditor, 200).await;
    assert_eq!(seqs, (2..=201).collect::<Vec<u64>>());
    let syncs = store.control.syncs.load(Ordering::SeqCst);
    // gateway_start's own fsync, then batches: far fewer than 200.
    assert!(syncs <= 20, "{syncs} fsyncs for 200 records");
    assert_eq!(auditor.counters().syncs, syncs);
}

fn open_gathering(store: &MemoryStore, durability: Durability, gather: Duration) -> Auditor {
    let copy = MemoryStore {
        records: store.records.clone(),
        control: store.control.clone(),
    };
    Auditor::with_store_gathering(Box::new(copy), &cfg(durability), gather).unwrap()
}

fn statement(sql: &str) -> Event {
    let mut ev = Event::new(Kind::Query);
    ev.statement = Some(sql.into());
    ev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_record_waits_for_one_that_is_not_and_both_share_an_fsync() {
    let store = MemoryStore::default();
    let auditor = open_gathering(&store, Durability::Group, Duration::from_secs(60));
    assert!(auditor.gathers());
    let before = store.control.syncs.load(Ordering::SeqCst);
    let patient = {
        let a = auditor.clone();
        tokio::spawn(async move { a.append_ahead_patient(statement("select 1")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !patient.is_finished(),
        "a patient record was stored alone at once"
    );
    assert_eq!(store.control.syncs.load(Ordering::SeqCst), before);
    let started = std::time::Instant::now();
    auditor.append_ahead(statement("select 2")).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a record that is not patient waited for the gathering to end"
    );
    patient.await.unwrap().unwrap();
    assert_eq!(store.control.syncs.load(Ordering::SeqCst), before + 1);
    assert_eq!(auditor.counters().gathered, 1);
    let statements: Vec<_> = stored(&store)
        .into_iter()
        .filter_map(|r| r.statement)
        .collect();
    assert_eq!(statements, ["select 1", "select 2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_record_alone_is_stored_when_the_gathering_ends() {
    let store = MemoryStore::default();
    let gather = Duration::from_millis(400);
    let auditor = open_gathering(&store, Durability::Group, gather);
    let before = store.control.syncs.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    auditor
        .append_ahead_patient(statement("select 1"))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= gather,
        "stored after {waited:?}, before the gathering ended"
    );
    assert!(waited < Duration::from_secs(10), "stored after {waited:?}");
    assert_eq!(store.control.syncs.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_nobody_waits_for_start_no_gathering() {
    // Results and other records appended without waiting may share a
    // gathering, but are no reason for one: a pool that is not crowded
    // sends no patient waiter, and its commits must not wait.
    let store = MemoryStore::default();
    let auditor = open_gathering(&store, Durability::Group, Duration::from_secs(60));
    let before = stored(&store).len();
    auditor.append_nowait(Event::new(Kind::Result)).await;
    assert!(
        eventually(|| stored(&store).len() == before + 1).await,
        "a record nobody waits for was held back"
    );
    auditor.append_ahead(statement("select 1")).await.unwrap();
    assert_eq!(auditor.counters().gathered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_group_mode_gathers_patient_records() {
    for durability in [Durability::Sync, Durability::Async] {
        let store = MemoryStore::default();
        let auditor = open_gathering(&store, durability, Duration::from_secs(60));
        assert!(!auditor.gathers(), "{durability:?}");
        let started = std::time::Instant::now();
        auditor
            .append_ahead_patient(statement("select 1"))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{durability:?} held a patient record back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_fsyncs_every_record() {
    let store = MemoryStore::default();
    let auditor = open(&store, Durability::Sync);
    concurrent_appends(&auditor, 50).await;
    assert_eq!(store.control.syncs.load(Ordering::SeqCst), 51);
}

/// Polls `cond` every 5 ms for up to 5 s (timing under a loaded machine).
async fn eventually(cond: impl Fn() -> bool) -> bool {
    for _ in 0..1000 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_answers_first_and_fsyncs_within_the_interval() {
    let store = MemoryStore::default();
    let copy = MemoryStore {
        records: store.records.clone(),
        control: store.control.clone(),
    };
    let cfg = AuditConfig {
        flush_interval_ms: 300,
        ..cfg(Durability::Async)
    };
    let auditor = Auditor::with_store(Box::new(copy), &cfg).unwrap();
    let start = std::time::Instant::now();
    let seq = auditor.append(Event::new(Kind::Query)).await.unwrap();
    assert_eq!(seq, 2);
    let durable = || store.control.durable.load(Ordering::SeqCst);
    if start.elapsed() < Duration::from_millis(250) {
        assert_eq!(durable(), 1, "answered before the fsync");
    }
    assert!(
        eventually(|| durable() == 2).await,
        "fsynced after the interval"
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_find_their_query_by_ticket_in_every_mode() {
    for durability in [Durability::Async, Durability::Group, Durability::Sync] {
        let store = MemoryStore::default();
        let auditor = open(&store, durability);
        let tickets: Vec<u64> = (0..3).map(|_| auditor.ticket()).collect();
        for (i, ticket) in tickets.iter().enumerate() {
            let mut ev = Event::new(Kind::Query);
            ev.statement = Some(format!("select {i}"));
            ev.link = Link::Query(*ticket);
            auditor.append_ahead(ev).await.unwrap();
        }
        // Results in another order than their queries.
        for (i, ticket) in tickets.iter().enumerate().rev() {
            let mut ev = Event::new(Kind::Result);
            ev.message = Some(format!("done {i}"));
            ev.link = Link::Result(*ticket);
            auditor.append_nowait(ev).await;
        }
        assert!(
            eventually(|| stored(&store).len() == 7).await,
            "{durability:?}"
        );
        let records = stored(&store);
        for r in records.iter().filter(|r| r.kind == Kind::Result) {
            let i = r.message.as_deref().unwrap().trim_start_matches("done ");
            let query = &records[r.ref_seq.expect("ref_seq") as usize - 1];
            assert_eq!(
                query.statement.as_deref(),
                Some(format!("select {i}").as_str())
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_appends_ahead_queue_only_while_the_store_is_healthy() {
    let store = MemoryStore::default();
    let auditor = open(&store, Durability::Async);
    store.control.fail_inserts.store(true, Ordering::SeqCst);
    // Queued without waiting: the failure is not known yet.
    assert!(auditor.append_ahead(Event::new(Kind::Query)).await.is_ok());
    assert!(eventually(|| auditor.counters().failed >= 1).await);
    // Now appends wait for their verdict: the statement is refused.
    let err = auditor
        .append_ahead(Event::new(Kind::Query))
        .await
        .unwrap_err();
    assert!(matches!(err, AuditError::Write(_)), "{err}");
    store.control.fail_inserts.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(auditor.append_ahead(Event::new(Kind::Query)).await.is_ok());
    assert!(
        eventually(|| !auditor
            .inner
            .as_ref()
            .unwrap()
            .counters
            .failing
            .load(Ordering::Relaxed))
        .await
    );
    assert!(auditor.append_ahead(Event::new(Kind::Query)).await.is_ok());
    assert!(eventually(|| stored(&store).len() == 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_appends_wait_once_the_writer_lags_far_behind() {
    let store = MemoryStore::default();
    let auditor = open(&store, Durability::Async);
    // The first record makes the writer fsync 20 ms later; that fsync
    // takes 600 ms, and the writer stores nothing meanwhile.
    auditor.append_ahead(Event::new(Kind::Query)).await.unwrap();
    store.control.sync_delay_us.store(600_000, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..1500 {
        let (a, done) = (auditor.clone(), done.clone());
        tokio::spawn(async move {
            a.append_ahead(Event::new(Kind::Query)).await.unwrap();
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let queued_only = done.load(Ordering::SeqCst);
    assert!(
        (super::ASYNC_BACKLOG - 10..=super::ASYNC_BACKLOG + 10).contains(&queued_only),
        "{queued_only} appends returned while the writer was stuck"
    );
    store.control.sync_delay_us.store(0, Ordering::SeqCst);
    assert!(eventually(|| done.load(Ordering::SeqCst) == 1500).await);
}

#[tokio::test]
async fn insert_failure_is_an_error_and_the_seq_is_not_skipped() {
    let store = MemoryStore::default();
    let auditor = open(&store, Durability::Group);
    store.control.fail_inserts.store(true, Ordering::SeqCst);
    let err = auditor.append(Event::new(Kind::Query)).await.unwrap_err();
    assert!(matches!(err, AuditError::Write(_)), "{err}");
    auditor.append_nowait(Event::new(Kind::Result)).await;
    // Queue order: this one is answered after the nowait record was tried.
    assert!(auditor.append(Event::new(Kind::Query)).await.is_err());
    store.control.fail_inserts.store(false, Ordering::SeqCst);
    assert_eq!(auditor.append(Event::new(Kind::Query)).await.unwrap(), 2);
    let c = auditor.counters();
    assert_eq!((c.appended, c.failed), (2, 3));
    let records = stored(&store);
    assert_eq!(records[1].prev_hash, records[0].hash);
}

#[tokio::test]
async fn fsync_failure_is_an_error_in_group_and_sync_modes() {
    for durability in [Durability::Group, Durability::Sync] {
        let store = MemoryStore::default();
        let auditor = open(&store, durability);
        store.control.fail_syncs.store(true, Ordering::SeqCst);
        assert!(auditor.append(Event::new(Kind::Query)).await.is_err());
        store.control.fail_syncs.store(false, Ordering::SeqCst);
        // The record is in the chain (stored but not confirmed durable).
        assert_eq!(auditor.append(Event::new(Kind::Query)).await.unwrap(), 3);
    }
}

#[tokio::test]
async fn async_mode_fails_closed_after_a_failed_background_fsync() {
    let store = MemoryStore::default();
    let auditor = open(&store, Durability::Async);
    store.control.fail_syncs.store(true, Ordering::SeqCst);
    assert!(auditor.append(Event::new(Kind::Query)).await.is_ok());
    assert!(eventually(|| auditor.counters().failed >= 1).await);
    assert!(auditor.append(Event::new(Kind::Query)).await.is_err());
    store.control.fail_syncs.store(false, Ordering::SeqCst);
    assert!(auditor.append(Event::new(Kind::Query)).await.is_ok());
    assert_eq!(store.control.durable.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_failed_store_is_reopened_and_the_chain_goes_on_from_its_durable_tail() {
    let store = MemoryStore::default();
    let auditor = open(&store, Durability::Group);
    assert_eq!(auditor.append(Event::new(Kind::Query)).await.unwrap(), 2);
    store.control.fail_syncs.store(true, Ordering::SeqCst);
    assert!(auditor.append(Event::new(Kind::Query)).await.is_err());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    store.control.fail_syncs.store(false, Ordering::SeqCst);
    // Seq 3 never reached the disk: the reopened store goes on after 2.
    assert_eq!(auditor.append(Event::new(Kind::Query)).await.unwrap(), 3);
    assert_eq!(store.control.reopens.load(Ordering::SeqCst), 1);
    let records = stored(&store);
    assert_eq!(records.len(), 3);
    assert_eq!(records[2].prev_hash, records[1].hash);
}

#[tokio::test]
async fn a_start_after_a_run_without_gateway_stop_says_so() {
    let store = MemoryStore::default();
    let auditor = open(&store, Durability::Group);
    let mut ev = Event::new(Kind::Query);
    ev.statement = Some("select 1".into());
    let last = auditor.append(ev).await.unwrap();
    // The process dies: no gateway_stop. The writer thread only goes
    // away with the channel.
    drop(auditor);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let again = open(&store, Durability::Group);
    again.shutdown().await.unwrap();
    let third = open(&store, Durability::Group);
    third.shutdown().await.unwrap();
    let starts: Vec<Option<String>> = stored(&store)
        .into_iter()
        .filter(|r| r.kind == Kind::GatewayStart)
        .map(|r| r.message)
        .collect();
    assert_eq!(starts.len(), 3);
    let unclean = format!(
        "the previous run ended without gateway_stop: its last record is seq {last} (query)"
    );
    assert!(!starts[0]
        .as_deref()
        .unwrap()
        .contains("without gateway_stop"));
    assert!(
        starts[1].as_deref().unwrap().ends_with(&unclean),
        "{starts:?}"
    );
    assert!(
        !starts[2]
            .as_deref()
            .unwrap()
            .contains("without gateway_stop"),
        "a clean stop before it: {starts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_idempotent_and_later_appends_fail() {
    let store = MemoryStore::default();
    let auditor = open(&store, Durability::Group);
    auditor.append(Event::new(Kind::Query)).await.unwrap();
    let head = auditor.shutdown().await.unwrap();
    assert_eq!(auditor.shutdown().await.unwrap(), head);
    assert!(matches!(
        auditor.append(Event::new(Kind::Query)).await,
        Err(AuditError::Closed)
    ));
    auditor.append_nowait(Event::new(Kind::Query)).await;
    assert_eq!(auditor.counters().failed, 1);
    let records = stored(&store);
    let stop = records.last().unwrap();
    assert_eq!(stop.kind, Kind::GatewayStop);
    assert_eq!(stop.hash, head);
    assert_eq!(
        stop.message.as_deref(),
        Some(format!("chain head {}", records[1].hash).as_str())
    );
}

#[tokio::test]
async fn reopening_continues_seq_and_chain() {
    let store = MemoryStore::default();
    let first = open(&store, Durability::Group);
    first.append(Event::new(Kind::Query)).await.unwrap();
    let head = first.shutdown().await.unwrap();
    let second = open(&store, Durability::Group);
    assert_eq!(second.append(Event::new(Kind::Query)).await.unwrap(), 5);
    let records = stored(&store);
    assert_eq!(records[3].kind, Kind::GatewayStart);
    assert_eq!(records[3].prev_hash, head);
}

#[test]
fn a_damaged_tail_is_refused() {
    let store = MemoryStore::default();
    store
        .records
        .lock()
        .unwrap()
        .insert(1, b"{\"seq\":1}".to_vec());
    let err = Auditor::with_store(Box::new(store), &cfg(Durability::Group))
        .err()
        .unwrap();
    assert!(matches!(err, AuditError::Corrupt { seq: 1, .. }), "{err}");
}

#[tokio::test]
async fn disabled_auditor_is_a_no_op() {
    let auditor = Auditor::open(&AuditConfig {
        enabled: false,
        ..AuditConfig::default()
    })
    .unwrap();
    assert!(!auditor.enabled());
    assert!(!auditor.gathers());
    assert_eq!(auditor.append(Event::new(Kind::Query)).await.unwrap(), 0);
    assert_eq!(auditor.queue_depth(), 0);
    assert_eq!(auditor.shutdown().await.unwrap(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appenders_wait_for_room_when_the_queue_is_full_and_nothing_is_lost() {
    let store = MemoryStore::default();
    let auditor = open(&store, Durability::Async);
    let statement = |i: usize| {
        let mut ev = Event::new(Kind::Query);
        ev.statement = Some(format!("select {i}"));
        ev
    };
    auditor.append(statement(0)).await.unwrap();
    // The async mode's background fsync of that record (due 20 ms after
    // it) now takes 400 ms, and the writer takes nothing off the queue
    // meanwhile.
    store.control.sync_delay_us.store(400_000, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let n = super::QUEUE_CAPACITY + 50;
    let started = std::time::Instant::now();
    for i in 1..=n {
        auditor.append_nowait(statement(i)).await;
    }
    let waited = started.elapsed();
    store.control.sync_delay_us.store(0, Ordering::SeqCst);
    assert!(
        waited >= Duration::from_millis(150),
        "the last {} records waited for room ({waited:?})",
        n - super::QUEUE_CAPACITY
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let statements = loop {
        let statements: Vec<String> = stored(&store)
            .into_iter()
            .filter_map(|r| r.statement)
            .collect();
        if statements.len() > n || std::time::Instant::now() > deadline {
            break statements;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let expected: Vec<String> = (0..=n).map(|i| format!("select {i}")).collect();
    assert!(statements == expected, "every record, in the order sent");
}
