//! The property test: the sequencer driven by random well-formed clients
//! against a model of PostgreSQL's protocol rules.

use proptest::prelude::*;

use super::tests::{
    b, cc, client, copy_data, copy_done, copy_fail, d, e, err, fcall, frame, h, p, q, s, server, z,
    Driver,
};
use super::*;

/// What a model PostgreSQL does with each message, by the protocol's rules:
/// statements named by their text (`BEGIN`, `COMMIT`, `ROLLBACK`, `FAIL`,
/// `COPY IN`, `COPY OUT`, anything else returns a row), errors skip to
/// `Sync` in the extended protocol, an implicit transaction ends at `Sync`.
#[derive(Default)]
struct ModelServer {
    out: Vec<u8>,
    /// Answers not sent yet ([`ModelServer::send`]).
    unflushed: Vec<u8>,
    tx: Tx,
    explicit: bool,
    ignore_till_sync: bool,
    /// `Some(extended)` during copy-in.
    copy_in: Option<bool>,
    /// The last parsed statement's text (what the next `Execute` runs).
    parsed: String,
    /// Extended messages since the last `Sync`.
    unsynced: bool,
    /// The connection carries the client's identity.
    asserted: bool,
    /// The gateway must not start a request while the server still owes
    /// answers (the connection ran opaque code); `owed_elsewhere`: answers
    /// are in the gateway's read buffer, not read yet.
    strict: bool,
    owed_elsewhere: bool,
    /// A request started while answers were owed (with `strict`).
    early_request: bool,
    /// The last message was the gateway's failing query ahead of a request.
    refused_ahead: bool,
    inbox: Vec<u8>,
}

#[derive(Default, Clone, Copy, PartialEq, Debug)]
enum Tx {
    #[default]
    Idle,
    Open,
    Failed,
}

impl ModelServer {
    fn status(&self) -> u8 {
        match self.tx {
            Tx::Idle => b'I',
            Tx::Open => b'T',
            Tx::Failed => b'E',
        }
    }

    /// PostgreSQL buffers its answers and sends them at `ReadyForQuery`,
    /// `CopyInResponse` (it then waits for the client), an error, or the
    /// client's `Flush`: a gateway that waits for an answer the server
    /// keeps would wait for ever.
    fn send(&mut self, bytes: Vec<u8>) {
        let flushes = matches!(bytes[0], b'Z' | b'G' | b'E');
        self.unflushed.extend(bytes);
        if flushes {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.out.append(&mut self.unflushed);
    }

    fn receive(&mut self, bytes: &[u8]) {
        assert!(
            self.asserted,
            "a message reached a connection without the client's identity"
        );
        self.inbox.extend_from_slice(bytes);
        while self.inbox.len() >= 5 {
            let len =
                i32::from_be_bytes([self.inbox[1], self.inbox[2], self.inbox[3], self.inbox[4]])
                    as usize;
            if self.inbox.len() < 1 + len {
                break;
            }
            let msg: Vec<u8> = self.inbox.drain(..1 + len).collect();
            self.message(&msg);
        }
    }

    fn text(msg: &[u8], skip: usize) -> String {
        let body = &msg[5 + skip..];
        let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
        String::from_utf8_lossy(&body[..end]).into_owned()
    }

    fn message(&mut self, msg: &[u8]) {
        let tag = msg[0];
        let starts_request = matches!(tag, b'Q' | b'F')
            || (matches!(tag, b'P' | b'B' | b'D' | b'C' | b'E' | b'S') && !self.unsynced);
        let owed = !self.out.is_empty() || self.owed_elsewhere;
        // The failing query the gateway sends ahead of a request in a
        // transaction it told the client is aborted goes with that request:
        // it cannot end the transaction.
        let ahead = std::mem::take(&mut self.refused_ahead);
        if self.strict && self.copy_in.is_none() && starts_request && owed && !ahead {
            self.early_request = true;
        }
        if tag == b'Q' && Self::text(msg, 0).starts_with("pgwarden refused") && !owed {
            self.refused_ahead = true;
        }
        if let Some(extended) = self.copy_in {
            match tag {
                b'c' | b'f' => {
                    self.copy_in = None;
                    match tag {
                        b'c' => self.send(cc("COPY 1")),
                        _ => self.fail(extended),
                    }
                    if !extended {
                        self.end_simple();
                    }
                }
                // A bad row: the copy fails, and what the client sends for
                // it from now on is dropped.
                b'd' if msg[5..].starts_with(b"bad") => {
                    self.copy_in = None;
                    self.fail(extended);
                    if !extended {
                        self.end_simple();
                    }
                }
                _ => {} // CopyData, Flush, Sync: ignored during copy-in
            }
            return;
        }
        if tag == b'S' {
            self.ignore_till_sync = false;
            self.unsynced = false;
            if !self.explicit {
                self.tx = Tx::Idle;
            }
            self.send(z(self.status()));
            return;
        }
        if self.ignore_till_sync {
            return;
        }
        match tag {
            b'Q' => {
                // A query ends an extended batch open before it.
                self.unsynced = false;
                let sql = Self::text(msg, 0);
                self.statement(&sql, false);
                if self.copy_in.is_none() {
                    self.end_simple();
                }
            }
            b'F' => {
                self.unsynced = false;
                self.send(frame(b'V', &[0, 0, 0, 1, b'1']));
                self.send(z(self.status()));
            }
            b'P' => {
                self.unsynced = true;
                self.parsed = Self::text(msg, 1);
                self.begin_implicit();
                if self.parsed.starts_with("FAIL") || self.parsed.starts_with("pgwarden refused") {
                    self.fail(true);
                } else {
                    self.send(frame(b'1', b""));
                }
            }
            b'B' => {
                self.unsynced = true;
                self.send(frame(b'2', b""));
            }
            b'D' => {
                self.unsynced = true;
                self.send(frame(b'n', b""));
            }
            b'C' => {
                self.unsynced = true;
                self.send(frame(b'3', b""));
            }
            b'E' => {
                self.unsynced = true;
                let sql = self.parsed.clone();
                self.statement(&sql, true);
            }
            b'H' => self.flush(),
            b'd' | b'c' | b'f' => {}
            other => panic!("model server: unexpected message {}", other as char),
        }
    }

    fn begin_implicit(&mut self) {
        if self.tx == Tx::Idle {
            self.tx = Tx::Open;
        }
    }

    /// An error: an explicit transaction, or an extended batch's implicit
    /// one, is aborted (the batch skips to `Sync`); a simple query's
    /// implicit one ends at its `ReadyForQuery`.
    fn fail(&mut self, extended: bool) {
        self.send(err("22012"));
        if self.explicit || extended {
            self.tx = Tx::Failed;
        }
        if extended {
            self.ignore_till_sync = true;
        }
    }

    /// The end of a simple query: its implicit transaction, if any, ends.
    fn end_simple(&mut self) {
        if !self.explicit {
            self.tx = Tx::Idle;
        }
        self.send(z(self.status()));
    }

    fn statement(&mut self, sql: &str, extended: bool) {
        if self.tx == Tx::Failed && sql != "ROLLBACK" {
            self.send(err("25P02"));
            if extended {
                self.ignore_till_sync = true;
            }
            return;
        }
        match sql {
            "BEGIN" => {
                // Inside a transaction: a warning, and the transaction goes on.
                self.explicit = true;
                self.tx = Tx::Open;
                self.send(cc("BEGIN"));
            }
            "COMMIT" | "ROLLBACK" => {
                self.explicit = false;
                self.tx = if extended { Tx::Open } else { Tx::Idle };
                self.send(cc(sql));
            }
            "FAIL" | "pgwarden refused this statement" => self.fail(extended),
            "COPY t FROM STDIN" => {
                self.begin_implicit();
                self.copy_in = Some(extended);
                self.send(frame(b'G', &[0, 0, 0]));
            }
            "COPY OUT" => {
                self.send(frame(b'H', &[0, 0, 0]));
                self.send(frame(b'd', b"row\n"));
                self.send(frame(b'c', b""));
                self.send(cc("COPY 1"));
            }
            _ => {
                if extended {
                    self.begin_implicit();
                }
                self.send(frame(b'D', b"\0\0"));
                self.send(cc("SELECT 1"));
            }
        }
    }

    /// Owes the client nothing, is outside any transaction and batch.
    fn idle(&self) -> bool {
        self.out.is_empty()
            && self.unflushed.is_empty()
            && self.inbox.is_empty()
            && self.tx == Tx::Idle
            && !self.unsynced
            && self.copy_in.is_none()
            && !self.ignore_till_sync
    }
}

/// A well-formed client request.
#[derive(Debug, Clone)]
enum Request {
    Simple(&'static str),
    /// A COPY IN with its data, sent without waiting for the server:
    /// `extended` (by `Execute`, with a `Sync` before the data when
    /// `early_sync`), ended by `CopyDone` (`done`) or `CopyFail`, the data
    /// large enough to be streamed through when `large`.
    CopyIn {
        extended: bool,
        early_sync: bool,
        done: bool,
        large: bool,
        /// A row the server refuses, then a `Sync` (which the server answers
        /// once the copy failed).
        bad: bool,
    },
    /// An extended batch: (statement, describe) per Execute, then Flush or
    /// Sync (or neither: the batch goes on with the next request).
    Batch(Vec<(&'static str, bool)>, Option<bool>),
    FunctionCall,
    /// A statement the gateway refuses: a simple query, or a batch whose
    /// `Parse` is refused (then `Bind`, `Execute`, `Sync`).
    Refused(bool),
}

fn request() -> impl Strategy<Value = Request> {
    let sql = prop::sample::select(vec![
        "SELECT 1", "BEGIN", "COMMIT", "ROLLBACK", "FAIL", "COPY OUT",
    ]);
    prop_oneof![
        3 => sql.clone().prop_map(Request::Simple),
        2 => (any::<bool>(), any::<bool>(), any::<bool>(), prop::bool::weighted(0.1), any::<bool>())
            .prop_map(|(extended, early_sync, done, large, bad)| Request::CopyIn { extended, early_sync, done, large, bad }),
        3 => (prop::collection::vec((sql, any::<bool>()), 1..4), prop::option::of(any::<bool>()))
            .prop_map(|(stmts, end)| Request::Batch(stmts, end)),
        1 => Just(Request::FunctionCall),
        1 => any::<bool>().prop_map(Request::Refused),
    ]
}

fn encode(request: &Request) -> Vec<u8> {
    match request {
        Request::Simple(sql) => q(sql),
        Request::CopyIn {
            extended,
            early_sync,
            done,
            large,
            bad,
        } => {
            let mut out = match extended {
                true => [p("COPY t FROM STDIN"), b(), e()].concat(),
                false => q("COPY t FROM STDIN"),
            };
            // libpq sends the batch's Sync before the data; a client may
            // send a stray one with a simple COPY too.
            if *early_sync {
                out.extend(s());
            }
            out.extend(copy_data(if *large { STREAM_THRESHOLD + 100 } else { 8 }));
            if *bad {
                out.extend(frame(b'd', b"bad row"));
                out.extend(s());
            }
            out.extend(if *done { copy_done() } else { copy_fail() });
            if *extended {
                out.extend(s());
            }
            out
        }
        Request::Batch(stmts, end) => {
            let mut out = Vec::new();
            for (sql, describe) in stmts {
                out.extend(p(sql));
                out.extend(b());
                if *describe {
                    out.extend(d());
                }
                out.extend(e());
            }
            match end {
                Some(true) => out.extend(s()),
                Some(false) => out.extend(h()),
                None => {}
            }
            out
        }
        Request::FunctionCall => fcall(),
        Request::Refused(false) => q("REFUSE"),
        Request::Refused(true) => [p("REFUSE"), b(), e(), s()].concat(),
    }
}

/// An event of the run: the client writes its next request (of which the
/// gateway has read up to `n` more bytes so far), the gateway reads up to
/// `n` more of the client's bytes, or up to `n` bytes of the server's
/// answers arrive.
#[derive(Debug, Clone)]
enum Event {
    Client(Request, usize),
    ClientBytes(usize),
    Server(usize),
}

fn event() -> impl Strategy<Value = Event> {
    let n = prop_oneof![1usize..16, 16usize..512, Just(usize::MAX)];
    prop_oneof![
        2 => (request(), n.clone()).prop_map(|(r, n)| Event::Client(r, n)),
        1 => n.clone().prop_map(Event::ClientBytes),
        3 => (1usize..64).prop_map(Event::Server),
    ]
}

/// The model's run: the sequencer, the model server, the bytes between
/// them, and how often a connection was bound and released.
#[derive(Default)]
struct Run {
    seq: Sequencer,
    pg: ModelServer,
    /// Bytes the client wrote that the gateway has not read yet.
    client_wire: Vec<u8>,
    client_buf: BytesMut,
    server_buf: BytesMut,
    driver: Driver,
    releases: u32,
    /// The connection ran opaque code: requests wait for the server.
    opaque: bool,
}

impl Run {
    fn read_client(&mut self, n: usize) {
        let n = n.min(self.client_wire.len());
        self.client_buf.extend(self.client_wire.drain(..n));
    }

    fn read_server(&mut self, n: usize) {
        let n = n.min(self.pg.out.len());
        self.server_buf.extend(self.pg.out.drain(..n));
        while let ServerStep::Frame(f) = self.seq.next_server(&mut self.server_buf).unwrap() {
            server(&mut self.seq, &f);
        }
        // As the relay: deferred client frames are read again once the
        // server has answered everything.
        if self.seq.deferred() && self.seq.owes_nothing() {
            self.seq.resume();
        }
    }

    /// What the relay does after reading: handles whole client messages,
    /// flushes to the server, and releases the connection when it may go.
    fn step(&mut self) -> Result<(), TestCaseError> {
        loop {
            // As the relay, per message: once bound, the connection ran
            // opaque code (when the run says so).
            let opaque = self.opaque && self.seq.is_bound();
            let step = self.seq.next_client(&mut self.client_buf, 1 << 30, opaque);
            let ClientStep::Frame(f) = step.unwrap() else {
                break;
            };
            let before = self.driver.binds;
            client(&mut self.seq, &f, &mut self.driver);
            if self.driver.binds > before {
                // A fresh binding asserts the identity on the connection.
                self.pg.asserted = true;
            }
        }
        prop_assert!(
            !self.seq.misrouted(),
            "wrote for a server while none was bound"
        );
        let sent = self.seq.to_server().to_vec();
        self.seq.clear_to_server();
        if !sent.is_empty() {
            self.pg.owed_elsewhere = !self.server_buf.is_empty();
            self.pg.receive(&sent);
            prop_assert!(
                !self.pg.early_request,
                "a request went out while the server still owed answers after opaque code"
            );
        }
        if self.seq.releasable() {
            prop_assert!(
                self.pg.idle() && self.server_buf.is_empty(),
                "released while the server was busy: tx {:?}, unsynced {}, owes {} bytes, copy {:?}",
                self.pg.tx,
                self.pg.unsynced,
                self.pg.out.len() + self.server_buf.len(),
                self.pg.copy_in
            );
            self.seq.unbound();
            self.pg.asserted = false;
            self.releases += 1;
        }
        Ok(())
    }
}

/// Drives the sequencer like the relay: client bytes through `next_client`
/// and the pass-through driver, server bytes through `next_server` and
/// `server_frame`, flushing to the model server, releasing the connection
/// whenever the sequencer says it may go; then lets everything arrive.
fn drive(events: &[Event], opaque: bool) -> Result<(), TestCaseError> {
    let mut run = Run {
        opaque,
        pg: ModelServer {
            strict: opaque,
            ..Default::default()
        },
        ..Default::default()
    };
    for event in events {
        match event {
            Event::Client(request, n) => {
                run.client_wire.extend(encode(request));
                run.read_client(*n);
            }
            Event::ClientBytes(n) => run.read_client(*n),
            Event::Server(n) => run.read_server(*n),
        }
        run.step()?;
    }
    run.read_client(usize::MAX);
    run.step()?;
    for _ in 0..10_000 {
        if run.pg.out.is_empty() {
            break;
        }
        run.read_server(64);
        run.step()?;
    }
    // Liveness: once the server is idle and has said everything, the
    // connection has gone back (nothing holds it for ever).
    if run.pg.idle() {
        prop_assert!(
            !run.seq.is_bound(),
            "the server is idle but the connection is held"
        );
    }
    // Nothing the client sent is left waiting (a deadlock with a server that
    // waits for the client).
    prop_assert!(run.client_buf.is_empty(), "client messages never handled");
    prop_assert!(run.driver.binds >= run.releases);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// For any interleaving of well-formed client requests and server
    /// answers, the connection is released only when the server owes
    /// nothing and is outside any transaction, batch and copy; it is
    /// released once the server is idle; and no client message reaches a
    /// connection before the identity is asserted on it.
    #[test]
    fn never_releases_a_busy_connection_or_forwards_unasserted(events in prop::collection::vec(event(), 1..40)) {
        drive(&events, false)?;
    }

    /// The same after opaque code, and no request starts before the
    /// server has answered everything sent before it.
    #[test]
    fn after_opaque_code_requests_wait_for_the_server(events in prop::collection::vec(event(), 1..40)) {
        drive(&events, true)?;
    }
}

/// The case the property found: a COPY ended by the client before the
/// server's `CopyInResponse`, then a batch with its `Sync`. The tracker
/// dropped every `Sync` queued behind the COPY, that batch's too, and the
/// connection went back to the pool while the server still owed the batch
/// its answers (the next client on it would have read them).
#[test]
fn a_batch_after_a_pipelined_copy_keeps_the_connection_until_answered() {
    let events = vec![
        Event::Client(
            Request::CopyIn {
                extended: false,
                early_sync: false,
                done: false,
                large: false,
                bad: false,
            },
            usize::MAX,
        ),
        Event::Client(
            Request::Batch(vec![("SELECT 1", false)], Some(true)),
            usize::MAX,
        ),
        Event::Server(8),
        Event::Client(Request::Simple("SELECT 1"), usize::MAX),
        Event::Server(64),
    ];
    drive(&events, false).unwrap();
}
