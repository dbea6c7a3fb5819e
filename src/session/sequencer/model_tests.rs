//! The property test: the session's core (`session::core`, with this
//! sequencer inside) driven as the relay drives it, by random well-formed
//! clients, against a model of PostgreSQL's protocol rules.

use proptest::prelude::*;

use super::tests::{b, copy_data, copy_done, copy_fail, d, e, fcall, frame, h, p, q, s};
use super::*;
use crate::backend::conn::ConnState;
use crate::backend::custody::Custody;
use crate::backend::statements::StatementCache;
use crate::config::{PoolMode, SessionSet};
use crate::identity::Guard;
use crate::session::checks::Rules;
use crate::session::core::{Core, Duty, Step};
use crate::session::Identity;

use super::model_pg_tests::ModelServer;

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
    /// A COPY into a view, with its data sent at once (`Sync` before it
    /// when `early_sync`): the server fails it right after saying it
    /// started.
    CopyIntoView {
        extended: bool,
        early_sync: bool,
    },
    /// A statement the statement guard refuses: a simple query, or a batch
    /// whose `Parse` is refused (then `Bind`, `Execute`, `Sync`).
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
        1 => (any::<bool>(), any::<bool>())
            .prop_map(|(extended, early_sync)| Request::CopyIntoView { extended, early_sync }),
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
        Request::CopyIntoView {
            extended,
            early_sync,
        } => {
            let mut out = match extended {
                true => [p("COPY v FROM STDIN"), b(), e()].concat(),
                false => q("COPY v FROM STDIN"),
            };
            if *early_sync {
                out.extend(s());
            }
            out.extend(copy_data(8));
            out.extend(copy_done());
            if *extended {
                out.extend(s());
            }
            out
        }
        Request::Refused(false) => q(REFUSED),
        Request::Refused(true) => [p(REFUSED), b(), e(), s()].concat(),
    }
}

/// A statement the guard refuses.
const REFUSED: &str = "SET ROLE engineer";

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

/// The model's run: the core, the model server, the bytes between them,
/// and how often a connection was bound and released.
struct Run {
    core: Core<'static>,
    /// The bound connection's state, fresh at each binding (another
    /// connection of the pool, as far as the client can tell).
    custody: Custody,
    statements: StatementCache,
    pg: ModelServer,
    /// Bytes the client wrote that the gateway has not read yet.
    client_wire: Vec<u8>,
    client_buf: BytesMut,
    server_buf: BytesMut,
    binds: u32,
    releases: u32,
    /// The connection ran opaque code: requests wait for the server.
    opaque: bool,
}

impl Run {
    fn new(opaque: bool) -> Run {
        // One session per case, for the run of the test binary.
        let ident: &'static Identity = Box::leak(Box::new(Identity::for_tests("alice", "analyst")));
        let guard: &'static Guard = Box::leak(Box::new(Guard::new("app.client_user")));
        let rules = Rules {
            guard,
            mode: PoolMode::Transaction,
            session_set: SessionSet::Keep,
        };
        Run {
            core: Core::new(ident, rules, true, (1 << 30, 4242)),
            custody: Custody::default(),
            statements: StatementCache::default(),
            pg: ModelServer {
                strict: opaque,
                ..Default::default()
            },
            client_wire: Vec::new(),
            client_buf: BytesMut::new(),
            server_buf: BytesMut::new(),
            binds: 0,
            releases: 0,
            opaque,
        }
    }

    fn read_client(&mut self, n: usize) {
        let n = n.min(self.client_wire.len());
        self.client_buf.extend(self.client_wire.drain(..n));
    }

    fn read_server(&mut self, n: usize) {
        let n = n.min(self.pg.out.len());
        self.server_buf.extend(self.pg.out.drain(..n));
        while let ServerStep::Frame(f) = self.core.seq.next_server(&mut self.server_buf).unwrap() {
            let conn = self.core.seq.is_bound().then_some((
                ConnState {
                    custody: &mut self.custody,
                    statements: &mut self.statements,
                },
                77,
            ));
            self.core.server_frame(f, conn);
        }
    }

    /// What the relay does with a client message: the core plans it; a
    /// refusal is answered; a plan's records are stored (here: nowhere),
    /// a connection is bound if it needs one (asserting the identity), and
    /// the core applies it.
    fn client_frame(&mut self, frame: Bytes) {
        match self.core.client_frame(frame, &self.client_buf).unwrap() {
            Step::Done | Step::Terminate => {}
            Step::Refuse(flow, refused) => self.core.refuse(flow, refused.refusal).unwrap(),
            Step::Run(plan) => {
                if plan.bind && !self.core.seq.is_bound() {
                    self.binds += 1;
                    self.core.seq.bound();
                    self.core.seq.unnamed_lost();
                    self.custody = Custody::default();
                    self.statements = StatementCache::default();
                    self.pg.asserted = true;
                }
                let stored = plan
                    .stored
                    .into_iter()
                    .chain(plan.records.iter().map(|_| None));
                let conn = self.core.seq.is_bound().then_some(ConnState {
                    custody: &mut self.custody,
                    statements: &mut self.statements,
                });
                self.core.apply(plan.then, stored.collect(), None, conn);
            }
        }
        self.core.seq.emit_synthetic();
    }

    /// What the relay does after reading: handles whole client messages,
    /// flushes to the server, and releases the connection when it may go.
    fn step(&mut self) -> Result<(), TestCaseError> {
        loop {
            // As the relay, per message: the bound connection ran opaque
            // code (or the run says it did).
            let opaque = (self.opaque || self.custody.is_opaque()) && self.core.seq.is_bound();
            let step = self
                .core
                .seq
                .next_client(&mut self.client_buf, 1 << 30, opaque);
            let ClientStep::Frame(f) = step.unwrap() else {
                break;
            };
            self.client_frame(f);
        }
        let seq = &mut self.core.seq;
        prop_assert!(!seq.misrouted(), "wrote for a server while none was bound");
        let sent = seq.to_server().to_vec();
        seq.clear_to_server();
        if !sent.is_empty() {
            self.pg.owed_elsewhere = !self.server_buf.is_empty();
            self.pg.receive(&sent);
            prop_assert!(
                !self.pg.early_request,
                "a request went out while the server still owed answers after opaque code"
            );
        }
        // As the relay once answers are read: the duties the core names.
        while let Some(duty) = self.core.next_duty() {
            match duty {
                Duty::Release => {
                    prop_assert!(
                        self.pg.idle() && self.server_buf.is_empty(),
                        "released while the server was busy: tx {:?}, unsynced {}, owes {} bytes, copy {:?}",
                        self.pg.tx,
                        self.pg.unsynced,
                        self.pg.out.len() + self.server_buf.len(),
                        self.pg.copy_in
                    );
                    self.core.seq.unbound();
                    self.pg.asserted = false;
                    self.releases += 1;
                }
                // Deferred client frames are read again once the server
                // has answered everything (at the next step).
                Duty::Resume => {
                    self.core.seq.resume();
                    break;
                }
                other => prop_assert!(false, "no such duty in this model: {other:?}"),
            }
        }
        Ok(())
    }
}

/// Drives the core like the relay: client bytes through `next_client`
/// and the pass-through driver, server bytes through `next_server` and
/// `server_frame`, flushing to the model server, releasing the connection
/// whenever the sequencer says it may go; then lets everything arrive.
fn drive(events: &[Event], opaque: bool) -> Result<(), TestCaseError> {
    let mut run = Run::new(opaque);
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
            !run.core.seq.is_bound(),
            "the server is idle but the connection is held"
        );
    }
    // Nothing the client sent is left waiting (a deadlock with a server that
    // waits for the client).
    prop_assert!(run.client_buf.is_empty(), "client messages never handled");
    prop_assert!(run.binds >= run.releases);
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
