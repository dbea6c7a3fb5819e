//! The statement guard's fast path: one bitmap probe per byte finds
//! whether a statement could hold anything the guard refuses (the patterns
//! in the `guard` module header); only then is it lexed.

/// The two-byte openings of the fast-path patterns, in every ASCII case,
/// as a bitmap indexed by `first << 8 | second`.
static OPENINGS: [u64; 1024] = openings();

const fn openings() -> [u64; 1024] {
    const PAIRS: [[u8; 2]; 10] = [
        *b"se", *b"di", *b"fu", *b"pr", *b"ag", *b"qu", *b"ts", *b"do", *b"u&", *b"pg",
    ];
    let mut table = [0u64; 1024];
    let mut k = 0;
    while k < PAIRS.len() {
        let [a, b] = PAIRS[k];
        let firsts = [a, a.to_ascii_uppercase()];
        let seconds = [b, b.to_ascii_uppercase()];
        let mut x = 0;
        while x < 2 {
            let mut y = 0;
            while y < 2 {
                let key = (firsts[x] as usize) << 8 | seconds[y] as usize;
                table[key >> 6] |= 1 << (key & 63);
                y += 1;
            }
            x += 1;
        }
        k += 1;
    }
    table
}

/// The fast path: could `sql` contain anything the guard refuses?
/// Case-insensitive search for the patterns listed in the module header:
/// one bitmap probe per byte, a full comparison only at their openings.
pub fn suspicious(sql: &[u8]) -> bool {
    let Some((&first, rest)) = sql.split_first() else {
        return false;
    };
    let mut prev = first;
    for (i, &b) in rest.iter().enumerate() {
        let key = usize::from(prev) << 8 | usize::from(b);
        if OPENINGS[key >> 6] & (1 << (key & 63)) != 0 && pattern_at(sql, i) {
            return true;
        }
        prev = b;
    }
    false
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
