//! `audit stats`: record counts by kind, user and database, the time span
//! and the chain head, in one pass over the store.
//!
//! Invariant: memory grows with the number of distinct users and databases,
//! never with the number of records. Stats do not verify the chain (that is
//! `audit verify`); the head printed is the last record's `hash` as stored.

use std::collections::BTreeMap;
use std::fmt;

use super::chain::GENESIS_HASH;
use super::reader::StoreReader;
use super::record::Kind;
use super::store::decode;
use super::AuditError;

/// Summary of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    /// Seq of the last record (equals `records` in an intact store).
    pub last_seq: u64,
    pub first_ts: Option<String>,
    pub last_ts: Option<String>,
    /// `hash` of the last record (64 zeros when empty): pin it elsewhere.
    pub head: String,
    pub by_kind: BTreeMap<Kind, u64>,
    /// Records that name a client user, by user.
    pub by_user: BTreeMap<String, u64>,
    /// Records that name a database, by database.
    pub by_database: BTreeMap<String, u64>,
}

/// Reads the whole store once.
pub fn collect(reader: &StoreReader) -> Result<Stats, AuditError> {
    let mut stats = Stats {
        records: 0,
        last_seq: 0,
        first_ts: None,
        last_ts: None,
        head: GENESIS_HASH.to_string(),
        by_kind: BTreeMap::new(),
        by_user: BTreeMap::new(),
        by_database: BTreeMap::new(),
    };
    for entry in reader.scan_from(0) {
        let (seq, raw) = entry?;
        let record = decode(seq, &raw)?;
        stats.records += 1;
        stats.last_seq = seq;
        *stats.by_kind.entry(record.kind).or_default() += 1;
        if let Some(user) = record.client_user {
            *stats.by_user.entry(user.to_string()).or_default() += 1;
        }
        if let Some(db) = record.database {
            *stats.by_database.entry(db.to_string()).or_default() += 1;
        }
        if stats.first_ts.is_none() {
            stats.first_ts = Some(record.ts.clone());
        }
        stats.last_ts = Some(record.ts);
        stats.head = record.hash;
    }
    Ok(stats)
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "records     {}", self.records)?;
        writeln!(f, "last seq    {}", self.last_seq)?;
        writeln!(f, "first ts    {}", self.first_ts.as_deref().unwrap_or("-"))?;
        writeln!(f, "last ts     {}", self.last_ts.as_deref().unwrap_or("-"))?;
        writeln!(f, "chain head  {}", self.head)?;
        writeln!(f, "by kind:")?;
        for (kind, n) in &self.by_kind {
            writeln!(f, "  {:<20} {n}", kind.as_str())?;
        }
        writeln!(f, "by user:")?;
        for (user, n) in &self.by_user {
            writeln!(f, "  {user:<20} {n}")?;
        }
        writeln!(f, "by database:")?;
        for (db, n) in &self.by_database {
            writeln!(f, "  {db:<20} {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::testutil::sample_store;

    #[test]
    fn stats_count_kinds_users_databases_and_name_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let head = sample_store(dir.path());
        let stats = collect(&StoreReader::open(dir.path()).unwrap()).unwrap();
        assert_eq!(stats.records, 12);
        assert_eq!(stats.head, head);
        assert_eq!(stats.by_kind[&Kind::Query], 4);
        assert_eq!(stats.by_kind[&Kind::Result], 3);
        assert_eq!(stats.by_user["alice"], 7);
        assert_eq!(stats.by_user["bob"], 3);
        assert_eq!(stats.by_database["sales"], 3);
        assert_eq!(
            stats.first_ts.as_deref(),
            Some("2026-11-27T10:00:00.000000Z")
        );
        assert_eq!(
            stats.last_ts.as_deref(),
            Some("2026-11-27T12:00:00.000000Z")
        );
        let text = stats.to_string();
        assert!(text.contains(&format!("chain head  {head}")), "{text}");
        assert!(text.contains("  query                4\n"), "{text}");
    }
}
