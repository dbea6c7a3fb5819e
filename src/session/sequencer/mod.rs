//! The relay's protocol state, without I/O: which client bytes are a whole
//! message, streamed through or must wait; what the server still owes
//! (the [`Tracker`]); the transaction status; the skip-to-`Sync` rules
//! after an error; COPY; the bytes to write each way; and when the server
//! connection may be released.
//!
//! It lives in the session's core (`session::core`), which plans each
//! message around it; the relay (`session::relay`) reads the sockets and
//! hands it what arrived (framing: [`ClientStep`], [`ServerStep`]), and
//! writes the bytes it holds ([`Sequencer::to_server`],
//! [`Sequencer::client_out`]). Nothing here awaits, so every rule is unit
//! tested without PostgreSQL (`tests.rs`, and `model_tests.rs`, which
//! drives the core around it against a model of the server).
//!
//! Invariants:
//! - bytes for the server are accepted only while a connection is bound
//!   ([`Sequencer::bound`], called by the relay once the client's identity
//!   is asserted on it): a message can never reach a connection that does
//!   not carry the client's identity, whatever path wrote it;
//! - the connection is releasable only when every `Query`, `FunctionCall`
//!   and `Sync` it was sent has had its `ReadyForQuery`, the last one said
//!   idle, nothing extended is unsynced, no COPY is in progress and no
//!   client frame is half streamed through;
//! - after an error the client's messages up to `Sync` are skipped, as the
//!   server skips them.

mod client;
mod code;
mod names;
mod server;

pub use code::{Code, Marking, COMMIT_THEN_MORE};
pub use names::{logged_size, Names};

use bytes::{Bytes, BytesMut};

use crate::protocol::messages::{self, PgError};
use crate::session::tracker::Tracker;

/// Text sent in place of a refused statement: it fails at parse time, so the
/// server aborts exactly as it would for a refused statement of its own.
pub const REFUSED_SQL: &str = "pgwarden refused this statement";
/// Larger row and copy frames are streamed through instead of buffered
/// whole: the length of a large message (`session::budget`).
pub const STREAM_THRESHOLD: usize = crate::session::budget::LARGE;
/// The largest server message the gateway accepts.
pub const MAX_SERVER_FRAME: usize = 1 << 30;

/// Which kind of client message a refusal answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// `Query` or `FunctionCall`: one error, then `ReadyForQuery`.
    Simple,
    /// Extended protocol: one error, then everything up to `Sync` is skipped.
    Extended,
}

/// What to do with the client's buffered bytes.
#[derive(Debug)]
pub enum ClientStep {
    /// A whole message to handle.
    Frame(Bytes),
    /// Nothing more to take now: the buffer holds no whole message, or the
    /// next one waits for the server ([`Sequencer::deferred`]).
    Idle,
}

/// What to do with the server's buffered bytes.
#[derive(Debug)]
pub enum ServerStep {
    /// A whole message for [`Sequencer::server_frame`].
    Frame(BytesMut),
    /// Nothing more to take now.
    Idle,
}

/// The state itself.
#[derive(Debug)]
pub struct Sequencer {
    tracker: Tracker,
    /// Transaction status from the last `ReadyForQuery` (or the client's
    /// view after a refusal the server did not see).
    tx_status: u8,
    /// Extended-protocol messages were forwarded since the last `Sync`.
    unsynced: bool,
    /// Skipping client messages until `Sync`, as the server does after an error.
    discard_until_sync: bool,
    /// The next `Sync` is answered by the gateway (the error was local).
    local_sync: bool,
    /// The server is in copy-in (`CopyInResponse` seen, the client has not
    /// sent `CopyDone`/`CopyFail` yet).
    copy_in: bool,
    /// The client was told its transaction is aborted (a refusal), but the
    /// server's transaction is still open and healthy
    /// ([`Sequencer::admit`]).
    aborted_locally: bool,
    /// Client frames wait in the read buffer until the server has answered
    /// everything before them.
    deferred: bool,
    /// A request was forwarded that may start a COPY from the client, and
    /// the server has not answered everything yet: until it says a copy
    /// started (or the answers end), nothing more goes out. Whether the
    /// server ignores a `Sync` or answers it depends on whether it reads it
    /// during the copy, which only its answer tells.
    copy_maybe: bool,
    /// Bytes of a large client frame still to pass through unbuffered.
    client_passthrough: usize,
    /// Bytes of a large `CopyData` sent outside any copy still to drop.
    client_discard: usize,
    /// `Sync`s the client sent during copy-in, not forwarded: PostgreSQL
    /// ignores one it reads while it copies, and answers one it reads after
    /// the copy failed. If the server fails the copy before any data went
    /// (COPY into a view, say: it fails before reading anything), they go
    /// then and are answered; otherwise (it read them while copying) they
    /// go nowhere.
    copy_syncs: usize,
    /// `CopyData` went to the server in the current copy.
    copy_data_sent: bool,
    /// Bytes of a large server frame still to pass through unbuffered.
    server_passthrough: usize,
    /// A server connection carrying the client's identity is bound.
    bound: bool,
    /// The client created connection-bound objects (temp tables, LISTEN,
    /// session advisory locks...): it keeps its server connection until it
    /// disconnects.
    pinned: bool,
    /// The bound connection holds the client's unnamed statement (parsed
    /// on it since it was bound). Anything the gateway sends of its own
    /// drops or replaces it, and the client's is parsed again before use.
    unnamed_here: bool,
    to_server: BytesMut,
    to_client: BytesMut,
    /// Client messages taken whole so far (a streamed `CopyData` when its
    /// last byte is): what the idle timers count as the client moving.
    client_messages: u64,
    /// The client's statements and portals by its names.
    pub names: Names,
    /// Where code pgwarden cannot see into ran.
    pub code: Code,
    /// Bytes written for a server while none was bound: never sent. Only a
    /// bug writes here; the relay then ends the session
    /// ([`Sequencer::misrouted`]).
    void: BytesMut,
}

impl Default for Sequencer {
    fn default() -> Self {
        Sequencer {
            tracker: Tracker::default(),
            tx_status: b'I',
            unsynced: false,
            discard_until_sync: false,
            local_sync: false,
            copy_in: false,
            aborted_locally: false,
            deferred: false,
            copy_maybe: false,
            client_passthrough: 0,
            client_discard: 0,
            copy_syncs: 0,
            copy_data_sent: false,
            server_passthrough: 0,
            bound: false,
            pinned: false,
            unnamed_here: false,
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            client_messages: 0,
            names: Names::default(),
            code: Code::default(),
            void: BytesMut::new(),
        }
    }
}

impl Sequencer {
    /// A session's sequencer, knowing whether its startup settings already
    /// run code pgwarden cannot see into.
    pub fn with_code(mut self, code: Code) -> Self {
        self.code = code;
        self
    }

    // ----- the connection ---------------------------------------------------

    /// A connection is bound, and carries the client's identity: from now
    /// on client messages may be written for it. The relay calls this only
    /// after the identity assertion succeeded (or found it in place).
    pub fn bound(&mut self) {
        self.bound = true;
    }

    /// The connection was released or lost: nothing more is written for it,
    /// and what it still owed is forgotten (the relay has recorded it).
    pub fn unbound(&mut self) {
        self.bound = false;
        self.unnamed_here = false;
        self.to_server.clear();
    }

    /// The bound connection was lost and what it owed was answered as a
    /// failed batch: the client's transaction status is now `status`.
    /// Client frames are read again; a refusal the server never saw is
    /// forgotten (the relay puts the next connection into the aborted block
    /// instead); the rest of an unsynced batch is skipped to its `Sync`, as
    /// the server skips after an error, and that `Sync` answered here.
    pub fn connection_lost(&mut self, status: u8) {
        self.unbound();
        self.tracker = Tracker::default();
        self.tx_status = status;
        self.code.ready(status);
        self.code.settled(status);
        self.deferred = false;
        self.copy_maybe = false;
        self.aborted_locally = false;
        if std::mem::take(&mut self.unsynced) {
            self.discard_until_sync = true;
            self.local_sync = true;
        }
    }

    /// The client's unnamed statement is now parsed on the bound connection.
    pub fn unnamed_parsed(&mut self) {
        self.unnamed_here = true;
    }

    /// The bound connection's unnamed statement is no longer the client's
    /// (the gateway ran something of its own on it).
    pub fn unnamed_lost(&mut self) {
        self.unnamed_here = false;
    }

    pub fn unnamed_here(&self) -> bool {
        self.unnamed_here
    }

    pub fn is_bound(&self) -> bool {
        self.bound
    }

    /// The buffer of bytes for the bound server connection. With none
    /// bound, what is written goes nowhere, and [`Self::misrouted`] says so:
    /// writing for a connection that does not carry the client's identity is
    /// a bug, and the session ends rather than send it anywhere.
    pub fn wire(&mut self) -> &mut BytesMut {
        match self.bound {
            true => &mut self.to_server,
            false => &mut self.void,
        }
    }

    /// Something was written for a server while none was bound (a bug):
    /// the session must end.
    pub fn misrouted(&self) -> bool {
        !self.void.is_empty()
    }

    /// Forwards a client message as it is (the caller registered what the
    /// server will answer, if anything).
    pub fn forward(&mut self, frame: &[u8]) {
        self.wire().extend_from_slice(frame);
    }

    /// Forwards a `Query` or `FunctionCall`. One sent inside an extended
    /// batch ends it (PostgreSQL commits the batch's implicit transaction
    /// with the query's), unless the server skips it after an error in the
    /// batch ([`Sequencer::server_frame`] says the batch is open again).
    pub fn forward_simple(&mut self, frame: &[u8]) {
        self.forward(frame);
        self.unsynced = false;
    }

    /// Forwards an extended-protocol message: the batch is unsynced until
    /// its `Sync`.
    pub fn forward_extended(&mut self, frame: &[u8]) {
        self.forward(frame);
        self.unsynced = true;
    }

    /// A gateway-made extended message went out in the client's batch.
    pub fn sent_extended(&mut self) {
        self.unsynced = true;
    }

    /// Bytes waiting for the server connection.
    pub fn to_server(&self) -> &[u8] {
        &self.to_server
    }

    pub fn clear_to_server(&mut self) {
        self.to_server.clear();
    }

    /// Bytes waiting for the client.
    pub fn client_out(&mut self) -> &mut BytesMut {
        &mut self.to_client
    }

    /// What the server will owe for the messages written: register each
    /// one sent (or answered by the gateway) here, in order.
    pub fn expect(&mut self) -> &mut Tracker {
        &mut self.tracker
    }

    // ----- state ------------------------------------------------------------

    pub fn tx_status(&self) -> u8 {
        self.tx_status
    }

    /// The server owes nothing for what it was sent.
    pub fn owes_nothing(&self) -> bool {
        self.tracker.is_empty()
    }

    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// Skipping client messages until `Sync`.
    pub fn discarding(&self) -> bool {
        self.discard_until_sync
    }

    /// A large client frame is half passed through.
    pub fn streaming_from_client(&self) -> bool {
        self.client_passthrough > 0
    }

    /// Client messages taken whole so far.
    pub fn client_messages(&self) -> u64 {
        self.client_messages
    }

    /// The client's buffer holds the rest of a `CopyData` being passed on
    /// or dropped, not the start of a message.
    pub fn raw_from_client(&self) -> bool {
        self.client_passthrough > 0 || self.client_discard > 0
    }

    /// Gives back the memory the wire buffers grew to for a large message.
    pub fn shrink_buffers(&mut self) {
        crate::session::budget::shrink(&mut self.to_server);
        crate::session::budget::shrink(&mut self.to_client);
    }

    /// Client frames wait for the server.
    pub fn deferred(&self) -> bool {
        self.deferred
    }

    /// Client frames may be read again (the server answered everything, or
    /// the client is gone).
    pub fn resume(&mut self) {
        self.deferred = false;
    }

    /// Whether deferred client frames may be read again: the server
    /// answered everything, or it started a copy and waits for the client.
    pub fn may_resume(&self) -> bool {
        self.deferred && (self.tracker.is_empty() || self.copy_in)
    }

    /// The request just forwarded (a `Query` or an `Execute`) may start a
    /// COPY from the client ([`Sequencer::copy_maybe`]).
    pub fn may_copy_in(&mut self) {
        self.copy_maybe = true;
    }

    /// Messages are in flight: the server's transaction state at this
    /// point is not known yet.
    pub fn in_flight(&self) -> bool {
        !self.tracker.is_empty() || self.unsynced || self.copy_in
    }

    /// No transaction or message exchange is in progress (or no connection
    /// is bound at all).
    pub fn idle(&self) -> bool {
        !self.bound
            || (self.tracker.is_empty()
                && !self.unsynced
                && self.tx_status == b'I'
                && !self.copy_in
                && self.client_passthrough == 0)
    }

    /// The bound connection may go back to the pool: it is idle outside a
    /// transaction, owes the client nothing, and the client is not pinned
    /// to it. (In session pooling the relay never releases it.)
    pub fn releasable(&self) -> bool {
        self.bound && !self.pinned && self.idle()
    }

    /// The client keeps its connection until it disconnects.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Statements still waiting for the server, taken out (see
    /// `Tracker::take_pendings`).
    pub fn take_pendings(&mut self) -> Vec<crate::session::tracker::Pending> {
        self.tracker.take_pendings()
    }

    /// The client keeps its connection from now on ([`Sequencer::pinned`]).
    /// True the first time.
    pub fn pin(&mut self) -> bool {
        !std::mem::replace(&mut self.pinned, true)
    }

    /// Between transactions on the bound connection: a new transaction
    /// starts with the next request.
    pub fn between_transactions(&self) -> bool {
        self.tx_status == b'I' && self.tracker.is_empty() && !self.unsynced
    }

    /// Everything the server still owed, for when the connection is lost
    /// or abandoned.
    pub fn drain(&mut self) -> Vec<crate::session::tracker::Pending> {
        self.tracker.drain()
    }
}

#[cfg(test)]
mod model_pg_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod paths_tests;
/// Moves what `rbuf` holds of a frame being streamed through (`remaining`
/// bytes of it) to `out`, or drops it when there is no `out`. False when
/// `rbuf` held none of it.
fn stream(remaining: &mut usize, rbuf: &mut BytesMut, out: Option<&mut BytesMut>) -> bool {
    let n = (*remaining).min(rbuf.len());
    if n == 0 {
        return false;
    }
    let taken = rbuf.split_to(n);
    if let Some(out) = out {
        out.extend_from_slice(&taken);
    }
    *remaining -= n;
    true
}

#[cfg(test)]
mod tests;
