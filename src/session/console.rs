//! The admin console: `psql -h gateway -d pgwarden -U <admin>`, as
//! PgBouncer's. Users listed in `[admin] users` log in with their
//! PostgreSQL password (the login is relayed, against `[admin]
//! auth_database`); anyone else gets FATAL 28000. It speaks the simple
//! query protocol and knows `SHOW VERSION|POOLS|CLIENTS|SERVERS|DATABASES|
//! STATS|AUDIT|CONFIG`, `RELOAD`, `PAUSE`, `RESUME`, `KILL <session_id>`
//! and `SHUTDOWN`.
//!
//! Invariants: no statement of the console reaches PostgreSQL; every
//! command, known or not, is recorded in the audit log with the admin's
//! identity and its outcome.

use bytes::BytesMut;

use super::{authenticated, Identity, Shared};
use crate::audit::{Kind, Status};
use crate::auth::relay as auth_relay;
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
        let message = format!(
            "user \"{}\" may not open the pgwarden console (not in [admin] users)",
            ident.client_user
        );
        let mut ev = ident.event(Kind::Denied);
        ev.status = Some(Status::Error);
        ev.sqlstate = Some(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION.code().into());
        ev.message = Some(message.clone());
        shared.auditor.append_nowait(ev).await;
        let error = PgError::fatal(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, message);
        client.send_error(&error).await;
        return Ok(None);
    }
    // The same login, checked by PostgreSQL against a database that exists.
    let mut params = startup.params.clone();
    params.retain(|(k, _)| k != "database");
    params.push(("database".into(), live.admin_auth_database.clone()));
    let checked = encode_startup(startup.version, &params);
    let Ok(slot) = shared.auth_slots.clone().acquire_owned().await else {
        return Ok(None);
    };
    let mut greeting = BytesMut::new();
    let relayed = auth_relay::relay(
        &mut client,
        &checked,
        &shared.config.backend,
        shared.backend_tls.as_ref(),
        &mut greeting,
        slot,
    )
    .await;
    if !authenticated(shared, ident, &mut client, relayed).await? {
        return Ok(None);
    }
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
        let frame = tokio::select! {
            frame = client.read_frame() => Some(frame),
            () = stopping => None,
        };
        let Some(frame) = frame else {
            // The gateway stops: an idle console does not hold it up.
            let bye = PgError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            );
            client.send_error(&bye).await;
            return;
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

/// A result: column names and rows of text.
type Rows = (Vec<&'static str>, Vec<Vec<String>>);

/// Runs one command (recorded with its outcome) and writes its answer.
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
            let mut end = MAX_COMMAND;
            while !sql.is_char_boundary(end) {
                end -= 1;
            }
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
        "RELOAD" => reload(shared),
        "SHOW SERVERS" => Ok(servers(shared)),
        "PAUSE" => Ok(pause(shared, true)),
        "RESUME" => Ok(pause(shared, false)),
        "SHUTDOWN" => {
            shared.request_shutdown();
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
                "unknown console command: the console knows SHOW VERSION, SHOW POOLS, SHOW CLIENTS, SHOW SERVERS, SHOW DATABASES, SHOW STATS, SHOW AUDIT, SHOW CONFIG, SHOW LOG [AFTER seq], RELOAD, PAUSE, RESUME, KILL <session_id>, SHUTDOWN",
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

/// PgBouncer's SHOW POOLS columns where the concept is the same.
fn pools(shared: &Shared) -> Rows {
    let snapshot = shared.metrics_snapshot();
    let sessions = shared.cancels.sessions();
    let rows = snapshot
        .pools
        .iter()
        .map(|(database, idle, total)| {
            let clients = sessions
                .iter()
                .filter(|(ev, _, _)| ev.database.as_deref() == Some(database.as_str()));
            let active = clients
                .clone()
                .filter(|(_, running, _)| running.is_some())
                .count();
            vec![
                database.clone(),
                shared.config.backend.service_user.clone(),
                active.to_string(),
                (clients.count() - active).to_string(),
                total.saturating_sub(*idle).to_string(),
                idle.to_string(),
                format!("{:?}", shared.config.pool.mode).to_lowercase(),
            ]
        })
        .collect();
    (
        vec![
            "database",
            "user",
            "cl_active",
            "cl_idle",
            "sv_active",
            "sv_idle",
            "pool_mode",
        ],
        rows,
    )
}

/// PgBouncer's SHOW CLIENTS columns, and pgwarden's own: the mapped role,
/// the application name, the session id.
fn clients(shared: &Shared) -> Rows {
    let mut sessions = shared.cancels.sessions();
    sessions.sort_by(|a, b| a.0.session_id.cmp(&b.0.session_id));
    let rows = sessions
        .into_iter()
        .map(|(ev, running, _)| {
            let text = |v: Option<&str>| v.unwrap_or("").to_string();
            let addr = text(ev.client_addr.as_deref());
            let (host, port) = addr.rsplit_once(':').unwrap_or((&addr, ""));
            vec![
                "C".to_string(),
                text(ev.client_user.as_deref()),
                text(ev.database.as_deref()),
                if running.is_some() { "active" } else { "idle" }.to_string(),
                host.to_string(),
                port.to_string(),
                text(ev.role.as_deref()),
                // A client chose it: shown on one line, escapes visible.
                crate::audit::table::flat(ev.application_name.as_deref().unwrap_or("")),
                text(ev.session_id.as_deref()),
                running.map_or(String::new(), |age| format!("{:.3}", age.as_secs_f64())),
            ]
        })
        .collect();
    (
        vec![
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "role",
            "application_name",
            "session_id",
            "request_age_s",
        ],
        rows,
    )
}

/// PgBouncer's SHOW DATABASES columns where the concept is the same: each
/// database a pool serves (by name: one PostgreSQL for all).
fn databases(shared: &Shared) -> Rows {
    let c = &shared.config;
    let rows = shared
        .metrics_snapshot()
        .pools
        .into_iter()
        .map(|(database, _, total)| {
            vec![
                database.clone(),
                c.backend.host.clone(),
                c.backend.port.to_string(),
                database,
                c.backend.service_user.clone(),
                c.pool.size.to_string(),
                format!("{:?}", c.pool.mode).to_lowercase(),
                total.to_string(),
            ]
        })
        .collect();
    (
        vec![
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "pool_mode",
            "current_connections",
        ],
        rows,
    )
}

/// The gateway's counters since it started.
fn stats(shared: &Shared) -> Rows {
    use std::sync::atomic::Ordering;
    let m = &shared.metrics;
    let counters = [
        ("clients connected", &m.clients),
        ("logins refused by PostgreSQL", &m.auth_failures),
        ("clients denied by the policy", &m.denied),
        ("statements blocked by the guard", &m.guard_blocks),
        ("identity violations", &m.identity_violations),
        ("identity assertions", &m.identity_assertions),
        ("waits for a server connection", &m.pool_waits),
        ("server connection timeouts", &m.pool_timeouts),
        ("server connection resets", &m.server_resets),
        ("audit appends", &m.audit_appends),
    ];
    let rows = counters
        .into_iter()
        .map(|(name, value)| vec![name.to_string(), value.load(Ordering::Relaxed).to_string()])
        .collect();
    (vec!["key", "value"], rows)
}

/// RELOAD: as SIGHUP, the configuration file and policies read again.
fn reload(shared: &Shared) -> Result<Rows, Failure> {
    let path = shared.config_path.get().ok_or((
        sqlstate::FEATURE_NOT_SUPPORTED,
        "this gateway was not started from a configuration file".to_string(),
    ))?;
    // The error may quote the file (a password on the line it could not
    // read): it goes to the gateway's log, not to the console or the audit.
    let restart = shared.reload(path).map_err(|e| {
        tracing::error!("console RELOAD failed, keeping the configuration and policies in force: {e}");
        (
            sqlstate::CONFIG_FILE_ERROR,
            "the configuration or a policy file could not be read; what is in force stays (the gateway's log says why)".to_string(),
        )
    })?;
    let note = if restart.is_empty() {
        "configuration and policies reloaded".to_string()
    } else {
        format!(
            "configuration and policies reloaded; changed keys that need a restart: {}",
            restart.join(", ")
        )
    };
    Ok((vec!["reload"], vec![vec![note]]))
}

/// The server connections bound to a client now (PgBouncer's SHOW SERVERS
/// columns where the concept is the same), with the client and identity
/// each serves; idle pooled connections are counted by SHOW POOLS.
fn servers(shared: &Shared) -> Rows {
    let rows = shared
        .cancels
        .sessions()
        .into_iter()
        .filter_map(|(ev, running, backend)| {
            let backend = backend?;
            let text = |v: Option<&str>| v.unwrap_or("").to_string();
            Some(vec![
                "S".to_string(),
                shared.config.backend.service_user.clone(),
                text(ev.database.as_deref()),
                if running.is_some() { "active" } else { "used" }.to_string(),
                shared.config.backend.address(),
                backend.pid.to_string(),
                text(ev.client_user.as_deref()),
                text(ev.role.as_deref()),
                text(ev.session_id.as_deref()),
            ])
        })
        .collect();
    (
        vec![
            "type",
            "user",
            "database",
            "state",
            "addr",
            "remote_pid",
            "client_user",
            "role",
            "session_id",
        ],
        rows,
    )
}

/// PAUSE: no client gets a server connection until RESUME (running
/// transactions go on; new ones wait). RESUME lets them through.
fn pause(shared: &Shared, paused: bool) -> Rows {
    shared.paused.send_replace(paused);
    let note = if paused {
        "paused: new transactions wait for RESUME"
    } else {
        "resumed"
    };
    (
        vec![if paused { "pause" } else { "resume" }],
        vec![vec![note.into()]],
    )
}

/// KILL <session_id>: ends that client's session, as pg_terminate_backend
/// ends a backend's (FATAL 57P01; an open transaction is rolled back).
fn kill(shared: &Shared, session_id: &str) -> Result<Rows, Failure> {
    if shared.cancels.kill(session_id) {
        Ok((
            vec!["kill"],
            vec![vec![format!("session {session_id} ended")]],
        ))
    } else {
        Err((
            sqlstate::UNDEFINED_OBJECT,
            format!("no client session {session_id:?} (SHOW CLIENTS lists them)"),
        ))
    }
}

/// SHOW LOG [AFTER seq]: the durable records after `seq` (at most 1000),
/// or the latest 20, each as stored (its JSON): what `pgwarden audit tail
/// --follow` reads, since a running gateway's store cannot be opened by
/// another process.
fn log(shared: &Shared, after: Option<u64>) -> Result<Rows, Failure> {
    use std::sync::atomic::Ordering;
    let unavailable = |why: &str| (sqlstate::CANNOT_CONNECT_NOW, why.to_string());
    let source = shared
        .auditor
        .ship_source()
        .ok_or_else(|| unavailable("this gateway keeps no audit store"))?;
    let db = source
        .db
        .get()
        .ok_or_else(|| unavailable("the audit store is being reopened"))?;
    let durable = source.counters.durable.load(Ordering::Acquire);
    let from = match after {
        Some(seq) => seq + 1,
        None => durable.saturating_sub(19).max(1),
    };
    let mut rows = Vec::new();
    for entry in crate::audit::reader::scan_tree(&db, from).take(1000) {
        let (seq, raw) = entry.map_err(|e| (sqlstate::IO_ERROR, e.to_string()))?;
        if seq > durable {
            break;
        }
        rows.push(vec![
            seq.to_string(),
            String::from_utf8_lossy(&raw).into_owned(),
        ]);
    }
    Ok((vec!["seq", "record"], rows))
}

/// The audit log's state.
fn audit(shared: &Shared) -> Rows {
    let counters = shared.auditor.counters();
    let mut rows = vec![
        vec![
            "records appended".to_string(),
            counters.appended.to_string(),
        ],
        vec![
            "queue depth".into(),
            shared.auditor.queue_depth().to_string(),
        ],
        vec!["fsyncs".into(), counters.syncs.to_string()],
    ];
    if let Some(ship) = &shared.ship {
        use std::sync::atomic::Ordering;
        rows.push(vec![
            "shipped up to seq".into(),
            ship.shipped.load(Ordering::Relaxed).to_string(),
        ]);
        rows.push(vec![
            "shipping lag (records)".into(),
            ship.lag_records.load(Ordering::Relaxed).to_string(),
        ]);
        rows.push(vec![
            "shipping lag (seconds)".into(),
            format!("{:.1}", ship.lag_seconds()),
        ]);
    }
    (vec!["key", "value"], rows)
}

/// The settings that matter to an operator (never a password).
fn config(shared: &Shared) -> Rows {
    let c = &shared.config;
    let rows = [
        ("listen", c.server.listen.to_string()),
        ("backend", c.backend.address()),
        ("service_user", c.backend.service_user.clone()),
        ("pool_mode", format!("{:?}", c.pool.mode).to_lowercase()),
        ("pool_size", c.pool.size.to_string()),
        ("audit_store", c.audit.store.display().to_string()),
        (
            "audit_durability",
            format!("{:?}", c.audit.durability).to_lowercase(),
        ),
        ("policy_digest", shared.policy().digest().to_string()),
    ];
    (
        vec!["key", "value"],
        rows.into_iter()
            .map(|(k, v)| vec![k.to_string(), v])
            .collect(),
    )
}
