//! The Debian package (`cargo deb`, metadata in Cargo.toml): built from the
//! test binary, unpacked into a throwaway root, its binary runs, its
//! configuration and policy load, its systemd unit passes `systemd-analyze
//! verify`, and its configuration files are conffiles (an upgrade keeps
//! the operator's edits).

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

#[test]
fn the_debian_package_installs_a_working_gateway() {
    let work = tempfile::tempdir().unwrap();
    let deb = work.path().join("pgwarden.deb");
    // The binary the tests run (the dev profile): no second build.
    run(Command::new("cargo")
        .args(["deb", "--profile", "dev", "--no-build", "-o"])
        .arg(&deb)
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    let root = work.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let control = work.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));

    let bin = root.join("usr/bin/pgwarden");
    let version = run(Command::new(&bin).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let checked = run(Command::new(&bin)
        .args(["policy", "check", "-c"])
        .arg(root.join("etc/pgwarden/pgwarden.toml")));
    assert!(checked.contains("1 rule(s) parse"), "{checked}");
    assert!(checked.contains("policy digest"), "{checked}");

    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/pgwarden/pgwarden.toml"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"), "{postinst}");
    for doc in [
        "usr/share/doc/pgwarden/pgwarden.example.toml",
        "usr/share/pgwarden/migrations",
    ] {
        assert!(root.join(doc).exists(), "{doc}");
    }

    // The unit as installed, its ExecStart pointed at the unpacked binary
    // (`verify` checks that the command exists).
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/pgwarden.service")).unwrap();
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/pgwarden",
        "LimitNOFILE=",
    ] {
        assert!(unit.contains(hardening), "{hardening}");
    }
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let local = work.path().join("pgwarden.service");
        std::fs::write(
            &local,
            unit.replace("/usr/bin/pgwarden", bin.to_str().unwrap()),
        )
        .unwrap();
        run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&local));
    }
}
