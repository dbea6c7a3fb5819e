//! Client to server: framing the client's bytes, what each message does to
//! the protocol state, refusals.

use bytes::BytesMut;

use super::*;
use crate::protocol::frame::{split_frame, FrameHeader, ProtocolError};

impl Sequencer {
    /// Takes the next step through the client's buffered bytes: passes a
    /// large `CopyData` through to the server unbuffered, stops at a
    /// message that must wait (`opaque`: the bound connection ran code the
    /// gateway cannot see, see [`Self::must_wait`]), or splits off a whole
    /// message.
    pub fn next_client(
        &mut self,
        rbuf: &mut BytesMut,
        max: usize,
        opaque: bool,
    ) -> Result<ClientStep, ProtocolError> {
        loop {
            if self.client_passthrough > 0 {
                match stream(
                    &mut self.client_passthrough,
                    rbuf,
                    Some(&mut self.to_server),
                ) {
                    true => {
                        self.client_messages += u64::from(self.client_passthrough == 0);
                        continue;
                    }
                    false => return Ok(ClientStep::Idle),
                }
            }
            if self.client_discard > 0 {
                match stream(&mut self.client_discard, rbuf, None) {
                    true => {
                        self.client_messages += u64::from(self.client_discard == 0);
                        continue;
                    }
                    false => return Ok(ClientStep::Idle),
                }
            }
            let Some(header) = FrameHeader::peek(rbuf, max)? else {
                return Ok(ClientStep::Idle);
            };
            let buffered = &rbuf[..header.total.min(rbuf.len())];
            let whole = buffered.len() == header.total;
            if self.must_wait(header.tag, opaque) || self.drops_names_early(buffered, whole) {
                self.deferred = true;
                if self.copy_in {
                    // A request in the middle of a copy into the server:
                    // PostgreSQL would fail the copy and lose the message
                    // (or, had the copy failed already, run it). The
                    // gateway fails the copy and runs the request once the
                    // server has answered (forwarded now, it could run
                    // unaudited or never be answered).
                    self.fail_copy(&format!(
                        "unexpected message type 0x{:02X} during COPY from stdin",
                        header.tag
                    ));
                }
                // PostgreSQL sends the answers to extended messages only at
                // `Sync` or `Flush`: without one, those the gateway waits
                // for would never come.
                if self.unsynced {
                    messages::flush(self.wire());
                }
                return Ok(ClientStep::Idle);
            }
            if header.tag == b'd' && header.total > STREAM_THRESHOLD && rbuf.len() < header.total {
                let n = rbuf.len();
                let data = rbuf.split_to(n);
                match self.copy_in && self.bound {
                    true => {
                        self.to_server.extend_from_slice(&data);
                        self.client_passthrough = header.total - n;
                        self.copy_data_sent = true;
                    }
                    // Outside a copy the server would ignore it: it goes
                    // nowhere, holding no connection while it arrives.
                    false => self.client_discard = header.total - n,
                }
                continue;
            }
            return Ok(match split_frame(rbuf, max)? {
                Some(frame) => {
                    self.client_messages += 1;
                    ClientStep::Frame(frame.freeze())
                }
                None => ClientStep::Idle,
            });
        }
    }

    /// Whether a client message with `tag` must wait for the server: the
    /// bound connection ran opaque code, the message starts a new request
    /// (a `Query` or `FunctionCall`, or the first extended message after a
    /// `Sync`), no copy is in progress (the server waits for the client
    /// then), and the server has not answered everything before it. Such a
    /// request may start a new transaction, which must not run before the
    /// identity is asserted afresh.
    fn must_wait(&self, tag: u8, opaque: bool) -> bool {
        if self.copy_in && self.bound && !matches!(tag, b'd' | b'c' | b'f' | b'H' | b'S') {
            return true;
        }
        if self.copy_maybe && !self.copy_in && self.bound && !self.tracker.is_empty() {
            return true;
        }
        opaque
            && self.bound
            && self.starts_request(tag)
            && !self.copy_in
            && !self.tracker.is_empty()
    }

    /// Whether `frame` (a client message, perhaps not all buffered yet)
    /// drops statement names (a `Close` of a statement, a `DEALLOCATE`)
    /// while the server still owes answers: it waits until they are in.
    /// The gateway applies such a message to the client's names when it
    /// handles it, and answers some itself; sent behind a message that
    /// fails, PostgreSQL would skip it and keep the statement.
    /// `whole`: all of `frame` is buffered.
    fn drops_names_early(&self, frame: &[u8], whole: bool) -> bool {
        if !self.bound || self.copy_in || self.tracker.is_empty() {
            return false;
        }
        match frame.first() {
            Some(b'C') => frame.get(5) == Some(&b'S'),
            Some(b'Q') => whole && crate::session::state::deallocates(&frame[5..]),
            _ => false,
        }
    }

    fn starts_request(&self, tag: u8) -> bool {
        match tag {
            b'Q' | b'F' => true,
            b'P' | b'B' | b'D' | b'C' | b'E' | b'S' => !self.unsynced,
            _ => false,
        }
    }

    /// Whether a whole client message is handled at all (false: skipped
    /// until `Sync`, as the server skips after an error). When the client
    /// was told its transaction is aborted by a refusal the server did not
    /// see ([`Self::refuse`]) and `frame` starts its next request: a simple
    /// query starting with `ROLLBACK` (or `ROLLBACK TO SAVEPOINT`,
    /// `rolls_back`) goes to the server as it is, since the server's open
    /// transaction ends (or rewinds) the same way; a lone `Sync` is
    /// answered `E`; anything else is preceded by a statement that fails,
    /// so the server answers it exactly as PostgreSQL answers in an aborted
    /// transaction (25P02, `ROLLBACK` for `COMMIT`).
    pub fn admit(&mut self, frame: &[u8], rolls_back: impl FnOnce(&[u8]) -> bool) -> bool {
        let tag = frame[0];
        if self.discard_until_sync && tag != b'S' {
            return false;
        }
        let starts_request = match tag {
            b'Q' | b'F' => true,
            b'P' | b'B' | b'D' | b'C' | b'E' | b'S' => !self.unsynced && !self.discard_until_sync,
            _ => false,
        };
        if !self.aborted_locally || !starts_request {
            return true;
        }
        if tag == b'S' {
            self.local_sync = true;
            return true;
        }
        self.aborted_locally = false;
        // Only a simple query runs what it says at once: a `Parse` or
        // `Bind` of `ROLLBACK` may be followed by anything before it runs.
        if !(tag == b'Q' && messages::parse_query(&frame[5..]).is_ok_and(rolls_back)) {
            self.own_query(REFUSED_SQL);
        }
        true
    }

    /// A simple query of the gateway's own on the bound connection, whose
    /// answers the client never sees.
    pub fn own_query(&mut self, sql: &str) {
        self.own_query_unregistered(sql);
        self.tracker.injected();
    }

    /// A simple query of the gateway's own, whose answers the caller
    /// registers ([`Self::expect`]). PostgreSQL drops the connection's
    /// unnamed statement for any simple query.
    pub fn own_query_unregistered(&mut self, sql: &str) {
        messages::query(self.wire(), sql);
        self.unnamed_here = false;
    }

    /// A `Parse` that fails on the server (aborting as PostgreSQL would),
    /// standing for a refused or abandoned message; it replaces the
    /// connection's unnamed statement.
    fn failing_parse(&mut self) {
        messages::parse(self.wire(), REFUSED_SQL);
        self.unnamed_here = false;
    }

    /// A `Sync` from the client.
    /// Answered by the gateway when the batch's error was its own or
    /// nothing ran on a server; forwarded otherwise.
    pub fn sync(&mut self) {
        if !self.code.confirmed_block() {
            self.names.may_end_transaction();
        }
        self.code.sync();
        self.discard_until_sync = false;
        if self.local_sync || (!self.bound && self.tracker.is_empty()) {
            self.local_sync = false;
            messages::ready_for_query(&mut self.to_client, self.tx_status);
            return;
        }
        self.send_sync();
    }

    /// A `Sync` to the server: it ends the batch and is answered.
    fn send_sync(&mut self) {
        self.discard_until_sync = false;
        messages::sync(self.wire());
        self.tracker.sync();
        self.unsynced = false;
    }

    /// A client message the gateway does not interpret: `Flush`, and the
    /// COPY messages. Outside COPY with no connection bound, PostgreSQL
    /// would ignore them, and so does the gateway. A `Sync` during copy-in
    /// goes nowhere: the server ignores it while it copies, but answers it
    /// once the copy failed, which the gateway cannot know when it sends
    /// it (its answer would then be taken for another request's).
    /// Copy messages outside a copy go nowhere either: the server ignores
    /// them, and a request that may start a copy holds them back until the
    /// server says whether it did ([`Sequencer::copy_maybe`]). A `Sync`
    /// during the copy waits for its outcome ([`Sequencer::copy_syncs`]).
    pub fn pass(&mut self, frame: &[u8]) {
        let tag = frame[0];
        if tag == b'S' && self.copy_in {
            self.copy_syncs += 1;
            return;
        }
        if !self.bound || (matches!(tag, b'd' | b'c' | b'f') && !self.copy_in) {
            return;
        }
        match tag {
            b'c' | b'f' => {
                self.copy_in = false;
                self.copy_syncs = 0;
            }
            b'd' => self.copy_data_sent = true,
            _ => {}
        }
        self.forward(frame);
    }

    /// Forwards the `Sync`s held during a copy the server failed.
    pub(super) fn release_copy_syncs(&mut self) {
        for _ in 0..std::mem::take(&mut self.copy_syncs) {
            self.send_sync();
        }
    }

    /// Answers a client message with `error` instead of running it.
    ///
    /// When nothing is in flight, the gateway answers by itself; inside a
    /// transaction the client is told it is aborted (`E`) while the server's
    /// transaction stays open and untouched, until the client's next
    /// request ([`Self::admit`]). So a refusal leaves no error in the
    /// server's log unless the client goes on inside the aborted
    /// transaction.
    ///
    /// With requests in flight (a pipeline) the server's transaction state
    /// at this point is not known yet: the message is replaced by one that
    /// fails, so the server aborts exactly as PostgreSQL would.
    pub fn refuse(&mut self, flow: Flow, error: PgError) {
        if self.bound && !self.in_flight() {
            error.encode(&mut self.to_client);
            if self.tx_status == b'T' {
                self.tx_status = b'E';
                self.aborted_locally = true;
            }
            match flow {
                Flow::Simple => messages::ready_for_query(&mut self.to_client, self.tx_status),
                Flow::Extended => {
                    self.discard_until_sync = true;
                    self.local_sync = true;
                }
            }
            return;
        }
        match (flow, self.bound) {
            (Flow::Simple, true) => {
                // A query, as the refused one was: it ends a batch open
                // before it, as that one would have.
                self.own_query_unregistered(REFUSED_SQL);
                self.unsynced = false;
                self.tracker.query(None, Some(error));
            }
            (Flow::Simple, false) => {
                error.encode(&mut self.to_client);
                messages::ready_for_query(&mut self.to_client, self.tx_status);
            }
            (Flow::Extended, true) => {
                self.failing_parse();
                self.tracker.blocked_parse(error);
                self.unsynced = true;
                self.discard_until_sync = true;
            }
            (Flow::Extended, false) => {
                error.encode(&mut self.to_client);
                self.discard_until_sync = true;
                self.local_sync = true;
            }
        }
    }

    /// Ends an extended batch the client never synced so that it does not
    /// commit (PostgreSQL, seeing the client go, would abort it): a `Parse`
    /// that fails makes the server abort the batch's transaction and skip
    /// to the `Sync` that follows. True when there was one.
    pub fn abort_unsynced(&mut self, error: PgError) -> bool {
        if !self.unsynced {
            return false;
        }
        self.failing_parse();
        self.tracker.blocked_parse(error);
        self.send_sync();
        true
    }

    /// The client left in the middle of a COPY into the server: the server
    /// is told it failed. True when one was in progress.
    pub fn fail_copy(&mut self, why: &str) -> bool {
        if !self.copy_in {
            return false;
        }
        messages::copy_fail(self.wire(), why);
        self.copy_in = false;
        self.copy_syncs = 0;
        true
    }

    /// Writes the answers of gateway-made entries now at the front of the
    /// tracker (after a client message was handled).
    pub fn emit_synthetic(&mut self) {
        self.tracker
            .emit_synthetic(self.tx_status, &mut self.to_client);
    }
}
