//! The statement guard's fast path: whether a statement could hold anything
//! the guard refuses (the patterns in the `guard` module header); only then
//! is it lexed.
//!
//! How: the patterns are words of the keyword pass ([`super::keywords`]),
//! whose answer for a text is remembered, so the guard's fast path costs a
//! lookup for a statement the session's prefilters have searched (or will).
//! Callgrind, pgbench `-S`: the byte-pair bitmap scan it replaces (kept in
//! the tests as the reference) cost 910 instructions per statement.

use super::keywords::Keywords;

/// The patterns, but `do`, which counts only as a whole word.
const PATTERN_WORDS: &[&str] = &[
    "set",
    "discard",
    "function",
    "procedure",
    "pgwarden_",
    "aggregate",
    "query_to",
    "ts_stat",
    "ts_rewrite",
    "u&",
];
static PATTERNS: Keywords = Keywords::new(PATTERN_WORDS);
static DO: Keywords = Keywords::new(&["do"]);

/// The fast path: could `sql` contain anything the guard refuses?
/// Case-insensitive search for the patterns listed in the module header.
pub fn suspicious(sql: &[u8]) -> bool {
    PATTERNS.in_text(sql) || (DO.in_text(sql) && has_word_do(sql))
}

/// Whether `sql` holds `do`, any case, as a whole word.
fn has_word_do(sql: &[u8]) -> bool {
    sql.windows(2)
        .enumerate()
        .any(|(i, pair)| pair.eq_ignore_ascii_case(b"do") && is_word_boundary(sql, i, 2))
}

/// Whether `hay` starts with `lower` (letters in lowercase), ignoring the
/// case of ASCII letters.
pub fn starts_with_ci(hay: &[u8], lower: &[u8]) -> bool {
    hay.len() >= lower.len()
        && hay.iter().zip(lower).all(|(&h, &l)| {
            if l.is_ascii_alphabetic() {
                h | 0x20 == l
            } else {
                h == l
            }
        })
}

/// Is `sql[i..i+len]` a whole word (not inside a longer identifier)?
fn is_word_boundary(sql: &[u8], i: usize, len: usize) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    let before = i == 0 || !word(sql[i - 1]);
    let after = sql.get(i + len).is_none_or(|&b| !word(b));
    before && after
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The scan this replaced: a bitmap of the patterns' two-byte openings,
    /// in every ASCII case, probed at each byte, a full comparison at an
    /// opening.
    fn reference(sql: &[u8]) -> bool {
        const PAIRS: [[u8; 2]; 10] = [
            *b"se", *b"di", *b"fu", *b"pr", *b"ag", *b"qu", *b"ts", *b"do", *b"u&", *b"pg",
        ];
        let opening = |a: u8, b: u8| {
            PAIRS
                .iter()
                .any(|p| p[0] == a.to_ascii_lowercase() && p[1] == b.to_ascii_lowercase())
        };
        (0..sql.len().saturating_sub(1)).any(|i| opening(sql[i], sql[i + 1]) && pattern_at(sql, i))
    }

    fn pattern_at(sql: &[u8], i: usize) -> bool {
        let rest = &sql[i..];
        match rest[0] | 0x20 {
            b's' => starts_with_ci(rest, b"set"),
            b'd' => {
                starts_with_ci(rest, b"discard")
                    || (rest[1] | 0x20 == b'o' && is_word_boundary(sql, i, 2))
            }
            b'f' => starts_with_ci(rest, b"function"),
            b'p' => starts_with_ci(rest, b"procedure") || starts_with_ci(rest, b"pgwarden_"),
            b'a' => starts_with_ci(rest, b"aggregate"),
            b'q' => starts_with_ci(rest, b"query_to"),
            b't' => starts_with_ci(rest, b"ts_stat") || starts_with_ci(rest, b"ts_rewrite"),
            _ => true, // u&
        }
    }

    #[test]
    fn every_pattern_in_any_case_and_place_is_suspicious() {
        // Each also against the reference, which spells them itself.
        for pattern in PATTERN_WORDS {
            for text in [
                pattern.to_string(),
                pattern.to_ascii_uppercase(),
                format!("SELECT x{pattern}y"),
                format!("{}z", pattern.to_ascii_uppercase()),
            ] {
                assert!(suspicious(text.as_bytes()), "{text}");
                assert!(reference(text.as_bytes()), "{text}");
            }
        }
        for text in ["do $$ $$", "DO", "x;Do", "(do)"] {
            assert!(suspicious(text.as_bytes()), "{text}");
        }
        for text in [
            "SELECT done, todo_list FROM document",
            "udo",
            "doe",
            "select 1",
            "",
            "s",
        ] {
            assert!(!suspicious(text.as_bytes()), "{text}");
        }
    }

    proptest! {
        #[test]
        fn the_fast_path_agrees_with_the_scan_it_replaced(
            text in proptest::collection::vec(
                prop_oneof![
                    Just(b's'), Just(b'E'), Just(b't'), Just(b'd'), Just(b'O'), Just(b'i'),
                    Just(b'c'), Just(b'a'), Just(b'r'), Just(b'u'), Just(b'&'), Just(b'f'),
                    Just(b'n'), Just(b'p'), Just(b'g'), Just(b'w'), Just(b'_'), Just(b'q'),
                    Just(b' '), Just(0xc3), any::<u8>(),
                ],
                0..24,
            ),
            words in proptest::collection::vec(
                prop_oneof![
                    Just("set"), Just("DISCARD"), Just("do"), Just("Do"), Just("done"),
                    Just("Function"), Just("procedure"), Just("pgwarden_x"), Just("aggregate"),
                    Just("query_to_xml"), Just("ts_stat"), Just("TS_REWRITE"), Just("U&"),
                    Just("select"), Just("todo"), Just("pg_"), Just("ts_"), Just(" "), Just("é"),
                ],
                0..6,
            ),
        ) {
            let mut joined = text.clone();
            for w in &words {
                joined.extend_from_slice(w.as_bytes());
            }
            prop_assert_eq!(suspicious(&text), reference(&text));
            prop_assert_eq!(suspicious(&joined), reference(&joined));
        }
    }
}
