//! What the gateway refuses, decided without I/O: for each client message
//! that can run a statement, either the refusal (with the statement the
//! guard blocked, whose `guard_blocked` record the relay stores) or what
//! the relay needs to run it.
//!
//! The checks, in the order PostgreSQL would meet the problems:
//! - the statement guard ([`Guard`]), on a `Query`'s or `Parse`'s text and
//!   on the values a `Bind` gives `set_config`'s setting name;
//! - statement names the client cannot use (an unnamed statement it never
//!   parsed, one of the gateway's own names, a name it already has);
//! - `[pool] session_set = "error"`, and the number of settings kept;
//! - after opaque code, a request that commits and goes on
//!   ([`crate::session::sequencer::Code`]);
//! - `FunctionCall` of anything but the large-object functions.
//!
//! The relay stores the record, answers the refusal in the position
//! PostgreSQL would (`Sequencer::refuse`), and for a message that passes
//! stores its `query` record and binds a connection before forwarding it.

use crate::config::{PoolMode, SessionSet};
use crate::identity::{Guard, Violation};
use crate::protocol::messages::{BindView, ParseView};
use crate::session::carried::Carried;
use crate::session::commits::Commits;
use crate::session::prepared::Nature;
use crate::session::refusal::Refusal;
use crate::session::sequencer::{Code, Names, COMMIT_THEN_MORE};

/// The session's rules.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    pub guard: &'a Guard,
    pub mode: PoolMode,
    pub session_set: SessionSet,
}

/// A refused message.
#[derive(Debug)]
pub struct Refused {
    pub refusal: Refusal,
    /// The guard refused it, and this is the statement its `guard_blocked`
    /// record shows (with the refusal's reason).
    pub blocked: Option<Vec<u8>>,
}

impl Refused {
    /// A statement text longer than its record may keep: refused, with a
    /// `guard_blocked` record of its start.
    pub fn too_long(sql: &[u8], len: usize, max: usize) -> Refused {
        Refused {
            refusal: Refusal::TooLongToRecord { len, max },
            blocked: Some(sql.to_vec()),
        }
    }

    fn guard(sql: &[u8], why: impl ToString) -> Refused {
        Refused {
            refusal: Refusal::Guard(why.to_string()),
            blocked: Some(sql.to_vec()),
        }
    }
}

impl<T: Into<Refusal>> From<T> for Refused {
    fn from(refusal: T) -> Refused {
        Refused {
            refusal: refusal.into(),
            blocked: None,
        }
    }
}

/// What a message that passed leaves to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Passed {
    /// It may change settings for the session: the connection it runs on
    /// holds this session's state.
    pub session_dirty: bool,
}

/// The session's state the checks read and note in.
pub struct Checks<'a> {
    pub rules: Rules<'a>,
    pub names: &'a Names,
    pub code: &'a mut Code,
    pub carried: &'a mut Carried,
}

/// What a `Parse` that passed needs.
#[derive(Debug, Default)]
pub struct ParsePlan {
    /// Parameters that name `set_config`'s setting ([`Guard::check_parse`]).
    pub setting_params: Vec<u16>,
    /// The statement lives on the connection under the client's own name
    /// (session pooling), not one of the gateway's shared names.
    pub own_name: bool,
    pub passed: Passed,
}

impl Checks<'_> {
    /// A simple `Query` of `sql` (`transparent` or not).
    pub fn query(&mut self, sql: &[u8], transparent: bool) -> Result<Passed, Refused> {
        self.rules
            .guard
            .check(sql)
            .map_err(|v| Refused::guard(sql, v))?;
        let commits = Commits::of(sql);
        if self.code.refuses_query(transparent, commits) {
            return Err(Refused::guard(sql, COMMIT_THEN_MORE));
        }
        let sets = crate::session::kept::session_sets(sql);
        let passed = self.session_sets(&sets, true)?;
        self.code.sent(commits);
        Ok(passed)
    }

    /// A `Parse`.
    pub fn parse(&mut self, parse: &ParseView<'_>) -> Result<ParsePlan, Refused> {
        let setting_params = self
            .rules
            .guard
            .check_parse(parse.query)
            .map_err(|v| Refused::guard(parse.query, v))?;
        let mut passed = Passed::default();
        if self.rules.session_set == SessionSet::Error {
            let sets = crate::session::kept::session_sets(parse.query);
            passed = self.session_sets(&sets, true)?;
        }
        // In session pooling the client owns its connection: its named
        // statements live there under its own names, as directly. A
        // statement that takes set_config's setting name as a parameter
        // gets one of the gateway's names even then, which SQL-level
        // EXECUTE may not name (the guard refuses it): only a `Bind`,
        // whose values are checked, runs it.
        let own_name = self.rules.mode == PoolMode::Session && setting_params.is_empty();
        if !parse.name.is_empty() && !own_name {
            self.names.check_new_name(parse.name)?;
        }
        Ok(ParsePlan {
            setting_params,
            own_name,
            passed,
        })
    }

    /// A `Bind`; `sql`: its statement's text, as records show it.
    /// Returns what the statement is, as far as pgwarden can tell.
    pub fn bind(&mut self, bind: &BindView<'_>, sql: &[u8]) -> Result<(Nature, Passed), Refused> {
        self.names.check_statement_name(bind.statement)?;
        let statement = self.names.statements.get(bind.statement);
        // Binding plans the statement, which may evaluate functions; a name
        // the gateway does not map was prepared by SQL it cannot see into.
        let nature = statement.map_or(Nature::UNKNOWN, |s| s.nature);
        let mut bound = Vec::new();
        for &n in statement.map_or(&[][..], |s| &s.setting_params[..]) {
            // NULL names no setting (set_config refuses it), and with too
            // few values the server refuses the Bind itself.
            if let Ok(Some(value)) = bind.raw_param(usize::from(n) - 1) {
                self.rules
                    .guard
                    .bound_setting_name(value)
                    .map_err(|v: Violation| Refused::guard(sql, v))?;
                bound.push(String::from_utf8_lossy(value).trim_end().to_string());
            }
        }
        // Settings its text names are refused in `session_set = "error"`;
        // those its bound values name are kept, never refused
        // (`set_config`'s third argument may make them local).
        let named = statement
            .map(|s| s.session_sets.clone())
            .unwrap_or_default();
        let by_text = self.session_sets(&named, true)?;
        let by_values = self.session_sets(&bound, false)?;
        if self.code.bind(nature.transparent, nature.commits).is_err() {
            return Err(Refused::guard(sql, COMMIT_THEN_MORE));
        }
        let passed = Passed {
            session_dirty: by_text.session_dirty || by_values.session_dirty,
        };
        Ok((nature, passed))
    }

    /// A `Describe` (`kind` `S` or `P`) of `name`.
    pub fn describe(&self, kind: u8, name: &[u8]) -> Result<(), Refused> {
        if kind == b'S' {
            self.names.check_statement_name(name)?;
        }
        Ok(())
    }

    /// In transaction pooling, `names` a statement may change for the
    /// session ([`Carried::note_session_sets`]).
    fn session_sets(&mut self, names: &[String], refusable: bool) -> Result<Passed, Refused> {
        if names.is_empty() || self.rules.mode != PoolMode::Transaction {
            return Ok(Passed::default());
        }
        let guard = self.rules.guard;
        let protected = |name: &str| guard.protected_name(name.as_bytes(), false).is_some();
        self.carried
            .note_session_sets(names, refusable, self.rules.session_set, protected)?;
        Ok(Passed {
            session_dirty: self.rules.session_set == SessionSet::Keep,
        })
    }
}

/// A statement longer than this is checked off the threads other sessions
/// run on (the checks are linear, but a megabyte still takes milliseconds).
const LARGE: usize = 64 * 1024;

/// Runs `check` of a message of `len` bytes, off the runtime's worker
/// threads when it is large (and the runtime has several): planning,
/// recording and applying a message are linear in its size.
pub fn off_thread<R>(len: usize, check: impl FnOnce() -> R) -> R {
    // The length first: asking for the runtime clones its handle.
    let multi_thread = || {
        tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
    };
    if len > LARGE && multi_thread() {
        tokio::task::block_in_place(check)
    } else {
        check()
    }
}

/// A `FunctionCall` of function `oid`: the name it is recorded by, if the
/// function is allowed. `text`: how the refused call is recorded.
/// `batch_committed`: its unsynced batch committed after opaque code
/// ([`Code::batch_committed`]): nothing more may run before its `Sync`.
pub fn function_call(
    oid: i32,
    batch_committed: bool,
    text: impl FnOnce() -> String,
) -> Result<&'static str, Refused> {
    if batch_committed {
        return Err(Refused::guard(text().as_bytes(), COMMIT_THEN_MORE));
    }
    match FUNCTION_CALL_ALLOWED.iter().find(|(o, _)| *o == oid) {
        Some((_, name)) => Ok(name),
        None => {
            let why = format!(
                "FunctionCall of function OID {oid} is not allowed through pgwarden (only the large-object functions are)"
            );
            Err(Refused::guard(text().as_bytes(), why))
        }
    }
}

/// Functions a client may call with the `FunctionCall` message: the
/// large-object functions libpq's `lo_*` use, by their fixed OIDs in
/// `pg_proc`. They run no SQL and change no setting; everything else is
/// refused, so `FunctionCall` cannot reach a function that runs SQL
/// (`query_to_xml`...) or changes a setting.
const FUNCTION_CALL_ALLOWED: &[(i32, &str)] = &[
    (715, "pg_catalog.lo_create"),
    (952, "pg_catalog.lo_open"),
    (953, "pg_catalog.lo_close"),
    (954, "pg_catalog.loread"),
    (955, "pg_catalog.lowrite"),
    (956, "pg_catalog.lo_lseek"),
    (957, "pg_catalog.lo_creat"),
    (958, "pg_catalog.lo_tell"),
    (964, "pg_catalog.lo_unlink"),
    (1004, "pg_catalog.lo_truncate"),
    (3170, "pg_catalog.lo_lseek64"),
    (3171, "pg_catalog.lo_tell64"),
    (3172, "pg_catalog.lo_truncate64"),
];

#[cfg(test)]
#[path = "checks_tests.rs"]
mod tests;
