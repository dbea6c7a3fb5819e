//! The console's commands: the gateway's state as rows (PgBouncer's
//! column names where the concept is the same), and the operator's
//! controls (RELOAD, PAUSE, RESUME, KILL).

use super::{Failure, Rows, Shared};
use crate::protocol::sqlstate;

/// PgBouncer's SHOW POOLS columns where the concept is the same.
pub(super) fn pools(shared: &Shared) -> Rows {
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
pub(super) fn clients(shared: &Shared) -> Rows {
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
pub(super) fn databases(shared: &Shared) -> Rows {
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

/// PgBouncer's SHOW STATS, one row per database, since the gateway
/// started (the `avg_` columns: per second, or per transaction or request,
/// over that time, where PgBouncer takes its last 15 s).
pub(super) fn stats(shared: &Shared) -> Rows {
    let seconds = shared
        .metrics
        .started
        .get()
        .map_or(1.0, |t| t.elapsed().as_secs_f64().max(1.0));
    let rows = shared
        .metrics
        .db_stats()
        .into_iter()
        .map(|(database, s)| {
            let per_second = |v: u64| ((v as f64) / seconds).round().to_string();
            let per = |v: u64, n: u64| (v.checked_div(n).unwrap_or(0)).to_string();
            vec![
                database,
                s.xacts.to_string(),
                s.queries.to_string(),
                s.received.to_string(),
                s.sent.to_string(),
                s.xact_us.to_string(),
                s.query_us.to_string(),
                s.wait_us.to_string(),
                per_second(s.xacts),
                per_second(s.queries),
                per_second(s.received),
                per_second(s.sent),
                per(s.xact_us, s.xacts),
                per(s.query_us, s.queries),
                per(s.wait_us, s.xacts),
            ]
        })
        .collect();
    (
        vec![
            "database",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_xact_time",
            "total_query_time",
            "total_wait_time",
            "avg_xact_count",
            "avg_query_count",
            "avg_recv",
            "avg_sent",
            "avg_xact_time",
            "avg_query_time",
            "avg_wait_time",
        ],
        rows,
    )
}

/// The gateway's own counters since it started.
pub(super) fn totals(shared: &Shared) -> Rows {
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
pub(super) fn reload(shared: &Shared) -> Result<Rows, Failure> {
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
pub(super) fn servers(shared: &Shared) -> Rows {
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
pub(super) fn pause(shared: &Shared, paused: bool) -> Rows {
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
pub(super) fn kill(shared: &Shared, session_id: &str) -> Result<Rows, Failure> {
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
pub(super) fn log(shared: &Shared, after: Option<u64>) -> Result<Rows, Failure> {
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
pub(super) fn audit(shared: &Shared) -> Rows {
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
pub(super) fn config(shared: &Shared) -> Rows {
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
