//! Unit tests of the lexer and of string decoding.

use super::decode::{ident_value, string_value};
use super::lexer::{tokens, Dialect, Kind, Lexer, Multibyte, StrKind, Token};

fn kinds(src: &[u8]) -> Vec<(Kind, String)> {
    tokens(src)
        .iter()
        .map(|t| (t.kind, String::from_utf8_lossy(t.text(src)).into_owned()))
        .collect()
}

fn texts(src: &[u8]) -> Vec<String> {
    kinds(src).into_iter().map(|(_, s)| s).collect()
}

fn value(src: &[u8], dialect: Dialect) -> Vec<u8> {
    let toks: Vec<Token> = Lexer::new(src, dialect).collect();
    assert_eq!(toks.len(), 1, "{:?}", String::from_utf8_lossy(src));
    string_value(src, &toks[0], dialect, b'\\').into_owned()
}

#[test]
fn words_punctuation_operators_and_params() {
    assert_eq!(
        texts(b"SELECT a.b, $1::int FROM t WHERE x>=2;"),
        [
            "SELECT", "a", ".", "b", ",", "$1", "::", "int", "FROM", "t", "WHERE", "x", ">=", "2",
            ";"
        ]
    );
    assert_eq!(kinds(b"$1")[0].0, Kind::Param);
    assert_eq!(kinds(b"1.5e-3")[0], (Kind::Number, "1.5e-3".into()));
    assert_eq!(texts(b"1..2"), ["1", "..", "2"]);
}

#[test]
fn comments_are_skipped_and_nest() {
    assert_eq!(texts(b"SET/**/ROLE"), ["SET", "ROLE"]);
    assert_eq!(texts(b"a /* x /* y */ z */ b"), ["a", "b"]);
    assert_eq!(texts(b"a -- c ; d\nb"), ["a", "b"]);
    assert_eq!(texts(b"a /*/ x */ b"), ["a", "b"]);
    assert_eq!(texts(b"a /* unterminated /* */"), ["a"]);
}

#[test]
fn operators_stop_before_comments() {
    assert_eq!(texts(b"1 +-- c\n2"), ["1", "+", "2"]);
    assert_eq!(texts(b"1 */* c */ 2"), ["1", "*", "2"]);
}

#[test]
fn identifiers_fold_nothing_and_keep_dollars() {
    assert_eq!(kinds(b"\"Ro\"\"le\"")[0].0, Kind::QuotedIdent);
    assert_eq!(texts(b"a$$b $$ c$$"), ["a$$b", "$$ c$$"]);
    let src = b"\"a\"\"b\"";
    let t = tokens(src)[0];
    assert_eq!(&*ident_value(src, &t, b'\\'), b"a\"b");
    let src = br#"U&"r\006Fle""#;
    let t = tokens(src)[0];
    assert_eq!(t.kind, Kind::UnicodeIdent);
    assert_eq!(&*ident_value(src, &t, b'\\'), b"role");
}

#[test]
fn string_constants_of_every_kind() {
    let d = Dialect::DEFAULT;
    assert_eq!(value(b"'it''s'", d), b"it's");
    assert_eq!(value(br"'a\'", d), br"a\");
    assert_eq!(value(br"E'it\'s'", d), b"it's");
    assert_eq!(value(br"E'\x72\157le\n\u0041'", d), b"role\nA");
    assert_eq!(
        value(br"U&'r\006Fle \+01F600'", d),
        "role \u{1F600}".as_bytes()
    );
    assert_eq!(value(b"N'x'", d), b"x");
    assert_eq!(value(b"$$a'b$$", d), b"a'b");
    assert_eq!(value(b"$t$ $$ $t$", d), b" $$ ");
    assert_eq!(
        texts(b"$a$x$a$b$"),
        ["$a$x$a$", "b$"],
        "the first $a$ closes"
    );
    assert_eq!(kinds(b"B'101'")[0].0, Kind::Str(StrKind::Bits));
    assert_eq!(kinds(b"X'1F'")[0].0, Kind::Str(StrKind::Bits));
}

#[test]
fn dollar_tags_must_match_exactly() {
    assert_eq!(texts(b"$a$ $b$ $A$ $a$ x"), ["$a$ $b$ $A$ $a$", "x"]);
    assert_eq!(texts(b"$a$b$ $b$"), ["$a$b$ $b$"]);
    assert_eq!(kinds(b"$ x")[0].0, Kind::Other);
}

#[test]
fn string_continuation_keeps_the_first_pieces_mode() {
    let d = Dialect::DEFAULT;
    assert_eq!(value(b"'ro'\n'le'", d), b"role");
    assert_eq!(value(b"'ro' -- c\n  'le'", d), b"role");
    assert_eq!(
        texts(b"'ro' 'le'"),
        ["'ro'", "'le'"],
        "no newline: two constants"
    );
    assert_eq!(
        texts(b"'ro'/* c */\n'le'"),
        ["'ro'", "'le'"],
        "block comments do not join"
    );
    // The continued piece of an E'' string still takes backslash escapes.
    let src = b"E'x'\n'\\' '; SET ROLE r; --'";
    assert_eq!(texts(src), ["E'x'\n'\\' '", ";", "SET", "ROLE", "r", ";"]);
}

#[test]
fn unterminated_constructs_run_to_the_end() {
    for src in [
        &b"'abc"[..],
        b"E'ab\\'",
        b"\"abc",
        b"$q$ abc $q",
        b"U&'x",
        b"/* a",
    ] {
        let toks = tokens(src);
        assert!(toks.len() <= 1, "{:?}", String::from_utf8_lossy(src));
        if let Some(t) = toks.first() {
            assert!(!t.terminated);
            assert_eq!(t.end, src.len());
            let _ = string_value(src, t, Dialect::DEFAULT, b'\\');
        }
    }
}

#[test]
fn non_utf8_bytes_are_identifier_characters() {
    let src = b"SELECT \xff\xfe, '\x80\x81' FROM t\xe9";
    assert_eq!(tokens(src).len(), 6);
    assert_eq!(value(b"'\xff'", Dialect::DEFAULT), b"\xff");
}

#[test]
fn standard_strings_off_makes_backslash_an_escape() {
    let off = Dialect {
        standard_strings: false,
        multibyte: Multibyte::AsciiSafe,
    };
    let src = b"'a\\' '; SET ROLE r; --'";
    assert_eq!(tokens(src).len(), 2, "on: two strings");
    let toks: Vec<Token> = Lexer::new(src, off).collect();
    assert_eq!(toks.len(), 6, "off: one string, then ; SET ROLE r ;");
    assert_eq!(value(b"'rol\\e'", off), b"role");
}

#[test]
fn sjis_trail_bytes_are_not_backslashes() {
    let sjis = Dialect {
        standard_strings: true,
        multibyte: Multibyte::Sjis,
    };
    let src = b"E'\x95\x5c'; SET ROLE r; --'";
    assert_eq!(tokens(src).len(), 1, "ASCII-safe reading: one long string");
    let toks: Vec<Token> = Lexer::new(src, sjis).collect();
    assert_eq!(
        toks.len(),
        6,
        "SJIS reading: the string ends, SET ROLE follows"
    );
    // Half-width katakana are single bytes in SJIS.
    assert_eq!(Multibyte::Sjis.char_len(b"\xb1\x5c", 0), 1);
    assert_eq!(Multibyte::Gb18030.char_len(b"\x81\x30\x81\x30", 0), 4);
    assert_eq!(
        Multibyte::Gb18030.char_len(b"\x81", 0),
        1,
        "clamped at the end"
    );
}
