//! `audit verify`: walks the hash chain and names the first record that
//! does not match.
//!
//! Invariant: a store is reported intact only if its keys are exactly
//! 1..=n, every value is the canonical stored form of a record whose `seq`
//! is its key, whose `prev_hash` is the previous record's `hash` (64 zeros
//! for seq 1) and whose `hash` recomputes (see [`super::record`]), and every
//! `gateway_stop` names the chain head before it. So any changed, removed
//! (gap) or reordered record is found, at the lowest seq where it shows.
//! Removing records from the end leaves a valid shorter chain: compare the
//! printed head with one pinned elsewhere (the gateway logs it at shutdown).

use std::fmt;

use super::chain::check_stored;
use super::reader::StoreReader;
use super::record::Record;
use super::AuditError;

/// An intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    /// The first seq checked: 1, or the first after archived records
    /// that were not given.
    pub first: u64,
    /// Number of records checked (= the last seq when `first` is 1).
    pub records: u64,
    /// Hash of the last record (64 zeros for an empty store).
    pub head: String,
}

/// The first record that does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    pub seq: u64,
    pub reason: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chain broken at seq {}: {}", self.seq, self.reason)
    }
}

/// Walks the whole store. `Err` only when it cannot be read at all;
/// tampering is `Ok(Err(BadRecord))`.
pub fn verify(reader: &StoreReader) -> Result<Result<Intact, BadRecord>, AuditError> {
    // From the start of what the reader holds: seq 1 after the genesis
    // hash, or the first record after archived ones, after their head.
    let (first, mut head) = reader.start()?;
    let mut expected = first;
    // From key 0 when starting at 1: a record stored there is an error too.
    for entry in reader.scan_from(if first == 1 { 0 } else { first }) {
        let (seq, raw) = match entry {
            Ok(entry) => entry,
            Err(AuditError::Corrupt { message, .. }) => {
                return Ok(Err(bad(expected, message)));
            }
            Err(e) => return Err(e),
        };
        if seq != expected {
            let reason = if seq == 0 {
                "a record is stored under key 0".to_string()
            } else {
                format!("record {expected} is missing (the next stored record is {seq})")
            };
            return Ok(Err(bad(expected, reason)));
        }
        let record = match Record::from_stored_bytes(&raw) {
            Ok(r) => r,
            Err(e) => return Ok(Err(bad(seq, format!("record cannot be decoded ({e})")))),
        };
        if let Some(reason) = check_stored(&record, seq, &head, &raw) {
            return Ok(Err(bad(seq, reason)));
        }
        head = record.hash;
        expected += 1;
    }
    Ok(Ok(Intact {
        first,
        records: expected - first,
        head,
    }))
}

fn bad(seq: u64, reason: impl Into<String>) -> BadRecord {
    BadRecord {
        seq,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::compute_hash;
    use crate::audit::store::key;
    use crate::audit::testutil::{sample_store, tamper};
    use crate::audit::{Kind, GENESIS_HASH};

    fn run(dir: &std::path::Path) -> Result<Intact, BadRecord> {
        verify(&StoreReader::open(dir).unwrap()).unwrap()
    }

    fn edited(edit: impl FnOnce(&sled::Db)) -> BadRecord {
        let dir = tempfile::tempdir().unwrap();
        sample_store(dir.path());
        tamper(dir.path(), edit);
        run(dir.path()).unwrap_err()
    }

    fn replace_text(db: &sled::Db, seq: u64, from: &str, to: &str) {
        let value = db.get(key(seq)).unwrap().unwrap();
        let text = String::from_utf8(value.to_vec()).unwrap().replace(from, to);
        db.insert(key(seq), text.as_bytes()).unwrap();
    }

    #[test]
    fn an_intact_store_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let head = sample_store(dir.path());
        let intact = run(dir.path()).unwrap();
        assert_eq!(
            intact,
            Intact {
                first: 1,
                records: 12,
                head
            }
        );
    }

    #[test]
    fn an_empty_store_verifies() {
        let dir = tempfile::tempdir().unwrap();
        crate::audit::testutil::build_store(dir.path(), vec![]);
        assert_eq!(run(dir.path()).unwrap().head, GENESIS_HASH);
    }

    #[test]
    fn a_changed_record_is_named() {
        let bad = edited(|db| replace_text(db, 10, "select", "delete"));
        assert_eq!(bad.seq, 10, "{bad}");
        assert!(bad.reason.contains("changed"), "{bad}");
    }

    #[test]
    fn a_changed_record_with_a_recomputed_hash_shows_at_the_next_seq() {
        let bad = edited(|db| {
            let raw = db.get(key(3)).unwrap().unwrap();
            let mut r = Record::from_stored_bytes(&raw).unwrap();
            r.statement = Some("select 2".into());
            r.hash = compute_hash(&r);
            db.insert(key(3), r.to_stored_bytes()).unwrap();
        });
        assert_eq!(bad.seq, 4, "{bad}");
        assert!(bad.reason.contains("prev_hash"), "{bad}");
    }

    #[test]
    fn a_removed_record_is_named() {
        let bad = edited(|db| {
            db.remove(key(5)).unwrap();
        });
        assert_eq!(bad.seq, 5, "{bad}");
        assert!(bad.reason.contains("missing"), "{bad}");
    }

    #[test]
    fn swapped_records_are_named() {
        let bad = edited(|db| {
            let a = db.get(key(6)).unwrap().unwrap();
            let b = db.get(key(9)).unwrap().unwrap();
            db.insert(key(6), b).unwrap();
            db.insert(key(9), a).unwrap();
        });
        assert_eq!(bad.seq, 6, "{bad}");
        assert!(bad.reason.contains("reordered"), "{bad}");
    }

    #[test]
    fn non_canonical_bytes_are_a_change() {
        let bad = edited(|db| replace_text(db, 2, "\"seq\":2,", "\"seq\": 2,"));
        assert_eq!(bad.seq, 2, "{bad}");
    }

    #[test]
    fn garbage_and_bad_keys_are_named() {
        let bad = edited(|db| {
            db.insert(key(7), b"not json".to_vec()).unwrap();
        });
        assert_eq!(bad.seq, 7, "{bad}");
        let bad = edited(|db| {
            db.insert(b"zz", b"x".to_vec()).unwrap();
        });
        assert_eq!(bad.seq, 13, "{bad}");
    }

    #[test]
    fn gateway_stop_must_name_the_head_before_it() {
        // Rewrite the last record consistently except for its message: only
        // the gateway_stop check can catch it.
        let bad = edited(|db| {
            let raw = db.get(key(12)).unwrap().unwrap();
            let mut r = Record::from_stored_bytes(&raw).unwrap();
            assert_eq!(r.kind, Kind::GatewayStop);
            r.message = Some(format!("chain head {}", "1".repeat(64)));
            r.hash = compute_hash(&r);
            db.insert(key(12), r.to_stored_bytes()).unwrap();
        });
        assert_eq!(bad.seq, 12, "{bad}");
        assert!(bad.reason.contains("gateway_stop"), "{bad}");
    }

    /// Runs of 5: seqs 1-5, 6-10 and 11-12 each share one sled value.
    fn edited_runs(edit: impl FnOnce(&sled::Db)) -> BadRecord {
        let dir = tempfile::tempdir().unwrap();
        crate::audit::testutil::sample_store_in_runs(dir.path(), 5);
        tamper(dir.path(), edit);
        run(dir.path()).unwrap_err()
    }

    /// Unpacks the run stored under `first`, lets `edit` change its records
    /// and stores it back.
    fn edit_run(db: &sled::Db, first: u64, edit: impl FnOnce(&mut Vec<Vec<u8>>)) {
        let value = db.get(key(first)).unwrap().unwrap();
        let mut records: Vec<Vec<u8>> = crate::audit::store::unpack(first, value)
            .unwrap()
            .into_iter()
            .map(|(_, v)| v.to_vec())
            .collect();
        edit(&mut records);
        let values: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        db.insert(key(first), crate::audit::store::encode_run(&values))
            .unwrap();
    }

    #[test]
    fn a_store_of_runs_verifies_and_reads_like_one_of_single_records() {
        let singles = tempfile::tempdir().unwrap();
        let runs = tempfile::tempdir().unwrap();
        let head = sample_store(singles.path());
        assert_eq!(
            crate::audit::testutil::sample_store_in_runs(runs.path(), 5),
            head
        );
        assert_eq!(
            run(runs.path()).unwrap(),
            Intact {
                first: 1,
                records: 12,
                head
            }
        );
        let a = StoreReader::open(singles.path()).unwrap();
        let b = StoreReader::open(runs.path()).unwrap();
        for from in [0, 1, 4, 6, 7, 12, 13] {
            let left: Vec<_> = a.scan_from(from).map(|e| e.unwrap()).collect();
            let right: Vec<_> = b.scan_from(from).map(|e| e.unwrap()).collect();
            assert_eq!(left, right, "scan from {from}");
        }
        for seq in 0..=13 {
            assert_eq!(a.get(seq).unwrap(), b.get(seq).unwrap(), "get {seq}");
        }
    }

    #[test]
    fn a_changed_record_inside_a_run_is_named() {
        let bad = edited_runs(|db| {
            edit_run(db, 6, |records| {
                let text = String::from_utf8(records[1].clone()).unwrap();
                records[1] = text.replace("pg_sleep", "pg_slept").into_bytes();
            })
        });
        assert_eq!(bad.seq, 7, "{bad}");
        assert!(bad.reason.contains("changed"), "{bad}");
    }

    #[test]
    fn a_record_removed_from_inside_a_run_is_named() {
        let bad = edited_runs(|db| edit_run(db, 6, |records| drop(records.remove(1))));
        assert_eq!(bad.seq, 7, "{bad}");
    }

    #[test]
    fn records_swapped_inside_a_run_are_named() {
        let bad = edited_runs(|db| edit_run(db, 1, |records| records.swap(2, 3)));
        assert_eq!(bad.seq, 3, "{bad}");
        assert!(bad.reason.contains("reordered"), "{bad}");
    }

    #[test]
    fn a_removed_run_is_named() {
        let bad = edited_runs(|db| {
            db.remove(key(6)).unwrap();
        });
        assert_eq!(bad.seq, 6, "{bad}");
        assert!(bad.reason.contains("missing"), "{bad}");
    }

    #[test]
    fn a_cut_run_is_named() {
        let bad = edited_runs(|db| {
            let value = db.get(key(6)).unwrap().unwrap();
            db.insert(key(6), &value[..value.len() - 10]).unwrap();
        });
        assert_eq!(bad.seq, 6, "{bad}");
        assert!(bad.reason.contains("cut"), "{bad}");
    }

    #[test]
    fn a_run_claiming_a_huge_size_is_named_without_allocating_it() {
        let bad = edited_runs(|db| {
            let mut value = vec![crate::audit::store::RUN_TAG];
            value.extend_from_slice(&u32::MAX.to_le_bytes());
            value.extend_from_slice(&[0; 16]);
            db.insert(key(6), value).unwrap();
        });
        assert_eq!(bad.seq, 6, "{bad}");
        assert!(bad.reason.contains("size"), "{bad}");
    }

    #[test]
    fn a_run_whose_records_were_all_removed_is_named() {
        let bad = edited_runs(|db| edit_run(db, 6, Vec::clear));
        assert_eq!(bad.seq, 6, "{bad}");
    }
}
