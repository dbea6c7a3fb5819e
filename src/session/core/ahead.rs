//! What the `query` records of the extended protocol show, read ahead in
//! the client's buffered messages: the statement and parameters an
//! `Execute` runs (from its portal, or the `Parse` and `Bind` before it),
//! and the first `Execute` of a batch, whose record is stored before the
//! batch takes a connection.

use bytes::Bytes;

use super::{Core, ToRecord};
use crate::protocol::frame::{FrameHeader, ProtocolError};
use crate::protocol::messages::{self, BindView};
use crate::session::outcome::{Pending, Portal};
use crate::session::refusal::Refusal;

/// A statement as its `query` record shows it: text and audited parameters.
pub(super) type Audited = (Bytes, Option<Vec<Option<String>>>);

/// How the first `Execute` of a batch fared when it was audited ahead.
#[derive(Debug)]
pub enum Ahead {
    /// Its `query` record is stored.
    Stored(Pending),
    /// The store failed and `on_failure = "allow"`: it runs unaudited.
    Unaudited,
    /// The store failed: it is refused.
    Failed(Refusal),
}

impl Core<'_> {
    /// Between transactions, the `query` record of the first `Execute` of
    /// the client's buffered batch (`buffered`), to store before the
    /// batch's `Parse` or `Bind` takes a server connection, so that no
    /// pooled connection idles through the record's fsync (a simple
    /// `Query` gets the same by storing its records before binding). The
    /// record is the one its `Execute` would have; there is none when the
    /// batch is not a plain run of `Parse`/`Bind`/`Describe`/`Flush` up to
    /// that `Execute`, is not all buffered yet, or holds anything the
    /// gateway refuses: a statement the guard blocks, a use of an unnamed
    /// statement it has not parsed, a message too large or malformed.
    /// The driver stores it and hands the result to [`Core::audited_ahead`].
    pub fn ahead(&self, buffered: &[u8]) -> Option<ToRecord> {
        let between_transactions = !self.seq.is_bound()
            && self.pre_audited.is_none()
            && !self.seq.discarding()
            && !self.seq.streaming_from_client();
        if !self.auditing || !between_transactions {
            return None;
        }
        let (sql, params) = self.first_execute_ahead(buffered)?;
        self.record(&sql, params)
    }

    /// The record [`Core::ahead`] planned was stored (`Ok(Some)`), stored
    /// nowhere under `on_failure = "allow"` (`Ok(None)`), or failed.
    pub fn audited_ahead(&mut self, stored: Result<Option<Pending>, Refusal>) {
        self.pre_audited = Some(match stored {
            Ok(Some(pending)) => Ahead::Stored(pending),
            Ok(None) => Ahead::Unaudited,
            Err(e) => Ahead::Failed(e),
        });
    }

    /// The `Execute` of the batch takes the record stored ahead for it.
    pub(super) fn take_ahead(&mut self) -> Option<Ahead> {
        self.pre_audited.take()
    }

    /// The statement text and audited parameters the first buffered
    /// `Execute` will have, from the `Parse` and `Bind` messages before it
    /// and the session's statements and portals (as a `Bind` and an
    /// `Execute` resolve them).
    fn first_execute_ahead(&self, buf: &[u8]) -> Option<Audited> {
        let mut parsed: Vec<(&[u8], &[u8])> = Vec::new();
        let mut bound: Vec<(&[u8], Audited)> = Vec::new();
        let unnamed_known = |parsed: &[(&[u8], &[u8])], name: &[u8]| {
            !name.is_empty()
                || parsed.iter().any(|(n, _)| n.is_empty())
                || self.seq.names.check_unnamed(name).is_ok()
        };
        let mut at = 0;
        loop {
            let header = FrameHeader::peek(&buf[at..], self.max_message_size).ok()??;
            let end = at + header.total;
            if end > buf.len() {
                return None;
            }
            let body = &buf[at + 5..end];
            match header.tag {
                b'P' => {
                    let parse = messages::parse_parse(body).ok()?;
                    let guard = self.rules.guard;
                    let passes = crate::session::checks::off_thread(parse.query.len(), || {
                        guard.check(parse.query).is_ok()
                    });
                    if !passes {
                        return None;
                    }
                    parsed.push((parse.name, parse.query));
                }
                b'B' => {
                    let bind = messages::parse_bind(body).ok()?;
                    if !unnamed_known(&parsed, bind.statement) {
                        return None;
                    }
                    let sql = match parsed
                        .iter()
                        .rev()
                        .find(|(name, _)| *name == bind.statement)
                    {
                        Some((_, query)) => Bytes::copy_from_slice(query),
                        None => self.statement_sql(bind.statement),
                    };
                    let params = self.audited_params(&bind).ok()?;
                    bound.push((bind.portal, (sql, params)));
                }
                b'D' => {
                    let (kind, name) = messages::parse_close_or_describe(body).ok()?;
                    if kind == b'S' && !unnamed_known(&parsed, name) {
                        return None;
                    }
                }
                b'H' => {}
                b'E' => {
                    let name = messages::parse_execute(body).ok()?;
                    return Some(match bound.into_iter().rev().find(|(p, _)| *p == name) {
                        Some((_, audited)) => audited,
                        None => self.portal_audited(name),
                    });
                }
                _ => return None,
            }
            at = end;
        }
    }

    /// Whether the client's buffered messages (`buf`), before the next
    /// `Sync` or `Flush`, hold an `Execute` of `portal`: its `query` record
    /// is then stored before any of them is sent (they go out together).
    pub(super) fn execute_follows(&self, portal: &[u8], buf: &[u8]) -> bool {
        let mut at = 0;
        while let Ok(Some(header)) = FrameHeader::peek(&buf[at..], self.max_message_size) {
            let end = at + header.total;
            if end > buf.len() {
                return false;
            }
            match header.tag {
                b'E' if messages::parse_execute(&buf[at + 5..end]).is_ok_and(|p| p == portal) => {
                    return true
                }
                b'S' | b'H' => return false,
                _ => {}
            }
            at = end;
        }
        false
    }

    /// The text of the client's statement `name`, as its portals record it.
    /// A name the gateway does not know (never parsed through it, made by
    /// an SQL-level `PREPARE`, or deallocated: the server reports an
    /// unknown one itself) is recorded as such, never with a guessed text.
    pub(super) fn statement_sql(&self, name: &[u8]) -> Bytes {
        match self.seq.names.statements.get(name) {
            Some(statement) => statement.sql.clone(),
            None => Bytes::from(format!(
                "-- prepared statement \"{}\" (not parsed through pgwarden: made by SQL-level PREPARE, or unknown)",
                String::from_utf8_lossy(name)
            )),
        }
    }

    /// The parameters of `bind` as its `query` record shows them: only
    /// with `log_parameters`.
    pub(super) fn audited_params(
        &self,
        bind: &BindView<'_>,
    ) -> Result<Option<Vec<Option<String>>>, ProtocolError> {
        if !self.log_parameters {
            return Ok(None);
        }
        bind.params_for_audit(self.carried.client_encoding())
            .map(Some)
    }

    /// What the `query` record of an `Execute` of portal `name` shows.
    pub(super) fn portal_audited(&self, name: &[u8]) -> Audited {
        let names = &self.seq.names;
        match names.portals.get(name).filter(|p| !names.may_be_gone(p)) {
            Some(p) => (p.sql.clone(), p.params.clone()),
            // A portal opened, or closed and opened again, by code the
            // gateway cannot see (a cursor a function returned), or one
            // already dropped: say which.
            None => (
                Bytes::from(format!(
                    "-- Execute of portal \"{}\" (unknown to pgwarden: opened by code it cannot see, or dropped)",
                    String::from_utf8_lossy(name)
                )),
                None,
            ),
        }
    }

    /// A query about to run that may close or open portals the gateway
    /// cannot follow (opaque code, which may close one and open another of
    /// the same name; an SQL `CLOSE`) makes it forget them all: an
    /// `Execute` of one is then recorded as unknown, never with the text of
    /// another that had its name.
    pub(super) fn forget_portals(&mut self, sql: &[u8], transparent: bool) {
        // Even with none known: the code may open some (`WITH HOLD`).
        if !transparent {
            self.seq.names.forget_portals();
            return;
        }
        // Mostly so: a client of simple queries has none.
        if !self.seq.names.portals.is_empty() && crate::session::state::closes_portals(sql) {
            self.seq.names.forget_portals();
        }
    }

    /// Remembers the cursors a statement about to run declares, so that an
    /// `Execute` of such a portal is recorded with the statement it runs.
    /// Not a name a bound portal holds: the `DECLARE` fails (the name is
    /// taken), and the portal stays what it was. Not a name an earlier
    /// `DECLARE` was noted under: that one may have failed, so which of
    /// the two holds it cannot be told, and it is forgotten. Nor any
    /// while the gateway may not know every portal (opaque code ran). Red
    /// teams rt41 and rt42 had a failing `DECLARE` lend its text to the
    /// portal of that name.
    pub(super) fn note_cursors(&mut self, sql: &Bytes) {
        if !self.auditing {
            return;
        }
        static HOLD: crate::identity::keywords::Keywords =
            crate::identity::keywords::Keywords::new(&["hold"]);
        if !self.seq.names.knows_every_portal() {
            return;
        }
        for (name, text) in crate::session::prepared::declared_cursors(sql) {
            let names = &self.seq.names;
            match names.portals.get(&name) {
                Some(bound) if !bound.noted && !names.may_be_gone(bound) => continue,
                Some(_) => {
                    self.seq.names.portals.remove(&name);
                    continue;
                }
                None => {}
            }
            let portal = Portal {
                sql: sql.slice_ref(text),
                holdable: HOLD.in_text(text),
                opaque: !crate::session::opaque::transparent(text),
                noted: true,
                ..Portal::default()
            };
            self.seq.names.open_portal(Bytes::from(name), portal);
        }
    }
}
