//! The values of string constants and quoted identifiers.
//!
//! The guard compares what PostgreSQL will see, not what the client typed:
//! `E'\x72ole'`, `U&'r\006Fle'`, `'ro''le'` and `$$role$$` must all come out
//! as the same bytes, and a DO body given as any of them must be re-lexed from
//! its value. Decoding follows the [`Dialect`] the token was lexed under, so
//! backslashes mean what they meant to the lexer.
//!
//! Invariant: decoding never panics and never allocates when the value is a
//! plain slice of the source (dollar quotes, constants without escapes).
//! Malformed escapes, which PostgreSQL rejects, decode to their raw bytes.

use std::borrow::Cow;

use super::lexer::{Dialect, Kind, StrKind, Token};
use super::scan::{continuation, dollar_tag_end, scan_piece};

/// The value of a string constant token (`Kind::Str`). `uescape` is the
/// Unicode escape character of a `U&'...'` constant (`\` unless a
/// `UESCAPE 'c'` clause followed it).
pub fn string_value<'a>(
    src: &'a [u8],
    tok: &Token,
    dialect: Dialect,
    uescape: u8,
) -> Cow<'a, [u8]> {
    let kind = match tok.kind {
        Kind::Str(kind) => kind,
        _ => return Cow::Borrowed(tok.text(src)),
    };
    let text = &src[..tok.end];
    let quote = match kind {
        StrKind::Dollar => {
            let tag_end = dollar_tag_end(src, tok.start).unwrap_or(tok.start + 1);
            let tag_len = tag_end - tok.start;
            let body_end = if tok.terminated {
                tok.end - tag_len
            } else {
                tok.end
            };
            return Cow::Borrowed(&src[tag_end.min(body_end)..body_end]);
        }
        StrKind::Standard if src[tok.start] == b'\'' => tok.start,
        StrKind::Standard | StrKind::Escape | StrKind::Bits => tok.start + 1,
        StrKind::Unicode => tok.start + 2,
    };
    let backslashes =
        kind == StrKind::Escape || (kind == StrKind::Standard && !dialect.standard_strings);
    let doubling = kind != StrKind::Bits;
    // Fast path: one piece, nothing to unescape.
    let first_end = scan_piece(text, quote + 1, backslashes, doubling, dialect.multibyte);
    let body_end = first_end.map_or(tok.end, |e| e - 1);
    let body = &src[quote + 1..body_end];
    let single_piece = first_end.is_none_or(|e| e == tok.end);
    if single_piece
        && !body.contains(&b'\'')
        && !(backslashes && body.contains(&b'\\'))
        && kind != StrKind::Unicode
    {
        return Cow::Borrowed(body);
    }
    let mut out = Vec::with_capacity(tok.end - tok.start);
    let mut i = quote + 1;
    loop {
        i = unescape_piece(text, i, backslashes, doubling, dialect, &mut out);
        if i >= tok.end {
            break;
        }
        match continuation(text, i) {
            Some(q) => i = q + 1,
            None => break,
        }
    }
    if kind == StrKind::Unicode {
        out = unicode_unescape(&out, uescape);
    }
    Cow::Owned(out)
}

/// Appends the value of one quoted piece starting at `i` to `out`; returns
/// the position after its closing quote (or the end).
fn unescape_piece(
    src: &[u8],
    mut i: usize,
    backslashes: bool,
    doubling: bool,
    d: Dialect,
    out: &mut Vec<u8>,
) -> usize {
    while i < src.len() {
        let b = src[i];
        if b == b'\'' {
            if doubling && src.get(i + 1) == Some(&b'\'') {
                out.push(b'\'');
                i += 2;
                continue;
            }
            return i + 1;
        }
        if b == b'\\' && backslashes && i + 1 < src.len() {
            i = backslash_escape(src, i + 1, d, out);
            continue;
        }
        let len = d.multibyte.char_len(src, i);
        out.extend_from_slice(&src[i..i + len]);
        i += len;
    }
    i
}

/// Decodes the escape whose first byte after the backslash is at `i`.
fn backslash_escape(src: &[u8], i: usize, d: Dialect, out: &mut Vec<u8>) -> usize {
    let hex_run = |from: usize, max: usize| {
        let mut end = from;
        while end < src.len() && end - from < max && src[end].is_ascii_hexdigit() {
            end += 1;
        }
        end
    };
    match src[i] {
        b'b' => out.push(8),
        b'f' => out.push(12),
        b'n' => out.push(b'\n'),
        b'r' => out.push(b'\r'),
        b't' => out.push(b'\t'),
        b'0'..=b'7' => {
            let mut end = i;
            let mut v: u32 = 0;
            while end < src.len() && end - i < 3 && (b'0'..=b'7').contains(&src[end]) {
                v = v * 8 + u32::from(src[end] - b'0');
                end += 1;
            }
            out.push(v as u8);
            return end;
        }
        b'x' if src.get(i + 1).is_some_and(u8::is_ascii_hexdigit) => {
            let end = hex_run(i + 1, 2);
            out.push(parse_hex(&src[i + 1..end]) as u8);
            return end;
        }
        c @ (b'u' | b'U') => {
            let want = if c == b'u' { 4 } else { 8 };
            let end = hex_run(i + 1, want);
            if end - (i + 1) == want {
                push_code_point(out, parse_hex(&src[i + 1..end]));
                return end;
            }
            out.push(c);
        }
        _ => {
            let len = d.multibyte.char_len(src, i);
            out.extend_from_slice(&src[i..i + len]);
            return i + len;
        }
    }
    i + 1
}

/// The value of an identifier token: a word as written (callers compare
/// case-insensitively), a quoted identifier with `""` undoubled, a Unicode
/// identifier with its escapes decoded.
pub fn ident_value<'a>(src: &'a [u8], tok: &Token, uescape: u8) -> Cow<'a, [u8]> {
    let (open, kind) = match tok.kind {
        Kind::QuotedIdent => (tok.start, tok.kind),
        Kind::UnicodeIdent => (tok.start + 2, tok.kind),
        _ => return Cow::Borrowed(tok.text(src)),
    };
    let close = if tok.terminated { tok.end - 1 } else { tok.end };
    let body = &src[(open + 1).min(close)..close];
    let undoubled: Cow<[u8]> = if body.windows(2).any(|w| w == b"\"\"") {
        let mut v = Vec::with_capacity(body.len());
        let mut i = 0;
        while i < body.len() {
            v.push(body[i]);
            i += if body[i..].starts_with(b"\"\"") { 2 } else { 1 };
        }
        Cow::Owned(v)
    } else {
        Cow::Borrowed(body)
    };
    if kind == Kind::UnicodeIdent {
        Cow::Owned(unicode_unescape(&undoubled, uescape))
    } else {
        undoubled
    }
}

/// Applies `U&` escapes (`cXXXX`, `c+XXXXXX`, `cc`) with escape character `c`.
pub fn unicode_unescape(s: &[u8], esc: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    let mut high_surrogate: Option<u32> = None;
    while i < s.len() {
        if s[i] != esc {
            out.push(s[i]);
            i += 1;
            continue;
        }
        if s.get(i + 1) == Some(&esc) {
            out.push(esc);
            i += 2;
            continue;
        }
        let (from, want) = if s.get(i + 1) == Some(&b'+') {
            (i + 2, 6)
        } else {
            (i + 1, 4)
        };
        let digits = s
            .get(from..from + want)
            .filter(|d| d.iter().all(u8::is_ascii_hexdigit));
        match digits {
            Some(d) => {
                let cp = parse_hex(d);
                if (0xD800..0xDC00).contains(&cp) {
                    high_surrogate = Some(cp);
                } else if let (Some(hi), true) =
                    (high_surrogate.take(), (0xDC00..0xE000).contains(&cp))
                {
                    push_code_point(&mut out, 0x10000 + ((hi - 0xD800) << 10) + (cp - 0xDC00));
                } else {
                    push_code_point(&mut out, cp);
                }
                i = from + want;
            }
            None => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    out
}

fn parse_hex(d: &[u8]) -> u32 {
    d.iter().fold(0u32, |v, &b| {
        let digit = (b as char).to_digit(16).unwrap_or(0);
        v.wrapping_mul(16).wrapping_add(digit)
    })
}

fn push_code_point(out: &mut Vec<u8>, cp: u32) {
    let c = char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER);
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}
