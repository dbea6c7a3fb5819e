//! rsyslogd, started and stopped by a test: the real syslog server the
//! audit shipping tests send to (plain TCP, TLS, RELP).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::Value;

use super::cluster;

/// How rsyslogd listens.
#[derive(Clone, Copy)]
pub struct Listen {
    /// TLS (the `ossl` driver), its self-signed certificate (for
    /// 127.0.0.1) at [`Rsyslog::cert`].
    pub tls: bool,
    /// RELP (`imrelp`) instead of plain TCP (`imtcp`).
    pub relp: bool,
    /// Its `maxMessageSize`.
    pub max_message: &'static str,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            tls: false,
            relp: false,
            max_message: "1m",
        }
    }
}

/// rsyslogd in the foreground, its input on `port`, the MSG part of every
/// message written as one line to `out`.
pub struct Rsyslog {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    listen: Listen,
}

impl Rsyslog {
    pub fn start() -> Rsyslog {
        Rsyslog::start_with(Listen::default())
    }

    pub fn start_with(listen: Listen) -> Rsyslog {
        let mut server = Rsyslog {
            child: None,
            port: cluster::free_port(),
            dir: tempfile::tempdir().unwrap(),
            listen,
        };
        if listen.tls {
            let (cert, key) = self_signed();
            std::fs::write(server.cert(), cert).unwrap();
            std::fs::write(server.dir.path().join("key.pem"), key).unwrap();
        }
        server.run();
        server
    }

    /// The file every message body is written to.
    pub fn output(&self) -> PathBuf {
        self.out()
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out.log")
    }

    /// (Re)starts it on the same port and file.
    pub fn run(&mut self) {
        let dir = self.dir.path();
        let conf = dir.join("rsyslog.conf");
        let input = if self.listen.relp { "imrelp" } else { "imtcp" };
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{dir}" maxMessageSize="{max}"{tls_global})
module(load="{input}"{tls_module})
template(name="body" type="string" string="%msg%\n")
ruleset(name="audit") {{
  action(type="omfile" file="{out}" template="body")
}}
input(type="{input}" port="{port}" ruleset="audit")
"#,
                dir = dir.display(),
                max = self.listen.max_message,
                out = self.out().display(),
                port = self.port,
                tls_global = if self.listen.tls {
                    format!(
                        " DefaultNetstreamDriver=\"ossl\" DefaultNetstreamDriverCAFile=\"{cert}\" DefaultNetstreamDriverCertFile=\"{cert}\" DefaultNetstreamDriverKeyFile=\"{key}\"",
                        cert = self.cert().display(),
                        key = dir.join("key.pem").display(),
                    )
                } else {
                    String::new()
                },
                tls_module = if self.listen.tls {
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
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        if let Some(mut child) = self.child.take() {
            child.wait().unwrap();
        }
    }

    /// Sends it `signal`.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Kills it (SIGKILL) without a chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// Every message received so far, as written.
    pub fn lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.out()).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .collect()
    }

    /// Every message received so far, by seq (a record that arrived twice
    /// must have arrived the same both times).
    pub fn received(&self) -> BTreeMap<u64, Value> {
        let text = std::fs::read_to_string(self.out()).unwrap_or_default();
        let mut by_seq = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line.trim())
                .unwrap_or_else(|e| panic!("not a record ({e}): {line}"));
            if v.get("checkpoint").is_some() {
                continue; // a checkpoint, not a record
            }
            let seq = v["seq"].as_u64().unwrap();
            if let Some(before) = by_seq.insert(seq, v.clone()) {
                assert_eq!(before, v, "seq {seq} arrived twice, differently");
            }
        }
        by_seq
    }

    /// Waits until seqs 1..=`last` have all arrived.
    pub async fn wait_for(&self, last: u64) -> BTreeMap<u64, Value> {
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
pub fn self_signed() -> (String, String) {
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
