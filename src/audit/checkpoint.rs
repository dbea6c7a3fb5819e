//! Checkpoints in the shipped stream: every `checkpoint_interval_s` the
//! shipper sends, after the records, one more message naming the chain's
//! head so far (instance, seq, hash of that record, its ts), signed with the
//! gateway's Ed25519 key when `[audit] signing_key` is set. A copy of the
//! stream anywhere (a SIEM's export) can then be checked against a store
//! with `pgwarden audit verify --checkpoints FILE --public-key KEY`, and
//! nobody who edits that copy can make a checkpoint the key did not sign.
//!
//! Invariants:
//! - the signature covers [`signed_bytes`]: a fixed label, the instance,
//!   the seq, the hash and the ts, one per line, so no field can pass for
//!   another;
//! - verification with a public key accepts no unsigned or wrongly signed
//!   checkpoint, and two different checkpoints for one seq are an error.

use std::collections::BTreeMap;
use std::path::Path;

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use super::heads::Compared;
use super::reader::StoreReader;

/// What a checkpoint says, and who signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub instance: String,
    pub checkpoint: Head,
    /// The signer's public key (hex), when signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Ed25519 over [`signed_bytes`] (hex), when signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// The chain's head at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
    pub ts: String,
}

/// The bytes a checkpoint's signature covers.
pub fn signed_bytes(instance: &str, head: &Head) -> Vec<u8> {
    format!(
        "pgwarden-checkpoint-v1\n{instance}\n{}\n{}\n{}",
        head.seq, head.hash, head.ts
    )
    .into_bytes()
}

/// The gateway's signing key (`[audit] signing_key`, a PKCS#8 PEM Ed25519
/// key as `openssl genpkey -algorithm ed25519` writes it).
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl Signer {
    pub fn load(path: &Path) -> Result<Signer, String> {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(path)
            .map_err(|e| format!("[audit] signing_key {}: {e}", path.display()))?;
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der()).map_err(|e| {
                format!(
                    "[audit] signing_key {}: not an Ed25519 key ({e})",
                    path.display()
                )
            })?;
        Ok(Signer { pair })
    }

    /// The public key, hex: what `verify --public-key` takes.
    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// The checkpoint of `head`, signed.
    pub fn sign(&self, instance: &str, head: Head) -> Checkpoint {
        let signature = self.pair.sign(&signed_bytes(instance, &head));
        Checkpoint {
            instance: instance.to_string(),
            checkpoint: head,
            key: Some(self.public_hex()),
            signature: Some(hex::encode(signature.as_ref())),
        }
    }
}

impl Checkpoint {
    /// Whether `key` (32 bytes) signed this checkpoint.
    pub fn signed_by(&self, key: &[u8]) -> bool {
        let Some(sig) = self.signature.as_deref().and_then(|s| hex::decode(s).ok()) else {
            return false;
        };
        signature::UnparsedPublicKey::new(&signature::ED25519, key)
            .verify(&signed_bytes(&self.instance, &self.checkpoint), &sig)
            .is_ok()
    }

    /// Reads a checkpoint from a line of a copy of the shipped stream: its
    /// JSON body (anywhere in the line), or its CEF event.
    pub fn from_line(line: &str) -> Option<Checkpoint> {
        // The message body alone (rsyslog's %msg%), or a whole syslog
        // message of pgwarden's with MSGID `checkpoint`: never a checkpoint
        // quoted inside another line (a statement, another program's log).
        let body = match line.find(" pgwarden - checkpoint - ") {
            Some(at) if line.starts_with('<') => &line[at + " pgwarden - checkpoint - ".len()..],
            _ => line,
        }
        .trim_end();
        if body.starts_with("{\"instance\":") {
            return serde_json::from_str(body).ok();
        }
        let cef = body
            .strip_prefix("CEF:0|pgwarden|pgwarden|")
            .map(|_| body)?;
        let header: Vec<&str> = cef.splitn(8, '|').collect();
        if header.len() != 8 || header[4] != "checkpoint" {
            return None;
        }
        let ext = header[7];
        let fields: BTreeMap<&str, &str> = ext
            .split(' ')
            .filter_map(|pair| pair.split_once('='))
            .collect();
        let labelled = |label: &str| {
            let key = fields.iter().find(|(_, v)| **v == label)?.0;
            fields
                .get(key.strip_suffix("Label")?)
                .map(|v| v.to_string())
        };
        Some(Checkpoint {
            instance: fields.get("deviceExternalId")?.to_string(),
            checkpoint: Head {
                seq: fields.get("externalId")?.parse().ok()?,
                hash: labelled("hash")?,
                ts: labelled("ts")?,
            },
            key: labelled("key"),
            signature: labelled("signature"),
        })
    }
}

/// A public key given on the command line: 64 hex digits, or a PEM file
/// (`openssl pkey -pubout`).
pub fn public_key(arg: &str) -> Result<Vec<u8>, String> {
    if let Ok(raw) = hex::decode(arg.trim()) {
        if raw.len() == 32 {
            return Ok(raw);
        }
    }
    use rustls::pki_types::pem::PemObject;
    let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from_pem_file(arg).map_err(|e| {
        format!("--public-key {arg}: neither 64 hex digits nor a PEM public key ({e})")
    })?;
    // An Ed25519 SubjectPublicKeyInfo: a fixed 12-byte prefix, the key.
    const PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    match spki.as_ref().strip_prefix(&PREFIX[..]) {
        Some(key) if key.len() == 32 => Ok(key.to_vec()),
        _ => Err(format!("--public-key {arg}: not an Ed25519 public key")),
    }
}

/// Compares `reader`'s records with the checkpoints of `instance` in the
/// file at `path` (a copy of the shipped stream), each signed by `key`
/// when one is given: `Ok(Ok(report))`, `Ok(Err(why))` naming the first
/// that does not hold, `Err` when the file cannot be read.
pub fn check_file(
    reader: &StoreReader,
    path: &Path,
    instance: &str,
    key: Option<&[u8]>,
    skip_archived: bool,
) -> Result<Result<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut heads: BTreeMap<u64, Checkpoint> = BTreeMap::new();
    for checkpoint in text.lines().filter_map(Checkpoint::from_line) {
        if checkpoint.instance != instance {
            continue;
        }
        let seq = checkpoint.checkpoint.seq;
        if key.is_some_and(|key| !checkpoint.signed_by(key)) {
            return Ok(Err(format!(
                "the checkpoint at seq {seq} is not signed by the given public key: it was not made by the gateway holding the signing key"
            )));
        }
        match heads.get(&seq) {
            Some(seen) if seen.checkpoint != checkpoint.checkpoint => {
                return Ok(Err(format!("two different checkpoints name seq {seq}")))
            }
            Some(_) => {}
            None => {
                heads.insert(seq, checkpoint);
            }
        }
    }
    let Some(&latest) = heads.keys().next_back() else {
        return Ok(Err(format!(
            "no checkpoints of instance {instance} in {}",
            path.display()
        )));
    };
    let heads: Vec<&Checkpoint> = heads.values().collect();
    let compared = super::heads::compare(
        reader,
        &heads,
        |c| c.checkpoint.seq,
        |c| c.checkpoint.hash.as_str(),
        skip_archived,
    )?;
    let checked = match compared {
        Compared::Archived {
            archived,
            first,
            others,
        } => {
            return Ok(Err(super::heads::archived_message(
                instance, archived, first, others,
            )))
        }
        Compared::CutOff { head, last, .. } => {
            return Ok(Err(format!(
                "seq {} has a checkpoint but the store ends at seq {last}: records were cut off",
                head.checkpoint.seq
            )))
        }
        Compared::Differs { head, stored } => {
            return Ok(Err(format!(
                "seq {} differs from its checkpoint (hash {}, stored {}): the store was rewritten",
                head.checkpoint.seq, head.checkpoint.hash, stored.hash
            )))
        }
        Compared::Match { checked, .. } => checked,
    };
    let signed = match key {
        Some(key) => format!("each signed by {}", hex::encode(key)),
        None => "unsigned checks: give --public-key to check their signatures".into(),
    };
    Ok(Ok(format!(
        "checkpoints match: {checked} of instance {instance} in {}, the latest at seq {latest} ({signed}){}\n",
        path.display(),
        if checked < heads.len() {
            format!("; {} name archived records not given", heads.len() - checked)
        } else {
            String::new()
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Signer {
            pair: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
        }
    }

    fn head(seq: u64) -> Head {
        Head {
            seq,
            hash: "ab".repeat(32),
            ts: "2026-12-01T00:00:00.000001Z".into(),
        }
    }

    #[test]
    fn a_signed_checkpoint_reads_back_from_json_and_cef_and_verifies() {
        let signer = signer();
        let key = hex::decode(signer.public_hex()).unwrap();
        let checkpoint = signer.sign("gw-1", head(42));
        assert!(checkpoint.signed_by(&key));
        let json = serde_json::to_string(&checkpoint).unwrap();
        assert_eq!(Checkpoint::from_line(&json), Some(checkpoint.clone()));
        let syslog = format!("<110>1 2026-12-01T00:00:00Z host pgwarden - checkpoint - {json}");
        assert_eq!(Checkpoint::from_line(&syslog), Some(checkpoint.clone()));
        // Quoted inside something else, it is not a checkpoint.
        for quoted in [
            format!("<14>1 2026 host postgres 12 - - LOG: statement: {json}"),
            format!("x {json}"),
            format!(
                "LOG: statement: {}",
                super::super::cef::checkpoint_event(&checkpoint)
            ),
        ] {
            assert_eq!(Checkpoint::from_line(&quoted), None, "{quoted}");
        }
        let cef = super::super::cef::checkpoint_event(&checkpoint);
        assert_eq!(
            Checkpoint::from_line(&cef),
            Some(checkpoint.clone()),
            "{cef}"
        );
        // Another key, another field, no signature: refused.
        assert!(!checkpoint.signed_by(&hex::decode(signer_hex()).unwrap()));
        for changed in [
            Checkpoint {
                instance: "gw-2".into(),
                ..checkpoint.clone()
            },
            Checkpoint {
                checkpoint: head(43),
                ..checkpoint.clone()
            },
            Checkpoint {
                signature: None,
                ..checkpoint.clone()
            },
        ] {
            assert!(!changed.signed_by(&key), "{changed:?}");
        }
    }

    fn signer_hex() -> String {
        signer().public_hex()
    }

    #[test]
    fn other_lines_are_not_checkpoints() {
        for line in [
            "",
            "{\"instance\":\"gw\",\"seq\":1,\"kind\":\"query\"}",
            "CEF:0|pgwarden|pgwarden|1|query|x|3|",
        ] {
            assert_eq!(Checkpoint::from_line(line), None, "{line}");
        }
    }
}
