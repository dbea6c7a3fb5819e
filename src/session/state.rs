//! Session state in transaction pooling: which statements can leave state on
//! a server connection that the next client would inherit, and the settings
//! each client carries from connection to connection.
//!
//! Invariant (with the bind sequence in `relay`): a server connection that a
//! client may have changed (settings, temp objects, cursors, LISTEN,
//! advisory locks, SQL-level prepared statements) is reset before it serves
//! a different client; a client's own startup and reported parameters are
//! applied to every connection that serves it.

use crate::identity::keywords::Keywords;
use crate::identity::lexer::{tokens, Kind};

/// Reportable parameters a client may change with SET; their new values
/// arrive as `ParameterStatus` and follow the client to its next connection.
pub const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
];

/// Startup parameters applied to server connections, besides `options`.
const STARTUP: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "search_path",
    "extra_float_digits",
    "standard_conforming_strings",
];

/// Settings no client may carry onto a server connection: they are the
/// identity itself.
fn forbidden(name: &str, client_user_setting: &str) -> bool {
    name.eq_ignore_ascii_case("role")
        || name.eq_ignore_ascii_case("session_authorization")
        || name.eq_ignore_ascii_case(client_user_setting)
}

/// The settings a client asked for at startup, as (name, value), with
/// `application_name` decorated with the client's name so that
/// `pg_stat_activity` and `log_line_prefix` carry the real identity.
pub fn startup_settings(
    params: &[(String, String)],
    client_user: &str,
    client_user_setting: &str,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value) in params {
        if let Some(canonical) = STARTUP.iter().find(|s| s.eq_ignore_ascii_case(name)) {
            out.push((canonical.to_string(), value.clone()));
        } else if name == "options" {
            for (k, v) in parse_options(value) {
                if !forbidden(&k, client_user_setting) {
                    out.push((k, v));
                }
            }
        }
    }
    set_application_name(&mut out, None, client_user);
    out
}

/// Records a new application name (`None` keeps the current one) in its
/// decorated form `name [client]`.
pub fn set_application_name(
    settings: &mut Vec<(String, String)>,
    name: Option<&str>,
    client_user: &str,
) {
    let base = match name {
        Some(n) => n.to_string(),
        None => settings
            .iter()
            .find(|(k, _)| k == "application_name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
    };
    let decorated = decorated_application_name(&base, client_user);
    settings.retain(|(k, _)| k != "application_name");
    settings.push(("application_name".into(), decorated));
}

/// `name [client]`. PostgreSQL keeps 63 bytes of an application name
/// (`NAMEDATALEN` - 1): the client's own part is cut so that its name
/// always shows in full (red team rt40: a 63-byte name ending in `[bob]`
/// pushed ` [alice]` off, and `pg_stat_activity` named bob).
pub fn decorated_application_name(base: &str, client_user: &str) -> String {
    const KEPT: usize = 63;
    let tag = format!("[{client_user}]");
    let room = KEPT.saturating_sub(tag.len() + 1);
    if base.is_empty() || room == 0 {
        return tag;
    }
    let mut end = base.len().min(room);
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} {tag}", &base[..end])
}

/// Records a reported parameter change; returns whether it is tracked.
pub fn track(
    settings: &mut Vec<(String, String)>,
    name: &str,
    value: &str,
    client_user: &str,
) -> bool {
    let Some(canonical) = TRACKED.iter().find(|t| t.eq_ignore_ascii_case(name)) else {
        return false;
    };
    if *canonical == "application_name" {
        // Our own decorated value comes back too; keep it as it is.
        if !value.ends_with(&format!("[{client_user}]")) {
            set_application_name(settings, Some(value), client_user);
        }
        return true;
    }
    match settings.iter_mut().find(|(k, _)| k == canonical) {
        Some((_, v)) => *v = value.to_string(),
        None => settings.push((canonical.to_string(), value.to_string())),
    }
    true
}

/// `-c name=value` and `--name=value` pairs of the `options` parameter,
/// with PostgreSQL's backslash escaping of spaces.
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let pair = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("--").map(str::to_string)
        };
        if let Some((k, v)) = pair.as_deref().and_then(|p| p.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_string()));
        }
    }
    out
}

/// What a statement may leave behind on its server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Effect {
    /// Nothing that outlives the transaction.
    None,
    /// Settings: reset before another client gets the connection; the
    /// reportable ones follow the client (see [`track`]).
    Settings,
    /// Objects that live on the connection and that the client will look
    /// for again (temp tables, LISTEN, session advisory locks, WITH HOLD
    /// cursors, SQL-level prepared statements, loaded libraries): the client
    /// is pinned to this server connection until it disconnects.
    Pin,
}

/// Commands that, at the start of a statement, change settings.
const SETTING_COMMANDS: &[&[u8]] = &[b"set", b"reset", b"discard"];
/// Commands that, at the start of a statement, create connection-bound objects.
const PINNING_COMMANDS: &[&[u8]] = &[b"listen", b"prepare", b"load"];
/// Words that create connection-bound objects wherever they appear.
const PINNING_WORDS: &[&[u8]] = &[b"pg_temp", b"temp", b"temporary", b"hold"];
/// Session-level advisory lock functions (the `_xact_` ones end with the
/// transaction and pin nothing).
const SESSION_LOCKS: &[&[u8]] = &[
    b"pg_advisory_lock",
    b"pg_advisory_lock_shared",
    b"pg_try_advisory_lock",
    b"pg_try_advisory_lock_shared",
];

/// What `sql` may leave on the server connection beyond its transaction.
/// Conservative on what the text shows; functions may still change
/// settings, which the server reports (when reportable) as
/// `ParameterStatus`. Fast for statements without the letters every such
/// statement contains.
pub fn effect(sql: &[u8]) -> Effect {
    if !may_leave_state(sql) {
        return Effect::None;
    }
    let toks = tokens(sql);
    let mut at_start = true;
    let mut effect = Effect::None;
    for t in &toks {
        if t.is_punct(sql, b";") {
            at_start = true;
            continue;
        }
        if t.kind == Kind::Word {
            let w = t.text(sql);
            let is = |list: &[&[u8]]| list.iter().any(|k| w.eq_ignore_ascii_case(k));
            if (at_start && is(PINNING_COMMANDS)) || is(PINNING_WORDS) || is(SESSION_LOCKS) {
                return Effect::Pin;
            }
            if (at_start && is(SETTING_COMMANDS)) || w.eq_ignore_ascii_case(b"set_config") {
                effect = Effect::Settings;
            }
        }
        at_start = false;
    }
    effect
}

/// Whether `sql` may deallocate prepared statements on the server
/// (`DEALLOCATE` at the start of any statement): the server may then lack
/// shared statements the gateway believes it holds.
pub fn deallocates(sql: &[u8]) -> bool {
    static DEALLOCATE: Keywords = Keywords::new(&["deallocate"]);
    DEALLOCATE.in_text(sql) && a_statement_starts_with(sql, b"deallocate")
}

/// Whether one of the statements of `sql` starts with `CLOSE` (of a
/// cursor, or of all of them).
pub fn closes_portals(sql: &[u8]) -> bool {
    static CLOSE: Keywords = Keywords::new(&["close"]);
    CLOSE.in_text(sql) && a_statement_starts_with(sql, b"close")
}

/// Whether one of the statements of `sql` starts with `word`.
fn a_statement_starts_with(sql: &[u8], word: &[u8]) -> bool {
    let mut at_start = true;
    for t in tokens(sql) {
        if t.is_punct(sql, b";") {
            at_start = true;
            continue;
        }
        if at_start && t.is_word(sql, word) {
            return true;
        }
        at_start = false;
    }
    false
}

/// Whether `sql` may leave anything on its server connection ([`effect`])
/// or deallocate statements ([`deallocates`]): false for most statements,
/// which need no closer look. A case-insensitive search for the beginnings
/// every stateful word (and `deallocate`) has.
pub fn may_leave_state(sql: &[u8]) -> bool {
    static STATEFUL: Keywords = Keywords::new(&[
        "set",
        "disc",
        "listen",
        "prep",
        "decl",
        "deallocate",
        "load",
        "temp",
        "hold",
        "advis",
    ]);
    STATEFUL.in_text(sql)
}

/// Whether `sql` may start a `COPY ... FROM STDIN` (copy-in). `STDIN` is a
/// keyword, which can only be written as such, so a text without the word
/// starts none.
pub fn may_copy_in(sql: &[u8]) -> bool {
    static STDIN: Keywords = Keywords::new(&["stdin"]);
    STDIN.in_text(sql)
}

/// Whether `sql` may call `nextval` (explicitly, or through a column
/// default or a trigger of a statement that writes), leaving `currval` and
/// `lastval` state on the connection.
pub fn may_use_sequences(sql: &[u8]) -> bool {
    static SEQUENCES: Keywords = Keywords::new(&[
        "insert", "update", "delete", "default", "merge", "copy", "nextval", "setval",
    ]);
    SEQUENCES.in_text(sql)
}

/// The statement that clears what a client may have left behind.
pub const RESET_SQL: &str = "RESET ALL; CLOSE ALL; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES; DEALLOCATE ALL";

/// [`RESET_SQL`], and a new seed for `random()`: neither `RESET ALL` nor
/// `DISCARD ALL` touches the generator, so a client that set the seed
/// (`SET seed`, `setseed()`) would otherwise know the next client's
/// "random" numbers. The seed comes from the gateway's own generator.
pub fn reset_sql(discard: &str) -> String {
    let seed = rand::random::<f64>() * 2.0 - 1.0;
    format!("{discard}; SELECT pg_catalog.setseed({seed:.17})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_classified_by_what_they_leave_behind() {
        for sql in [
            "SET search_path = x",
            "select 1; reset statement_timeout",
            "SELECT set_config('search_path', 'x', false)",
            "DISCARD PLANS",
        ] {
            assert_eq!(effect(sql.as_bytes()), Effect::Settings, "{sql}");
        }
        for sql in [
            "CREATE TEMP TABLE t(x int)",
            "create temporary table t(x int)",
            "SET search_path = x; CREATE TABLE pg_temp.t(x int)",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "LISTEN chan",
            "PREPARE p AS SELECT 1",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_try_advisory_lock_shared(1, 2)",
        ] {
            assert_eq!(effect(sql.as_bytes()), Effect::Pin, "{sql}");
        }
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1",
            "INSERT INTO t VALUES ('set role')",
            "SELECT 'temp'",
            "SELECT pg_advisory_xact_lock(1)",
            "DECLARE c CURSOR FOR SELECT 1",
        ] {
            assert_eq!(effect(sql.as_bytes()), Effect::None, "{sql}");
        }
    }

    #[test]
    fn deallocate_anywhere_at_statement_start() {
        assert!(deallocates(b"DEALLOCATE ALL"));
        assert!(deallocates(b"select 1; deallocate prepare pgwarden_x"));
        assert!(!deallocates(b"SELECT 'deallocate all'"));
        assert!(!deallocates(b"SELECT 1"));
        assert!(closes_portals(b"select 1; CLOSE c1"));
        assert!(!closes_portals(b"SELECT closed FROM t"));
    }

    proptest::proptest! {
        /// The fast pre-filters find exactly what a plain case-insensitive
        /// search of every window finds, on any bytes (including non-ASCII
        /// and the punctuation that `| 0x20` maps near letters).
        #[test]
        fn prefilters_agree_with_a_plain_search(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            word in proptest::sample::select(vec![
                "set", "disc", "listen", "prep", "decl", "load", "temp", "hold", "advis",
                "deallocate", "sel", "xyz", "insert", "update", "delete", "merge", "copy",
                "default", "nextval", "setval",
            ]),
            upper in proptest::collection::vec(proptest::prelude::any::<bool>(), 10),
            at in 0usize..40,
        ) {
            let mut sql = noise.clone();
            let cased: Vec<u8> = word
                .bytes()
                .zip(upper.iter().cycle())
                .map(|(b, up)| if *up { b.to_ascii_uppercase() } else { b })
                .collect();
            let at = at.min(sql.len());
            sql.splice(at..at, cased);
            let plain = |w: &[u8]| sql.windows(w.len()).any(|x| x.eq_ignore_ascii_case(w));
            let needles: [&[u8]; 9] = [
                b"set", b"disc", b"listen", b"prep", b"decl", b"load", b"temp", b"hold", b"advis",
            ];
            proptest::prop_assert_eq!(
                may_leave_state(&sql),
                needles.iter().any(|n| plain(n)) || plain(b"deallocate")
            );
            static DEALLOCATE_WORD: Keywords = Keywords::new(&["deallocate"]);
            proptest::prop_assert_eq!(DEALLOCATE_WORD.in_text(&sql), plain(b"deallocate"));
            let sequence_words: [&[u8]; 8] = [
                b"insert", b"update", b"delete", b"merge", b"copy", b"default", b"nextval", b"setval",
            ];
            proptest::prop_assert_eq!(
                may_use_sequences(&sql),
                sequence_words.iter().any(|w| plain(w))
            );
            proptest::prop_assert_eq!(DEALLOCATE_WORD.in_text(&noise), {
                noise.windows(10).any(|x| x.eq_ignore_ascii_case(b"deallocate"))
            });
        }
    }

    #[test]
    fn options_and_startup_settings() {
        assert_eq!(
            parse_options("-c statement_timeout=5s --work-mem=64MB -csearch_path=a\\ b"),
            vec![
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64MB".into()),
                ("search_path".into(), "a b".into())
            ]
        );
        let s = startup_settings(
            &[
                ("user".into(), "alice".into()),
                ("application_name".into(), "psql".into()),
                ("TimeZone".into(), "UTC".into()),
                (
                    "options".into(),
                    "-c role=admin -c app.client_user=bob -c work_mem=1MB".into(),
                ),
            ],
            "alice",
            "app.client_user",
        );
        assert!(s.contains(&("TimeZone".into(), "UTC".into())));
        assert!(s.contains(&("work_mem".into(), "1MB".into())));
        assert!(s.contains(&("application_name".into(), "psql [alice]".into())));
        assert!(!s.iter().any(|(k, _)| k == "role" || k == "app.client_user"));
    }

    #[test]
    fn tracked_application_name_is_decorated_once() {
        let mut s = startup_settings(&[], "alice", "app.client_user");
        assert!(track(&mut s, "application_name", "etl", "alice"));
        assert!(track(&mut s, "application_name", "etl [alice]", "alice"));
        assert_eq!(
            s,
            vec![("application_name".to_string(), "etl [alice]".to_string())]
        );
        assert!(!track(&mut s, "server_version", "15", "alice"));
    }

    #[test]
    fn the_clients_name_always_fits_in_the_application_name() {
        use super::decorated_application_name as decorated;
        assert_eq!(decorated("etl", "alice"), "etl [alice]");
        assert_eq!(decorated("", "alice"), "[alice]");
        let spoof = format!("{}nightly-etl [bob]", " ".repeat(46));
        let shown = decorated(&spoof, "alice");
        assert!(shown.len() <= 63 && shown.ends_with(" [alice]"), "{shown}");
        // Cut at a character boundary.
        let shown = decorated(&"é".repeat(40), "alice");
        assert!(shown.len() <= 63 && shown.ends_with("é [alice]"), "{shown}");
    }
}
