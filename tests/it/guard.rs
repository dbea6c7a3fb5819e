//! The statement guard end to end: every escape in the adversarial table is
//! refused with 42501 through the gateway (simple and extended protocol),
//! leaves the identity as it was and the session usable; every legitimate
//! look-alike runs.

use pgwarden::identity::guard_cases::{
    DYNAMIC_ESCAPES, DYNAMIC_LEGITIMATE, ESCAPES, LEGITIMATE, STAGED_ESCAPES,
};

use crate::raw::RawClient;
use crate::support::{self, start_gateway, Opts};

const WHO: &str = "SELECT current_user || '/' || current_setting('app.client_user') || '/' || coalesce(current_setting('app.seen_role', true), '')";

async fn identity(c: &tokio_postgres::Client) -> String {
    support::one(c, WHO).await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_escape_is_refused_and_identity_is_unchanged() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    assert_eq!(identity(&c).await, "analyst/alice/");
    // The default config refuses dynamic SQL, so its escapes are refused too.
    for escape in ESCAPES.iter().chain(DYNAMIC_ESCAPES) {
        let err = c.simple_query(escape).await.expect_err(escape);
        assert_eq!(
            support::sqlstate(&err),
            "42501",
            "simple: {escape}: {err:?}"
        );
        let _ = c.simple_query("ROLLBACK").await;
        assert_eq!(
            identity(&c).await,
            "analyst/alice/",
            "after simple: {escape}"
        );

        let err = c.query(*escape, &[]).await.expect_err(escape);
        assert_eq!(
            support::sqlstate(&err),
            "42501",
            "extended: {escape}: {err:?}"
        );
        let _ = c.simple_query("ROLLBACK").await;
        assert_eq!(
            identity(&c).await,
            "analyst/alice/",
            "after extended: {escape}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refusal_inside_a_transaction_aborts_it_like_postgres_would() {
    let gw = start_gateway(Opts::default()).await;
    let c = gw.connect("alice").await;
    c.batch_execute("BEGIN").await.unwrap();
    let err = c.simple_query("RESET ROLE").await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "42501");
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        support::sqlstate(&err),
        "25P02",
        "the transaction is aborted"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(identity(&c).await, "analyst/alice/");
    // In a pipeline, the refused Parse fails its Sync group only.
    let (a, b, d) = tokio::join!(
        c.query_one("SELECT 1::int", &[]),
        c.query("SET ROLE other_role", &[]),
        c.query_one("SELECT 3::int", &[]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(support::sqlstate(&b.unwrap_err()), "42501");
    assert_eq!(d.unwrap().get::<_, i32>(0), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_legitimate_look_alike_runs() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    for sql in LEGITIMATE {
        if let Err(e) = c.simple_query(sql).await {
            panic!("legitimate SQL refused or failed: {sql}: {e:?}");
        }
        let _ = c.simple_query("ROLLBACK").await;
        assert_eq!(identity(&c).await, "analyst/alice/", "after: {sql}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dynamic_sql_runs_only_when_allowed() {
    let allowed = start_gateway(Opts {
        pool_size: 1,
        identity_extra: "allow_dynamic_sql = true".into(),
        ..Opts::default()
    })
    .await;
    let c = allowed.connect("alice").await;
    for sql in DYNAMIC_LEGITIMATE {
        if let Err(e) = c.simple_query(sql).await {
            panic!("dynamic SQL refused or failed with allow_dynamic_sql: {sql}: {e:?}");
        }
        assert_eq!(identity(&c).await, "analyst/alice/", "after: {sql}");
    }
    let default = start_gateway(Opts::default()).await;
    let c = default.connect("alice").await;
    for sql in DYNAMIC_LEGITIMATE {
        let err = c.simple_query(sql).await.expect_err(sql);
        assert_eq!(support::sqlstate(&err), "42501", "{sql}: {err:?}");
        assert!(format!("{err:?}").contains("allow_dynamic_sql"), "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn staged_escapes_are_refused() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    for (setup, payload) in STAGED_ESCAPES {
        let mut c = RawClient::login(gw.addr).await;
        let mut q = setup.as_bytes().to_vec();
        q.push(0);
        c.send(b'Q', &q).await;
        let (_, code, _) = c.until_ready().await;
        assert_eq!(code, None, "setup {setup}");
        let mut q = payload.to_vec();
        q.push(0);
        c.send(b'Q', &q).await;
        let (_, code, _) = c.until_ready().await;
        assert_eq!(code.as_deref(), Some("42501"), "payload after {setup}");
        let mut q = WHO.as_bytes().to_vec();
        q.push(0);
        c.send(b'Q', &q).await;
        let row = c.first_value_until_ready().await;
        assert_eq!(row.as_deref(), Some("analyst/clear_user/"), "after {setup}");
        c.send(
            b'Q',
            b"RESET client_encoding; RESET standard_conforming_strings\0",
        )
        .await;
        c.until_ready().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn function_call_of_set_config_is_refused() {
    let gw = start_gateway(Opts::default()).await;
    let mut c = RawClient::login(gw.addr).await;
    // FunctionCall: oid 2078 (set_config), no format codes, 3 text args, text result.
    let mut body = 2078i32.to_be_bytes().to_vec();
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&3i16.to_be_bytes());
    for arg in ["role", "other_role", "false"] {
        body.extend_from_slice(&(arg.len() as i32).to_be_bytes());
        body.extend_from_slice(arg.as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    c.send(b'F', &body).await;
    let (_, code, status) = c.until_ready().await;
    assert_eq!((code.as_deref(), status), (Some("42501"), b'I'));
    let mut q = WHO.as_bytes().to_vec();
    q.push(0);
    c.send(b'Q', &q).await;
    assert_eq!(
        c.first_value_until_ready().await.as_deref(),
        Some("analyst/clear_user/")
    );
}

/// Drivers' settings code passes the setting name as a parameter
/// (`SELECT set_config($1, $2, false)`): the guard judges the bound value at
/// each `Bind`, so ordinary settings work and the protected ones are refused
/// however the statement is reused.
#[tokio::test(flavor = "multi_thread")]
async fn set_config_with_a_bound_name_is_judged_at_bind() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    let stmt = c.prepare("SELECT set_config($1, $2, false)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let row = c.query_one(&stmt, &[&"work_mem", &"1234kB"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "1234kB");
    assert_eq!(support::one(&c, "SHOW work_mem").await, "1234kB");
    c.batch_execute("COMMIT").await.unwrap();
    for name in [
        "role",
        "ROLE",
        "session_authorization",
        "app.client_user",
        "App.Client_User",
    ] {
        let err = c.query_one(&stmt, &[&name, &"engineer"]).await.unwrap_err();
        assert_eq!(support::sqlstate(&err), "42501", "{name}: {err:?}");
        assert_eq!(identity(&c).await, "analyst/alice/", "after {name}");
    }
    // The same text unprepared (the unnamed statement), and a name padded
    // as a char(n) parameter would be.
    let err = c
        .query(
            "SELECT set_config($1::bpchar, 'engineer', false)",
            &[&"role  "],
        )
        .await
        .unwrap_err();
    assert_eq!(
        support::sqlstate(&err),
        "42501",
        "a cast is refused at Parse"
    );
    let err = c
        .query("SELECT set_config($1, $2, false)", &[&"role", &"engineer"])
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "42501");
    let typed = c
        .prepare_typed(
            "SELECT set_config($1, $2, false)",
            &[
                tokio_postgres::types::Type::BPCHAR,
                tokio_postgres::types::Type::TEXT,
            ],
        )
        .await
        .unwrap();
    let err = c
        .query(&typed, &[&"role   ", &"engineer"])
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "42501", "char(n) padding");
    assert_eq!(identity(&c).await, "analyst/alice/");
}

/// A refusal inside a transaction aborts it for the client without an
/// error in PostgreSQL's log: the server's transaction stays open until
/// the client's ROLLBACK (or ROLLBACK TO SAVEPOINT), which ends it the same
/// way. COMMIT of the aborted transaction commits nothing, as directly.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_in_a_transaction_leaves_no_error_in_the_server_log() {
    let pg = tokio::task::spawn_blocking(crate::support::cluster::start_private)
        .await
        .unwrap();
    let gw = start_gateway(Opts {
        backend_port: Some(pg.port),
        ..Opts::default()
    })
    .await;
    let c = gw.connect("alice").await;
    let count = "SELECT count(*) FROM items WHERE id BETWEEN 700201 AND 700299";
    // Simple protocol: the refusal, then ROLLBACK.
    c.batch_execute("BEGIN; INSERT INTO items (id, owner) VALUES (700201, 'alice')")
        .await
        .unwrap();
    let err = c.simple_query("SET ROLE other_role").await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "42501");
    c.batch_execute("ROLLBACK").await.unwrap();
    // Extended protocol, and a savepoint that rewinds past the refusal.
    c.batch_execute("BEGIN; INSERT INTO items (id, owner) VALUES (700202, 'alice'); SAVEPOINT s")
        .await
        .unwrap();
    let err = c.query("SET ROLE other_role", &[]).await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "42501");
    c.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    c.batch_execute("INSERT INTO items (id, owner) VALUES (700203, 'alice'); COMMIT")
        .await
        .unwrap();
    assert_eq!(support::one(&c, count).await, "2");
    assert_eq!(identity(&c).await, "analyst/alice/");
    let log = pg.server_log();
    assert!(!log.contains("pgwarden refused"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    // Going on inside the aborted transaction gets PostgreSQL's own
    // answers: 25P02, and ROLLBACK for COMMIT.
    c.batch_execute("BEGIN; INSERT INTO items (id, owner) VALUES (700204, 'alice')")
        .await
        .unwrap();
    let err = c.simple_query("SET ROLE other_role").await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "42501");
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "25P02");
    let tags = c.simple_query("COMMIT").await.unwrap();
    assert!(
        matches!(
            tags.last(),
            Some(tokio_postgres::SimpleQueryMessage::CommandComplete(0))
        ),
        "{tags:?}"
    );
    assert_eq!(support::one(&c, count).await, "2", "nothing committed");
}
