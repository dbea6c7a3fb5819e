//! Client messages that carry statements: the simple and extended query
//! protocols, prepared-statement mapping, and the gateway's refusals.
//!
//! Invariant: a message is forwarded only after the statement guard passed
//! it and its `query` audit record is stored; a refused message is answered
//! in the position PostgreSQL would have answered it.

use super::recording::{Ahead, Audited};
use super::*;

impl QueryLoop<'_> {
    pub(super) async fn on_query(&mut self, frame: Bytes) -> Result<(), End> {
        let sql = messages::parse_query(&frame[5..]).map_err(End::from)?;
        // A simple query drops the unnamed statement, on the server as
        // for the client (PostgreSQL defines it so).
        self.seq.names.statements.remove(&b""[..]);
        self.seq.unnamed_lost();
        let transparent = crate::session::opaque::transparent(sql);
        let checked = self.off_thread(sql.len(), |c| c.query(sql, transparent));
        let passed = match checked {
            Ok(passed) => passed,
            Err(r) => return self.refused(Flow::Simple, r).await,
        };
        if let Some(dealloc) = prepared::parse_deallocate(sql) {
            if self.deallocate(dealloc).await {
                return Ok(());
            }
        }
        self.passed(passed);
        let parts = match self.auditing {
            true => crate::session::split::statements(sql, self.carried.standard_strings()),
            false => None,
        };
        let (pending, more) = match parts {
            None => match self.audit_and_bind(sql, None).await {
                Ok(p) => (p, Vec::new()),
                Err(e) => return self.refuse(Flow::Simple, e).await,
            },
            Some(parts) => match self.audit_each_and_bind(sql, parts).await {
                Ok(mut pendings) => {
                    let rest = pendings.split_off(1);
                    (pendings.pop().flatten(), rest)
                }
                Err(e) => return self.refuse(Flow::Simple, e).await,
            },
        };
        self.note_state(sql);
        if crate::session::state::may_use_sequences(sql) {
            self.note_sequences();
        }
        self.note_code(transparent);
        self.note_cursors(&frame.slice_ref(sql));
        self.seq.forward_simple(&frame);
        self.seq.expect().query(pending, None);
        self.seq.expect().more_statements(more);
        if crate::session::state::may_copy_in(sql) {
            self.seq.may_copy_in();
        }
        Ok(())
    }

    /// `DEALLOCATE` of protocol-level statements is answered by the gateway:
    /// the client's names go, the shared server-side statements stay for
    /// others. Returns false when the server must answer (a name the gateway
    /// does not map, i.e. an SQL-level `PREPARE`, or `ALL` inside a
    /// transaction, where SQL-level statements may exist).
    pub(super) async fn deallocate(&mut self, what: prepared::Deallocate) -> bool {
        let tag = match what {
            prepared::Deallocate::All => {
                self.seq.names.statements.retain(|name, _| name.is_empty());
                if self.server.is_some() {
                    return false;
                }
                "DEALLOCATE ALL"
            }
            prepared::Deallocate::Name(name) => {
                if self
                    .seq
                    .names
                    .statements
                    .get(&name[..])
                    .is_none_or(|s| s.shared.is_none())
                {
                    return false;
                }
                self.seq.names.statements.remove(&name[..]);
                "DEALLOCATE"
            }
        };
        if let Ok(Some(pending)) = self.audit_statement(tag.as_bytes(), None).await {
            // Answered by the gateway: no transaction of the server's.
            let outcome = Outcome::Ok {
                tag: Some(tag.to_string()),
                rows: None,
            };
            self.results.unran(pending, outcome);
        }
        self.seq.expect().synth_query(tag);
        true
    }

    pub(super) async fn on_parse(&mut self, frame: Bytes) -> Result<(), End> {
        let parse = messages::parse_parse(&frame[5..]).map_err(End::from)?;
        let plan = match self.off_thread(parse.query.len(), |c| c.parse(&parse)) {
            Ok(plan) => plan,
            Err(r) => return self.refused(Flow::Extended, r).await,
        };
        let (setting_params, own_name) = (plan.setting_params, plan.own_name);
        self.passed(plan.passed);
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Extended, e).await;
        }
        self.note_state(parse.query);
        let name = frame.slice_ref(parse.name);
        let sql = frame.slice_ref(parse.query);
        self.note_cursors(&sql);
        self.seq.sent_extended();
        if name.is_empty() || own_name {
            let mut statement = prepared::Statement::new(sql, None, setting_params);
            if name.is_empty() {
                statement.unnamed_parse = Some(frame.slice(6..));
                self.seq.unnamed_parsed();
            }
            self.note_parsed(statement.nature);
            let previous = self.seq.names.statements.insert(name.clone(), statement);
            self.seq.forward(&frame);
            self.seq.expect().parse(false, None);
            self.seq
                .expect()
                .restore_if_not_parsed(Box::new((name, previous)));
            return Ok(());
        }
        let rest = frame.slice(5 + parse.name.len() + 1..);
        let key = statements::key(&rest);
        let statement = prepared::Statement::new(sql, Some((key, rest.clone())), setting_params);
        self.note_parsed(statement.nature);
        let previous = self.seq.names.statements.insert(name.clone(), statement);
        let server = self.server.as_mut().expect("bound above");
        if server.statements.touch(key) {
            self.seq.expect().synth_parse();
        } else {
            self.prepare_on_server(key, &rest, false);
        }
        self.seq
            .expect()
            .restore_if_not_parsed(Box::new((name, previous)));
        Ok(())
    }

    /// What a `Parse` about to be forwarded may leave on the bound
    /// connection: opaque code, sequence state.
    fn note_parsed(&mut self, nature: prepared::Nature) {
        if nature.uses_sequences {
            self.note_sequences();
        }
        self.note_code(nature.transparent);
    }

    /// Sends `Parse` of a shared statement to the bound server (closing the
    /// one the cache evicts to make room). `injected`: the client did not
    /// ask for this Parse, so its answer is not relayed.
    pub(super) fn prepare_on_server(&mut self, key: u128, rest: &[u8], injected: bool) {
        let server = self.server.as_mut().expect("caller binds");
        if server.statements.is_uncertain() {
            prepared::statement_message(self.seq.wire(), b'C', &statements::server_name(key));
            self.seq.expect().close(true);
        }
        if let Some(evicted) = server.statements.insert(key) {
            prepared::statement_message(self.seq.wire(), b'C', &statements::server_name(evicted));
            self.seq.expect().close(true);
        }
        prepared::parse(self.seq.wire(), &statements::server_name(key), rest);
        self.seq.expect().parse(injected, Some(key));
    }

    /// The server name of a client's named statement, prepared on the bound
    /// server first if needed; `None` for unnamed or unknown names (relayed
    /// as they are, so the server reports unknown ones itself).
    pub(super) fn server_statement(&mut self, name: &[u8]) -> Option<String> {
        if name.is_empty() {
            self.unnamed_to_server();
            return None;
        }
        let (key, rest) = self.seq.names.statements.get(name)?.shared.clone()?;
        let server = self.server.as_mut().expect("caller binds");
        if !server.statements.touch(key) {
            self.prepare_on_server(key, &rest, true);
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

    pub(super) async fn on_bind(&mut self, frame: Bytes) -> Result<(), End> {
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Extended, e).await;
        }
        let bind = messages::parse_bind(&frame[5..]).map_err(End::from)?;
        let sql = self.statement_sql(bind.statement);
        let nature = match self.checks().bind(&bind, &sql) {
            Ok((nature, passed)) => {
                self.passed(passed);
                nature
            }
            Err(r) => return self.refused(Flow::Extended, r).await,
        };
        let key = self
            .seq
            .names
            .statements
            .get(bind.statement)
            .and_then(|s| s.shared.as_ref().map(|(key, _)| *key));
        let transparent = nature.transparent;
        self.note_code(transparent);
        if nature.uses_sequences {
            self.note_sequences();
        }
        let mut bind_record = None;
        let mut params = None;
        if self.auditing {
            params = self.audited_params(&bind).map_err(End::from)?;
            if !transparent && !self.execute_follows(bind.portal) {
                // Planning may run its functions, and no Execute of this
                // portal is in the batch whose record would be stored
                // before the Bind is sent.
                bind_record = match self.audit_statement(&sql, params.clone()).await {
                    Ok(pending) => pending,
                    Err(e) => return self.refuse(Flow::Extended, e).await,
                };
            }
        }
        // Put back as it was if the server refuses or skips the Bind (a
        // portal that exists, an error before it): the portal it names is
        // then still the old one, which may start a COPY.
        let name = frame.slice_ref(bind.portal);
        let portal = Portal {
            sql,
            params,
            copies_in: nature.copies_in,
        };
        let previous = self.seq.names.portals.insert(name.clone(), portal);
        match self.server_statement(bind.statement) {
            Some(name) => {
                let rest = 5 + bind.portal.len() + 1 + bind.statement.len() + 1;
                prepared::bind(self.seq.wire(), bind.portal, &name, &frame[rest..]);
            }
            None => self.seq.forward(&frame),
        }
        self.seq.expect().bind(bind_record, key);
        self.seq
            .expect()
            .restore_if_not_bound(Box::new((name, previous)));
        self.seq.sent_extended();
        Ok(())
    }

    pub(super) async fn on_describe(&mut self, frame: Bytes) -> Result<(), End> {
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Extended, e).await;
        }
        let (kind, name) = messages::parse_close_or_describe(&frame[5..]).map_err(End::from)?;
        if let Err(r) = self.checks().describe(kind, name) {
            return self.refused(Flow::Extended, r).await;
        }
        let server_name = if kind == b'S' {
            self.server_statement(name)
        } else {
            None
        };
        match server_name {
            Some(server_name) => prepared::statement_message(self.seq.wire(), b'D', &server_name),
            None => self.seq.forward(&frame),
        }
        self.seq.expect().describe();
        self.seq.sent_extended();
        Ok(())
    }

    pub(super) async fn on_close(&mut self, frame: Bytes) -> Result<(), End> {
        let (kind, name) = messages::parse_close_or_describe(&frame[5..]).map_err(End::from)?;
        let shared = self
            .seq
            .names
            .statements
            .get(name)
            .is_some_and(|s| s.shared.is_some());
        // Closing a name the client does not have is no error; one of the
        // gateway's own names never reaches the server from a client.
        if kind == b'S' && (shared || self.seq.names.check_reserved(name).is_err()) {
            // The client's name goes; the shared statement stays on the server.
            self.seq.names.statements.remove(name);
            self.seq.expect().synth_close();
            return Ok(());
        }
        if let Err(e) = self.bind_server().await {
            return self.refuse(Flow::Extended, e).await;
        }
        if kind == b'S' {
            self.seq.names.statements.remove(name);
        }
        self.seq.forward_extended(&frame);
        self.seq.expect().close(false);
        Ok(())
    }

    pub(super) async fn on_execute(&mut self, frame: Bytes) -> Result<(), End> {
        let bound = match self.pre_audited.take() {
            // Audited before the batch took a connection.
            Some(Ahead::Stored(pending)) => self.bind_for(Some(pending)).await,
            Some(Ahead::Unaudited) => self.bind_for(None).await,
            Some(Ahead::Failed(e)) => Err(e),
            None => {
                let (sql, params) = if self.auditing {
                    let name = messages::parse_execute(&frame[5..]).map_err(End::from)?;
                    self.portal_audited(name)
                } else {
                    Audited::default()
                };
                self.audit_and_bind(&sql, params).await
            }
        };
        let pending = match bound {
            Ok(p) => p,
            Err(e) => return self.refuse(Flow::Extended, e).await,
        };
        self.seq.forward_extended(&frame);
        self.seq.expect().execute(pending);
        let portal = messages::parse_execute(&frame[5..]).map_err(End::from)?;
        if self
            .seq
            .names
            .portals
            .get(portal)
            .is_some_and(|p| p.copies_in)
        {
            self.seq.may_copy_in();
        }
        Ok(())
    }

    pub(super) fn on_sync(&mut self) {
        // An error earlier in the batch may have discarded its `Execute`.
        self.settle_unexecuted_ahead();
        self.seq.sync();
    }
}
