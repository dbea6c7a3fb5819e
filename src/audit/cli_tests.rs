//! Tests of `pgwarden audit` commands (`cli.rs`).

use super::*;
use crate::audit::store::{key, SledStore};
use crate::audit::testutil::{child_arg, sample_store, spawn_child_in, tamper};
use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    Export(ExportArgs),
    Verify(VerifyArgs),
    Stats(StatsArgs),
}

fn parse(args: &[&str]) -> Result<Command, clap::Error> {
    let argv = std::iter::once("audit").chain(args.iter().copied());
    Cli::try_parse_from(argv).map(|c| c.command)
}

fn store_args(dir: &std::path::Path) -> StoreArgs {
    StoreArgs {
        store: vec![dir.to_path_buf()],
        config: None,
        archives: Vec::new(),
    }
}

fn export_args(dir: &std::path::Path) -> ExportArgs {
    match parse(&["export", "--store", dir.to_str().unwrap()]).unwrap() {
        Command::Export(args) => args,
        other => panic!("{other:?}"),
    }
}

#[test]
fn arguments_parse_as_documented() {
    let cmd = parse(&[
        "export",
        "-c",
        "x.toml",
        "--format",
        "csv",
        "--raw",
        "--since",
        "2026-11-27T00:00:00Z",
        "--until",
        "2026-11-28T00:00:00+01:00",
        "--user",
        "alice",
        "--database",
        "app",
        "--kind",
        "session_start",
        "-o",
        "out.csv",
    ])
    .unwrap();
    let Command::Export(args) = cmd else {
        panic!("not export");
    };
    assert_eq!(args.format, Format::Csv);
    assert!(args.raw);
    assert_eq!(args.kind, Some(Kind::SessionStart));
    assert_eq!(
        args.store.config.as_deref(),
        Some(std::path::Path::new("x.toml"))
    );
    assert!(
        parse(&["verify", "--store", "a", "-c", "b"]).is_err(),
        "mutually exclusive"
    );
    assert!(parse(&["export", "--since", "yesterday"]).is_err());
    assert!(parse(&["export", "--kind", "querry"]).is_err());
    assert!(parse(&["export", "--format", "xml"]).is_err());
    assert!(matches!(parse(&["stats"]).unwrap(), Command::Stats(_)));
}

#[test]
fn verify_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    sample_store(dir.path());
    let args = VerifyArgs {
        store: store_args(dir.path()),
        ..Default::default()
    };
    let mut out = Vec::new();
    assert_eq!(verify_to(&args, &mut out), EXIT_OK);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("audit chain intact: 12 records, chain head "),
        "{text}"
    );
    let mut out = Vec::new();
    assert_eq!(
        stats_to(
            &StatsArgs {
                store: store_args(dir.path())
            },
            &mut out
        ),
        EXIT_OK
    );
    assert!(String::from_utf8(out).unwrap().contains("records     12\n"));
    tamper(dir.path(), |db| {
        db.remove(key(4)).unwrap();
    });
    assert_eq!(verify(&args), EXIT_FAILURE);
    let nowhere = VerifyArgs {
        store: store_args(&dir.path().join("missing")),
        ..Default::default()
    };
    assert_eq!(verify(&nowhere), EXIT_USAGE);
}

#[test]
fn a_locked_store_is_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let _gateway = SledStore::open(dir.path()).unwrap();
    assert_eq!(
        verify(&VerifyArgs {
            store: store_args(dir.path()),
            ..Default::default()
        }),
        EXIT_FAILURE
    );
    assert_eq!(
        stats(&StatsArgs {
            store: store_args(dir.path())
        }),
        EXIT_FAILURE
    );
    assert_eq!(export(&export_args(dir.path())), EXIT_FAILURE);
}

#[test]
fn export_writes_the_output_file_and_rejects_joined_results() {
    let dir = tempfile::tempdir().unwrap();
    sample_store(dir.path());
    let out = dir.path().join("out.jsonl");
    let mut args = export_args(dir.path());
    args.output = Some(out.clone());
    assert_eq!(export(&args), EXIT_OK);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 9);
    args.kind = Some(Kind::Result);
    assert_eq!(export(&args), EXIT_USAGE);
    args.raw = true;
    assert_eq!(export(&args), EXIT_OK);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
    args.output = Some(dir.path().join("no/such/dir/out"));
    assert_eq!(export(&args), EXIT_FAILURE);
}

#[test]
fn config_file_names_the_store() {
    let dir = tempfile::tempdir().unwrap();
    sample_store(&dir.path().join("audit"));
    let toml = dir.path().join("pgwarden.toml");
    std::fs::write(
        &toml,
        "[backend]\nservice_user = \"svc\"\n[audit]\nstore = \"audit\"\n",
    )
    .unwrap();
    let args = StoreArgs {
        store: Vec::new(),
        config: Some(toml.clone()),
        archives: Vec::new(),
    };
    assert_eq!(store_path(&args).unwrap(), dir.path().join("audit"));
    assert_eq!(
        verify_to(
            &VerifyArgs {
                store: args,
                ..Default::default()
            },
            &mut Vec::new()
        ),
        EXIT_OK
    );
    std::fs::write(&toml, "[audit]\nstor = \"audit\"\n").unwrap();
    let bad = StoreArgs {
        store: Vec::new(),
        config: Some(toml),
        archives: Vec::new(),
    };
    assert!(store_path(&bad).is_err());
    assert_eq!(
        verify(&VerifyArgs {
            store: bad,
            ..Default::default()
        }),
        EXIT_USAGE
    );
}

/// Child body: runs `audit verify` with neither `--store` nor `-c` in
/// the working directory the parent chose, and prints the exit code.
#[test]
#[ignore = "runs only as a child process of other tests"]
fn child_cli() {
    if child_arg().is_some() {
        let code = verify_to(&VerifyArgs::default(), &mut Vec::new());
        println!("@@EXIT {code}");
    }
}

fn exit_code_in(cwd: &std::path::Path) -> String {
    let child = spawn_child_in("audit::cli::tests::child_cli", "cli", cwd);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (_, code) = text
        .split_once("@@EXIT ")
        .unwrap_or_else(|| panic!("{text}"));
    code.trim().lines().next().unwrap_or("").to_string()
}

#[test]
fn without_store_or_config_the_working_directory_config_is_used() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(exit_code_in(dir.path()), "2");
    sample_store(&dir.path().join("pgwarden-audit"));
    std::fs::write(
        dir.path().join("pgwarden.toml"),
        "[backend]\nservice_user = \"svc\"\n",
    )
    .unwrap();
    assert_eq!(exit_code_in(dir.path()), "0");
}
