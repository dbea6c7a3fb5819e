//! The `result` records of a session, without I/O: the outcomes the server
//! reported (in its order, with its `ReadyForQuery`s and errors that are no
//! statement's own, which decide each transaction's outcome in the
//! [`Ledger`]), and the outcomes of statements that never reached it.
//!
//! Invariant: results leave in the order the server produced them, each
//! once; a result held for its transaction's outcome leaves when that is
//! known, or as `unknown` when it can no longer be ([`Results::abandon`]).

use crate::audit::Event;
use crate::session::ledger::Ledger;
use crate::session::outcome::{Outcome, Pending, Resolved};

/// What the server said besides statement outcomes, for the ledger.
#[derive(Debug, Clone, Copy)]
enum Mark {
    /// `ReadyForQuery` with this status.
    Ready(u8),
    /// An error that is no audited statement's own (a failed commit at
    /// `Sync`, a refused statement's stand-in): its transaction fails.
    Error,
}

/// A session's outcomes on their way to the audit log.
#[derive(Debug, Default)]
pub struct Results {
    /// Statements the server's messages resolved, since the last drain.
    resolved: Vec<Resolved>,
    /// News from the server that is no statement's outcome, each with the
    /// number of `resolved` entries before it.
    marks: Vec<(usize, Mark)>,
    /// Outcomes of statements that never reached the server (no
    /// connection, answered by the gateway): recorded as they are,
    /// without `tx`.
    unran: Vec<Resolved>,
    /// Results held until their transaction's outcome is known.
    ledger: Ledger,
}

impl Results {
    /// Where the tracker puts the statements a server message resolves.
    pub fn resolved(&mut self) -> &mut Vec<Resolved> {
        &mut self.resolved
    }

    /// How many statements are resolved so far: pass it to
    /// [`Self::server_said`] after the message is routed.
    pub fn count(&self) -> usize {
        self.resolved.len()
    }

    /// The server's message `tag` (`status`: a `ReadyForQuery`'s), which
    /// reached the client, was routed; `before`: [`Self::count`] before.
    pub fn server_said(&mut self, tag: u8, status: Option<u8>, before: usize) {
        match (tag, status) {
            (b'Z', Some(status)) => self.marks.push((self.resolved.len(), Mark::Ready(status))),
            (b'E', _) if self.resolved.len() == before => self.marks.push((before, Mark::Error)),
            _ => {}
        }
    }

    /// A statement that never reached the server ended with `outcome`.
    pub fn unran(&mut self, pending: Pending, outcome: Outcome) {
        self.unran.push(Resolved { pending, outcome });
    }

    /// The records to write now, in order: `event` makes a statement's
    /// `result` record.
    pub fn drain(&mut self, event: impl Fn(Pending, Outcome) -> Event) -> Vec<Event> {
        let mut out: Vec<Event> = std::mem::take(&mut self.unran)
            .into_iter()
            .map(|r| event(r.pending, r.outcome))
            .collect();
        // Each mark came before the statement at its index.
        let mut marks = std::mem::take(&mut self.marks).into_iter().peekable();
        for (i, r) in std::mem::take(&mut self.resolved).into_iter().enumerate() {
            while let Some((_, mark)) = marks.next_if(|(at, _)| *at <= i) {
                out.extend(self.apply(mark));
            }
            let control = r.pending.control.clone();
            out.extend(self.ledger.statement(event(r.pending, r.outcome), &control));
        }
        for (_, mark) in marks {
            out.extend(self.apply(mark));
        }
        out
    }

    fn apply(&mut self, mark: Mark) -> Vec<Event> {
        match mark {
            Mark::Ready(status) => self.ledger.ready(status),
            Mark::Error => {
                self.ledger.error();
                Vec::new()
            }
        }
    }

    /// The server connection is gone: everything left, with results held
    /// for a transaction whose outcome can no longer be known (`tx =
    /// unknown`).
    pub fn abandon(&mut self, event: impl Fn(Pending, Outcome) -> Event) -> Vec<Event> {
        let mut out = self.drain(event);
        out.extend(self.ledger.abandon());
        out
    }

    /// The server connection is gone with the transaction open (a block,
    /// or an unsynced batch) and nothing that could end it in flight: it
    /// cannot have committed (`tx = rolled_back`, unless code the ledger
    /// cannot see made it unknowable).
    pub fn lost_open(&mut self, event: impl Fn(Pending, Outcome) -> Event) -> Vec<Event> {
        let mut out = self.drain(event);
        out.extend(self.ledger.lost());
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::audit::{Kind, Status, TxOutcome};
    use crate::session::ledger::Control;

    fn pending(ticket: u64, sql: &str) -> Pending {
        Pending {
            ticket,
            started: Instant::now(),
            control: Control::of(sql.as_bytes()),
        }
    }

    fn ok(tag: &str) -> Outcome {
        Outcome::Ok {
            tag: Some(tag.into()),
            rows: None,
        }
    }

    fn event(p: Pending, outcome: Outcome) -> Event {
        let mut ev = Event::new(Kind::Result);
        ev.statement = Some(p.ticket.to_string());
        match outcome {
            Outcome::Ok { tag, .. } => {
                ev.status = Some(Status::Ok);
                ev.command_tag = tag;
            }
            _ => ev.status = Some(Status::Error),
        }
        ev
    }

    fn shown(events: &[Event]) -> Vec<(String, Option<TxOutcome>)> {
        events
            .iter()
            .map(|e| (e.statement.clone().unwrap(), e.tx))
            .collect()
    }

    fn resolve(r: &mut Results, ticket: u64, sql: &str, outcome: Outcome) {
        r.resolved().push(Resolved {
            pending: pending(ticket, sql),
            outcome,
        });
    }

    #[test]
    fn results_wait_for_their_transaction_and_leave_in_server_order() {
        let mut r = Results::default();
        resolve(&mut r, 1, "BEGIN", ok("BEGIN"));
        resolve(&mut r, 2, "INSERT", ok("INSERT 0 1"));
        r.server_said(b'Z', Some(b'T'), 2);
        assert!(r.drain(event).is_empty(), "held until the outcome is known");
        let before = r.count();
        resolve(&mut r, 3, "COMMIT", ok("COMMIT"));
        r.server_said(b'Z', Some(b'I'), before);
        let out = shown(&r.drain(event));
        assert_eq!(
            out,
            [
                ("1".into(), Some(TxOutcome::Committed)),
                ("2".into(), Some(TxOutcome::Committed)),
                ("3".into(), Some(TxOutcome::Committed)),
            ]
        );
    }

    #[test]
    fn an_error_of_no_statement_rolls_the_implicit_transaction_back() {
        let mut r = Results::default();
        resolve(&mut r, 1, "INSERT", ok("INSERT 0 1"));
        // A failed commit at Sync: resolves nothing.
        let before = r.count();
        r.server_said(b'E', None, before);
        r.server_said(b'Z', Some(b'I'), before);
        assert_eq!(
            shown(&r.drain(event)),
            [("1".into(), Some(TxOutcome::RolledBack))]
        );
    }

    #[test]
    fn an_error_that_is_a_statements_own_is_no_mark() {
        let mut r = Results::default();
        let before = r.count();
        resolve(
            &mut r,
            1,
            "SELECT x",
            Outcome::Error {
                code: "42703".into(),
                message: "no".into(),
            },
        );
        r.server_said(b'E', None, before);
        r.server_said(b'Z', Some(b'I'), r.count());
        let out = r.drain(event);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tx, Some(TxOutcome::RolledBack));
    }

    #[test]
    fn statements_that_never_ran_go_first_and_without_tx() {
        let mut r = Results::default();
        resolve(&mut r, 2, "SELECT 1", ok("SELECT 1"));
        r.server_said(b'Z', Some(b'I'), 0);
        r.unran(pending(1, "SELECT 2"), Outcome::NotExecuted { after: None });
        let out = shown(&r.drain(event));
        assert_eq!(out[0], ("1".into(), None));
        assert_eq!(out[1], ("2".into(), Some(TxOutcome::Committed)));
    }

    #[test]
    fn abandoning_releases_held_results_as_unknown() {
        let mut r = Results::default();
        resolve(&mut r, 1, "BEGIN", ok("BEGIN"));
        resolve(&mut r, 2, "UPDATE", ok("UPDATE 1"));
        r.server_said(b'Z', Some(b'T'), 0);
        let out = shown(&r.abandon(event));
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|(_, tx)| *tx == Some(TxOutcome::Unknown)));
        assert!(r.abandon(event).is_empty(), "each result leaves once");
    }
}
