//! Reading a store beside its writer (the shipper, anchoring) or offline
//! (export, verify, stats): records by seq, runs unpacked, and the meta
//! tree that holds the instance id and the shipper's position.

use std::path::Path;

use super::archive::{boundary, Archive};
use super::chain::GENESIS_HASH;
use super::record::Record;
use super::store::{decode, key, open_db, seq_of, unpack, RawEntry, READER_CACHE_BYTES};
use super::AuditError;

pub use super::store::{INSTANCE_KEY, META_TREE};

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

/// Read access for the offline commands (export, verify, stats): a store,
/// archives of its older records ([`super::archive`]), or both, read as one
/// chain: the archives in the order given, then the store's records after
/// the last of them.
pub struct StoreReader {
    db: Option<sled::Db>,
    archives: Vec<Archive>,
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
            db: Some(open_db(path, READER_CACHE_BYTES)?),
            archives: Vec::new(),
        })
    }

    /// Where the store's own records start (after its archive boundary).
    fn store_start(&self) -> Result<u64, AuditError> {
        match &self.db {
            Some(db) => Ok(boundary(db)?.map_or(1, |b| b.seq + 1)),
            None => Ok(u64::MAX),
        }
    }

    /// This store (if any) preceded by `archives`, which must make one chain
    /// with it: in seq order, each starting where the one before ended
    /// (after its head), the last ending at the store's archive boundary
    /// (its seq and head), all of the store's instance. Two copies of one
    /// archive count once (a crash between writing an archive and emptying
    /// the store leaves a second).
    pub fn with_opened(mut self, mut archives: Vec<Archive>) -> Result<StoreReader, AuditError> {
        let mismatch = |why: String| AuditError::Read(format!("the archives do not fit: {why}"));
        archives.sort_by_key(|a| (a.manifest.first_seq, a.manifest.last_seq));
        archives.dedup_by(|b, a| {
            let (a, b) = (&a.manifest, &b.manifest);
            (a.first_seq, a.last_seq, &a.prev_hash, &a.head)
                == (b.first_seq, b.last_seq, &b.prev_hash, &b.head)
        });
        for pair in archives.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.manifest.first_seq != a.manifest.last_seq + 1
                || b.manifest.prev_hash != a.manifest.head
            {
                return Err(mismatch(format!(
                    "{} (records {}..={}) does not follow {} (records {}..={}, head {})",
                    b.path.display(),
                    b.manifest.first_seq,
                    b.manifest.last_seq,
                    a.path.display(),
                    a.manifest.first_seq,
                    a.manifest.last_seq,
                    a.manifest.head
                )));
            }
        }
        if let (Some(db), Some(last)) = (&self.db, archives.last()) {
            let instance = StoreReader::instance_of(db);
            if let Some(other) = archives.iter().find(|a| a.manifest.instance != instance) {
                let name = |i: &Option<String>| {
                    i.as_deref()
                        .map_or("(none)".to_string(), |i| format!("{i:?}"))
                };
                return Err(mismatch(format!(
                    "{} is an archive of instance {}, the store is of {}",
                    other.path.display(),
                    name(&other.manifest.instance),
                    name(&instance)
                )));
            }
            match boundary(db)? {
                Some(b) if b.seq == last.manifest.last_seq && b.head == last.manifest.head => {}
                Some(b) => {
                    return Err(mismatch(format!(
                        "the store's records start after seq {} (head {}), the archives end at seq {} (head {})",
                        b.seq, b.head, last.manifest.last_seq, last.manifest.head
                    )))
                }
                None => return Err(mismatch("the store never archived anything".into())),
            }
        }
        self.archives = archives;
        Ok(self)
    }
    /// Nothing yet: add archives with [`StoreReader::with_opened`].
    pub fn none() -> StoreReader {
        StoreReader {
            db: None,
            archives: Vec::new(),
        }
    }

    /// The first seq this reader holds and the hash before it: the first
    /// archive's, or the store's archive boundary, or seq 1 after the
    /// genesis hash.
    pub fn start(&self) -> Result<(u64, String), AuditError> {
        if let Some(first) = self.archives.first() {
            return Ok((first.manifest.first_seq, first.manifest.prev_hash.clone()));
        }
        match self.db.as_ref().map(boundary).transpose()?.flatten() {
            Some(b) => Ok((b.seq + 1, b.head)),
            None => Ok((1, GENESIS_HASH.to_string())),
        }
    }

    /// Records with seq >= `from`, in seq order, runs unpacked. A key that
    /// is not 8 bytes, or a damaged run, is reported as `Corrupt`.
    pub fn scan_from(
        &self,
        from: u64,
    ) -> Box<dyn Iterator<Item = Result<RawEntry, AuditError>> + '_> {
        // The store's own records only: never fewer because of what an
        // archive claims (with archives, they end at this boundary).
        let start = match self.store_start() {
            Ok(start) => start,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        let archives = self
            .archives
            .iter()
            .filter(move |a| a.manifest.last_seq >= from)
            .flat_map(move |a| a.scan_from(from));
        let store = self
            .db
            .iter()
            .flat_map(move |db| scan_tree(db, from.max(start)));
        Box::new(archives.chain(store))
    }

    /// The record stored under `seq`, if any.
    pub fn get(&self, seq: u64) -> Result<Option<Record>, AuditError> {
        let archive = self
            .archives
            .iter()
            .find(|a| (a.manifest.first_seq..=a.manifest.last_seq).contains(&seq));
        if let Some(archive) = archive {
            return match archive.scan_from(seq).next() {
                Some(Ok((s, raw))) if s == seq => decode(seq, &raw).map(Some),
                Some(Err(e)) => Err(e),
                _ => Ok(None),
            };
        }
        match &self.db {
            Some(db) => get_in_tree(db, seq),
            None => Ok(None),
        }
    }

    /// The seq of the last record, if any.
    pub fn last_seq(&self) -> Result<Option<u64>, AuditError> {
        let archived = self.archives.last().map(|a| a.manifest.last_seq);
        let Some(db) = &self.db else {
            return Ok(archived);
        };
        match db.last() {
            Ok(Some((k, v))) => {
                let first = seq_of(&k).ok_or_else(|| AuditError::Corrupt {
                    seq: 0,
                    message: format!("last key is {} bytes, not 8", k.len()),
                })?;
                let last = unpack(first, v)?.last().map(|(seq, _)| *seq);
                Ok(last.max(archived))
            }
            Ok(None) => Ok(archived),
            Err(e) => Err(AuditError::Read(e.to_string())),
        }
    }

    /// The instance id kept in the store `db`, if any (unreadable: none).
    pub fn instance_of(db: &sled::Db) -> Option<String> {
        stored_instance(db).ok().flatten()
    }

    /// The instance id kept in the store (made when shipping or anchoring
    /// first ran on it), or named by the first archive, if any.
    pub fn instance(&self) -> Result<Option<String>, AuditError> {
        let Some(db) = &self.db else {
            return Ok(self
                .archives
                .first()
                .and_then(|a| a.manifest.instance.clone()));
        };
        stored_instance(db)
    }
}

/// The instance id kept in the store `db`'s meta tree, if any.
pub fn stored_instance(db: &sled::Db) -> Result<Option<String>, AuditError> {
    let read = |e: sled::Error| AuditError::Read(e.to_string());
    let id = db
        .open_tree(META_TREE)
        .map_err(read)?
        .get(INSTANCE_KEY)
        .map_err(read)?;
    Ok(id.map(|id| String::from_utf8_lossy(&id).into_owned()))
}
