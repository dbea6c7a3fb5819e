//! Long values are stored cut: a record keeps at most `[audit]
//! max_value_bytes` of its message (a server's error, a refusal's reason, a
//! returned value), of a refused statement's text (a longer statement does
//! not run, see `Refusal::TooLongToRecord`; the text of one that runs is
//! never cut) and of each parameter value, and its
//! `message` says what was cut, how long the whole value was and its
//! SHA-256, so whoever holds the whole value can prove it is the one.
//!
//! Why: a record is chained, compressed and (with `group` or `sync`)
//! fsynced before every record after it is, other sessions' included. One
//! client's 200 MB statements held every other session's commit for
//! seconds, and grew the store by gigabytes (red team, rt34 F1).

use sha2::{Digest, Sha256};

use super::record::Event;

impl Event {
    /// Cuts the message, the statement text and the parameter values
    /// longer than `limit` bytes (0: no limit) at the last character
    /// boundary within it, and appends to `message` what was cut.
    pub fn cut_long_values(&mut self, limit: usize) {
        if limit == 0 {
            return;
        }
        let mut notes = Vec::new();
        // A server's error may quote the client's input, a guard's reason
        // a name from it, a `FunctionCall` return its value.
        if let Some(note) = self.message.as_mut().and_then(|m| cut(m, limit)) {
            notes.push(format!("message {note}"));
        }
        if let Some(note) = self.statement.as_mut().and_then(|s| cut(s, limit)) {
            notes.push(format!("statement {note}"));
        }
        for (i, value) in self.params.iter_mut().flatten().enumerate() {
            if let Some(note) = value.as_mut().and_then(|v| cut(v, limit)) {
                notes.push(format!("parameter ${} {note}", i + 1));
            }
        }
        if notes.is_empty() {
            return;
        }
        let said = format!("stored cut: {}", notes.join("; "));
        self.message = Some(match self.message.take() {
            Some(message) => format!("{message}; {said}"),
            None => said,
        });
    }
}

/// Cuts `text` to at most `limit` bytes; what to say of it, or nothing when
/// it is not longer.
fn cut(text: &mut String, limit: usize) -> Option<String> {
    if text.len() <= limit {
        return None;
    }
    let (len, hash) = (text.len(), hex::encode(Sha256::digest(text.as_bytes())));
    let end = super::table::floor_char_boundary(text, limit);
    text.truncate(end);
    text.shrink_to_fit();
    Some(format!(
        "to its first {end} of {len} bytes (SHA-256 of the whole: {hash})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Kind;

    fn sha(text: &str) -> String {
        hex::encode(Sha256::digest(text.as_bytes()))
    }

    #[test]
    fn values_within_the_limit_are_kept_whole() {
        let mut ev = Event::new(Kind::Query);
        ev.statement = Some("SELECT 1".into());
        ev.params = Some(vec![Some("abc".into()), None]);
        let before = (ev.statement.clone(), ev.params.clone());
        ev.cut_long_values(8);
        assert_eq!((ev.statement.clone(), ev.params.clone()), before);
        assert_eq!(ev.message, None);
        ev.cut_long_values(0);
        assert_eq!(ev.message, None);
    }

    #[test]
    fn a_long_statement_and_parameter_keep_their_start_length_and_hash() {
        let statement = format!("SELECT 1 /* {} */", "x".repeat(100));
        let param = "é".repeat(20); // 40 bytes, two per character
        let mut ev = Event::new(Kind::Query);
        ev.statement = Some(statement.clone());
        ev.params = Some(vec![None, Some("short".into()), Some(param.clone())]);
        ev.cut_long_values(15);
        assert_eq!(ev.statement.as_deref(), Some(&statement[..15]));
        // Cut at a character boundary: 14 bytes, 7 characters.
        assert_eq!(
            ev.params,
            Some(vec![None, Some("short".into()), Some("é".repeat(7))])
        );
        assert_eq!(
            ev.message.as_deref(),
            Some(
                format!(
                    "stored cut: statement to its first 15 of {} bytes (SHA-256 of the whole: {}); \
                     parameter $3 to its first 14 of 40 bytes (SHA-256 of the whole: {})",
                    statement.len(),
                    sha(&statement),
                    sha(&param)
                )
                .as_str()
            )
        );
    }

    #[test]
    fn a_long_message_is_cut_too() {
        let error = format!(
            "invalid input syntax for type integer: \"{}\"",
            "x".repeat(50)
        );
        let mut ev = Event::new(Kind::Result);
        ev.message = Some(error.clone());
        ev.cut_long_values(20);
        assert_eq!(
            ev.message.unwrap(),
            format!(
                "{}; stored cut: message to its first 20 of {} bytes (SHA-256 of the whole: {})",
                &error[..20],
                error.len(),
                sha(&error)
            )
        );
    }

    #[test]
    fn a_message_already_there_is_kept_first() {
        let mut ev = Event::new(Kind::GuardBlocked);
        ev.statement = Some("SET ROLE admin -- padding".into());
        ev.message = Some("changes the role".into());
        ev.cut_long_values(20);
        let message = ev.message.unwrap();
        assert!(
            message
                .starts_with("changes the role; stored cut: statement to its first 20 of 25 bytes"),
            "{message}"
        );
    }
}
