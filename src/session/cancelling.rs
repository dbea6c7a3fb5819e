//! What happens to a `CancelRequest`: forwarded to the backend of the
//! client whose key it carries (only while that client has a request
//! running), or sent on to the peer gateway that issued the key.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{cancel, Shared};
use crate::protocol::startup as startup_packet;

/// Whether a cancel for `pid` goes to another gateway (its key names one).
pub(super) fn is_for_peer(shared: &Shared, pid: i32) -> bool {
    let ours = shared.cancels.peer_id();
    ours != 0 && cancel::issuer(pid) != ours
}

/// Deals with a cancel for key (`pid`, `secret`) from `peer`; `forwarded`:
/// a peer gateway sent it on.
pub(super) async fn on_cancel(
    shared: &Shared,
    pid: i32,
    secret: i32,
    forwarded: bool,
    peer: SocketAddr,
) {
    if is_for_peer(shared, pid) {
        to_peer(shared, cancel::issuer(pid), pid, secret, forwarded).await;
    } else {
        forward_cancel(shared, pid, secret, peer, forwarded).await;
    }
}

/// Forwards a `CancelRequest` carrying a key we issued to the backend its
/// client is bound to, only while the client has a request running there;
/// unknown keys, and keys of clients with nothing running, are dropped
/// silently, as PostgreSQL drops a cancel for an idle backend. The client's
/// server connection is not released until PostgreSQL has taken the cancel
/// ([`cancel::CancelSlot::begin_cancel`]), so it cannot reach another client.
async fn forward_cancel(shared: &Shared, pid: i32, secret: i32, peer: SocketAddr, forwarded: bool) {
    // Who asked: the client's own connection, or a peer gateway that
    // received the cancel from the load balancer.
    let from = if forwarded {
        format!("{peer} with the peer gateways' request code")
    } else {
        peer.to_string()
    };
    let Some(slot) = shared.cancels.lookup(pid, secret) else {
        tracing::debug!("cancel request with an unknown key ignored");
        return;
    };
    // The record names the session whose statement was to be cancelled,
    // and who asked.
    let mut ev = slot.record.clone();
    ev.at = time::OffsetDateTime::now_utc();
    let Some((backend, in_flight)) = slot.begin_cancel() else {
        tracing::debug!("cancel request for a client with nothing running ignored");
        ev.message = Some(format!(
            "cancel request from {from} ignored: the session had nothing running"
        ));
        shared.auditor.append_nowait(ev).await;
        return;
    };
    ev.backend_pid = Some(backend.pid);
    ev.message = Some(format!("cancel request from {from} forwarded"));
    shared.auditor.append_nowait(ev).await;
    if cancel_backend(shared, backend).await {
        in_flight.confirmed();
    }
}

/// A cancel whose key another gateway issued (`[[peers]]`): sent on to
/// that peer, which checks the key as for its own clients. One a peer
/// forwarded here, or for an id no peer has, is dropped: forwarding never
/// loops, and unknown keys are ignored silently, as PostgreSQL does.
async fn to_peer(shared: &Shared, issuer: u8, pid: i32, secret: i32, forwarded: bool) {
    let Some(target) = shared.config.peers.iter().find(|p| p.id == issuer) else {
        tracing::debug!(issuer, "cancel request for a key of no known peer ignored");
        return;
    };
    if forwarded {
        tracing::debug!(
            issuer,
            "cancel request forwarded by a peer for a third gateway ignored"
        );
        return;
    }
    let Ok(_forwarding) = shared.peer_forwards.try_acquire() else {
        tracing::warn!(
            issuer,
            "too many cancel requests are being sent on to peers; one dropped"
        );
        return;
    };
    let packet = startup_packet::peer_cancel_request(pid, secret);
    let timeout = Duration::from_millis(shared.config.backend.connect_timeout_ms);
    // The peer closes the connection once it has dealt with the cancel.
    let sent = match shared.peer_tls.get(&issuer) {
        Some(tls) => {
            tokio::time::timeout(timeout, send_over_tls(&target.address, tls, &packet)).await
        }
        None => tokio::time::timeout(timeout, send_until_closed(&target.address, &packet)).await,
    };
    match sent {
        Ok(Ok(())) => {
            tracing::debug!(issuer, peer = %target.address, "cancel request sent to its peer")
        }
        Ok(Err(e)) => {
            tracing::warn!(peer = %target.address, "could not forward a cancel request to its peer: {e}")
        }
        Err(_) => {
            tracing::warn!(peer = %target.address, "forwarding a cancel request to its peer timed out")
        }
    }
}

/// Sends a `CancelRequest` for `backend` to PostgreSQL and waits until it
/// was taken (PostgreSQL closes the connection): whether it was, within
/// twice `connect_timeout_ms`. One not confirmed may still arrive later.
pub(crate) async fn cancel_backend(shared: &Shared, backend: cancel::BackendKey) -> bool {
    // A backend of a former primary is gone with it: nothing to cancel.
    let Some(addr) = shared.config.backend.primary_address() else {
        return true;
    };
    let packet = startup_packet::cancel_request(backend.pid, backend.secret);
    let deadline =
        Duration::from_millis(shared.config.backend.connect_timeout_ms.saturating_mul(2));
    // PostgreSQL closes the cancel connection itself; waiting for that
    // means the request was processed before we return.
    match tokio::time::timeout(deadline, send_until_closed(&addr, &packet)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!("could not forward a cancel request: {e}");
            false
        }
        Err(_) => {
            tracing::warn!("PostgreSQL did not take a cancel request in time");
            false
        }
    }
}

/// Sends a cancel `packet` to the peer at `addr` inside TLS (an
/// `SSLRequest` first, as a client does), and waits until it closes the
/// connection.
async fn send_over_tls(
    addr: &str,
    tls: &crate::tls::ClientTls,
    packet: &[u8],
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(&startup_packet::ssl_request()).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(std::io::Error::other("the peer does not accept TLS"));
    }
    let mut s = tls.connector.connect(tls.name.clone(), tcp).await?;
    s.write_all(packet).await?;
    s.flush().await?;
    let mut sink = [0u8; 1];
    let _ = s.read(&mut sink).await;
    Ok(())
}

/// Sends a cancel `packet` to `addr` and waits until the other side closes
/// the connection, which it does once it has dealt with the request.
async fn send_until_closed(addr: &str, packet: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut s, packet).await?;
    let mut sink = [0u8; 1];
    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut sink).await;
    Ok(())
}
