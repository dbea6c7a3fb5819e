//! The identity assertion: before any client message runs on a freshly
//! bound server connection, the connection is switched to the client's
//! mapped role and tagged with the client's name.
//!
//! Invariant: the client's messages are only forwarded after the assertion's
//! own `ReadyForQuery` arrived with no error, and after the values the
//! backend reports back were checked to be exactly the ones asked for. The
//! values travel as bind parameters, never spliced into SQL, and the
//! function is schema-qualified so a client-created `set_config` earlier on
//! the search path cannot stand in for the real one.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;

use crate::backend::conn::{BackendError, ServerConn};
use crate::protocol::frame::Reader;
use crate::protocol::messages;

/// The assertion statement for `extra` additional settings.
fn assert_sql(extra: usize) -> String {
    let mut sql = String::from(
        "SELECT pg_catalog.set_config('role', $1, false), pg_catalog.set_config($2, $3, false)",
    );
    for i in 0..extra {
        let n = 4 + 2 * i;
        sql.push_str(&format!(", pg_catalog.set_config(${n}, ${}, false)", n + 1));
    }
    sql
}

/// Who a server connection must act as, and the client's own settings
/// (startup parameters and tracked changes) that travel with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assertion<'a> {
    pub role: &'a str,
    pub setting: &'a str,
    pub client_user: &'a str,
    /// The signed value to set instead of the plain name (see
    /// [`super::tag`]), when the database has a tag key.
    pub tag: Option<&'a str>,
    pub settings: &'a [(String, String)],
}

impl Assertion<'_> {
    /// Appends the assertion's messages (Parse/Bind/Execute/Close/Sync) to
    /// `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_statement(out);
        frontend::sync(out);
    }

    /// Appends the assertion for the same write as the client's first
    /// message of a transaction (see [`Pipelined`]): `BEGIN`, the reset (a
    /// simple query) if any, the assertion, `COMMIT`, all extended and
    /// unsynced, so that an error anywhere makes PostgreSQL skip everything
    /// after it, the client's messages included, up to the client's `Sync`.
    pub fn encode_pipelined(&self, reset: Option<&str>, out: &mut BytesMut) -> Pipelined {
        unnamed_statement("BEGIN", out);
        if let Some(sql) = reset {
            messages::query(out, sql);
        }
        self.encode_statement(out);
        unnamed_statement("COMMIT", out);
        // PostgreSQL reports changed settings only at a ReadyForQuery, and
        // only those that differ from what it last reported on the
        // connection: this one carries the reports of the client's own
        // values (dropped), so that the client's next change of one of them
        // is reported to it as a change, as on a direct connection.
        messages::query(out, "");
        Pipelined {
            reset: reset.is_some(),
            next: 0,
            role: self.role.to_string(),
            client_user: self.client_user.to_string(),
            value: self.value().to_string(),
            columns: 2 + self.settings.len(),
        }
    }

    fn encode_statement(&self, out: &mut BytesMut) {
        frontend::parse(
            "",
            &assert_sql(self.settings.len()),
            std::iter::empty(),
            out,
        )
        .expect("no NUL in generated SQL");
        let mut values = vec![self.role, self.setting, self.value()];
        for (name, value) in self.settings {
            values.push(name);
            values.push(value);
        }
        let bound = frontend::bind(
            "",
            "",
            std::iter::once(0),
            values,
            |v, buf| {
                buf.extend_from_slice(v.as_bytes());
                Ok(IsNull::No)
            },
            std::iter::once(0),
            out,
        );
        // Names come from the startup packet, already checked for NUL-free UTF-8.
        bound.unwrap_or_else(|_| unreachable!("text parameters always serialize"));
        frontend::execute("", 0, out).expect("unnamed portal");
        // The assertion takes role and client name as parameters: it must
        // not stay behind as the connection's unnamed statement, where a
        // client's `Bind` of "" could run it with values of its own.
        frontend::close(b'S', "", out).expect("unnamed statement");
    }

    /// Runs the assertion on `conn` and waits for its outcome (nothing else
    /// in flight).
    pub async fn apply(&self, conn: &mut ServerConn) -> Result<(), AssertError> {
        let mut out = BytesMut::with_capacity(512);
        self.encode(&mut out);
        let result = async {
            conn.write_all(&out).await?;
            self.check_reply(conn).await
        }
        .await;
        result.map_err(|e| self.failure(e))
    }

    async fn check_reply(&self, conn: &mut ServerConn) -> Result<(), BackendError> {
        let mut confirmed = false;
        let mut error = None;
        loop {
            let frame = conn.read_frame().await?;
            match frame[0] {
                b'D' => confirmed = self.row_matches(&frame[5..])?,
                b'E' if error.is_none() => error = Some(messages::parse_error_fields(&frame[5..])?),
                b'Z' => break,
                _ => {}
            }
        }
        if let Some(fields) = error {
            return Err(BackendError::Server(fields));
        }
        if !confirmed {
            return Err(BackendError::Auth(
                "the backend did not confirm the role and client name".into(),
            ));
        }
        Ok(())
    }

    fn row_matches(&self, body: &[u8]) -> Result<bool, BackendError> {
        row_matches(body, 2 + self.settings.len(), self.role, self.value())
    }

    /// What the client-user setting is set to: the signed tag, or the name.
    pub fn value(&self) -> &str {
        self.tag.unwrap_or(self.client_user)
    }

    fn failure(&self, e: BackendError) -> AssertError {
        let cause = match &e {
            BackendError::Server(fields) => {
                format!("{} (SQLSTATE {})", fields.message, fields.code)
            }
            other => other.to_string(),
        };
        AssertError {
            role: self.role.to_string(),
            client_user: self.client_user.to_string(),
            cause,
        }
    }
}

/// The identity assertion failed on a server connection (which is then
/// discarded); `session::refusal` says it to the client.
#[derive(Debug)]
pub struct AssertError {
    pub role: String,
    pub client_user: String,
    /// What PostgreSQL (or the connection) said.
    pub cause: String,
}

impl std::fmt::Display for AssertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "could not switch to role \"{}\" for user \"{}\": {}",
            self.role, self.client_user, self.cause
        )
    }
}

/// What a `verify = "transaction"` check found on a server connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact,
    /// The connection no longer carries the identity that was asserted.
    Violated {
        found_role: String,
        found_user: String,
    },
}

impl Assertion<'_> {
    /// Confirms the connection still carries this identity: `current_user`
    /// is the role and the client-user setting is the client. Runs as a
    /// simple query so no client statement (named or unnamed) is disturbed.
    pub async fn verify(&self, conn: &mut ServerConn) -> Result<Verdict, BackendError> {
        let rows = conn.simple_rows(&verify_sql(self.setting)).await?;
        let found = match rows.last().map(Vec::as_slice) {
            Some([role, user]) => (
                role.clone().unwrap_or_default(),
                user.clone().unwrap_or_default(),
            ),
            _ => Default::default(),
        };
        Ok(self.judge(found))
    }

    /// The verdict on what a verification query returned.
    pub fn judge(&self, (found_role, found_user): (String, String)) -> Verdict {
        if found_role == self.role && found_user == self.value() {
            Verdict::Intact
        } else {
            Verdict::Violated {
                found_role,
                found_user,
            }
        }
    }
}

/// The verification query: `current_user` and the client-user setting. The
/// setting name is the operator's configuration, quoted as a literal.
fn verify_sql(setting: &str) -> String {
    format!(
        "SELECT current_user, pg_catalog.current_setting('{}', true)",
        setting.replace('\'', "''")
    )
}

/// Whether the assertion's row (`DataRow` body) holds `columns` columns,
/// the first two being exactly `role` and `value`.
fn row_matches(body: &[u8], columns: usize, role: &str, value: &str) -> Result<bool, BackendError> {
    let mut r = Reader::new(body, "DataRow");
    if r.i16()? as usize != columns {
        return Ok(false);
    }
    let mut column = || -> Result<Option<&[u8]>, BackendError> {
        let len = r.i32()?;
        Ok(if len < 0 {
            None
        } else {
            Some(r.bytes(len as usize)?)
        })
    };
    let found_role = column()?;
    let found_value = column()?;
    Ok(found_role == Some(role.as_bytes()) && found_value == Some(value.as_bytes()))
}

/// Parse, Bind and Execute of `sql` as the unnamed statement and portal,
/// then Close of the statement, so that nothing of the gateway's stays
/// behind for a client's `Bind` of "".
fn unnamed_statement(sql: &str, out: &mut BytesMut) {
    frontend::parse("", sql, std::iter::empty(), out).expect("no NUL in generated SQL");
    frontend::bind(
        "",
        "",
        std::iter::empty(),
        std::iter::empty::<&str>(),
        |_, _| Ok(IsNull::No),
        std::iter::empty(),
        out,
    )
    .unwrap_or_else(|_| unreachable!("no parameters"));
    frontend::execute("", 0, out).expect("unnamed portal");
    frontend::close(b'S', "", out).expect("unnamed statement");
}

/// What the server answers to a pipelined assertion, in order: a reply of
/// this tag, a simple query's `ReadyForQuery` (its other answers skipped
/// on the way), or the assertion's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Reply(u8),
    Ready,
    /// The reset's `ReadyForQuery`, when there is a reset.
    ResetReady,
    Row,
}

use Answer::{Ready, Reply, ResetReady, Row};

/// `BEGIN`, the reset, the assertion and `COMMIT` (each statement parsed,
/// bound, executed and closed), then the empty query whose `ReadyForQuery`
/// carries the setting reports.
const ANSWERS: [Answer; 15] = [
    Reply(b'1'),
    Reply(b'2'),
    Reply(b'C'),
    Reply(b'3'),
    ResetReady,
    Reply(b'1'),
    Reply(b'2'),
    Row,
    Reply(b'C'),
    Reply(b'3'),
    Reply(b'1'),
    Reply(b'2'),
    Reply(b'C'),
    Reply(b'3'),
    Ready,
];

/// An identity assertion sent in the same write as the client's first
/// message of a transaction, whose answers are still to be read.
///
/// Why it is safe to send the client's messages before the answer:
/// - everything is extended-protocol and unsynced, so an error anywhere in
///   it (the reset, the role switch, the commit) makes PostgreSQL skip every
///   message after it up to the next `Sync`: the client's messages never
///   run. The gateway sends the client's messages only up to their first
///   `Sync` (or simple query) before the answer is read, so nothing of the
///   client's lies beyond that `Sync`;
/// - the reset runs inside the `BEGIN` block, so a reset that fails aborts
///   the block and the assertion after it fails too;
/// - the assertion commits in its own transaction (`COMMIT` commits as soon
///   as it executes, before the client's first message is read), so no
///   `ROLLBACK` of the client's can undo it;
/// - an empty query ends it, whose `ReadyForQuery` reports the settings the
///   assertion applied: PostgreSQL reports a change only against what it
///   last reported, so this keeps the client's own changes reported.
#[derive(Debug)]
pub struct Pipelined {
    /// A reset went first (its answers are due too).
    reset: bool,
    /// The next of [`ANSWERS`] due.
    next: usize,
    role: String,
    client_user: String,
    value: String,
    columns: usize,
}

/// Where reading a pipelined assertion's answers stands.
#[derive(Debug)]
pub enum Progress {
    /// More answers are due.
    More,
    /// The identity is in place, committed.
    Confirmed,
    /// PostgreSQL refused part of it, so it skipped the client's messages
    /// up to their `Sync`: they did not run.
    Refused(AssertError),
    /// The answers were not those of the assertion (or its row held other
    /// values): what the client's messages did is unknown.
    Broken(String),
}

impl Pipelined {
    /// Reads one server message (`tag`, `body`) of the assertion's answers.
    /// Notices, parameter changes and notifications are the caller's.
    pub fn on_frame(&mut self, tag: u8, body: &[u8]) -> Progress {
        if !self.reset && ANSWERS.get(self.next) == Some(&ResetReady) {
            self.next += 1;
        }
        let Some(&expected) = ANSWERS.get(self.next) else {
            return Progress::Confirmed;
        };
        if tag == b'E' {
            let cause = match messages::parse_error_fields(body) {
                Ok(fields) => format!("{} (SQLSTATE {})", fields.message, fields.code),
                Err(e) => e.to_string(),
            };
            return Progress::Refused(AssertError {
                role: self.role.clone(),
                client_user: self.client_user.clone(),
                cause,
            });
        }
        match (expected, tag) {
            (Ready | ResetReady, b'Z') => self.next += 1,
            (Ready | ResetReady, _) => {}
            (Row, b'D') => match row_matches(body, self.columns, &self.role, &self.value) {
                Ok(true) => self.next += 1,
                _ => {
                    return Progress::Broken(
                        "the backend did not confirm the role and client name".into(),
                    )
                }
            },
            (Reply(want), got) if want == got => self.next += 1,
            (_, got) => {
                return Progress::Broken(format!(
                    "unexpected message 0x{got:02X} in the identity assertion's answers"
                ))
            }
        }
        match self.next == ANSWERS.len() {
            true => Progress::Confirmed,
            false => Progress::More,
        }
    }
}

#[cfg(test)]
#[path = "assert_tests.rs"]
mod tests;
