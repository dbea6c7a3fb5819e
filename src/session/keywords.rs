//! The session's keyword prefilters: whether a statement contains any of a
//! few words, ignoring ASCII case, anywhere (inside identifiers too:
//! `pg_advisory_lock` contains `advis`). Each statement goes through several
//! of them (what it may leave on the connection, whether it may use
//! sequences, copy in, control its transaction, set encodings...), and most
//! statements contain none of their words, so they decide whether the
//! statement is lexed at all.
//!
//! Invariant: [`Keywords::in_text`] is true exactly when some byte of the
//! text starts one of the set's words, compared ASCII case-insensitively
//! (the property tests below hold it to that definition). A prefilter may
//! only say "maybe": what it lets through is lexed.
//!
//! How: every word of every set is in [`WORDS`]. One pass of an
//! Aho-Corasick automaton (the `aho-corasick` crate) over a text finds
//! which of them it contains, as a bit mask; a set is a mask too, so a
//! prefilter is one AND. The last text's mask is remembered per thread,
//! compared by content, so the prefilters a statement meets in a row cost
//! one pass (under load, a statement is searched again when its answer is
//! applied: the thread has planned other sessions' statements meanwhile;
//! remembering 8 texts instead of 1 did not change that). Callgrind, pgbench `-S` at 20 clients on a
//! pool of 4: 34,954 instructions per transaction with the ten or so
//! hand-written passes this replaced (each called a closure on every pair
//! of bytes), 31,719 with it. A hand-written pass with a table of word
//! openings cost 2,300 instructions per search against the automaton's
//! 1,200.

use std::cell::RefCell;
use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};

/// Every word a prefilter looks for (lowercase ASCII; at most 64).
const WORDS: &[&str] = &[
    "abort",
    "advis",
    "chain",
    "commit",
    "copy",
    "deallocate",
    "decl",
    "declare",
    "default",
    "delete",
    "disc",
    "encoding",
    "end",
    "hold",
    "insert",
    "listen",
    "load",
    "merge",
    "names",
    "nextval",
    "pg_catalog",
    "pg_temp",
    "prep",
    "prepare",
    "release",
    "reset",
    "rollback",
    "savepoint",
    "set",
    "setval",
    "stdin",
    "temp",
    "update",
];

const _: () = assert!(WORDS.len() <= 64);

static AUTOMATON: LazyLock<AhoCorasick> = LazyLock::new(|| {
    AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::Standard)
        .kind(Some(AhoCorasickKind::DFA))
        .build(WORDS)
        .expect("a few short keywords always build")
});

/// Texts up to this long are remembered (copied); a longer one is searched
/// at each prefilter, which for such a text is the smaller cost.
const REMEMBERED: usize = 4096;

thread_local! {
    /// The last text searched on this thread, and what it contains.
    static LAST: RefCell<(Vec<u8>, u64)> = const { RefCell::new((Vec::new(), 0)) };
}

/// Which of [`WORDS`] `text` contains, bit `i` for `WORDS[i]`.
fn found(text: &[u8]) -> u64 {
    if text.len() > REMEMBERED {
        return search(text);
    }
    LAST.with(|last| {
        let (last_text, last_found) = &mut *last.borrow_mut();
        if last_text != text {
            *last_found = search(text);
            last_text.clear();
            last_text.extend_from_slice(text);
        }
        *last_found
    })
}

/// Overlapping matches: `set` inside `setval` counts as well.
fn search(text: &[u8]) -> u64 {
    AUTOMATON
        .find_overlapping_iter(text)
        .fold(0, |found, m| found | 1 << m.pattern().as_usize())
}

/// A set of [`WORDS`], searched for as described in the module header.
#[derive(Clone, Copy, Debug)]
pub struct Keywords {
    mask: u64,
}

impl Keywords {
    /// The set of `words`, each of which must be in [`WORDS`] (else this
    /// does not compile where it is a `static`).
    pub const fn new(words: &[&str]) -> Keywords {
        let mut mask = 0;
        let mut w = 0;
        while w < words.len() {
            mask |= 1 << index_of(words[w]);
            w += 1;
        }
        Keywords { mask }
    }

    /// Whether some byte of `text` starts one of the words, ignoring ASCII
    /// case.
    pub fn in_text(&self, text: &[u8]) -> bool {
        found(text) & self.mask != 0
    }
}

const fn index_of(word: &str) -> usize {
    let mut i = 0;
    while i < WORDS.len() {
        if str_eq(WORDS[i], word) {
            return i;
        }
        i += 1;
    }
    panic!("a prefilter word missing from keywords::WORDS")
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SOME: &[&str] = &["set", "advis", "deallocate", "decl", "end"];
    static SOME_SET: Keywords = Keywords::new(SOME);

    /// The definition a set must agree with.
    fn naive(words: &[&str], text: &[u8]) -> bool {
        (0..text.len()).any(|i| {
            words.iter().any(|w| {
                text.len() - i >= w.len() && text[i..i + w.len()].eq_ignore_ascii_case(w.as_bytes())
            })
        })
    }

    #[test]
    fn words_are_found_in_any_case_and_inside_identifiers() {
        for text in [
            "SET x = 1",
            "select pg_advisory_lock(1)",
            "SeLeCt PG_ADVISORY_LOCK(1)",
            "DEALLOCATE ALL",
            "declare c cursor for select 1",
            "select 1; RESET x",
            "sete",
        ] {
            assert!(SOME_SET.in_text(text.as_bytes()), "{text}");
        }
        for text in ["select 1", "", "s", "se", "selct ad vis", "déclare"] {
            assert!(!SOME_SET.in_text(text.as_bytes()), "{text}");
        }
        // Not a letter that `| 0x20` would fold into one, nor Unicode folding.
        assert!(!SOME_SET.in_text(b"\x13ET"));
        assert!(!SOME_SET.in_text("ſet".as_bytes()));
    }

    #[test]
    fn a_word_inside_a_longer_word_of_the_list_is_found_too() {
        // `set` in `setval`, `decl` in `declare`, `prep` in `prepare`:
        // every occurrence counts, not only the longest match.
        static SET: Keywords = Keywords::new(&["set"]);
        static DECL: Keywords = Keywords::new(&["decl"]);
        static PREP: Keywords = Keywords::new(&["prep"]);
        static DECLARE: Keywords = Keywords::new(&["declare"]);
        assert!(SET.in_text(b"select setval('s', 1)"));
        assert!(DECL.in_text(b"DECLARE c CURSOR FOR SELECT 1"));
        assert!(PREP.in_text(b"PREPARE p AS SELECT 1"));
        assert!(!DECLARE.in_text(b"decl"));
        // And the longer word, where a shorter one of the list starts it.
        static SETVAL: Keywords = Keywords::new(&["setval"]);
        static PREPARE: Keywords = Keywords::new(&["prepare"]);
        assert!(SETVAL.in_text(b"select setval('s', 1)"));
        assert!(DECLARE.in_text(b"DECLARE c CURSOR FOR SELECT 1"));
        assert!(PREPARE.in_text(b"PREPARE p AS SELECT 1"));
    }

    #[test]
    fn the_remembered_text_is_compared_by_content() {
        static SET: Keywords = Keywords::new(&["set"]);
        let mut buf = b"set x = 1".to_vec();
        assert!(SET.in_text(&buf));
        // Same length, same buffer, other content.
        buf.copy_from_slice(b"sel x = 1");
        assert!(!SET.in_text(&buf));
        buf.copy_from_slice(b"SET x = 1");
        assert!(SET.in_text(&buf));
        // Longer than what is remembered: searched every time.
        let mut long = vec![b' '; REMEMBERED + 10];
        assert!(!SET.in_text(&long));
        long[REMEMBERED + 5..REMEMBERED + 8].copy_from_slice(b"sEt");
        assert!(SET.in_text(&long));
    }

    proptest! {
        #[test]
        fn a_set_agrees_with_the_definition(
            text in proptest::collection::vec(
                prop_oneof![
                    Just(b's'), Just(b'S'), Just(b'e'), Just(b'E'), Just(b't'), Just(b'T'),
                    Just(b'a'), Just(b'd'), Just(b'D'), Just(b'v'), Just(b'i'), Just(b'c'),
                    Just(b'l'), Just(b'L'), Just(b'n'), Just(b' '), Just(b'_'), Just(0x13),
                    Just(0xc5), any::<u8>(),
                ],
                0..40,
            ),
            other in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            prop_assert_eq!(SOME_SET.in_text(&text), naive(SOME, &text));
            prop_assert_eq!(SOME_SET.in_text(&other), naive(SOME, &other));
            prop_assert_eq!(SOME_SET.in_text(&text), naive(SOME, &text));
        }

        #[test]
        fn every_word_is_found_alone(
            i in 0..WORDS.len(),
            before in "[ -~]{0,8}",
            after in "[ -~]{0,8}",
            upper in any::<bool>(),
        ) {
            let word = if upper { WORDS[i].to_ascii_uppercase() } else { WORDS[i].to_string() };
            let text = format!("{before}{word}{after}");
            let one = Keywords { mask: 1 << i };
            prop_assert!(one.in_text(text.as_bytes()));
            for (j, other) in WORDS.iter().enumerate() {
                let set = Keywords { mask: 1 << j };
                prop_assert_eq!(set.in_text(text.as_bytes()), naive(&[other], text.as_bytes()));
            }
        }
    }
}
