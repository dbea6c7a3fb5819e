//! Raw protocol bytes against the gateway: malformed and hostile input gets
//! the right error (or a close) and never disturbs anyone else.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::startup_packet;
use crate::support::{self, start_gateway, Opts};

/// A hand-driven client logged in as the cleartext user.
pub struct RawClient {
    pub stream: TcpStream,
    /// The cancel key from `BackendKeyData` (zero until login).
    pub key: (i32, i32),
}

impl RawClient {
    pub async fn login(addr: SocketAddr) -> RawClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(&startup_packet("clear_user"))
            .await
            .unwrap();
        let mut c = RawClient {
            stream,
            key: (0, 0),
        };
        let (tag, body) = c.read_message().await;
        assert_eq!(
            (tag, &body[..]),
            (b'R', &3i32.to_be_bytes()[..]),
            "cleartext requested"
        );
        let mut pw = support::password_of("clear_user").as_bytes().to_vec();
        pw.push(0);
        c.send(b'p', &pw).await;
        loop {
            let (tag, body) = c.read_message().await;
            if tag == b'K' {
                let int = |i: usize| i32::from_be_bytes(body[i..i + 4].try_into().unwrap());
                c.key = (int(0), int(4));
            }
            if tag == b'Z' {
                return c;
            }
            assert_ne!(tag, b'E', "login failed");
        }
    }

    pub async fn send(&mut self, tag: u8, body: &[u8]) {
        self.stream.write_all(&message(tag, body)).await.unwrap();
    }

    pub async fn read_message(&mut self) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut head))
            .await
            .expect("message in time")
            .expect("message");
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body).await.unwrap();
        (head[0], body)
    }

    /// Reads until ReadyForQuery, returning the message tags seen and the
    /// SQLSTATE of the first error.
    pub async fn until_ready(&mut self) -> (Vec<u8>, Option<String>, u8) {
        let mut tags = Vec::new();
        let mut code = None;
        loop {
            let (tag, body) = self.read_message().await;
            tags.push(tag);
            if tag == b'E' && code.is_none() {
                code = Some(error_code(&body));
            }
            if tag == b'Z' {
                return (tags, code, body[0]);
            }
        }
    }
}

impl RawClient {
    /// Reads until ReadyForQuery; the first column of the first DataRow.
    pub async fn first_value_until_ready(&mut self) -> Option<String> {
        let mut value = None;
        loop {
            let (tag, body) = self.read_message().await;
            if tag == b'D' && value.is_none() {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                if len >= 0 {
                    value = Some(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
                }
            }
            if tag == b'Z' {
                return value;
            }
        }
    }
}

/// Parse, Bind, (`describe`: Describe of the portal,) Execute of an
/// unnamed statement of `sql` without parameters, then a message `end`
/// (`Sync`, `Flush`) with no body.
pub fn unnamed(sql: &str, describe: bool, end: u8) -> Vec<u8> {
    let mut parse = cstr("");
    parse.extend_from_slice(&cstr(sql));
    parse.extend_from_slice(&0i16.to_be_bytes());
    let mut out = message(b'P', &parse);
    out.extend(message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
    if describe {
        out.extend(message(b'D', b"P\0"));
    }
    let mut execute = cstr("");
    execute.extend_from_slice(&0i32.to_be_bytes());
    out.extend(message(b'E', &execute));
    out.extend(message(end, &[]));
    out
}

/// One frontend message: tag, length, body.
/// `Parse` of `sql` as statement `name`, with no parameter types.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = cstr(name);
    body.extend(cstr(sql));
    body.extend(0i16.to_be_bytes());
    message(b'P', &body)
}

/// `Bind` of `statement` to `portal`, with no parameters, results in text.
pub fn bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut body = cstr(portal);
    body.extend(cstr(statement));
    body.extend([0, 0, 0, 0, 0, 0]);
    message(b'B', &body)
}

/// `Execute` of `portal`, every row.
pub fn execute(portal: &str) -> Vec<u8> {
    let mut body = cstr(portal);
    body.extend(0i32.to_be_bytes());
    message(b'E', &body)
}

pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn error_code(body: &[u8]) -> String {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let field = body[i];
        let end = body[i + 1..].iter().position(|&b| b == 0).unwrap() + i + 1;
        if field == b'C' {
            return String::from_utf8_lossy(&body[i + 1..end]).into_owned();
        }
        i = end + 1;
    }
    String::new()
}

/// A NUL-terminated string, as the protocol sends one.
pub fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Reads whatever the gateway sends until it closes; returns it.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("gateway closes");
    buf
}

async fn still_serves(addr: SocketAddr) {
    let mut c = RawClient::login(addr).await;
    c.send(b'Q', &cstr("SELECT 1")).await;
    let (tags, code, status) = c.until_ready().await;
    assert_eq!(code, None, "{tags:?}");
    assert_eq!(status, b'I');
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_first_packets_are_refused_and_others_unaffected() {
    let gw = start_gateway(Opts::default()).await;
    let mut cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "1 GB declared startup length",
            vec![0x40, 0, 0, 0, 0, 3, 0, 0],
            Some("08P01"),
        ),
        (
            "negative length",
            vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0],
            Some("08P01"),
        ),
        ("length below 8", vec![0, 0, 0, 4], Some("08P01")),
        (
            "protocol 2.0",
            {
                let mut p = 16i32.to_be_bytes().to_vec();
                p.extend_from_slice(&0x0002_0000i32.to_be_bytes());
                p.extend_from_slice(b"user\0x\0\0\0");
                p.truncate(16);
                p
            },
            Some("0A000"),
        ),
        (
            "unknown version 9.9",
            {
                let mut p = 8i32.to_be_bytes().to_vec();
                p.extend_from_slice(&0x0009_0009i32.to_be_bytes());
                p
            },
            Some("0A000"),
        ),
        (
            "startup without user",
            {
                let body = b"database\0app\0\0";
                let mut p = ((8 + body.len()) as i32).to_be_bytes().to_vec();
                p.extend_from_slice(&196608i32.to_be_bytes());
                p.extend_from_slice(body);
                p
            },
            Some("28000"),
        ),
        (
            "cancel with an unknown key",
            {
                let mut p = 16i32.to_be_bytes().to_vec();
                p.extend_from_slice(&80877102i32.to_be_bytes());
                p.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
                p
            },
            None,
        ),
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for n in 0..20 {
        let mut junk = Vec::new();
        for _ in 0..(n * 7 + 3) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            junk.push(seed as u8);
        }
        cases.push(("random bytes", junk, None));
    }
    for (what, bytes, code) in cases {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        s.shutdown().await.ok();
        let reply = read_to_close(&mut s).await;
        if let Some(code) = code {
            assert_eq!(reply.first(), Some(&b'E'), "{what}: {reply:?}");
            assert_eq!(error_code(&reply[5..]), code, "{what}");
        }
    }
    still_serves(gw.addr).await;
}

/// Before a client is authenticated, its answer to a password or SASL
/// request is held to PostgreSQL's own limit (65,535 bytes), not to
/// `max_message_size`: a stranger announcing a 200 MB password got the
/// gateway to wait for it, and to hold whatever it sent, until the login
/// timed out.
#[tokio::test(flavor = "multi_thread")]
async fn an_unauthenticated_client_cannot_send_a_large_message() {
    let gw = start_gateway(Opts::default()).await;
    for (user, method) in [("clear_user", 3), ("bob", 10)] {
        let mut c = RawClient {
            stream: TcpStream::connect(gw.addr).await.unwrap(),
            key: (0, 0),
        };
        c.stream.write_all(&startup_packet(user)).await.unwrap();
        let (tag, body) = c.read_message().await;
        assert_eq!((tag, &body[..4]), (b'R', &i32::to_be_bytes(method)[..]));
        // 'p' announcing 200 MB, and the first 64 KiB of it.
        let mut head = vec![b'p'];
        head.extend_from_slice(&(200_000_000i32).to_be_bytes());
        head.extend(std::iter::repeat_n(b'x', 65_536));
        c.stream.write_all(&head).await.unwrap();
        let (tag, body) = c.read_message().await;
        assert_eq!(
            (tag, error_code(&body)),
            (b'E', "08P01".to_string()),
            "{user}"
        );
    }
    // The longest answer PostgreSQL reads (its length, which counts
    // itself, 65,535) is still relayed, and refused by PostgreSQL as a
    // wrong password.
    let mut c = RawClient {
        stream: TcpStream::connect(gw.addr).await.unwrap(),
        key: (0, 0),
    };
    c.stream
        .write_all(&startup_packet("clear_user"))
        .await
        .unwrap();
    c.read_message().await;
    let mut pw = vec![b'y'; 65_535 - 4 - 1];
    pw.push(0);
    c.send(b'p', &pw).await;
    let (tag, body) = c.read_message().await;
    assert_eq!((tag, error_code(&body)), (b'E', "28P01".to_string()));
    still_serves(gw.addr).await;
}

/// Client messages over 64 KiB hold at most `large_message_memory` at
/// once: a session whose message does not fit reads no more of it until
/// others are done, small messages never wait, and the memory comes back
/// when a message is handled or its client leaves. Before, four clients
/// each sending 200 MB took 2.5 GB, and nothing bounded more of them.
#[tokio::test(flavor = "multi_thread")]
async fn large_messages_wait_for_the_memory_others_hold() {
    const MIB: usize = 1 << 20;
    // The budget is one largest message: a user's share is all of it.
    let gw = with_budget(7 * MIB, 7 * MIB).await;
    let budget = &gw.shared.message_budget;
    let held = || budget.held.load(std::sync::atomic::Ordering::Relaxed);
    // `SELECT length('xx…')`, 3 MiB in all: two fit in the budget, not three.
    let (query, expected) = three_mib_query();
    // Two clients send the start of theirs and stop.
    let mut a = RawClient::login(gw.addr).await;
    let mut b = RawClient::login(gw.addr).await;
    for c in [&mut a, &mut b] {
        c.stream.write_all(&query[..MIB]).await.unwrap();
    }
    support::eventually("both hold a grant", || held() == 2 * query.len() as u64).await;
    // A third sends all of its own: it is not read while they hold theirs.
    let mut c = RawClient::login(gw.addr).await;
    let (mut c_read, mut c_write) = c.stream.into_split();
    let writer = {
        let query = query.clone();
        tokio::spawn(async move { c_write.write_all(&query).await.map(|()| c_write) })
    };
    support::eventually("the third waits", || {
        budget.waits.load(std::sync::atomic::Ordering::Relaxed) >= 1
    })
    .await;
    still_serves(gw.addr).await;
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), c_read.read(&mut byte)).await;
    assert!(early.is_err(), "answered past the budget: {early:?}");
    // The first finishes its message: answered, and the third goes on.
    a.stream.write_all(&query[MIB..]).await.unwrap();
    assert_eq!(data_row(&mut a).await, expected);
    let c_write = writer.await.unwrap().unwrap();
    c = RawClient {
        stream: c_read.reunite(c_write).unwrap(),
        key: (0, 0),
    };
    assert_eq!(data_row(&mut c).await, expected);
    // The second leaves in the middle of its message: its grant is back.
    drop(b);
    support::eventually("every grant back", || held() == 0).await;
    still_serves(gw.addr).await;
}

/// One client user holds at most a quarter of `large_message_memory` (or
/// one largest message): four connections of one login, each sending the
/// first bytes of a 256 MB message and nothing more, took all of it, and
/// every other client's large message waited for ever.
#[tokio::test(flavor = "multi_thread")]
async fn one_user_holds_at_most_a_share_of_the_large_message_memory() {
    const MIB: usize = 1 << 20;
    let gw = with_budget(4 * MIB, 32 * MIB).await;
    let waits = || {
        let waits = &gw.shared.message_budget.waits;
        waits.load(std::sync::atomic::Ordering::Relaxed)
    };
    let (query, expected) = three_mib_query();
    // Two of the share of 8 MiB, then a third of the same user.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = RawClient::login(gw.addr).await;
        c.stream.write_all(&query[..MIB]).await.unwrap();
        held.push(c);
    }
    support::eventually("the user's third waits", || waits() >= 1).await;
    // Another user's large message goes through.
    let alice = gw.connect("alice").await;
    let sql = std::str::from_utf8(&query[5..query.len() - 1]).unwrap();
    assert_eq!(support::one(&alice, sql).await, expected);
    // The first finishes: the third is read on.
    held[0].stream.write_all(&query[MIB..]).await.unwrap();
    assert_eq!(data_row(&mut held[0]).await, expected);
    held[2].stream.write_all(&query[MIB..]).await.unwrap();
    assert_eq!(data_row(&mut held[2]).await, expected);
}

/// A grant must be used while others wait: a message that is not whole
/// within its allowance (10 s, or 1 MiB/s) while another session waits for
/// the memory ends its session (FATAL 53200). Alone, it may take its time
/// (so may one whose user's other sessions wait for their own share).
/// Before, logins each sending the first bytes of a large message and
/// nothing more held the budget for as long as they liked.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_stops_arriving_gives_its_memory_to_those_waiting() {
    const MIB: usize = 1 << 20;
    // One 3 MiB message fits, not two.
    let gw = with_budget(4 * MIB, 4 * MIB).await;
    let budget = &gw.shared.message_budget;
    let held = || budget.held.load(std::sync::atomic::Ordering::Relaxed);
    let (query, expected) = three_mib_query();
    // One sends the start of its message and stops; nobody waits, and its
    // allowance passes.
    let mut slow = RawClient::login(gw.addr).await;
    slow.stream.write_all(&query[..MIB]).await.unwrap();
    support::eventually("it holds a grant", || held() == query.len() as u64).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    // Another login's message waits for the memory: the late one is ended,
    // and the other has its memory.
    let alice = gw.connect("alice").await;
    let sql = std::str::from_utf8(&query[5..query.len() - 1])
        .unwrap()
        .to_string();
    let waiting = tokio::spawn(async move { support::one(&alice, &sql).await });
    let (tag, body) = slow.read_message().await;
    assert_eq!((tag, error_code(&body)), (b'E', "53200".to_string()));
    let answer = tokio::time::timeout(Duration::from_secs(20), waiting).await;
    assert_eq!(
        answer.expect("the waiting message is read on").unwrap(),
        expected
    );
    still_serves(gw.addr).await;
}

/// A gateway with `max_message_size` and `large_message_memory` set.
async fn with_budget(max_message: usize, budget: usize) -> support::TestGateway {
    start_gateway(Opts {
        server_extra: format!(
            "max_message_size = {max_message}\nlarge_message_memory = {budget}\n"
        ),
        ..Opts::default()
    })
    .await
}

/// `SELECT length('xx…')` as a simple query of 3 MiB in all, and its answer.
fn three_mib_query() -> (Vec<u8>, String) {
    const MIB: usize = 1 << 20;
    let mut text = b"SELECT length('".to_vec();
    text.resize(3 * MIB - 3, b'x');
    text.extend_from_slice(b"')");
    let query = message(b'Q', &cstr(std::str::from_utf8(&text).unwrap()));
    (query, (3 * MIB - 3 - "SELECT length('".len()).to_string())
}

/// The first column of the first row of a simple query's answer, read up
/// to `ReadyForQuery`.
async fn data_row(c: &mut RawClient) -> String {
    let mut value = None;
    loop {
        let (tag, body) = c.read_message().await;
        match tag {
            b'D' => {
                let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
                value
                    .get_or_insert_with(|| String::from_utf8_lossy(&body[6..6 + len]).into_owned());
            }
            b'E' => panic!("error {}", error_code(&body)),
            b'Z' => return value.expect("a row"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_messages_after_login() {
    let gw = start_gateway(Opts {
        server_extra: "max_message_size = 1048576\n".into(),
        ..Opts::default()
    })
    .await;
    // An oversized declared length: FATAL 08P01 without allocating it.
    let mut c = RawClient::login(gw.addr).await;
    c.stream
        .write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let (tag, body) = c.read_message().await;
    assert_eq!((tag, error_code(&body)), (b'E', "08P01".to_string()));
    // An unknown message type.
    let mut c = RawClient::login(gw.addr).await;
    c.send(b'?', b"").await;
    let (tag, body) = c.read_message().await;
    assert_eq!((tag, error_code(&body)), (b'E', "08P01".to_string()));
    // A length below 4.
    let mut c = RawClient::login(gw.addr).await;
    c.stream.write_all(&[b'Q', 0, 0, 0, 2]).await.unwrap();
    let (tag, body) = c.read_message().await;
    assert_eq!((tag, error_code(&body)), (b'E', "08P01".to_string()));
    // A truncated message, then a hang-up: nothing to answer, nothing breaks.
    let mut c = RawClient::login(gw.addr).await;
    c.stream
        .write_all(&[b'Q', 0, 0, 0, 100, b'S'])
        .await
        .unwrap();
    drop(c);
    still_serves(gw.addr).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn extended_protocol_by_hand_with_flush() {
    let gw = start_gateway(Opts::default()).await;
    let mut c = RawClient::login(gw.addr).await;
    // Parse + Bind + Execute + Flush: results arrive without a Sync.
    let mut parse = cstr("");
    parse.extend(cstr("SELECT 7"));
    parse.extend_from_slice(&0i16.to_be_bytes());
    c.send(b'P', &parse).await;
    let mut bind = cstr("");
    bind.extend(cstr(""));
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    c.send(b'B', &bind).await;
    let mut exec = cstr("");
    exec.extend_from_slice(&0i32.to_be_bytes());
    c.send(b'E', &exec).await;
    c.send(b'H', b"").await;
    let mut tags = Vec::new();
    for _ in 0..4 {
        tags.push(c.read_message().await.0);
    }
    assert_eq!(tags, b"12DC");
    c.send(b'S', b"").await;
    let (tag, body) = c.read_message().await;
    assert_eq!((tag, body[0]), (b'Z', b'I'));
    // An error in the middle of a pipeline: the rest up to Sync is skipped.
    let mut bad = cstr("");
    bad.extend(cstr("SELECT 1/0"));
    bad.extend_from_slice(&0i16.to_be_bytes());
    for p in [&parse, &bad, &parse] {
        c.send(b'P', p).await;
        c.send(b'B', &bind).await;
        c.send(b'E', &exec).await;
    }
    c.send(b'S', b"").await;
    let (tags, code, status) = c.until_ready().await;
    assert_eq!(tags, b"12DC1EZ", "constant folding fails 1/0 at Bind");
    assert_eq!(code.as_deref(), Some("22012"));
    assert_eq!(status, b'I');
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_and_flush_during_copy_in_are_not_awaited() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        acquire_timeout_ms: 2000,
        ..Opts::default()
    })
    .await;
    let mut c = RawClient::login(gw.addr).await;
    c.send(b'Q', &cstr("BEGIN")).await;
    c.until_ready().await;
    c.send(b'Q', &cstr("COPY guard_t (id) FROM STDIN")).await;
    let (tag, _) = c.read_message().await;
    assert_eq!(tag, b'G');
    c.send(b'd', b"-71\n-72\n").await;
    c.send(b'S', b"").await;
    c.send(b'H', b"").await;
    c.send(b'd', b"-73\n").await;
    c.send(b'c', b"").await;
    let (tags, code, status) = c.until_ready().await;
    assert_eq!((tags, code, status), (b"CZ".to_vec(), None, b'T'));
    c.send(
        b'Q',
        &cstr("SELECT count(*) FROM guard_t WHERE id IN (-71, -72, -73)"),
    )
    .await;
    let (tags, code, _) = c.until_ready().await;
    assert_eq!((tags, code), (b"TDCZ".to_vec(), None));
    c.send(b'Q', &cstr("ROLLBACK")).await;
    let (_, _, status) = c.until_ready().await;
    assert_eq!(status, b'I');
    // The only server connection was released: another client gets it.
    still_serves(gw.addr).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_stalling_inside_a_message_holds_nothing() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        acquire_timeout_ms: 2000,
        ..Opts::default()
    })
    .await;
    // Half a Query: a header announcing a 96-byte body, 3 bytes of it, then silence.
    let mut staller = RawClient::login(gw.addr).await;
    staller
        .stream
        .write_all(&[b'Q', 0, 0, 0, 100, b'S', b'E', b'L'])
        .await
        .unwrap();
    // Everyone else is served, on the only server connection, at once.
    let started = std::time::Instant::now();
    for _ in 0..3 {
        still_serves(gw.addr).await;
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // The rest of the message arrives late: the statement still runs.
    let mut rest = b"ECT 1".to_vec();
    rest.resize(96 - 3 - 1, b' ');
    rest.push(0);
    staller.stream.write_all(&rest).await.unwrap();
    let (tags, code, status) = staller.until_ready().await;
    assert_eq!((code, status), (None, b'I'), "{tags:?}");
}

impl RawClient {
    /// Writes bytes as they are (several messages in one write).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
}
