//! A tokenizer for PostgreSQL's SQL over raw bytes.
//!
//! Statement text reaches pgwarden in the client's encoding and may not be
//! UTF-8, so the lexer works on `&[u8]`, never converts, and hands out tokens
//! as byte ranges (no allocation). It mirrors PostgreSQL's `scan.l` where the
//! difference matters for security: nested `/* */` comments, `--` comments,
//! `''` doubling, `E''` backslash escapes, string continuation across a
//! newline (`'a'` NEWLINE `'b'` is one constant, lexed in the first piece's
//! mode), dollar quotes with tags, `$` inside identifiers, and operators that
//! stop before `--` or `/*`.
//!
//! Invariant: lexing never panics and always makes progress, whatever the
//! bytes; an unterminated construct extends to the end of the input. Two
//! things the server's lexer depends on are not visible in the bytes: the
//! `standard_conforming_strings` setting and multi-byte client encodings whose
//! trail bytes can be `\` (SJIS, BIG5, GBK, UHC, JOHAB, GB18030). A
//! [`Dialect`] names one such interpretation; the guard lexes under every
//! plausible one. The byte-level scanners it shares with `decode` live in
//! `scan.rs`.

use super::scan::{
    continuation, dollar_tag_end, find, is_space, number_end, scan_piece, scan_quoted_ident,
    skip_block_comment,
};
pub use super::scan::{is_ident_cont, is_ident_start, is_op_char, Multibyte};

/// One interpretation of the bytes: session settings the server's lexer
/// depends on that the text itself does not show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    /// `standard_conforming_strings`: when false, `'...'` treats `\` as an
    /// escape exactly like `E'...'`.
    pub standard_strings: bool,
    /// The client encoding's character lengths.
    pub multibyte: Multibyte,
}

impl Dialect {
    /// PostgreSQL's defaults: standard strings, an ASCII-safe encoding.
    pub const DEFAULT: Dialect = Dialect {
        standard_strings: true,
        multibyte: Multibyte::AsciiSafe,
    };
}

impl Default for Dialect {
    fn default() -> Self {
        Dialect::DEFAULT
    }
}

/// What a string constant looked like in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrKind {
    /// `'...'` (also `N'...'`).
    Standard,
    /// `E'...'`: backslash escapes.
    Escape,
    /// `U&'...'`: Unicode escapes, optionally followed by `UESCAPE 'c'`.
    Unicode,
    /// `B'...'` or `X'...'`: bit strings, never text.
    Bits,
    /// `$tag$...$tag$`.
    Dollar,
}

/// The kind of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An unquoted identifier or keyword (compare case-insensitively).
    Word,
    /// `"..."`, case kept, `""` stands for `"`.
    QuotedIdent,
    /// `U&"..."`, with Unicode escapes.
    UnicodeIdent,
    /// A string constant.
    Str(StrKind),
    /// A numeric constant.
    Number,
    /// A positional parameter `$1`.
    Param,
    /// A run of operator characters, or `::`, `:=`, `..`.
    Op,
    /// One of `( ) , ; [ ] . :`.
    Punct,
    /// A byte PostgreSQL would reject (`\`, `{`, control characters...).
    Other,
}

/// A token: its kind and its byte range in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// What the token is.
    pub kind: Kind,
    /// Offset of its first byte in the source.
    pub start: usize,
    /// Offset just past its last byte (delimiters and continuations included).
    pub end: usize,
    /// False when a string, quoted identifier or dollar quote ran to the end
    /// of the input without its closing delimiter.
    pub terminated: bool,
}

impl Token {
    /// The token's bytes, delimiters included.
    pub fn text<'a>(&self, src: &'a [u8]) -> &'a [u8] {
        &src[self.start..self.end]
    }

    /// True for punctuation or an operator spelled exactly `s`.
    pub fn is_punct(&self, src: &[u8], s: &[u8]) -> bool {
        matches!(self.kind, Kind::Punct | Kind::Op) && self.text(src) == s
    }

    /// True for an unquoted word equal to `keyword` (ASCII, lower case).
    pub fn is_word(&self, src: &[u8], keyword: &[u8]) -> bool {
        self.kind == Kind::Word && self.text(src).eq_ignore_ascii_case(keyword)
    }
}

/// Iterator over the tokens of `src`, comments and whitespace skipped.
#[derive(Debug, Clone)]
pub struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    dialect: Dialect,
}

impl<'a> Lexer<'a> {
    /// A lexer for `src` under `dialect`.
    pub fn new(src: &'a [u8], dialect: Dialect) -> Lexer<'a> {
        Lexer {
            src,
            pos: 0,
            dialect,
        }
    }

    fn at(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn skip_trivia(&mut self) {
        let src = self.src;
        let mut i = self.pos;
        loop {
            while i < src.len() && is_space(src[i]) {
                i += 1;
            }
            match (src.get(i), src.get(i + 1)) {
                (Some(b'-'), Some(b'-')) => {
                    while i < src.len() && !matches!(src[i], b'\n' | b'\r') {
                        i += 1;
                    }
                }
                (Some(b'/'), Some(b'*')) => i = skip_block_comment(src, i),
                _ => break,
            }
        }
        self.pos = i;
    }

    fn word_end(&self, mut i: usize) -> usize {
        let src = self.src;
        if self.dialect.multibyte == Multibyte::AsciiSafe {
            while i < src.len() && is_ident_cont(src[i]) {
                i += 1;
            }
            return i;
        }
        while i < src.len() && is_ident_cont(src[i]) {
            i += self.dialect.multibyte.char_len(src, i);
        }
        i
    }

    fn lex_token(&mut self) -> Token {
        let src = self.src;
        let start = self.pos;
        let b = src[start];
        let next = self.at(start + 1);
        let tok = |kind, end, terminated| Token {
            kind,
            start,
            end,
            terminated,
        };
        // Most tokens are words: decide those first, unless the letter is a
        // string prefix (E'', B'', X'', N'', U&'', U&"").
        if is_ident_start(b) && next != b'\'' && !(b | 0x20 == b'u' && next == b'&') {
            return tok(Kind::Word, self.word_end(start), true);
        }
        match b {
            b'\'' => {
                let backslashes = !self.dialect.standard_strings;
                let (end, ok) = self.scan_string(start + 1, backslashes, true);
                tok(Kind::Str(StrKind::Standard), end, ok)
            }
            b'"' => {
                let (end, ok) = scan_quoted_ident(src, start + 1);
                tok(Kind::QuotedIdent, end, ok)
            }
            b'e' | b'E' if next == b'\'' => {
                let (end, ok) = self.scan_string(start + 2, true, true);
                tok(Kind::Str(StrKind::Escape), end, ok)
            }
            b'b' | b'B' | b'x' | b'X' if next == b'\'' => {
                let (end, ok) = self.scan_string(start + 2, false, false);
                tok(Kind::Str(StrKind::Bits), end, ok)
            }
            b'n' | b'N' if next == b'\'' => {
                let backslashes = !self.dialect.standard_strings;
                let (end, ok) = self.scan_string(start + 2, backslashes, true);
                tok(Kind::Str(StrKind::Standard), end, ok)
            }
            b'u' | b'U' if next == b'&' && self.at(start + 2) == b'\'' => {
                let (end, ok) = self.scan_string(start + 3, false, true);
                tok(Kind::Str(StrKind::Unicode), end, ok)
            }
            b'u' | b'U' if next == b'&' && self.at(start + 2) == b'"' => {
                let (end, ok) = scan_quoted_ident(src, start + 3);
                tok(Kind::UnicodeIdent, end, ok)
            }
            b'$' if next.is_ascii_digit() => {
                let mut end = start + 1;
                while end < src.len() && is_ident_cont(src[end]) && src[end] != b'$' {
                    end += 1;
                }
                tok(Kind::Param, end, true)
            }
            b'$' => {
                let (kind, end, ok) = dollar_token(src, start);
                tok(kind, end, ok)
            }
            b'0'..=b'9' => tok(Kind::Number, number_end(src, start), true),
            b'.' if next.is_ascii_digit() => tok(Kind::Number, number_end(src, start), true),
            b'.' if next == b'.' => tok(Kind::Op, start + 2, true),
            b':' if next == b':' || next == b'=' => tok(Kind::Op, start + 2, true),
            b'(' | b')' | b',' | b';' | b'[' | b']' | b'.' | b':' => {
                tok(Kind::Punct, start + 1, true)
            }
            _ if is_op_char(b) => tok(Kind::Op, operator_end(src, start), true),
            _ if is_ident_start(b) => tok(Kind::Word, self.word_end(start), true),
            _ => tok(Kind::Other, start + 1, true),
        }
    }

    /// Scans a single-quoted constant whose first piece's body starts at `i`
    /// (just after the opening quote), following continuations.
    fn scan_string(&self, i: usize, backslashes: bool, doubling: bool) -> (usize, bool) {
        let mut i = i;
        loop {
            match scan_piece(self.src, i, backslashes, doubling, self.dialect.multibyte) {
                Some(after_quote) => match continuation(self.src, after_quote) {
                    Some(quote) => i = quote + 1,
                    None => return (after_quote, true),
                },
                None => return (self.src.len(), false),
            }
        }
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        self.skip_trivia();
        if self.pos >= self.src.len() {
            return None;
        }
        let tok = self.lex_token();
        debug_assert!(tok.end > self.pos);
        self.pos = tok.end;
        Some(tok)
    }
}

/// Convenience: every token of `src` under the default dialect.
pub fn tokens(src: &[u8]) -> Vec<Token> {
    Lexer::new(src, Dialect::DEFAULT).collect()
}

/// A `$` that is not a parameter: a dollar-quoted string (kind, end,
/// terminated), or a lone `$`.
fn dollar_token(src: &[u8], start: usize) -> (Kind, usize, bool) {
    match dollar_tag_end(src, start) {
        Some(tag_end) => {
            let tag = &src[start..tag_end];
            match find(&src[tag_end..], tag) {
                Some(at) => (Kind::Str(StrKind::Dollar), tag_end + at + tag.len(), true),
                None => (Kind::Str(StrKind::Dollar), src.len(), false),
            }
        }
        None => (Kind::Other, start + 1, true),
    }
}

/// The end of the operator starting at `start` (a `--` or `/*` inside
/// starts a comment instead).
fn operator_end(src: &[u8], start: usize) -> usize {
    let mut end = start + 1;
    while end < src.len()
        && is_op_char(src[end])
        && !src[end..].starts_with(b"--")
        && !src[end..].starts_with(b"/*")
    {
        end += 1;
    }
    end
}
