//! `pgwarden migrate` and row-level security keyed on the real client name.
//! Each test migrates a database of its own: what migrate changes (the
//! catalog's grants) must not reach the other tests' database.

use crate::support::{self, cluster, connect_to, create_db, start_gateway, Opts};

fn migrate(config_dir: &std::path::Path, db: &str) -> std::process::Output {
    support::migrate(config_dir, db, &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_is_idempotent_and_rls_sees_the_real_client() {
    let gw = start_gateway(Opts::default()).await;
    create_db("migrated");
    for _ in 0..2 {
        let out = migrate(gw.dir.path(), "migrated");
        // ghost_role_that_does_not_exist is reported (exit 1), everything else applied.
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("migrations applied"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("role ghost_role_that_does_not_exist does not exist"),
            "{stdout}"
        );
    }
    let pg = cluster();
    assert_eq!(
        pg.psql(
            "app",
            "SELECT rolinherit FROM pg_roles WHERE rolname = 'pgwarden_svc'"
        ),
        "f"
    );
    pg.psql(
        "migrated",
        "CREATE TABLE IF NOT EXISTS notes (owner text, body text);
         TRUNCATE notes;
         INSERT INTO notes VALUES ('alice', 'a1'), ('alice', 'a2'), ('md5_user', 'm1');
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         DROP POLICY IF EXISTS own_notes ON notes;
         CREATE POLICY own_notes ON notes USING (owner = pgwarden.client_user());
         GRANT SELECT ON notes TO analyst;",
    );
    // alice and md5_user both run as role analyst; RLS tells them apart.
    let alice = connect_to(&gw, "alice", "migrated").await;
    let rows = alice
        .query("SELECT body FROM notes ORDER BY body", &[])
        .await
        .unwrap();
    let bodies: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(bodies, vec!["a1", "a2"]);
    let other = connect_to(&gw, "md5_user", "migrated").await;
    assert_eq!(
        support::one(&other, "SELECT string_agg(body, ',') FROM notes").await,
        "m1"
    );
    // Outside pgwarden there is no signed tag: the function raises 42501
    // (and RLS written on it shows nothing).
    assert_eq!(
        pg.psql(
            "migrated",
            "DO $$ BEGIN PERFORM pgwarden.client_user(); RAISE 'no error'; \
             EXCEPTION WHEN insufficient_privilege THEN RAISE NOTICE 'raised'; END $$; SELECT 'raised'"
        ),
        "raised"
    );
}

/// Transaction pooling shares prepared statements on a connection among
/// clients: after `migrate`, PostgreSQL itself refuses every mapped role
/// the view (and the function behind it) that would list another client's
/// statement texts.
#[tokio::test(flavor = "multi_thread")]
async fn other_clients_statement_texts_are_not_visible() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    create_db("hidden_statements");
    let out = migrate(gw.dir.path(), "hidden_statements");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pg_prepared_statements hidden"), "{stdout}");
    let alice = connect_to(&gw, "alice", "hidden_statements").await;
    let bob = connect_to(&gw, "bob", "hidden_statements").await;
    let secret = alice
        .prepare("SELECT 'alice-secret-text'::text")
        .await
        .unwrap();
    alice.query(&secret, &[]).await.unwrap();
    for sql in [
        "SELECT statement FROM pg_prepared_statements",
        "SELECT statement FROM pg_catalog.pg_prepared_statement()",
    ] {
        for client in [&bob, &alice] {
            let err = client.simple_query(sql).await.unwrap_err();
            assert_eq!(support::sqlstate(&err), "42501", "{sql}: {err:?}");
        }
    }
    // Outside pgwarden a superuser still sees them, and the database the
    // other tests use is untouched.
    let pg = cluster();
    assert_eq!(
        pg.psql(
            "hidden_statements",
            "SELECT has_table_privilege('analyst', 'pg_catalog.pg_prepared_statements', 'SELECT')"
        ),
        "f"
    );
    assert_eq!(
        pg.psql(
            "app",
            "SELECT has_table_privilege('analyst', 'pg_catalog.pg_prepared_statements', 'SELECT')"
        ),
        "t"
    );
}
