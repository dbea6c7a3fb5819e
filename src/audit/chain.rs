//! The hash chain: how a record's `hash` is computed and how the writer
//! extends the chain.
//!
//! Invariant: [`Chain`] only advances when a record is actually stored, so
//! `next_seq` is always one past the last stored record and `head` is that
//! record's hash; seqs are contiguous from 1 and chain order is seq order.

use sha2::{Digest, Sha256};

use super::record::{Event, Record};

/// `prev_hash` of the first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 over the raw bytes of `record.prev_hash` followed by the record's
/// canonical bytes, as lowercase hex. A `prev_hash` that is not 64 hex digits
/// is hashed as its text bytes, so a damaged record still gets a (wrong) hash
/// instead of an error; verify reports the mismatch.
pub fn compute_hash(record: &Record) -> String {
    hash_canonical(&record.prev_hash, &record.canonical_bytes())
}

/// The hash of a record given its `prev_hash` and canonical bytes.
fn hash_canonical(prev_hash: &str, canonical: &[u8]) -> String {
    let mut hasher = Sha256::new();
    let mut raw = [0u8; 32];
    match hex::decode_to_slice(prev_hash, &mut raw) {
        Ok(()) => hasher.update(raw),
        Err(_) => hasher.update(prev_hash.as_bytes()),
    }
    hasher.update(canonical);
    let mut hex = [0u8; 64];
    // 32 bytes always fit 64 hex digits; the digits are ASCII.
    hex::encode_to_slice(hasher.finalize(), &mut hex).expect("64 hex digits");
    std::str::from_utf8(&hex)
        .expect("hex digits are ASCII")
        .to_owned()
}

/// A record ready to store: the record and its stored bytes.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub record: Record,
    /// [`Record::to_stored_bytes`], computed with a single encoding.
    pub bytes: Vec<u8>,
}

/// The tail of the chain as the writer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The seq the next stored record gets.
    pub next_seq: u64,
    /// Hash of the last stored record (`GENESIS_HASH` when empty).
    pub head: String,
}

impl Chain {
    /// The chain of an empty store.
    pub fn empty() -> Chain {
        Chain {
            next_seq: 1,
            head: GENESIS_HASH.to_string(),
        }
    }

    /// The chain continuing after `last`, the store's last record.
    pub fn after(last: &Record) -> Chain {
        Chain {
            next_seq: last.seq + 1,
            head: last.hash.clone(),
        }
    }

    /// The next record for `event`, stamped `ts`, hashed; the chain itself
    /// does not move until [`Chain::advance`] confirms it was stored.
    pub fn seal(&self, event: Event, ts: String) -> Sealed {
        let mut record = Record::from_event(event, self.next_seq, ts, self.head.clone());
        let canonical = record.canonical_string();
        record.hash = hash_canonical(&record.prev_hash, canonical.as_bytes());
        let bytes = Record::stored_from_canonical(canonical, &record.hash);
        Sealed { record, bytes }
    }

    /// Moves past `record`, which must be the one [`Chain::seal`] returned.
    pub fn advance(&mut self, record: &Record) {
        debug_assert_eq!(record.seq, self.next_seq);
        self.next_seq = record.seq + 1;
        self.head.clone_from(&record.hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Kind;

    #[test]
    fn hash_covers_prev_hash_bytes_and_canonical_bytes() {
        let chain = Chain::empty();
        let sealed = chain.seal(
            Event::new(Kind::GatewayStart),
            "2026-11-27T12:00:00.000000Z".into(),
        );
        let r = sealed.record;
        assert_eq!(sealed.bytes, r.to_stored_bytes());
        let mut h = Sha256::new();
        h.update([0u8; 32]);
        h.update(r.canonical_bytes());
        assert_eq!(r.hash, hex::encode(h.finalize()));
        assert_eq!(r.seq, 1);
        assert_eq!(r.prev_hash, GENESIS_HASH);
    }

    #[test]
    fn advance_links_records() {
        let mut chain = Chain::empty();
        let a = chain.seal(Event::new(Kind::Query), "t".into()).record;
        chain.advance(&a);
        let b = chain.seal(Event::new(Kind::Result), "t".into()).record;
        assert_eq!(b.seq, 2);
        assert_eq!(b.prev_hash, a.hash);
        assert_ne!(a.hash, b.hash);
        assert_eq!(Chain::after(&b).next_seq, 3);
    }
}
