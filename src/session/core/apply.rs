//! A planned message goes out: its bytes for the server (with the
//! statements the bound connection must prepare first), what the server
//! will owe for it, and what it leaves on the connection (settings, opaque
//! code, sequence state, pinning).

use bytes::Bytes;

use super::{Conn, Core, Then};
use crate::backend::conn::ConnState;
use crate::backend::statements;
use crate::protocol::messages;
use crate::session::checks::{off_thread, Passed};
use crate::session::outcome::{Outcome, Pending, Portal};
use crate::session::prepared::{self, Nature};
use crate::session::sequencer::Marking;
use crate::session::state::Effect;

impl Core<'_> {
    /// Writes what `then` sends, now that its records are stored
    /// (`stored`, in order; `after_bind`: the one stored once bound) and,
    /// when it needed one, a connection is bound (`conn`).
    pub fn apply(
        &mut self,
        then: Then,
        stored: Vec<Option<Pending>>,
        after_bind: Option<Pending>,
        conn: Conn<'_>,
    ) {
        // Applying reads the text again (what it leaves on the connection,
        // sequences, transaction control): four 200 MB queries held both
        // worker threads here for seconds (red team rt34).
        off_thread(then.weight(), move || {
            self.apply_now(then, stored, after_bind, conn);
        });
    }

    fn apply_now(
        &mut self,
        then: Then,
        stored: Vec<Option<Pending>>,
        after_bind: Option<Pending>,
        mut conn: Conn<'_>,
    ) {
        let mut stored = stored.into_iter();
        let first = stored.next().flatten();
        match then {
            Then::Query {
                frame,
                transparent,
                passed,
            } => {
                self.passed(passed, &mut conn);
                self.apply_query(frame, transparent, (first, stored.collect()), conn);
            }
            Then::Deallocate(tag) => {
                if let Some(pending) = first {
                    // Answered by the gateway: no transaction of the server's.
                    let outcome = Outcome::Ok {
                        tag: Some(tag.to_string()),
                        rows: None,
                    };
                    self.results.unran(pending, outcome);
                }
                self.seq.expect().synth_query(tag);
            }
            Then::Parse {
                frame,
                setting_params,
                own_name,
                passed,
            } => self.apply_parse(frame, setting_params, own_name, passed, conn),
            Then::Bind {
                frame,
                nature,
                sql,
                params,
                passed,
            } => {
                self.passed(passed, &mut conn);
                self.apply_bind(frame, nature, (sql, params), after_bind, conn);
            }
            Then::Describe(frame) => self.apply_describe(frame, conn),
            Then::Close(frame) => {
                let (kind, name) = messages::parse_close_or_describe(&frame[5..]).expect("planned");
                let closed = match kind {
                    b'S' => {
                        self.seq.names.statements.remove(name);
                        None
                    }
                    _ => self.seq.names.portals.remove(name),
                };
                let name = frame.slice_ref(name);
                self.seq.forward_extended(&frame);
                self.seq.expect().close(false);
                if let Some(portal) = closed {
                    let restore = Box::new((name, Some(portal)));
                    self.seq.expect().restore_if_not_closed(restore);
                }
            }
            Then::Execute(frame) => {
                if let Some(pending) = &first {
                    self.seq.names.follow(&pending.control);
                }
                self.seq.forward_extended(&frame);
                self.seq.expect().execute(first);
                let name = messages::parse_execute(&frame[5..]).expect("planned");
                let Some(portal) = self.seq.names.portals.get(name) else {
                    return;
                };
                let declared = portal.declares.then(|| portal.sql.clone());
                let opaque = portal.opaque;
                if portal.copies_in {
                    self.seq.may_copy_in();
                }
                // Its code may close portals and open others of the same
                // names: an Execute of one is then recorded as unknown.
                if opaque {
                    let name = frame.slice_ref(name);
                    self.seq.names.forget_portals_but(&name);
                }
                // The cursors it declares exist from now on (red team
                // rt41: noted at the DECLARE's Parse, an Execute of the
                // real portal of that name was recorded as the DECLARE).
                if let Some(sql) = declared {
                    self.note_cursors(&sql);
                }
            }
            Then::FunctionCall(frame) => {
                self.note_code(false, &mut conn);
                self.seq.forward_simple(&frame);
                self.seq.expect().query(first, None);
            }
        }
    }

    fn apply_query(
        &mut self,
        frame: Bytes,
        transparent: bool,
        (first, more): (Option<Pending>, Vec<Option<Pending>>),
        mut conn: Conn<'_>,
    ) {
        let sql = frame.slice_ref(messages::parse_query(&frame[5..]).expect("planned"));
        // Outside a block a query is a transaction of its own; in one, it
        // may end it.
        let commits = crate::session::commits::Commits::of(&sql);
        if !self.seq.code.confirmed_block() || commits.ends_block() || commits.calls {
            self.seq.names.may_end_transaction();
        }
        self.note_state(&sql, &mut conn);
        if crate::session::state::may_use_sequences(&sql) {
            self.note_sequences(&mut conn);
        }
        self.note_code(transparent, &mut conn);
        self.forget_portals(&sql, transparent);
        let controls = first.iter().chain(more.iter().flatten());
        controls.for_each(|p| self.seq.names.follow(&p.control));
        self.note_cursors(&sql);
        self.seq.forward_simple(&frame);
        self.seq.expect().query(first, None);
        self.seq.expect().more_statements(more);
        if crate::session::state::may_copy_in(&sql) {
            self.seq.may_copy_in();
        }
    }

    fn apply_describe(&mut self, frame: Bytes, conn: Conn<'_>) {
        let (kind, name) = messages::parse_close_or_describe(&frame[5..]).expect("planned");
        let server_name = match (kind, conn) {
            (b'S', Some(conn)) => self.server_statement(name, conn),
            _ => None,
        };
        match server_name {
            Some(server_name) => prepared::statement_message(self.seq.wire(), b'D', &server_name),
            None => self.seq.forward(&frame),
        }
        self.seq.expect().describe();
        self.seq.sent_extended();
    }

    fn apply_parse(
        &mut self,
        frame: Bytes,
        setting_params: Vec<u16>,
        own_name: bool,
        passed: Passed,
        mut conn: Conn<'_>,
    ) {
        self.passed(passed, &mut conn);
        let parse = messages::parse_parse(&frame[5..]).expect("planned");
        let name = frame.slice_ref(parse.name);
        let sql = frame.slice_ref(parse.query);
        let rest = frame.slice(5 + parse.name.len() + 1..);
        self.note_state(&sql, &mut conn);
        self.seq.sent_extended();
        if name.is_empty() || own_name {
            let previous = self.seq.names.statements.get(&name);
            let mut statement = prepared::Statement::new_after(previous, sql, None, setting_params);
            if name.is_empty() {
                statement.unnamed_parse = Some(frame.slice(6..));
                self.seq.unnamed_parsed();
            }
            self.note_parsed(statement.nature, &mut conn);
            let previous = self.seq.names.statements.insert(name.clone(), statement);
            self.seq.forward(&frame);
            self.seq.expect().parse(false, None);
            self.seq
                .expect()
                .restore_if_not_parsed(Box::new((name, previous)));
            return;
        }
        let key = statements::key(&rest);
        let previous = self.seq.names.statements.get(&name);
        let statement = prepared::Statement::new_after(
            previous,
            sql,
            Some((key, rest.clone())),
            setting_params,
        );
        self.note_parsed(statement.nature, &mut conn);
        let previous = self.seq.names.statements.insert(name.clone(), statement);
        if let Some(conn) = conn {
            if conn.statements.touch(key) {
                self.seq.expect().synth_parse();
            } else {
                self.prepare_on_server(key, &rest, false, conn);
            }
        }
        self.seq
            .expect()
            .restore_if_not_parsed(Box::new((name, previous)));
    }

    fn apply_bind(
        &mut self,
        frame: Bytes,
        nature: Nature,
        (sql, params): (Bytes, Option<Vec<Option<String>>>),
        after_bind: Option<Pending>,
        mut conn: Conn<'_>,
    ) {
        self.note_code(nature.transparent, &mut conn);
        if nature.uses_sequences {
            self.note_sequences(&mut conn);
        }
        let bind = messages::parse_bind(&frame[5..]).expect("planned");
        let key = self
            .seq
            .names
            .statements
            .get(bind.statement)
            .and_then(|s| s.shared.as_ref().map(|(key, _)| *key));
        // Put back as it was if the server refuses or skips the Bind (a
        // portal that exists, an error before it): the portal it names is
        // then still the old one, which may start a COPY.
        let name = frame.slice_ref(bind.portal);
        let portal = Portal {
            sql,
            params,
            copies_in: nature.copies_in,
            commits: nature.commits,
            declares: nature.declares,
            opaque: !nature.transparent,
            ..Portal::default()
        };
        let previous = self.seq.names.open_portal(name.clone(), portal);
        let server_name = conn.and_then(|conn| self.server_statement(bind.statement, conn));
        match server_name {
            Some(server_name) => {
                let rest = 5 + bind.portal.len() + 1 + bind.statement.len() + 1;
                prepared::bind(self.seq.wire(), bind.portal, &server_name, &frame[rest..]);
            }
            None => self.seq.forward(&frame),
        }
        let opened = self.seq.names.opened();
        self.seq.expect().bind(after_bind, key, opened);
        self.seq
            .expect()
            .restore_if_not_bound(Box::new((name, previous)));
        self.seq.sent_extended();
    }

    /// A message passed the checks: what it leaves on the bound connection.
    fn passed(&mut self, passed: Passed, conn: &mut Conn<'_>) {
        if let (true, Some(conn)) = (passed.session_dirty, conn.as_mut()) {
            conn.custody.mark_dirty(&self.ident.session_id);
        }
    }

    /// What a `Parse` about to be forwarded may leave on the bound
    /// connection: opaque code, sequence state.
    fn note_parsed(&mut self, nature: Nature, conn: &mut Conn<'_>) {
        if nature.uses_sequences {
            self.note_sequences(conn);
        }
        self.note_code(nature.transparent, conn);
    }

    /// Marks the bound connection as holding this session's state when
    /// `sql` may leave some behind, and pins the client to it when `sql`
    /// creates objects the client will look for on it again.
    fn note_state(&mut self, sql: &[u8], conn: &mut Conn<'_>) {
        self.carried.note_text(sql);
        let Some(conn) = conn.as_mut() else {
            return;
        };
        if !crate::session::state::may_leave_state(sql) {
            return;
        }
        if crate::session::state::deallocates(sql) {
            conn.statements.mark_uncertain();
        }
        match crate::session::state::effect(sql) {
            Effect::None => {}
            Effect::Settings => conn.custody.mark_dirty(&self.ident.session_id),
            Effect::Pin => {
                conn.custody.mark_dirty(&self.ident.session_id);
                if self.seq.pin() && self.mode() == crate::config::PoolMode::Transaction {
                    tracing::info!(parent: &self.span, "client pinned to its server connection until it disconnects");
                }
            }
        }
    }

    /// The bound connection may now hold this session's sequence state.
    fn note_sequences(&mut self, conn: &mut Conn<'_>) {
        if let Some(conn) = conn.as_mut() {
            conn.custody.note_sequences(&self.ident.session_id);
        }
    }

    /// Records whether the client message about to be forwarded runs only
    /// what pgwarden understands. Opaque code (or anything a session that
    /// once ran opaque code runs) marks the bound connection: identity is
    /// asserted afresh before its next transaction, and another session
    /// gets it only after a reset.
    fn note_code(&mut self, transparent: bool, conn: &mut Conn<'_>) {
        let Marking::Mark { opaque, first } = self.seq.code.note(transparent) else {
            return;
        };
        if first {
            tracing::debug!(parent: &self.span,
                "opaque code: this session's connections are re-asserted and reset from now on"
            );
        }
        if let Some(conn) = conn.as_mut() {
            conn.mark_opaque(&self.ident.session_id, opaque);
        }
    }

    /// Sends `Parse` of a shared statement to the bound server (closing the
    /// one the cache evicts to make room). `injected`: the client did not
    /// ask for this Parse, so its answer is not relayed.
    fn prepare_on_server(&mut self, key: u128, rest: &[u8], injected: bool, conn: ConnState<'_>) {
        if conn.statements.is_uncertain() {
            prepared::statement_message(self.seq.wire(), b'C', &statements::server_name(key));
            self.seq.expect().close(true);
        }
        for evicted in conn.statements.insert(key, rest.len()) {
            prepared::statement_message(self.seq.wire(), b'C', &statements::server_name(evicted));
            self.seq.expect().close(true);
        }
        prepared::parse(self.seq.wire(), &statements::server_name(key), rest);
        self.seq.expect().parse(injected, Some(key));
    }

    /// The server name of a client's named statement, prepared on the bound
    /// server first if needed; `None` for unnamed or unknown names (relayed
    /// as they are, so the server reports unknown ones itself).
    fn server_statement(&mut self, name: &[u8], conn: ConnState<'_>) -> Option<String> {
        if name.is_empty() {
            self.unnamed_to_server();
            return None;
        }
        let (key, rest) = self.seq.names.statements.get(name)?.shared.clone()?;
        if !conn.statements.touch(key) {
            self.prepare_on_server(key, &rest, true, conn);
        }
        Some(statements::server_name(key))
    }

    /// The client's unnamed statement, parsed in an earlier transaction on
    /// another connection (or before this one served another session), is
    /// parsed again here before the message that names it; its answer is
    /// the gateway's.
    fn unnamed_to_server(&mut self) {
        if self.seq.unnamed_here() {
            return;
        }
        let Some(body) = self
            .seq
            .names
            .statements
            .get(&b""[..])
            .and_then(|s| s.unnamed_parse.clone())
        else {
            return;
        };
        prepared::parse(self.seq.wire(), "", &body);
        self.seq.expect().parse(true, None);
        self.seq.unnamed_parsed();
    }
}
