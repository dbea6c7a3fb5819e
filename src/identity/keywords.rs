//! The keyword prefilters: whether a statement contains any of a few
//! words, ignoring ASCII case, anywhere (inside identifiers too:
//! `pg_advisory_lock` contains `advis`). Each statement goes through several
//! of them (the guard's fast path, what it may leave on the connection,
//! whether it may use sequences, copy in, control its transaction, set
//! encodings...), and most
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
//! prefilter is one AND. The masks of recent texts are remembered, compared
//! by content, so the prefilters a statement meets cost one pass, even
//! when its answer is applied after other sessions' statements were
//! planned, or on another worker thread. Callgrind, pgbench `-S` at 20
//! clients on a pool of 4: 34,954 instructions per transaction with the ten
//! or so hand-written passes this replaced (each called a closure on every
//! pair of bytes), 31,719 with it and the last text remembered per thread
//! (2.0 searches per transaction), 29,976 with 256 texts shared by the
//! threads (1.1). A hand-written pass with a table of word openings cost
//! 2,300 instructions per search against the automaton's 1,200.

use std::sync::{LazyLock, Mutex};

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};

/// Every word a prefilter looks for (lowercase ASCII; at most 64).
const WORDS: &[&str] = &[
    "abort",
    "advis",
    "aggregate",
    "call",
    "chain",
    "close",
    "commit",
    "copy",
    "deallocate",
    "decl",
    "declare",
    "default",
    "delete",
    "disc",
    "discard",
    "do",
    "encoding",
    "end",
    "function",
    "hold",
    "insert",
    "listen",
    "load",
    "merge",
    "names",
    "nextval",
    "pg_catalog",
    "pg_temp",
    "pgwarden_",
    "prep",
    "prepare",
    "procedure",
    "query_to",
    "release",
    "reset",
    "rollback",
    "savepoint",
    "set",
    "setval",
    "stdin",
    "temp",
    "ts_rewrite",
    "ts_stat",
    "u&",
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

/// How many texts are remembered (a power of two).
const SLOTS: usize = 256;

/// Texts searched lately and what they contain, each in the slot [`slot`]
/// picks for it (a newer text takes it over). Shared by the worker
/// threads: a session's task may plan a statement on one thread and apply
/// its answer on another.
static MEMO: [Mutex<(Vec<u8>, u64)>; SLOTS] = [const { Mutex::new((Vec::new(), 0)) }; SLOTS];

/// Which of [`WORDS`] `text` contains, bit `i` for `WORDS[i]`.
fn found(text: &[u8]) -> u64 {
    if text.len() > REMEMBERED {
        return search(text);
    }
    // A slot in use by another thread: search rather than wait.
    let Ok(mut kept) = MEMO[slot(text)].try_lock() else {
        return search(text);
    };
    let (kept_text, kept_found) = &mut *kept;
    // Only the same content reuses a mask: a slot shared by two texts costs
    // a search, never a wrong answer (an unused slot holds the empty text,
    // which contains no word).
    if kept_text.as_slice() != text {
        *kept_found = search(text);
        kept_text.clear();
        kept_text.extend_from_slice(text);
    }
    *kept_found
}

/// The memo slot of `text`, from its length and its first and last eight
/// bytes (statements that differ in a literal mostly differ at the end).
fn slot(text: &[u8]) -> usize {
    let word = |bytes: &[u8]| {
        let mut eight = [0u8; 8];
        eight[..bytes.len()].copy_from_slice(bytes);
        u64::from_le_bytes(eight)
    };
    let n = text.len();
    let head = word(&text[..n.min(8)]);
    let tail = word(&text[n - n.min(8)..]);
    let mixed = (head ^ tail.rotate_left(29) ^ n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> (64 - SLOTS.trailing_zeros())) as usize
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

    #[test]
    fn texts_sharing_a_slot_each_get_their_own_answer() {
        static SET: Keywords = Keywords::new(&["set"]);
        let texts: Vec<String> = (0..2000)
            .map(|i| format!("select {i}{}", if i % 3 == 0 { " set" } else { "" }))
            .collect();
        let a = &texts[0];
        let b = texts[1..]
            .iter()
            .find(|t| slot(t.as_bytes()) == slot(a.as_bytes()))
            .expect("2,000 texts fill 256 slots");
        for _ in 0..3 {
            assert!(SET.in_text(a.as_bytes()));
            assert_eq!(SET.in_text(b.as_bytes()), b.ends_with(" set"));
        }
    }

    #[test]
    fn threads_sharing_the_memo_get_the_right_answers() {
        // More texts than slots, from several threads at once: slots are
        // taken over and contended, and every answer must still be right.
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..5000u32 {
                        let n = (i * 7 + t * 13) % 700;
                        let text = if n % 5 == 0 {
                            format!("SELECT {n} -- pg_advisory_lock")
                        } else {
                            format!("SELECT {n}; DEALLOCATE x{n}")
                        };
                        assert_eq!(
                            SOME_SET.in_text(text.as_bytes()),
                            naive(SOME, text.as_bytes())
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
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
