//! Client text for the audit log: statements and parameters arrive in the
//! client's `client_encoding` and are recorded as UTF-8, exactly.
//!
//! Invariant: the result is either the same characters the client meant
//! (UTF-8 as sent, ASCII, or a single-byte encoding whose table is known to
//! match PostgreSQL's) or, when that cannot be guaranteed (invalid bytes, a
//! multi-byte encoding such as SJIS whose tables differ between
//! implementations), the bytes themselves in an unambiguous form:
//! `pgwarden:hex:<encoding>:<hex>`. Never a replacement character.

use std::borrow::Cow;

/// `bytes` (sent by a client whose `client_encoding` is `encoding`, as
/// PostgreSQL names it) as UTF-8 text; see the module invariant.
pub fn client_text<'a>(bytes: &'a [u8], encoding: &str) -> Cow<'a, str> {
    if bytes.is_ascii() {
        // Every client encoding PostgreSQL accepts is ASCII-compatible.
        return Cow::Borrowed(std::str::from_utf8(bytes).expect("ASCII"));
    }
    let name = encoding.to_ascii_uppercase().replace(['-', '_'], "");
    let decoded = match name.as_str() {
        "UTF8" | "UNICODE" | "SQLASCII" | "" => std::str::from_utf8(bytes).ok().map(Cow::Borrowed),
        "LATIN1" | "ISO88591" => Some(Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect())),
        // ISO 8859-9: WHATWG reads it as windows-1254, which differs only in
        // 0x80..=0x9F.
        "LATIN5" | "ISO88599" if !bytes.iter().any(|b| (0x80..=0x9f).contains(b)) => {
            single_byte(encoding_rs::WINDOWS_1254, bytes)
        }
        other => single_byte_table(other).and_then(|table| single_byte(table, bytes)),
    };
    decoded.unwrap_or_else(|| {
        let label = label(encoding);
        Cow::Owned(format!("pgwarden:hex:{label}:{}", hex::encode(bytes)))
    })
}

/// The encoding's name as the record shows it. PostgreSQL reads a name
/// ignoring case and every character but letters and digits (`S_J_I_S` is
/// SJIS), so the client's own spelling, which a startup packet may pad to
/// kilobytes, is not kept: letters and digits, upper case, at most 16 of
/// them (PostgreSQL's names have 14 at most). `unknown` stays itself.
fn label(encoding: &str) -> String {
    if encoding == "unknown" {
        return encoding.to_string();
    }
    encoding
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .take(16)
        .collect()
}

fn single_byte<'a>(table: &'static encoding_rs::Encoding, bytes: &'a [u8]) -> Option<Cow<'a, str>> {
    table.decode_without_bom_handling_and_without_replacement(bytes)
}

/// The single-byte encodings whose WHATWG table (encoding_rs) is the one
/// PostgreSQL uses, by PostgreSQL's name without `_`.
fn single_byte_table(name: &str) -> Option<&'static encoding_rs::Encoding> {
    use encoding_rs::*;
    Some(match name {
        "LATIN2" | "ISO88592" => ISO_8859_2,
        "LATIN3" | "ISO88593" => ISO_8859_3,
        "LATIN4" | "ISO88594" => ISO_8859_4,
        "ISO88595" => ISO_8859_5,
        "ISO88596" => ISO_8859_6,
        "ISO88597" => ISO_8859_7,
        "ISO88598" => ISO_8859_8,
        "LATIN6" | "ISO885910" => ISO_8859_10,
        "LATIN7" | "ISO885913" => ISO_8859_13,
        "LATIN8" | "ISO885914" => ISO_8859_14,
        "LATIN9" | "ISO885915" => ISO_8859_15,
        "LATIN10" | "ISO885916" => ISO_8859_16,
        "WIN1250" => WINDOWS_1250,
        "WIN1251" => WINDOWS_1251,
        "WIN1252" => WINDOWS_1252,
        "WIN1253" => WINDOWS_1253,
        "WIN1254" => WINDOWS_1254,
        "WIN1255" => WINDOWS_1255,
        "WIN1256" => WINDOWS_1256,
        "WIN1257" => WINDOWS_1257,
        "WIN1258" => WINDOWS_1258,
        "WIN866" => IBM866,
        "KOI8R" => KOI8_R,
        // KOI8-U: WHATWG's table differs from PostgreSQL's at 0xAE and 0xBE
        // (kept as bytes).
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::client_text;

    #[test]
    fn text_is_exact_or_kept_as_bytes() {
        assert_eq!(client_text(b"SELECT 1", "SJIS"), "SELECT 1");
        assert_eq!(
            client_text("SELECT 'café'".as_bytes(), "UTF8"),
            "SELECT 'café'"
        );
        assert_eq!(client_text(b"SELECT 'caf\xe9'", "LATIN1"), "SELECT 'café'");
        assert_eq!(
            client_text(b"SELECT '\x80\x9f'", "LATIN1"),
            "SELECT '\u{80}\u{9f}'"
        );
        assert_eq!(client_text(b"SELECT '\xc0'", "WIN1251"), "SELECT 'А'");
        assert_eq!(client_text(b"SELECT '\xa4'", "LATIN9"), "SELECT '€'");
        assert_eq!(client_text(b"SELECT '\xfd'", "LATIN5"), "SELECT 'ı'");
        // Invalid UTF-8, a multi-byte encoding, and LATIN5's C1 range.
        assert_eq!(client_text(b"'\xff'", "UTF8"), "pgwarden:hex:UTF8:27ff27");
        assert_eq!(
            client_text(b"'\x82\xa0'", "SJIS"),
            "pgwarden:hex:SJIS:2782a027"
        );
        assert_eq!(client_text(b"\x80", "LATIN5"), "pgwarden:hex:LATIN5:80");
        // The client's spelling of the name is not kept (red team rt36).
        let padded = format!("S_J_I_S{}", "_".repeat(1500));
        assert_eq!(
            client_text(b"'\x82\xa0'", &padded),
            "pgwarden:hex:SJIS:2782a027"
        );
        assert_eq!(client_text(b"\xff", "euc_jp"), "pgwarden:hex:EUCJP:ff");
    }
}
