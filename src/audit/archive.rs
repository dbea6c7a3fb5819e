//! Retention: the oldest records moved out of the store into archive files,
//! and archives read back as part of the chain.
//!
//! An archive is one self-contained file:
//!
//! ```text
//! "PGWARDEN-AUDIT-ARCHIVE 1\n"
//! blocks: a u32 (big-endian) length, then a run (`store::encode_run`: the
//!         stored records, LZ4-compressed), about BLOCK_BYTES each
//! footer: the manifest as JSON (instance, first_seq, last_seq, records,
//!         prev_hash of the first record, head = hash of the last, created,
//!         blocks = [[first seq, offset], ...])
//! the footer's offset, a u64 (big-endian)
//! ```
//!
//! Invariants:
//! - records leave the store only after the archive holding them is on disk
//!   (written to a temporary name, fsynced, renamed, the directory fsynced)
//!   and the store's meta tree names the new boundary (its last seq and
//!   head): a crash in between leaves them in both, never in neither;
//! - what is archived verifies: contiguous seqs after the boundary, each
//!   `prev_hash` the previous `hash`, each hash recomputed. A store that
//!   does not verify is not archived;
//! - the run holding the store's last record always stays (the writer
//!   continues the chain from it), and so does anything not yet durable or
//!   not yet shipped (the caller's `keep_after`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::chain::GENESIS_HASH;
use super::record::{parse_ts, Record};
use super::store::{encode_run, seq_of, unpack, RawEntry, META_TREE};
use super::AuditError;

const MAGIC: &[u8] = b"PGWARDEN-AUDIT-ARCHIVE 1\n";
/// Records per block, about (uncompressed); small in tests, so that
/// archives of a few records have several blocks.
const BLOCK_BYTES: usize = if cfg!(test) { 1024 } else { 256 * 1024 };
/// The meta tree's key for the boundary: the last archived seq and its hash.
pub const ARCHIVED_KEY: &str = "archived";
/// Largest footer a reader accepts.
const MAX_FOOTER: u64 = 256 << 20;

/// What an archive holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub instance: Option<String>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    /// The `prev_hash` of the first record (the head before it).
    pub prev_hash: String,
    /// The hash of the last record.
    pub head: String,
    pub created: String,
    /// Each block's first seq and offset in the file.
    pub blocks: Vec<(u64, u64)>,
}

/// Where a store's records start: everything up to `seq` (whose hash is
/// `head`) was archived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boundary {
    pub seq: u64,
    pub head: String,
}

/// The store's boundary, if anything was archived.
pub fn boundary(db: &sled::Db) -> Result<Option<Boundary>, AuditError> {
    let meta = db.open_tree(META_TREE).map_err(read_err)?;
    match meta.get(ARCHIVED_KEY).map_err(read_err)? {
        None => Ok(None),
        Some(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| AuditError::Read(format!("the store's archive boundary is damaged: {e}"))),
    }
}

fn read_err(e: sled::Error) -> AuditError {
    AuditError::Read(e.to_string())
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AuditError {
    let context = context.into();
    move |source| AuditError::Io { context, source }
}

/// Moves the store's oldest records, those written before `before` and at
/// most up to seq `keep_after`, into a new archive at `path`; `None` when
/// there is nothing to move. See the module's invariants.
pub fn archive_store(
    db: &sled::Db,
    before: OffsetDateTime,
    keep_after: u64,
    path: &Path,
    instance: Option<&str>,
) -> Result<Option<Manifest>, AuditError> {
    let start = boundary(db)?.unwrap_or(Boundary {
        seq: 0,
        head: GENESIS_HASH.to_string(),
    });
    remove_leftovers(db, &start)?;
    // The run holding the last record stays.
    let last_run = match db.last().map_err(read_err)? {
        Some((k, _)) => seq_of(&k),
        None => return Ok(None),
    };
    let mut writer: Option<ArchiveWriter> = None;
    let mut keys = Vec::new();
    let mut head = start.head.clone();
    let mut expected = start.seq + 1;
    for item in db.range(super::store::key(start.seq + 1)..) {
        let (k, v) = item.map_err(read_err)?;
        let first = seq_of(&k).ok_or_else(|| AuditError::Corrupt {
            seq: expected,
            message: "a key that is not a seq".into(),
        })?;
        if Some(first) == last_run {
            break;
        }
        let entries = unpack(first, v)?;
        let old_enough = entries.iter().all(|(seq, raw)| {
            *seq <= keep_after
                && Record::from_stored_bytes(raw)
                    .ok()
                    .and_then(|r| parse_ts(&r.ts).ok())
                    .is_some_and(|ts| ts < before)
        });
        if !old_enough {
            break;
        }
        for (seq, raw) in &entries {
            let record = Record::from_stored_bytes(raw).map_err(|e| AuditError::Corrupt {
                seq: *seq,
                message: format!("cannot decode record: {e}"),
            })?;
            if *seq != expected {
                return Err(not_archived(
                    expected,
                    format!("record {expected} is missing"),
                ));
            }
            if let Some(why) = super::chain::check_stored(&record, *seq, &head, raw) {
                return Err(not_archived(*seq, why));
            }
            let out = match writer.as_mut() {
                Some(out) => out,
                None => writer.insert(ArchiveWriter::create(path, *seq, &head, instance)?),
            };
            out.push(*seq, raw)?;
            head = record.hash;
            expected += 1;
        }
        keys.push(k);
    }
    let Some(writer) = writer else {
        return Ok(None);
    };
    let manifest = writer.finish(&head)?;
    let boundary = Boundary {
        seq: manifest.last_seq,
        head: manifest.head.clone(),
    };
    // From here on the archive is on disk: a failure says so, since
    // removing the archive would lose records.
    let after = |step: &str, e: sled::Error| {
        AuditError::Write(format!(
        "records {}..={} were archived to {}, but {step} failed ({e}); keep the archive, free space and run again",
        manifest.first_seq,
        manifest.last_seq,
        path.display()
    ))
    };
    let meta = db
        .open_tree(META_TREE)
        .map_err(|e| after("recording the boundary", e))?;
    let encoded = serde_json::to_vec(&boundary).expect("a boundary serializes");
    meta.insert(ARCHIVED_KEY, encoded)
        .and_then(|_| meta.flush())
        .map_err(|e| after("recording the boundary", e))?;
    for k in keys {
        db.remove(k)
            .map_err(|e| after("removing them from the store", e))?;
    }
    db.flush()
        .map_err(|e| after("removing them from the store", e))?;
    Ok(Some(manifest))
}

/// Removes records a crashed or failed archiving left in the store at or
/// below its boundary (they are in an archive already).
fn remove_leftovers(db: &sled::Db, boundary: &Boundary) -> Result<(), AuditError> {
    let mut removed = false;
    for item in db.range(..=super::store::key(boundary.seq)) {
        let (k, v) = item.map_err(read_err)?;
        let Some(first) = seq_of(&k) else {
            continue;
        };
        // A run that reaches past the boundary stays (it cannot be split).
        let last = unpack(first, v)?.last().map_or(first, |(seq, _)| *seq);
        if last <= boundary.seq {
            db.remove(k).map_err(read_err)?;
            removed = true;
        }
    }
    if removed {
        db.flush().map_err(read_err)?;
    }
    Ok(())
}

fn not_archived(seq: u64, why: String) -> AuditError {
    AuditError::Corrupt {
        seq,
        message: format!("{why}; nothing was archived (run `audit verify`)"),
    }
}

/// An archive being written.
struct ArchiveWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    offset: u64,
    block: Vec<sled::IVec>,
    block_first: u64,
    block_bytes: usize,
    manifest: Manifest,
    /// Renamed into place: nothing to clean up.
    done: bool,
}

impl Drop for ArchiveWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl ArchiveWriter {
    fn create(
        path: &Path,
        first_seq: u64,
        prev_hash: &str,
        instance: Option<&str>,
    ) -> Result<ArchiveWriter, AuditError> {
        if path.exists() {
            return Err(AuditError::Io {
                context: format!("{} exists", path.display()),
                source: std::io::ErrorKind::AlreadyExists.into(),
            });
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".part");
        let tmp = PathBuf::from(tmp);
        // A name of our own: never through a link someone left there.
        let _ = std::fs::remove_file(&tmp);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(format!("cannot create {}", tmp.display())))?;
        let mut out = BufWriter::new(file);
        out.write_all(MAGIC)
            .map_err(io("cannot write the archive"))?;
        Ok(ArchiveWriter {
            out,
            tmp,
            path: path.to_path_buf(),
            offset: MAGIC.len() as u64,
            block: Vec::new(),
            block_first: first_seq,
            block_bytes: 0,
            done: false,
            manifest: Manifest {
                instance: instance.map(str::to_string),
                first_seq,
                last_seq: first_seq,
                records: 0,
                prev_hash: prev_hash.to_string(),
                head: String::new(),
                created: super::record::format_ts(OffsetDateTime::now_utc()),
                blocks: Vec::new(),
            },
        })
    }

    fn push(&mut self, seq: u64, raw: &sled::IVec) -> Result<(), AuditError> {
        if self.block.is_empty() {
            self.block_first = seq;
        }
        self.block_bytes += raw.len();
        self.block.push(raw.clone());
        self.manifest.last_seq = seq;
        self.manifest.records += 1;
        if self.block_bytes >= BLOCK_BYTES {
            self.write_block()?;
        }
        Ok(())
    }

    fn write_block(&mut self) -> Result<(), AuditError> {
        if self.block.is_empty() {
            return Ok(());
        }
        let values: Vec<&[u8]> = self.block.iter().map(|v| v.as_ref()).collect();
        let run = encode_run(&values);
        self.out
            .write_all(&(run.len() as u32).to_be_bytes())
            .and_then(|()| self.out.write_all(&run))
            .map_err(io("cannot write the archive"))?;
        self.manifest.blocks.push((self.block_first, self.offset));
        self.offset += 4 + run.len() as u64;
        self.block.clear();
        self.block_bytes = 0;
        Ok(())
    }

    fn finish(mut self, head: &str) -> Result<Manifest, AuditError> {
        self.write_block()?;
        self.manifest.head = head.to_string();
        let footer = serde_json::to_vec(&self.manifest).expect("a manifest serializes");
        self.out
            .write_all(&footer)
            .and_then(|()| self.out.write_all(&self.offset.to_be_bytes()))
            .and_then(|()| self.out.flush())
            .map_err(io("cannot write the archive"))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(io("cannot fsync the archive"))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io(format!(
            "cannot rename the archive to {}",
            self.path.display()
        )))?;
        self.done = true;
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))
            .and_then(|d| d.sync_all())
            .map_err(io("cannot fsync the archive's directory"))?;
        Ok(self.manifest.clone())
    }
}

/// An archive opened for reading.
#[derive(Debug, Clone)]
pub struct Archive {
    pub path: PathBuf,
    pub manifest: Manifest,
}

impl Archive {
    /// Opens `path` and reads its manifest.
    pub fn open(path: &Path) -> Result<Archive, AuditError> {
        let damaged = |why: &str| {
            AuditError::Read(format!(
                "{}: not a pgwarden archive ({why})",
                path.display()
            ))
        };
        let mut file = File::open(path).map_err(io(format!("cannot open {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io("cannot read the archive"))?
            .len();
        let mut magic = vec![0; MAGIC.len()];
        file.read_exact(&mut magic)
            .map_err(|_| damaged("too short"))?;
        if magic != MAGIC || len < MAGIC.len() as u64 + 8 {
            return Err(damaged("no archive header"));
        }
        let mut at = [0u8; 8];
        file.seek(SeekFrom::End(-8))
            .and_then(|_| file.read_exact(&mut at))
            .map_err(io("cannot read the archive"))?;
        let footer_at = u64::from_be_bytes(at);
        if footer_at < MAGIC.len() as u64 || footer_at > len - 8 || len - 8 - footer_at > MAX_FOOTER
        {
            return Err(damaged("no footer"));
        }
        let mut footer = vec![0; (len - 8 - footer_at) as usize];
        file.seek(SeekFrom::Start(footer_at))
            .and_then(|_| file.read_exact(&mut footer))
            .map_err(io("cannot read the archive"))?;
        let manifest: Manifest =
            serde_json::from_slice(&footer).map_err(|_| damaged("a damaged manifest"))?;
        Ok(Archive {
            path: path.to_path_buf(),
            manifest,
        })
    }

    /// Records with seq >= `from`, in seq order; an error at the end when
    /// the blocks do not hold what the manifest says (its first seq, its
    /// last seq, the hash of the last record): a manifest is not covered by
    /// any hash, so the records themselves decide.
    pub fn scan_from(&self, from: u64) -> impl Iterator<Item = Result<RawEntry, AuditError>> + '_ {
        let mut last: Option<RawEntry> = None;
        // Every seq from the first asked for, in order, once: an index
        // that skips or repeats a block, or a block holding other records,
        // shows as a seq out of place.
        let mut expected = from.max(self.manifest.first_seq);
        let mut done = false;
        let mut records = self.records_from(from);
        std::iter::from_fn(move || {
            if done {
                return None;
            }
            match records.next() {
                Some(Ok(entry)) => {
                    let own = stored_seq(&entry.1);
                    if entry.0 != expected || own != Some(entry.0) {
                        done = true;
                        return Some(Err(self.lies(format!(
                            "hold seq {} (its record says {own:?}) where seq {expected} belongs",
                            entry.0
                        ))));
                    }
                    expected += 1;
                    last = Some(entry.clone());
                    Some(Ok(entry))
                }
                Some(Err(e)) => {
                    done = true;
                    Some(Err(e))
                }
                None => {
                    done = true;
                    let (seq, raw) = last.take()?;
                    let hash = Record::from_stored_bytes(&raw)
                        .map(|r| r.hash)
                        .unwrap_or_default();
                    if seq != self.manifest.last_seq || hash != self.manifest.head {
                        return Some(Err(self.lies(format!("ends at seq {seq} (hash {hash})"))));
                    }
                    None
                }
            }
        })
    }

    fn lies(&self, found: String) -> AuditError {
        AuditError::Corrupt {
            seq: self.manifest.first_seq,
            message: format!(
                "archive {} says it holds records {}..={} (head {}), but its records {found}",
                self.path.display(),
                self.manifest.first_seq,
                self.manifest.last_seq,
                self.manifest.head
            ),
        }
    }

    fn records_from(&self, from: u64) -> impl Iterator<Item = Result<RawEntry, AuditError>> + '_ {
        let blocks = &self.manifest.blocks;
        // The last block starting at or before `from`.
        let skip = blocks
            .partition_point(|(first, _)| *first <= from)
            .saturating_sub(1);
        let mut file = File::open(&self.path)
            .map(BufReader::new)
            .map_err(io(format!("cannot open {}", self.path.display())));
        blocks[skip..]
            .iter()
            .flat_map(move |(first, offset)| {
                let entries = match file.as_mut() {
                    Ok(file) => read_block(file, *first, *offset),
                    Err(e) => Err(AuditError::Read(e.to_string())),
                };
                let (entries, error) = match entries {
                    Ok(entries) => (entries, None),
                    Err(e) => (Vec::new(), Some(Err(e))),
                };
                entries.into_iter().map(Ok).chain(error)
            })
            .filter(move |entry| !matches!(entry, Ok((seq, _)) if *seq < from))
    }
}

/// The seq a stored record names (its canonical bytes start with it).
fn stored_seq(raw: &[u8]) -> Option<u64> {
    let rest = raw.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

fn read_block(
    file: &mut BufReader<File>,
    first: u64,
    offset: u64,
) -> Result<Vec<RawEntry>, AuditError> {
    let corrupt = |message: String| AuditError::Corrupt {
        seq: first,
        message,
    };
    let mut len = [0u8; 4];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut len))
        .map_err(|e| corrupt(format!("the archive's block is unreadable ({e})")))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 1 << 30 {
        return Err(corrupt("the archive's block has no valid size".into()));
    }
    let mut run = vec![0; len];
    file.read_exact(&mut run)
        .map_err(|e| corrupt(format!("the archive's block is cut ({e})")))?;
    unpack(first, sled::IVec::from(run))
}

#[cfg(test)]
#[path = "archive_tests.rs"]
mod tests;
