//! Server to client: framing the server's bytes, the transaction and COPY
//! state it reports, and routing through the tracker.

use bytes::BytesMut;

use super::*;
use crate::protocol::frame::{split_frame, FrameHeader, ProtocolError};
use crate::session::tracker::{CacheEffects, Resolved, Route};

impl Sequencer {
    /// Takes the next step through the server's buffered bytes: passes a
    /// large `DataRow` or `CopyData` through to the client unbuffered, or
    /// splits off a whole message.
    pub fn next_server(&mut self, rbuf: &mut BytesMut) -> Result<ServerStep, ProtocolError> {
        loop {
            if self.server_passthrough > 0 {
                match stream(
                    &mut self.server_passthrough,
                    rbuf,
                    Some(&mut self.to_client),
                ) {
                    true => continue,
                    false => return Ok(ServerStep::Idle),
                }
            }
            let Some(header) = FrameHeader::peek(rbuf, MAX_SERVER_FRAME)? else {
                return Ok(ServerStep::Idle);
            };
            if matches!(header.tag, b'D' | b'd')
                && header.total > STREAM_THRESHOLD
                && rbuf.len() < header.total
            {
                if header.tag == b'D' {
                    self.tracker.data_row();
                }
                let n = rbuf.len();
                self.to_client.extend_from_slice(&rbuf.split_to(n));
                self.server_passthrough = header.total - n;
                continue;
            }
            return Ok(match split_frame(rbuf, MAX_SERVER_FRAME)? {
                Some(frame) => ServerStep::Frame(frame),
                None => ServerStep::Idle,
            });
        }
    }

    /// Whole server messages only are between the bytes for the client (no
    /// frame is being streamed through): a notification may go in here.
    pub fn between_server_messages(&self) -> bool {
        self.server_passthrough == 0
    }

    /// One whole server message: updates the transaction and COPY state,
    /// routes it through the tracker (what it resolves goes to `resolved`,
    /// what it did to statements and portals to `cache`), and writes what
    /// the client sees.
    pub fn server_frame(
        &mut self,
        frame: &[u8],
        resolved: &mut Vec<Resolved>,
        cache: &mut CacheEffects,
    ) -> Route {
        let tag = frame[0];
        match tag {
            b'Z' if frame.len() == 6 => {
                self.tx_status = frame[5];
                self.code.ready(frame[5]);
                self.copy_in = false;
            }
            b'G' => {
                self.copy_in = true;
                self.copy_data_sent = false;
                // A COPY started by `Execute` ends at the first `Sync` the
                // client sends after the copy (any `Sync` before is ignored
                // by the server): until then nothing may be released.
                if self.tracker.front_is_execute() {
                    self.unsynced = true;
                }
            }
            _ => {}
        }
        // An error ends a copy-in (the server drops the client's copy
        // messages from now on); one the client did not cause.
        let copy_failed = tag == b'E' && std::mem::take(&mut self.copy_in);
        let route = self.tracker.on_server(tag, &frame[5..], resolved, cache);
        self.names.restore(cache);
        // A transaction ended: PostgreSQL has dropped its portals (a client
        // binding portals of new names, as pgjdbc does for each fetch, grew
        // the map for the session's life), but not those of Binds still in
        // flight (red team rt39: a client that never let its pipeline drain
        // kept every ended transaction's portals counted).
        if tag == b'Z' && self.tx_status == b'I' {
            let first_unanswered = self.tracker.first_unanswered_portal();
            self.names.end_transaction(first_unanswered);
            if self.tracker.is_empty() {
                self.names.forget_savepoints();
            }
        }
        if self.tracker.is_empty() {
            self.copy_maybe = false;
            if tag == b'Z' {
                self.code.settled(self.tx_status);
            }
        }
        if tag == b'E' && self.tracker.server_skips() {
            // The server skips what the client sends until its `Sync`, and
            // answers none of it: so does the gateway. A query sent after
            // the failed message did not end the batch.
            self.discard_until_sync = true;
            self.unsynced = true;
        }
        if copy_failed && !self.copy_data_sent {
            // It failed before reading anything: it would have read the
            // `Sync`s the client sent during the copy after the failure,
            // and answered them. They go now.
            self.release_copy_syncs();
        }
        if copy_failed {
            self.copy_syncs = 0;
        }
        match &route {
            Route::Forward => self.to_client.extend_from_slice(frame),
            Route::Drop => {}
            Route::Replace(error) => error.encode(&mut self.to_client),
        }
        self.emit_synthetic();
        route
    }
}
