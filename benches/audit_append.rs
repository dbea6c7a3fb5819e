//! Audit store benchmark: sustained append rate (until stored and fsynced)
//! and the wait before a statement may be forwarded (`append_ahead`: the
//! fsync in `group`/`sync`, only the queue in `async`) per durability mode
//! with 50 concurrent appenders, the disk's fdatasync floor,
//! and export/verify rates (and peak memory) over 1,000,000 records.
//!
//! Run: `cargo bench -j 1 --bench audit_append` (release). Set
//! `AUDIT_BENCH_RECORDS` and `AUDIT_BENCH_SECS` to change the sizes, and
//! `AUDIT_BENCH_MODES` (e.g. `group,async`) to run only some modes.
//! Exports run in a child process of this binary so that its peak RSS
//! (VmHWM) is the export's alone.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pgwarden::audit::cli::{ExportArgs, StoreArgs};
use pgwarden::audit::export::Format;
use pgwarden::audit::{Auditor, Event, Kind, Status, StoreReader};
use pgwarden::config::{AuditConfig, Durability};

const APPENDERS: usize = 50;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn query_event(task: usize, n: u64) -> Event {
    let mut ev = Event::new(Kind::Query);
    ev.session_id = Some(format!("{task:08x}-5d1c-4c1e-9a57-{n:012x}").into());
    ev.client_user = Some(format!("user{}", task % 7).into());
    ev.role = Some("analyst".into());
    ev.database = Some("cloudfront_data".into());
    ev.client_addr = Some("127.0.0.1:54321".into());
    ev.application_name = Some("pgbench".into());
    ev.statement = Some(format!(
        "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
        n * 7919 % 100_000
    ));
    ev
}

fn result_event(query: &Event, seq: u64) -> Event {
    let mut ev = query.clone();
    ev.kind = Kind::Result;
    ev.statement = None;
    ev.ref_seq = Some(seq);
    ev.status = Some(Status::Ok);
    ev.command_tag = Some("SELECT 1".into());
    ev.rows = Some(1);
    ev.duration_us = Some(87);
    ev
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// CPU time (user + system) this process has used so far, all threads.
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// 200 x (4 KiB write + fdatasync) on the benchmark's filesystem.
fn fdatasync_floor(dir: &Path) -> (Duration, Duration) {
    let mut file = std::fs::File::create(dir.join("fsync-probe")).expect("probe file");
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        file.write_all(&[7u8; 4096]).expect("write");
        file.sync_data().expect("fdatasync");
        times.push(t.elapsed());
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

struct AppendResult {
    records: u64,
    secs: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    syncs: u64,
    /// Process CPU time (appenders, writer, sled's threads) per record.
    cpu_per_record: Duration,
}

fn bench_append(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    durability: Durability,
    secs: u64,
) -> AppendResult {
    let cfg = AuditConfig {
        store: dir.to_path_buf(),
        durability,
        ..AuditConfig::default()
    };
    rt.block_on(async {
        let auditor = Auditor::open(&cfg).expect("open store");
        let cpu_before = process_cpu();
        let start = Instant::now();
        let stop_at = start + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..APPENDERS)
            .map(|task| {
                let a = auditor.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut n = 0u64;
                    while Instant::now() < stop_at {
                        let t = Instant::now();
                        a.append_ahead(query_event(task, n)).await.expect("append");
                        latencies.push(t.elapsed());
                        n += 1;
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        let syncs = auditor.counters().syncs;
        // Until everything queued is stored and fsynced (async queues ahead).
        auditor.shutdown().await.expect("shutdown");
        let secs = start.elapsed().as_secs_f64();
        let cpu = process_cpu() - cpu_before;
        all.sort();
        AppendResult {
            records: all.len() as u64,
            secs,
            p50: percentile(&all, 0.5),
            p99: percentile(&all, 0.99),
            max: all.last().copied().unwrap_or_default(),
            syncs,
            cpu_per_record: cpu / (all.len().max(1) as u32),
        }
    })
}

/// Fills a store with `records` records: query + result pairs from 50 sessions.
fn fill(rt: &tokio::runtime::Runtime, dir: &Path, records: u64) -> f64 {
    let cfg = AuditConfig {
        store: dir.to_path_buf(),
        durability: Durability::Async,
        ..AuditConfig::default()
    };
    rt.block_on(async {
        let auditor = Auditor::open(&cfg).expect("open store");
        let start = Instant::now();
        let per_task = records.saturating_sub(2) / 2 / APPENDERS as u64;
        let tasks: Vec<_> = (0..APPENDERS)
            .map(|task| {
                let a = auditor.clone();
                tokio::spawn(async move {
                    for n in 0..per_task {
                        let q = query_event(task, n);
                        let seq = a.append(q.clone()).await.expect("append");
                        a.append_nowait(result_event(&q, seq)).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        auditor.shutdown().await.expect("shutdown");
        start.elapsed().as_secs_f64()
    })
}

/// Child mode: `--child STORE WHAT` runs one offline command and prints
/// `records seconds vmhwm_kib`.
fn child(store: &Path, what: &str) {
    let start = Instant::now();
    let args = |format, raw| ExportArgs {
        store: StoreArgs {
            store: vec![store.to_path_buf()],
            config: None,
            archives: Vec::new(),
        },
        format,
        raw,
        since: None,
        until: None,
        user: None,
        database: None,
        kind: None,
        output: Some("/dev/null".into()),
    };
    let code = match what {
        "joined-jsonl" => pgwarden::audit::cli::export(&args(Format::Jsonl, false)),
        "raw-jsonl" => pgwarden::audit::cli::export(&args(Format::Jsonl, true)),
        "joined-csv" => pgwarden::audit::cli::export(&args(Format::Csv, false)),
        "verify" => {
            let reader = StoreReader::open(store).expect("open");
            match pgwarden::audit::verify::verify(&reader).expect("read") {
                Ok(_) => 0,
                Err(bad) => panic!("{bad}"),
            }
        }
        _ => panic!("unknown child task {what}"),
    };
    assert_eq!(code, 0, "{what} failed");
    let secs = start.elapsed().as_secs_f64();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map(|v| v.trim().trim_end_matches(" kB").to_string())
        .unwrap_or_default();
    println!("{secs} {hwm}");
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--child") {
        child(Path::new(&argv[i + 1]), &argv[i + 2]);
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it: a smoke run of the same code with tiny sizes.
    let smoke = !argv.iter().any(|a| a == "--bench");
    let secs = env_or("AUDIT_BENCH_SECS", if smoke { 1 } else { 5 });
    let records = env_or("AUDIT_BENCH_RECORDS", if smoke { 2_000 } else { 1_000_000 });
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let (f50, f99) = fdatasync_floor(base.path());
    println!(
        "fdatasync of 4 KiB on this disk: p50 {} ms, p99 {} ms\n",
        ms(f50),
        ms(f99)
    );

    println!("append, {APPENDERS} concurrent appenders, {secs} s each");
    println!("| mode  | records/s | p50 ms | p99 ms | max ms | records/fsync | CPU µs/record |");
    println!("|-------|-----------|--------|--------|--------|---------------|---------------|");
    for (name, durability) in [
        ("group", Durability::Group),
        ("sync", Durability::Sync),
        ("async", Durability::Async),
    ] {
        if std::env::var("AUDIT_BENCH_MODES")
            .is_ok_and(|modes| !modes.split(',').any(|m| m == name))
        {
            continue;
        }
        let dir = base.path().join(name);
        let r = bench_append(&rt, &dir, durability, secs);
        println!(
            "| {name:<5} | {:>9.0} | {:>6} | {:>6} | {:>6} | {:>13.1} | {:>13.1} |",
            r.records as f64 / r.secs,
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.records as f64 / r.syncs.max(1) as f64,
            r.cpu_per_record.as_secs_f64() * 1e6
        );
    }

    let dir = base.path().join("export");
    let fill_secs = fill(&rt, &dir, records);
    println!("\nfilled {records} records (async, 50 sessions) in {fill_secs:.1} s");
    let exe = std::env::current_exe().expect("bench binary");
    println!("| task         | records/s | seconds | peak RSS MiB |");
    println!("|--------------|-----------|---------|--------------|");
    for what in ["joined-jsonl", "raw-jsonl", "joined-csv", "verify"] {
        let out = Command::new(&exe)
            .args(["--child", dir.to_str().expect("utf-8 path"), what])
            .output()
            .expect("run child");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        let secs: f64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or(f64::NAN);
        let kib: f64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or(f64::NAN);
        println!(
            "| {what:<12} | {:>9.0} | {secs:>7.2} | {:>12.1} |",
            records as f64 / secs,
            kib / 1024.0
        );
    }
    let size: u64 = walk_size(&dir);
    println!(
        "\nstore size on disk for {records} records: {:.0} MiB",
        size as f64 / 1048576.0
    );
}

fn walk_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
