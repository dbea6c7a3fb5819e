//! Byte-level scanners shared by the lexer and the string decoder: quoted
//! pieces, string continuation, comments, dollar-quote delimiters, numbers.
//!
//! Invariant: each function returns a position that is within the input and,
//! where it consumes anything, past its starting point, so callers always
//! make progress; nothing here panics on any bytes.

use super::lexer::{is_ident_cont, is_ident_start, Multibyte};

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
