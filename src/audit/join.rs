//! The statement join of `audit export`: each `result` is folded into its
//! `query`, so an auditor reads one line per statement with its outcome.
//!
//! Invariant: lines come out in seq order of the records they represent,
//! every record is represented exactly once (a `result` inside its query's
//! line, or as itself when no waiting query claims it), and memory is
//! bounded by `max_window_bytes`, not by the size of the store.
//!
//! How: records are read in seq order into a window. A `query` waits in the
//! window until its `result` arrives (results always come after their
//! query), until a `gateway_start`/`gateway_stop` proves that no result can
//! follow (its gateway stopped or died), or until the end of the store;
//! the latter two export it with `status = "unknown"`. The front of the
//! window is written out as soon as it no longer waits. The window therefore
//! spans from the oldest statement still running to the scan position, which
//! is normally the in-flight statements only; one very long statement (or a
//! crash with no restart for a long time) could stretch it, so when the
//! window exceeds `max_window_bytes` the queries waiting in it are resolved
//! by one separate forward scan of the store (lookups instead of
//! buffering), the window drains, and the results that scan found are
//! skipped when the main scan reaches them. Memory is then the window (at
//! most `max_window_bytes` of stored bytes, about twice that decoded) plus
//! the seqs of results found ahead, one `u64` per statement of the window.

use std::collections::{BTreeMap, BTreeSet};

use super::reader::StoreReader;
use super::record::{Kind, Record, Status};
use super::store::decode;
use super::AuditError;

/// One line of a joined export.
pub enum Line {
    /// A record written exactly as stored (all kinds but `query`, and a
    /// `result` whose query is not waiting for it).
    AsStored(Record, sled::IVec),
    /// A `query` with its outcome: `status`, `sqlstate`, `message`,
    /// `command_tag`, `rows`, `duration_us` come from its `result`, whose seq
    /// is in `ref_seq`; without a result, `status` is `unknown`.
    Joined(Record),
}

impl Line {
    /// The record the line shows.
    pub fn record(&self) -> &Record {
        match self {
            Line::AsStored(record, _) | Line::Joined(record) => record,
        }
    }

    /// The stored bytes, for a line written as stored.
    pub fn raw(&self) -> Option<&[u8]> {
        match self {
            Line::AsStored(_, raw) => Some(raw),
            Line::Joined(_) => None,
        }
    }
}

/// A record in the window and what it still waits for.
struct Slot {
    /// Stored bytes this slot accounts for (its record plus a joined result).
    bytes: usize,
    record: Record,
    raw: sled::IVec,
    outcome: Outcome,
}

enum Outcome {
    /// Written as stored.
    AsStored,
    /// A query whose result has not been seen yet.
    Waiting,
    /// A query with its result, or `None` when none can come.
    Joined(Option<Box<Record>>),
}

/// The streaming join; feed it every record in seq order, then `finish`.
pub struct Joiner<'a> {
    reader: &'a StoreReader,
    window: BTreeMap<u64, Slot>,
    window_bytes: usize,
    max_window_bytes: usize,
    /// Results already joined by a lookup scan, skipped by the main scan.
    consumed: BTreeSet<u64>,
    /// The seq after the last record pushed (where lookups start).
    next_seq: u64,
}

impl<'a> Joiner<'a> {
    /// A join over `reader` that buffers at most about `max_window_bytes`.
    pub fn new(reader: &'a StoreReader, max_window_bytes: usize) -> Joiner<'a> {
        Joiner {
            reader,
            window: BTreeMap::new(),
            window_bytes: 0,
            max_window_bytes,
            consumed: BTreeSet::new(),
            next_seq: 1,
        }
    }

    /// Takes the next record (seq order) and writes every line that is ready.
    pub fn push<F>(
        &mut self,
        record: Record,
        raw: sled::IVec,
        emit: &mut F,
    ) -> Result<(), AuditError>
    where
        F: FnMut(Line) -> Result<(), AuditError>,
    {
        let seq = record.seq;
        self.next_seq = seq + 1;
        if record.kind == Kind::Result && self.consumed.remove(&seq) {
            return Ok(());
        }
        self.window_bytes += raw.len();
        let outcome = match record.kind {
            Kind::Result => match self.waiting_slot(record.ref_seq) {
                Some(slot) => {
                    slot.bytes += raw.len();
                    slot.outcome = Outcome::Joined(Some(Box::new(record)));
                    return self.drain_and_bound(emit);
                }
                None => Outcome::AsStored,
            },
            Kind::Query => Outcome::Waiting,
            Kind::GatewayStart | Kind::GatewayStop => {
                self.resolve_all_waiting();
                Outcome::AsStored
            }
            _ => Outcome::AsStored,
        };
        let bytes = raw.len();
        self.window.insert(
            seq,
            Slot {
                bytes,
                record,
                raw,
                outcome,
            },
        );
        self.drain_and_bound(emit)
    }

    /// End of the store: queries still waiting never completed.
    pub fn finish<F>(mut self, emit: &mut F) -> Result<(), AuditError>
    where
        F: FnMut(Line) -> Result<(), AuditError>,
    {
        self.resolve_all_waiting();
        self.drain(emit)
    }

    fn waiting_slot(&mut self, query_seq: Option<u64>) -> Option<&mut Slot> {
        let slot = self.window.get_mut(&query_seq?)?;
        let claimable = matches!(slot.outcome, Outcome::Waiting) && slot.record.kind == Kind::Query;
        claimable.then_some(slot)
    }

    fn resolve_all_waiting(&mut self) {
        for slot in self.window.values_mut() {
            if matches!(slot.outcome, Outcome::Waiting) {
                slot.outcome = Outcome::Joined(None);
            }
        }
    }

    /// Drains, then resolves waiting fronts by lookup while over budget.
    fn drain_and_bound<F>(&mut self, emit: &mut F) -> Result<(), AuditError>
    where
        F: FnMut(Line) -> Result<(), AuditError>,
    {
        self.drain(emit)?;
        if self.window_bytes > self.max_window_bytes {
            self.resolve_by_lookup()?;
            self.drain(emit)?;
        }
        Ok(())
    }

    /// Over budget: one forward scan from the scan position finds the
    /// results of every query waiting in the window (stopping early once all
    /// are found, or at a `gateway_start`/`gateway_stop`, after which none
    /// can come); the rest never completed. The whole window then drains.
    fn resolve_by_lookup(&mut self) -> Result<(), AuditError> {
        let mut waiting: BTreeSet<u64> = self
            .window
            .iter()
            .filter(|(_, slot)| matches!(slot.outcome, Outcome::Waiting))
            .map(|(seq, _)| *seq)
            .collect();
        for entry in self.reader.scan_from(self.next_seq) {
            if waiting.is_empty() {
                break;
            }
            let (seq, raw) = entry?;
            let record = decode(seq, &raw)?;
            match record.kind {
                Kind::Result => {
                    let Some(query_seq) = record.ref_seq.filter(|q| waiting.remove(q)) else {
                        continue;
                    };
                    if let Some(slot) = self.window.get_mut(&query_seq) {
                        slot.outcome = Outcome::Joined(Some(Box::new(record)));
                        self.consumed.insert(seq);
                    }
                }
                Kind::GatewayStart | Kind::GatewayStop => break,
                _ => {}
            }
        }
        self.resolve_all_waiting();
        Ok(())
    }

    /// Writes out the front of the window up to the first waiting query.
    fn drain<F>(&mut self, emit: &mut F) -> Result<(), AuditError>
    where
        F: FnMut(Line) -> Result<(), AuditError>,
    {
        while let Some(entry) = self.window.first_entry() {
            if matches!(entry.get().outcome, Outcome::Waiting) {
                break;
            }
            let slot = entry.remove();
            self.window_bytes = self.window_bytes.saturating_sub(slot.bytes);
            let line = match slot.outcome {
                Outcome::Joined(result) => Line::Joined(merge(slot.record, result)),
                _ => Line::AsStored(slot.record, slot.raw),
            };
            emit(line)?;
        }
        Ok(())
    }
}

/// The query line: the query's identity and chain fields, the result's outcome.
fn merge(mut query: Record, result: Option<Box<Record>>) -> Record {
    match result {
        None => {
            query.status = Some(Status::Unknown);
            query.ref_seq = None;
        }
        Some(r) => {
            query.status = Some(r.status.unwrap_or(Status::Unknown));
            query.sqlstate = r.sqlstate;
            // A query's own note (a statement the gateway issued, and why)
            // stays unless the outcome has a message of its own.
            query.message = r.message.or(query.message);
            query.command_tag = r.command_tag;
            query.rows = r.rows;
            query.duration_us = r.duration_us;
            query.backend_pid = query.backend_pid.or(r.backend_pid);
            query.ref_seq = Some(r.seq);
            query.tx = r.tx;
        }
    }
    query
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::audit::record::{Event, Status};
    use crate::audit::testutil::{build_store, query, result};

    /// A deterministic mix: 8 sessions with pipelined statements, results in
    /// scrambled order, queries that never complete, and gateway restarts.
    fn workload() -> Vec<Event> {
        let mut events = vec![Event::new(Kind::GatewayStart)];
        let mut open: Vec<u64> = Vec::new();
        let mut x = 12345u64;
        for i in 0..3000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let roll = (x >> 33) % 100;
            let seq = events.len() as u64 + 1;
            if roll < 45 {
                events.push(query("u", "d", &format!("select {i}")));
                open.push(seq);
            } else if roll < 90 && !open.is_empty() {
                let idx = ((x >> 13) as usize) % open.len();
                let q = open.swap_remove(idx);
                events.push(result("u", "d", q, Status::Ok, Some("SELECT 1")));
            } else if roll < 91 {
                events.push(Event::new(Kind::GatewayStart));
                open.clear();
            } else {
                events.push(Event::new(Kind::SessionStart));
            }
        }
        events
    }

    /// The join computed naively in memory: what the streaming join must equal.
    fn reference(records: &[Record]) -> Vec<(u64, Option<u64>, Option<Status>)> {
        let mut result_of: HashMap<u64, u64> = HashMap::new();
        let mut claimed = std::collections::HashSet::new();
        for r in records {
            if r.kind != Kind::Result {
                continue;
            }
            let Some(q) = r.ref_seq else { continue };
            let query = &records[q as usize - 1];
            let restarted = records[q as usize..r.seq as usize - 1]
                .iter()
                .any(|m| matches!(m.kind, Kind::GatewayStart | Kind::GatewayStop));
            if query.kind == Kind::Query && !restarted && !result_of.contains_key(&q) {
                result_of.insert(q, r.seq);
                claimed.insert(r.seq);
            }
        }
        records
            .iter()
            .filter(|r| !claimed.contains(&r.seq))
            .map(|r| match r.kind {
                Kind::Query => match result_of.get(&r.seq) {
                    Some(res) => (r.seq, Some(*res), Some(Status::Ok)),
                    None => (r.seq, None, Some(Status::Unknown)),
                },
                _ => (r.seq, r.ref_seq, r.status),
            })
            .collect()
    }

    #[test]
    fn streaming_join_equals_the_in_memory_join_at_any_window() {
        let dir = tempfile::tempdir().unwrap();
        let ts = "2026-11-27T10:00:00.000000Z";
        build_store(
            dir.path(),
            workload().into_iter().map(|e| (ts, e)).collect(),
        );
        let reader = StoreReader::open(dir.path()).unwrap();
        let records: Vec<Record> = reader
            .scan_from(1)
            .map(|e| {
                let (seq, raw) = e.unwrap();
                decode(seq, &raw).unwrap()
            })
            .collect();
        let expected = reference(&records);
        for window in [1, 2_000, 20_000, usize::MAX] {
            let mut lines = Vec::new();
            let mut emit = |line: Line| {
                lines.push(match line {
                    Line::AsStored(r, _) => (r.seq, r.ref_seq, r.status),
                    Line::Joined(r) => (r.seq, r.ref_seq, r.status),
                });
                Ok(())
            };
            let mut joiner = Joiner::new(&reader, window);
            for r in &records {
                let raw = sled::IVec::from(r.to_stored_bytes());
                joiner.push(r.clone(), raw, &mut emit).unwrap();
            }
            joiner.finish(&mut emit).unwrap();
            assert_eq!(lines, expected, "window {window}");
        }
    }
}
