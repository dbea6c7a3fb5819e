//! Attacks on what the gateway decides at `Bind` and after a refusal (a
//! red-team pass on `set_config($1, ...)`, `[pool] session_set = "keep"`
//! and the locally aborted transaction): each one changed the identity or
//! committed refused work before its fix.

use crate::hostile::raw_with;
use crate::raw::{message, RawClient};
use crate::support::{start_gateway, Opts};

const WHO: &str = "SELECT current_user::text || '/' || current_setting('app.client_user')";
const ME: &str = "analyst/clear_user";
const SWITCH: &str =
    "SELECT pg_catalog.set_config($1, $2, false), pg_catalog.set_config($3, $4, false)";

fn cstr(s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    v.push(0);
    v
}

fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut body = cstr(name.as_bytes());
    body.extend(cstr(sql.as_bytes()));
    body.extend((types.len() as u16).to_be_bytes());
    for t in types {
        body.extend(t.to_be_bytes());
    }
    message(b'P', &body)
}

/// `Bind` of `statement` with text values (`None` = NULL); the counts are
/// unsigned 16-bit, as PostgreSQL reads them.
fn bind(statement: &str, values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut body = cstr(b"");
    body.extend(cstr(statement.as_bytes()));
    body.extend(0u16.to_be_bytes());
    body.extend((values.len() as u16).to_be_bytes());
    for v in values {
        match v {
            Some(v) => {
                body.extend((v.len() as i32).to_be_bytes());
                body.extend(*v);
            }
            None => body.extend((-1i32).to_be_bytes()),
        }
    }
    body.extend(0u16.to_be_bytes());
    message(b'B', &body)
}

fn execute() -> Vec<u8> {
    message(b'E', &[0, 0, 0, 0, 0])
}

fn sync() -> Vec<u8> {
    message(b'S', &[])
}

fn query(sql: &str) -> Vec<u8> {
    message(b'Q', &cstr(sql.as_bytes()))
}

async fn who(c: &mut RawClient) -> String {
    c.send_raw(&query(WHO)).await;
    c.first_value_until_ready().await.unwrap_or_default()
}

async fn simple(c: &mut RawClient, sql: &str) -> Option<String> {
    c.send_raw(&query(sql)).await;
    c.until_ready().await.1
}

const SWITCH_VALUES: [Option<&[u8]>; 4] = [
    Some(b"role"),
    Some(b"engineer"),
    Some(b"app.client_user"),
    Some(b"mallory"),
];

/// PostgreSQL reads a `Bind`'s value count as unsigned: 32768 values once
/// looked like none to the gateway, and the setting names went unchecked.
#[tokio::test(flavor = "multi_thread")]
async fn a_bind_with_32768_values_is_judged_like_any_other() {
    let gw = start_gateway(Opts::default()).await;
    let mut c = RawClient::login(gw.addr).await;
    let mut values: Vec<Option<&[u8]>> = SWITCH_VALUES.to_vec();
    values.resize(32768, None);
    let mut batch = query("BEGIN");
    batch.extend(parse("", SWITCH, &[25; 32768]));
    batch.extend(bind("", &values));
    batch.extend(execute());
    batch.extend(sync());
    c.send_raw(&batch).await;
    c.until_ready().await;
    let (_, code, _) = c.until_ready().await;
    assert_eq!(code.as_deref(), Some("42501"));
    simple(&mut c, "ROLLBACK").await;
    assert_eq!(who(&mut c).await, ME);
}

/// A setting name read back for `session_set = "keep"` once went into SQL
/// quoted for UTF-8: under SJIS (with `backslash_quote = on`) its last
/// byte escaped the closing quote and the next name ran as SQL, its rows
/// kept as settings applied after the identity. Only plain names are kept.
#[tokio::test(flavor = "multi_thread")]
async fn kept_setting_names_cannot_inject_sql_in_any_encoding() {
    let gw = start_gateway(Opts::default()).await;
    let mut c = raw_with(gw.addr, &[("client_encoding", "SJIS")]).await;
    assert_eq!(simple(&mut c, "SET backslash_quote = on").await, None);
    let payload = b")) v(n); SELECT $$app.client_user$$::text, $$mallory$$::text UNION ALL SELECT $$role$$, $$engineer$$ --";
    let mut batch = parse("", SWITCH, &[]);
    batch.extend(bind(
        "",
        &[
            Some(&[0xc5, 0x81, 0x5c]),
            Some(b"x"),
            Some(payload),
            Some(b"y"),
        ],
    ));
    batch.extend(execute());
    batch.extend(sync());
    c.send_raw(&batch).await;
    c.until_ready().await;
    for _ in 0..3 {
        assert_eq!(who(&mut c).await, ME);
    }
}

/// A `Parse` the server skipped (after an error earlier in its batch)
/// once replaced the gateway's idea of the unnamed statement, so a later
/// `Bind` of the server's real statement, which takes setting names as
/// parameters, went unchecked.
#[tokio::test(flavor = "multi_thread")]
async fn a_parse_the_server_skipped_leaves_the_statement_it_had() {
    let gw = start_gateway(Opts::default()).await;
    let mut c = RawClient::login(gw.addr).await;
    simple(&mut c, "BEGIN").await;
    simple(&mut c, "SAVEPOINT s").await;
    let mut batch = parse("", SWITCH, &[]);
    batch.extend(sync());
    c.send_raw(&batch).await;
    c.until_ready().await;
    let mut batch = bind("", &[]);
    batch.extend(parse(
        "",
        "SELECT $1::text, $2::text, $3::text, $4::text",
        &[],
    ));
    batch.extend(sync());
    c.send_raw(&batch).await;
    let (_, code, _) = c.until_ready().await;
    assert_eq!(
        code.as_deref(),
        Some("08P01"),
        "the Bind fails, the Parse is skipped"
    );
    let mut batch = parse("r", "ROLLBACK TO SAVEPOINT s", &[]);
    batch.extend(bind("r", &[]));
    batch.extend(execute());
    batch.extend(sync());
    c.send_raw(&batch).await;
    assert_eq!(c.until_ready().await.1, None);
    let mut batch = bind("", &SWITCH_VALUES);
    batch.extend(execute());
    batch.extend(sync());
    c.send_raw(&batch).await;
    let (_, code, _) = c.until_ready().await;
    assert_eq!(code.as_deref(), Some("42501"));
    simple(&mut c, "ROLLBACK").await;
    assert_eq!(who(&mut c).await, ME);
}

/// In session mode a second `Parse` of a name the server refuses (42P05)
/// once made the gateway forget what the first one takes; and a statement
/// taking setting names gets a gateway name, so SQL-level `EXECUTE` of the
/// client's name finds nothing.
#[tokio::test(flavor = "multi_thread")]
async fn session_mode_statements_that_take_setting_names_run_only_through_bind() {
    let gw = start_gateway(Opts {
        mode: "session",
        ..Opts::default()
    })
    .await;
    let mut c = RawClient::login(gw.addr).await;
    let mut batch = parse("s1", SWITCH, &[]);
    batch.extend(sync());
    batch.extend(parse(
        "s1",
        "SELECT $1::text, $2::text, $3::text, $4::text",
        &[],
    ));
    batch.extend(sync());
    c.send_raw(&batch).await;
    c.until_ready().await;
    c.until_ready().await;
    simple(&mut c, "BEGIN").await;
    let mut batch = bind("s1", &SWITCH_VALUES);
    batch.extend(execute());
    batch.extend(sync());
    c.send_raw(&batch).await;
    // Either refused, or the second text runs: never a switch.
    let refused = c.until_ready().await.1;
    assert!(
        matches!(refused.as_deref(), None | Some("42501")),
        "{refused:?}"
    );
    if refused.is_none() {
        assert_eq!(who(&mut c).await, ME, "inside the transaction");
    }
    simple(&mut c, "ROLLBACK").await;
    let mut batch = parse("s2", SWITCH, &[]);
    batch.extend(sync());
    c.send_raw(&batch).await;
    c.until_ready().await;
    let code = simple(
        &mut c,
        "EXECUTE s2('role', 'engineer', 'app.client_user', 'mallory')",
    )
    .await;
    assert_eq!(code.as_deref(), Some("26000"));
    assert_eq!(who(&mut c).await, ME);
}

/// After a refusal the client is told its transaction is aborted; a batch
/// that starts with `Parse` of `ROLLBACK` (which does not run before the
/// rest of the batch) once went to the server as it was, and the inserts
/// and `COMMIT` after it committed.
#[tokio::test(flavor = "multi_thread")]
async fn work_after_a_refusal_never_commits() {
    let gw = start_gateway(Opts::default()).await;
    let mut c = RawClient::login(gw.addr).await;
    let insert = |id: u32| format!("INSERT INTO items (id, owner) VALUES ({id}, 'clear_user')");
    simple(&mut c, "BEGIN").await;
    assert_eq!(simple(&mut c, &insert(700401)).await, None);
    assert_eq!(
        simple(&mut c, "SET ROLE engineer").await.as_deref(),
        Some("42501")
    );
    let mut batch = parse("", "ROLLBACK", &[]);
    for sql in [insert(700402), "COMMIT".to_string()] {
        batch.extend(parse("", &sql, &[]));
        batch.extend(bind("", &[]));
        batch.extend(execute());
    }
    batch.extend(sync());
    c.send_raw(&batch).await;
    let (_, code, _) = c.until_ready().await;
    assert_eq!(code.as_deref(), Some("25P02"));
    simple(&mut c, "ROLLBACK").await;
    c.send_raw(&query(
        "SELECT count(*) FROM items WHERE id IN (700401, 700402)",
    ))
    .await;
    assert_eq!(c.first_value_until_ready().await.as_deref(), Some("0"));
}

/// The identity assertion (an unnamed statement taking role and client
/// name as parameters) once stayed behind as the connection's unnamed
/// statement, and a client `Parse` of "" that the server skipped made the
/// gateway believe the client's own was there: the client's `Bind` of ""
/// then ran the assertion with values of its own (a red-team finding).
#[tokio::test(flavor = "multi_thread")]
async fn the_assertion_never_stays_behind_as_the_unnamed_statement() {
    let gw = start_gateway(Opts::default()).await;
    let mut c = RawClient::login(gw.addr).await;
    let run = |name: &str, sql: &str| {
        let mut batch = parse(name, sql, &[]);
        batch.extend(bind(name, &[]));
        batch.extend(execute());
        batch.extend(sync());
        batch
    };
    c.send_raw(&run("", "SELECT 'harmless'")).await;
    assert_eq!(c.until_ready().await.1, None);
    // Opaque once: every later binding asserts the identity afresh.
    assert_eq!(simple(&mut c, "SELECT pg_sleep(0)").await, None);
    // Named statements only, so no simple query drops the unnamed one.
    for (name, sql) in [("b", "BEGIN"), ("sp", "SAVEPOINT s")] {
        c.send_raw(&run(name, sql)).await;
        assert_eq!(c.until_ready().await.1, None);
    }
    let mut batch = bind("no_such_statement", &[]);
    batch.extend(parse("", "SELECT 2", &[]));
    batch.extend(sync());
    c.send_raw(&batch).await;
    assert_eq!(c.until_ready().await.1.as_deref(), Some("26000"));
    c.send_raw(&run("rs", "ROLLBACK TO SAVEPOINT s")).await;
    assert_eq!(c.until_ready().await.1, None);
    let mut batch = bind(
        "",
        &[
            Some(b"engineer"),
            Some(b"app.client_user"),
            Some(b"mallory"),
        ],
    );
    batch.extend(execute());
    batch.extend(sync());
    c.send_raw(&batch).await;
    // Refused by the server (there is no unnamed statement: the client's
    // was dropped by its simple query, and the assertion closes its own).
    let (_, code, status) = c.until_ready().await;
    assert_eq!((code.as_deref(), status), (Some("26000"), b'E'));
    simple(&mut c, "ROLLBACK").await;
    assert_eq!(who(&mut c).await, ME);
}
