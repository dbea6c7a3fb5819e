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
    /// Appends the assertion's messages (Parse/Bind/Execute/Sync) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
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
        frontend::sync(out);
    }

    /// Runs the assertion on `conn` and waits for its outcome.
    pub async fn apply(&self, conn: &mut ServerConn) -> Result<(), AssertError> {
        self.apply_after(conn, None).await
    }

    /// Runs the simple query `first` (a reset), if any, then the assertion,
    /// sent in one write (one round trip), and waits for both; the
    /// assertion's reply is read even when `first` failed, so the
    /// connection is left at a known point.
    pub async fn apply_after(
        &self,
        conn: &mut ServerConn,
        first: Option<&str>,
    ) -> Result<(), AssertError> {
        let mut out = BytesMut::with_capacity(512);
        if let Some(sql) = first {
            messages::query(&mut out, sql);
        }
        self.encode(&mut out);
        let result = async {
            conn.write_all(&out).await?;
            let reset = match first {
                Some(_) => conn.drain_until_ready().await.map(drop),
                None => Ok(()),
            };
            let asserted = self.check_reply(conn).await;
            reset.and(asserted)
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
        let mut r = Reader::new(body, "DataRow");
        if r.i16()? as usize != 2 + self.settings.len() {
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
        let role = column()?;
        let user = column()?;
        Ok(role == Some(self.role.as_bytes()) && user == Some(self.value().as_bytes()))
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
