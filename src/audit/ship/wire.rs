//! A connection to the syslog server and what was sent on it and not yet
//! delivered: plain TCP syslog (settled by time) or a RELP session
//! (settled by the server's acknowledgements).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{message, relp, Stream, BATCH, IO_TIMEOUT, SETTLE};

/// A connection and what was sent on it and not yet delivered.
pub(super) enum Wire {
    /// Plain syslog: batches written, not yet settled: (when, last seq).
    Tcp {
        stream: Stream,
        unsettled: VecDeque<(Instant, u64)>,
    },
    /// RELP: the server acknowledges each message; `heard` is when it last
    /// answered (or when it first owed an answer).
    Relp {
        session: relp::Session<Stream>,
        heard: Instant,
    },
}

impl Wire {
    /// How many more records may be sent now.
    pub(super) fn room(&self) -> usize {
        match self {
            Wire::Tcp { .. } => BATCH,
            Wire::Relp { session, .. } => session.room().min(BATCH),
        }
    }

    /// Sends `messages` (seq, message), in order.
    pub(super) async fn send(&mut self, messages: &[(u64, Vec<u8>)]) -> Result<(), String> {
        let Some(&(last, _)) = messages.last() else {
            return Ok(());
        };
        let mut out = Vec::new();
        match self {
            Wire::Tcp { stream, unsettled } => {
                for (_, msg) in messages {
                    message::frame(&mut out, msg);
                }
                let written = async {
                    stream.write_all(&out).await?;
                    stream.flush().await
                };
                timed(written).await?.map_err(|e| e.to_string())?;
                unsettled.push_back((Instant::now(), last));
            }
            Wire::Relp { session, heard } => {
                if !session.waiting() {
                    *heard = Instant::now();
                }
                for (seq, msg) in messages {
                    session.frame(&mut out, *seq, msg);
                }
                timed(session.write(&out))
                    .await?
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Waits for the server: the last seq it acknowledged, if it did (RELP),
    /// or the end of the connection. What a plain syslog server sends is
    /// read and ignored (under TLS: its session tickets, its close alert).
    pub(super) async fn hear(&mut self) -> Result<Option<u64>, String> {
        match self {
            Wire::Tcp { stream, .. } => {
                let mut buf = [0u8; 512];
                match stream.read(&mut buf).await {
                    Ok(0) => Err("the syslog server closed the connection".into()),
                    Ok(_) => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            }
            Wire::Relp { session, heard } => {
                let acked = session.acknowledged().await.map_err(|e| e.to_string())?;
                if acked.is_some() {
                    *heard = Instant::now();
                }
                Ok(acked)
            }
        }
    }

    /// How long to wait for the server at most before looking again.
    pub(super) fn patience(&self) -> Duration {
        match self {
            Wire::Tcp { unsettled, .. } => unsettled
                .front()
                .map_or(SETTLE, |(at, _)| SETTLE.saturating_sub(at.elapsed())),
            Wire::Relp { session, heard } if session.waiting() => {
                IO_TIMEOUT.saturating_sub(heard.elapsed())
            }
            Wire::Relp { .. } => IO_TIMEOUT,
        }
    }

    /// The last seq now counted as delivered without hearing from the
    /// server (a plain syslog batch that has settled on an open
    /// connection); an error when the connection ended or a RELP server
    /// stopped answering.
    pub(super) fn settled(&mut self) -> Result<Option<u64>, String> {
        match self {
            Wire::Tcp { stream, unsettled } => {
                // Still open? (A read that would wait means yes.)
                let mut buf = [0u8; 512];
                loop {
                    match now_or_never(stream.read(&mut buf)) {
                        None => break,
                        Some(Ok(0)) => return Err("the syslog server closed the connection".into()),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e.to_string()),
                    }
                }
                let mut settled = None;
                while let Some(&(at, last)) = unsettled.front() {
                    if at.elapsed() < SETTLE {
                        break;
                    }
                    unsettled.pop_front();
                    settled = Some(last);
                }
                Ok(settled)
            }
            Wire::Relp { session, heard } => {
                if session.waiting() && heard.elapsed() >= IO_TIMEOUT {
                    return Err(format!(
                        "the RELP server acknowledged nothing for {} s",
                        IO_TIMEOUT.as_secs()
                    ));
                }
                Ok(None)
            }
        }
    }
}

/// What `future` gives when polled once, if it is ready then.
fn now_or_never<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// `io`, failing after [`IO_TIMEOUT`].
pub(super) async fn timed<T>(io: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(IO_TIMEOUT, io)
        .await
        .map_err(|_| format!("no progress for {} s", IO_TIMEOUT.as_secs()))
}
