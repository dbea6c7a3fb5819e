//! The admin listener's health endpoints, for load balancers: `/healthz`
//! (the process answers) and `/readyz` (it should get new clients: not
//! draining, PostgreSQL reachable, the audit store writable where
//! statements need it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, cluster, start_gateway, Opts, TestGateway};

/// `GET path` on the admin listener: status and body.
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: pgwarden\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A gateway with its admin listener on a free port.
async fn gateway(opts: Opts) -> (TestGateway, u16) {
    let admin = cluster::free_port();
    let gw = start_gateway(Opts {
        audit_extra: format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            opts.audit_extra
        ),
        ..opts
    })
    .await;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (gw, admin)
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_when_it_can_serve_and_alive_while_it_drains() {
    let (gw, admin) = gateway(Opts::default()).await;
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".into()));
    let (status, metrics) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("pgwarden_clients"), "{metrics}");

    // Draining: a client's open transaction holds the shutdown; the
    // gateway is alive and not ready.
    let client = gw.connect("alice").await;
    client.batch_execute("BEGIN").await.unwrap();
    let stopping = tokio::spawn(gw.stop());
    support::eventually("readyz fails while draining", || readyz_fails(admin)).await;
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");
    assert_eq!(get(admin, "/healthz").await.0, 200);
    client.batch_execute("COMMIT").await.unwrap();
    drop(client);
    stopping.await.unwrap();
}

/// Whether `/readyz` on `admin` answers 503 now (blocking, for
/// `eventually`'s condition).
fn readyz_fails(admin: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
        return false;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.1\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 503")
}

#[tokio::test(flavor = "multi_thread")]
async fn not_ready_without_postgres() {
    let (_gw, admin) = gateway(Opts {
        backend_port: Some(cluster::free_port()),
        ..Opts::default()
    })
    .await;
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("unreachable"), "{body}");
    assert_eq!(get(admin, "/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn not_ready_while_the_audit_store_refuses_statements() {
    let control = Arc::new(pgwarden::audit::MemoryControl::default());
    let (gw, admin) = gateway(Opts {
        audit: true,
        memory_store: Some(control.clone()),
        ..Opts::default()
    })
    .await;
    let client = gw.connect("alice").await;
    control.fail_inserts.store(true, Ordering::SeqCst);
    assert!(client.simple_query("SELECT 1").await.is_err());
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("audit store"), "{body}");
    // Healed: ready again.
    control.fail_inserts.store(false, Ordering::SeqCst);
    assert_eq!(support::one(&client, "SELECT 7").await, "7");
    assert_eq!(get(admin, "/readyz").await.0, 200);
}
