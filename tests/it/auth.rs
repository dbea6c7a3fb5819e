//! Login relay: SCRAM, MD5 and cleartext users, wrong passwords, unmapped
//! users, and clients that hang up in the middle of a login.

use crate::support::{self, cluster, start_gateway, Opts};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread")]
async fn scram_md5_and_cleartext_users_log_in() {
    let gw = start_gateway(Opts::default()).await;
    for user in ["alice", "md5_user", "clear_user"] {
        let client = gw.connect(user).await;
        assert_eq!(
            support::one(&client, "SELECT current_setting('app.client_user')").await,
            user
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_gets_the_backends_fatal_28p01() {
    let gw = start_gateway(Opts::default()).await;
    for user in ["alice", "md5_user", "clear_user"] {
        let url = gw.url(user, "not-the-password");
        let err = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .err()
            .expect("login must fail");
        assert_eq!(support::sqlstate(&err), "28P01", "{user}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_logs_in_through_the_gateway() {
    let gw = start_gateway(Opts::default()).await;
    let out = gw.psql("alice", &["-c", "SELECT current_user, session_user"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "analyst|pgwarden_svc"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unmapped_user_gets_fatal_28000() {
    let gw = start_gateway(Opts::default()).await;
    let Err(err) = gw.try_connect("carol").await else {
        panic!("carol has no mapping");
    };
    assert_eq!(support::sqlstate(&err), "28000");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("no role mapping for user \"carol\""),
        "{message}"
    );
}

/// Counts backend sessions of `user` (the temporary auth connections).
fn backends_of(user: &str) -> i64 {
    cluster()
        .psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'"),
        )
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn client_hanging_up_mid_login_leaves_nothing_behind() {
    let gw = start_gateway(Opts::default()).await;
    for _ in 0..5 {
        // What psql does: start up, read the password request, hang up.
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&startup_packet("bob")).await.unwrap();
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], b'R');
        assert_eq!(
            i32::from_be_bytes([head[5], head[6], head[7], head[8]]),
            10,
            "SASL requested"
        );
        drop(s);
    }
    // The temporary connections are closed by the gateway.
    let mut remaining = backends_of("bob");
    for _ in 0..50 {
        if remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        remaining = backends_of("bob");
    }
    assert_eq!(remaining, 0, "temporary auth connections leaked");
    // And the gateway still serves.
    let client = gw.connect("bob").await;
    assert_eq!(support::one(&client, "SELECT 1").await, "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn temporary_auth_connection_is_closed_after_login() {
    let gw = start_gateway(Opts::default()).await;
    let client = gw.connect("clear_user").await;
    // Before any query, no backend runs as clear_user: the auth connection is gone
    // and the pool logs in as the service user.
    let mut n = backends_of("clear_user");
    for _ in 0..50 {
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        n = backends_of("clear_user");
    }
    assert_eq!(n, 0);
    assert_eq!(
        support::one(&client, "SELECT session_user").await,
        "pgwarden_svc"
    );
}

pub fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", user), ("database", "app")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn greeting_after_login_is_complete_and_in_order() {
    // The gateway gathers the greeting (AuthenticationOk, ParameterStatus,
    // its own BackendKeyData, ReadyForQuery) and sends it at once: what the
    // client receives must still be exactly the protocol's sequence.
    let gw = start_gateway(Opts::default()).await;
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut c = crate::raw::RawClient {
        stream,
        key: (0, 0),
    };
    c.stream
        .write_all(&startup_packet("clear_user"))
        .await
        .unwrap();
    let (tag, body) = c.read_message().await;
    assert_eq!(
        (tag, &body[..4]),
        (b'R', &3i32.to_be_bytes()[..]),
        "cleartext request"
    );
    let mut password = support::password_of("clear_user").as_bytes().to_vec();
    password.push(0);
    c.send(b'p', &password).await;
    let mut tags = Vec::new();
    let mut params = Vec::new();
    loop {
        let (tag, body) = c.read_message().await;
        tags.push(tag);
        match tag {
            b'R' => assert_eq!(body, 0i32.to_be_bytes(), "AuthenticationOk"),
            b'S' => params.push(
                String::from_utf8_lossy(&body)
                    .split('\0')
                    .next()
                    .unwrap()
                    .to_string(),
            ),
            b'Z' => {
                assert_eq!(body, b"I");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(tags.first(), Some(&b'R'), "{tags:?}");
    assert_eq!(
        tags.iter().filter(|t| **t == b'K').count(),
        1,
        "one BackendKeyData: {tags:?}"
    );
    assert_eq!(
        tags[tags.len() - 2],
        b'K',
        "BackendKeyData just before ReadyForQuery: {tags:?}"
    );
    assert!(
        tags[1..tags.len() - 2].iter().all(|t| *t == b'S'),
        "{tags:?}"
    );
    for name in ["server_version", "client_encoding", "session_authorization"] {
        assert!(
            params.iter().any(|p| p == name),
            "{name} missing: {params:?}"
        );
    }
    // And the session serves.
    c.send(b'Q', b"SELECT 1\0").await;
    let (tags, error, _) = c.until_ready().await;
    assert_eq!((tags, error), (b"TDCZ".to_vec(), None));
}

/// PostgreSQL's connection limits apply to the gateway's sessions: a
/// client's login runs on a temporary connection closed at once, so
/// PostgreSQL counted nothing, and one user limited to 2 connections held
/// every one of `max_client_connections`. The gateway now reads the
/// role's and the database's limits at login and refuses as PostgreSQL
/// does (FATAL 53300), recorded as `denied`.
#[tokio::test(flavor = "multi_thread")]
async fn postgresql_connection_limits_hold_through_the_gateway() {
    let user = format!("limited_{}", rand::random::<u32>());
    cluster().psql(
        "app",
        &format!(
            "CREATE ROLE {user} LOGIN PASSWORD 'limited-pw' CONNECTION LIMIT 2; \
             GRANT other_role TO {user}; CREATE SCHEMA {user} AUTHORIZATION {user}; \
             CREATE FUNCTION {user}.current_database() RETURNS name \
             LANGUAGE sql AS $$ SELECT 'no_such_database'::name $$"
        ),
    );
    let gw = start_gateway(Opts {
        policy: "[[map]]\nclients = [\"limited_*\", \"alice\"]\nrole = \"analyst\"\n",
        ..Opts::default()
    })
    .await;
    let url = format!(
        "host=127.0.0.1 port={} user={user} password=limited-pw dbname=app",
        gw.port()
    );
    let connect_with = |options: &str| {
        let url = format!("{url} options='{options}'");
        async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    let connect = || connect_with("");
    let first = connect().await.unwrap();
    let second = connect().await.unwrap();
    let Err(third) = connect().await else {
        panic!("a third is over the limit");
    };
    assert_eq!(support::sqlstate(&third), "53300", "{third:?}");
    assert_eq!(
        third.as_db_error().map(|e| e.message().to_string()),
        Some(format!("too many connections for role \"{user}\""))
    );
    // The client's own startup settings change nothing: the limit is the
    // login role's (not a role it sets), read whatever its timeout, and
    // with no function of the client's (a search_path ahead of pg_catalog).
    let search_path = format!("-c search_path={user},pg_catalog");
    for options in ["-c role=other_role", "-c statement_timeout=1", &search_path] {
        let Err(refused) = connect_with(options).await else {
            panic!("{options}: over the limit");
        };
        assert_eq!(
            support::sqlstate(&refused),
            "53300",
            "{options}: {refused:?}"
        );
    }

    // Others are not held to it; a session that ends gives its place back.
    let alice = gw.connect("alice").await;
    assert_eq!(support::one(&alice, "SELECT 1").await, "1");
    drop(first);
    support::eventually_async("a place is free", || async { connect().await.is_ok() }).await;
    assert_eq!(support::one(&second, "SELECT 1").await, "1");
    cluster().psql(
        "postgres",
        &format!("ALTER ROLE {user} CONNECTION LIMIT -1"),
    );
    let many: Vec<_> = futures_util::future::join_all((0..4).map(|_| connect())).await;
    assert!(many.iter().all(Result::is_ok), "no limit: {many:?}");
}

/// A database's `CONNECTION LIMIT` holds through the gateway too, for
/// every client together.
#[tokio::test(flavor = "multi_thread")]
async fn a_databases_connection_limit_holds_through_the_gateway() {
    let db = format!("limited_db_{}", rand::random::<u32>());
    support::create_db(&db);
    cluster().psql(
        "postgres",
        &format!("ALTER DATABASE {db} CONNECTION LIMIT 1"),
    );
    let gw = start_gateway(Opts::default()).await;
    let alice = support::connect_to(&gw, "alice", &db).await;
    let url = gw
        .url("bob", support::password_of("bob"))
        .replace("dbname=app", &format!("dbname={db}"));
    let Err(refused) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
        panic!("a second client of {db} is over its limit");
    };
    assert_eq!(
        refused.as_db_error().map(|e| e.message().to_string()),
        Some(format!("too many connections for database \"{db}\""))
    );
    drop(alice);
    gw.until_clients(0).await;
    support::connect_to(&gw, "bob", &db).await;
}
