//! Unit tests of the sequencer, without PostgreSQL: table-driven cases of
//! each protocol path, and a property test that drives it with random
//! well-formed clients against a model of the server's protocol rules.

use bytes::BufMut;

use super::*;
use crate::protocol::messages::write_frame;
use crate::protocol::sqlstate;
use crate::session::commits::Commits;
use crate::session::tracker::{CacheEffects, Route};

// ----- frames -----------------------------------------------------------------

pub(super) fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    write_frame(&mut out, tag, |b| b.put_slice(body));
    out.to_vec()
}

pub(super) fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

pub(super) fn q(sql: &str) -> Vec<u8> {
    frame(b'Q', &cstr(sql))
}

pub(super) fn p(sql: &str) -> Vec<u8> {
    let mut body = cstr("");
    body.extend(cstr(sql));
    body.extend([0, 0]);
    frame(b'P', &body)
}

pub(super) fn b() -> Vec<u8> {
    frame(b'B', &[0, 0, 0, 0, 0, 0, 0, 0])
}

pub(super) fn d() -> Vec<u8> {
    frame(b'D', b"P\0")
}

pub(super) fn e() -> Vec<u8> {
    frame(b'E', &[0, 0, 0, 0, 0])
}

pub(super) fn s() -> Vec<u8> {
    frame(b'S', b"")
}

pub(super) fn h() -> Vec<u8> {
    frame(b'H', b"")
}

pub(super) fn fcall() -> Vec<u8> {
    frame(b'F', &[0, 0, 3, 0xb8, 0, 0, 0, 0, 0, 0])
}

pub(super) fn copy_data(len: usize) -> Vec<u8> {
    frame(b'd', &vec![b'x'; len])
}

pub(super) fn copy_done() -> Vec<u8> {
    frame(b'c', b"")
}

pub(super) fn copy_fail() -> Vec<u8> {
    frame(b'f', b"no\0")
}

pub(super) fn z(status: u8) -> Vec<u8> {
    frame(b'Z', &[status])
}

pub(super) fn cc(tag: &str) -> Vec<u8> {
    frame(b'C', &cstr(tag))
}

pub(super) fn err(code: &str) -> Vec<u8> {
    frame(b'E', format!("SERROR\0C{code}\0Mboom\0\0").as_bytes())
}

pub(super) fn tags(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut at = 0;
    while at + 5 <= bytes.len() {
        out.push(bytes[at] as char);
        let len = i32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]);
        at += 1 + len as usize;
    }
    out
}

// ----- a driver like the relay's, for messages it passes unchanged ----------

/// What the test driver knows: how often it bound a connection, and
/// whether the last statement parsed may start a COPY from the client.
#[derive(Default)]
pub(super) struct Driver {
    pub binds: u32,
    copies: bool,
}

/// What the relay does with a client message the gateway passes as it is:
/// binds a connection first when the message needs one (`driver.binds` counts
/// the identity assertions), forwards it, and registers its answer.
pub(super) fn client(seq: &mut Sequencer, bytes: &[u8], driver: &mut Driver) {
    if !seq.admit(bytes, Commits::rolls_back_first) {
        return;
    }
    let binds = &mut driver.binds;
    let mut bind = |seq: &mut Sequencer| {
        if !seq.is_bound() {
            *binds += 1;
            seq.bound();
        }
    };
    // What the statement guard would refuse, refused as the relay does.
    let refused = |flow| PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, format!("{flow:?}"));
    let text = &bytes[5..];
    if bytes[0] == b'Q' && text.starts_with(b"REFUSE") {
        seq.refuse(Flow::Simple, refused(Flow::Simple));
        seq.emit_synthetic();
        return;
    }
    if bytes[0] == b'P' && text.get(1..).is_some_and(|t| t.starts_with(b"REFUSE")) {
        seq.refuse(Flow::Extended, refused(Flow::Extended));
        seq.emit_synthetic();
        return;
    }
    match bytes[0] {
        b'Q' | b'F' => {
            bind(seq);
            seq.forward_simple(bytes);
            seq.expect().query(None, None);
            if bytes[0] == b'Q' && crate::session::state::may_copy_in(text) {
                seq.may_copy_in();
            }
        }
        b'P' => {
            bind(seq);
            seq.forward_extended(bytes);
            seq.expect().parse(false, None);
            driver.copies = crate::session::state::may_copy_in(text);
        }
        b'B' => {
            bind(seq);
            seq.forward_extended(bytes);
            seq.expect().bind(None, None, 0);
        }
        b'D' => {
            bind(seq);
            seq.forward_extended(bytes);
            seq.expect().describe();
        }
        b'C' => {
            bind(seq);
            seq.forward_extended(bytes);
            seq.expect().close(false);
        }
        b'E' => {
            bind(seq);
            seq.forward_extended(bytes);
            seq.expect().execute(None);
            if driver.copies {
                seq.may_copy_in();
            }
        }
        b'S' if seq.copy_in() => seq.pass(bytes),
        b'S' => {
            seq.sync();
        }
        _ => seq.pass(bytes),
    }
    seq.emit_synthetic();
}

pub(super) fn server(seq: &mut Sequencer, bytes: &[u8]) -> Route {
    let mut resolved = Vec::new();
    seq.server_frame(bytes, &mut resolved, &mut CacheEffects::default())
}

pub(super) fn take_client(seq: &mut Sequencer) -> String {
    let out = tags(seq.client_out());
    seq.client_out().clear();
    out
}

pub(super) fn take_server(seq: &mut Sequencer) -> String {
    let out = tags(seq.to_server());
    seq.clear_to_server();
    out
}

// ----- table-driven cases -----------------------------------------------------

/// One step of a case: a client message, a server message, or a check.
pub(super) enum Step {
    Client(Vec<u8>),
    Server(Vec<u8>),
    /// The tags the server was sent since the last check.
    Sent(&'static str),
    /// The tags the client was sent since the last check.
    Relayed(&'static str),
    Releasable(bool),
}

use Step::*;

pub(super) fn run(name: &str, steps: Vec<Step>) {
    let mut seq = Sequencer::default();
    let mut binds = Driver::default();
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            Client(bytes) => client(&mut seq, &bytes, &mut binds),
            Server(bytes) => {
                server(&mut seq, &bytes);
            }
            Sent(want) => assert_eq!(take_server(&mut seq), want, "{name}, step {i}: to server"),
            Relayed(want) => assert_eq!(take_client(&mut seq), want, "{name}, step {i}: to client"),
            Releasable(want) => assert_eq!(seq.releasable(), want, "{name}, step {i}: releasable"),
        }
        assert!(!seq.misrouted(), "{name}, step {i}: misrouted");
    }
}

#[test]
fn simple_query_is_releasable_at_its_ready_for_query() {
    run(
        "simple",
        vec![
            Client(q("SELECT 1")),
            Sent("Q"),
            Releasable(false),
            Server(frame(b'T', b"\0\0")),
            Server(frame(b'D', b"\0\0")),
            Server(cc("SELECT 1")),
            Releasable(false),
            Server(z(b'I')),
            Relayed("TDCZ"),
            Releasable(true),
        ],
    );
}

#[test]
fn a_transaction_holds_the_connection_until_it_ends() {
    run(
        "transaction",
        vec![
            Client(q("BEGIN")),
            Server(cc("BEGIN")),
            Server(z(b'T')),
            Releasable(false),
            Client(q("SELECT 1")),
            Server(cc("SELECT 1")),
            Server(z(b'T')),
            Releasable(false),
            Client(q("COMMIT")),
            Server(cc("COMMIT")),
            Server(z(b'I')),
            Releasable(true),
        ],
    );
}

#[test]
fn an_extended_batch_is_held_until_its_sync_is_answered() {
    run(
        "extended",
        vec![
            Client(p("SELECT 1")),
            Client(b()),
            Client(d()),
            Client(e()),
            Client(h()),
            Sent("PBDEH"),
            Server(frame(b'1', b"")),
            Server(frame(b'2', b"")),
            Server(frame(b'n', b"")),
            Server(cc("SELECT 1")),
            Relayed("12nC"),
            // Everything answered, but the batch is not synced: its
            // implicit transaction is still open on the server.
            Releasable(false),
            Client(s()),
            Sent("S"),
            Releasable(false),
            Server(z(b'I')),
            Relayed("Z"),
            Releasable(true),
        ],
    );
}

#[test]
fn an_error_mid_pipeline_skips_to_sync_on_both_sides() {
    run(
        "pipeline error",
        vec![
            Client(p("SELECT 1")),
            Client(b()),
            Client(e()),
            Client(p("SELECT 2")),
            Client(b()),
            Client(e()),
            Client(s()),
            Client(p("SELECT 3")),
            Client(b()),
            Client(e()),
            Client(s()),
            Sent("PBEPBESPBES"),
            Server(frame(b'1', b"")),
            Server(frame(b'2', b"")),
            Server(err("22012")),
            // The server skips the second statement's messages.
            Server(z(b'I')),
            Releasable(false),
            Server(frame(b'1', b"")),
            Server(frame(b'2', b"")),
            Server(cc("SELECT 1")),
            Server(z(b'I')),
            Relayed("12EZ12CZ"),
            Releasable(true),
        ],
    );
}

#[test]
fn a_pipeline_with_several_syncs_is_released_at_the_last() {
    run(
        "several syncs",
        vec![
            Client(p("SELECT 1")),
            Client(s()),
            Client(p("SELECT 2")),
            Client(s()),
            Server(frame(b'1', b"")),
            Server(z(b'I')),
            Releasable(false),
            Server(frame(b'1', b"")),
            Server(z(b'I')),
            Releasable(true),
        ],
    );
}

#[test]
fn simple_copy_in_ends_at_copy_done_or_copy_fail() {
    for (end, answer, sent) in [
        (copy_done(), cc("COPY 2"), "QddHc"),
        (copy_fail(), err("57014"), "QddHf"),
    ] {
        run(
            "copy in",
            vec![
                Client(q("COPY t FROM STDIN")),
                Server(frame(b'G', &[0, 0, 0])),
                Releasable(false),
                Client(copy_data(10)),
                Client(copy_data(10)),
                // A Flush during COPY is passed on; a Sync goes nowhere (the
                // server ignores it while it copies).
                Client(h()),
                Client(s()),
                Releasable(false),
                Client(end),
                Sent(sent),
                Server(answer),
                Releasable(false),
                Server(z(b'I')),
                Releasable(true),
            ],
        );
    }
}

#[test]
fn extended_copy_in_ends_at_the_first_sync_after_the_copy() {
    run(
        "extended copy in",
        vec![
            Client(p("COPY t FROM STDIN")),
            Client(b()),
            Client(e()),
            Client(s()),
            Server(frame(b'1', b"")),
            Server(frame(b'2', b"")),
            Server(frame(b'G', &[0, 0, 0])),
            // The Sync sent before the copy is ignored by the server: the
            // batch is unsynced again until one after the copy.
            Releasable(false),
            Client(copy_data(10)),
            Client(copy_done()),
            Server(cc("COPY 1")),
            Releasable(false),
            Client(s()),
            Server(z(b'I')),
            Releasable(true),
        ],
    );
}

#[test]
fn copy_out_is_relayed_and_released_at_ready_for_query() {
    run(
        "copy out",
        vec![
            Client(q("COPY t TO STDOUT")),
            Server(frame(b'H', &[0, 0, 0])),
            Server(frame(b'd', b"row\n")),
            Server(frame(b'c', b"")),
            Server(cc("COPY 1")),
            Releasable(false),
            Server(z(b'I')),
            Relayed("HdcCZ"),
            Releasable(true),
        ],
    );
}

#[test]
fn function_call_ends_at_ready_for_query() {
    run(
        "function call",
        vec![
            Client(fcall()),
            Sent("F"),
            Server(frame(b'V', &[0, 0, 0, 1, b'1'])),
            Releasable(false),
            Server(z(b'I')),
            Relayed("VZ"),
            Releasable(true),
        ],
    );
}

#[test]
fn copy_messages_and_flush_without_a_connection_go_nowhere() {
    run(
        "unbound",
        vec![
            Client(h()),
            Client(copy_data(4)),
            Client(copy_done()),
            Client(copy_fail()),
            Sent(""),
            Relayed(""),
            Releasable(false),
            // A lone Sync is answered by the gateway.
            Client(s()),
            Relayed("Z"),
        ],
    );
}

/// Nothing written for a server while none is bound reaches any server,
/// and the sequencer says so.
#[test]
fn bytes_for_a_server_without_a_bound_connection_are_misrouted() {
    let mut seq = Sequencer::default();
    seq.forward(&q("SELECT 1"));
    assert!(seq.misrouted());
    assert!(seq.to_server().is_empty());
    let mut seq = Sequencer::default();
    seq.bound();
    seq.forward(&q("SELECT 1"));
    seq.unbound();
    assert!(seq.to_server().is_empty(), "released: nothing left to send");
    assert!(!seq.misrouted());
}
