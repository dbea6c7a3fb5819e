//! Retention (`[audit] archive_dir`, `pgwarden audit archive`): a running
//! gateway moves its old records into archive files without stopping
//! statements; the store alone still verifies from its boundary, the
//! archives and the store verify and export as one chain, each record
//! exactly once; a missing or changed archive is named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::support::{self, start_gateway, Opts};

fn pgwarden(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(args)
        .output()
        .unwrap()
}

/// `audit <command> --archive A ... [--store S] rest...`.
fn audit(command: &str, archives: &[PathBuf], store: Option<&Path>, rest: &[&str]) -> Output {
    let mut args = vec!["audit".to_string(), command.to_string()];
    for archive in archives {
        args.extend(["--archive".to_string(), archive.display().to_string()]);
    }
    if let Some(store) = store {
        args.extend(["--store".to_string(), store.display().to_string()]);
    }
    args.extend(rest.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pgwarden(&args)
}

/// `audit archive` of everything `store` lets go of, into `to`.
fn archive_everything(store: &Path, to: &Path) -> Output {
    let to = to.to_str().unwrap();
    audit(
        "archive",
        &[],
        Some(store),
        &["--before", "2999-01-01T00:00:00Z", "-o", to],
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The archive files in `dir`, oldest first.
fn archives_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "pgwarchive"));
    files.sort();
    files
}

/// The seqs of a raw export.
fn exported_seqs(out: &Output) -> Vec<u64> {
    assert!(out.status.success(), "{}", text(out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_gateway_archives_old_records_and_the_chain_holds_across_files() {
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: "instance = \"gw-ret\"\narchive_dir = \"archive\"\narchive_after_days = 0\narchive_interval_s = 1\n".into(),
        ..Opts::default()
    })
    .await;
    let archive_dir = gw.dir.path().join("archive");
    let client = gw.connect("alice").await;
    // Statements keep running while records are archived.
    let mut round = 0;
    while archives_in(&archive_dir).len() < 2 {
        for i in 0..20 {
            support::one(&client, &format!("SELECT 'kept-{round}-{i}'")).await;
        }
        round += 1;
        assert!(round < 100, "nothing was archived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(client);
    let dir = gw.stop().await;
    let store = dir.path().join("audit");
    let archives = archives_in(&dir.path().join("archive"));
    let last = pgwarden::audit::StoreReader::open(&store)
        .unwrap()
        .last_seq()
        .unwrap()
        .unwrap();

    // The store alone verifies from its boundary and says what it lacks.
    let out = audit("verify", &[], Some(&store), &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("are archived and were not checked"),
        "{}",
        text(&out)
    );

    // Archives and store: one chain from seq 1, each record once.
    let out = audit("verify", &archives, Some(&store), &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("audit chain intact: {last} records")),
        "{}",
        text(&out)
    );
    let seqs = exported_seqs(&audit("export", &archives, Some(&store), &["--raw"]));
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    let joined = audit("export", &archives, Some(&store), &[]);
    let joined = String::from_utf8_lossy(&joined.stdout).to_string();
    for r in 0..round {
        assert_eq!(joined.matches(&format!("SELECT 'kept-{r}-0'")).count(), 1);
    }
    // The archives alone.
    let archived = exported_seqs(&audit("export", &archives, None, &["--raw"]));
    assert_eq!(archived.first(), Some(&1));
    assert_eq!(
        archived,
        (1..=*archived.last().unwrap()).collect::<Vec<_>>()
    );

    // A second copy of an archive (a crash between writing it and emptying
    // the store leaves one) counts once.
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("copy.pgwarchive");
    std::fs::copy(&archives[0], &copy).unwrap();
    let mut twice = archives.clone();
    twice.push(copy);
    let seqs = exported_seqs(&audit("export", &twice, Some(&store), &["--raw"]));
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());

    // A missing archive in the middle is a gap; a changed one is named.
    let mut skipped = archives.clone();
    skipped.remove(0);
    let out = audit("verify", &skipped, Some(&store), &[]);
    assert!(
        out.status.success(),
        "starts after the skipped one: {}",
        text(&out)
    );
    let mut gap = archives.clone();
    gap.remove(1);
    let out = audit("verify", &gap, Some(&store), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("do not fit"), "{}", text(&out));
    // Archives that do not reach the store's boundary do not fit it.
    let out = audit("verify", &archives[..1], Some(&store), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("do not fit"), "{}", text(&out));
    let changed = work.path().join("changed.pgwarchive");
    let mut bytes = std::fs::read(&archives[0]).unwrap();
    bytes[40] ^= 0x20;
    std::fs::write(&changed, bytes).unwrap();
    let mut tampered = archives.clone();
    tampered[0] = changed;
    let out = audit("verify", &tampered, Some(&store), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // Offline: the stopped gateway's store, archived up to its last run.
    let offline = work.path().join("offline.pgwarchive");
    let out = archive_everything(&store, &offline);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("archived records"), "{}", text(&out));
    let mut all = archives.clone();
    all.push(offline);
    let out = audit("verify", &all, Some(&store), &[]);
    assert!(
        text(&out).contains(&format!("audit chain intact: {last} records")),
        "{}",
        text(&out)
    );
    let seqs = exported_seqs(&audit("export", &all, Some(&store), &["--raw"]));
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
}

/// Several gateways' stores read together: each is its own chain,
/// verified on its own and named when it fails; the merged export holds
/// every record of every store exactly once, with its instance.
#[tokio::test(flavor = "multi_thread")]
async fn several_stores_verify_each_and_export_merged() {
    let mut stores = Vec::new();
    let mut dirs = Vec::new();
    for name in ["gw-a", "gw-b"] {
        let gw = start_gateway(Opts {
            audit: true,
            audit_extra: format!("instance = \"{name}\"\narchive_dir = \"archive\"\narchive_after_days = 0\narchive_interval_s = 1\n"),
            ..Opts::default()
        })
        .await;
        let client = gw.connect("alice").await;
        for i in 0..15 {
            support::one(&client, &format!("SELECT '{name}-{i}'")).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(client);
        let dir = gw.stop().await;
        stores.push(dir.path().join("audit"));
        dirs.push(dir);
    }
    let archives: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| archives_in(&d.path().join("archive")))
        .collect();
    assert!(!archives.is_empty(), "nothing was archived");
    let stores_and = |rest: &[&str]| {
        let mut args: Vec<String> = Vec::new();
        for s in &stores {
            args.extend(["--store".into(), s.display().to_string()]);
        }
        for a in &archives {
            args.extend(["--archive".into(), a.display().to_string()]);
        }
        args.extend(rest.iter().map(|r| r.to_string()));
        args
    };
    let run = |command: &str, rest: &[&str]| {
        let mut args = vec!["audit".to_string(), command.to_string()];
        args.extend(stores_and(rest));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pgwarden(&args)
    };

    let out = run("verify", &[]);
    assert!(out.status.success(), "{}", text(&out));
    for name in ["gw-a", "gw-b"] {
        assert!(
            text(&out).contains(&format!("instance {name}: audit chain intact")),
            "{}",
            text(&out)
        );
    }
    let out = run("export", &["--raw"]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (name, store) in ["gw-a", "gw-b"].iter().zip(&stores) {
        let last = pgwarden::audit::StoreReader::open(store)
            .unwrap()
            .last_seq()
            .unwrap()
            .unwrap();
        let seqs: Vec<u64> = lines
            .iter()
            .filter(|l| l["instance"] == *name)
            .map(|l| l["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "{name}");
    }
    let joined = run("export", &[]);
    let joined = String::from_utf8_lossy(&joined.stdout).to_string();
    for name in ["gw-a", "gw-b"] {
        assert_eq!(joined.matches(&format!("SELECT '{name}-7'")).count(), 1);
    }
    let mut times: Vec<&str> = lines.iter().map(|l| l["ts"].as_str().unwrap()).collect();
    let merged = times.clone();
    times.sort();
    assert_eq!(merged, times, "merged by time");

    // One chain damaged (a byte of gw-b's archive): named, the other
    // still intact.
    let b_archive = archives
        .iter()
        .find(|a| a.file_name().unwrap().to_string_lossy().starts_with("gw-b"))
        .unwrap();
    let mut bytes = std::fs::read(b_archive).unwrap();
    bytes[40] ^= 0x20;
    std::fs::write(b_archive, bytes).unwrap();
    let out = run("verify", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("instance gw-a: audit chain intact"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("instance gw-b: chain broken"),
        "{}",
        text(&out)
    );
    // gw-a's archives given with gw-b's store alone: not its chain.
    let a_archives: Vec<PathBuf> = archives
        .iter()
        .filter(|a| a.file_name().unwrap().to_string_lossy().starts_with("gw-a"))
        .cloned()
        .collect();
    let out = audit("verify", &a_archives, Some(&stores[1]), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("do not fit"), "{}", text(&out));

    // The same instance twice is a copy, not a second gateway.
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("copy");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(&stores[0])
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let a = stores[0].to_str().unwrap();
    for second in [a, copy.to_str().unwrap()] {
        let out = pgwarden(&["audit", "export", "--store", a, "--store", second]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("given twice")
                || text(&out).contains("second store of instance gw-a"),
            "{}",
            text(&out)
        );
    }
}

/// A store that ships keeps its records until the shipper sent them, even
/// from the offline command: a syslog server that was never reachable
/// leaves everything in the store.
#[tokio::test(flavor = "multi_thread")]
async fn records_never_shipped_are_never_archived() {
    let nobody = crate::support::cluster::free_port();
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: format!("[audit.ship]\naddress = \"127.0.0.1:{nobody}\"\n"),
        ..Opts::default()
    })
    .await;
    let client = gw.connect("alice").await;
    for i in 0..30 {
        support::one(&client, &format!("SELECT 'unshipped-{i}'")).await;
    }
    drop(client);
    let dir = gw.stop().await;
    let store = dir.path().join("audit");
    let out_file = dir.path().join("early.pgwarchive");
    let out = archive_everything(&store, &out_file);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to archive"), "{}", text(&out));
    assert!(!out_file.exists());
}
