//! Anchoring: the chain's head, every `checkpoint_interval_s` and at stop,
//! appended to `pgwarden.audit_checkpoints` in PostgreSQL (`[audit]
//! checkpoint_database`), outside the gateway's host.
//!
//! Invariants:
//! - an anchor names a durable record (seq, its hash, its ts): everything
//!   up to it is then fixed, since its hash covers the chain before it. A
//!   store rewritten with a recomputed chain, or cut short, no longer
//!   matches, which `pgwarden audit verify --anchors URL` reports;
//! - the gateway only appends, through a SECURITY DEFINER function the
//!   service user may call and nothing else: no gateway, and so nobody on
//!   its host with its credentials, can change or remove an anchor;
//! - anchoring never slows statements and a failure only logs: it runs on
//!   its own task, over a connection of its own.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::heads::Compared;
use super::reader::get_in_tree;
use super::record::Record;
use super::ship::Source;
use crate::auth::service::{self, ServiceLogin};
use crate::backend::conn::BackendError;
use crate::config::{shown_instance as shown, valid_instance, BackendConfig};
use crate::tls::BackendTls;

/// Where and as whom anchors are written.
#[derive(Clone)]
pub struct Target {
    pub backend: Arc<BackendConfig>,
    pub tls: Option<BackendTls>,
    pub database: String,
    pub instance: String,
}

impl Target {
    /// Appends the anchor of `record` (its seq, hash and ts).
    pub async fn anchor(&self, record: &Record) -> Result<(), String> {
        let sql = anchor_sql(&self.instance, record)
            .ok_or_else(|| format!("audit record {} has no anchorable hash or time", record.seq))?;
        let timeout = Duration::from_millis(self.backend.connect_timeout_ms.saturating_mul(2));
        let work = async {
            let who = ServiceLogin {
                user: &self.backend.service_user,
                password: self.backend.service_password.as_deref(),
                database: &self.database,
            };
            let mut conn = service::connect_as(&self.backend, self.tls.as_ref(), &who).await?;
            let done = conn.simple_rows(&sql).await.map(|_| ());
            conn.close().await;
            done
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result.map_err(|e: BackendError| e.to_string()),
            Err(_) => Err(BackendError::ConnectTimeout(self.backend.address()).to_string()),
        }
    }
}

/// The call that appends `record`'s anchor; `None` if its hash or ts is
/// not what the writer makes (they go into SQL literals).
fn anchor_sql(instance: &str, record: &Record) -> Option<String> {
    let hex = record.hash.len() == 64 && record.hash.bytes().all(|b| b.is_ascii_hexdigit());
    let ts = super::record::parse_ts(&record.ts).is_ok()
        && record
            .ts
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b':' | b'.' | b'+'));
    (hex && ts && valid_instance(instance)).then(|| {
        format!(
            "SELECT pgwarden.audit_checkpoint('{instance}', {}, '{}', '{}')",
            record.seq, record.hash, record.ts
        )
    })
}

/// Anchors the latest durable record every `interval`, until the audit log
/// stops.
pub fn spawn(source: Source, target: Target, interval: Duration) {
    tokio::spawn(async move {
        let mut anchored = 0u64;
        let mut failing = false;
        loop {
            tokio::time::sleep(interval).await;
            if source.counters.stopped.load(Ordering::Acquire) {
                return;
            }
            let durable = source.counters.durable.load(Ordering::Acquire);
            if durable <= anchored {
                continue;
            }
            let record = source
                .db
                .get()
                .map(|db| get_in_tree(&db, durable))
                .transpose()
                .ok()
                .flatten()
                .flatten();
            let Some(record) = record else {
                continue;
            };
            match target.anchor(&record).await {
                Ok(()) => {
                    anchored = durable;
                    if failing {
                        tracing::warn!(seq = durable, "audit checkpoints are anchored again");
                        failing = false;
                    }
                }
                Err(e) if !failing => {
                    if e.contains("is not after its latest anchored checkpoint") {
                        // This gateway anchors only what it wrote: a later
                        // checkpoint was written by someone else, or this
                        // store is an older copy of the one anchored.
                        tracing::error!(error = %e, database = %target.database, "a checkpoint ahead of this gateway's audit store is anchored: someone anchored ahead of it with its database login, or this store was restored from an older copy (audit verify --anchors)");
                    } else {
                        tracing::warn!(error = %e, database = %target.database, "audit checkpoint could not be anchored (has `pgwarden migrate` run?)");
                    }
                    failing = true;
                }
                Err(_) => {}
            }
        }
    });
}

/// Compares `reader`'s store with the checkpoints of `instance` anchored
/// in the database at `url`: `Ok(Ok(report line))` when every anchored
/// record is there with its anchored hash, `Ok(Err(why))` naming the first
/// that is not (rewritten, or cut off), or when the instance has no anchor
/// at all (the store's instance id may have been rewritten too), `Err`
/// when the anchors cannot be read.
pub fn check(
    reader: &super::StoreReader,
    url: &str,
    instance: &str,
    skip_archived: bool,
) -> Result<Result<String, String>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let (anchors, instances) = runtime.block_on(read_anchors(url, instance))?;
    let registered = if instances.is_empty() {
        "none".to_string()
    } else {
        instances
            .iter()
            .map(|(name, login)| format!("{} (login {})", shown(name), shown(login)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !instances.iter().any(|(name, _)| name == instance) {
        return Ok(Err(format!(
            "instance {} is not registered in pgwarden.audit_instances: anchors of an unregistered instance prove nothing (once sure it is the real one: pgwarden migrate --register-instance); registered instances: {registered}",
            shown(instance)
        )));
    }
    let compared = super::heads::compare(
        reader,
        &anchors,
        |a| a.seq as u64,
        |a| a.hash.as_str(),
        skip_archived,
    )?;
    let (checked, archived) = match compared {
        Compared::Archived {
            archived,
            first,
            others,
        } => {
            return Ok(Err(super::heads::archived_message(
                &shown(instance),
                archived,
                first,
                others,
            )))
        }
        Compared::CutOff { head, last, at_end } => {
            return Ok(Err(format!(
                "seq {} is anchored but the store ends at seq {last}: records were cut off{}",
                head.seq,
                at_end.map_or(String::new(), |r| made_before(
                    head,
                    &r,
                    "the store's last record"
                ))
            )));
        }
        Compared::Differs { head, stored } => {
            return Ok(Err(format!(
                "seq {} differs from its anchor (anchored hash {}, stored {}): the store was rewritten or restored from an older copy, or the anchor was forged{}",
                head.seq,
                shown(&head.hash),
                stored.hash,
                made_before(head, &stored, "the record it names")
            )));
        }
        Compared::Match { checked, archived } => (checked, archived),
    };
    match anchors.last().filter(|_| checked > 0) {
        Some(latest) => Ok(Ok(format!(
            "anchors match: {checked} checkpoints of instance {}, the latest at seq {}\n{}registered instances: {registered}\n",
            shown(instance),
            latest.seq,
            if archived > 0 {
                format!("{archived} checkpoints name archived records and were not checked (give their archives with --archive)\n")
            } else {
                String::new()
            }
        ))),
        // Nothing to compare proves nothing: the instance id in a store is
        // as writable as its records.
        None => Ok(Err(format!(
            "no checkpoints of instance {} are anchored; registered instances: {registered}",
            shown(instance)
        ))),
    }
}

/// One anchored checkpoint.
struct Anchor {
    seq: i64,
    hash: String,
    /// When PostgreSQL stored it (the function cannot be given another).
    anchored_at: time::OffsetDateTime,
}

/// The checkpoints of `instance`, in seq order, and every registered
/// instance with its login.
async fn read_anchors(
    url: &str,
    instance: &str,
) -> Result<(Vec<Anchor>, Vec<(String, String)>), String> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", redact(url)))?;
    let failed = |e: sqlx::Error| format!("cannot read pgwarden's audit checkpoints: {e}");
    // Only PostgreSQL's own functions and operators: an object someone made
    // in another schema must not run as the auditor.
    sqlx::query("SET search_path = pg_catalog, pg_temp")
        .execute(&mut conn)
        .await
        .map_err(failed)?;
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT seq, hash, (extract(epoch FROM anchored_at) * 1000000)::bigint \
         FROM pgwarden.audit_checkpoints WHERE instance = $1 ORDER BY seq",
    )
    .bind(instance)
    .fetch_all(&mut conn)
    .await
    .map_err(failed)?;
    let instances = sqlx::query_as(
        "SELECT instance, login::text FROM pgwarden.audit_instances ORDER BY instance",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(failed)?;
    let _ = conn.close().await;
    let anchors = rows
        .into_iter()
        .map(|(seq, hash, micros)| Anchor {
            seq,
            hash,
            anchored_at: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        })
        .collect();
    Ok((anchors, instances))
}

/// When `anchor` was made before `record` was written (by its `ts`, with
/// [`CLOCK_SKEW`]), what that says: this gateway anchors only records it
/// has written, so either someone anchored ahead of it with its database
/// login, or the store from `record` on was rewritten with later times.
/// The store's `ts` is as writable as the rest of it, so this never clears
/// the store; it only adds a lead.
fn made_before(anchor: &Anchor, record: &Record, what: &str) -> String {
    let written = super::record::parse_ts(&record.ts).ok();
    match written.filter(|written| anchor.anchored_at + CLOCK_SKEW < *written) {
        Some(written) => format!(
            "; the anchor was made at {} before {what} was written at {written}: either it was forged ahead of the store with the gateway's database login, or the store's records from there on were rewritten with later times",
            anchor.anchored_at
        ),
        None => String::new(),
    }
}

/// How far the gateway's clock may be ahead of PostgreSQL's.
const CLOCK_SKEW: time::Duration = time::Duration::seconds(1);

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let auth = &url[scheme + 3..at];
            match auth.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://admin:secret@db:5432/app"),
            "postgres://admin:***@db:5432/app"
        );
        assert_eq!(redact("postgres://db/app"), "postgres://db/app");
    }

    #[test]
    fn instances_keep_to_a_safe_alphabet() {
        assert!(valid_instance("pgw-0123abcd"));
        assert!(valid_instance("gw1.eu-west:6432"));
        assert!(!valid_instance(""));
        assert!(!valid_instance("a'; DROP TABLE x; --"));
        assert!(!valid_instance(&"a".repeat(65)));
    }

    #[test]
    fn the_anchor_call_takes_only_well_formed_values() {
        let event = crate::audit::Event::new(crate::audit::Kind::Query);
        let ts = "2026-11-30T23:59:59.123456Z".to_string();
        let mut record = Record::from_event(event, 7, ts, "0".repeat(64));
        record.hash = "ab".repeat(32);
        assert_eq!(
            anchor_sql("gw", &record).unwrap(),
            format!(
                "SELECT pgwarden.audit_checkpoint('gw', 7, '{}', '2026-11-30T23:59:59.123456Z')",
                "ab".repeat(32)
            )
        );
        record.hash = "x'".repeat(32);
        assert_eq!(anchor_sql("gw", &record), None);
    }
}
