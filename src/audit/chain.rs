//! The hash chain: how a record's `hash` is computed and how the writer
//! extends the chain.
//!
//! Invariant: [`Chain`] only advances when a record is actually stored, so
//! `next_seq` is always one past the last stored record and `head` is that
//! record's hash; seqs are contiguous from 1 and chain order is seq order.

use sha2::{Digest, Sha256};

use super::record::{Event, Kind, Record};

/// `prev_hash` of the first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 over the raw bytes of `record.prev_hash` followed by the record's
/// canonical bytes, as lowercase hex. A `prev_hash` that is not 64 hex digits
/// is hashed as its text bytes, so a damaged record still gets a (wrong) hash
/// instead of an error; verify reports the mismatch.
pub fn compute_hash(record: &Record) -> String {
    let mut raw = [0u8; 32];
    let prev: &[u8] = match hex::decode_to_slice(&record.prev_hash, &mut raw) {
        Ok(()) => &raw,
        Err(_) => record.prev_hash.as_bytes(),
    };
    to_hex(&digest(prev, &record.canonical_bytes()))
}

/// SHA-256 of `prev` followed by `canonical`.
fn digest(prev: &[u8], canonical: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(canonical);
    hasher.finalize().into()
}

/// `raw` as 64 lowercase hex digits.
fn to_hex(raw: &[u8; 32]) -> String {
    let mut hex = [0u8; 64];
    // 32 bytes always fit 64 hex digits; the digits are ASCII.
    hex::encode_to_slice(raw, &mut hex).expect("64 hex digits");
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
    /// `record.hash` as raw bytes.
    digest: [u8; 32],
}

/// The tail of the chain as the writer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The seq the next stored record gets.
    pub next_seq: u64,
    /// Hash of the last stored record (`GENESIS_HASH` when empty).
    pub head: String,
    /// `head` as raw bytes, what the next record's hash covers. `None` when
    /// the stored head is not 64 hex digits (a damaged store): it is then
    /// hashed as text, as [`compute_hash`] does.
    head_raw: Option<[u8; 32]>,
}

impl Chain {
    /// The chain of an empty store.
    pub fn empty() -> Chain {
        Chain {
            next_seq: 1,
            head: GENESIS_HASH.to_string(),
            head_raw: Some([0; 32]),
        }
    }

    /// The chain continuing after `last`, the store's last record.
    pub fn after(last: &Record) -> Chain {
        let mut raw = [0u8; 32];
        Chain {
            next_seq: last.seq + 1,
            head: last.hash.clone(),
            head_raw: hex::decode_to_slice(&last.hash, &mut raw)
                .ok()
                .map(|()| raw),
        }
    }

    /// The next record for `event`, stamped `ts`, hashed; the chain itself
    /// does not move until [`Chain::advance`] confirms it was stored.
    pub fn seal(&self, event: Event, ts: String) -> Sealed {
        let mut record = Record::from_event(event, self.next_seq, ts, self.head.clone());
        let canonical = record.canonical_string();
        let prev: &[u8] = match &self.head_raw {
            Some(raw) => raw,
            None => self.head.as_bytes(),
        };
        let digest = digest(prev, canonical.as_bytes());
        record.hash = to_hex(&digest);
        let bytes = Record::stored_from_canonical(canonical, &record.hash);
        Sealed {
            record,
            bytes,
            digest,
        }
    }

    /// Moves past `sealed`, which must be what [`Chain::seal`] returned.
    pub fn advance(&mut self, sealed: &Sealed) {
        debug_assert_eq!(sealed.record.seq, self.next_seq);
        self.next_seq = sealed.record.seq + 1;
        self.head.clone_from(&sealed.record.hash);
        self.head_raw = Some(sealed.digest);
    }
}

/// Why the record stored under `seq` does not verify, if it does not.
pub fn check_stored(record: &Record, seq: u64, head: &str, raw: &[u8]) -> Option<String> {
    if record.seq != seq {
        return Some(format!(
            "the record stored here has seq {} (records were moved or reordered)",
            record.seq
        ));
    }
    if record.prev_hash != head {
        return Some(format!(
            "prev_hash does not match the hash of record {} (a record was replaced, removed or reordered)",
            seq - 1
        ));
    }
    if compute_hash(record) != record.hash {
        return Some("hash does not match the record's contents (the record was changed)".into());
    }
    if record.to_stored_bytes() != raw {
        return Some("the record is not in canonical form (it was changed)".into());
    }
    if record.kind == Kind::GatewayStop {
        let expected = format!("chain head {}", record.prev_hash);
        if record.message.as_deref() != Some(expected.as_str()) {
            return Some(format!("gateway_stop does not say \"{expected}\""));
        }
    }
    None
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
        let a = chain.seal(Event::new(Kind::Query), "t".into());
        chain.advance(&a);
        let b = chain.seal(Event::new(Kind::Result), "t".into());
        assert_eq!(b.record.seq, 2);
        assert_eq!(b.record.prev_hash, a.record.hash);
        assert_ne!(a.record.hash, b.record.hash);
        assert_eq!(compute_hash(&b.record), b.record.hash);
        let after = Chain::after(&b.record);
        assert_eq!(after.next_seq, 3);
        // A chain continued after a stored record hashes as one that sealed it.
        chain.advance(&b);
        let c = chain.seal(Event::new(Kind::Query), "t".into());
        assert_eq!(
            after.seal(Event::new(Kind::Query), "t".into()).record,
            c.record
        );
    }

    #[test]
    fn a_head_that_is_not_hex_is_hashed_as_text_like_verify_does() {
        let mut last = Chain::empty()
            .seal(Event::new(Kind::Query), "t".into())
            .record;
        last.hash = "not a hash".into();
        let next = Chain::after(&last).seal(Event::new(Kind::Result), "t".into());
        assert_eq!(next.record.prev_hash, "not a hash");
        assert_eq!(compute_hash(&next.record), next.record.hash);
    }
}
