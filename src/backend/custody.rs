//! What a server connection carries for the gateway: whose identity and
//! settings the last assertion put on it, the signed tag it set, and what
//! sessions may have left on it (state, opaque code, sequence state). Pure
//! bookkeeping, owned by the connection (`conn.rs`); a binding asks it what
//! to send before the client's first message ([`Custody::prepare`]), and
//! nothing else edits it but the methods below.

use std::sync::Arc;

/// Who a binding wants the connection to serve.
pub struct Wanted<'a> {
    /// The session id: state it left here is its own.
    pub session: &'a str,
    pub role: &'a str,
    pub client_user: &'a str,
    /// The client's settings, applied with the identity.
    pub settings: &'a [(String, String)],
    /// The id of the database's tag key, when the client tag is signed.
    pub tag_key: Option<i32>,
}

/// What a binding sends before the client's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preparation {
    /// Clear everything another session left (the reset SQL).
    pub reset: bool,
    /// `DISCARD SEQUENCES`: another session's sequence state is here.
    pub discard_sequences: bool,
    /// Assert the identity and settings (one round trip).
    pub assert: bool,
}

#[derive(Debug, Default)]
pub struct Custody {
    /// The (role, client user) the last successful identity assertion set,
    /// `None` when unknown (new, reset, or the assertion failed).
    identity: Option<(Arc<str>, Arc<str>)>,
    /// The signed client tag the last assertion set (key id, value), or
    /// `None` for the plain name.
    tag: Option<(i32, Arc<str>)>,
    /// The client settings the last assertion applied.
    applied: Option<Arc<Vec<(String, String)>>>,
    /// The session that may have left state here (settings, temp objects,
    /// cursors...); another session gets the connection only after a reset.
    dirty_by: Option<Arc<str>>,
    /// Code pgwarden cannot see into ran here since the last identity
    /// assertion made while no transaction was open (see
    /// `session::opaque`): the identity must be asserted afresh before the
    /// next transaction, and another session gets the connection only after
    /// a reset. Cleared only by such an assertion.
    opaque: bool,
    /// The session that may have left sequence state here (`currval`,
    /// `lastval`, set by `nextval` in a column default or trigger): another
    /// session gets `DISCARD SEQUENCES` first.
    sequences_by: Option<Arc<str>>,
}

impl Custody {
    /// Decides what a fresh binding for `wanted` sends first, and forgets
    /// what a reset will clear.
    pub fn prepare(&mut self, wanted: &Wanted<'_>) -> Preparation {
        // Another session's state, or a setting the last client brought
        // that this one's assertion would not overwrite (`client_encoding`,
        // `work_mem`... must not reach a client who did not ask for them).
        let reset = self.dirty_for(wanted.session) || self.leaves_settings_behind(wanted.settings);
        if reset {
            self.forget();
        }
        let discard_sequences = self.take_others_sequences(wanted.session);
        let assert = reset
            || self.tag_key() != wanted.tag_key
            || !self.carries(wanted.role, wanted.client_user, wanted.settings);
        Preparation {
            reset,
            discard_sequences,
            assert,
        }
    }

    /// Whether a connection kept across transactions (pinned, or session
    /// pooling) needs the identity asserted afresh before the next one:
    /// opaque code ran, or the tag key changed.
    pub fn needs_reassert(&self, tag_key: Option<i32>) -> bool {
        self.opaque || self.tag_key() != tag_key
    }

    /// Whether the last assertion here set this identity and these
    /// settings, and nothing opaque ran since.
    pub fn carries(&self, role: &str, client_user: &str, settings: &[(String, String)]) -> bool {
        let identity = self
            .identity
            .as_ref()
            .is_some_and(|(r, u)| **r == *role && **u == *client_user);
        let applied = self.applied.as_ref().is_some_and(|a| **a == *settings);
        identity && applied && !self.opaque
    }

    /// Whether code pgwarden cannot see into ran here since the last
    /// assertion made between transactions.
    pub fn is_opaque(&self) -> bool {
        self.opaque
    }

    /// The id of the tag key the last assertion signed with.
    pub fn tag_key(&self) -> Option<i32> {
        self.tag.as_ref().map(|(id, _)| *id)
    }

    /// The client-user value the last assertion set when it was signed.
    pub fn tag_value(&self) -> Option<&str> {
        self.tag.as_ref().map(|(_, v)| &**v)
    }

    /// An assertion is about to run: until it succeeds, the connection
    /// carries no known identity or settings.
    pub fn forget_identity(&mut self) {
        self.identity = None;
        self.tag = None;
        self.applied = None;
    }

    /// An assertion made between transactions succeeded: the connection
    /// carries this identity and these settings, and nothing opaque.
    pub fn asserted(
        &mut self,
        identity: (Arc<str>, Arc<str>),
        settings: Arc<Vec<(String, String)>>,
        tag: Option<(i32, Arc<str>)>,
    ) {
        self.identity = Some(identity);
        self.tag = tag;
        self.applied = Some(settings);
        self.opaque = false;
    }

    /// `session` changed settings here, which now are `settings` (the
    /// server reported one, or the gateway read them back).
    pub fn settings_changed(&mut self, session: &Arc<str>, settings: Arc<Vec<(String, String)>>) {
        self.mark_dirty(session);
        self.applied = Some(settings);
    }

    /// `session` may have left state here: another session gets the
    /// connection only after a reset.
    pub fn mark_dirty(&mut self, session: &Arc<str>) {
        self.dirty_by.get_or_insert_with(|| session.clone());
    }

    /// `session` ran code pgwarden cannot see into here: see
    /// [`Custody::opaque`].
    pub fn mark_opaque(&mut self, session: &Arc<str>) {
        self.opaque = true;
        self.mark_dirty(session);
    }

    /// Records that `session` may have left sequence state here (see
    /// [`Custody::sequences_by`]).
    pub fn note_sequences(&mut self, session: &Arc<str>) {
        self.sequences_by.get_or_insert_with(|| session.clone());
    }

    /// Forgets what a session left here, once a reset has cleared it on
    /// the server (or is sent ahead of the next assertion).
    pub fn forget(&mut self) {
        self.identity = None;
        self.applied = None;
        self.dirty_by = None;
        self.sequences_by = None;
    }

    /// Whether a session other than `session` may have left state here.
    fn dirty_for(&self, session: &str) -> bool {
        self.dirty_by
            .as_ref()
            .is_some_and(|owner| **owner != *session)
    }

    /// Whether the settings the last assertion applied include one that
    /// `settings` would not overwrite (it must not reach their owner).
    fn leaves_settings_behind(&self, settings: &[(String, String)]) -> bool {
        self.applied.as_ref().is_some_and(|applied| {
            applied.iter().any(|(name, _)| {
                !settings
                    .iter()
                    .any(|(mine, _)| mine.eq_ignore_ascii_case(name))
            })
        })
    }

    /// Whether a session other than `session` may have left sequence state
    /// here; forgets it (the caller sends `DISCARD SEQUENCES`).
    fn take_others_sequences(&mut self, session: &str) -> bool {
        let others = self
            .sequences_by
            .as_ref()
            .is_some_and(|owner| **owner != *session);
        if others {
            self.sequences_by = None;
        }
        others
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn wanted<'a>(session: &'a str, user: &'a str, settings: &'a [(String, String)]) -> Wanted<'a> {
        Wanted {
            session,
            role: "analyst",
            client_user: user,
            settings,
            tag_key: None,
        }
    }

    /// Binds `w` as a binding does: prepares, and records the assertion.
    fn bind(c: &mut Custody, w: &Wanted<'_>) -> Preparation {
        let p = c.prepare(w);
        if p.assert {
            c.forget_identity();
            c.asserted(
                (Arc::from(w.role), Arc::from(w.client_user)),
                Arc::new(w.settings.to_vec()),
                w.tag_key.map(|id| (id, Arc::from("signed"))),
            );
        }
        p
    }

    const NOTHING: Preparation = Preparation {
        reset: false,
        discard_sequences: false,
        assert: false,
    };
    const ASSERT: Preparation = Preparation {
        assert: true,
        ..NOTHING
    };
    const RESET: Preparation = Preparation {
        reset: true,
        assert: true,
        ..NOTHING
    };

    #[test]
    fn a_connection_is_asserted_once_for_the_same_client_and_settings() {
        let s = settings(&[("application_name", "app")]);
        let mut c = Custody::default();
        assert_eq!(bind(&mut c, &wanted("s1", "alice", &s)), ASSERT, "new");
        assert_eq!(bind(&mut c, &wanted("s1", "alice", &s)), NOTHING, "same");
        assert_eq!(
            bind(&mut c, &wanted("s2", "alice", &s)),
            NOTHING,
            "same identity, clean"
        );
        assert_eq!(
            bind(&mut c, &wanted("s3", "dave", &s)),
            ASSERT,
            "another client"
        );
        let other = settings(&[("application_name", "other")]);
        assert_eq!(
            bind(&mut c, &wanted("s3", "dave", &other)),
            ASSERT,
            "other settings"
        );
    }

    #[test]
    fn state_left_by_a_session_is_reset_for_any_other() {
        let s = settings(&[]);
        let mut c = Custody::default();
        bind(&mut c, &wanted("s1", "alice", &s));
        c.mark_dirty(&Arc::from("s1"));
        assert_eq!(
            bind(&mut c, &wanted("s1", "alice", &s)),
            NOTHING,
            "its own state"
        );
        assert_eq!(
            bind(&mut c, &wanted("s2", "alice", &s)),
            RESET,
            "same identity, another session"
        );
        assert_eq!(
            bind(&mut c, &wanted("s3", "alice", &s)),
            NOTHING,
            "the reset cleared it"
        );
    }

    #[test]
    fn settings_another_client_brought_are_reset_when_not_overwritten() {
        let mine = settings(&[("work_mem", "1GB")]);
        let none = settings(&[]);
        let mut c = Custody::default();
        bind(&mut c, &wanted("s1", "alice", &mine));
        assert_eq!(bind(&mut c, &wanted("s2", "dave", &none)), RESET);
        let overwritten = settings(&[("WORK_MEM", "4MB")]);
        bind(&mut c, &wanted("s1", "alice", &mine));
        assert_eq!(bind(&mut c, &wanted("s2", "dave", &overwritten)), ASSERT);
    }

    #[test]
    fn opaque_code_forces_an_assertion_and_a_reset_for_others() {
        let s = settings(&[]);
        let mut c = Custody::default();
        bind(&mut c, &wanted("s1", "alice", &s));
        c.mark_opaque(&Arc::from("s1"));
        assert!(c.needs_reassert(None));
        assert_eq!(
            bind(&mut c, &wanted("s1", "alice", &s)),
            ASSERT,
            "its own: asserted afresh"
        );
        assert!(!c.needs_reassert(None));
        c.mark_opaque(&Arc::from("s1"));
        assert_eq!(bind(&mut c, &wanted("s2", "alice", &s)), RESET);
    }

    #[test]
    fn a_new_tag_key_forces_an_assertion() {
        let s = settings(&[]);
        let mut c = Custody::default();
        let mut w = wanted("s1", "alice", &s);
        w.tag_key = Some(1);
        assert_eq!(bind(&mut c, &w), ASSERT);
        assert_eq!(bind(&mut c, &w), NOTHING);
        assert_eq!(c.tag_value(), Some("signed"));
        w.tag_key = Some(2);
        assert!(c.needs_reassert(Some(2)));
        assert_eq!(bind(&mut c, &w), ASSERT, "rekeyed");
    }

    #[test]
    fn another_sessions_sequence_state_is_discarded_once() {
        let s = settings(&[]);
        let mut c = Custody::default();
        bind(&mut c, &wanted("s1", "alice", &s));
        c.note_sequences(&Arc::from("s1"));
        assert_eq!(bind(&mut c, &wanted("s1", "alice", &s)), NOTHING);
        let p = bind(&mut c, &wanted("s2", "alice", &s));
        assert_eq!(
            p,
            Preparation {
                discard_sequences: true,
                ..NOTHING
            }
        );
        assert_eq!(bind(&mut c, &wanted("s3", "alice", &s)), NOTHING);
    }

    #[test]
    fn a_failed_assertion_leaves_no_identity() {
        let s = settings(&[]);
        let mut c = Custody::default();
        bind(&mut c, &wanted("s1", "alice", &s));
        c.forget_identity();
        assert!(!c.carries("analyst", "alice", &s));
        assert_eq!(bind(&mut c, &wanted("s1", "alice", &s)), ASSERT);
    }
}
