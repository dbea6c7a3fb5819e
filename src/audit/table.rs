//! The audit as a person reads it: one aligned line per statement (time,
//! client, role, database, status, duration, statement), for `audit tail`,
//! `audit export --format table` and the demo.
//!
//! Invariant: one record is one line. Whatever a client put in a value
//! (line breaks, tabs, control characters) is shown as a space or an escape,
//! so no statement can draw lines of its own, and a value too long for its
//! column ends in `…`.

use super::record::{Kind, Record};

/// Columns and their widths (the statement takes the rest).
const COLUMNS: [(&str, usize); 6] = [
    ("time", 23),
    ("client", 12),
    ("role", 12),
    ("database", 12),
    ("status", 8),
    ("duration", 10),
];

/// The header line, for a terminal `width` columns wide (0: no limit).
pub fn header(width: usize) -> String {
    let mut cells: Vec<String> = COLUMNS.iter().map(|(name, _)| name.to_string()).collect();
    cells.push("statement".into());
    line(&cells, width)
}

/// The line of `record`: a statement (joined with its outcome), or what
/// happened (`[session_start] ...`).
pub fn row(record: &Record, width: usize) -> String {
    let time = record.ts.replacen('T', " ", 1);
    let time = time.get(..23).unwrap_or(&time).to_string();
    let status = record
        .status
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|| "-".into());
    let duration = record
        .duration_us
        .map(|us| format!("{:.1} ms", us as f64 / 1000.0))
        .unwrap_or_else(|| "-".into());
    let what = match record.kind {
        Kind::Query => record.statement.clone().unwrap_or_default(),
        Kind::Result => format!(
            "[result of {}] {}",
            record.ref_seq.map_or("?".to_string(), |s| s.to_string()),
            record
                .command_tag
                .as_deref()
                .or(record.message.as_deref())
                .unwrap_or("")
        ),
        kind => {
            let detail = record
                .statement
                .as_deref()
                .or(record.message.as_deref())
                .unwrap_or("");
            format!("[{}] {detail}", kind.as_str())
        }
    };
    let what = match (&record.sqlstate, record.kind) {
        (Some(code), Kind::Query) => format!("{what}  ({code})"),
        _ => what,
    };
    let cells = [
        time,
        record.client_user.as_deref().unwrap_or("-").to_string(),
        record.role.as_deref().unwrap_or("-").to_string(),
        record.database.as_deref().unwrap_or("-").to_string(),
        status,
        duration,
        what,
    ];
    line(&cells, width)
}

/// `cells` padded to their columns, the last cut to fit `width` (0: whole).
fn line(cells: &[String], width: usize) -> String {
    let mut out = String::new();
    for ((_, w), cell) in COLUMNS.iter().zip(cells) {
        let cell = fit(&flat(cell), *w);
        out.push_str(&cell);
        out.extend(std::iter::repeat_n(
            ' ',
            w.saturating_sub(cell.chars().count()) + 2,
        ));
    }
    let last = flat(cells.last().map(String::as_str).unwrap_or(""));
    let used = out.chars().count();
    match width {
        0 => out.push_str(&last),
        _ => out.push_str(&fit(&last, width.saturating_sub(used).max(1))),
    }
    out.trim_end().to_string()
}

/// Characters that change how a terminal shows the text around them
/// without showing themselves (Unicode's format characters): bidirectional
/// overrides and isolates, zero-width characters, the byte order mark. Red
/// team rt40: `DELETE FROM t /*\u{202e} ... */` read as a harmless SELECT
/// on a terminal that lays out right-to-left text.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{61c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

/// `text` on one line: whitespace runs become one space, other control
/// and invisible format characters an escape.
pub fn flat(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if !space && !out.is_empty() {
                out.push(' ');
            }
            space = true;
            continue;
        }
        space = false;
        if c.is_control() || invisible(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.trim_end().to_string()
}

/// `text` cut to `width` characters, ending in `…` when cut.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The largest char boundary of `s` at or below `at` (`str::floor_char_boundary`,
/// newer than this crate's minimum Rust).
pub fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The width of the terminal on stdout, or 0 when stdout is not one.
pub fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills a winsize, read only on success.
    unsafe {
        if libc::isatty(1) != 1 {
            return 0;
        }
        let mut size: libc::winsize = std::mem::zeroed();
        if libc::ioctl(1, libc::TIOCGWINSZ, &mut size) == 0 && size.ws_col > 0 {
            size.ws_col as usize
        } else {
            120
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Event, Status};

    fn query(statement: &str) -> Record {
        let mut event = Event::new(Kind::Query);
        event.client_user = Some("alice".into());
        event.role = Some("analyst".into());
        event.database = Some("app".into());
        event.statement = Some(statement.into());
        event.status = Some(Status::Ok);
        event.duration_us = Some(1234);
        Record::from_event(
            event,
            7,
            "2026-12-01T10:11:12.345678Z".into(),
            "0".repeat(64),
        )
    }

    #[test]
    fn a_statement_is_one_aligned_line() {
        let head = header(0);
        let row = row(&query("SELECT 1"), 0);
        assert!(head.starts_with("time "), "{head}");
        assert_eq!(head.find("client"), row.find("alice"), "{head}\n{row}");
        assert_eq!(
            head.find("statement"),
            row.find("SELECT 1"),
            "{head}\n{row}"
        );
        assert!(row.starts_with("2026-12-01 10:11:12.345  alice"), "{row}");
        assert!(row.contains("1.2 ms"), "{row}");
    }

    #[test]
    fn a_statement_cannot_draw_lines_of_its_own_and_is_cut_to_the_width() {
        let row = row(
            &query("SELECT 1;\n2026-12-01 00:00:00.000  mallory\t\u{1b}[2J"),
            0,
        );
        assert!(
            !row.contains('\n') && !row.contains('\u{1b}') && !row.contains('\t'),
            "{row:?}"
        );
        // Nor lay the line out backwards (red team rt40).
        let row = super::row(
            &query("DELETE FROM t /*\u{202e} ;)'kcehc'(tceles \u{2066}\u{200b}*/"),
            0,
        );
        assert!(
            !row.contains(['\u{202e}', '\u{2066}', '\u{200b}']),
            "{row:?}"
        );
        assert!(row.contains("\\u{202e}"), "{row:?}");
        let narrow = super::row(&query(&"x".repeat(500)), 100);
        assert_eq!(narrow.chars().count(), 100, "{narrow}");
        assert!(narrow.ends_with('…'));
    }
}
