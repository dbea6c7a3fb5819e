//! Three gateways behind a real HAProxy (TCP mode, round robin, health
//! checks on `/readyz`), sharing one PostgreSQL: clients keep their
//! identity whichever gateway they reach; a cancel is delivered whichever
//! gateway it lands on; a gateway stopped (SIGTERM) or killed (`kill -9`)
//! under load costs no acknowledged statement its audit record; the stores
//! verify each and export merged, every statement exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cancel::{cancel, run, start_running};
use crate::raw::RawClient;
use crate::support::{self, cluster, BinaryGateway};

const GATEWAYS: usize = 3;

/// HAProxy in the foreground, in front of the gateways.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Round robin over `gateways` (listen port, admin port), each checked
    /// with `GET /readyz` every 300 ms (3 s to answer on a loaded machine):
    /// down after two failures, up after one success; a connection refused
    /// is tried again on another.
    fn start(gateways: &[(u16, u16)]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = cluster::free_port();
        let mut servers = String::new();
        for (i, (listen, admin)) in gateways.iter().enumerate() {
            servers.push_str(&format!(
                "  server gw{} 127.0.0.1:{listen} check port {admin}\n",
                i + 1
            ));
        }
        let conf = dir.path().join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n  maxconn 2000\ndefaults\n  mode tcp\n  retries 3\n  option redispatch\n  \
                 timeout connect 2s\n  timeout client 120s\n  timeout server 120s\n  timeout check 3s\n\
                 frontend pg\n  bind 127.0.0.1:{port}\n  default_backend gateways\n\
                 backend gateways\n  balance roundrobin\n  option httpchk GET /readyz\n  \
                 http-check expect status 200\n  default-server inter 300ms fall 2 rise 1\n{servers}"
            ),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&conf)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (scripts/setup.sh installs it)");
        Haproxy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Gateway `i` (1-based) of three: peer id `i`, the others as peers, an
/// admin listener for the health checks, its own audit store and instance.
fn config(i: usize, ports: &[(u16, u16)]) -> String {
    let (listen, admin) = ports[i - 1];
    let mut peers = String::new();
    for (j, (port, _)) in ports.iter().enumerate() {
        if j + 1 != i {
            peers.push_str(&format!(
                "[[peers]]\nid = {}\naddress = \"127.0.0.1:{port}\"\n",
                j + 1
            ));
        }
    }
    format!(
        "[server]\nlisten = \"127.0.0.1:{listen}\"\npeer_id = {i}\nshutdown_timeout_ms = 5000\n\
         [backend]\nport = {}\nservice_user = \"pgwarden_svc\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [audit]\nstore = \"audit\"\ninstance = \"gw-{i}\"\ndurability = \"group\"\n{peers}",
        cluster().port
    )
}

async fn start_gateway(i: usize, ports: &[(u16, u16)]) -> BinaryGateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/a.toml"), support::TEST_POLICY).unwrap();
    std::fs::write(dir.path().join("pgwarden.toml"), config(i, ports)).unwrap();
    BinaryGateway::start_in(dir, ports[i - 1].0).await
}

/// `GET /readyz` on an admin port: the status code, or none when nothing
/// answers.
async fn readyz(admin: u16) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", admin))
        .await
        .ok()?;
    s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await.ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

/// A client of the gateways through HAProxy.
async fn connect(
    addr: SocketAddr,
    user: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let url = format!(
        "host=127.0.0.1 port={} user={user} password={} dbname=app connect_timeout=5",
        addr.port(),
        support::password_of(user)
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The role each test user is mapped to by the test policy.
fn role_of(user: &str) -> &'static str {
    match user {
        "alice" => "analyst",
        _ => "engineer",
    }
}

/// Statements acknowledged to clients, by their tag.
type Acked = Arc<Mutex<BTreeSet<String>>>;

/// Clients that, until `stop`, connect through HAProxy and run tagged
/// statements, reconnecting after any error (a gateway going away); each
/// checks it runs as its own mapped role.
fn load(
    addr: SocketAddr,
    clients: usize,
    name: &str,
    stop: Arc<AtomicBool>,
    acked: Acked,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (stop, acked, name) = (stop.clone(), acked.clone(), name.to_string());
            tokio::spawn(async move {
                let user = if c % 2 == 0 { "alice" } else { "bob" };
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(client) = connect(addr, user).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let tag = format!("{name}-{c}-{i}");
                        i += 1;
                        match client
                            .query_one(&format!("SELECT current_user::text, '{tag}'"), &[])
                            .await
                        {
                            Ok(row) => {
                                assert_eq!(row.get::<_, String>(0), role_of(user), "{tag}");
                                acked.lock().unwrap().insert(tag);
                            }
                            Err(_) => break, // the gateway went away: reconnect
                        }
                    }
                }
            })
        })
        .collect()
}

/// The tags of every `query` record in a merged raw export of `stores`,
/// with the instance that wrote each.
fn exported_tags(stores: &[PathBuf]) -> BTreeMap<String, Vec<String>> {
    let mut args = vec!["audit".to_string(), "export".into(), "--raw".into()];
    for store in stores {
        args.extend(["--store".into(), store.display().to_string()]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["kind"] != "query" {
            continue;
        }
        let Some(tag) = v["statement"].as_str().and_then(|s| s.split('\'').nth(1)) else {
            continue;
        };
        tags.entry(tag.to_string())
            .or_default()
            .push(v["instance"].as_str().unwrap().to_string());
    }
    tags
}

fn verify(store: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["audit", "verify", "--store"])
        .arg(store)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_gateways_behind_haproxy() {
    let ports: Vec<(u16, u16)> = (0..GATEWAYS)
        .map(|_| (cluster::free_port(), cluster::free_port()))
        .collect();
    let mut gateways: Vec<Option<BinaryGateway>> = Vec::new();
    for i in 1..=GATEWAYS {
        gateways.push(Some(start_gateway(i, &ports).await));
    }
    for (_, admin) in &ports {
        support::eventually_async("every gateway is ready", || async {
            readyz(*admin).await == Some(200)
        })
        .await;
    }
    let haproxy = Haproxy::start(&ports);
    let lb = haproxy.addr;
    support::eventually_async("HAProxy accepts clients", || async {
        connect(lb, "alice").await.is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // every server seen up

    // 100 clients at once, alice and bob: each runs as its own role,
    // whichever gateway it reached.
    let acked: Acked = Arc::default();
    let mut clients = Vec::new();
    for c in 0..100 {
        let acked = acked.clone();
        clients.push(tokio::spawn(async move {
            let user = if c % 2 == 0 { "alice" } else { "bob" };
            let client = connect(lb, user).await.unwrap();
            for i in 0..3 {
                let tag = format!("many-{c}-{i}");
                let row = client
                    .query_one(&format!("SELECT current_user::text, '{tag}'"), &[])
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, String>(0), role_of(user));
                acked.lock().unwrap().insert(tag);
            }
            let tag = format!("many-{c}-tx");
            client
                .batch_execute(&format!("BEGIN; SELECT '{tag}'; COMMIT"))
                .await
                .unwrap();
        }));
    }
    for client in clients {
        client.await.unwrap();
    }

    // Cancels through HAProxy: a client's connection and its cancel's
    // alternate between gateways, so the cancel lands on another gateway
    // than the statement's, which sends it on. A wrong key cancels nothing.
    let mut served_by = BTreeSet::new();
    for _ in 0..6 {
        let mut client = RawClient::login(lb).await;
        served_by.insert((client.key.0 >> 23) & 0xff);
        start_running(&mut client, 30).await;
        let started = Instant::now();
        cancel(lb, client.key).await;
        let (_, code, _) = client.until_ready().await;
        assert_eq!(code.as_deref(), Some("57014"), "cancelled");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(run(&mut client, "SELECT 1").await, None);
    }
    assert_eq!(
        served_by.len(),
        GATEWAYS,
        "clients reached every gateway: {served_by:?}"
    );
    let mut client = RawClient::login(lb).await;
    start_running(&mut client, 1).await;
    cancel(lb, (client.key.0, client.key.1 ^ 1)).await;
    let (_, code, _) = client.until_ready().await;
    assert_eq!(code, None, "a wrong key cancelled the statement");
    drop(client);

    // Under load, gateway 2 is stopped (SIGTERM): it says it is not ready
    // at once, so HAProxy sends it no new client; its open transaction
    // finishes; its clients reconnect through the others.
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(lb, 12, "term", stop.clone(), acked.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // A client of gateway 2 inside a transaction: it may finish it.
    let mut in_tx = loop {
        let client = RawClient::login(lb).await;
        if (client.key.0 >> 23) & 0xff == 2 {
            break client;
        }
    };
    assert_eq!(run(&mut in_tx, "BEGIN; SELECT 'open-tx'").await, None);
    let gw2 = gateways[1].take().unwrap();
    gw2.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Draining (503), or already gone when it had no transaction to wait for.
    assert_ne!(
        readyz(ports[1].1).await,
        Some(200),
        "a stopping gateway is not ready"
    );
    assert_eq!(run(&mut in_tx, "SELECT 'still-open-tx'").await, None);
    assert_eq!(
        run(&mut in_tx, "COMMIT").await,
        None,
        "the open transaction finished"
    );
    drop(in_tx);
    let (_, dir2) = gw2.wait().await;
    let before = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        acked.lock().unwrap().len() > before + 10,
        "clients kept working through the others"
    );
    gateways[1] = Some(BinaryGateway::start_in(dir2, ports[1].0).await);

    // Gateway 3 is killed (kill -9) under load: its clients get errors and
    // reconnect through the others; restarted, its chain continues.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let gw3 = gateways[2].take().unwrap();
    gw3.signal(libc::SIGKILL);
    let (_, dir3) = gw3.wait().await;
    let before = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        acked.lock().unwrap().len() > before + 10,
        "clients kept working through the others"
    );
    gateways[2] = Some(BinaryGateway::start_in(dir3, ports[2].0).await);
    support::eventually_async("the restarted gateway is ready", || async {
        readyz(ports[2].1).await == Some(200)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    drop(haproxy);

    let mut stores = Vec::new();
    let mut dirs = Vec::new();
    for gw in gateways.into_iter().flatten() {
        gw.signal(libc::SIGTERM);
        let (_, dir) = gw.wait().await;
        stores.push(dir.path().join("audit"));
        dirs.push(dir);
    }
    for store in &stores {
        let out = verify(store);
        assert!(
            out.status.success(),
            "{}: {}",
            store.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every acknowledged statement is in the audit exactly once, and each
    // gateway recorded statements.
    let tags = exported_tags(&stores);
    let acked = acked.lock().unwrap();
    for tag in acked.iter() {
        let holders = tags.get(tag).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            holders.len(),
            1,
            "{tag} is in the audit {} times",
            holders.len()
        );
    }
    let by_instance: BTreeSet<&String> = tags.values().flatten().collect();
    assert_eq!(by_instance.len(), GATEWAYS, "{by_instance:?}");
    // Each gateway received a cancel for another's client and sent it on:
    // the gateway that owned the statement recorded it as from a peer.
    for store in &stores {
        let out = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
            .args(["audit", "export", "--raw", "--kind", "cancel", "--store"])
            .arg(store)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("with the peer gateways' request code"),
            "{}: {text}",
            store.display()
        );
    }
}
