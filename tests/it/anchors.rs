//! Audit checkpoints anchored in PostgreSQL (`[audit] checkpoint_database`):
//! what the service user may do with them, and `audit verify --anchors`
//! against the attacks the plain chain cannot see (a store rewritten with a
//! recomputed chain, a store cut short).

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
    Command::new("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args([
            "-p",
            &cluster().port.to_string(),
            "-U",
            user,
            "-d",
            DB,
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
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
        &["no checkpoints of instance gw-elsewhere", "gw-anchor"],
    );

    // The tail cut off: the chain alone verifies, the anchors do not.
    let cut = work.path().join("cut");
    copy_store(&store, &cut);
    rewrite(&cut, stored[..stored.len() - 3].to_vec());
    assert_chain_holds(&cut);
    assert_anchors_fail(&cut, &url, &["cut off"]);
}
