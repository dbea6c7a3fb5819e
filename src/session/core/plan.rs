//! Each client message that can run a statement, planned: refused, answered
//! by the gateway, or what it needs before its bytes go out (records, a
//! connection) and how they go out ([`Then`], for `Core::apply`).

use bytes::Bytes;

use super::{Ahead, Core, Plan, Step, ToRecord};
use crate::config::PoolMode;
use crate::protocol::messages;
use crate::session::checks::{off_thread, Passed};
use crate::session::outcome::Pending;
use crate::session::prepared::{self, Nature};
use crate::session::refusal::Refusal;
use crate::session::sequencer::Flow;
use crate::session::sequencer::{logged_size, Names};

/// How a planned message goes out once its needs are met.
#[derive(Debug)]
pub enum Then {
    Query {
        frame: Bytes,
        transparent: bool,
        passed: Passed,
    },
    /// `DEALLOCATE` of protocol-level statements, answered by the gateway.
    Deallocate(&'static str),
    Parse {
        frame: Bytes,
        setting_params: Vec<u16>,
        own_name: bool,
        passed: Passed,
    },
    Bind {
        frame: Bytes,
        nature: Nature,
        sql: Bytes,
        params: Option<Vec<Option<String>>>,
        passed: Passed,
    },
    Describe(Bytes),
    Close(Bytes),
    Execute(Bytes),
    FunctionCall(Bytes),
}

impl Then {
    /// The bytes applying it reads: a large message is applied off the
    /// threads other sessions run on (see [`crate::session::checks::off_thread`]).
    pub fn weight(&self) -> usize {
        match self {
            Then::Query { frame, .. } | Then::Parse { frame, .. } => frame.len(),
            Then::Bind { frame, sql, .. } => frame.len() + sql.len(),
            Then::Describe(frame)
            | Then::Close(frame)
            | Then::Execute(frame)
            | Then::FunctionCall(frame) => frame.len(),
            Then::Deallocate(_) => 0,
        }
    }
}

impl Plan {
    fn new(flow: Flow, then: Then) -> Plan {
        Plan {
            flow,
            stored: Vec::new(),
            records: Vec::new(),
            must_record: true,
            bind: true,
            after_bind: None,
            then,
        }
    }

    fn recording(mut self, records: impl IntoIterator<Item = ToRecord>) -> Plan {
        self.records.extend(records);
        self
    }
}

impl Core<'_> {
    pub(super) fn plan_query(&mut self, frame: Bytes) -> Result<Step, Refusal> {
        let sql = messages::parse_query(&frame[5..])?;
        // A simple query drops the unnamed statement, on the server as
        // for the client (PostgreSQL defines it so).
        self.seq.names.statements.remove(&b""[..]);
        self.seq.unnamed_lost();
        if let Some(refused) = self.too_long(sql) {
            return Ok(Step::Refuse(Flow::Simple, refused));
        }
        let transparent = crate::session::opaque::transparent(sql);
        let mut checks = self.checks();
        let passed = match off_thread(sql.len(), || checks.query(sql, transparent)) {
            Ok(passed) => passed,
            Err(refused) => return Ok(Step::Refuse(Flow::Simple, refused)),
        };
        match prepared::parse_deallocate(sql) {
            Some(dealloc) => {
                if let Some(step) = self.deallocate(dealloc, sql) {
                    return Ok(step);
                }
            }
            // One the gateway cannot read (among other statements): the
            // client's own names may be gone from the server, and a later
            // use of one must not be recorded with a text it no longer has.
            None if crate::session::state::deallocates(sql) && self.seq.tx_status() != b'E' => {
                let names = &mut self.seq.names.statements;
                names.retain(|name, s| name.is_empty() || s.shared.is_some());
            }
            None => {}
        }
        let parts = match self.auditing {
            true => crate::session::split::statements(sql, self.carried.standard_strings()),
            false => None,
        };
        // One `query` record per statement, in order, all stored before
        // any is sent.
        let records: Vec<ToRecord> = match parts {
            None => self.record(sql, None).into_iter().collect(),
            Some(parts) => parts
                .into_iter()
                .filter_map(|part| self.record(&sql[part], None))
                .collect(),
        };
        let then = Then::Query {
            frame: frame.clone(),
            transparent,
            passed,
        };
        Ok(Step::run(Plan::new(Flow::Simple, then).recording(records)))
    }

    /// `DEALLOCATE` (`sql`) of protocol-level statements is answered by the
    /// gateway: the client's names go, the shared server-side statements
    /// stay for others. `None` when the server must answer: in an aborted
    /// transaction (it refuses with 25P02, and every name stays), for a
    /// name that is the server's own (session pooling, or an SQL-level
    /// `PREPARE`: the client's entry goes, the server drops the statement),
    /// or for `ALL` inside a transaction, where SQL-level statements may
    /// exist. The sequencer holds a `DEALLOCATE` back until the server has
    /// answered everything before it, so nothing earlier can still fail
    /// and make the server skip it.
    fn deallocate(&mut self, what: prepared::Deallocate, sql: &[u8]) -> Option<Step> {
        if self.seq.tx_status() == b'E' {
            return None;
        }
        let names = &mut self.seq.names.statements;
        let tag = match what {
            prepared::Deallocate::All => {
                names.retain(|name, _| name.is_empty());
                if self.seq.is_bound() {
                    return None;
                }
                "DEALLOCATE ALL"
            }
            prepared::Deallocate::Name(name) => {
                let shared = names.get(&name[..]).is_some_and(|s| s.shared.is_some());
                names.remove(&name[..]);
                if !shared {
                    return None;
                }
                "DEALLOCATE"
            }
        };
        let mut plan =
            Plan::new(Flow::Simple, Then::Deallocate(tag)).recording(self.record(sql, None));
        // Answered even when its record cannot be stored: it runs nothing.
        plan.must_record = false;
        plan.bind = false;
        Some(Step::run(plan))
    }

    pub(super) fn plan_parse(&mut self, frame: Bytes) -> Result<Step, Refusal> {
        let parse = messages::parse_parse(&frame[5..])?;
        if let Some(refused) = self.too_long(parse.query) {
            return Ok(Step::Refuse(Flow::Extended, refused));
        }
        // What the statement keeps of the message is at most all of it.
        let sizes = |names: &Names| (names.statements.kept_by(parse.name), frame.len());
        if let Some(refused) = self.too_much_kept(parse.name, sizes, parse.query) {
            return Ok(Step::Refuse(Flow::Extended, refused));
        }
        let mut checks = self.checks();
        let plan = match off_thread(parse.query.len(), || checks.parse(&parse)) {
            Ok(plan) => plan,
            Err(refused) => return Ok(Step::Refuse(Flow::Extended, refused)),
        };
        let then = Then::Parse {
            frame: frame.clone(),
            setting_params: plan.setting_params,
            own_name: plan.own_name,
            passed: plan.passed,
        };
        Ok(Step::run(Plan::new(Flow::Extended, then)))
    }

    /// `rest`: the client's messages buffered behind this one.
    pub(super) fn plan_bind(&mut self, frame: Bytes, rest: &[u8]) -> Result<Step, Refusal> {
        let bind = messages::parse_bind(&frame[5..])?;
        let sql = self.statement_sql(bind.statement);
        let (nature, passed) = match self.checks().bind(&bind, &sql) {
            Ok(checked) => checked,
            Err(refused) => return Ok(Step::Refuse(Flow::Extended, refused)),
        };
        let params = match self.auditing {
            true => self.audited_params(&bind)?,
            false => None,
        };
        // A named portal keeps the parameters for its record.
        let sizes = |names: &Names| {
            let kept = bind.portal.len() + logged_size(&params);
            (names.portals.kept_by(bind.portal), kept)
        };
        if let Some(refused) = self.too_much_kept(bind.portal, sizes, &sql) {
            return Ok(Step::Refuse(Flow::Extended, refused));
        }
        // Planning may run its functions, and no Execute of this portal is
        // in the batch whose record would be stored before the Bind is sent.
        let after_bind = match !nature.transparent && !self.execute_follows(bind.portal, rest) {
            true => self.record(&sql, params.clone()),
            false => None,
        };
        let then = Then::Bind {
            frame: frame.clone(),
            nature,
            sql,
            params,
            passed,
        };
        let mut plan = Plan::new(Flow::Extended, then);
        plan.after_bind = after_bind;
        Ok(Step::run(plan))
    }

    pub(super) fn plan_describe(&mut self, frame: Bytes) -> Result<Step, Refusal> {
        let (kind, name) = messages::parse_close_or_describe(&frame[5..])?;
        if let Err(refused) = self.checks().describe(kind, name) {
            return Ok(Step::Refuse(Flow::Extended, refused));
        }
        Ok(Step::run(Plan::new(Flow::Extended, Then::Describe(frame))))
    }

    pub(super) fn plan_close(&mut self, frame: Bytes) -> Result<Step, Refusal> {
        let (kind, name) = messages::parse_close_or_describe(&frame[5..])?;
        let names = &self.seq.names;
        let shared = names
            .statements
            .get(name)
            .is_some_and(|s| s.shared.is_some());
        // Closing a name the client does not have is no error; one of the
        // gateway's own names never reaches the server from a client.
        if kind == b'S' && (shared || names.check_reserved(name).is_err()) {
            // The client's name goes; the shared statement stays on the server.
            self.seq.names.statements.remove(name);
            self.seq.expect().synth_close();
            return Ok(Step::Done);
        }
        Ok(Step::run(Plan::new(Flow::Extended, Then::Close(frame))))
    }

    pub(super) fn plan_execute(&mut self, frame: Bytes) -> Result<Step, Refusal> {
        let name = messages::parse_execute(&frame[5..])?;
        let mut stored: Vec<Option<Pending>> = Vec::new();
        let mut records = Vec::new();
        match self.take_ahead() {
            // Audited before the batch took a connection.
            Some(Ahead::Stored(pending)) => stored.push(Some(pending)),
            Some(Ahead::Unaudited) => stored.push(None),
            Some(Ahead::Failed(e)) => return Ok(Step::Refuse(Flow::Extended, e.into())),
            None if self.auditing => {
                let (sql, params) = self.portal_audited(name);
                records.extend(self.record(&sql, params));
            }
            None => {}
        }
        // After its own record: what it ends is what ran before it.
        if let Some(portal) = self.seq.names.portals.get(name) {
            let commits = portal.commits;
            self.seq.code.executed(commits);
            if commits.ends_block() || commits.calls {
                self.seq.names.may_end_transaction();
            }
        }
        let mut plan = Plan::new(Flow::Extended, Then::Execute(frame.clone())).recording(records);
        plan.stored = stored;
        Ok(Step::run(plan))
    }

    pub(super) fn plan_function_call(&mut self, frame: Bytes) -> Result<Step, Refusal> {
        let oid = crate::protocol::frame::Reader::new(&frame[5..], "FunctionCall").i32()?;
        let encoding = self.carried.client_encoding();
        let committed = self.seq.code.batch_committed();
        let checked = crate::session::checks::function_call(oid, committed, || {
            // The refused call is evidence: its arguments are recorded.
            function_call_text(oid, &frame[5..], encoding)
        });
        let name = match checked {
            Ok(name) => name,
            Err(refused) => return Ok(Step::Refuse(Flow::Simple, refused)),
        };
        let text = format!("FunctionCall {name} (oid={oid})");
        let params = match self.log_parameters {
            true => messages::function_call_args(&frame[5..], encoding).ok(),
            false => None,
        };
        let record = self.record(text.as_bytes(), params);
        Ok(Step::run(
            Plan::new(Flow::Simple, Then::FunctionCall(frame)).recording(record),
        ))
    }

    /// The pool mode, for the plans that depend on it.
    pub(super) fn mode(&self) -> PoolMode {
        self.rules.mode
    }
}

/// How a `FunctionCall` appears in the audit log: the function's OID and
/// its arguments (text arguments as text, binary ones in hex).
fn function_call_text(oid: i32, body: &[u8], encoding: &str) -> String {
    let mut text = format!("FunctionCall oid={oid}");
    if let Ok(args) = messages::function_call_args(body, encoding) {
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                a.as_deref()
                    .map_or("NULL".to_string(), |s| format!("{s:?}"))
            })
            .collect();
        text.push_str(&format!(" args=[{}]", shown.join(", ")));
    }
    text
}
