use super::*;

fn sample() -> Record {
    let mut ev = Event::new(Kind::Query);
    ev.client_user = Some("alice".into());
    ev.statement = Some("select '\"q\"'\n\t\\ \u{1} é/".into());
    ev.params = Some(vec![Some("1".into()), None]);
    ev.backend_pid = Some(-5);
    let mut r = Record::from_event(ev, 7, "2026-11-27T12:00:00.123456Z".into(), "0".repeat(64));
    r.hash = "ab".repeat(32);
    r
}

#[test]
fn stored_bytes_round_trip_and_match_serde_json() {
    let r = sample();
    let bytes = r.to_stored_bytes();
    let back = Record::from_stored_bytes(&bytes).unwrap();
    assert_eq!(back, r);
    // The hand-written escapes agree with serde_json's compact output.
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(serde_json::to_string(&v["statement"]).unwrap(), {
        let mut s = String::new();
        write_json_string(&mut s, r.statement.as_deref().unwrap());
        s
    });
}

#[test]
fn string_escapes_agree_with_serde_json_for_every_ascii_char() {
    let all: String = (0u8..0x80)
        .map(char::from)
        .chain("é€😀\u{2028}".chars())
        .collect();
    for c in all.chars() {
        // Short, and far into a long value (the scan goes by blocks).
        for text in [
            format!("a{c}b"),
            format!("{}{c}{}", "x".repeat(70), "y".repeat(9)),
        ] {
            let mut ours = String::new();
            write_json_string(&mut ours, &text);
            assert_eq!(ours, serde_json::to_string(&text).unwrap(), "char {:?}", c);
        }
    }
}

#[test]
fn a_record_without_escapes_fits_its_size_hint() {
    let mut ev = Event::new(Kind::IdentityViolation);
    let text = |n: usize| Some(Arc::<str>::from("x".repeat(n)));
    ev.session_id = text(36);
    ev.client_user = text(63);
    ev.role = text(63);
    ev.database = text(63);
    ev.client_addr = text(47);
    ev.application_name = text(63);
    ev.statement = Some("s".repeat(300));
    ev.params = Some(vec![Some("p".repeat(20)), None, Some(String::new())]);
    ev.status = Some(Status::Unknown);
    ev.sqlstate = Some("57P01".into());
    ev.message = Some("m".repeat(80));
    ev.command_tag = Some("INSERT 0 1".into());
    ev.rows = Some(u64::MAX);
    ev.duration_us = Some(u64::MAX);
    ev.backend_pid = Some(i32::MIN);
    ev.ref_seq = Some(u64::MAX);
    let r = Record::from_event(
        ev,
        u64::MAX,
        format_ts(OffsetDateTime::now_utc()),
        "0".repeat(64),
    );
    let canonical = r.canonical_string();
    let hint = stored_size_hint(&r.values());
    let stored = Record::stored_from_canonical(canonical, &"ab".repeat(32));
    assert!(stored.len() <= hint, "{} > {hint}", stored.len());
    assert!(
        hint - stored.len() < 100,
        "hint {hint} is far above {}",
        stored.len()
    );
}

#[test]
fn canonical_bytes_are_exact() {
    let mut r = Record::from_event(
        Event::new(Kind::GatewayStart),
        1,
        "2026-11-27T12:00:00.000001Z".into(),
        "0".repeat(64),
    );
    r.hash = "f".repeat(64);
    let expected = format!(
        "{{\"seq\":1,\"ts\":\"2026-11-27T12:00:00.000001Z\",\"kind\":\"gateway_start\",\
         \"session_id\":null,\"client_user\":null,\"role\":null,\"database\":null,\
         \"client_addr\":null,\"application_name\":null,\"statement\":null,\"params\":null,\
         \"status\":null,\"sqlstate\":null,\"message\":null,\"command_tag\":null,\"rows\":null,\
         \"duration_us\":null,\"backend_pid\":null,\"ref_seq\":null,\"prev_hash\":\"{}\"}}",
        "0".repeat(64)
    );
    assert_eq!(String::from_utf8(r.canonical_bytes()).unwrap(), expected);
    let stored = String::from_utf8(r.to_stored_bytes()).unwrap();
    assert_eq!(
        stored,
        format!(
            "{},\"hash\":\"{}\"}}",
            &expected[..expected.len() - 1],
            "f".repeat(64)
        )
    );
}

#[test]
fn unknown_keys_are_rejected() {
    let mut bytes = sample().to_stored_bytes();
    bytes.pop();
    bytes.extend_from_slice(b",\"extra\":1}");
    assert!(Record::from_stored_bytes(&bytes).is_err());
}

#[test]
fn timestamps_have_microseconds() {
    let t = time::macros::datetime!(2026-11-27 12:00:00.1234567 +02:00);
    assert_eq!(format_ts(t), "2026-11-27T10:00:00.123456Z");
    assert_eq!(
        parse_ts("2026-11-27T10:00:00.123456Z").unwrap(),
        t.replace_nanosecond(123_456_000).unwrap()
    );
    assert!(parse_ts("yesterday").is_err());
}

proptest::proptest! {
    /// The hand-written timestamp writes what `time`'s formatter writes, for
    /// any instant and offset (years outside 0-9999 take the formatter itself).
    #[test]
    fn timestamps_match_the_general_formatter(
        secs in -250_000_000_000i64..250_000_000_000,
        nanos in 0u32..1_000_000_000,
        offset in -86_399i32..86_399,
    ) {
        let offset = time::UtcOffset::from_whole_seconds(offset).unwrap();
        let t = OffsetDateTime::from_unix_timestamp(secs)
            .unwrap()
            .replace_nanosecond(nanos)
            .unwrap()
            .to_offset(offset);
        let expected = t
            .to_offset(time::UtcOffset::UTC)
            .format(TS_FORMAT)
            .unwrap();
        proptest::prop_assert_eq!(format_ts(t), expected);
    }
}

#[test]
fn timestamps_at_the_edges_of_four_digit_years() {
    for (t, text) in [
        (
            time::macros::datetime!(0000-01-01 00:00:00 UTC),
            "0000-01-01T00:00:00.000000Z",
        ),
        (
            time::macros::datetime!(9999-12-31 23:59:59.999999999 UTC),
            "9999-12-31T23:59:59.999999Z",
        ),
        (
            time::macros::datetime!(1970-01-01 00:00:00.000001 UTC),
            "1970-01-01T00:00:00.000001Z",
        ),
    ] {
        assert_eq!(format_ts(t), text);
    }
}

#[test]
fn member_openings_spell_the_fields_in_order() {
    for (i, (opening, name)) in MEMBER_OPENINGS.iter().zip(FIELDS).enumerate() {
        let separator = if i == 0 { "{" } else { "," };
        assert_eq!(*opening, format!("{separator}\"{name}\":"));
    }
    assert_eq!(FIELDS[TX_FIELD], "tx");
}

#[test]
fn kinds_parse_by_name() {
    for k in Kind::ALL {
        assert_eq!(k.as_str().parse::<Kind>().unwrap(), k);
        assert_eq!(
            serde_json::to_string(&k).unwrap(),
            format!("\"{}\"", k.as_str())
        );
    }
    assert!("querry".parse::<Kind>().unwrap_err().contains("query"));
}
