//! Byte-level scanners shared by the lexer and the string decoder: character
//! classes, multi-byte encodings, quoted pieces, string continuation,
//! comments, dollar-quote delimiters, numbers.
//!
//! Invariant: each function returns a position that is within the input and,
//! where it consumes anything, past its starting point, so callers always
//! make progress; nothing here panics on any bytes.

/// How a client encoding groups bytes into characters, as far as it matters
/// for finding the end of a backslash-escaped string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Multibyte {
    /// Encodings whose multi-byte characters never contain ASCII bytes
    /// (UTF-8, the LATIN and EUC families...): bytes can be scanned one by one.
    AsciiSafe,
    /// SJIS and SHIFT_JIS_2004: a high byte outside 0xA1..=0xDF starts a
    /// two-byte character whose second byte may be `\`.
    Sjis,
    /// BIG5, GBK, UHC: every high byte starts a two-byte character.
    DoubleByte,
    /// JOHAB (EUC-style lengths): 0x8F starts three bytes, other high bytes two.
    Johab,
    /// GB18030: two bytes, or four when the second byte is a digit.
    Gb18030,
}

impl Multibyte {
    /// Every interpretation the guard tries when the input has both high
    /// bytes and backslashes.
    pub const ALL: [Multibyte; 5] = [
        Multibyte::AsciiSafe,
        Multibyte::Sjis,
        Multibyte::DoubleByte,
        Multibyte::Johab,
        Multibyte::Gb18030,
    ];

    /// Length in bytes of the character starting at `src[i]` (at least 1,
    /// never past the end).
    pub fn char_len(self, src: &[u8], i: usize) -> usize {
        let b = src[i];
        let len = if b < 0x80 {
            1
        } else {
            match self {
                Multibyte::AsciiSafe => 1,
                Multibyte::Sjis if (0xA1..=0xDF).contains(&b) => 1,
                Multibyte::Sjis | Multibyte::DoubleByte => 2,
                Multibyte::Johab if b == 0x8F => 3,
                Multibyte::Johab => 2,
                Multibyte::Gb18030 => match src.get(i + 1) {
                    Some(n) if n.is_ascii_digit() => 4,
                    _ => 2,
                },
            }
        };
        len.min(src.len() - i)
    }
}

const OP: u8 = 1;
const START: u8 = 2;
const CONT: u8 = 4;
const SPACE: u8 = 8;

/// Character classes of every byte, so the hot loops do one lookup.
static CLASS: [u8; 256] = classes();

const fn classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        let mut class = 0;
        if matches!(
            c,
            b'~' | b'!'
                | b'@'
                | b'#'
                | b'^'
                | b'&'
                | b'|'
                | b'`'
                | b'?'
                | b'+'
                | b'-'
                | b'*'
                | b'/'
                | b'%'
                | b'<'
                | b'>'
                | b'='
        ) {
            class |= OP;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            class |= START | CONT;
        }
        if c.is_ascii_digit() || c == b'$' {
            class |= CONT;
        }
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            class |= SPACE;
        }
        t[b] = class;
        b += 1;
    }
    t
}

/// Characters that may form an operator (`op_chars` in `scan.l`).
pub fn is_op_char(b: u8) -> bool {
    CLASS[b as usize] & OP != 0
}

/// Characters that may start an identifier.
pub fn is_ident_start(b: u8) -> bool {
    CLASS[b as usize] & START != 0
}

/// Characters that may continue an identifier (`$` included).
pub fn is_ident_cont(b: u8) -> bool {
    CLASS[b as usize] & CONT != 0
}

pub(crate) fn is_space(b: u8) -> bool {
    CLASS[b as usize] & SPACE != 0
}

/// Scans one quoted piece from `i` (after its opening quote) to just past its
/// closing quote; `None` if the input ends first.
pub(crate) fn scan_piece(
    src: &[u8],
    mut i: usize,
    backslashes: bool,
    doubling: bool,
    mb: Multibyte,
) -> Option<usize> {
    while i < src.len() {
        match src[i] {
            b'\'' if doubling && src.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            b'\\' if backslashes => {
                i += 1;
                if i < src.len() {
                    i += mb.char_len(src, i);
                }
            }
            _ => i += mb.char_len(src, i),
        }
    }
    None
}

/// If a string constant that ended at `i` continues (whitespace containing a
/// newline, possibly `--` comments, then a quote), the position of that quote.
pub(crate) fn continuation(src: &[u8], mut i: usize) -> Option<usize> {
    let mut newline = false;
    while i < src.len() {
        match src[i] {
            b' ' | b'\t' | 0x0c => i += 1,
            0x0b if newline => i += 1,
            b'\n' | b'\r' => {
                newline = true;
                i += 1;
            }
            b'-' if src.get(i + 1) == Some(&b'-') => {
                while i < src.len() && !matches!(src[i], b'\n' | b'\r') {
                    i += 1;
                }
            }
            b'\'' if newline => return Some(i),
            _ => return None,
        }
    }
    None
}

pub(crate) fn scan_quoted_ident(src: &[u8], mut i: usize) -> (usize, bool) {
    while i < src.len() {
        if src[i] == b'"' {
            if src.get(i + 1) == Some(&b'"') {
                i += 2;
                continue;
            }
            return (i + 1, true);
        }
        i += 1;
    }
    (src.len(), false)
}

/// Skips a (nested) block comment starting at `start`; returns the position
/// after it, or the end of the input if it never closes.
pub(crate) fn skip_block_comment(src: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut i = start + 2;
    while i < src.len() {
        if src[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if src[i..].starts_with(b"*/") {
            i += 2;
            if depth == 0 {
                return i;
            }
            depth -= 1;
        } else {
            i += 1;
        }
    }
    src.len()
}

/// If a dollar-quote delimiter (`$$` or `$tag$`) starts at `start`, the
/// position just after it.
pub(crate) fn dollar_tag_end(src: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if src.get(i) == Some(&b'$') {
        return Some(i + 1);
    }
    if !src.get(i).is_some_and(|&b| is_ident_start(b)) {
        return None;
    }
    while i < src.len() && is_ident_cont(src[i]) && src[i] != b'$' {
        i += 1;
    }
    (src.get(i) == Some(&b'$')).then_some(i + 1)
}

pub(crate) fn number_end(src: &[u8], start: usize) -> usize {
    let alnum = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = start;
    let mut seen_dot = false;
    while i < src.len() {
        let b = src[i];
        if alnum(b) {
            i += 1;
        } else if b == b'.' && !seen_dot && src.get(i + 1) != Some(&b'.') {
            seen_dot = true;
            i += 1;
        } else if matches!(b, b'+' | b'-')
            && matches!(src[i - 1], b'e' | b'E')
            && src.get(i + 1).is_some_and(u8::is_ascii_digit)
            && !src[start..i].iter().any(|c| matches!(c, b'x' | b'X'))
        {
            i += 1;
        } else {
            break;
        }
    }
    i
}

/// Position of the first occurrence of `needle` in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..=hay.len() - needle.len()]
            .iter()
            .position(|&b| b == first)
        {
            Some(off) => {
                i += off;
                if hay[i..].starts_with(needle) {
                    return Some(i);
                }
                i += 1;
            }
            None => return None,
        }
    }
    None
}

/// Does `src` contain a backslash?
pub(crate) fn has_backslash(src: &[u8]) -> bool {
    src.contains(&b'\\')
}

/// Does `src` contain a byte outside ASCII?
pub(crate) fn has_high_byte(src: &[u8]) -> bool {
    src.iter().fold(0u8, |acc, &b| acc | b) >= 0x80
}
