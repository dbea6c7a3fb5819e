//! Cancel requests reach only the statement that was running for their
//! client when they were sent: the gateway answers the cancel connection
//! only after PostgreSQL has taken the cancel, drops a cancel for a client
//! with nothing running, and does not hand the server connection to anyone
//! else while a cancel for it is in flight.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::raw::{message, RawClient};
use crate::support::{start_gateway, Opts};

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// Sends a `CancelRequest` as libpq's `PQcancel` does: it returns when the
/// other side closes the connection.
async fn cancel(addr: SocketAddr, (pid, secret): (i32, i32)) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80877102i32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    s.write_all(&packet).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink))
        .await
        .expect("the gateway closes the cancel connection")
        .ok();
}

async fn run(c: &mut RawClient, sql: &str) -> Option<String> {
    c.stream.write_all(&query(sql)).await.unwrap();
    let (_, code, _) = c.until_ready().await;
    code
}

/// A cancel sent while the client is idle inside its transaction does not
/// cancel the client's next statement (PostgreSQL ignores a cancel for an
/// idle backend; so must the gateway, and not deliver it late).
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_while_idle_never_hits_the_next_statement() {
    let gw = start_gateway(Opts::default()).await;
    let mut a = RawClient::login(gw.addr).await;
    for round in 0..10 {
        assert_eq!(run(&mut a, "BEGIN").await, None);
        cancel(gw.addr, a.key).await;
        assert_eq!(
            run(&mut a, "SELECT pg_sleep(0.05)").await,
            None,
            "round {round}: the late cancel hit the next statement"
        );
        assert_eq!(run(&mut a, "COMMIT").await, None);
    }
}

/// Client A cancels while idle in its transaction and commits; client B
/// then gets the same (only) server connection: B's statement runs to the
/// end every time.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_never_reaches_another_client() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let mut a = RawClient::login(gw.addr).await;
    let mut b = RawClient::login(gw.addr).await;
    for round in 0..10 {
        assert_eq!(run(&mut a, "BEGIN").await, None);
        let sent = tokio::spawn(cancel(gw.addr, a.key));
        assert_eq!(run(&mut a, "COMMIT").await, None);
        assert_eq!(
            run(&mut b, "SELECT pg_sleep(0.05)").await,
            None,
            "round {round}: A's cancel hit B"
        );
        sent.await.unwrap();
    }
}

/// A cancel for a running statement still cancels it, promptly.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_for_a_running_statement_cancels_it() {
    let gw = start_gateway(Opts::default()).await;
    let mut a = RawClient::login(gw.addr).await;
    let marker = format!("SELECT pg_sleep(30) -- {}", rand::random::<u32>());
    a.stream.write_all(&query(&marker)).await.unwrap();
    // Cancel once PostgreSQL runs it (a cancel before that finds nothing
    // to cancel: on a loaded machine 300 ms was not always enough).
    let running = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '{marker}'"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while crate::support::cluster().psql("app", &running) != "1" {
        assert!(Instant::now() < deadline, "the statement never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    cancel(gw.addr, a.key).await;
    let (_, code, _) = a.until_ready().await;
    assert_eq!(code.as_deref(), Some("57014"));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(run(&mut a, "SELECT 1").await, None);
}
