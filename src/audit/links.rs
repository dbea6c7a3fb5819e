//! Tickets: a `result` names its `query` by the ticket the session took for
//! it ([`super::Link`]), so no session waits to learn its query's seq; the
//! writer, which assigns seqs, turns tickets into `ref_seq`s here.
//!
//! Invariant: a ticket is redeemed at most once (a result's `ref_seq`), and
//! a ticket whose query record was not stored (a failed insert, a store
//! reopened without it) resolves to nothing rather than to another seq.

use std::collections::{HashMap, VecDeque};

use super::record::{Event, Link};

/// Redeemed tickets remembered for [`Event::cause`]: a skipped statement's
/// result follows the failed one's within its batch.
const REDEEMED_KEPT: usize = 1024;

/// The writer's tickets, from a stored `query` record to its `result`.
#[derive(Debug, Default)]
pub struct Links {
    /// Seqs of stored `query` records by ticket, until their `result` comes.
    pending: HashMap<u64, u64>,
    /// The last [`REDEEMED_KEPT`] tickets redeemed, with their seqs.
    redeemed: VecDeque<(u64, u64)>,
}

impl Links {
    /// The `query` record that took `ticket` is about to be stored as `seq`.
    pub fn stored(&mut self, ticket: u64, seq: u64) {
        self.pending.insert(ticket, seq);
    }

    /// The record that took `ticket` was not stored after all.
    pub fn forget(&mut self, ticket: u64) {
        self.pending.remove(&ticket);
    }

    /// The records that took the pending tickets are gone (the store was
    /// reopened without them).
    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// A result names the seq of its `query` record, and a statement that
    /// did not run because of another names that one's seq.
    pub fn resolve(&mut self, event: &mut Event) {
        if let Link::Result(ticket) = event.link {
            event.ref_seq = event.ref_seq.or_else(|| self.redeem(ticket));
        }
        if let Some(seq) = event.cause.and_then(|t| self.redeemed_seq(t)) {
            if let Some(message) = event.message.as_mut() {
                message.push_str(&format!(" (the statement of seq {seq})"));
            }
        }
    }

    /// The query seq of a ticket pending or redeemed lately (a skipped
    /// statement's result names the statement that failed, whose result
    /// came first).
    fn redeemed_seq(&self, ticket: u64) -> Option<u64> {
        self.pending.get(&ticket).copied().or_else(|| {
            self.redeemed
                .iter()
                .rev()
                .find(|(t, _)| *t == ticket)
                .map(|(_, seq)| *seq)
        })
    }

    /// The seq of the `query` that took `ticket`, forgetting it: each
    /// result redeems its ticket once.
    fn redeem(&mut self, ticket: u64) -> Option<u64> {
        let seq = self.pending.remove(&ticket);
        match seq {
            Some(seq) => {
                if self.redeemed.len() == REDEEMED_KEPT {
                    self.redeemed.pop_front();
                }
                self.redeemed.push_back((ticket, seq));
            }
            None => tracing::warn!(
                ticket,
                "audit result whose query record was not stored; ref_seq left null"
            ),
        }
        seq
    }
}
