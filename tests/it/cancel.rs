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
pub(crate) async fn cancel(addr: SocketAddr, key: (i32, i32)) {
    cancel_with(addr, 80877102, key).await
}

/// A cancel with request code `code` (80877102, or a peer's forwarded one).
async fn cancel_with(addr: SocketAddr, code: i32, (pid, secret): (i32, i32)) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&code.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    s.write_all(&packet).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink))
        .await
        .expect("the gateway closes the cancel connection")
        .ok();
}

/// Sends `SELECT pg_sleep(seconds)` and returns once PostgreSQL runs it (a
/// cancel before that finds nothing to cancel; on a loaded machine a fixed
/// wait was not always enough).
pub(crate) async fn start_running(c: &mut RawClient, seconds: u32) {
    let marker = crate::support::marked(&format!("SELECT pg_sleep({seconds})"));
    c.stream.write_all(&query(&marker)).await.unwrap();
    crate::support::until_running(&marker).await;
}

pub(crate) async fn run(c: &mut RawClient, sql: &str) -> Option<String> {
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
    assert_cancels(&mut a, gw.addr).await;
}

/// A 30 s statement of `client`, cancelled through `addr` with its key:
/// it ends with 57014 well before, and the session goes on.
async fn assert_cancels(client: &mut RawClient, addr: SocketAddr) {
    start_running(client, 30).await;
    let started = Instant::now();
    cancel(addr, client.key).await;
    let (_, code, _) = client.until_ready().await;
    assert_eq!(code.as_deref(), Some("57014"));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(run(client, "SELECT 1").await, None);
}

/// Gateways behind one load balancer (`[server] peer_id`, `[[peers]]`): a
/// cancel that lands on a gateway other than the one that issued its key
/// is sent on to that one and cancels the statement; a wrong key cancels
/// nothing; and a cancel a peer forwarded is never forwarded again (no
/// loops), so one sent to the wrong gateway with the peers' code is dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_that_lands_on_a_peer_reaches_its_statement() {
    let a = start_gateway(Opts {
        server_extra: "peer_id = 1\n".into(),
        ..Opts::default()
    })
    .await;
    let b = start_gateway(Opts {
        server_extra: "peer_id = 2\n".into(),
        audit_extra: format!("[[peers]]\nid = 1\naddress = \"{}\"\n", a.addr),
        ..Opts::default()
    })
    .await;
    let mut client = RawClient::login(a.addr).await;
    assert_eq!((client.key.0 >> 23) & 0xff, 1, "the key names its gateway");

    // A wrong secret, through the peer: nothing is cancelled.
    start_running(&mut client, 1).await;
    cancel(b.addr, (client.key.0, client.key.1 ^ 1)).await;
    let (_, code, _) = client.until_ready().await;
    assert_eq!(code, None, "a wrong key cancelled the statement");

    // A cancel a peer says it forwarded is not forwarded again.
    start_running(&mut client, 1).await;
    cancel_with(b.addr, (1234 << 16) | 8866, client.key).await;
    let (_, code, _) = client.until_ready().await;
    assert_eq!(code, None, "a forwarded cancel was forwarded again");

    // The right key, through the peer: cancelled.
    assert_cancels(&mut client, b.addr).await;
}

/// `[[peers]] tls = true`: the cancel a gateway sends on to its peer
/// travels inside TLS (an `SSLRequest` first), to a peer whose certificate
/// chains to `ca_file`; a peer whose certificate does not gets nothing, so
/// nothing is cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_sent_on_to_a_peer_over_tls_reaches_its_statement() {
    let certs = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert_file, key_file) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let other_ca = certs.path().join("other.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let a = start_gateway(Opts {
        server_extra: format!("peer_id = 1\ntls_cert = {cert_file:?}\ntls_key = {key_file:?}\n"),
        ..Opts::default()
    })
    .await;
    let peer = |id: u8, ca: &std::path::Path| {
        start_gateway(Opts {
            server_extra: format!("peer_id = {id}\n"),
            audit_extra: format!(
                "[[peers]]\nid = 1\naddress = \"{}\"\ntls = true\nca_file = {ca:?}\n",
                a.addr
            ),
            ..Opts::default()
        })
    };
    let b = peer(2, &cert_file).await;
    let wrong = peer(3, &other_ca).await;
    let mut client = RawClient::login(a.addr).await;

    // A peer that cannot verify gateway 1 sends nothing on.
    start_running(&mut client, 1).await;
    cancel(wrong.addr, client.key).await;
    let (_, code, _) = client.until_ready().await;
    assert_eq!(code, None, "cancelled through an unverified peer");

    assert_cancels(&mut client, b.addr).await;
}

/// Cancels for a peer that accepts and never answers (a hung host) take no
/// client slot: logins go on while they wait, and the requester's
/// connection is closed at once.
#[tokio::test(flavor = "multi_thread")]
async fn cancels_for_a_hung_peer_never_keep_clients_out() {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            open.push(s); // accepted, never answered
        }
    });
    let gw = start_gateway(Opts {
        server_extra: "peer_id = 1\nmax_client_connections = 2\n".into(),
        audit_extra: format!("[[peers]]\nid = 3\naddress = \"{hung_addr}\"\n"),
        ..Opts::default()
    })
    .await;
    let started = Instant::now();
    for i in 0..6 {
        // A key of peer 3: the gateway sends it on, and the peer hangs.
        let pid = (3 << 23) | 0x0040_0000 | i;
        cancel(gw.addr, (pid, 1)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the requester waited for the peer"
    );
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(RawClient::login(gw.addr).await);
    }
    assert_eq!(run(&mut clients[0], "SELECT 1").await, None);
    held.abort();
}
