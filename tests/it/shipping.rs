//! `[audit.ship]` against a real rsyslog (imtcp with RFC 6587 octet
//! counting, or imrelp, written to a file): every record arrives exactly as
//! stored, with the gateway's instance; through an outage of the server;
//! across a `kill -9` of the gateway; through a server that stalls and
//! dies (RELP); and a record longer than the server takes arrives cut,
//! without losing the ones after it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::audit::export;
use crate::support::rsyslog::{self_signed, Listen, Rsyslog};
use crate::support::{self, start_gateway, BinaryGateway, Opts, TestGateway};

/// Every exported record up to `last` arrived as stored, plus `instance`.
fn assert_shipped_as_stored(
    store: &Path,
    received: &BTreeMap<u64, Value>,
    instance: &str,
    last: u64,
) {
    let stored = export(store, &["--raw"]);
    let mut checked = 0;
    for record in stored.iter().filter(|r| r["seq"].as_u64().unwrap() <= last) {
        let seq = record["seq"].as_u64().unwrap();
        let mut got = received
            .get(&seq)
            .unwrap_or_else(|| panic!("seq {seq} was not shipped"))
            .clone();
        assert_eq!(got["instance"], instance, "seq {seq}");
        got.as_object_mut().unwrap().remove("instance");
        assert_eq!(&got, record, "seq {seq} arrived otherwise than stored");
        checked += 1;
    }
    assert_eq!(checked as u64, last, "the store holds seqs 1..={last}");
}

/// A client of a gateway on `port`, as alice.
async fn alice_on(port: u16) -> tokio_postgres::Client {
    let url = format!("host=127.0.0.1 port={port} user=alice password=alice-pw dbname=app");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// A gateway with audit on, shipping to the syslog server on `port`;
/// `ship` is more of `[audit.ship]`.
async fn shipping_gateway(instance: Option<&str>, port: u16, ship: &str) -> TestGateway {
    let instance = instance.map_or(String::new(), |id| format!("instance = \"{id}\"\n"));
    start_gateway(Opts {
        audit: true,
        audit_extra: format!("{instance}[audit.ship]\naddress = \"127.0.0.1:{port}\"\n{ship}"),
        ..Opts::default()
    })
    .await
}

async fn run_statements(port: u16, tag: &str, n: usize) {
    let client = alice_on(port).await;
    for i in 0..n {
        support::one(&client, &format!("SELECT '{tag}-{i}'")).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_reaches_rsyslog_through_an_outage() {
    let mut syslog = Rsyslog::start();
    let gw = shipping_gateway(Some("gw-ship"), syslog.port, "").await;
    let status = gw.shared.ship.clone().expect("shipping is on");
    run_statements(gw.port(), "before", 20).await;
    let first = syslog.received().len();
    support::eventually("the first records are shipped", || {
        status.shipped.load(std::sync::atomic::Ordering::Relaxed) > 20
    })
    .await;
    assert!(first <= syslog.received().len());
    // The server goes away; statements go on, and their records wait.
    syslog.stop();
    run_statements(gw.port(), "outage", 50).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        status
            .lag_records
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    syslog.run();
    run_statements(gw.port(), "after", 20).await;
    let last = gw.shared.auditor.counters().appended;
    let received = syslog.wait_for(last).await;
    let dir = gw.stop().await;
    assert_shipped_as_stored(&dir.path().join("audit"), &received, "gw-ship", last);
    assert!(received
        .values()
        .any(|r| r["statement"] == "SELECT 'outage-49'"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_9_of_the_gateway_loses_no_shipped_record() {
    let syslog = Rsyslog::start();
    let gw = BinaryGateway::start(
        support::TEST_POLICY,
        &format!(
            "[audit]\nstore = \"audit\"\ndurability = \"group\"\n[audit.ship]\naddress = \"127.0.0.1:{}\"\n",
            syslog.port
        ),
    )
    .await;
    let port = gw.port;
    let load = tokio::spawn(async move {
        let client = alice_on(port).await;
        for i in 0.. {
            if client
                .simple_query(&format!("SELECT 'k9-{i}'"))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.signal(libc::SIGKILL);
    let (_, dir) = gw.wait().await;
    load.await.unwrap();
    // The next run's gateway_start is shipped after everything before it.
    let gw = BinaryGateway::start_in(dir, port).await;
    let restarted = loop {
        let got = syslog.received();
        if let Some((seq, _)) = got
            .iter()
            .filter(|(_, r)| r["kind"] == "gateway_start")
            .nth(1)
        {
            break *seq;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let received = syslog.wait_for(restarted).await;
    gw.signal(libc::SIGTERM);
    let (_, dir) = gw.wait().await;
    let instance = received[&1]["instance"].as_str().unwrap().to_string();
    assert!(instance.starts_with("pgw-"), "{instance}");
    assert!(restarted > 20, "too little load: {restarted}");
    assert_shipped_as_stored(&dir.path().join("audit"), &received, &instance, restarted);
}

/// With `tls = true` the records travel over TLS (RFC 5425) to a server
/// whose certificate chains to `ca_file`; a server with another
/// certificate gets nothing, and the records wait.
#[tokio::test(flavor = "multi_thread")]
async fn records_reach_rsyslog_over_tls_and_never_an_unverified_server() {
    let syslog = Rsyslog::start_with(Listen {
        tls: true,
        ..Listen::default()
    });
    let tls = format!("tls = true\nca_file = {:?}\n", syslog.cert());
    let gw = shipping_gateway(Some("gw-tls"), syslog.port, &tls).await;
    run_statements(gw.port(), "tls", 20).await;
    let last = gw.shared.auditor.counters().appended;
    let received = syslog.wait_for(last).await;
    let dir = gw.stop().await;
    assert_shipped_as_stored(&dir.path().join("audit"), &received, "gw-tls", last);

    // Another CA: the handshake fails, nothing is shipped, records wait.
    let other = tempfile::tempdir().unwrap();
    let wrong_ca = other.path().join("other.pem");
    std::fs::write(&wrong_ca, self_signed().0).unwrap();
    let before = syslog.received().len();
    let tls = format!("tls = true\nca_file = {wrong_ca:?}\n");
    let gw = shipping_gateway(None, syslog.port, &tls).await;
    run_statements(gw.port(), "unverified", 5).await;
    let status = gw.shared.ship.clone().unwrap();
    support::eventually("the records wait", || {
        status
            .lag_records
            .load(std::sync::atomic::Ordering::Relaxed)
            > 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        syslog.received().len(),
        before,
        "nothing reached a server it could not verify"
    );
    assert!(!status.connected.load(std::sync::atomic::Ordering::Relaxed));
    gw.stop().await;
}

/// `format = "cef"`: every record arrives as one CEF event naming its seq
/// and hash, and a statement's line breaks, `=` and `|` stay inside its
/// field.
#[tokio::test(flavor = "multi_thread")]
async fn records_reach_rsyslog_as_cef_events() {
    let syslog = Rsyslog::start();
    let gw = shipping_gateway(Some("gw-cef"), syslog.port, "format = \"cef\"\n").await;
    let client = gw.connect("alice").await;
    support::one(&client, "SELECT 'a=b|c' -- x\nAS suser").await;
    run_statements(gw.port(), "cef", 5).await;
    let last = gw.shared.auditor.counters().appended;
    let seqs = |lines: &[String]| -> std::collections::BTreeSet<u64> {
        lines
            .iter()
            .filter_map(|l| l.split(" externalId=").nth(1))
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect()
    };
    for _ in 0..100 {
        if (1..=last).all(|seq| seqs(&syslog.lines()).contains(&seq)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = syslog.lines();
    assert!(
        (1..=last).all(|seq| seqs(&lines).contains(&seq)),
        "{lines:#?}"
    );
    for line in &lines {
        assert!(line.starts_with("CEF:0|pgwarden|pgwarden|"), "{line}");
        assert!(line.contains(" deviceExternalId=gw-cef "), "{line}");
        assert!(line.contains(" cs5Label=hash"), "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("cs3=SELECT 'a\\=b|c' -- x\\nAS suser cs3Label=statement")),
        "{lines:#?}"
    );
    drop(client);
    gw.stop().await;
}

/// `transport = "relp"`: rsyslog acknowledges every message, so a server
/// that stops reading (SIGSTOP) gets nothing counted as delivered, and
/// when it then dies (SIGKILL) and comes back, every record still arrives.
/// (Plain TCP syslog cannot promise this: what sat unread in the stalled
/// server's socket is gone with it.)
#[tokio::test(flavor = "multi_thread")]
async fn over_relp_a_server_that_stalls_and_dies_loses_nothing() {
    let mut syslog = Rsyslog::start_with(Listen {
        relp: true,
        ..Listen::default()
    });
    let gw = shipping_gateway(Some("gw-relp"), syslog.port, "transport = \"relp\"\n").await;
    let status = gw.shared.ship.clone().expect("shipping is on");
    run_statements(gw.port(), "before", 10).await;
    // Everything so far (the session's end too) acknowledged, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = gw.shared.auditor.counters().appended;
    syslog.wait_for(before).await;
    support::eventually("the first records are acknowledged", || {
        status.shipped.load(std::sync::atomic::Ordering::Relaxed) >= before
    })
    .await;
    syslog.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = gw.shared.auditor.counters().appended;
    run_statements(gw.port(), "stalled", 200).await;
    // Longer than plain TCP's settling time: nothing was acknowledged.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let shipped = status.shipped.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        shipped <= stopped,
        "{shipped} counted as delivered by a stopped server (stopped at {stopped})"
    );
    syslog.kill();
    syslog.run();
    run_statements(gw.port(), "after", 10).await;
    let last = gw.shared.auditor.counters().appended;
    let received = syslog.wait_for(last).await;
    let dir = gw.stop().await;
    assert_shipped_as_stored(&dir.path().join("audit"), &received, "gw-relp", last);
    assert!(received
        .values()
        .any(|r| r["statement"] == "SELECT 'stalled-199'"));
}

/// A statement longer than the server's message limit (rsyslog's default
/// 8 KiB, `max_message_bytes` the same) arrives cut to fit, marked with
/// the stored length and still carrying its seq and hash; over plain TCP
/// and RELP alike, every record after it arrives whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_longer_than_the_server_takes_arrives_cut_and_the_rest_whole() {
    for (relp, transport) in [(false, "tcp"), (true, "relp")] {
        let syslog = Rsyslog::start_with(Listen {
            relp,
            max_message: "8k",
            ..Listen::default()
        });
        let instance = format!("gw-cut-{transport}");
        let ship = format!("transport = \"{transport}\"\nmax_message_bytes = 8192\n");
        let gw = shipping_gateway(Some(&instance), syslog.port, &ship).await;
        let client = gw.connect("alice").await;
        let big = format!("SELECT '{}' AS big", "x\"y\n".repeat(30_000));
        support::one(&client, &big).await;
        run_statements(gw.port(), "small", 20).await;
        let last = gw.shared.auditor.counters().appended;
        let mut received = syslog.wait_for(last).await;
        drop(client);
        let cut = gw
            .shared
            .ship
            .as_ref()
            .unwrap()
            .truncated
            .load(std::sync::atomic::Ordering::Relaxed);
        let dir = gw.stop().await;
        let stored = export(&dir.path().join("audit"), &["--raw"]);
        let whole = stored
            .iter()
            .find(|r| r["statement"] == big.as_str())
            .expect("the store keeps the statement whole");
        let seq = whole["seq"].as_u64().unwrap();
        let arrived = received.remove(&seq).unwrap();
        assert_eq!(cut, 1, "{transport}");
        assert_eq!(arrived["hash"], whole["hash"], "{transport}");
        assert_eq!(arrived["client_user"], "alice", "{transport}");
        assert!(
            arrived["truncated_from"].as_u64().unwrap() > 120_000,
            "{arrived}"
        );
        let shipped = arrived["statement"].as_str().unwrap();
        assert!(
            big.starts_with(shipped) && shipped.len() > 1000,
            "{transport}"
        );
        // Every other record arrived whole.
        let shipped_ones = stored.iter().filter(|r| r["seq"].as_u64().unwrap() <= last);
        for record in shipped_ones.filter(|r| r["seq"] != seq) {
            let n = record["seq"].as_u64().unwrap();
            let mut got = received[&n].clone();
            got.as_object_mut().unwrap().remove("instance");
            assert_eq!(&got, record, "{transport}: seq {n}");
        }
    }
}

/// `[audit] signing_key`: every `checkpoint_interval_s` the stream carries
/// a checkpoint signed with the gateway's Ed25519 key, and `audit verify
/// --checkpoints FILE --public-key KEY` checks a store against a copy of
/// the stream: it passes on the store, and fails on a checkpoint edited in
/// the copy, on another key, and on a store rewritten with its chain
/// recomputed.
#[tokio::test(flavor = "multi_thread")]
async fn signed_checkpoints_in_the_stream_hold_a_store_to_its_copy() {
    let syslog = Rsyslog::start();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("signing.pem");
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    std::fs::write(&key_file, pair.serialize_pem()).unwrap();
    let public = pgwarden::audit::checkpoint::Signer::load(&key_file)
        .unwrap()
        .public_hex();
    let gw = start_gateway(Opts {
        audit: true,
        audit_extra: format!(
            "instance = \"gw-signed\"\ncheckpoint_interval_s = 1\nsigning_key = {key_file:?}\n[audit.ship]\naddress = \"127.0.0.1:{}\"\n",
            syslog.port
        ),
        ..Opts::default()
    })
    .await;
    for round in 0..3 {
        run_statements(gw.port(), &format!("signed-{round}"), 5).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let checkpoints = || {
        std::fs::read_to_string(syslog.output())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"checkpoint\""))
            .count()
    };
    support::eventually("checkpoints are shipped", || checkpoints() >= 2).await;
    let dir = gw.stop().await;
    let store = dir.path().join("audit");
    let copy = syslog.output();
    let verify = |store: &Path, file: &Path, key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
            .args(["audit", "verify", "--store"])
            .arg(store)
            .arg("--checkpoints")
            .arg(file)
            .args(["--public-key", key])
            .output()
            .unwrap()
    };
    let said = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let out = verify(&store, &copy, &public);
    assert!(out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("checkpoints match"), "{}", said(&out));
    assert!(
        said(&out).contains(&format!("each signed by {public}")),
        "{}",
        said(&out)
    );

    // Another key did not sign them.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let other_file = keys.path().join("other.pem");
    std::fs::write(&other_file, other.serialize_pem()).unwrap();
    let other_public = pgwarden::audit::checkpoint::Signer::load(&other_file)
        .unwrap()
        .public_hex();
    let out = verify(&store, &copy, &other_public);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(
        said(&out).contains("not signed by the given public key"),
        "{}",
        said(&out)
    );

    // A checkpoint edited in the copy (its hash) is no longer signed.
    let text = std::fs::read_to_string(&copy).unwrap();
    let line = text.lines().find(|l| l.contains("\"checkpoint\"")).unwrap();
    let hash = serde_json::from_str::<Value>(line).unwrap()["checkpoint"]["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let edited = keys.path().join("edited.log");
    let forged = line.replace(&hash, &"0".repeat(64));
    std::fs::write(&edited, text.replacen(line, &forged, 1)).unwrap();
    let out = verify(&store, &edited, &public);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));

    // The store rewritten, its chain recomputed: the copy's checkpoints
    // no longer match.
    let rewritten = keys.path().join("rewritten");
    {
        let reader = pgwarden::audit::StoreReader::open(&store).unwrap();
        let mut records: Vec<pgwarden::audit::Record> = reader
            .scan_from(1)
            .map(|e| pgwarden::audit::Record::from_stored_bytes(&e.unwrap().1).unwrap())
            .collect();
        let target = records
            .iter_mut()
            .find(|r| r.statement.as_deref() == Some("SELECT 'signed-0-1'"))
            .unwrap();
        target.statement = Some("SELECT 'nothing to see'".into());
        let mut prev = pgwarden::audit::GENESIS_HASH.to_string();
        let db = sled::open(&rewritten).unwrap();
        for record in &mut records {
            record.prev_hash = prev.clone();
            if record.kind.as_str() == "gateway_stop" {
                record.message = Some(format!("chain head {prev}"));
            }
            record.hash = pgwarden::audit::chain::compute_hash(record);
            prev = record.hash.clone();
            db.insert(record.seq.to_be_bytes(), record.to_stored_bytes())
                .unwrap();
        }
        let meta = db.open_tree("pgwarden-meta").unwrap();
        meta.insert("instance", "gw-signed".as_bytes()).unwrap();
        db.flush().unwrap();
    }
    let out = verify(&rewritten, &copy, &public);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(
        said(&out).contains("differs from its checkpoint"),
        "{}",
        said(&out)
    );

    // The store cut short before its last checkpoint's record: cut off.
    let latest = std::fs::read_to_string(&copy)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["checkpoint"]["seq"].as_u64())
        .max()
        .unwrap();
    let cut = keys.path().join("cut");
    {
        let reader = pgwarden::audit::StoreReader::open(&store).unwrap();
        let db = sled::open(&cut).unwrap();
        for entry in reader.scan_from(1) {
            let (seq, raw) = entry.unwrap();
            if seq < latest {
                db.insert(seq.to_be_bytes(), raw).unwrap();
            }
        }
        let meta = db.open_tree("pgwarden-meta").unwrap();
        meta.insert("instance", "gw-signed".as_bytes()).unwrap();
        db.flush().unwrap();
    }
    let out = verify(&cut, &copy, &public);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(
        said(&out).contains("records were cut off"),
        "{}",
        said(&out)
    );

    // The oldest records archived (or archived and the archive thrown
    // away): checkpoints of records not given fail unless the auditor says
    // to check the store's own records only.
    let archived = keys.path().join("archived");
    assert!(std::process::Command::new("cp")
        .arg("-r")
        .arg(&store)
        .arg(&archived)
        .status()
        .unwrap()
        .success());
    let archive = keys.path().join("old.pgwarchive");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["audit", "archive", "--store"])
        .arg(&archived)
        .args(["--before", "2999-01-01T00:00:00Z", "-o"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(said(&out).contains("archived records"), "{}", said(&out));
    let out = verify(&archived, &copy, &public);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("which are not given"), "{}", said(&out));
    let with = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
            .args(["audit", "verify", "--store"])
            .arg(&archived)
            .arg("--checkpoints")
            .arg(&copy)
            .args(["--public-key", &public])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = with(&["--archive", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", said(&out));
    // The store's own records are checked against the checkpoints after
    // the archive; with every checkpoint's record archived there is
    // nothing of the store's own to check, and that still fails.
    let boundary = pgwarden::audit::archive::Archive::open(&archive)
        .unwrap()
        .manifest
        .last_seq;
    let out = with(&["--skip-archived"]);
    if latest > boundary {
        assert!(out.status.success(), "{}", said(&out));
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    }
}
