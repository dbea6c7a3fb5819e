//! The admin console: `psql -h gateway -d pgwarden -U <admin>`, as
//! PgBouncer's. Users listed in `[admin] users` log in with their
//! PostgreSQL password (the login is relayed, against `[admin]
//! auth_database`); anyone else gets FATAL 28000. It speaks the simple
//! query protocol and knows `SHOW VERSION|POOLS|CLIENTS|SERVERS|DATABASES|
//! STATS|TOTALS|AUDIT|CONFIG`, `RELOAD`, `PAUSE`, `RESUME`, `KILL <session_id>`
//! and `SHUTDOWN`.
//!
//! Invariants: no statement of the console reaches PostgreSQL; every
//! command, known or not, is recorded in the audit log with the admin's
//! identity and its outcome.

use bytes::BytesMut;

use super::refusal::Refusal;
use super::{refuse_denied, relay_login, Identity, Shared};
use crate::audit::{Kind, Status};
use crate::client::{ClientConn, ClientError};
use crate::protocol::messages::{self, PgError};
use crate::protocol::sqlstate;
use crate::protocol::startup::StartupMessage;

/// The virtual database that is the console.
pub const DATABASE: &str = "pgwarden";

/// Logs an admin in: `Some(client)` ready for commands, or `None` when
/// refused (recorded, and told to the client).
pub(super) async fn login(
    shared: &Shared,
    mut client: ClientConn,
    startup: &StartupMessage,
    ident: &mut Identity,
) -> Result<Option<ClientConn>, ClientError> {
    ident.role = "pgwarden console".into();
    // Reloadable (RELOAD, SIGHUP): an admin removed is out at once.
    let live = shared.live();
    if !live.admin_users.iter().any(|u| **u == *ident.client_user) {
        let refusal = Refusal::NotAdmin {
            user: ident.client_user.to_string(),
        };
        refuse_denied(shared, ident, &mut client, refusal).await;
        return Ok(None);
    }
    // The same login, checked by PostgreSQL against a database that exists.
    let mut params = startup.params.clone();
    params.retain(|(k, _)| k != "database");
    params.push(("database".into(), live.admin_auth_database.clone()));
    let checked = encode_startup(startup.version, &params);
    // An admin's console is not held to PostgreSQL's connection limits.
    let Some((mut greeting, _limits)) = relay_login(shared, &mut client, &checked, ident).await?
    else {
        return Ok(None);
    };
    messages::ready_for_query(&mut greeting, b'I');
    client.write_all(&greeting).await?;
    let mut start = ident.event(Kind::SessionStart);
    start.message = Some("admin console".into());
    shared.auditor.append_nowait(start).await;
    Ok(Some(client))
}

/// A startup message with `params`.
fn encode_startup(version: i32, params: &[(String, String)]) -> StartupMessage {
    let mut body = BytesMut::new();
    body.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.extend_from_slice(&[0]);
        body.extend_from_slice(v.as_bytes());
        body.extend_from_slice(&[0]);
    }
    body.extend_from_slice(&[0]);
    let mut raw = BytesMut::new();
    raw.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    raw.extend_from_slice(&body);
    StartupMessage {
        version,
        params: params.to_vec(),
        raw: raw.freeze(),
    }
}

/// Serves console commands until the admin leaves.
pub(super) async fn serve(
    shared: &Shared,
    ident: &Identity,
    mut client: ClientConn,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // After an extended-protocol message: everything until Sync is ignored.
    let mut skipping = false;
    loop {
        let stopping = async {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        // `client_idle_timeout_ms` (reloadable) holds for consoles too.
        let idle_ms = shared.live().client_idle_timeout_ms;
        let idle = async {
            match idle_ms {
                0 => std::future::pending().await,
                ms => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
            }
        };
        let frame = tokio::select! {
            frame = client.read_frame() => Ok(frame),
            () = stopping => Err(PgError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            )),
            () = idle => Err(Refusal::ClientIdle.to_wire()),
        };
        let frame = match frame {
            Ok(frame) => frame,
            // The gateway stops, or the console sat idle: it does not
            // hold the gateway up or a slot forever.
            Err(bye) => {
                client.send_error(&bye).await;
                return;
            }
        };
        let Ok(Some(frame)) = frame else {
            return;
        };
        let (tag, body) = (frame[0], &frame[5..]);
        let mut out = BytesMut::new();
        match tag {
            b'X' => return,
            b'Q' => {
                let sql =
                    String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned();
                run(shared, ident, &sql, &mut out).await;
                messages::ready_for_query(&mut out, b'I');
            }
            b'S' => {
                skipping = false;
                messages::ready_for_query(&mut out, b'I');
            }
            _ if skipping => continue,
            _ => {
                skipping = true;
                PgError::error(
                    sqlstate::PROTOCOL_VIOLATION,
                    "the pgwarden console speaks the simple query protocol only",
                )
                .encode(&mut out);
            }
        }
        if client.write_all(&out).await.is_err() {
            return;
        }
    }
}

mod show;
use show::*;

/// A result: column names and rows of text.
type Rows = (Vec<&'static str>, Vec<Vec<String>>);

/// The longest console command: the commands are a few words.
const MAX_COMMAND: usize = 1024;

/// A console command's failure: its SQLSTATE and message.
type Failure = (crate::protocol::sqlstate::SqlState, String);

/// Runs one command and writes its answer. Write-ahead, as for clients'
/// statements: the command's `query` record is stored before it runs (with
/// `on_failure = "deny"`, a command whose record cannot be stored does not
/// run), and its `result` record says how it ended.
async fn run(shared: &Shared, ident: &Identity, sql: &str, out: &mut BytesMut) {
    let mut query = ident.event(Kind::Query);
    query.statement = Some(match sql.len() > MAX_COMMAND {
        true => {
            let end = crate::audit::table::floor_char_boundary(sql, MAX_COMMAND);
            format!("{}… ({} bytes)", &sql[..end], sql.len())
        }
        false => sql.to_string(),
    });
    let seq = match shared.auditor.append(query).await {
        Ok(seq) => Some(seq),
        Err(e) if shared.config.audit.on_failure == crate::config::OnFailure::Deny => {
            tracing::error!("audit append failed; console command refused: {e}");
            PgError::error(
                sqlstate::IO_ERROR,
                "pgwarden cannot write its audit log; the command was not run",
            )
            .encode(out);
            return;
        }
        Err(e) => {
            tracing::error!(
                "audit append failed; console command run anyway (on_failure = allow): {e}"
            );
            None
        }
    };
    let answer = if sql.len() > MAX_COMMAND {
        Err((
            sqlstate::PROGRAM_LIMIT_EXCEEDED,
            format!("console commands are at most {MAX_COMMAND} bytes"),
        ))
    } else {
        answer(shared, sql)
    };
    let mut result = ident.event(Kind::Result);
    result.ref_seq = seq;
    match answer {
        Ok((columns, rows)) => {
            write_rows(out, &columns, &rows);
            let tag = format!("SHOW {}", rows.len());
            messages::write_frame(out, b'C', |b| {
                b.extend_from_slice(tag.as_bytes());
                b.extend_from_slice(&[0]);
            });
            result.status = Some(Status::Ok);
            result.command_tag = Some(tag);
            result.rows = Some(rows.len() as u64);
        }
        Err((code, message)) => {
            PgError::error(code, message.clone()).encode(out);
            result.status = Some(Status::Error);
            result.sqlstate = Some(code.code().into());
            result.message = Some(message);
        }
    }
    shared.auditor.append_nowait(result).await;
}

/// The answer to command `sql`.
fn answer(shared: &Shared, sql: &str) -> Result<Rows, Failure> {
    let command = sql.trim().trim_end_matches(';').trim().to_ascii_uppercase();
    let command = command.split_whitespace().collect::<Vec<_>>().join(" ");
    let unknown = |what: &str| (sqlstate::SYNTAX_ERROR, what.to_string());
    match command.as_str() {
        "SHOW VERSION" => Ok((vec!["version"], vec![vec![format!("pgwarden {}", env!("CARGO_PKG_VERSION"))]])),
        "SHOW POOLS" => Ok(pools(shared)),
        "SHOW CLIENTS" => Ok(clients(shared)),
        "SHOW AUDIT" => Ok(audit(shared)),
        "SHOW CONFIG" => Ok(config(shared)),
        "SHOW DATABASES" => Ok(databases(shared)),
        "SHOW STATS" => Ok(stats(shared)),
        "SHOW TOTALS" => Ok(totals(shared)),
        "RELOAD" => reload(shared),
        "SHOW SERVERS" => Ok(servers(shared)),
        "PAUSE" => Ok(pause(shared, true)),
        "RESUME" => Ok(pause(shared, false)),
        "SHUTDOWN" => {
            shared.shutdown.fire();
            Ok((vec!["shutdown"], vec![vec!["the gateway drains and stops (as on SIGTERM)".into()]]))
        }
        "SHOW LOG" => log(shared, None),
        other if other.starts_with("SHOW LOG AFTER ") => {
            match other["SHOW LOG AFTER ".len()..].trim().parse() {
                Ok(seq) => log(shared, Some(seq)),
                Err(_) => Err(unknown("SHOW LOG AFTER takes a seq")),
            }
        }
        other => match other.strip_prefix("KILL ") {
            // Session ids are case-sensitive: take it from the command as typed.
            Some(_) => kill(shared, sql.trim().trim_end_matches(';').split_whitespace().nth(1).unwrap_or("")),
            None => Err(unknown(
                "unknown console command: the console knows SHOW VERSION, SHOW POOLS, SHOW CLIENTS, SHOW SERVERS, SHOW DATABASES, SHOW STATS, SHOW TOTALS, SHOW AUDIT, SHOW CONFIG, SHOW LOG [AFTER seq], RELOAD, PAUSE, RESUME, KILL <session_id>, SHUTDOWN",
            )),
        },
    }
}

/// RowDescription (text columns) and a DataRow per row.
fn write_rows(out: &mut BytesMut, columns: &[&str], rows: &[Vec<String>]) {
    messages::write_frame(out, b'T', |b| {
        b.extend_from_slice(&(columns.len() as i16).to_be_bytes());
        for name in columns {
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&[0]);
            b.extend_from_slice(&0i32.to_be_bytes()); // table oid
            b.extend_from_slice(&0i16.to_be_bytes()); // column number
            b.extend_from_slice(&25i32.to_be_bytes()); // text
            b.extend_from_slice(&(-1i16).to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&0i16.to_be_bytes()); // text format
        }
    });
    for row in rows {
        debug_assert_eq!(row.len(), columns.len(), "a row for every column");
        messages::write_frame(out, b'D', |b| {
            b.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for value in row {
                b.extend_from_slice(&(value.len() as i32).to_be_bytes());
                b.extend_from_slice(value.as_bytes());
            }
        });
    }
}
