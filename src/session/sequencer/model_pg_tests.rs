//! A model of PostgreSQL's side of the protocol, for the property test
//! (`model_tests.rs`).

use super::tests::{cc, err, frame, z};

/// What a model PostgreSQL does with each message, by the protocol's rules:
/// statements named by their text (`BEGIN`, `COMMIT`, `ROLLBACK`, `FAIL`,
/// `COPY IN`, `COPY OUT`, anything else returns a row), errors skip to
/// `Sync` in the extended protocol, an implicit transaction ends at `Sync`.
#[derive(Default)]
pub(super) struct ModelServer {
    pub(super) out: Vec<u8>,
    /// Answers not sent yet ([`ModelServer::send`]).
    pub(super) unflushed: Vec<u8>,
    pub(super) tx: Tx,
    pub(super) explicit: bool,
    pub(super) ignore_till_sync: bool,
    /// `Some(extended)` during copy-in.
    pub(super) copy_in: Option<bool>,
    /// The last parsed statement's text (what the next `Execute` runs).
    pub(super) parsed: String,
    /// Extended messages since the last `Sync`.
    pub(super) unsynced: bool,
    /// The connection carries the client's identity.
    pub(super) asserted: bool,
    /// The gateway must not start a request while the server still owes
    /// answers (the connection ran opaque code); `owed_elsewhere`: answers
    /// are in the gateway's read buffer, not read yet.
    pub(super) strict: bool,
    pub(super) owed_elsewhere: bool,
    /// A request started while answers were owed (with `strict`).
    pub(super) early_request: bool,
    /// The last message was the gateway's failing query ahead of a request.
    pub(super) refused_ahead: bool,
    pub(super) inbox: Vec<u8>,
}

#[derive(Default, Clone, Copy, PartialEq, Debug)]
pub(super) enum Tx {
    #[default]
    Idle,
    Open,
    Failed,
}

impl ModelServer {
    pub(super) fn status(&self) -> u8 {
        match self.tx {
            Tx::Idle => b'I',
            Tx::Open => b'T',
            Tx::Failed => b'E',
        }
    }

    /// PostgreSQL buffers its answers and sends them at `ReadyForQuery`,
    /// `CopyInResponse` (it then waits for the client), an error, or the
    /// client's `Flush`: a gateway that waits for an answer the server
    /// keeps would wait for ever.
    fn send(&mut self, bytes: Vec<u8>) {
        let flushes = matches!(bytes[0], b'Z' | b'G' | b'E');
        self.unflushed.extend(bytes);
        if flushes {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.out.append(&mut self.unflushed);
    }

    pub(super) fn receive(&mut self, bytes: &[u8]) {
        assert!(
            self.asserted,
            "a message reached a connection without the client's identity"
        );
        self.inbox.extend_from_slice(bytes);
        while self.inbox.len() >= 5 {
            let len =
                i32::from_be_bytes([self.inbox[1], self.inbox[2], self.inbox[3], self.inbox[4]])
                    as usize;
            if self.inbox.len() < 1 + len {
                break;
            }
            let msg: Vec<u8> = self.inbox.drain(..1 + len).collect();
            self.message(&msg);
        }
    }

    fn text(msg: &[u8], skip: usize) -> String {
        let body = &msg[5 + skip..];
        let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
        String::from_utf8_lossy(&body[..end]).into_owned()
    }

    fn message(&mut self, msg: &[u8]) {
        let tag = msg[0];
        let starts_request = matches!(tag, b'Q' | b'F')
            || (matches!(tag, b'P' | b'B' | b'D' | b'C' | b'E' | b'S') && !self.unsynced);
        let owed = !self.out.is_empty() || self.owed_elsewhere;
        // The failing query the gateway sends ahead of a request in a
        // transaction it told the client is aborted goes with that request:
        // it cannot end the transaction.
        let ahead = std::mem::take(&mut self.refused_ahead);
        if self.strict && self.copy_in.is_none() && starts_request && owed && !ahead {
            self.early_request = true;
        }
        if tag == b'Q' && Self::text(msg, 0).starts_with("pgwarden refused") && !owed {
            self.refused_ahead = true;
        }
        if let Some(extended) = self.copy_in {
            match tag {
                b'c' | b'f' => {
                    self.copy_in = None;
                    match tag {
                        b'c' => self.send(cc("COPY 1")),
                        _ => self.fail(extended),
                    }
                    if !extended {
                        self.end_simple();
                    }
                }
                // A bad row: the copy fails, and what the client sends for
                // it from now on is dropped.
                b'd' if msg[5..].starts_with(b"bad") => {
                    self.copy_in = None;
                    self.fail(extended);
                    if !extended {
                        self.end_simple();
                    }
                }
                _ => {} // CopyData, Flush, Sync: ignored during copy-in
            }
            return;
        }
        if tag == b'S' {
            self.ignore_till_sync = false;
            self.unsynced = false;
            if !self.explicit {
                self.tx = Tx::Idle;
            }
            self.send(z(self.status()));
            return;
        }
        if self.ignore_till_sync {
            return;
        }
        match tag {
            b'Q' => {
                // A query ends an extended batch open before it.
                self.unsynced = false;
                let sql = Self::text(msg, 0);
                self.statement(&sql, false);
                if self.copy_in.is_none() {
                    self.end_simple();
                }
            }
            b'F' => {
                self.unsynced = false;
                self.send(frame(b'V', &[0, 0, 0, 1, b'1']));
                self.send(z(self.status()));
            }
            b'P' => {
                self.unsynced = true;
                self.parsed = Self::text(msg, 1);
                self.begin_implicit();
                if self.parsed.starts_with("FAIL") || self.parsed.starts_with("pgwarden refused") {
                    self.fail(true);
                } else {
                    self.send(frame(b'1', b""));
                }
            }
            b'B' => {
                self.unsynced = true;
                self.send(frame(b'2', b""));
            }
            b'D' => {
                self.unsynced = true;
                self.send(frame(b'n', b""));
            }
            b'C' => {
                self.unsynced = true;
                self.send(frame(b'3', b""));
            }
            b'E' => {
                self.unsynced = true;
                let sql = self.parsed.clone();
                self.statement(&sql, true);
            }
            b'H' => self.flush(),
            b'd' | b'c' | b'f' => {}
            other => panic!("model server: unexpected message {}", other as char),
        }
    }

    fn begin_implicit(&mut self) {
        if self.tx == Tx::Idle {
            self.tx = Tx::Open;
        }
    }

    /// An error: an explicit transaction, or an extended batch's implicit
    /// one, is aborted (the batch skips to `Sync`); a simple query's
    /// implicit one ends at its `ReadyForQuery`.
    fn fail(&mut self, extended: bool) {
        self.send(err("22012"));
        if self.explicit || extended {
            self.tx = Tx::Failed;
        }
        if extended {
            self.ignore_till_sync = true;
        }
    }

    /// The end of a simple query: its implicit transaction, if any, ends.
    fn end_simple(&mut self) {
        if !self.explicit {
            self.tx = Tx::Idle;
        }
        self.send(z(self.status()));
    }

    fn statement(&mut self, sql: &str, extended: bool) {
        if self.tx == Tx::Failed && sql != "ROLLBACK" {
            self.send(err("25P02"));
            if extended {
                self.ignore_till_sync = true;
            }
            return;
        }
        match sql {
            "BEGIN" => {
                // Inside a transaction: a warning, and the transaction goes on.
                self.explicit = true;
                self.tx = Tx::Open;
                self.send(cc("BEGIN"));
            }
            "COMMIT" | "ROLLBACK" => {
                self.explicit = false;
                self.tx = if extended { Tx::Open } else { Tx::Idle };
                self.send(cc(sql));
            }
            "FAIL" | "pgwarden refused this statement" => self.fail(extended),
            // Into a view: PostgreSQL says the copy started, then fails it
            // before reading anything.
            "COPY v FROM STDIN" => {
                self.begin_implicit();
                self.send(frame(b'G', &[0, 0, 0]));
                self.fail(extended);
            }
            "COPY t FROM STDIN" => {
                self.begin_implicit();
                self.copy_in = Some(extended);
                self.send(frame(b'G', &[0, 0, 0]));
            }
            "COPY OUT" => {
                self.send(frame(b'H', &[0, 0, 0]));
                self.send(frame(b'd', b"row\n"));
                self.send(frame(b'c', b""));
                self.send(cc("COPY 1"));
            }
            _ => {
                if extended {
                    self.begin_implicit();
                }
                self.send(frame(b'D', b"\0\0"));
                self.send(cc("SELECT 1"));
            }
        }
    }

    /// Owes the client nothing, is outside any transaction and batch.
    pub(super) fn idle(&self) -> bool {
        self.out.is_empty()
            && self.unflushed.is_empty()
            && self.inbox.is_empty()
            && self.tx == Tx::Idle
            && !self.unsynced
            && self.copy_in.is_none()
            && !self.ignore_till_sync
    }
}
