//! The core without sockets: what each client message needs before it goes
//! out, in which order, and what it writes once its needs are met.

use bytes::{BufMut, Bytes, BytesMut};

use super::*;
use crate::backend::custody::Custody;
use crate::backend::statements::StatementCache;
use crate::config::{PoolMode, SessionSet};
use crate::identity::Guard;

/// A connection's state, as `apply` marks it.
#[derive(Default)]
struct Server {
    custody: Custody,
    statements: StatementCache,
}

impl Server {
    fn state(&mut self) -> Option<ConnState<'_>> {
        Some(ConnState {
            custody: &mut self.custody,
            statements: &mut self.statements,
        })
    }
}

fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
    out.freeze()
}

fn query(sql: &str) -> Bytes {
    frame(b'Q', &[sql.as_bytes(), b"\0"].concat())
}

fn parse(name: &str, sql: &str) -> Bytes {
    frame(
        b'P',
        &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat(),
    )
}

fn bind(portal: &str, statement: &str) -> Bytes {
    let body = [
        portal.as_bytes(),
        b"\0",
        statement.as_bytes(),
        b"\0\0\0\0\0\0\0",
    ]
    .concat();
    frame(b'B', &body)
}

fn execute(portal: &str) -> Bytes {
    frame(b'E', &[portal.as_bytes(), b"\0\0\0\0\0"].concat())
}

fn close(kind: u8, name: &str) -> Bytes {
    frame(b'C', &[&[kind][..], name.as_bytes(), b"\0"].concat())
}

fn sync() -> Bytes {
    frame(b'S', b"")
}

fn statements(plan: &Plan) -> Vec<String> {
    plan.records
        .iter()
        .map(|r| r.event.statement.clone().unwrap())
        .collect()
}

fn pending(ticket: u64) -> Option<Pending> {
    Some(Pending {
        ticket,
        started: Instant::now(),
        control: Control::Other,
    })
}

struct Fixture {
    ident: Identity,
    guard: Guard,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            ident: Identity::for_tests("alice", "analyst"),
            guard: Guard::new("app.client_user"),
        }
    }

    fn core(&self, mode: PoolMode) -> Core<'_> {
        let rules = Rules {
            guard: &self.guard,
            mode,
            session_set: SessionSet::Keep,
        };
        Core::new(&self.ident, rules, true, (1 << 20, 4242))
    }
}

fn run(step: Step) -> Plan {
    match step {
        Step::Run(plan) => *plan,
        other => panic!("expected a plan, got {other:?}"),
    }
}

/// Applies `plan` as the driver does once its records are stored
/// (tickets from 1) and a connection is bound.
fn apply(core: &mut Core<'_>, server: &mut Server, plan: Plan) {
    let stored = plan
        .stored
        .into_iter()
        .chain((1..=plan.records.len() as u64).map(pending))
        .collect();
    let after = plan.after_bind.and_then(|_| pending(99));
    if plan.bind {
        core.seq.bound();
    }
    core.apply(plan.then, stored, after, server.state());
}

#[test]
fn a_blocked_query_is_refused_before_anything_is_stored_or_sent() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let step = core.client_frame(query("SET ROLE engineer"), b"").unwrap();
    let Step::Refuse(Flow::Simple, refused) = step else {
        panic!("{step:?}");
    };
    let record = core.blocked_record(&refused).expect("a guard record");
    assert_eq!(record.statement.as_deref(), Some("SET ROLE engineer"));
    assert_eq!(record.sqlstate.as_deref(), Some("42501"));
    assert!(core.seq.to_server().is_empty());
}

#[test]
fn a_query_stores_one_record_per_statement_then_binds_then_goes_out() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let plan = run(core.client_frame(query("SELECT 1; SELECT 2"), b"").unwrap());
    assert_eq!(statements(&plan), ["SELECT 1", "SELECT 2"]);
    assert!(plan.bind && plan.must_record);
    assert_eq!(plan.flow, Flow::Simple);
    assert!(core.seq.to_server().is_empty(), "nothing before apply");
    let mut server = Server::default();
    apply(&mut core, &mut server, plan);
    assert_eq!(core.seq.to_server(), &query("SELECT 1; SELECT 2")[..]);
    assert!(!core.seq.owes_nothing());
}

#[test]
fn bytes_applied_without_a_bound_connection_go_nowhere() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let plan = run(core.client_frame(query("SELECT 1"), b"").unwrap());
    core.apply(plan.then, Vec::new(), None, None);
    assert!(core.seq.to_server().is_empty());
    assert!(core.seq.misrouted(), "the relay ends such a session");
}

#[test]
fn the_first_execute_of_a_batch_is_audited_ahead_with_its_statement() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let batch = [parse("", "SELECT $1"), bind("", ""), execute(""), sync()].concat();
    let record = core.ahead(&batch).expect("audited ahead");
    assert_eq!(record.event.statement.as_deref(), Some("SELECT $1"));
    core.audited_ahead(Ok(pending(7)));
    // Nothing more ahead until that Execute takes it.
    assert!(core.ahead(&batch).is_none());
    run(core.client_frame(parse("", "SELECT $1"), b"").unwrap());
    let plan = run(core.client_frame(execute(""), b"").unwrap());
    assert!(plan.records.is_empty());
    assert_eq!(plan.stored.len(), 1);
    assert_eq!(plan.stored[0].as_ref().map(|p| p.ticket), Some(7));
}

#[test]
fn a_batch_with_a_blocked_statement_is_not_audited_ahead() {
    let f = Fixture::new();
    let core = f.core(PoolMode::Transaction);
    let batch = [parse("", "SET ROLE x"), bind("", ""), execute("")].concat();
    assert!(core.ahead(&batch).is_none());
}

#[test]
fn an_execute_audited_ahead_that_never_ran_is_settled_at_sync() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    core.audited_ahead(Ok(pending(3)));
    assert!(matches!(
        core.client_frame(sync(), b"").unwrap(),
        Step::Done
    ));
    let events = core.results.drain(core_event);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message.as_deref(), Some("3 not executed"));
}

fn core_event(p: Pending, o: Outcome) -> Event {
    let mut ev = Event::new(Kind::Result);
    ev.message = Some(match o {
        Outcome::NotExecuted { .. } => format!("{} not executed", p.ticket),
        other => format!("{} {other:?}", p.ticket),
    });
    ev
}

#[test]
fn a_bind_that_may_run_code_is_recorded_unless_its_execute_follows() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    core.seq.bound();
    let p = run(core
        .client_frame(parse("s", "SELECT my_function()"), b"")
        .unwrap());
    apply(&mut core, &mut server, p);
    let alone = run(core.client_frame(bind("", "s"), &sync()).unwrap());
    let record = alone.after_bind.as_ref().expect("recorded");
    assert_eq!(
        record.event.statement.as_deref(),
        Some("SELECT my_function()")
    );
    let followed = run(core
        .client_frame(bind("", "s"), &[execute(""), sync()].concat())
        .unwrap());
    assert!(followed.after_bind.is_none());
}

#[test]
fn named_statements_are_prepared_once_per_connection_under_shared_names() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    let plan = run(core.client_frame(parse("a", "SELECT 1"), b"").unwrap());
    apply(&mut core, &mut server, plan);
    let written = core.seq.to_server().to_vec();
    assert!(
        written.windows(9).any(|w| w == b"pgwarden_"),
        "the gateway's name, not the client's"
    );
    core.seq.clear_to_server();
    // The same text under another name: already on this connection.
    let plan = run(core.client_frame(parse("b", "SELECT 1"), b"").unwrap());
    apply(&mut core, &mut server, plan);
    assert!(core.seq.to_server().is_empty());
}

#[test]
fn closing_a_shared_statement_is_answered_without_a_connection() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    let plan = run(core.client_frame(parse("a", "SELECT 1"), b"").unwrap());
    apply(&mut core, &mut server, plan);
    assert!(matches!(
        core.client_frame(close(b'S', "a"), b"").unwrap(),
        Step::Done
    ));
    assert!(!core.seq.names.statements.contains_key(&b"a"[..]));
    // A portal's Close goes to the server.
    let plan = run(core.client_frame(close(b'P', "p"), b"").unwrap());
    assert!(plan.bind);
}

#[test]
fn deallocate_of_a_shared_statement_is_answered_and_recorded_without_binding() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    let plan = run(core.client_frame(parse("a", "SELECT 1"), b"").unwrap());
    apply(&mut core, &mut server, plan);
    core.seq.unbound();
    let plan = run(core.client_frame(query("DEALLOCATE a"), b"").unwrap());
    assert!(!plan.bind && !plan.must_record);
    assert_eq!(statements(&plan), ["DEALLOCATE a"], "the client's text");
    // A name the gateway does not map is the server's (SQL-level PREPARE).
    let plan = run(core.client_frame(query("DEALLOCATE other"), b"").unwrap());
    assert!(plan.bind);
}

#[test]
fn function_calls_are_recorded_by_name_or_refused_with_their_arguments() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let call = |oid: i32| {
        let mut body = oid.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 9, 0, 0]);
        frame(b'F', &body)
    };
    let plan = run(core.client_frame(call(952), b"").unwrap());
    assert_eq!(
        statements(&plan),
        ["FunctionCall pg_catalog.lo_open (oid=952)"]
    );
    let Step::Refuse(Flow::Simple, refused) = core.client_frame(call(1), b"").unwrap() else {
        panic!("refused");
    };
    let record = core.blocked_record(&refused).unwrap();
    assert!(record
        .statement
        .unwrap()
        .starts_with("FunctionCall oid=1 args=["));
}

#[test]
fn an_unknown_message_ends_the_session_and_terminate_ends_it_quietly() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    assert!(matches!(
        core.client_frame(frame(b'X', b""), b""),
        Ok(Step::Terminate)
    ));
    assert!(matches!(
        core.client_frame(frame(b'@', b""), b""),
        Err(Refusal::UnknownMessage(b'@'))
    ));
}

fn server_msg(tag: u8, body: &[u8]) -> BytesMut {
    BytesMut::from(&frame(tag, body)[..])
}

/// Runs a simple query through the core on a bound connection, then the
/// server's answer: a `CommandComplete` and `ReadyForQuery` with `status`.
fn round_trip(core: &mut Core<'_>, server: &mut Server, sql: &str, status: u8) {
    let plan = run(core.client_frame(query(sql), b"").unwrap());
    apply(core, server, plan);
    core.seq.clear_to_server();
    for msg in [server_msg(b'C', b"SELECT 1\0"), server_msg(b'Z', &[status])] {
        assert!(!core.server_frame(msg, Some((server.state().unwrap(), 77))));
    }
}

#[test]
fn a_notification_from_the_sessions_own_backend_names_the_clients_pid() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let notification = |pid: i32| {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend_from_slice(b"chan\0payload\0");
        server_msg(b'A', &body)
    };
    let mut server = Server::default();
    core.server_frame(notification(77), Some((server.state().unwrap(), 77)));
    core.server_frame(notification(78), Some((server.state().unwrap(), 77)));
    let out = core.seq.client_out().to_vec();
    assert_eq!(
        &out[5..9],
        &4242i32.to_be_bytes(),
        "own backend: the client's pid"
    );
    let second = out.len() / 2;
    assert_eq!(
        &out[second + 5..second + 9],
        &78i32.to_be_bytes(),
        "another backend's stays"
    );
}

#[test]
fn a_fatal_error_from_the_server_says_the_connection_is_going() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let fatal = server_msg(b'E', b"SFATAL\0C57P01\0Mterminating\0\0");
    assert!(core.server_frame(fatal, None));
    let error = server_msg(b'E', b"SERROR\0C42P01\0Mno table\0\0");
    assert!(!core.server_frame(error, None));
}

#[test]
fn the_connection_is_released_once_the_transaction_ends_and_not_before() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    round_trip(&mut core, &mut server, "BEGIN", b'T');
    assert!(core.answered(true, Instant::now()));
    assert_eq!(core.next_duty(), None, "inside a transaction");
    round_trip(&mut core, &mut server, "COMMIT", b'I');
    assert_eq!(core.next_duty(), Some(Duty::Release));

    // Session pooling keeps it.
    let mut session = f.core(PoolMode::Session);
    round_trip(&mut session, &mut server, "SELECT 1", b'I');
    assert_eq!(session.next_duty(), None);
}

#[test]
fn the_identity_is_verified_once_before_the_release() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    core.verify_due = true;
    round_trip(&mut core, &mut server, "SELECT 1", b'I');
    assert_eq!(core.next_duty(), Some(Duty::Verify));
    assert_eq!(core.next_duty(), Some(Duty::Release));
}

#[test]
fn a_new_application_name_is_retagged_before_anything_else() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    let identity = (
        std::sync::Arc::from("analyst"),
        std::sync::Arc::from("alice"),
    );
    server
        .custody
        .asserted(identity, core.carried.values().clone(), None);
    let plan = run(core
        .client_frame(query("SET application_name = 'batch'"), b"")
        .unwrap());
    apply(&mut core, &mut server, plan);
    let status = server_msg(b'S', b"application_name\0batch\0");
    core.server_frame(status, Some((server.state().unwrap(), 77)));
    assert!(
        server
            .custody
            .carries("analyst", "alice", core.carried.values()),
        "the connection's custody follows the reported setting"
    );
    for msg in [server_msg(b'C', b"SET\0"), server_msg(b'Z', b"I")] {
        core.server_frame(msg, Some((server.state().unwrap(), 77)));
    }
    let Some(Duty::Retag(sql)) = core.next_duty() else {
        panic!("retag first");
    };
    assert!(sql.contains("batch [alice]"), "{sql}");
    assert_eq!(core.carried.application_name().as_deref(), Some("batch"));
}

#[test]
fn deallocate_in_an_aborted_transaction_is_left_to_the_server() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    let plan = run(core.client_frame(parse("a", "SELECT 1"), b"").unwrap());
    apply(&mut core, &mut server, plan);
    core.server_frame(server_msg(b'Z', b"E"), None);
    let plan = run(core.client_frame(query("DEALLOCATE a"), b"").unwrap());
    assert!(plan.bind, "the server answers (25P02)");
    assert!(core.seq.names.statements.contains_key(&b"a"[..]));
}

#[test]
fn a_close_or_deallocate_waits_while_the_server_owes_answers() {
    use crate::session::sequencer::ClientStep;
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    let plan = run(core.client_frame(parse("a", "SELECT 1"), b"").unwrap());
    apply(&mut core, &mut server, plan);
    for held in [close(b'S', "a"), query("DEALLOCATE a")] {
        let mut buf = BytesMut::from(&held[..]);
        let step = core.seq.next_client(&mut buf, 1 << 20, false).unwrap();
        assert!(matches!(step, ClientStep::Idle), "{step:?}");
        assert!(core.seq.deferred());
        core.seq.resume();
    }
    // A portal's Close does not wait.
    let mut buf = BytesMut::from(&close(b'P', "p")[..]);
    let step = core.seq.next_client(&mut buf, 1 << 20, false).unwrap();
    assert!(matches!(step, ClientStep::Frame(_)));
}

#[test]
fn a_statement_name_the_gateway_does_not_know_is_recorded_as_such() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Session);
    core.seq.bound();
    let plan = run(core.client_frame(bind("", "made_by_sql"), b"").unwrap());
    let record = plan.after_bind.expect("an unknown statement may run code");
    let text = record.event.statement.unwrap();
    assert!(
        text.contains("\"made_by_sql\"") && text.starts_with("--"),
        "{text}"
    );
}

/// A transaction's end drops its portals even while the client's next
/// batches are in flight, but not the portals those batches bind (red
/// team rt39: a pipeline that never drained kept every portal counted).
#[test]
fn a_transactions_portals_end_with_it_while_the_next_batch_flows() {
    let f = Fixture::new();
    let mut core = f.core(PoolMode::Transaction);
    let mut server = Server::default();
    for message in [
        parse("s", "SELECT 1"),
        bind("p1", "s"),
        execute("p1"),
        sync(),
        bind("p2", "s"),
        execute("p2"),
        sync(),
    ] {
        if let Step::Run(plan) = core.client_frame(message, b"").unwrap() {
            apply(&mut core, &mut server, *plan);
        }
    }
    let answer = |tag: u8, body: &[u8]| BytesMut::from(&frame(tag, body)[..]);
    for message in [
        answer(b'1', b""),
        answer(b'2', b""),
        answer(b'C', b"SELECT 1\0"),
        answer(b'Z', b"I"),
    ] {
        core.server_frame(message, Some((server.state().unwrap(), 77)));
    }
    let portals = &core.seq.names.portals;
    assert!(!portals.contains_key(b"p1"), "the ended transaction's");
    assert!(portals.contains_key(b"p2"), "bound after it");
}
