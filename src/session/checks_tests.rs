//! The gateway's refusals without a server: each message kind, each
//! reason, and what a message that passes leaves to do.

use bytes::Bytes;

use super::*;
use crate::protocol::messages::{parse_bind, parse_parse};
use crate::session::prepared::Statement;

struct Session {
    guard: Guard,
    mode: PoolMode,
    session_set: SessionSet,
    names: Names,
    code: Code,
    carried: Carried,
}

impl Session {
    fn new(mode: PoolMode, session_set: SessionSet) -> Session {
        Session {
            guard: Guard::new("app.client_user"),
            mode,
            session_set,
            names: Names::default(),
            code: Code::default(),
            carried: Carried::new("alice", Vec::new(), None),
        }
    }

    fn transaction() -> Session {
        Session::new(PoolMode::Transaction, SessionSet::Keep)
    }

    fn checks(&mut self) -> Checks<'_> {
        Checks {
            rules: Rules {
                guard: &self.guard,
                mode: self.mode,
                session_set: self.session_set,
            },
            names: &self.names,
            code: &mut self.code,
            carried: &mut self.carried,
        }
    }

    fn query(&mut self, sql: &str) -> Result<Passed, Refused> {
        let transparent = crate::session::opaque::transparent(sql.as_bytes());
        self.checks().query(sql.as_bytes(), transparent)
    }

    fn parse(&mut self, name: &str, sql: &str) -> Result<ParsePlan, Refused> {
        let body = [name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat();
        let parse = parse_parse(&body).unwrap();
        self.checks().parse(&parse)
    }

    /// Remembers `name` as a statement the client parsed.
    fn prepared(&mut self, name: &str, sql: &str, setting_params: Vec<u16>) {
        let statement = Statement::new(Bytes::from(sql.to_string()), None, setting_params);
        self.names
            .statements
            .insert(Bytes::from(name.to_string()), statement);
    }

    fn bind(&mut self, statement: &str, values: &[&str]) -> Result<(Nature, Passed), Refused> {
        let mut body = [b"\0", statement.as_bytes(), b"\0"].concat();
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            body.extend_from_slice(&(v.len() as i32).to_be_bytes());
            body.extend_from_slice(v.as_bytes());
        }
        body.extend_from_slice(&0i16.to_be_bytes());
        let bind = parse_bind(&body).unwrap();
        let sql = self
            .names
            .statements
            .get(statement.as_bytes())
            .map(|s| s.sql.to_vec())
            .unwrap_or_default();
        self.checks().bind(&bind, &sql)
    }
}

/// The SQLSTATE a refusal answers with, and the statement its guard
/// record shows.
fn refused<T: std::fmt::Debug>(r: Result<T, Refused>) -> (String, Option<String>) {
    let refused = r.expect_err("refused");
    let code = refused.refusal.to_wire().code.code().to_string();
    let blocked = refused
        .blocked
        .map(|s| String::from_utf8_lossy(&s).into_owned());
    (code, blocked)
}

#[test]
fn queries_the_guard_refuses_are_blocked_with_their_text() {
    let cases = [
        "SET ROLE engineer",
        "SELECT set_config('app.client_user', 'bob', false)",
        "RESET ALL",
        "SET SESSION AUTHORIZATION bob",
    ];
    for sql in cases {
        let mut s = Session::transaction();
        assert_eq!(
            refused(s.query(sql)),
            ("42501".into(), Some(sql.into())),
            "{sql}"
        );
    }
    assert!(Session::transaction().query("SELECT 1").is_ok());
}

#[test]
fn after_opaque_code_a_query_may_not_commit_and_go_on() {
    let mut s = Session::transaction();
    let sql = "COMMIT; SELECT 1";
    assert!(s.query(sql).is_ok(), "nothing opaque ran yet");
    s.code.note(false);
    assert_eq!(refused(s.query(sql)), ("42501".into(), Some(sql.into())));
    assert_eq!(
        refused(s.query("COMMIT AND CHAIN")),
        ("42501".into(), Some("COMMIT AND CHAIN".into()))
    );
    assert!(s.query("COMMIT").is_ok());
}

#[test]
fn session_settings_follow_the_session_set_policy_in_transaction_pooling() {
    let sql = "SET work_mem = '8MB'";
    let mut keep = Session::transaction();
    assert_eq!(
        keep.query(sql).unwrap(),
        Passed {
            session_dirty: true
        }
    );
    assert_eq!(keep.carried.take_pending(), ["work_mem"]);

    let mut error = Session::new(PoolMode::Transaction, SessionSet::Error);
    assert_eq!(refused(error.query(sql)), ("0A000".into(), None));
    assert_eq!(refused(error.parse("", sql)), ("0A000".into(), None));
    // SET LOCAL ends with its transaction: nothing to refuse.
    assert!(error.query("SET LOCAL work_mem = '8MB'").is_ok());

    let mut session = Session::new(PoolMode::Session, SessionSet::Error);
    assert_eq!(session.query(sql).unwrap(), Passed::default());
}

#[test]
fn parse_refuses_a_blocked_text_and_a_name_the_client_has() {
    let mut s = Session::transaction();
    assert_eq!(
        refused(s.parse("s1", "SET ROLE engineer")),
        ("42501".into(), Some("SET ROLE engineer".into()))
    );
    s.prepared("s1", "SELECT 1", Vec::new());
    assert_eq!(refused(s.parse("s1", "SELECT 2")), ("42P05".into(), None));
    // The unnamed statement is replaced, as PostgreSQL replaces it.
    s.prepared("", "SELECT 1", Vec::new());
    assert!(s.parse("", "SELECT 2").is_ok());
}

#[test]
fn parse_names_the_setting_parameters_and_who_owns_the_name() {
    let sql = "SELECT set_config($1, $2, false)";
    let mut t = Session::transaction();
    let plan = t.parse("s", sql).unwrap();
    assert_eq!(plan.setting_params, [1]);
    assert!(!plan.own_name);

    let mut session = Session::new(PoolMode::Session, SessionSet::Keep);
    assert!(session.parse("s", "SELECT 1").unwrap().own_name);
    // Its values must be checked at each Bind: the gateway's name, which
    // SQL-level EXECUTE cannot reach.
    assert!(!session.parse("s", sql).unwrap().own_name);
}

#[test]
fn bind_refuses_names_the_client_cannot_use() {
    let mut s = Session::transaction();
    assert_eq!(refused(s.bind("", &[])), ("26000".into(), None));
    assert_eq!(refused(s.bind("pgwarden_x", &[])), ("26000".into(), None));
    // A name the client never parsed is the server's to report.
    assert!(s.bind("unknown", &[]).is_ok());
}

#[test]
fn bound_values_that_name_a_protected_setting_are_blocked() {
    let sql = "SELECT set_config($1, $2, false)";
    let mut s = Session::transaction();
    s.prepared("s", sql, vec![1]);
    for name in ["role", "ROLE  ", "app.client_user", "session_authorization"] {
        assert_eq!(
            refused(s.bind("s", &[name, "x"])),
            ("42501".into(), Some(sql.into())),
            "{name:?}"
        );
    }
    let (_, passed) = s.bind("s", &["work_mem", "8MB"]).unwrap();
    assert!(passed.session_dirty, "a bound setting is kept");
    assert_eq!(s.carried.take_pending(), ["work_mem"]);
}

#[test]
fn an_unknown_statement_binds_as_opaque_and_a_chaining_one_is_refused_after_it() {
    let mut s = Session::transaction();
    let (nature, _) = s.bind("made_by_sql", &[]).unwrap();
    assert!(!nature.transparent);
    // The relay forwards it: the session has run opaque code.
    s.code.note(nature.transparent);
    s.prepared("chain", "COMMIT AND CHAIN", Vec::new());
    assert_eq!(
        refused(s.bind("chain", &[])),
        ("42501".into(), Some("COMMIT AND CHAIN".into()))
    );
    s.code.sync();
    s.code.ready(b'I');
    // The session stays opaque.
    assert!(s.bind("chain", &[]).is_err());
}

#[test]
fn describe_checks_statement_names_only() {
    let mut s = Session::transaction();
    assert_eq!(
        refused(s.checks().describe(b'S', b"")),
        ("26000".into(), None)
    );
    assert!(s.checks().describe(b'P', b"").is_ok());
}

#[test]
fn function_call_allows_only_the_large_object_functions() {
    assert_eq!(
        function_call(952, false, String::new).unwrap(),
        "pg_catalog.lo_open"
    );
    let refusal = function_call(1, false, || "FunctionCall oid=1".into()).unwrap_err();
    assert_eq!(refusal.blocked.as_deref(), Some(&b"FunctionCall oid=1"[..]));
    assert!(matches!(refusal.refusal, Refusal::Guard(why) if why.contains("OID 1 ")));
    // Nothing runs after its unsynced batch committed (red team rt42).
    let refusal = function_call(952, true, || "lo_open".into()).unwrap_err();
    assert!(matches!(refusal.refusal, Refusal::Guard(why) if why.contains("after COMMIT")));
}
