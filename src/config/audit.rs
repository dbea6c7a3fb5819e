//! `[audit]` and `[audit.ship]`: where and how records are stored, and
//! how they leave the host.

use std::path::PathBuf;

use serde::Deserialize;

/// What "stored" means before a statement is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync before forwarding, one fsync shared by all records that arrived meanwhile.
    Group,
    /// One fsync per record.
    Sync,
    /// In memory before forwarding, on disk within `flush_interval_ms`.
    Async,
}

/// What happens to statements when the audit store cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    Deny,
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub enabled: bool,
    pub store: PathBuf,
    pub durability: Durability,
    pub flush_interval_ms: u64,
    pub on_failure: OnFailure,
    pub log_parameters: bool,
    /// The most bytes of a statement text, a parameter value or a message
    /// that a record keeps: a longer statement is refused, a longer value
    /// or message stored cut, with its length and SHA-256 in the record's
    /// `message` (0: no limit).
    pub max_value_bytes: usize,
    /// This gateway's id in shipped records; default: one made when the
    /// store is created, kept in it.
    pub instance: Option<String>,
    /// Ship every record to a syslog server (`[audit.ship]`).
    pub ship: Option<ShipConfig>,
    /// Anchor the chain in this database's `pgwarden.audit_checkpoints`
    /// (unset: no anchoring).
    pub checkpoint_database: Option<String>,
    /// Seconds between checkpoints: anchors (and one at stop), and
    /// checkpoints in the shipped stream (`checkpoint_interval` too).
    #[serde(alias = "checkpoint_interval")]
    pub checkpoint_interval_s: u64,
    /// An Ed25519 key (PKCS#8 PEM) that signs the shipped checkpoints.
    pub signing_key: Option<PathBuf>,
    /// Retention: records older than `archive_after_days` move from the
    /// store into archive files in this directory (unset: they stay).
    pub archive_dir: Option<PathBuf>,
    pub archive_after_days: f64,
    /// Seconds between looks for records old enough to archive.
    pub archive_interval_s: u64,
}

/// `[audit.ship]`: every record, in seq order, to a syslog server (RFC 5424
/// messages over TCP with RFC 6587 octet counting, or over RELP), at least
/// once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipConfig {
    /// `host:port` of the syslog server's TCP listener.
    pub address: String,
    /// A warning is logged while more records than this wait to be shipped.
    #[serde(default = "default_lag_warning")]
    pub lag_warning_records: u64,
    /// How messages travel: plain syslog over TCP, or RELP, where the server
    /// acknowledges every message.
    #[serde(default)]
    pub transport: ShipTransport,
    /// The largest syslog message the server accepts (rsyslog's
    /// `maxMessageSize`, 8 KiB by default); a longer record is shipped with
    /// its longest values cut and marked, its hash kept.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// The message body: the stored record as JSON, or a CEF event.
    #[serde(default)]
    pub format: ShipFormat,
    /// TLS to the syslog server (RFC 5425), its certificate chained to
    /// `ca_file` and matching the address's host.
    #[serde(default)]
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM), for servers that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Whether `id` may name a gateway instance (`[audit] instance`): it
/// travels in SQL literals and syslog messages, so it keeps to a safe
/// alphabet.
pub fn valid_instance(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// `text` (an instance id read from a store, an archive or the anchors'
/// database) as printed to an auditor: as is when it is a valid instance
/// name, quoted and escaped otherwise, so no value can add a line to a
/// report.
pub fn shown_instance(text: &str) -> String {
    if valid_instance(text) {
        text.to_string()
    } else {
        format!("{text:?}")
    }
}

/// How a shipped record is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShipFormat {
    /// The stored record, byte for byte, with `instance` added.
    #[default]
    Json,
    /// ArcSight Common Event Format.
    Cef,
}

/// How shipped messages travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShipTransport {
    /// RFC 6587 octet counting over TCP: the server acknowledges nothing.
    #[default]
    Tcp,
    /// RELP (rsyslog's `imrelp`): a message counts as delivered once the
    /// server acknowledges it.
    Relp,
}

/// The smallest `max_message_bytes` (room for every field but the long ones).
pub const MIN_MESSAGE_BYTES: usize = 2048;
/// The largest: RELP's frame limit is 9 digits, rsyslog's far lower.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// `[audit] max_value_bytes` by default: 1 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1 << 20;

fn default_max_message_bytes() -> usize {
    8192
}

fn default_lag_warning() -> u64 {
    10_000
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            store: PathBuf::from("pgwarden-audit"),
            durability: Durability::Group,
            flush_interval_ms: 5,
            on_failure: OnFailure::Deny,
            log_parameters: false,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            instance: None,
            ship: None,
            archive_dir: None,
            signing_key: None,
            archive_after_days: 90.0,
            archive_interval_s: 3600,
            checkpoint_database: None,
            checkpoint_interval_s: 60,
        }
    }
}
