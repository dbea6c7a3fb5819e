//! A record as an ArcSight Common Event Format (CEF) event, for SIEMs that
//! read CEF out of syslog (`[audit.ship] format = "cef"`):
//! `CEF:0|pgwarden|pgwarden|<version>|<kind>|<name>|<severity>|<extension>`.
//!
//! Invariant: every field of the record that carries evidence (seq, hash,
//! prev_hash, instance, who, what, outcome) is in the event, escaped as
//! the CEF specification says (header: `\` and `|`; extension values: `\`,
//! `=`, and line breaks as `\n`/`\r`), so a value a client chose (a
//! statement, an application name) can neither end a field nor add one.

use super::record::{parse_ts, Kind, Record, Status};

/// The CEF event for `record` of gateway `instance`.
pub fn event(record: &Record, instance: &str) -> String {
    let mut out = format!(
        "CEF:0|pgwarden|pgwarden|{}|{}|{}|{}|",
        header(env!("CARGO_PKG_VERSION")),
        header(record.kind.as_str()),
        header(name(record.kind)),
        severity(record)
    );
    let mut ext = Extension(&mut out);
    if let Ok(at) = parse_ts(&record.ts) {
        ext.put("rt", &(at.unix_timestamp_nanos() / 1_000_000).to_string());
    }
    ext.put("deviceExternalId", instance);
    ext.put("externalId", &record.seq.to_string());
    ext.opt("suser", record.client_user.as_deref());
    ext.opt("src", record.client_addr.as_deref());
    ext.opt(
        "requestClientApplication",
        record.application_name.as_deref(),
    );
    ext.opt("outcome", record.status.map(Status::as_str));
    ext.opt("reason", record.sqlstate.as_deref());
    ext.opt("msg", record.message.as_deref());
    ext.opt("dpid", record.backend_pid.map(|p| p.to_string()).as_deref());
    let labelled: [(&str, &str, Option<String>); 9] = [
        ("cs1", "role", record.role.as_deref().map(str::to_string)),
        (
            "cs2",
            "database",
            record.database.as_deref().map(str::to_string),
        ),
        ("cs3", "statement", record.statement.clone()),
        (
            "cs4",
            "session_id",
            record.session_id.as_deref().map(str::to_string),
        ),
        ("cs5", "hash", Some(record.hash.clone())),
        ("cs6", "prev_hash", Some(record.prev_hash.clone())),
        (
            "cn1",
            "duration_us",
            record.duration_us.map(|d| d.to_string()),
        ),
        ("cn2", "rows", record.rows.map(|r| r.to_string())),
        ("cn3", "ref_seq", record.ref_seq.map(|s| s.to_string())),
    ];
    for (key, label, value) in labelled {
        if let Some(value) = value {
            ext.put(key, &value);
            ext.put(&format!("{key}Label"), label);
        }
    }
    out
}

/// A shipped checkpoint as a CEF event (`checkpoint`, severity 1): the
/// instance, the seq, and labelled hash, ts, key and signature.
pub fn checkpoint_event(checkpoint: &super::checkpoint::Checkpoint) -> String {
    let mut out = format!(
        "CEF:0|pgwarden|pgwarden|{}|checkpoint|audit checkpoint|1|",
        header(env!("CARGO_PKG_VERSION"))
    );
    let mut ext = Extension(&mut out);
    let head = &checkpoint.checkpoint;
    ext.put("deviceExternalId", &checkpoint.instance);
    ext.put("externalId", &head.seq.to_string());
    let labelled = [
        ("cs1", "hash", Some(head.hash.as_str())),
        ("cs2", "ts", Some(head.ts.as_str())),
        ("cs3", "key", checkpoint.key.as_deref()),
        ("cs4", "signature", checkpoint.signature.as_deref()),
    ];
    for (key, label, value) in labelled {
        if let Some(value) = value {
            ext.put(key, value);
            ext.put(&format!("{key}Label"), label);
        }
    }
    out
}

/// The event's name: what happened, in words.
fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::SessionStart => "client session started",
        Kind::AuthFailed => "authentication failed",
        Kind::Denied => "connection denied",
        Kind::Query => "statement received",
        Kind::Result => "statement completed",
        Kind::GuardBlocked => "statement blocked by the guard",
        Kind::IdentityViolation => "identity violation",
        Kind::Cancel => "cancel request",
        Kind::SessionEnd => "client session ended",
        Kind::GatewayStart => "gateway started",
        Kind::GatewayStop => "gateway stopped",
        Kind::BackendFailover => "backend failover",
    }
}

/// CEF severity, 0 to 10.
fn severity(record: &Record) -> u8 {
    match record.kind {
        Kind::IdentityViolation => 10,
        Kind::GuardBlocked | Kind::Denied | Kind::AuthFailed => 7,
        _ if record.status == Some(Status::Error) => 5,
        _ => 3,
    }
}

/// A header field: `\` and `|` escaped.
fn header(value: &str) -> String {
    value.replace('\\', "\\\\").replace('|', "\\|")
}

/// The extension being written: ` key=value` pairs.
struct Extension<'a>(&'a mut String);

impl Extension<'_> {
    fn put(&mut self, key: &str, value: &str) {
        if !self.0.ends_with('|') {
            self.0.push(' ');
        }
        self.0.push_str(key);
        self.0.push('=');
        for c in value.chars() {
            match c {
                '\\' => self.0.push_str("\\\\"),
                '=' => self.0.push_str("\\="),
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                c => self.0.push(c),
            }
        }
    }

    fn opt(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.put(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Event;

    fn record(statement: &str) -> Record {
        let mut event = Event::new(Kind::Query);
        event.client_user = Some("alice".into());
        event.role = Some("analyst".into());
        event.statement = Some(statement.into());
        let ts = "2026-12-01T00:00:00.250000Z".to_string();
        let mut record = Record::from_event(event, 42, ts, "0".repeat(64));
        record.hash = "ab".repeat(32);
        record
    }

    #[test]
    fn an_event_has_the_header_and_the_evidence() {
        let cef = event(&record("SELECT 1"), "gw-1");
        assert!(
            cef.starts_with(&format!(
                "CEF:0|pgwarden|pgwarden|{}|query|statement received|3|rt=1796083200250 ",
                env!("CARGO_PKG_VERSION")
            )),
            "{cef}"
        );
        for field in [
            "deviceExternalId=gw-1",
            "externalId=42",
            "suser=alice",
            "cs1=analyst cs1Label=role",
            "cs3=SELECT 1 cs3Label=statement",
            &format!("cs5={} cs5Label=hash", "ab".repeat(32)),
        ] {
            assert!(cef.contains(field), "{field} in {cef}");
        }
    }

    #[test]
    fn a_client_value_cannot_end_or_add_a_field() {
        let cef = event(&record("SELECT 'a=b' -- \\ x\nsuser=mallory|7"), "gw-1");
        assert!(
            cef.contains("cs3=SELECT 'a\\=b' -- \\\\ x\\nsuser\\=mallory|7 cs3Label=statement"),
            "{cef}"
        );
        assert!(!cef.contains('\n'));
        assert_eq!(cef.matches(" suser=").count(), 1);
        assert_eq!(header("a|b\\c"), "a\\|b\\\\c");
    }
}
