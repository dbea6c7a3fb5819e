//! Several chains at once: the stores (and archives) of several gateways,
//! read by `audit export|verify|stats` together.
//!
//! Invariants:
//! - each instance is its own chain: a store with the archives naming its
//!   instance (with one store, every archive given), and archives of an
//!   instance without a store read by themselves. Two stores of one
//!   instance are refused (one of them is a copy);
//! - a merged export holds every line of every chain exactly once, each
//!   with its `instance`, in `ts` order, then (`instance`, `seq`): a
//!   streaming merge of the chains, each read in its own order (seq order,
//!   whose `ts` is nearly ordered; see the README).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;

use super::archive::Archive;
use super::export::{each_line, ExportOptions, ExportSummary, Sink};
use super::join::Line;
use super::reader::StoreReader;
use super::AuditError;

/// One instance's chain.
pub struct Source {
    pub instance: Option<String>,
    pub reader: StoreReader,
    /// What names it where it has no instance id: its store's path.
    label: String,
}

impl Source {
    /// How the chain is named in reports and merged exports: its instance,
    /// or (a store from before instance ids) its path.
    pub fn name(&self) -> &str {
        self.instance.as_deref().unwrap_or(&self.label)
    }

    /// [`Source::name`] as printed in a report: quoted and escaped unless
    /// it is a plain instance name (it comes from a store or an archive,
    /// where anyone who could write them put it).
    pub fn shown(&self) -> String {
        crate::config::shown_instance(self.name())
    }
}

/// The chains of `stores` and `archives`.
pub fn open(stores: &[PathBuf], archives: &[PathBuf]) -> Result<Vec<Source>, AuditError> {
    let mut left: Vec<Archive> = archives
        .iter()
        .map(|p| Archive::open(p))
        .collect::<Result<_, _>>()?;
    let mut sources: Vec<Source> = Vec::new();
    for (i, path) in stores.iter().enumerate() {
        let same = |other: &PathBuf| match (path.canonicalize(), other.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => path == other,
        };
        if stores[..i].iter().any(same) {
            return Err(AuditError::Read(format!(
                "{} is given twice",
                path.display()
            )));
        }
        let reader = StoreReader::open(path)?;
        let instance = reader.instance()?;
        if sources
            .iter()
            .any(|s| s.instance.is_some() && s.instance == instance)
        {
            return Err(AuditError::Read(format!(
                "{} is a second store of instance {}",
                path.display(),
                instance.as_deref().unwrap_or_default()
            )));
        }
        let mine = if stores.len() == 1 {
            std::mem::take(&mut left)
        } else {
            let (mine, rest) = left
                .into_iter()
                .partition(|a| a.manifest.instance == instance);
            left = rest;
            mine
        };
        sources.push(Source {
            instance,
            reader: reader.with_opened(mine)?,
            label: path.display().to_string(),
        });
    }
    let mut by_instance: BTreeMap<Option<String>, Vec<Archive>> = BTreeMap::new();
    for archive in left {
        by_instance
            .entry(archive.manifest.instance.clone())
            .or_default()
            .push(archive);
    }
    for (instance, archives) in by_instance {
        let label = archives
            .first()
            .map_or(String::new(), |a| a.path.display().to_string());
        sources.push(Source {
            instance,
            reader: StoreReader::none().with_opened(archives)?,
            label,
        });
    }
    Ok(sources)
}

/// What a chain's reader sends: a line, or why it stopped.
type Sent = Result<Line, AuditError>;

/// Streams every chain's lines to `out`, merged (see the module's
/// invariants), each with its instance.
pub fn export_merged<W: Write>(
    sources: &[Source],
    options: &ExportOptions,
    out: W,
) -> Result<ExportSummary, AuditError> {
    let mut sink = Sink::new(options.format, out, true, options.width)?;
    let mut summary = ExportSummary::default();
    std::thread::scope(|scope| {
        let mut readers = Vec::new();
        for source in sources {
            let (tx, rx) = mpsc::sync_channel::<Sent>(1024);
            let reader = scope.spawn(move || {
                let sent = each_line(&source.reader, options, |line| {
                    // The merge stopped (an output error): stop too.
                    tx.send(Ok(line)).map_err(|_| AuditError::Closed)
                });
                if let Err(e) = &sent {
                    if !matches!(e, AuditError::Closed) {
                        let _ = tx.send(Err(AuditError::Read(e.to_string())));
                    }
                }
                sent.unwrap_or(0)
            });
            readers.push((rx, reader));
        }
        let mut heads: Vec<Option<Line>> = Vec::with_capacity(readers.len());
        for (rx, _) in &readers {
            heads.push(rx.recv().ok().transpose()?);
        }
        loop {
            let next = heads
                .iter()
                .enumerate()
                .filter_map(|(i, head)| head.as_ref().map(|line| (i, line)))
                .min_by(|(i, a), (j, b)| {
                    let (a, b) = (a.record(), b.record());
                    (&a.ts, sources[*i].name(), a.seq).cmp(&(&b.ts, sources[*j].name(), b.seq))
                })
                .map(|(i, _)| i);
            let Some(i) = next else {
                break;
            };
            let line = heads[i].take().expect("the chosen head");
            sink.write(line.record(), line.raw(), Some(sources[i].name()))?;
            summary.lines += 1;
            heads[i] = readers[i].0.recv().ok().transpose()?;
        }
        drop(heads);
        for (rx, reader) in readers {
            drop(rx);
            summary.records += reader.join().unwrap_or(0);
        }
        Ok::<(), AuditError>(())
    })?;
    sink.finish()?;
    Ok(summary)
}
