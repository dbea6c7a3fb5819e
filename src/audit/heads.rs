//! Holding a store to heads kept elsewhere (anchors in PostgreSQL,
//! checkpoints in a copy of the shipped stream): each names a seq and the
//! hash the record at that seq had. One comparison serves both; each
//! caller words what it found.

use super::reader::StoreReader;
use super::record::Record;

/// What comparing a store with its heads found: the first that does not
/// hold, or how many held.
pub enum Compared<'a, T> {
    /// Every head of the store's own records matched: how many, and how
    /// many name archived records that were not given.
    Match { checked: usize, archived: usize },
    /// `archived` heads name records archived before seq `first`, not given,
    /// and the caller did not ask to skip them (or nothing else is left):
    /// `others` says whether any head names the store's own records.
    Archived {
        archived: usize,
        first: u64,
        others: bool,
    },
    /// `head` names a seq past the store's end (`last`, its record `at_end`).
    CutOff {
        head: &'a T,
        last: u64,
        at_end: Option<Record>,
    },
    /// The record `head` names has another hash.
    Differs { head: &'a T, stored: Record },
}

/// Compares `reader` with `heads` (in seq order; `seq` and `hash` read a
/// head). Heads of archived records not given fail unless `skip_archived`
/// and some head names the store's own records.
pub fn compare<'a, T>(
    reader: &StoreReader,
    heads: &'a [T],
    seq: impl Fn(&T) -> u64,
    hash: impl Fn(&T) -> &str,
    skip_archived: bool,
) -> Result<Compared<'a, T>, String> {
    let (first, _) = reader.start().map_err(|e| e.to_string())?;
    let archived = heads.iter().filter(|h| seq(h) < first).count();
    let own = heads.iter().filter(|h| seq(h) >= first);
    let others = archived < heads.len();
    if archived > 0 && (!others || !skip_archived) {
        return Ok(Compared::Archived {
            archived,
            first,
            others,
        });
    }
    let last = reader.last_seq().map_err(|e| e.to_string())?.unwrap_or(0);
    let mut checked = 0;
    for head in own {
        match reader.get(seq(head)).map_err(|e| e.to_string())? {
            None => {
                let at_end = reader.get(last).map_err(|e| e.to_string())?;
                return Ok(Compared::CutOff { head, last, at_end });
            }
            Some(stored) if stored.hash != hash(head) => {
                return Ok(Compared::Differs { head, stored });
            }
            Some(_) => checked += 1,
        }
    }
    Ok(Compared::Match { checked, archived })
}

/// The words for heads of archived records not given.
pub fn archived_message(what: &str, archived: usize, first: u64, others: bool) -> String {
    format!(
        "{archived} checkpoints of instance {what} name records archived before seq {first}, which are not given: give their archives with --archive{}",
        if others {
            ", or --skip-archived to check the store's own records only"
        } else {
            ""
        }
    )
}
