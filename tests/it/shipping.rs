//! `[audit.ship]` against a real rsyslog (imtcp, RFC 6587 octet counting,
//! written to a file): every record arrives exactly as stored, with the
//! gateway's instance; through an outage of the server; and across a
//! `kill -9` of the gateway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::Value;

use crate::audit::export;
use crate::support::{self, cluster, start_gateway, BinaryGateway, Opts, TestGateway};

/// rsyslogd in the foreground, its TCP input on `port`, the MSG part of
/// every message written as one line to `out`.
struct Rsyslog {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Listening with TLS (the `ossl` driver), its certificate here.
    tls: bool,
}

impl Rsyslog {
    fn start() -> Rsyslog {
        Rsyslog::start_with(false)
    }

    /// Listening with TLS only, its self-signed certificate (for
    /// 127.0.0.1) at [`Rsyslog::cert`].
    fn start_tls() -> Rsyslog {
        Rsyslog::start_with(true)
    }

    fn start_with(tls: bool) -> Rsyslog {
        let mut server = Rsyslog {
            child: None,
            port: cluster::free_port(),
            dir: tempfile::tempdir().unwrap(),
            tls,
        };
        if tls {
            let (cert, key) = self_signed();
            std::fs::write(server.cert(), cert).unwrap();
            std::fs::write(server.dir.path().join("key.pem"), key).unwrap();
        }
        server.run();
        server
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out.log")
    }

    /// (Re)starts it on the same port and file.
    fn run(&mut self) {
        let dir = self.dir.path();
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{dir}" maxMessageSize="1m"{tls_global})
module(load="imtcp"{tls_module})
template(name="body" type="string" string="%msg%\n")
ruleset(name="audit") {{
  action(type="omfile" file="{out}" template="body")
}}
input(type="imtcp" port="{port}" ruleset="audit")
"#,
                dir = dir.display(),
                out = self.out().display(),
                port = self.port,
                tls_global = if self.tls {
                    format!(
                        " DefaultNetstreamDriver=\"ossl\" DefaultNetstreamDriverCAFile=\"{cert}\" DefaultNetstreamDriverCertFile=\"{cert}\" DefaultNetstreamDriverKeyFile=\"{key}\"",
                        cert = self.cert().display(),
                        key = dir.join("key.pem").display(),
                    )
                } else {
                    String::new()
                },
                tls_module = if self.tls {
                    " StreamDriver.Name=\"ossl\" StreamDriver.Mode=\"1\" StreamDriver.AuthMode=\"anon\""
                } else {
                    ""
                },
            ),
        )
        .unwrap();
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rsyslogd (scripts/setup.sh installs rsyslog)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("rsyslogd never listened on {}", self.port);
    }

    /// Stops it (SIGTERM, as a service stop does).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap();
        }
    }

    /// Every message received so far, as written.
    fn lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.out()).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .collect()
    }

    /// Every message received so far, by seq (a record that arrived twice
    /// must have arrived the same both times).
    fn received(&self) -> BTreeMap<u64, Value> {
        let text = std::fs::read_to_string(self.out()).unwrap_or_default();
        let mut by_seq = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line.trim())
                .unwrap_or_else(|e| panic!("not a record ({e}): {line}"));
            let seq = v["seq"].as_u64().unwrap();
            if let Some(before) = by_seq.insert(seq, v.clone()) {
                assert_eq!(before, v, "seq {seq} arrived twice, differently");
            }
        }
        by_seq
    }

    /// Waits until seqs 1..=`last` have all arrived.
    async fn wait_for(&self, last: u64) -> BTreeMap<u64, Value> {
        for _ in 0..300 {
            let got = self.received();
            if (1..=last).all(|seq| got.contains_key(&seq)) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = self.received();
        let missing: Vec<u64> = (1..=last).filter(|s| !got.contains_key(s)).collect();
        panic!("records never shipped: {missing:?}");
    }
}

/// A self-signed certificate for 127.0.0.1 and its key (PEM).
fn self_signed() -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    (cert.cert.pem(), cert.signing_key.serialize_pem())
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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
    let syslog = Rsyslog::start_tls();
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
