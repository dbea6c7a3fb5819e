//! Tests of archives (`archive.rs`).

use super::*;
use crate::audit::record::{Event, Kind};
use crate::audit::store::key;
use crate::audit::testutil::build_store_in_runs;

/// A store of `n` queries, one a second, `run` records per value.
fn sample_store(n: u64, run: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let times: Vec<String> = (0..n)
        .map(|i| format!("2026-11-27T10:{:02}:{:02}.000000Z", i / 60, i % 60))
        .collect();
    let events = times
        .iter()
        .map(|ts| {
            let mut event = Event::new(Kind::Query);
            event.statement = Some(format!("SELECT '{ts}'"));
            (ts.as_str(), event)
        })
        .collect();
    build_store_in_runs(dir.path(), events, run);
    dir
}

fn all(archive: &Archive, from: u64) -> Vec<u64> {
    archive.scan_from(from).map(|e| e.unwrap().0).collect()
}

#[test]
fn old_records_move_to_an_archive_that_reads_back_the_same() {
    let dir = sample_store(40, 5);
    let db = crate::audit::testutil::open_plain(dir.path());
    let before: Vec<RawEntry> = crate::audit::reader::scan_tree(&db, 1)
        .map(Result::unwrap)
        .collect();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("a.pgwarchive");
    let far = OffsetDateTime::now_utc() + time::Duration::days(1);
    let manifest = archive_store(&db, far, 25, &path, Some("gw"))
        .unwrap()
        .unwrap();
    assert_eq!((manifest.first_seq, manifest.last_seq), (1, 25));
    assert_eq!(manifest.prev_hash, GENESIS_HASH);
    let archive = Archive::open(&path).unwrap();
    assert_eq!(archive.manifest, manifest);
    let read: Vec<RawEntry> = archive.scan_from(1).map(Result::unwrap).collect();
    assert_eq!(read, before[..25]);
    assert_eq!(all(&archive, 7), (7..=25).collect::<Vec<_>>());
    // The store starts after the boundary; the head is the 25th hash.
    assert!(db.get(key(25)).unwrap().is_none());
    let left: Vec<u64> = crate::audit::reader::scan_tree(&db, 1)
        .map(|e| e.unwrap().0)
        .collect();
    assert_eq!(left, (26..=40).collect::<Vec<_>>());
    let b = boundary(&db).unwrap().unwrap();
    assert_eq!(b.seq, 25);
    assert_eq!(b.head, manifest.head);
    // Again: the rest, but never the last run (36..=40); an existing
    // file is refused.
    assert!(archive_store(&db, far, 100, &path, None).is_err());
    let second = out.path().join("b.pgwarchive");
    let manifest = archive_store(&db, far, 100, &second, None)
        .unwrap()
        .unwrap();
    assert_eq!((manifest.first_seq, manifest.last_seq), (26, 35));
    assert_eq!(manifest.prev_hash, b.head);
    assert!(archive_store(&db, far, 100, &out.path().join("c"), None)
        .unwrap()
        .is_none());
}

#[test]
fn nothing_recent_and_nothing_tampered_is_archived() {
    let dir = sample_store(10, 1);
    let db = crate::audit::testutil::open_plain(dir.path());
    let out = tempfile::tempdir().unwrap();
    let long_ago = OffsetDateTime::UNIX_EPOCH;
    assert!(
        archive_store(&db, long_ago, 100, &out.path().join("a"), None)
            .unwrap()
            .is_none()
    );
    let raw = db.get(key(3)).unwrap().unwrap();
    let edited = String::from_utf8(raw.to_vec())
        .unwrap()
        .replace("\"seq\":3", "\"seq\":3 ");
    db.insert(key(3), edited.as_bytes()).unwrap();
    let far = OffsetDateTime::now_utc() + time::Duration::days(1);
    let err = archive_store(&db, far, 100, &out.path().join("b"), None).unwrap_err();
    assert!(err.to_string().contains("nothing was archived"), "{err}");
    assert!(!out.path().join("b").exists());
    assert!(db.get(key(1)).unwrap().is_some());
}

#[test]
fn a_damaged_archive_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("x");
    std::fs::write(&path, b"PGWARDEN-AUDIT-ARCHIVE 1\nrubbish").unwrap();
    assert!(Archive::open(&path).is_err());
    std::fs::write(&path, b"hello").unwrap();
    assert!(Archive::open(&path).is_err());
}

/// Rewrites the manifest of the archive at `path` with `edit`.
fn edit_manifest(path: &Path, edit: impl FnOnce(&mut Manifest)) {
    let bytes = std::fs::read(path).unwrap();
    let at = u64::from_be_bytes(bytes[bytes.len() - 8..].try_into().unwrap()) as usize;
    let mut manifest: Manifest = serde_json::from_slice(&bytes[at..bytes.len() - 8]).unwrap();
    edit(&mut manifest);
    let mut out = bytes[..at].to_vec();
    out.extend_from_slice(&serde_json::to_vec(&manifest).unwrap());
    out.extend_from_slice(&(at as u64).to_be_bytes());
    std::fs::write(path, out).unwrap();
}

#[test]
fn a_manifest_that_lies_about_its_records_is_named() {
    let dir = sample_store(40, 5);
    let db = crate::audit::testutil::open_plain(dir.path());
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("a.pgwarchive");
    let far = OffsetDateTime::now_utc() + time::Duration::days(1);
    archive_store(&db, far, 25, &path, None).unwrap().unwrap();
    assert!(Archive::open(&path).unwrap().manifest.blocks.len() > 2);
    for edit in [
        (|m: &mut Manifest| m.last_seq = 999_999) as fn(&mut Manifest),
        |m| m.head = "0".repeat(64),
        |m| m.first_seq = 2,
        // The block index: one block left out, one listed twice.
        |m| {
            m.blocks.remove(1);
        },
        |m| {
            let twice = m.blocks[1];
            m.blocks.insert(1, twice);
        },
    ] {
        let lying = out.path().join("lying.pgwarchive");
        std::fs::copy(&path, &lying).unwrap();
        edit_manifest(&lying, edit);
        let archive = Archive::open(&lying).unwrap();
        let err = archive.scan_from(1).find_map(Result::err).expect("named");
        assert!(err.to_string().contains("says it holds"), "{err}");
    }
}

#[test]
fn the_temporary_file_never_follows_a_link() {
    let dir = sample_store(20, 5);
    let db = crate::audit::testutil::open_plain(dir.path());
    let out = tempfile::tempdir().unwrap();
    let victim = out.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let path = out.path().join("a.pgwarchive");
    std::os::unix::fs::symlink(&victim, out.path().join("a.pgwarchive.part")).unwrap();
    let far = OffsetDateTime::now_utc() + time::Duration::days(1);
    archive_store(&db, far, 100, &path, None).unwrap().unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert!(!std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(Archive::open(&path).is_ok());
}
