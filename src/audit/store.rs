//! Where records live: the [`Store`] trait the writer appends through, its
//! sled implementation, an in-memory one for tests, and the read side used by
//! the offline commands.
//!
//! Invariant: keys are big-endian `seq`s, in seq order. A value is either one
//! stored record (a JSON object) or a *run* of consecutive records stored
//! under the seq of the first ([`encode_run`]: LZ4-compressed, since the
//! records of a session repeat most of their bytes). After [`Store::sync`] returns `Ok`,
//! every earlier insert is on disk (fsynced).
//!
//! Why runs: sled 0.34 splits a leaf every 17 entries whatever their size,
//! each insert costs 10-25 µs of tree work, and every byte is copied several
//! times (into the node, into the log, again at each split; measured under
//! pgbench: more CPU than the relay itself). The writer packs the records of
//! one commit into runs of about [`RUN_BYTES`], so the per-insert cost is
//! paid per run, and compresses them, which cuts the bytes sled handles
//! about fivefold; a compressed run stays small enough that a leaf of 17
//! stays under the 128 KiB at which sled moves a page to a blob file.
//!
//! sled 0.34 facts this module is built around (measured, see the tests):
//! - `Db::flush` on Linux ends in `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)`,
//!   which neither flushes the disk's write cache nor the file's metadata,
//!   and sled never fsyncs the blob files it writes for pages over 128 KiB
//!   (a leaf holds up to 17 records, so any record over about 7 KiB can end
//!   up in one). [`SledStore::sync`] therefore follows the flush with an
//!   `fdatasync` of the `db` file and an fsync of new blob files.
//! - The exclusive lock is `flock` on `<store>/db`, per open file
//!   description: a second open fails even inside the same process, with an
//!   `Io(Other)` error whose only marker is its text. We probe the lock
//!   ourselves to report [`AuditError::Locked`] reliably.
//! - There is no read-only mode: the offline commands take the same lock
//!   and sled may rewrite its own snapshot files on open.
//! - After one I/O error (a full disk), every later write of that `Db`
//!   fails, even once there is space again: [`Store::reopen`] starts over.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use super::record::Record;
use super::AuditError;

/// Page cache of the gateway's store: appends only touch the tail.
const WRITER_CACHE_BYTES: u64 = 8 * 1024 * 1024;
/// Page cache of the offline commands: bounds their memory on any store size.
pub(super) const READER_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// The tree beside the records that holds the instance id, the shipper's
/// position and the archive boundary (export and verify never read it as
/// records).
pub const META_TREE: &str = "pgwarden-meta";
/// The instance id's key in [`META_TREE`].
pub const INSTANCE_KEY: &str = "instance";

/// First byte of a value holding a run of records (a record starts with `{`).
pub const RUN_TAG: u8 = 0x01;
/// The writer closes a run once its records reach this many bytes
/// (uncompressed).
pub const RUN_BYTES: usize = 8 * 1024;

/// The writer's view of a store. Implementations need not be thread-safe:
/// the writer thread owns its store.
pub trait Store: Send + 'static {
    /// The last stored record as `(seq, stored bytes)`, to continue the
    /// chain after a restart.
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, AuditError>;
    /// Stores `value` under `seq` (durable only after [`Store::sync`]).
    fn insert(&mut self, seq: u64, value: &[u8]) -> Result<(), AuditError>;
    /// Stores `values` as the records `first_seq, first_seq + 1, ...`, all
    /// or none (durable only after [`Store::sync`]). The default inserts
    /// them one by one.
    fn insert_run(&mut self, first_seq: u64, values: &[&[u8]]) -> Result<(), AuditError> {
        for (seq, value) in (first_seq..).zip(values) {
            self.insert(seq, value)?;
        }
        Ok(())
    }
    /// Makes every earlier insert durable (fsync).
    fn sync(&mut self) -> Result<(), AuditError>;
    /// Starts over from what is durable after a failure; the writer then
    /// re-reads [`Store::last`]. The default keeps the store as it is.
    fn reopen(&mut self) -> Result<(), AuditError> {
        Ok(())
    }
    /// A handle other threads read the store through (the shipper), if
    /// the store has one.
    fn shared(&self) -> Option<SharedDb> {
        None
    }
}

/// The writer's open database, for readers on other threads: `None` while
/// the writer reopens it (a reader must not keep the old one, whose lock
/// would make the reopen fail), so readers take it for one read at a time.
#[derive(Clone, Default)]
pub struct SharedDb(Arc<RwLock<Option<sled::Db>>>);

impl SharedDb {
    /// The database, unless it is being reopened.
    pub fn get(&self) -> Option<sled::Db> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, db: Option<sled::Db>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = db;
    }
}

/// The key of `seq`: 8 bytes big-endian, so key order is seq order.
pub fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(super) fn seq_of(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

/// The stored value of a run: [`RUN_TAG`], then an LZ4 block (its
/// uncompressed size first, 4 bytes little-endian) of each record's length
/// (4 bytes big-endian) and bytes.
pub fn encode_run(values: &[&[u8]]) -> Vec<u8> {
    let size = values.iter().map(|v| v.len() + 4).sum::<usize>();
    let mut body = Vec::with_capacity(size);
    for value in values {
        // A record never reaches 4 GiB: statements are bounded by max_message_size.
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
    }
    // What `lz4_flex::compress_prepend_size` writes, after the tag, in one
    // buffer (it would shrink its own buffer and leave us a copy to make).
    let header = 1 + 4;
    let mut out = vec![0; header + lz4_flex::block::get_maximum_output_size(body.len())];
    out[0] = RUN_TAG;
    out[1..header].copy_from_slice(&(body.len() as u32).to_le_bytes());
    let compressed = lz4_flex::block::compress_into(&body, &mut out[header..])
        .expect("the output holds the largest possible block");
    out.truncate(header + compressed);
    out
}

/// Largest uncompressed run a reader accepts (a damaged size must not make
/// it allocate without bound).
const MAX_RUN_BYTES: usize = 1 << 30;

/// The records in the value stored under `first_seq`: the value itself, or
/// the records of a run (sub-slices sharing one buffer).
pub fn unpack(first_seq: u64, value: sled::IVec) -> Result<Vec<RawEntry>, AuditError> {
    if value.first() != Some(&RUN_TAG) {
        return Ok(vec![(first_seq, value)]);
    }
    let corrupt = |message: String| AuditError::Corrupt {
        seq: first_seq,
        message,
    };
    let compressed = &value[1..];
    let declared = compressed
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    if declared.is_none_or(|n| n > MAX_RUN_BYTES) {
        return Err(corrupt("the run stored here has no valid size".into()));
    }
    let body = lz4_flex::decompress_size_prepended(compressed)
        .map_err(|e| corrupt(format!("the run stored here is cut or damaged ({e})")))?;
    let body = sled::IVec::from(body);
    let mut entries = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let Some(len) = body.get(at..at + 4) else {
            return Err(corrupt(format!(
                "the run stored here is cut inside a length at byte {at}"
            )));
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let start = at + 4;
        if body.len() - start < len {
            return Err(corrupt(format!(
                "the run stored here is cut inside a record at byte {start}"
            )));
        }
        entries.push((first_seq + entries.len() as u64, body.subslice(start, len)));
        at = start + len;
    }
    if entries.is_empty() {
        return Err(corrupt("the run stored here is empty".into()));
    }
    Ok(entries)
}

/// How long an open retries a held lock before reporting `Locked`: a lock can
/// be held for a moment by a process that is exiting, or by a child that was
/// forked (inheriting the descriptor) and has not yet exec'd.
const LOCK_RETRY: Duration = Duration::from_millis(500);

/// Opens the sled database at `path`, turning a held lock into `Locked`.
pub(super) fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, AuditError> {
    let deadline = Instant::now() + LOCK_RETRY;
    loop {
        let result = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open();
        let error = match result {
            Ok(db) => return Ok(db),
            Err(e) => e,
        };
        if !is_locked(path) {
            return Err(AuditError::Open {
                path: path.to_path_buf(),
                message: error.to_string(),
            });
        }
        if Instant::now() >= deadline {
            return Err(AuditError::Locked {
                path: path.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether some open file description holds sled's `flock` on `<path>/db`.
pub fn is_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path.join("db")) else {
        return false;
    };
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is a valid descriptor owned by `file` for this whole block.
    let rc = unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) };
    if rc == 0 {
        // SAFETY: as above; we release the lock we just took.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        return false;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

fn write_err(e: impl std::fmt::Display) -> AuditError {
    AuditError::Write(e.to_string())
}

/// The gateway's sled store.
pub struct SledStore {
    path: PathBuf,
    /// `None` only between dropping a failed database and reopening it.
    open: Option<OpenDb>,
    /// The open database, for readers on other threads.
    shared: SharedDb,
    /// Blob files already fsynced (pruned to what exists at each sync).
    synced_blobs: HashSet<OsString>,
    /// The blob directory's modification time and when it was last scanned:
    /// see [`SledStore::sync_new_blobs`].
    blobs_scanned: Option<(SystemTime, SystemTime)>,
}

struct OpenDb {
    db: sled::Db,
    /// Our own descriptor of sled's log file, for a real `fdatasync`.
    data_file: File,
}

impl OpenDb {
    fn open(path: &Path) -> Result<OpenDb, AuditError> {
        let db = open_db(path, WRITER_CACHE_BYTES)?;
        let open_err = |e: std::io::Error| AuditError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let data_file = File::open(path.join("db")).map_err(open_err)?;
        // Make the store's directory entries durable once.
        File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(open_err)?;
        Ok(OpenDb { db, data_file })
    }
}

impl SledStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<SledStore, AuditError> {
        let open = OpenDb::open(path)?;
        let shared = SharedDb::default();
        shared.set(Some(open.db.clone()));
        Ok(SledStore {
            path: path.to_path_buf(),
            open: Some(open),
            shared,
            synced_blobs: HashSet::new(),
            blobs_scanned: None,
        })
    }

    fn db(&self) -> Result<&OpenDb, AuditError> {
        self.open
            .as_ref()
            .ok_or_else(|| AuditError::Write("the audit store is not open".into()))
    }

    /// fsyncs blob files sled wrote since the last sync, then their directory.
    /// Skips the scan while the directory's mtime is the one seen at the last
    /// scan and was already over a second old then: timestamps are coarse, so
    /// a file added in the same tick as the last change could otherwise hide.
    fn sync_new_blobs(&mut self) -> std::io::Result<()> {
        let dir = self.path.join("blobs");
        let modified = std::fs::metadata(&dir)?.modified()?;
        if let Some((seen, scanned_at)) = self.blobs_scanned {
            let settled = scanned_at
                .duration_since(seen)
                .is_ok_and(|age| age > Duration::from_secs(1));
            if seen == modified && settled {
                return Ok(());
            }
        }
        let scanned_at = SystemTime::now();
        let mut present = HashSet::new();
        let mut new_files = false;
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(dir.join(&name)) {
                    Ok(f) => f.sync_all()?,
                    // sled garbage-collected it meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new_files = true;
            }
            present.insert(name);
        }
        self.synced_blobs = present;
        if new_files {
            File::open(&dir)?.sync_all()?;
        }
        self.blobs_scanned = Some((modified, scanned_at));
        Ok(())
    }
}

impl Store for SledStore {
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, AuditError> {
        match self.db()?.db.last() {
            Ok(None) => Ok(None),
            Ok(Some((k, v))) => {
                let seq = seq_of(&k).ok_or_else(|| AuditError::Corrupt {
                    seq: 0,
                    message: format!("last key is {} bytes, not 8", k.len()),
                })?;
                let last = unpack(seq, v)?.pop();
                Ok(last.map(|(seq, value)| (seq, value.to_vec())))
            }
            Err(e) => Err(AuditError::Read(e.to_string())),
        }
    }

    fn insert(&mut self, seq: u64, value: &[u8]) -> Result<(), AuditError> {
        self.db()?
            .db
            .insert(key(seq), value)
            .map(|_| ())
            .map_err(write_err)
    }

    fn insert_run(&mut self, first_seq: u64, values: &[&[u8]]) -> Result<(), AuditError> {
        match values {
            [] => Ok(()),
            [one] => self.insert(first_seq, one),
            _ => self.insert(first_seq, &encode_run(values)),
        }
    }

    fn sync(&mut self) -> Result<(), AuditError> {
        let open = self.db()?;
        open.db.flush().map_err(write_err)?;
        open.data_file.sync_data().map_err(write_err)?;
        self.sync_new_blobs().map_err(write_err)
    }

    /// sled 0.34 keeps failing after one I/O error (its error is sticky), so
    /// recovering from e.g. a full disk takes a fresh open: what was fsynced
    /// is there, what was not is gone.
    fn reopen(&mut self) -> Result<(), AuditError> {
        // The old database must be gone (its lock released) before
        // reopening: readers give theirs back after their current read.
        self.shared.set(None);
        self.open = None;
        self.synced_blobs.clear();
        self.blobs_scanned = None;
        let open = OpenDb::open(&self.path)?;
        self.shared.set(Some(open.db.clone()));
        self.open = Some(open);
        Ok(())
    }

    fn shared(&self) -> Option<SharedDb> {
        Some(self.shared.clone())
    }
}

impl Drop for SledStore {
    /// Readers lose their handle with the store: sled's lock goes with the
    /// last clone of the database.
    fn drop(&mut self) {
        self.shared.set(None);
    }
}

/// Switches and counters shared between a [`MemoryStore`] and its test.
#[derive(Debug, Default)]
pub struct MemoryControl {
    /// When set, `insert` fails.
    pub fail_inserts: AtomicBool,
    /// When set, `sync` fails.
    pub fail_syncs: AtomicBool,
    /// Microseconds each `sync` sleeps, to model a disk.
    pub sync_delay_us: AtomicU64,
    /// Number of successful `sync` calls.
    pub syncs: AtomicU64,
    /// Highest seq that is "on disk" (synced).
    pub durable: AtomicU64,
    /// Number of `reopen` calls.
    pub reopens: AtomicU64,
}

/// An in-memory [`Store`] whose failures and fsync cost a test controls, so
/// the writer's error paths and group commit can be exercised without a disk.
/// Like a real store, `reopen` forgets what was never synced.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// Stored values by seq.
    pub records: Arc<Mutex<BTreeMap<u64, Vec<u8>>>>,
    /// Failure switches and counters.
    pub control: Arc<MemoryControl>,
}

impl Store for MemoryStore {
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, AuditError> {
        let records = self
            .records
            .lock()
            .map_err(|e| AuditError::Read(e.to_string()))?;
        Ok(records.iter().next_back().map(|(k, v)| (*k, v.clone())))
    }

    fn insert(&mut self, seq: u64, value: &[u8]) -> Result<(), AuditError> {
        if self.control.fail_inserts.load(Ordering::SeqCst) {
            return Err(AuditError::Write("injected insert failure".into()));
        }
        let mut records = self.records.lock().map_err(write_err)?;
        records.insert(seq, value.to_vec());
        Ok(())
    }

    fn sync(&mut self) -> Result<(), AuditError> {
        let delay = self.control.sync_delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay));
        }
        if self.control.fail_syncs.load(Ordering::SeqCst) {
            return Err(AuditError::Write("injected fsync failure".into()));
        }
        let records = self.records.lock().map_err(write_err)?;
        let last = records.keys().next_back().copied().unwrap_or(0);
        self.control.durable.store(last, Ordering::SeqCst);
        self.control.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn reopen(&mut self) -> Result<(), AuditError> {
        let durable = self.control.durable.load(Ordering::SeqCst);
        let mut records = self.records.lock().map_err(write_err)?;
        records.split_off(&(durable + 1));
        self.control.reopens.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One entry as read: its key's seq and the raw stored value.
pub type RawEntry = (u64, sled::IVec);

/// Decodes the value stored under `seq`.
pub fn decode(seq: u64, value: &[u8]) -> Result<Record, AuditError> {
    Record::from_stored_bytes(value).map_err(|e| AuditError::Corrupt {
        seq,
        message: format!("cannot decode record: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_the_tag_and_a_size_prepended_lz4_block_of_its_records() {
        let records: Vec<Vec<u8>> = (0..40)
            .map(|i| format!("{{\"seq\":{i},\"statement\":\"SELECT {i}\"}}").into_bytes())
            .collect();
        let values: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        let run = encode_run(&values);
        let mut body = Vec::new();
        for value in &values {
            body.extend_from_slice(&(value.len() as u32).to_be_bytes());
            body.extend_from_slice(value);
        }
        assert_eq!(run[0], RUN_TAG);
        assert_eq!(run[1..], lz4_flex::compress_prepend_size(&body)[..]);
        let unpacked = unpack(100, sled::IVec::from(run)).unwrap();
        let seqs: Vec<u64> = unpacked.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (100..140).collect::<Vec<_>>());
        for ((_, value), record) in unpacked.iter().zip(&records) {
            assert_eq!(&value[..], &record[..]);
        }
    }
}
