//! The settings a client carries from server connection to server
//! connection, without I/O: its startup settings and the reported ones it
//! changed since, the session-level settings kept in transaction pooling
//! (`[pool] session_set = "keep"`, [`crate::session::kept`]), its
//! application name as records show it, and what its text's encoding is.
//!
//! Invariant: every connection that serves the client gets these settings
//! (the identity assertion applies them); a setting the gateway protects
//! (`role`, the client tag) is never carried.

use std::borrow::Cow;
use std::sync::Arc;

use crate::config::SessionSet;
use crate::session::kept;
use crate::session::refusal::Refusal;

/// One client's carried settings.
#[derive(Debug)]
pub struct Carried {
    client_user: Arc<str>,
    /// Shared with the custody of the connection that carries them.
    values: Arc<Vec<(String, String)>>,
    /// Settings the current transaction may have changed for the session,
    /// read back when it ends.
    pending: Vec<String>,
    /// The application name as the client last set it (its startup one
    /// until a `SET application_name`).
    application_name: Option<Arc<str>>,
    /// The client set `application_name`: the bound connection shows it
    /// without the client's name until the gateway re-applies it.
    retag: bool,
    /// A statement that may change `client_encoding` has not been answered
    /// yet: the encoding of text sent behind it is not known.
    encoding_in_flux: bool,
    /// What the client was last told of each reported parameter.
    shown: Vec<(String, String)>,
    /// What held before a setting changed in the open transaction, until
    /// it ends: a transaction lost with its connection rolls back to it.
    before: Option<Box<Before>>,
}

/// The settings as they were when the open transaction changed one.
#[derive(Debug)]
struct Before {
    values: Arc<Vec<(String, String)>>,
    shown: Vec<(String, String)>,
    application_name: Option<Arc<str>>,
    retag: bool,
}

impl Carried {
    pub fn new(
        client_user: &str,
        startup: Vec<(String, String)>,
        application_name: Option<Arc<str>>,
    ) -> Carried {
        Carried {
            client_user: Arc::from(client_user),
            values: Arc::new(startup),
            pending: Vec::new(),
            application_name,
            retag: false,
            encoding_in_flux: false,
            shown: Vec::new(),
            before: None,
        }
    }

    /// The parameters the client was told of at login.
    pub fn showing(mut self, shown: Vec<(String, String)>) -> Carried {
        self.shown = shown;
        self
    }

    /// Whether a reported parameter is news to the client, as PostgreSQL
    /// reports only a change: a value the client was already told of (a
    /// connection taking on the client's own settings, its application
    /// name with the client's name added) is not.
    pub fn news(&mut self, name: &str, value: &str) -> bool {
        let seen = self.shown.iter().position(|(k, _)| k == name);
        if let Some(shown) = seen.map(|i| &self.shown[i].1) {
            let decorated =
                crate::session::state::decorated_application_name(shown, &self.client_user);
            if shown == value || (name == "application_name" && value == decorated) {
                return false;
            }
        }
        self.remember_before();
        match seen {
            Some(i) => self.shown[i].1 = value.to_string(),
            None => self.shown.push((name.to_string(), value.to_string())),
        }
        true
    }

    /// Keeps what holds now, before the first change in this transaction.
    fn remember_before(&mut self) {
        if self.before.is_none() {
            self.before = Some(Box::new(Before {
                values: self.values.clone(),
                shown: self.shown.clone(),
                application_name: self.application_name.clone(),
                retag: self.retag,
            }));
        }
    }

    /// The transaction ended (`ReadyForQuery` `I`): its changes hold.
    pub fn transaction_ended(&mut self) {
        self.before = None;
    }

    /// The transaction was lost with its connection, uncommitted: its
    /// changes are undone, and the reports the client must get to know it
    /// (PostgreSQL reports a setting a rollback restores) are written to
    /// `out`.
    pub fn roll_back(&mut self, out: &mut bytes::BytesMut) {
        let Some(before) = self.before.take() else {
            return;
        };
        for (name, value) in &before.shown {
            if self.shown.iter().all(|(k, v)| k != name || v != value) {
                crate::protocol::messages::parameter_status(out, name, value);
            }
        }
        self.values = before.values;
        self.shown = before.shown;
        self.application_name = before.application_name;
        self.retag = before.retag;
    }

    /// The settings every connection that serves the client gets.
    pub fn values(&self) -> &Arc<Vec<(String, String)>> {
        &self.values
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The application name records carry.
    pub fn application_name(&self) -> Option<Arc<str>> {
        self.application_name.clone()
    }

    /// The client's `client_encoding` (its startup value or the one it
    /// set since; the server's default, UTF-8 here, when it named none).
    pub fn client_encoding(&self) -> &str {
        self.get("client_encoding").unwrap_or("UTF8")
    }

    /// The session's `standard_conforming_strings` (how its texts lex).
    pub fn standard_strings(&self) -> bool {
        self.get("standard_conforming_strings") != Some("off")
    }

    /// Client bytes as the audit log keeps them: exact UTF-8, or the bytes
    /// ([`crate::protocol::encoding::client_text`]). The encoding the
    /// server reads them in is the one in force when they get there; a
    /// change still in flight makes it uncertain.
    pub fn client_text<'b>(&self, bytes: &'b [u8]) -> Cow<'b, str> {
        let encoding = match self.encoding_in_flux {
            true => "unknown",
            false => self.client_encoding(),
        };
        crate::protocol::encoding::client_text(bytes, encoding)
    }

    /// `sql` is about to be forwarded: if it may change the client
    /// encoding, non-ASCII text behind it is recorded as its bytes until
    /// the server has answered everything ([`Self::settled`]).
    pub fn note_text(&mut self, sql: &[u8]) {
        static ENCODING: crate::identity::keywords::Keywords =
            crate::identity::keywords::Keywords::new(&["encoding", "names"]);
        self.encoding_in_flux |= ENCODING.in_text(sql);
    }

    /// The server has answered everything the client sent.
    pub fn settled(&mut self) {
        self.encoding_in_flux = false;
    }

    /// In transaction pooling, a statement about to run may change `names`
    /// for the session. `"keep"` notes them, to be read back when the
    /// transaction ends ([`Self::take_pending`]); `"error"` refuses the
    /// statement when `refusable` (the names come from its text, so the
    /// change certainly outlasts the transaction if it succeeds).
    /// `protected`: a setting the gateway owns, never kept.
    pub fn note_session_sets(
        &mut self,
        names: &[String],
        refusable: bool,
        policy: SessionSet,
        protected: impl Fn(&str) -> bool,
    ) -> Result<(), Refusal> {
        if policy == SessionSet::Error {
            return match refusable && !names.is_empty() {
                true => Err(Refusal::SessionSet),
                false => Ok(()),
            };
        }
        for name in names {
            let noted = self.pending.iter().any(|n| n.eq_ignore_ascii_case(name));
            if protected(name) || !kept::valid_name(name) || noted {
                continue;
            }
            let known = self
                .values
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name));
            if !known && self.values.len() + self.pending.len() >= kept::MAX_KEPT {
                return Err(Refusal::TooManyKept {
                    name: name.clone(),
                    max: kept::MAX_KEPT,
                });
            }
            self.pending.push(name.clone());
        }
        Ok(())
    }

    /// The names noted since the last call, to read back now.
    pub fn take_pending(&mut self) -> Vec<String> {
        std::mem::take(&mut self.pending)
    }

    /// Keeps the values read back for the session.
    pub fn keep(&mut self, values: Vec<(String, String)>) {
        let settings = Arc::make_mut(&mut self.values);
        for (name, value) in values {
            kept::keep(settings, name, value);
        }
    }

    /// The server reported a setting (`ParameterStatus`): a tracked one
    /// follows the client to its next connection.
    pub fn reported(&mut self, name: &str, value: &str) {
        let settings = Arc::make_mut(&mut self.values);
        crate::session::state::track(settings, name, value, &self.client_user);
        if name.eq_ignore_ascii_case("application_name")
            && !value.ends_with(&format!("[{}]", self.client_user))
        {
            self.retag = true;
            self.application_name = Some(Arc::from(value));
        }
    }

    /// Whether the bound connection shows an application name without the
    /// client's name.
    pub fn wants_retag(&self) -> bool {
        self.retag
    }

    /// The query that re-applies the client's (tagged) application name
    /// on the bound connection, so `pg_stat_activity` and the server log
    /// keep showing who it is.
    pub fn retag_sql(&mut self) -> Option<String> {
        self.retag = false;
        let name = self.get("application_name")?;
        let literal = name.replace('\\', "\\\\").replace('\'', "''");
        Some(format!(
            "SELECT pg_catalog.set_config('application_name', E'{literal}', false)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carried() -> Carried {
        Carried::new("alice", vec![("DateStyle".into(), "ISO".into())], None)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keep_notes_each_session_setting_once_and_skips_protected_ones() {
        let mut c = carried();
        let protected = |n: &str| n.eq_ignore_ascii_case("role");
        c.note_session_sets(
            &names(&["work_mem", "ROLE"]),
            true,
            SessionSet::Keep,
            protected,
        )
        .unwrap();
        c.note_session_sets(&names(&["WORK_MEM"]), true, SessionSet::Keep, protected)
            .unwrap();
        assert_eq!(c.take_pending(), names(&["work_mem"]));
        assert!(c.take_pending().is_empty());
    }

    #[test]
    fn error_refuses_only_settings_named_in_the_text() {
        let mut c = carried();
        let none = |_: &str| false;
        assert!(matches!(
            c.note_session_sets(&names(&["work_mem"]), true, SessionSet::Error, none),
            Err(Refusal::SessionSet)
        ));
        assert!(c
            .note_session_sets(&names(&["work_mem"]), false, SessionSet::Error, none)
            .is_ok());
        assert!(c
            .note_session_sets(&[], true, SessionSet::Error, none)
            .is_ok());
        assert!(c.take_pending().is_empty());
    }

    #[test]
    fn too_many_kept_settings_are_refused_but_known_ones_still_change() {
        let startup = (0..kept::MAX_KEPT)
            .map(|i| (format!("app.s{i}"), "v".to_string()))
            .collect();
        let mut c = Carried::new("alice", startup, None);
        let none = |_: &str| false;
        assert!(matches!(
            c.note_session_sets(&names(&["app.new"]), true, SessionSet::Keep, none),
            Err(Refusal::TooManyKept { .. })
        ));
        assert!(c
            .note_session_sets(&names(&["app.s3"]), true, SessionSet::Keep, none)
            .is_ok());
    }

    #[test]
    fn kept_values_replace_earlier_ones_without_touching_shared_copies() {
        let mut c = carried();
        let before = c.values().clone();
        c.keep(vec![("datestyle".into(), "German".into())]);
        assert_eq!(before[0].1, "ISO");
        assert_eq!(
            c.values()[0],
            ("DateStyle".to_string(), "German".to_string())
        );
    }

    #[test]
    fn a_client_set_application_name_is_recorded_and_retagged() {
        let mut c = carried();
        c.reported("application_name", "batch");
        assert_eq!(c.application_name().as_deref(), Some("batch"));
        assert!(c.wants_retag());
        let sql = c.retag_sql().unwrap();
        assert!(sql.contains("E'batch [alice]'"), "{sql}");
        assert!(!c.wants_retag());
        // The tagged value coming back is the gateway's own.
        c.reported("application_name", "batch [alice]");
        assert!(!c.wants_retag());
    }

    #[test]
    fn retagging_escapes_the_name() {
        let mut c = carried();
        c.reported("application_name", "it's\\x");
        let sql = c.retag_sql().unwrap();
        assert!(sql.contains(r"E'it''s\\x [alice]'"), "{sql}");
    }

    #[test]
    fn text_behind_an_encoding_change_is_kept_as_bytes_until_answered() {
        let mut c = carried();
        let latin = b"caf\xe9";
        assert_eq!(c.client_encoding(), "UTF8");
        c.note_text(b"SELECT 1");
        assert_eq!(c.client_text(b"plain"), "plain");
        c.note_text(b"SET client_encoding TO 'LATIN1'");
        let uncertain = c.client_text(latin).into_owned();
        c.reported("client_encoding", "LATIN1");
        c.settled();
        assert_eq!(c.client_text(latin), "café");
        assert_ne!(uncertain, "café");
    }

    #[test]
    fn standard_strings_follow_the_reported_setting() {
        let mut c = carried();
        assert!(c.standard_strings());
        c.reported("standard_conforming_strings", "off");
        assert!(!c.standard_strings());
    }
}
