//! The client's prepared statements and portals by the client's names:
//! what it parsed and bound, put back as it was when the server refuses or
//! skips the message, and the names it may use.

use bytes::Bytes;

use crate::protocol::messages::PgError;
use crate::protocol::sqlstate;
use crate::session::ledger::Control;
use crate::session::outcome::{CacheEffects, Portal};
use crate::session::prepared::Statement;

/// A client's statements or portals by name. Names are short and each map
/// belongs to one session (a client can only slow down itself), so FNV-1a
/// replaces SipHash, which cost more than the lookup (callgrind).
pub type NameMap<V> = std::collections::HashMap<Bytes, V, std::hash::BuildHasherDefault<Fnv1a>>;

/// FNV-1a, 64 bits.
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What an entry keeps of the client's messages, in bytes.
pub trait Kept {
    fn size(&self) -> usize;
}

impl Kept for Statement {
    fn size(&self) -> usize {
        Statement::size(self)
    }
}

impl Kept for Portal {
    /// The parameters kept for its record (its text is its statement's).
    fn size(&self) -> usize {
        logged_size(&self.params)
    }
}

/// The bytes of the parameters a portal keeps for its record.
pub fn logged_size(params: &Option<Vec<Option<String>>>) -> usize {
    let params = params.iter().flatten();
    params.map(|p| p.as_ref().map_or(0, String::len)).sum()
}

/// A client's statements or portals by name, and the bytes they and their
/// names keep (`[server] prepared_statement_memory` bounds them).
pub struct Named<V> {
    map: NameMap<V>,
    bytes: usize,
}

impl<V> Default for Named<V> {
    fn default() -> Self {
        Named {
            map: NameMap::default(),
            bytes: 0,
        }
    }
}

impl<V: Kept> Named<V> {
    pub fn get(&self, name: &[u8]) -> Option<&V> {
        self.map.get(name)
    }

    /// The bytes the entry of `name`, if any, and its name keep.
    pub fn kept_by(&self, name: &[u8]) -> usize {
        self.get(name).map_or(0, |v| name.len() + v.size())
    }

    pub fn contains_key(&self, name: &[u8]) -> bool {
        self.map.contains_key(name)
    }

    pub fn insert(&mut self, name: Bytes, value: V) -> Option<V> {
        let len = name.len();
        self.bytes += len + value.size();
        let previous = self.map.insert(name, value);
        if let Some(previous) = &previous {
            self.bytes -= len + previous.size();
        }
        previous
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<V> {
        let (name, removed) = self.map.remove_entry(name)?;
        self.bytes -= name.len() + removed.size();
        Some(removed)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&Bytes, &mut V) -> bool) {
        let bytes = &mut self.bytes;
        self.map.retain(|name, v| {
            let kept = keep(name, v);
            if !kept {
                *bytes -= name.len() + v.size();
            }
            kept
        });
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The bytes the entries and their names keep.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The client's prepared statements by name.
pub type Statements = Named<Statement>;

/// Savepoints followed per transaction at most.
const MAX_SAVEPOINTS: usize = 4096;

/// The client's names.
#[derive(Default)]
pub struct Names {
    /// Prepared statements ("" = unnamed).
    pub statements: Statements,
    /// Portals: their statement's text (and parameters for the record,
    /// when auditing), and whether it may start a COPY from the client.
    pub portals: Named<Portal>,
    /// Portals opened so far, and the savepoints of the open transaction
    /// with that count when each was set (when auditing).
    opened: u64,
    savepoints: Vec<(Box<str>, u64)>,
    /// Portals were forgotten: the server may have some the map lacks
    /// (for the session's life: code that opened one `WITH HOLD` may have
    /// run).
    forgot: bool,
    /// The portals opened up to this number may be gone (not `WITH HOLD`
    /// ones): a message that may end their transaction was sent, and the
    /// server's `ReadyForQuery` that clears them has not come yet.
    ended_before: u64,
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names")
            .field("statements", &self.statements.len())
            .field("portals", &self.portals.len())
            .finish()
    }
}

impl Names {
    /// Opens portal `name`, replacing any of that name (returned).
    pub fn open_portal(&mut self, name: Bytes, mut portal: Portal) -> Option<Portal> {
        self.opened += 1;
        portal.opened = self.opened;
        self.portals.insert(name, portal)
    }

    /// Follows a statement's `control` (in the order the server runs
    /// them): PostgreSQL drops every portal opened after a savepoint when
    /// the transaction rolls back to it, `WITH HOLD` cursors too, and an
    /// `Execute` of one then fails; it must not be recorded with the text
    /// of the portal that had its name. A savepoint the gateway did not see
    /// set or cannot name for certain, or a text of several statements,
    /// forgets them all.
    pub fn follow(&mut self, control: &Control) {
        let find = |savepoints: &[(Box<str>, u64)], name: &str| {
            savepoints.iter().rposition(|(n, _)| **n == *name)
        };
        match control {
            Control::Savepoint(name) => {
                // Bounded: a rollback to a savepoint forgotten here forgets
                // every portal, which is only ever safe.
                if self.savepoints.len() >= MAX_SAVEPOINTS {
                    self.savepoints.remove(0);
                }
                self.savepoints.push((name.clone(), self.opened));
            }
            Control::Release(name) => {
                if let Some(i) = find(&self.savepoints, name) {
                    self.savepoints.truncate(i);
                }
            }
            Control::RollbackTo(name) => match find(&self.savepoints, name) {
                Some(i) => {
                    let set_at = self.savepoints[i].1;
                    self.savepoints.truncate(i + 1);
                    self.portals.retain(|_, p| p.opened <= set_at);
                }
                None => self.forget_portals(),
            },
            // Several statements, or a savepoint name the gateway cannot
            // read for certain (or a CALL, whose opaque code forgot them
            // already).
            Control::Mixed | Control::Unseen => {
                self.forget_portals();
                self.savepoints.clear();
            }
            Control::Other | Control::PrepareTransaction => {}
        }
    }

    /// Forgets every portal: code the gateway cannot see may have closed
    /// or opened some.
    pub fn forget_portals(&mut self) {
        self.portals.clear();
        self.forgot = true;
    }

    /// [`Names::forget_portals`], but for the portal `name` being run.
    pub fn forget_portals_but(&mut self, name: &[u8]) {
        self.portals.retain(|n, _| &n[..] == name);
        self.forgot = true;
    }

    /// A message that may end the transaction goes out: the portals opened
    /// so far may be gone by the time the next message runs (red team
    /// rt43: a client pipelining its next batch had a new cursor's Execute
    /// recorded as a portal of the same name its last batch left).
    pub fn may_end_transaction(&mut self) {
        self.ended_before = self.opened;
    }

    /// Whether `portal` may no longer exist on the server.
    pub fn may_be_gone(&self, portal: &Portal) -> bool {
        !portal.holdable && portal.opened <= self.ended_before
    }

    /// Whether every portal on the server is in the map.
    pub fn knows_every_portal(&self) -> bool {
        !self.forgot
    }

    /// The number of the last portal opened.
    pub fn opened(&self) -> u64 {
        self.opened
    }

    /// A transaction ended: its portals are gone (not `WITH HOLD`
    /// cursors). `first_unanswered`: the first portal opened by a `Bind`
    /// the server has not answered yet (a client that pipelines its next
    /// batches): it and those after it are not the transaction's.
    pub fn end_transaction(&mut self, first_unanswered: Option<u64>) {
        if !self.portals.is_empty() {
            let first_unanswered = first_unanswered.unwrap_or(u64::MAX);
            self.portals
                .retain(|_, p| p.holdable || p.opened >= first_unanswered);
        }
    }

    /// A transaction ended with nothing in flight: no savepoint is set.
    pub fn forget_savepoints(&mut self) {
        self.savepoints.clear();
    }

    /// Puts back the entries whose `Parse` or `Bind` the server refused or
    /// skipped (newest first, so the oldest ends up in place).
    pub fn restore(&mut self, cache: &mut CacheEffects) {
        for restore in cache.portals.drain(..) {
            let (name, previous) = *restore;
            match previous {
                Some(portal) => self.portals.insert(name, portal),
                None => self.portals.remove(&name),
            };
        }
        for restore in cache.restore.drain(..) {
            let (name, previous) = *restore;
            match previous {
                Some(statement) => self.statements.insert(name, statement),
                None => self.statements.remove(&name),
            };
        }
    }

    /// A `Bind` or `Describe` of the unnamed statement when the client has
    /// none (never parsed one, or its last `Parse` failed) is refused as
    /// PostgreSQL refuses it; one it has is parsed again on the connection
    /// first, never taken from whatever the connection holds from another
    /// session.
    pub fn check_unnamed(&self, statement: &[u8]) -> Result<(), PgError> {
        if statement.is_empty() && !self.statements.contains_key(&b""[..]) {
            return Err(PgError::error(
                sqlstate::INVALID_SQL_STATEMENT_NAME,
                "unnamed prepared statement does not exist",
            ));
        }
        Ok(())
    }

    /// The gateway's server-side statement names (`pgwarden_...`) belong
    /// to it: a client that names one it did not prepare itself (its own
    /// names are mapped) is told it does not exist, so it can neither run
    /// nor describe another client's statement.
    pub fn check_reserved(&self, name: &[u8]) -> Result<(), PgError> {
        if name.starts_with(b"pgwarden_") && !self.statements.contains_key(name) {
            return Err(PgError::error(
                sqlstate::INVALID_SQL_STATEMENT_NAME,
                format!(
                    "prepared statement \"{}\" does not exist",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        Ok(())
    }

    /// A named statement the client's `Parse` may create: not one it has
    /// (PostgreSQL refuses a second `Parse` of a name until `Close`).
    pub fn check_new_name(&self, name: &[u8]) -> Result<(), PgError> {
        if self.statements.contains_key(name) {
            return Err(PgError::error(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!(
                    "prepared statement \"{}\" already exists",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        Ok(())
    }

    /// A statement name a client's `Bind` or `Describe` may use.
    pub fn check_statement_name(&self, name: &[u8]) -> Result<(), PgError> {
        self.check_unnamed(name)?;
        self.check_reserved(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_client_did_not_prepare_are_refused_as_postgresql_does() {
        let mut names = Names::default();
        assert_eq!(
            names.check_statement_name(b"").unwrap_err().code.code(),
            "26000"
        );
        assert_eq!(
            names
                .check_reserved(b"pgwarden_1f")
                .unwrap_err()
                .code
                .code(),
            "26000"
        );
        assert!(
            names.check_statement_name(b"mine").is_ok(),
            "the server answers for it"
        );
        let statement = Statement::new(Bytes::from_static(b"SELECT 1"), None, Vec::new());
        names.statements.insert(Bytes::from_static(b""), statement);
        assert!(names.check_unnamed(b"").is_ok());
    }

    #[test]
    fn portals_opened_after_a_savepoint_go_when_it_is_rolled_back_to() {
        let portal = |holdable| Portal {
            sql: Bytes::from_static(b"SELECT 1"),
            holdable,
            ..Portal::default()
        };
        let mut names = Names::default();
        let open = |names: &mut Names, name: &'static str, holdable| {
            names.open_portal(Bytes::from_static(name.as_bytes()), portal(holdable));
        };
        let point = |name: &str| Control::Savepoint(name.into());
        let to = |name: &str| Control::RollbackTo(name.into());
        open(&mut names, "p0", false);
        names.follow(&point("a"));
        open(&mut names, "p1", true);
        names.follow(&point("b"));
        open(&mut names, "p2", false);
        names.follow(&Control::Release("b".into()));
        names.follow(&to("b"));
        assert_eq!(
            names.portals.len(),
            0,
            "a savepoint not seen set forgets all"
        );
        open(&mut names, "p0", false);
        names.follow(&point("a"));
        open(&mut names, "p1", true);
        names.follow(&point("b"));
        open(&mut names, "p2", false);
        names.follow(&to("b"));
        assert!(names.portals.contains_key(b"p1") && !names.portals.contains_key(b"p2"));
        // Released into `a`: its portals go with a rollback to `a`.
        names.follow(&Control::Release("b".into()));
        open(&mut names, "p3", false);
        names.follow(&to("a"));
        let left: Vec<&[u8]> = ["p0", "p1", "p3"]
            .into_iter()
            .map(str::as_bytes)
            .filter(|p| names.portals.contains_key(p))
            .collect();
        assert_eq!(left, [b"p0"]);
        // `a` stays: a portal opened since goes with the next rollback.
        open(&mut names, "p4", false);
        names.follow(&to("a"));
        assert!(!names.portals.contains_key(b"p4"));
        open(&mut names, "p5", false);
        open(&mut names, "p6", false);
        names.end_transaction(Some(names.opened()));
        assert_eq!(names.portals.len(), 1, "p6's Bind is not answered yet");
        names.end_transaction(None);
        assert_eq!(names.portals.len(), 0);
    }

    #[test]
    fn a_refused_parse_or_bind_puts_the_old_entry_back() {
        let mut names = Names::default();
        let old = Statement::new(Bytes::from_static(b"SELECT 1"), None, Vec::new());
        let new = Statement::new(Bytes::from_static(b"SELECT 2"), None, Vec::new());
        names.statements.insert(Bytes::from_static(b"s"), new);
        names.portals.insert(
            Bytes::from_static(b"p"),
            Portal {
                sql: Bytes::from_static(b"SELECT 2"),
                ..Portal::default()
            },
        );
        let mut cache = CacheEffects::default();
        cache
            .restore
            .push(Box::new((Bytes::from_static(b"s"), Some(old))));
        cache
            .portals
            .push(Box::new((Bytes::from_static(b"p"), None)));
        names.restore(&mut cache);
        assert_eq!(&names.statements.get(b"s").unwrap().sql[..], b"SELECT 1");
        assert!(!names.portals.contains_key(&b"p"[..]));
        assert_eq!(names.statements.bytes(), "sSELECT 1".len());
    }

    #[test]
    fn the_bytes_of_statements_follow_every_change() {
        let mut statements = Statements::default();
        let of = |sql: &'static str| {
            Statement::new(Bytes::from_static(sql.as_bytes()), None, Vec::new())
        };
        statements.insert(Bytes::from_static(b"a"), of("SELECT 1"));
        statements.insert(Bytes::from_static(b"b"), of("SELECT 22"));
        assert_eq!(statements.bytes(), 19);
        statements.insert(Bytes::from_static(b"a"), of("SELECT 333"));
        assert_eq!(statements.bytes(), 21);
        statements.remove(b"b");
        assert_eq!(statements.bytes(), 11);
        // A name is counted, however long.
        statements.insert(Bytes::from(vec![b'n'; 1000]), of("SELECT 1"));
        assert_eq!(statements.bytes(), 11 + 1008);
        statements.remove(&[b'n'; 1000]);
        // Text and `Parse` body are slices of one message: counted once.
        let rest = Bytes::from_static(b"SELECT 4444\0\0\0");
        let shared = Statement::new(rest.slice(..11), Some((7, rest)), Vec::new());
        statements.insert(Bytes::from_static(b"c"), shared);
        assert_eq!(statements.bytes(), 11 + 15);
        statements.retain(|name, _| name.is_empty());
        assert_eq!((statements.bytes(), statements.len()), (0, 0));
    }
}
