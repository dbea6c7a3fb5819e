//! Reading a store beside its writer (the shipper, anchoring) or offline
//! (export, verify, stats): records by seq, runs unpacked, and the meta
//! tree that holds the instance id and the shipper's position.

use std::path::Path;

use super::record::Record;
use super::store::{decode, key, open_db, seq_of, unpack, RawEntry, READER_CACHE_BYTES};
use super::AuditError;

/// The tree beside the records that holds the instance id and the
/// shipper's position (export and verify never read it).
pub const META_TREE: &str = "pgwarden-meta";
/// The instance id's key in [`META_TREE`].
pub const INSTANCE_KEY: &str = "instance";

/// The record stored under `seq` in `tree`, if any.
pub fn get_in_tree(tree: &sled::Tree, seq: u64) -> Result<Option<Record>, AuditError> {
    let Some(item) = tree.range(..=key(seq)).next_back() else {
        return Ok(None);
    };
    let (k, v) = item.map_err(|e| AuditError::Read(e.to_string()))?;
    let Some(first) = seq_of(&k) else {
        return Ok(None);
    };
    let found = unpack(first, v)?.into_iter().find(|(s, _)| *s == seq);
    found.map(|(_, v)| decode(seq, &v)).transpose()
}

/// Records with seq >= `from` in `tree` (the store's records), in seq
/// order, runs unpacked. A key that is not 8 bytes, or a damaged run, is
/// reported as `Corrupt`.
pub fn scan_tree(
    tree: &sled::Tree,
    from: u64,
) -> impl Iterator<Item = Result<RawEntry, AuditError>> + '_ {
    // The run holding `from` may start before it.
    let start = match tree.range(..=key(from)).next_back() {
        Some(Ok((k, _))) => seq_of(&k).unwrap_or(from),
        _ => from,
    };
    tree.range(key(start)..)
        .flat_map(|item| {
            let unpacked = item
                .map_err(|e| AuditError::Read(e.to_string()))
                .and_then(|(k, v)| {
                    let seq = seq_of(&k).ok_or_else(|| AuditError::Corrupt {
                        seq: 0,
                        message: format!("a key of {} bytes is not a seq", k.len()),
                    })?;
                    unpack(seq, v)
                });
            let (entries, error) = match unpacked {
                Ok(entries) => (entries, None),
                Err(e) => (Vec::new(), Some(Err(e))),
            };
            entries.into_iter().map(Ok).chain(error)
        })
        .filter(move |entry| !matches!(entry, Ok((seq, _)) if *seq < from))
}

/// Read access for the offline commands (export, verify, stats).
pub struct StoreReader {
    db: sled::Db,
}

impl StoreReader {
    /// Opens an existing store; a directory without a store is `NotFound`
    /// rather than silently becoming an empty store.
    pub fn open(path: &Path) -> Result<StoreReader, AuditError> {
        if !path.join("db").is_file() {
            return Err(AuditError::NotFound {
                path: path.to_path_buf(),
            });
        }
        Ok(StoreReader {
            db: open_db(path, READER_CACHE_BYTES)?,
        })
    }

    /// Records with seq >= `from`, in seq order, runs unpacked. A key that
    /// is not 8 bytes, or a damaged run, is reported as `Corrupt`.
    pub fn scan_from(&self, from: u64) -> impl Iterator<Item = Result<RawEntry, AuditError>> + '_ {
        scan_tree(&self.db, from)
    }

    /// The record stored under `seq`, if any.
    pub fn get(&self, seq: u64) -> Result<Option<Record>, AuditError> {
        get_in_tree(&self.db, seq)
    }

    /// The seq of the last record, if any.
    pub fn last_seq(&self) -> Result<Option<u64>, AuditError> {
        match self.db.last() {
            Ok(Some((k, v))) => {
                let first = seq_of(&k).ok_or_else(|| AuditError::Corrupt {
                    seq: 0,
                    message: format!("last key is {} bytes, not 8", k.len()),
                })?;
                Ok(unpack(first, v)?.last().map(|(seq, _)| *seq))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(AuditError::Read(e.to_string())),
        }
    }

    /// The instance id kept in the store (made when shipping or anchoring
    /// first ran on it), if any.
    pub fn instance(&self) -> Result<Option<String>, AuditError> {
        let meta = self
            .db
            .open_tree(META_TREE)
            .map_err(|e| AuditError::Read(e.to_string()))?;
        let id = meta
            .get(INSTANCE_KEY)
            .map_err(|e| AuditError::Read(e.to_string()))?;
        Ok(id.map(|id| String::from_utf8_lossy(&id).into_owned()))
    }
}
