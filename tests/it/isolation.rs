//! Strict isolation: identity that SQL cannot change, by construction.
//!
//! - `[pool] isolation = "role"`: each mapped role has its own login, a
//!   `NOINHERIT` member of that role only, so PostgreSQL itself refuses a
//!   switch to another role, and `RESET ROLE` lands on a login with no
//!   privileges.
//! - The signed client tag: `pgwarden.client_user()` raises 42501 for a
//!   forged value, one copied from another backend, or none.
//!
//! Each test migrates a database of its own.

use crate::support::{self, cluster, connect_to, create_db, start_gateway, Opts};

const ROLE_POLICY: &str = r#"
[[map]]
clients = ["alice", "md5_user"]
role = "analyst"

[[map]]
clients = ["bob"]
role = "engineer"

[[map]]
clients = ["carol"]
role = "{user}"
"#;

fn role_opts(pool_extra: &str) -> Opts {
    Opts {
        policy: ROLE_POLICY,
        pool_extra: format!("isolation = \"role\"\n{pool_extra}"),
        ..Opts::default()
    }
}

fn migrated(gw: &support::TestGateway, db: &str, setup: &str) {
    create_db(db);
    let out = support::migrate(gw.dir.path(), db, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("migrations applied") && stdout.contains("client tags are signed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster().psql(db, setup);
}

async fn error_of(client: &tokio_postgres::Client, sql: &str) -> String {
    match client.batch_execute(sql).await {
        Ok(()) => panic!("{sql}: succeeded"),
        Err(e) => support::sqlstate(&e),
    }
}

const TAG_SETUP: &str = "
CREATE TABLE notes (owner text, body text);
INSERT INTO notes VALUES ('alice', 'a1'), ('bob', 'b1');
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON notes USING (owner = pgwarden.client_user());
GRANT SELECT ON notes TO analyst, engineer;
-- An administrator's function that sets the client tag from inside, where
-- no statement guard can see it.
CREATE FUNCTION forge_tag(v text) RETURNS text LANGUAGE sql
  AS $$ SELECT pg_catalog.set_config('app.client_user', v, false) $$;
";

/// A forged tag, set by a function the guard cannot see into, makes
/// `pgwarden.client_user()` raise, and with it every RLS-protected read.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_client_tag_is_refused_by_the_database() {
    let gw = start_gateway(Opts::default()).await;
    migrated(&gw, "signed_forged", TAG_SETUP);
    let alice = connect_to(&gw, "alice", "signed_forged").await;
    assert_eq!(
        support::one(&alice, "SELECT pgwarden.client_user()").await,
        "alice"
    );
    assert_eq!(
        support::one(&alice, "SELECT string_agg(body, ',') FROM notes").await,
        "a1"
    );
    let value = support::one(&alice, "SELECT current_setting('app.client_user')").await;
    assert!(
        value.starts_with("alice.") && value.len() == "alice".len() + 105,
        "{value}"
    );
    for forged in ["bob", "alice", "", &value.replace("alice.", "bob..")] {
        let sql =
            format!("BEGIN; SELECT forge_tag('{forged}'); SELECT string_agg(body, ',') FROM notes");
        assert_eq!(error_of(&alice, &sql).await, "42501", "{forged:?}");
        alice.batch_execute("ROLLBACK").await.unwrap();
    }
    // Set for the session, the forged value is overwritten by the next
    // transaction's assertion.
    let _ = alice.batch_execute("SELECT forge_tag('bob')").await;
    assert_eq!(
        support::one(&alice, "SELECT string_agg(body, ',') FROM notes").await,
        "a1"
    );
    // migrate names the policy that verifies the tag for every row.
    let out = support::migrate(gw.dir.path(), "signed_forged", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "policy own_notes on public.notes verifies pgwarden.client_user() for every row"
        ),
        "{stdout}"
    );
}

/// A genuine value copied from another client's session is bound to that
/// session's backend: on any other backend it is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_tag_copied_from_another_session_is_refused() {
    let gw = start_gateway(Opts::default()).await;
    migrated(&gw, "signed_copied", TAG_SETUP);
    let alice = connect_to(&gw, "alice", "signed_copied").await;
    let bob = connect_to(&gw, "bob", "signed_copied").await;
    // bob holds his backend in a transaction: alice runs on another one.
    bob.batch_execute("BEGIN").await.unwrap();
    let bobs = support::one(&bob, "SELECT current_setting('app.client_user')").await;
    assert_eq!(
        support::one(&bob, "SELECT string_agg(body, ',') FROM notes").await,
        "b1"
    );
    let sql = format!("BEGIN; SELECT forge_tag('{bobs}'); SELECT pgwarden.client_user()");
    assert_eq!(error_of(&alice, &sql).await, "42501");
    alice.batch_execute("ROLLBACK").await.unwrap();
    let sql = format!("BEGIN; SELECT forge_tag('{bobs}'); SELECT body FROM notes");
    assert_eq!(error_of(&alice, &sql).await, "42501");
    alice.batch_execute("ROLLBACK").await.unwrap();
    bob.batch_execute("COMMIT").await.unwrap();
}

/// `pgwarden migrate --rotate-tag-key`: the old key stays accepted for the
/// grace period, the gateway moves to the new key at its next refresh, and
/// a key retired without grace is replaced on the connections that carry
/// it.
#[tokio::test(flavor = "multi_thread")]
async fn the_tag_key_rotates_without_refusing_clients() {
    let gw = start_gateway(Opts {
        identity_extra: "tag_key_refresh_ms = 1000".into(),
        ..Opts::default()
    })
    .await;
    migrated(&gw, "signed_rotation", TAG_SETUP);
    let key_of = |value: &str| value[value.len() - 104..value.len() - 96].to_string();
    let alice = connect_to(&gw, "alice", "signed_rotation").await;
    let tag = "SELECT current_setting('app.client_user')";
    let first = key_of(&support::one(&alice, tag).await);
    for grace in ["600", "0"] {
        let before = key_of(&support::one(&alice, tag).await);
        let out = support::migrate(
            gw.dir.path(),
            "signed_rotation",
            &["--rotate-tag-key", "--grace-seconds", grace],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("signed with the new key"), "{stdout}");
        if grace != "0" {
            // Within the grace period the old key still verifies.
            assert_eq!(
                support::one(&alice, "SELECT pgwarden.client_user()").await,
                "alice"
            );
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let ok = alice
                .simple_query("SELECT pgwarden.client_user()")
                .await
                .is_ok();
            if ok && key_of(&support::one(&alice, tag).await) != before {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no new key in use");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    assert_ne!(key_of(&support::one(&alice, tag).await), first);
}

const ROLE_SETUP: &str = "
CREATE TABLE secrets (v text);
INSERT INTO secrets VALUES ('s');
GRANT SELECT ON secrets TO analyst, engineer, carol;
-- Administrators' SECURITY INVOKER functions that change the role from
-- inside: no statement guard sees them.
CREATE FUNCTION become_engineer() RETURNS text LANGUAGE sql
  AS $$ SELECT pg_catalog.set_config('role', 'engineer', false) $$;
CREATE FUNCTION drop_role() RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN EXECUTE 'RESET ROLE'; RETURN current_user; END $$;
";

/// With `isolation = "role"`, PostgreSQL refuses the switch to another
/// mapped role, and `RESET ROLE` leaves a login that can read nothing.
#[tokio::test(flavor = "multi_thread")]
async fn role_isolation_makes_role_changes_fail_in_postgresql() {
    let gw = start_gateway(role_opts("")).await;
    migrated(&gw, "iso_escape", ROLE_SETUP);
    let alice = connect_to(&gw, "alice", "iso_escape").await;
    assert_eq!(
        support::one(&alice, "SELECT current_user || ' ' || session_user").await,
        "analyst pgwarden_svc_analyst"
    );
    assert_eq!(error_of(&alice, "SELECT become_engineer()").await, "42501");
    assert_eq!(
        error_of(
            &alice,
            "SELECT pg_catalog.set_config('role', 'engineer', false)"
        )
        .await,
        "42501"
    );
    alice.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        support::one(&alice, "SELECT drop_role()").await,
        "pgwarden_svc_analyst"
    );
    assert_eq!(error_of(&alice, "SELECT v FROM secrets").await, "42501");
    alice.batch_execute("ROLLBACK").await.unwrap();
    // The session-level RESET ROLE outside a transaction: the next
    // transaction is asserted afresh.
    assert_eq!(
        support::one(&alice, "SELECT drop_role()").await,
        "pgwarden_svc_analyst"
    );
    assert_eq!(
        support::one(&alice, "SELECT v || current_user FROM secrets").await,
        "sanalyst"
    );
    // A `{user}` rule: carol runs as role carol through her own login.
    let carol = connect_to(&gw, "carol", "iso_escape").await;
    assert_eq!(
        support::one(&carol, "SELECT current_user || ' ' || session_user").await,
        "carol pgwarden_svc_carol"
    );
    let logins = cluster().psql(
        "postgres",
        "SELECT string_agg(r.rolname || ':' || r.rolinherit || ':' || \
         (SELECT string_agg(g.rolname, ',') FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid), ' ' ORDER BY r.rolname) \
         FROM pg_roles r WHERE r.rolname IN ('pgwarden_svc_analyst', 'pgwarden_svc_engineer', 'pgwarden_svc_carol')",
    );
    assert_eq!(
        logins,
        "pgwarden_svc_analyst:false:analyst pgwarden_svc_carol:false:carol pgwarden_svc_engineer:false:engineer"
    );
}

/// Two clients of different roles interleave 1,000 transactions: each sees
/// only its own role, login and client name.
#[tokio::test(flavor = "multi_thread")]
async fn role_isolation_interleaves_clients_without_a_leak() {
    let gw = start_gateway(role_opts("")).await;
    migrated(&gw, "iso_interleave", ROLE_SETUP);
    let mut tasks = Vec::new();
    for (user, role) in [("alice", "analyst"), ("bob", "engineer")] {
        let client = connect_to(&gw, user, "iso_interleave").await;
        tasks.push(tokio::spawn(async move {
            let want = format!("{role} pgwarden_svc_{role} {user}");
            let sql = "SELECT current_user || ' ' || session_user || ' ' || pgwarden.client_user()";
            for i in 0..500 {
                // Every other transaction is an explicit one of two statements.
                if i % 2 == 1 {
                    client.batch_execute("BEGIN").await.unwrap();
                    assert_eq!(support::one(&client, sql).await, want, "transaction {i}");
                }
                assert_eq!(support::one(&client, sql).await, want, "transaction {i}");
                if i % 2 == 1 {
                    client.batch_execute("COMMIT").await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let logins: Vec<String> = gw
        .shared
        .pools
        .status()
        .into_iter()
        .filter(|((db, _), _)| db == "iso_interleave")
        .map(|((_, login), _)| login)
        .collect();
    assert_eq!(logins.len(), 2, "{logins:?}");
}

/// Idle per-role pools shrink, and `max_db_connections` caps a database's
/// pools together: a role with no idle connection takes one that another
/// role's pool holds idle, and waits (then 53300) when all are busy.
#[tokio::test(flavor = "multi_thread")]
async fn role_pools_shrink_and_share_a_cap() {
    let gw = start_gateway(Opts {
        acquire_timeout_ms: 500,
        ..role_opts("max_db_connections = 1\nidle_timeout_ms = 400")
    })
    .await;
    migrated(&gw, "iso_cap", ROLE_SETUP);
    let total = |gw: &support::TestGateway| -> usize {
        gw.shared
            .pools
            .status()
            .iter()
            .filter(|((db, _), _)| db == "iso_cap")
            .map(|(_, s)| s.size)
            .sum()
    };
    let alice = connect_to(&gw, "alice", "iso_cap").await;
    let bob = connect_to(&gw, "bob", "iso_cap").await;
    for _ in 0..3 {
        assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");
        assert_eq!(support::one(&bob, "SELECT current_user").await, "engineer");
        assert_eq!(total(&gw), 1);
    }
    alice.batch_execute("BEGIN").await.unwrap();
    assert_eq!(error_of(&bob, "SELECT 1").await, "53300");
    alice.batch_execute("COMMIT").await.unwrap();
    assert_eq!(support::one(&bob, "SELECT current_user").await, "engineer");
    support::eventually("idle pools shrink to nothing", || total(&gw) == 0).await;
}

/// A session that waits at the database's cap while another pool's
/// connection is busy gets a connection once that one goes idle: the wait
/// closes it as soon as it is idle (it used to wait on the cap for the
/// whole timeout, which an idle connection never gives back: 53300).
#[tokio::test(flavor = "multi_thread")]
async fn a_session_waiting_at_the_cap_gets_the_connection_another_pool_idles() {
    let gw = start_gateway(Opts {
        acquire_timeout_ms: 3000,
        ..role_opts("max_db_connections = 1")
    })
    .await;
    migrated(&gw, "iso_cap_wait", ROLE_SETUP);
    let alice = connect_to(&gw, "alice", "iso_cap_wait").await;
    let bob = std::sync::Arc::new(connect_to(&gw, "bob", "iso_cap_wait").await);
    alice.batch_execute("BEGIN").await.unwrap();
    assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");
    let waiting = tokio::spawn({
        let bob = bob.clone();
        async move { support::one(&bob, "SELECT current_user").await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    alice.batch_execute("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap(), "engineer");
}

/// A value copied from a client of another role is refused even on the
/// same backend process: the MAC binds the role too.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_tag_of_another_role_is_refused_on_the_same_backend() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    migrated(&gw, "signed_same_backend", TAG_SETUP);
    let alice = connect_to(&gw, "alice", "signed_same_backend").await;
    let bob = connect_to(&gw, "bob", "signed_same_backend").await;
    let pid = "SELECT pg_backend_pid()";
    let bobs = support::one(&bob, "SELECT current_setting('app.client_user')").await;
    assert_eq!(
        support::one(&bob, pid).await,
        support::one(&alice, pid).await
    );
    let sql = format!("BEGIN; SELECT forge_tag('{bobs}'); SELECT pgwarden.client_user()");
    assert_eq!(error_of(&alice, &sql).await, "42501");
    alice.batch_execute("ROLLBACK").await.unwrap();
}

/// The tag reader reads a database's key id only from the plain table
/// `pgwarden migrate` makes, owned by a superuser: in a database where a
/// client may create objects, a function, a view, a row-security policy
/// or a partial index named like it runs nothing as the reader (red-team
/// findings: the reader called a function of the database's own, then the
/// planner evaluated an index predicate a client wrote).
#[tokio::test(flavor = "multi_thread")]
async fn the_tag_reader_runs_no_code_of_the_database() {
    let gw = start_gateway(Opts {
        identity_extra: "tag_key_refresh_ms = 1000".into(),
        ..Opts::default()
    })
    .await;
    // Some database must have been migrated for the reader login to exist.
    migrated(&gw, "signed_reader_home", "SELECT 1");
    create_db("reader_trap");
    let pg = cluster();
    pg.psql(
        "reader_trap",
        "GRANT CREATE ON DATABASE reader_trap TO analyst; GRANT CREATE, USAGE ON SCHEMA public TO analyst;",
    );
    let alice = connect_to(&gw, "alice", "reader_trap").await;
    alice
        .batch_execute(
            "CREATE TABLE public.seen (who text);
             GRANT INSERT ON public.seen TO PUBLIC;
             CREATE FUNCTION public.trap() RETURNS bytea LANGUAGE plpgsql AS $$
               BEGIN INSERT INTO public.seen VALUES (current_user); RETURN '\\x00'; END $$;
             CREATE SCHEMA pgwarden;
             GRANT USAGE ON SCHEMA pgwarden TO PUBLIC;
             CREATE VIEW pgwarden.tag_keys AS
               SELECT 1 AS id, public.trap() AS key, NULL::timestamptz AS retire_at;
             GRANT SELECT ON pgwarden.tag_keys TO PUBLIC;
             CREATE FUNCTION pgwarden.tag_signing_key() RETURNS TABLE (id int, key bytea)
               LANGUAGE sql AS $$ SELECT 1, public.trap() $$;",
        )
        .await
        .unwrap();
    refreshes(&alice).await;
    alice
        .batch_execute(
            "DROP VIEW pgwarden.tag_keys;
             CREATE TABLE pgwarden.tag_keys (id int, key bytea, retire_at timestamptz);
             INSERT INTO pgwarden.tag_keys VALUES (1, '\\x00', NULL);
             ALTER TABLE pgwarden.tag_keys ENABLE ROW LEVEL SECURITY;
             CREATE POLICY trap ON pgwarden.tag_keys USING (public.trap() IS NOT NULL);
             GRANT SELECT ON pgwarden.tag_keys TO PUBLIC;",
        )
        .await
        .unwrap();
    refreshes(&alice).await;
    // A plain table whose partial index predicate the planner evaluates
    // (second red-team pass).
    alice
        .batch_execute(
            "DROP TABLE pgwarden.tag_keys;
             CREATE FUNCTION public.trap_now() RETURNS boolean LANGUAGE sql IMMUTABLE
               AS $$ SELECT public.trap() IS NOT NULL $$;
             CREATE TABLE pgwarden.tag_keys (id int, key bytea, retire_at timestamptz);
             CREATE INDEX ON pgwarden.tag_keys (id) WHERE public.trap_now();
             GRANT SELECT ON pgwarden.tag_keys TO PUBLIC;",
        )
        .await
        .unwrap();
    refreshes(&alice).await;
    assert_eq!(
        pg.psql(
            "reader_trap",
            "SELECT count(*) FROM public.seen WHERE who <> 'analyst'"
        ),
        "0"
    );
}

/// Transactions past the gateway's key refresh interval (1 s): each new
/// one may read the database's key again.
async fn refreshes(client: &tokio_postgres::Client) {
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        client.batch_execute("SELECT 1").await.unwrap();
    }
}

/// A startup packet that names `user` (or any parameter) twice is refused:
/// PostgreSQL authenticates the last `user`, and a gateway reading the
/// first would run one client as another (red-team finding).
#[tokio::test(flavor = "multi_thread")]
async fn a_startup_packet_with_a_repeated_parameter_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start_gateway(Opts::default()).await;
    for params in [
        [("user", "bob"), ("database", "app"), ("user", "alice")],
        [
            ("user", "alice"),
            ("database", "other"),
            ("database", "app"),
        ],
    ] {
        let mut body = 196608i32.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(&packet).await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tcp.read_to_end(&mut reply),
        )
        .await;
        let text = String::from_utf8_lossy(&reply);
        assert_eq!(reply.first(), Some(&b'E'), "{text}");
        assert!(
            text.contains("08P01") && text.contains("more than once"),
            "{text}"
        );
    }
}

/// PostgreSQL keeps the first 63 bytes of a user name: the gateway maps,
/// tags and records that name, not the longer one the client sent
/// (red-team finding: `<63-byte name>.bob` was tagged as such).
#[tokio::test(flavor = "multi_thread")]
async fn an_overlong_user_name_is_the_name_postgresql_authenticates() {
    let long = format!("longuser_{}", "x".repeat(54));
    assert_eq!(long.len(), 63);
    cluster().psql(
        "postgres",
        &format!(
            "DO $$ BEGIN CREATE ROLE {long} LOGIN PASSWORD 'long-pw'; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ),
    );
    let gw = start_gateway(Opts {
        policy: "[[map]]\nclients = [\"longuser_*\"]\nrole = \"analyst\"\n",
        ..Opts::default()
    })
    .await;
    let url = format!(
        "host=127.0.0.1 port={} user={long}.bob password=long-pw dbname=app",
        gw.port()
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(
        support::one(&client, "SELECT current_setting('app.client_user')").await,
        long
    );
}

/// A login of pgwarden's with settings of its own is refused: a client
/// that reached the login (RESET ROLE through an administrator's function
/// that runs its SQL) could set `search_path` for it and so run its own
/// functions inside other clients' sessions (third red-team pass).
/// `pgwarden migrate` removes such settings, in every database.
#[tokio::test(flavor = "multi_thread")]
// The lock only keeps other tests' `migrate` runs (blocking, each on its
// own runtime) from removing the planted setting while this test looks.
#[allow(clippy::await_holding_lock)]
async fn a_login_with_settings_of_its_own_serves_no_one_until_migrate() {
    let role_gw = start_gateway(role_opts("")).await;
    let shared_gw = start_gateway(Opts::default()).await;
    migrated(&role_gw, "iso_settings", ROLE_SETUP);
    let pg = cluster();
    for (gw, login) in [
        (&role_gw, "pgwarden_svc_analyst"),
        (&shared_gw, support::cluster::SERVICE_USER),
    ] {
        let planted = support::no_migrate_meanwhile();
        pg.psql(
            "postgres",
            &format!(
                "ALTER ROLE {login} IN DATABASE iso_settings SET search_path = public, pg_catalog"
            ),
        );
        let alice = connect_to(gw, "alice", "iso_settings").await;
        let err = alice.simple_query("SELECT 1").await.unwrap_err();
        drop(planted);
        assert_eq!(support::sqlstate(&err), "08006", "{err:?}");
        assert!(format!("{err:?}").contains("of its own"), "{err:?}");
        let out = support::migrate(gw.dir.path(), "iso_settings", &[]);
        assert!(out.status.success() || !out.stdout.is_empty(), "{out:?}");
        assert_eq!(
            pg.psql(
                "postgres",
                &format!("SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole JOIN pg_database d ON d.oid = s.setdatabase WHERE r.rolname = '{login}' AND d.datname = 'iso_settings'"),
            ),
            "0"
        );
        assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");
    }
}

/// The check reads what the backend applied at its start, not only what
/// the catalog holds when the check runs: a setting removed again right
/// after the backend started (a client toggling it in a loop) is still
/// found (fourth red-team pass).
#[tokio::test(flavor = "multi_thread")]
// As above: no other test's `migrate` may remove the planted setting.
#[allow(clippy::await_holding_lock)]
async fn a_login_setting_removed_after_the_backend_started_is_still_refused() {
    let gw = start_gateway(role_opts("")).await;
    migrated(&gw, "iso_settings_race", ROLE_SETUP);
    // search_path, and a library's setting, a placeholder that does not
    // show until the library loads (fifth red-team pass).
    for setting in [
        "search_path = public, pg_catalog",
        "plpgsql.extra_errors = 'all'",
    ] {
        planted_then_removed(&gw, setting).await;
    }
}

#[allow(clippy::await_holding_lock)]
async fn planted_then_removed(gw: &support::TestGateway, setting: &str) {
    use pgwarden::auth::service::{login, ServiceLogin};
    use pgwarden::backend::conn::ServerConn;
    let pg = cluster();
    let planted = support::no_migrate_meanwhile();
    let user = "pgwarden_svc_analyst";
    pg.psql(
        "postgres",
        &format!("ALTER ROLE {user} IN DATABASE iso_settings_race SET {setting}"),
    );
    let backend = gw.shared.config.backend.clone();
    let mut conn = ServerConn::connect(&backend, None).await.unwrap();
    let password = pgwarden::auth::logins::derived_password(
        backend.service_password.as_deref().unwrap(),
        user,
    );
    login(
        &mut conn,
        &ServiceLogin {
            user,
            password: Some(&password),
            database: "iso_settings_race",
        },
    )
    .await
    .unwrap();
    pg.psql(
        "postgres",
        &format!("ALTER ROLE {user} IN DATABASE iso_settings_race RESET ALL"),
    );
    drop(planted);
    let err = match conn.check_new_backend().await {
        Ok(started) => panic!("{setting}: the connection was accepted ({started:?})"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("setting of its own"),
        "{setting}: {err}"
    );
}
