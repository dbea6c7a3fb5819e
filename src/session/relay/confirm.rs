//! The pipelined identity assertion's answers (see
//! `identity::assert::Pipelined`): read before any answer of the client's,
//! which PostgreSQL sends only after them.
//!
//! Invariants:
//! - until they are read, the client's messages go to the server only up
//!   to their first `Sync` (or simple query or function call): PostgreSQL
//!   skips exactly those when the assertion fails, so nothing of the
//!   client's can run on a connection whose assertion failed;
//! - a failed assertion answers the client's messages as PostgreSQL answers
//!   a batch whose first message failed (the error, then `ReadyForQuery`
//!   where one is due), records them as not run, and discards the
//!   connection; the session stays usable;
//! - answers that are not the assertion's (or a row with other values)
//!   leave what the client's messages did unknown: the session ends as for
//!   a lost server connection, their outcome recorded as unknown.

use super::*;
use crate::identity::assert::{Pipelined, Progress};
use crate::protocol::frame::split_frame;
use crate::session::sequencer::MAX_SERVER_FRAME;

/// A pipelined assertion whose answers are still to be read. The
/// connection's custody already records it: if it fails, the connection
/// is discarded.
#[derive(Debug)]
pub(super) struct Confirming {
    pub(super) check: Pipelined,
    /// It reset another session's state: notifications read up to its end
    /// were that session's.
    pub(super) reset: bool,
}

/// What reading the assertion's answers came to.
pub(super) enum Read {
    /// All of them are read, or the connection went: go on with the
    /// client's answers.
    Done,
    /// More are due.
    Waiting,
}

impl QueryLoop<'_> {
    /// Reads the pipelined assertion's answers from what the server sent.
    pub(super) async fn read_confirmation(&mut self) -> Result<Read, End> {
        loop {
            let Some(confirming) = self.confirming.as_mut() else {
                return Ok(Read::Done);
            };
            let Some(server) = self.server.as_mut() else {
                self.confirming = None;
                return Ok(Read::Done);
            };
            let frame = match split_frame(&mut server.rbuf, MAX_SERVER_FRAME) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(Read::Waiting),
                Err(e) => return Err(self.server_lost(&e.to_string()).await),
            };
            let progress = match frame[0] {
                // The session's own notifications keep their place; those
                // of a reset session are dropped once the reset is read.
                b'A' => {
                    server.keep_notification(frame);
                    continue;
                }
                // Changes the assertion itself made, as on every binding.
                b'N' | b'S' => continue,
                tag => confirming.check.on_frame(tag, &frame[5..]),
            };
            match progress {
                Progress::More => {}
                Progress::Confirmed => {
                    self.confirmed();
                    return Ok(Read::Done);
                }
                Progress::Refused(e) => {
                    self.assertion_refused(e).await;
                    return Ok(Read::Done);
                }
                Progress::Broken(why) => {
                    tracing::error!(parent: &self.span, "identity assertion: {why}");
                    return Err(self.server_lost(&why).await);
                }
            }
        }
    }

    fn confirmed(&mut self) {
        let Some(confirming) = self.confirming.take() else {
            return;
        };
        self.release_hold();
        if let Some(server) = self.server.as_mut().filter(|_| confirming.reset) {
            server.forget_notifications();
        }
    }

    /// PostgreSQL refused the assertion, and skipped the client's messages:
    /// they are answered and recorded as refused, and the connection goes.
    async fn assertion_refused(&mut self, e: crate::identity::assert::AssertError) {
        self.confirming = None;
        self.release_hold();
        tracing::warn!(parent: &self.span, "identity assertion failed: {e}");
        let refusal = Refusal::from(e);
        self.core.fail_in_flight(&refusal.to_wire());
        self.core.bind_failed(&refusal);
        self.record_results().await;
        self.discard_failed_server().await;
    }

    /// The client's frames held behind the assertion may go on.
    fn release_hold(&mut self) {
        if std::mem::take(&mut self.hold_client) {
            self.resume_client = true;
        }
    }
}
