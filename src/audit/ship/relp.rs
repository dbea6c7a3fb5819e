//! The client side of RELP, the Reliable Event Logging Protocol (rsyslog's
//! `imrelp`; the specification is librelp's `doc/relp.md`): every syslog
//! message is a command the server answers, so a record counts as delivered
//! only once the server said it took it.
//!
//! A frame is `TXNR SP COMMAND SP DATALEN [SP DATA] LF`. The client opens
//! with `open` (offers `relp_version`, `commands=syslog`), then sends
//! `syslog` commands with increasing transaction numbers; the server
//! answers each with `rsp` and the same number, `200 OK` or an error, in the
//! order it received them. A `serverclose` hint (txnr 0) ends the session.
//!
//! Invariants:
//! - a seq is acknowledged only by the `rsp 200` to the very frame that
//!   carried it, and acknowledgements come in order: an answer to anything
//!   but the oldest outstanding frame, an error answer or a malformed frame
//!   ends the session, and everything unanswered is sent again on the next;
//! - at most [`WINDOW`] frames are outstanding.

use std::collections::VecDeque;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most frames sent and not yet answered (librelp's default window).
pub const WINDOW: usize = 128;
/// The largest transaction number; the next one is 1 again.
const TXNR_MAX: u32 = 999_999_999;
/// The longest answer accepted: `open`'s offers, or an error's text.
const MAX_ANSWER: usize = 64 * 1024;

/// A frame read from the server.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub txnr: u32,
    pub command: String,
    pub data: Vec<u8>,
}

/// Why a session ended.
#[derive(Debug)]
pub enum RelpError {
    Io(std::io::Error),
    /// The server broke the protocol, refused a message, or closed.
    Protocol(String),
}

impl std::fmt::Display for RelpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelpError::Io(e) => write!(f, "{e}"),
            RelpError::Protocol(m) => write!(f, "RELP: {m}"),
        }
    }
}

impl From<std::io::Error> for RelpError {
    fn from(e: std::io::Error) -> Self {
        RelpError::Io(e)
    }
}

fn protocol(message: impl Into<String>) -> RelpError {
    RelpError::Protocol(message.into())
}

/// An open RELP session over `S`.
pub struct Session<S> {
    stream: S,
    next_txnr: u32,
    /// Frames sent and not answered yet, oldest first: (txnr, seq).
    outstanding: VecDeque<(u32, u64)>,
    /// Bytes read and not yet a whole frame.
    unread: Vec<u8>,
    /// Why the session ended, once it did after acknowledging more.
    failed: Option<RelpError>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Opens a session: `open` with our offers, and the server's `200`
    /// answer, which must accept `syslog`.
    pub async fn open(stream: S) -> Result<Session<S>, RelpError> {
        let mut session = Session {
            stream,
            next_txnr: 1,
            outstanding: VecDeque::new(),
            unread: Vec::new(),
            failed: None,
        };
        let offers = format!(
            "relp_version=0\nrelp_software=pgwarden,{}\ncommands=syslog",
            env!("CARGO_PKG_VERSION")
        );
        let mut out = Vec::new();
        let txnr = session.take_txnr();
        encode(&mut out, txnr, "open", offers.as_bytes());
        session.stream.write_all(&out).await?;
        session.stream.flush().await?;
        let answer = loop {
            if let Some(frame) = session.next_frame()? {
                break frame;
            }
            session.fill().await?;
        };
        let (code, rest) = response(&answer, txnr)?;
        if code != 200 {
            return Err(protocol(format!("the server refused the session: {rest}")));
        }
        let accepts_syslog = rest.lines().any(|offer| {
            offer
                .strip_prefix("commands=")
                .is_some_and(|cmds| cmds.split(',').any(|c| c == "syslog"))
        });
        if !accepts_syslog {
            return Err(protocol("the server does not accept syslog messages"));
        }
        Ok(session)
    }

    /// How many more frames may be sent before an answer comes.
    pub fn room(&self) -> usize {
        WINDOW.saturating_sub(self.outstanding.len())
    }

    /// Whether frames wait for their answer.
    pub fn waiting(&self) -> bool {
        !self.outstanding.is_empty()
    }

    /// Appends the `syslog` frame carrying record `seq` (its message `msg`)
    /// to `out`; it is outstanding from now on (write `out` next).
    pub fn frame(&mut self, out: &mut Vec<u8>, seq: u64, msg: &[u8]) {
        let txnr = self.take_txnr();
        encode(out, txnr, "syslog", msg);
        self.outstanding.push_back((txnr, seq));
    }

    /// Writes frames made by [`Session::frame`].
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), RelpError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Waits for what the server sends next and returns the last seq it
    /// has now acknowledged, if any new (cancel-safe: nothing read is lost
    /// when the wait is dropped).
    pub async fn acknowledged(&mut self) -> Result<Option<u64>, RelpError> {
        if let Some(failed) = self.failed.take() {
            return Err(failed);
        }
        self.fill().await?;
        let mut acked = None;
        loop {
            match self.answer() {
                Ok(Some(seq)) => acked = Some(seq),
                Ok(None) => return Ok(acked),
                // What came before the failure still counts.
                Err(e) if acked.is_some() => {
                    self.failed = Some(e);
                    return Ok(acked);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The seq the next whole frame read acknowledges, if one was read
    /// (skipping hints).
    fn answer(&mut self) -> Result<Option<u64>, RelpError> {
        while let Some(frame) = self.next_frame()? {
            if frame.txnr == 0 {
                if frame.command == "serverclose" {
                    return Err(protocol("the server closed the session"));
                }
                continue; // another hint: nothing to do
            }
            let Some(&(txnr, seq)) = self.outstanding.front() else {
                return Err(protocol(format!(
                    "an answer to {} nobody asked",
                    frame.txnr
                )));
            };
            let (code, text) = response(&frame, txnr)?;
            if code != 200 {
                return Err(protocol(format!("the server refused record {seq}: {text}")));
            }
            self.outstanding.pop_front();
            return Ok(Some(seq));
        }
        Ok(None)
    }

    fn take_txnr(&mut self) -> u32 {
        let txnr = self.next_txnr;
        self.next_txnr = if txnr == TXNR_MAX { 1 } else { txnr + 1 };
        txnr
    }

    /// Reads more; the end of the connection is an error.
    async fn fill(&mut self) -> Result<(), RelpError> {
        let mut buf = [0u8; 4096];
        let n = self.stream.read(&mut buf).await?;
        if n == 0 {
            return Err(protocol("the server closed the connection"));
        }
        self.unread.extend_from_slice(&buf[..n]);
        Ok(())
    }

    /// The next whole frame among the bytes read, if there is one.
    fn next_frame(&mut self) -> Result<Option<Frame>, RelpError> {
        match parse(&self.unread)? {
            Some((frame, used)) => {
                self.unread.drain(..used);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }
}

/// `TXNR SP COMMAND SP DATALEN [SP DATA] LF`.
fn encode(out: &mut Vec<u8>, txnr: u32, command: &str, data: &[u8]) {
    out.extend_from_slice(format!("{txnr} {command} {}", data.len()).as_bytes());
    if !data.is_empty() {
        out.push(b' ');
        out.extend_from_slice(data);
    }
    out.push(b'\n');
}

/// The first frame in `bytes` and how many bytes it took; `None` while it
/// is incomplete.
pub fn parse(bytes: &[u8]) -> Result<Option<(Frame, usize)>, RelpError> {
    let mut at = 0;
    let Some(txnr) = number(bytes, &mut at)? else {
        return Ok(None);
    };
    let Some(command) = word(bytes, &mut at)? else {
        return Ok(None);
    };
    // DATALEN, then a space and the data, or the LF at once when it is 0.
    let start = at;
    while at < bytes.len() && bytes[at].is_ascii_digit() {
        at += 1;
    }
    if at == bytes.len() {
        return Ok(None);
    }
    if at == start || at - start > 9 {
        return Err(protocol("a frame without a valid length"));
    }
    let len: usize = std::str::from_utf8(&bytes[start..at])
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| protocol("a frame without a valid length"))?;
    if len > MAX_ANSWER {
        return Err(protocol(format!("a frame of {len} bytes")));
    }
    let data = if len == 0 {
        &bytes[at..at]
    } else {
        if bytes[at] != b' ' {
            return Err(protocol("a malformed frame"));
        }
        at += 1;
        if bytes.len() < at + len {
            return Ok(None);
        }
        at += len;
        &bytes[at - len..at]
    };
    match bytes.get(at) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((
            Frame {
                txnr,
                command,
                data: data.to_vec(),
            },
            at + 1,
        ))),
        Some(_) => Err(protocol("a frame without its trailing LF")),
    }
}

/// Digits up to a space.
fn number(bytes: &[u8], at: &mut usize) -> Result<Option<u32>, RelpError> {
    let start = *at;
    while *at < bytes.len() && bytes[*at].is_ascii_digit() && *at - start < 10 {
        *at += 1;
    }
    match bytes.get(*at) {
        None => Ok(None),
        Some(b' ') if *at > start && *at - start <= 9 => {
            let n = std::str::from_utf8(&bytes[start..*at])
                .expect("digits")
                .parse()
                .expect("at most 9 digits");
            *at += 1;
            Ok(Some(n))
        }
        Some(_) => Err(protocol("a frame without a valid transaction number")),
    }
}

/// Letters up to a space.
fn word(bytes: &[u8], at: &mut usize) -> Result<Option<String>, RelpError> {
    let start = *at;
    while *at < bytes.len() && bytes[*at].is_ascii_alphabetic() && *at - start < 33 {
        *at += 1;
    }
    match bytes.get(*at) {
        None => Ok(None),
        Some(b' ') if *at > start && *at - start <= 32 => {
            let w = String::from_utf8_lossy(&bytes[start..*at]).into_owned();
            *at += 1;
            Ok(Some(w))
        }
        Some(_) => Err(protocol("a frame without a valid command")),
    }
}

/// A `rsp` frame's status code and the rest of its data, checked to
/// answer `txnr`.
fn response(frame: &Frame, txnr: u32) -> Result<(u16, String), RelpError> {
    if frame.command != "rsp" {
        return Err(protocol(format!(
            "`{}` where an answer was due",
            frame.command
        )));
    }
    if frame.txnr != txnr {
        return Err(protocol(format!(
            "the answer to {} came where the answer to {txnr} was due",
            frame.txnr
        )));
    }
    let text = String::from_utf8_lossy(&frame.data);
    // RSP-CODE is exactly three digits, then a space, a line break or the end.
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let code = (digits == 3)
        .then(|| text[..3].parse().ok())
        .flatten()
        .ok_or_else(|| protocol(format!("an answer without a status: {text:?}")))?;
    Ok((code, text.get(3..).unwrap_or("").trim_start().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(txnr: u32, command: &str, data: &str) -> Frame {
        Frame {
            txnr,
            command: command.into(),
            data: data.as_bytes().to_vec(),
        }
    }

    #[test]
    fn frames_carry_their_length_and_end_with_lf() {
        let mut out = Vec::new();
        encode(&mut out, 7, "syslog", "<110>1 é".as_bytes());
        encode(&mut out, 8, "close", b"");
        assert_eq!(out, "7 syslog 9 <110>1 é\n8 close 0\n".as_bytes());
    }

    #[test]
    fn whole_frames_parse_and_partial_ones_wait() {
        let bytes = b"3 rsp 6 200 OK\n0 serverclose 0\n";
        let (first, used) = parse(bytes).unwrap().unwrap();
        assert_eq!(first, frame(3, "rsp", "200 OK"));
        let (second, rest) = parse(&bytes[used..]).unwrap().unwrap();
        assert_eq!(second, frame(0, "serverclose", ""));
        assert_eq!(used + rest, bytes.len());
        for cut in 0..bytes.len().min(used) {
            assert!(parse(&bytes[..cut]).unwrap().is_none(), "{cut}");
        }
    }

    #[test]
    fn malformed_frames_end_the_session() {
        for bad in [
            &b"x rsp 6 200 OK\n"[..],
            b"3 rsp 6 200 OKX",
            b"3 rsp 6x200 OK\n",
            b"3 r2p 6 200 OK\n",
            b"1234567890 rsp 6 200 OK\n",
            b"3 rsp 99999999 ",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn answers_must_be_to_the_oldest_frame_and_ok() {
        assert_eq!(
            response(&frame(4, "rsp", "200 OK"), 4).unwrap(),
            (200, "OK".to_string())
        );
        assert_eq!(response(&frame(4, "rsp", "500 no"), 4).unwrap().0, 500);
        assert!(response(&frame(5, "rsp", "200 OK"), 4).is_err());
        assert!(response(&frame(4, "syslog", "200 OK"), 4).is_err());
        assert!(response(&frame(4, "rsp", ""), 4).is_err());
        assert!(response(&frame(4, "rsp", "2001 not ok"), 4).is_err());
        assert!(response(&frame(4, "rsp", "20 OK"), 4).is_err());
        assert_eq!(
            response(&frame(4, "rsp", "200\nrelp_version=0"), 4)
                .unwrap()
                .0,
            200
        );
    }

    /// A scripted server: the session opens, acknowledges in order, and
    /// fails on an answer out of order or a refusal.
    #[tokio::test]
    async fn a_session_counts_only_what_the_server_acknowledged() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let serve = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"commands=syslog\n") {
                let n = server.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got.starts_with(b"1 open "), "{got:?}");
            server
                .write_all(b"1 rsp 37 200 OK\nrelp_version=0\ncommands=syslog\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            while got.iter().filter(|b| **b == b'\n').count() < 3 {
                let n = server.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, b"2 syslog 1 a\n3 syslog 1 b\n4 syslog 1 c\n");
            server.write_all(b"2 rsp 6 200 OK\n3 rsp 6 ").await.unwrap();
            server.write_all(b"200 OK\n").await.unwrap();
            server.write_all(b"4 rsp 8 500 full\n").await.unwrap();
        });
        let mut session = Session::open(client).await.unwrap();
        let mut out = Vec::new();
        for (seq, msg) in [(10, "a"), (11, "b"), (12, "c")] {
            session.frame(&mut out, seq, msg.as_bytes());
        }
        assert_eq!(session.room(), WINDOW - 3);
        session.write(&out).await.unwrap();
        let mut acked = None;
        let refused = loop {
            match session.acknowledged().await {
                Ok(Some(seq)) => acked = Some(seq),
                Ok(None) => {}
                Err(e) => break e,
            }
        };
        serve.await.unwrap();
        assert_eq!(acked, Some(11));
        assert!(
            refused.to_string().contains("refused record 12"),
            "{refused}"
        );
    }
}
