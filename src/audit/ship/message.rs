//! One shipped record as an RFC 5424 syslog message: the record's time and
//! kind in the header, the stored record with `instance` added (or its CEF
//! event) as the body.
//!
//! Invariants:
//! - a message is never longer than `max_message_bytes` (the server's
//!   limit; a longer one breaks octet-counted framing or is cut by the
//!   server at a random place). A record too long for it is shipped with
//!   its longest values cut to what fits (as little as needed), marked
//!   `truncated_from` (the stored record's length) and still carrying its
//!   `seq` and `hash`, so the full record can be found in the store and
//!   checked there;
//! - the same record always makes the same message (a duplicate after a
//!   resend is byte for byte the first): the header holds nothing that
//!   changes between runs.

use super::super::checkpoint::Checkpoint;
use super::super::record::Record;
use crate::config::ShipFormat;

/// RFC 5424 PRI: facility 13 (log audit) * 8 + severity 6 (informational).
const PRI: u8 = 13 * 8 + 6;

/// How a gateway writes its messages.
pub struct Format<'a> {
    pub format: ShipFormat,
    pub instance: &'a str,
    /// The syslog HOSTNAME.
    pub host: &'a str,
    pub max_bytes: usize,
}

impl Format<'_> {
    /// The message for `record`, whose stored bytes are `stored`; whether
    /// it had to be cut.
    pub fn message(&self, record: &Record, stored: &[u8]) -> (Vec<u8>, bool) {
        let msg = self.render(record, Some(stored), None);
        if msg.len() <= self.max_bytes {
            return (msg, false);
        }
        (self.cut_to_fit(record, stored.len()), true)
    }

    /// `record`'s message cut to fit, the most telling first: the
    /// parameters and every free-text value taken out, then the free text
    /// given back in [`Slot::present`]'s order, each as the longest prefix
    /// that still fits, then as many whole parameters as fit. When not even
    /// that fits (an identity field too long), the record's seq, time,
    /// kind and hashes alone. Marked with the stored length; never longer
    /// than `max_bytes`, and a few dozen renders whatever the record.
    fn cut_to_fit(&self, record: &Record, stored_len: usize) -> Vec<u8> {
        let render = |cut: &Record| self.render(cut, None, Some(stored_len));
        let fits = |cut: &Record| render(cut).len() <= self.max_bytes;
        let mut cut = record.clone();
        let params = cut.params.take();
        let slots = Slot::present(record);
        let values: Vec<String> = slots.iter().map(|slot| slot.take(&mut cut)).collect();
        if !fits(&cut) {
            return render(&bare(record));
        }
        for (slot, full) in slots.into_iter().zip(values) {
            let keep = longest_fitting(full.len(), |end| {
                let end = crate::audit::table::floor_char_boundary(&full, end);
                slot.put(&mut cut, full[..end].to_string());
                fits(&cut)
            });
            slot.put(
                &mut cut,
                full[..crate::audit::table::floor_char_boundary(&full, keep)].to_string(),
            );
        }
        if let Some(params) = params {
            let keep = longest_fitting(params.len(), |n| {
                cut.params = Some(params[..n].to_vec());
                fits(&cut)
            });
            cut.params = Some(params[..keep].to_vec());
        }
        let msg = render(&cut);
        if msg.len() <= self.max_bytes {
            msg
        } else {
            render(&bare(record))
        }
    }

    /// The message of a checkpoint: `MSGID` `checkpoint`, the time of the
    /// record it names, its JSON (or CEF event) as the body.
    pub fn checkpoint(&self, checkpoint: &Checkpoint) -> Vec<u8> {
        let mut msg = format!(
            "<{PRI}>1 {} {} pgwarden - checkpoint - ",
            checkpoint.checkpoint.ts, self.host
        )
        .into_bytes();
        match self.format {
            ShipFormat::Json => msg.extend_from_slice(
                serde_json::to_string(checkpoint)
                    .expect("a checkpoint serializes")
                    .as_bytes(),
            ),
            ShipFormat::Cef => {
                msg.extend_from_slice(super::super::cef::checkpoint_event(checkpoint).as_bytes())
            }
        }
        msg
    }

    fn render(
        &self,
        record: &Record,
        stored: Option<&[u8]>,
        truncated_from: Option<usize>,
    ) -> Vec<u8> {
        // PROCID is the nil value: a resent record must be the same message.
        let mut msg = format!(
            "<{PRI}>1 {} {} pgwarden - {} - ",
            record.ts,
            self.host,
            record.kind.as_str()
        )
        .into_bytes();
        match self.format {
            ShipFormat::Json => {
                let own;
                let stored = match stored {
                    Some(stored) => stored,
                    None => {
                        own = record.to_stored_bytes();
                        &own
                    }
                };
                msg.extend_from_slice(&with_instance(stored, self.instance, truncated_from));
            }
            ShipFormat::Cef => {
                msg.extend_from_slice(super::super::cef::event(record, self.instance).as_bytes());
                if let Some(from) = truncated_from {
                    msg.extend_from_slice(
                        format!(" cn4={from} cn4Label=truncated_from").as_bytes(),
                    );
                }
            }
        }
        msg
    }
}

/// The largest `n` in `0..=len` for which `fits(n)` holds, by bisection
/// (`fits(0)` is taken to hold; `fits` is monotonic).
fn longest_fitting(len: usize, mut fits: impl FnMut(usize) -> bool) -> usize {
    if fits(len) {
        return len;
    }
    let (mut lo, mut hi) = (0, len);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// `record` with nothing but its seq, time, kind and hashes: what is
/// shipped when not even its identity fits.
fn bare(record: &Record) -> Record {
    let mut bare = Record::from_event(
        super::super::record::Event::new(record.kind),
        record.seq,
        record.ts.clone(),
        record.prev_hash.clone(),
    );
    bare.hash = record.hash.clone();
    bare
}

/// A free-text value of a record that may be cut: the statement, the
/// error message, the command tag, the application name.
#[derive(Clone, Copy)]
enum Slot {
    Statement,
    Message,
    CommandTag,
    ApplicationName,
}

impl Slot {
    /// `record`'s non-empty values, the most telling first.
    fn present(record: &Record) -> Vec<Slot> {
        let mut slots = vec![
            Slot::Statement,
            Slot::Message,
            Slot::CommandTag,
            Slot::ApplicationName,
        ];
        slots.retain(|slot| !slot.get(record).is_empty());
        slots
    }

    fn get(self, record: &Record) -> &str {
        let value = match self {
            Slot::Statement => record.statement.as_deref(),
            Slot::Message => record.message.as_deref(),
            Slot::CommandTag => record.command_tag.as_deref(),
            Slot::ApplicationName => record.application_name.as_deref(),
        };
        value.unwrap_or("")
    }

    /// The value, left empty in `record`.
    fn take(self, record: &mut Record) -> String {
        let value = self.get(record).to_string();
        self.put(record, String::new());
        value
    }

    fn put(self, record: &mut Record, value: String) {
        match self {
            Slot::Statement => record.statement = Some(value),
            Slot::Message => record.message = Some(value),
            Slot::CommandTag => record.command_tag = Some(value),
            Slot::ApplicationName => record.application_name = Some(value.into()),
        }
    }
}

/// The stored record (a JSON object) with `"instance"` as its first field
/// and, when it was cut, `"truncated_from"` (its stored length) second.
pub fn with_instance(stored: &[u8], instance: &str, truncated_from: Option<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.len() + instance.len() + 40);
    out.extend_from_slice(b"{\"instance\":");
    out.extend_from_slice(
        serde_json::to_string(instance)
            .expect("a string serializes")
            .as_bytes(),
    );
    if let Some(from) = truncated_from {
        out.extend_from_slice(format!(",\"truncated_from\":{from}").as_bytes());
    }
    match stored.strip_prefix(b"{") {
        Some(rest) if rest.first() != Some(&b'}') => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
        Some(rest) => out.extend_from_slice(rest),
        None => out.push(b'}'),
    }
    out
}

/// RFC 6587 octet counting: the length, a space, the message.
pub fn frame(out: &mut Vec<u8>, msg: &[u8]) {
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Event, Kind};

    #[test]
    fn the_body_is_the_stored_record_with_the_instance_first() {
        let body = with_instance(br#"{"seq":1,"kind":"query"}"#, "gw-1", None);
        assert_eq!(body, br#"{"instance":"gw-1","seq":1,"kind":"query"}"#);
        let quoted = with_instance(b"{}", "a\"b", None);
        assert_eq!(quoted, br#"{"instance":"a\"b"}"#);
        let cut = with_instance(br#"{"seq":1}"#, "gw", Some(90));
        assert_eq!(cut, br#"{"instance":"gw","truncated_from":90,"seq":1}"#);
    }

    #[test]
    fn messages_are_framed_by_their_length_in_octets() {
        let mut out = Vec::new();
        frame(&mut out, "<110>1 é".as_bytes());
        frame(&mut out, b"x");
        assert_eq!(out, "9 <110>1 é1 x".as_bytes());
    }

    fn record(statement: String, params: Vec<Option<String>>) -> Record {
        let mut event = Event::new(Kind::Query);
        event.statement = Some(statement);
        event.params = Some(params);
        event.client_user = Some("alice".into());
        let ts = "2026-12-01T00:00:00.000000Z".to_string();
        let mut record = Record::from_event(event, 42, ts, "0".repeat(64));
        record.hash = "ab".repeat(32);
        record
    }

    fn formats(max_bytes: usize) -> [Format<'static>; 2] {
        [ShipFormat::Json, ShipFormat::Cef].map(|format| Format {
            format,
            instance: "gw-1",
            host: "db1",
            max_bytes,
        })
    }

    #[test]
    fn a_record_that_fits_is_sent_whole_and_the_same_every_time() {
        let record = record("SELECT 1".into(), vec![Some("x".into())]);
        let stored = record.to_stored_bytes();
        for format in formats(8192) {
            let (msg, cut) = format.message(&record, &stored);
            assert!(!cut);
            assert_eq!(msg, format.message(&record, &stored).0);
            let text = String::from_utf8(msg).unwrap();
            assert!(
                text.starts_with("<110>1 2026-12-01T00:00:00.000000Z db1 pgwarden - query - "),
                "{text}"
            );
        }
    }

    #[test]
    fn a_record_too_long_is_cut_to_fit_keeping_its_seq_and_hash() {
        // Quotes and control characters grow when escaped: the cut must
        // count the message, not the raw text.
        let statement = format!("SELECT '{}'", "\"\u{1}é".repeat(40_000));
        let params = vec![Some("p".repeat(9_000)), None, Some("\n".repeat(3_000))];
        let record = record(statement, params);
        let stored = record.to_stored_bytes();
        for format in formats(2048) {
            let (msg, cut) = format.message(&record, &stored);
            assert!(cut);
            // As much as fits: within one escaped character of the limit.
            assert!((2042..=2048).contains(&msg.len()), "{} bytes", msg.len());
            let text = String::from_utf8(msg).expect("cut at a character boundary");
            assert!(text.contains(&"ab".repeat(32)), "{text}");
            if format.format == ShipFormat::Json {
                let body = text.split_once(" - query - ").unwrap().1;
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                assert_eq!(v["seq"], 42);
                assert_eq!(v["truncated_from"], stored.len());
                assert_eq!(v["client_user"], "alice");
                assert!(v["statement"]
                    .as_str()
                    .unwrap()
                    .starts_with("SELECT '\"\u{1}é"));
            } else {
                assert!(text.contains(&format!("cn4={} cn4Label=truncated_from", stored.len())));
                assert!(text.contains("externalId=42 "), "{text}");
            }
        }
    }

    #[test]
    fn parameters_that_cannot_be_cut_go_whole_and_the_message_still_fits() {
        // NULLs and empty strings cannot be cut shorter: whole parameters
        // go instead, as many as fit stay, in order.
        for params in [
            vec![None; 45_000],
            vec![Some(String::new()); 45_000],
            (0..65_000).map(|i| Some((i % 10).to_string())).collect(),
        ] {
            let record = record("SELECT $1".into(), params.clone());
            let stored = record.to_stored_bytes();
            for format in formats(2048) {
                let (msg, cut) = format.message(&record, &stored);
                assert!(msg.len() <= 2048, "{} bytes", msg.len());
                // (A CEF event carries no parameters.)
                if format.format == ShipFormat::Json {
                    assert!(cut);
                    let text = String::from_utf8(msg).unwrap();
                    let body = text.split_once(" - query - ").unwrap().1;
                    let v: serde_json::Value = serde_json::from_str(body).unwrap();
                    assert_eq!(v["statement"], "SELECT $1");
                    let kept = v["params"].as_array().unwrap();
                    assert!(!kept.is_empty() && kept.len() < params.len());
                    let expected: Vec<serde_json::Value> = params[..kept.len()]
                        .iter()
                        .map(|p| serde_json::json!(p))
                        .collect();
                    assert_eq!(kept, &expected);
                }
            }
        }
    }

    #[test]
    fn when_not_even_the_identity_fits_the_seq_and_hashes_go_alone() {
        let mut record = record("SELECT 1".into(), vec![]);
        record.client_user = Some("u".repeat(5000).into());
        let stored = record.to_stored_bytes();
        for format in formats(2048) {
            let (msg, cut) = format.message(&record, &stored);
            assert!(cut);
            assert!(msg.len() <= 2048, "{} bytes", msg.len());
            let text = String::from_utf8(msg).unwrap();
            assert!(text.contains(&"ab".repeat(32)), "{text}");
            assert!(!text.contains("uuuu"), "{text}");
        }
    }
}
