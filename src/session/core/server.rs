//! The server's side, without I/O: each message the server sends (what the
//! client sees, what it resolves, what it changes on the connection), and
//! what the driver must do once the server has answered ([`Duty`]): the
//! application-name retag, the identity check, the release, reading the
//! client's waiting messages.

use bytes::BytesMut;

use super::Core;
use crate::backend::conn::ConnState;
use crate::backend::statements;
use crate::config::PoolMode;
use crate::protocol::messages;
use crate::session::tracker::{CacheEffects, Route};

/// The bound connection, as a server message concerns it: its state and
/// its process id.
pub type Bound<'c> = Option<(ConnState<'c>, i32)>;

/// What the driver does next, once the server's answers are read.
#[derive(Debug, PartialEq, Eq)]
pub enum Duty {
    /// Send this query of the gateway's own (its answers go nowhere): the
    /// client changed its application name, and the connection must show
    /// the tagged one again.
    Retag(String),
    /// `verify = "transaction"`: check that the connection still carries
    /// the client's identity, before it can go to anyone else.
    Verify,
    /// Read back the settings kept for the session, then release the
    /// connection to the pool.
    Release,
    /// Read the client's messages that waited for the server.
    Resume,
}

impl Core<'_> {
    /// A whole server message. Returns true when the server is going away
    /// (a FATAL or PANIC error): the connection must not be reused.
    pub fn server_frame(&mut self, mut frame: BytesMut, conn: Bound<'_>) -> bool {
        let tag = frame[0];
        tracing::trace!(parent: &self.span, tag = %(tag as char), len = frame.len(), "server frame");
        let (mut conn, pid) = match conn {
            Some((state, pid)) => (Some(state), Some(pid)),
            None => (None, None),
        };
        match tag {
            // What the client was already told of goes no further.
            b'S' if !self.parameter_status(&frame[5..], &mut conn) => return false,
            // A notification this session's own connection sent names the
            // process the client knows, as on a direct connection.
            b'A' if frame.len() >= 9 => {
                let from = i32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
                if pid == Some(from) {
                    frame[5..9].copy_from_slice(&self.client_pid.to_be_bytes());
                }
            }
            _ => {}
        }
        let fatal = tag == b'E'
            && messages::parse_error_fields(&frame[5..])
                .is_ok_and(|f| matches!(f.severity.as_str(), "FATAL" | "PANIC"));
        if fatal {
            if self.seq.owes_nothing() {
                // Said to no request (a terminated idle connection): the
                // client's next request learns what became of it.
                return true;
            }
            // The server connection ends; whether the client's session does
            // is the gateway's to say.
            frame = messages::downgrade_fatal(&frame);
        }
        let mut cache = CacheEffects::default();
        let before = self.results.count();
        let route = self
            .seq
            .server_frame(&frame, self.results.resolved(), &mut cache);
        if self.auditing && route != Route::Drop {
            let status = (tag == b'Z').then(|| frame[5]);
            self.results.server_said(tag, status, before);
        }
        // What the answer did to the connection's statement cache (the
        // client's own names the sequencer put back).
        if let Some(conn) = conn.as_mut() {
            for key in cache.not_prepared {
                conn.statements.remove(key);
            }
            if cache.stale {
                conn.statements.mark_uncertain();
                statements::found_stale();
            }
        }
        if tag == b'Z' && frame.get(5) == Some(&b'I') {
            self.carried.transaction_ended();
            if route == Route::Forward {
                self.counts.0 += 1;
            }
        }
        fatal
    }

    /// A setting changed on the server while this client was bound: a
    /// tracked setting follows the client to its next connection, and the
    /// connection now carries the client's new settings.
    /// Whether the client is to see it: a value it was already told of is
    /// no change of its own (the identity assertion applying the client's
    /// settings to a connection reports them too).
    fn parameter_status(&mut self, body: &[u8], conn: &mut Option<ConnState<'_>>) -> bool {
        let mut r = crate::protocol::frame::Reader::new(body, "ParameterStatus");
        let (Ok(name), Ok(value)) = (r.cstr(), r.cstr()) else {
            return true;
        };
        let (name, value) = (
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(value),
        );
        if !self.carried.news(&name, &value) {
            return false;
        }
        self.carried.reported(&name, &value);
        if let Some(conn) = conn.as_mut() {
            let values = self.carried.values().clone();
            conn.custody
                .settings_changed(&self.ident.session_id, values);
        }
        true
    }

    /// The server's answers so far are read (`was_busy`: it owed the
    /// client something before). True when it owes nothing more: the
    /// client's request is done.
    pub fn answered(&mut self, was_busy: bool, now: std::time::Instant) -> bool {
        if !self.seq.owes_nothing() {
            return false;
        }
        self.carried.settled();
        self.clock.answered(was_busy, now);
        true
    }

    /// The next thing the driver must do now that the server's answers are
    /// read, in order; `None` when there is nothing (more). Each duty, once
    /// done, is not asked again until the state calls for it afresh.
    pub fn next_duty(&mut self) -> Option<Duty> {
        let seq = &self.seq;
        // Not inside an unsynced batch: after an error there the server
        // would skip the gateway's query and never answer it.
        let quiet = seq.owes_nothing() && !seq.copy_in() && !seq.unsynced();
        if self.carried.wants_retag() && quiet {
            if let Some(sql) = self.carried.retag_sql() {
                return Some(Duty::Retag(sql));
            }
        }
        if seq.idle() && seq.tx_status() == b'I' && self.verify_due {
            self.verify_due = false;
            return Some(Duty::Verify);
        }
        if self.rules.mode == PoolMode::Transaction && seq.releasable() {
            return Some(Duty::Release);
        }
        if seq.may_resume() {
            return Some(Duty::Resume);
        }
        None
    }
}
