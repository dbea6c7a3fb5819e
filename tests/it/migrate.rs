//! `pgwarden migrate` and row-level security keyed on the real client name.

use crate::support::{self, cluster, start_gateway, Opts};

fn migrate(config_dir: &std::path::Path) -> std::process::Output {
    let pg = cluster();
    std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["migrate", "-c"])
        .arg(config_dir.join("pgwarden.toml"))
        .arg("--admin-url")
        .arg(format!("postgres://postgres@127.0.0.1:{}/app", pg.port))
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_is_idempotent_and_rls_sees_the_real_client() {
    let gw = start_gateway(Opts::default()).await;
    for _ in 0..2 {
        let out = migrate(gw.dir.path());
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
        "app",
        "CREATE TABLE IF NOT EXISTS notes (owner text, body text);
         TRUNCATE notes;
         INSERT INTO notes VALUES ('alice', 'a1'), ('alice', 'a2'), ('md5_user', 'm1');
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         DROP POLICY IF EXISTS own_notes ON notes;
         CREATE POLICY own_notes ON notes USING (owner = pgwarden.client_user());
         GRANT SELECT ON notes TO analyst;",
    );
    // alice and md5_user both run as role analyst; RLS tells them apart.
    let alice = gw.connect("alice").await;
    let rows = alice
        .query("SELECT body FROM notes ORDER BY body", &[])
        .await
        .unwrap();
    let bodies: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(bodies, vec!["a1", "a2"]);
    let other = gw.connect("md5_user").await;
    assert_eq!(
        support::one(&other, "SELECT string_agg(body, ',') FROM notes").await,
        "m1"
    );
    // Outside pgwarden the function is NULL and RLS shows nothing.
    assert_eq!(pg.psql("app", "SELECT pgwarden.client_user() IS NULL"), "t");
}
