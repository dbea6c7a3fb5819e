use super::*;

fn assertion() -> Assertion<'static> {
    Assertion {
        role: "analyst",
        setting: "app.client_user",
        client_user: "alice",
        tag: None,
        settings: &[],
    }
}

/// A `DataRow` of text columns.
fn row(values: &[&str]) -> Vec<u8> {
    let mut body = (values.len() as i16).to_be_bytes().to_vec();
    for v in values {
        body.extend((v.len() as i32).to_be_bytes());
        body.extend(v.as_bytes());
    }
    body
}

fn error_body(code: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "ERROR"), (b'C', code), (b'M', "no")] {
        body.push(field);
        body.extend(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    body
}

/// The tags of the frontend messages in `bytes`.
fn tags(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        out.push(rest[0]);
        rest = &rest[1 + len..];
    }
    out
}

/// The answers of a successful pipelined assertion, as PostgreSQL sends
/// them, notices and reports left out.
fn answers(reset: bool) -> Vec<(u8, Vec<u8>)> {
    let mut out: Vec<(u8, Vec<u8>)> = vec![
        (b'1', vec![]),
        (b'2', vec![]),
        (b'C', b"BEGIN\0".to_vec()),
        (b'3', vec![]),
    ];
    if reset {
        out.extend([
            (b'C', b"RESET\0".to_vec()),
            (b'T', vec![]),
            (b'D', row(&["x"])),
            (b'C', b"SELECT 1\0".to_vec()),
            (b'Z', b"T".to_vec()),
        ]);
    }
    out.extend([
        (b'1', vec![]),
        (b'2', vec![]),
        (b'D', row(&["analyst", "alice"])),
        (b'C', b"SELECT 1\0".to_vec()),
        (b'3', vec![]),
        (b'1', vec![]),
        (b'2', vec![]),
        (b'C', b"COMMIT\0".to_vec()),
        (b'3', vec![]),
        (b'I', vec![]),
        (b'S', b"TimeZone\0UTC\0".to_vec()),
        (b'Z', b"I".to_vec()),
    ]);
    out
}

#[test]
fn the_pipelined_assertion_is_unsynced_and_commits_in_a_block_of_its_own() {
    let mut out = BytesMut::new();
    assertion().encode_pipelined(Some("RESET ALL"), &mut out);
    // BEGIN, the reset, the assertion, COMMIT: each statement closed, and
    // no Sync anywhere, so an error skips what follows.
    assert_eq!(tags(&out), b"PBECQPBECPBECQ".to_vec());
    let mut out = BytesMut::new();
    assertion().encode_pipelined(None, &mut out);
    assert_eq!(tags(&out), b"PBECPBECPBECQ".to_vec());
    let text = String::from_utf8_lossy(&out);
    let begin = text.find("BEGIN").unwrap();
    let switch = text.find("set_config('role'").unwrap();
    let commit = text.find("COMMIT").unwrap();
    assert!(begin < switch && switch < commit);
}

#[test]
fn every_answer_is_read_before_it_is_confirmed() {
    for reset in [false, true] {
        let mut check =
            assertion().encode_pipelined(reset.then_some("RESET ALL"), &mut BytesMut::new());
        let answers = answers(reset);
        let last = answers.len() - 1;
        for (i, (tag, body)) in answers.iter().enumerate() {
            match check.on_frame(*tag, body) {
                Progress::More if i < last => {}
                Progress::Confirmed if i == last => {}
                other => panic!("answer {i} ({}): {other:?}", *tag as char),
            }
        }
    }
}

#[test]
fn an_error_anywhere_is_a_refusal() {
    for reset in [false, true] {
        let answers = answers(reset);
        for at in 0..answers.len() {
            let mut check =
                assertion().encode_pipelined(reset.then_some("RESET ALL"), &mut BytesMut::new());
            for (tag, body) in &answers[..at] {
                assert!(matches!(check.on_frame(*tag, body), Progress::More));
            }
            match check.on_frame(b'E', &error_body("42704")) {
                Progress::Refused(e) => assert!(e.cause.contains("42704"), "{}", e.cause),
                other => panic!("error at {at}: {other:?}"),
            }
        }
    }
}

#[test]
fn another_row_or_message_is_not_a_confirmation() {
    let answers = answers(false);
    let row_at = answers.iter().position(|(t, _)| *t == b'D').unwrap();
    for wrong in [
        row(&["engineer", "alice"]),
        row(&["analyst", "bob"]),
        row(&["analyst"]),
    ] {
        let mut check = assertion().encode_pipelined(None, &mut BytesMut::new());
        for (tag, body) in &answers[..row_at] {
            check.on_frame(*tag, body);
        }
        assert!(matches!(check.on_frame(b'D', &wrong), Progress::Broken(_)));
    }
    // A CommandComplete where a ParseComplete is due.
    let mut check = assertion().encode_pipelined(None, &mut BytesMut::new());
    assert!(matches!(
        check.on_frame(b'C', b"SELECT 1\0"),
        Progress::Broken(_)
    ));
}
