//! Audit checkpoints anchored in PostgreSQL (`[audit] checkpoint_database`):
//! what the service user may do with them, and `audit verify --anchors`
//! against the attacks the plain chain cannot see (a store rewritten with a
//! recomputed chain, a store cut short), and the ones on the anchors
//! themselves by someone holding the gateway's database login.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use pgwarden::audit::chain::compute_hash;
use pgwarden::audit::{Record, StoreReader};

use crate::support::{self, cluster, create_db, start_gateway, Opts};

const DB: &str = "anchored";

fn pgwarden(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(args)
        .output()
        .unwrap()
}

fn verify(store: &Path, anchors: Option<&str>) -> Output {
    let mut args = vec!["audit", "verify", "--store", store.to_str().unwrap()];
    if let Some(url) = anchors {
        args.extend(["--anchors", url]);
    }
    pgwarden(&args)
}

/// `audit verify` alone accepts the store at `dir`.
fn assert_chain_holds(dir: &Path) {
    let out = verify(dir, None);
    assert!(
        out.status.success(),
        "{}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `audit verify --anchors` refuses the store at `dir`, saying `says`.
fn assert_anchors_fail(dir: &Path, url: &str, says: &[&str]) {
    let out = verify(dir, Some(url));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {stderr}", dir.display());
    for words in says {
        assert!(stderr.contains(words), "{}: {stderr}", dir.display());
    }
}

/// psql as `user` (password `password`) on the anchoring database.
fn psql_as(user: &str, password: &str, sql: &str) -> Output {
    psql_in(DB, user, password, sql)
}

/// psql as `user` (password `password`) on database `db`.
fn psql_in(db: &str, user: &str, password: &str, sql: &str) -> Output {
    support::psql_command(cluster().port, user, password, db)
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap()
}

/// Every record of the store at `dir`.
fn records(dir: &Path) -> Vec<Record> {
    let reader = StoreReader::open(dir).unwrap();
    reader
        .scan_from(1)
        .map(|entry| {
            let (_, raw) = entry.unwrap();
            Record::from_stored_bytes(&raw).unwrap()
        })
        .collect()
}

/// Writes `records` as the store at `dir`, one per key, chained afresh
/// (and each `gateway_stop` naming its new chain head): what an
/// administrator of the gateway's host can do.
fn rewrite(dir: &Path, mut records: Vec<Record>) {
    let mut prev = pgwarden::audit::GENESIS_HASH.to_string();
    for record in &mut records {
        record.prev_hash = prev.clone();
        if record.kind.as_str() == "gateway_stop" {
            record.message = Some(format!("chain head {prev}"));
        }
        record.hash = compute_hash(record);
        prev = record.hash.clone();
    }
    let db = sled::open(dir).unwrap();
    db.clear().unwrap();
    for record in &records {
        db.insert(record.seq.to_be_bytes(), record.to_stored_bytes())
            .unwrap();
    }
    db.flush().unwrap();
}

fn copy_store(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn anchors_expose_a_rewritten_or_cut_store() {
    create_db(DB);
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: format!(
            "instance = \"gw-anchor\"\ncheckpoint_database = \"{DB}\"\ncheckpoint_interval_s = 1\n"
        ),
        ..Opts::default()
    })
    .await;
    let out = support::migrate(gw.dir.path(), DB, &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("migrations applied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The service user may append through the function, nothing else.
    let svc = support::cluster::SERVICE_PASSWORD;
    for sql in [
        "UPDATE pgwarden.audit_checkpoints SET hash = 'x'",
        "DELETE FROM pgwarden.audit_checkpoints",
        "INSERT INTO pgwarden.audit_checkpoints VALUES ('gw-anchor', 1, 'x', now())",
    ] {
        let out = psql_as("pgwarden_svc", svc, sql);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("permission denied"),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A client may not even append.
    let out = psql_as(
        "alice",
        "alice-pw",
        "SELECT pgwarden.audit_checkpoint('gw-anchor', 999, repeat('0', 64), now())",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let client = gw.connect("alice").await;
    for i in 0..10 {
        support::one(&client, &format!("SELECT 'anchored-{i}'")).await;
    }
    let pg = cluster();
    let anchored = || {
        pg.psql(
            DB,
            "SELECT count(*) FROM pgwarden.audit_checkpoints WHERE instance = 'gw-anchor'",
        )
    };
    for _ in 0..50 {
        if anchored() != "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(anchored(), "0", "no checkpoint was anchored");
    drop(client);
    let dir = gw.stop().await;
    let store = dir.path().join("audit");

    // At stop, the last record (gateway_stop) is anchored.
    let stored = records(&store);
    let last = stored.last().unwrap();
    assert_eq!(last.kind.as_str(), "gateway_stop");
    assert_eq!(
        pg.psql(
            DB,
            &format!(
                "SELECT hash FROM pgwarden.audit_checkpoints WHERE instance = 'gw-anchor' AND seq = {}",
                last.seq
            )
        ),
        last.hash
    );
    let url = format!("postgres://postgres@127.0.0.1:{}/{DB}", pg.port);
    let out = verify(&store, Some(&url));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("anchors match"));

    // A rewritten statement with the chain recomputed: the chain alone
    // verifies, the anchors do not.
    let work = tempfile::tempdir().unwrap();
    let rewritten = work.path().join("rewritten");
    copy_store(&store, &rewritten);
    let mut edited = stored.clone();
    let target = edited
        .iter_mut()
        .find(|r| r.statement.as_deref() == Some("SELECT 'anchored-3'"))
        .unwrap();
    target.statement = Some("SELECT 'something else'".into());
    rewrite(&rewritten, edited);
    assert_chain_holds(&rewritten);
    assert_anchors_fail(&rewritten, &url, &["the store was rewritten"]);

    // The store's instance id changed too: no anchors of that instance is
    // no proof, and says which instances have anchors.
    let renamed = work.path().join("renamed");
    copy_store(&store, &renamed);
    {
        let db = sled::open(&renamed).unwrap();
        db.open_tree("pgwarden-meta")
            .unwrap()
            .insert("instance", "gw-elsewhere".as_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    assert_anchors_fail(
        &renamed,
        &url,
        &["instance gw-elsewhere is not registered", "gw-anchor"],
    );

    // The tail cut off: the chain alone verifies, the anchors do not.
    let cut = work.path().join("cut");
    copy_store(&store, &cut);
    rewrite(&cut, stored[..stored.len() - 3].to_vec());
    assert_chain_holds(&cut);
    assert_anchors_fail(&cut, &url, &["cut off"]);
}

/// Whoever holds the gateway's database login (it is in pgwarden.toml) can
/// call the anchoring function, so the function must not let them anchor
/// a store of their own making: no new instance beside the registered one
/// (a store cut short, renamed), nothing that is not a checkpoint, nothing
/// before the latest. A checkpoint written ahead of the gateway cannot be
/// refused, but verification names it a forgery instead of accusing the
/// store.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateways_login_cannot_forge_anchors_unnoticed() {
    const FORGE_DB: &str = "anchored_forge";
    create_db(FORGE_DB);
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: format!(
            "instance = \"gw-forge\"\ncheckpoint_database = \"{FORGE_DB}\"\ncheckpoint_interval_s = 1\n"
        ),
        ..Opts::default()
    })
    .await;
    let out = support::migrate(gw.dir.path(), FORGE_DB, &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("audit instance gw-forge may be anchored by pgwarden_svc"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let client = gw.connect("alice").await;
    for i in 0..5 {
        support::one(&client, &format!("SELECT 'honest-{i}'")).await;
    }
    let pg = cluster();
    let latest = || {
        pg.psql(
            FORGE_DB,
            "SELECT coalesce(max(seq), 0) FROM pgwarden.audit_checkpoints WHERE instance = 'gw-forge'",
        )
        .parse::<u64>()
        .unwrap()
    };
    support::eventually("a checkpoint is anchored", || latest() > 0).await;

    let svc = cluster::SERVICE_PASSWORD;
    let zeros = "repeat('0', 64)";
    let refused = [
        // A new instance beside the registered one (a renamed store).
        (
            format!("'gw-fake', 1, {zeros}, now()"),
            "already anchors another instance",
        ),
        // Not a checkpoint: names that print as something else, seqs
        // that wrap, hashes that are not, times to come.
        (
            format!("E'gw\\nanchors match', 1, {zeros}, now()"),
            "not an instance name",
        ),
        (
            format!("'gw-forge', -5, {zeros}, now()"),
            "not a checkpoint",
        ),
        (
            "'gw-forge', 999999, 'nothex', now()".to_string(),
            "not a checkpoint",
        ),
        (
            format!("'gw-forge', 999999, {zeros}, now() + interval '1 day'"),
            "not a checkpoint",
        ),
        // Before the latest: history cannot be re-anchored.
        (
            format!("'gw-forge', 1, {zeros}, now()"),
            "is not after its latest",
        ),
    ];
    for (args, says) in &refused {
        let out = psql_in(
            FORGE_DB,
            "pgwarden_svc",
            svc,
            &format!("SELECT pgwarden.audit_checkpoint({args})"),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{args}: {stderr}"
        );
    }
    assert_eq!(
        pg.psql(
            FORGE_DB,
            "SELECT string_agg(instance, ',') FROM pgwarden.audit_instances"
        ),
        "gw-forge"
    );

    // Ahead of the gateway: accepted, since nobody can know yet that it
    // is false; the gateway's own later checkpoints are then refused.
    let forged = gw.shared.auditor.counters().appended + 8;
    let out = psql_in(
        FORGE_DB,
        "pgwarden_svc",
        svc,
        &format!("SELECT pgwarden.audit_checkpoint('gw-forge', {forged}, {zeros}, now())"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Later than verify's allowance for clock skew.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    for i in 0..10 {
        support::one(&client, &format!("SELECT 'later-{i}'")).await;
    }
    drop(client);
    let dir = gw.stop().await;
    let store = dir.path().join("audit");
    assert!(records(&store).len() as u64 > forged);
    let url = format!("postgres://postgres@127.0.0.1:{}/{FORGE_DB}", pg.port);
    // An operator someone made in a public schema must not run as the
    // auditor while verify reads the anchors.
    pg.psql(
        FORGE_DB,
        "CREATE FUNCTION public.hijack(numeric, integer) RETURNS numeric LANGUAGE plpgsql \
         AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$; \
         CREATE OPERATOR public.* (LEFTARG = numeric, RIGHTARG = integer, FUNCTION = public.hijack)",
    );
    assert_anchors_fail(
        &store,
        &url,
        &[
            &format!("seq {forged} differs from its anchor"),
            "forged ahead of the store with the gateway's database login",
        ],
    );
    let out = verify(&store, Some(&url));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hijacked"));
}

/// Registration holds against a race and an upgrade: a login with no
/// instance cannot take two by holding its first anchor's transaction open
/// while a second one runs, nor take an instance that already had anchors
/// before instances were registered; verify accepts anchors of registered
/// instances only.
#[tokio::test(flavor = "multi_thread")]
async fn a_login_gets_one_instance_even_racing_and_never_an_older_one() {
    const RACE_DB: &str = "anchored_race";
    create_db(RACE_DB);
    let gw = start_gateway(Opts::default()).await;
    let out = support::migrate(gw.dir.path(), RACE_DB, &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("migrations applied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(gw);
    let pg = cluster();
    pg.psql(
        RACE_DB,
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anchor_racer') THEN \
         CREATE ROLE anchor_racer LOGIN PASSWORD 'racer-pw'; END IF; END $$; \
         GRANT USAGE ON SCHEMA pgwarden TO anchor_racer; \
         GRANT EXECUTE ON FUNCTION pgwarden.audit_checkpoint(text, bigint, text, timestamptz) TO anchor_racer; \
         INSERT INTO pgwarden.audit_checkpoints (instance, seq, hash, ts) VALUES ('gw-old', 5, repeat('c', 64), now())",
    );
    let connect = || async {
        let url = format!(
            "host=127.0.0.1 port={} user=anchor_racer password=racer-pw dbname={RACE_DB}",
            pg.port
        );
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    let call = |instance: &str| {
        format!("SELECT pgwarden.audit_checkpoint('{instance}', 1, repeat('0', 64), now())")
    };
    // An instance anchored before registration existed is the
    // administrator's to name.
    let older = connect().await;
    let err = older.batch_execute(&call("gw-old")).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("from before instances were registered"),
        "{err:?}"
    );
    // Two first anchors racing: the second waits for the first and loses.
    let mut first = connect().await;
    let second = connect().await;
    let tx = first.transaction().await.unwrap();
    tx.batch_execute(&call("race-a")).await.unwrap();
    let racing = tokio::spawn(async move { second.batch_execute(&call("race-b")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !racing.is_finished(),
        "the second first anchor did not wait"
    );
    tx.commit().await.unwrap();
    let err = racing.await.unwrap().unwrap_err();
    assert!(
        format!("{err:?}").contains("already anchors another instance"),
        "{err:?}"
    );
    assert_eq!(
        pg.psql(
            RACE_DB,
            "SELECT string_agg(instance, ',' ORDER BY instance) FROM pgwarden.audit_instances WHERE login = 'anchor_racer'"
        ),
        "race-a"
    );
    // verify accepts only a registered instance's anchors.
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("audit");
    pgwarden::audit::SledStore::open(&store).unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/{RACE_DB}", pg.port);
    let out = pgwarden(&[
        "audit",
        "verify",
        "--store",
        store.to_str().unwrap(),
        "--anchors",
        &url,
        "--instance",
        "gw-old",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("instance gw-old is not registered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
