//! The audit trail: every event the gateway handles becomes one record in an
//! embedded sled store, chained by SHA-256 so that editing, removing or
//! reordering a record is detectable, plus the offline commands that export,
//! verify and summarize the store.
//!
//! Invariant: seqs are contiguous from 1 and never reused; record `n`'s
//! `prev_hash` is record `n-1`'s `hash`; a statement's `query` record is
//! stored as its durability mode defines before [`Auditor::append_ahead`]
//! returns, so before the gateway forwards the statement.
//!
//! Layout: [`record`] (fields and canonical bytes), [`chain`] (hashing),
//! [`store`] (sled and the `Store` trait), [`writer`] (the thread that owns
//! the store; `links` turns a result's ticket into its query's seq),
//! [`auditor`] (the handle sessions use), [`export`], [`join`],
//! [`verify`], [`stats`] and [`cli`] (the offline commands).

use std::path::PathBuf;

pub mod anchor;
pub mod archive;
pub mod auditor;
pub mod cef;
pub mod chain;
pub mod checkpoint;
pub mod cli;
mod cut;
pub mod export;
pub mod follow;
pub mod heads;
pub mod join;
mod links;
pub mod reader;
pub mod record;
pub mod retention;
pub mod ship;
pub mod sources;
pub mod stats;
pub mod store;
pub mod table;
pub mod verify;
pub(crate) mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

pub use auditor::{AuditCounters, Auditor};
pub use chain::GENESIS_HASH;
pub use reader::StoreReader;
pub use record::{Event, Kind, Link, Record, Status, TxOutcome};
pub use store::{MemoryControl, MemoryStore, SledStore, Store};

/// Why the audit trail could not be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// sled's file lock is held: a gateway (or an audit command) has the store open.
    #[error("audit store {} is locked by another process (is a gateway running?)", path.display())]
    Locked { path: PathBuf },
    /// The offline commands never create a store.
    #[error("no audit store at {}", path.display())]
    NotFound { path: PathBuf },
    #[error("cannot open audit store {}: {message}", path.display())]
    Open { path: PathBuf, message: String },
    /// A stored record that cannot be used (the writer refuses to extend it).
    #[error("audit store is damaged at seq {seq}: {message}")]
    Corrupt { seq: u64, message: String },
    /// The store refused a write or an fsync; statements must not be forwarded
    /// unless `on_failure = "allow"`.
    #[error("audit store write failed: {0}")]
    Write(String),
    #[error("audit store read failed: {0}")]
    Read(String),
    /// The writer was shut down (or died): nothing more can be appended.
    #[error("audit writer is stopped")]
    Closed,
    /// Writing an export (or another output) failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
