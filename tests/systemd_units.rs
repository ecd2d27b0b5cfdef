//! The shipped systemd units, as systemd itself reads them: `systemd-analyze verify`
//! accepts both (pointed at the binaries this workspace builds), and
//! `systemd-analyze security` rates each exactly as the README says.

mod support;

use std::path::Path;
use std::process::Command;

use support::agent::agent_bin;
use support::process::{output, TempDir};
use support::relay::relay_bin;

const UNITS: &[(&str, &str)] = &[
    ("sidecar-relay.service", "/usr/local/bin/sidecar-relay"),
    ("sidecar-agent.service", "/usr/local/bin/sidecar-agent"),
];

fn require_systemd_analyze() {
    let found = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing; tests/run.sh installs it (Debian package systemd)"
    );
}

/// A copy of `config/UNIT` in a scratch directory whose ExecStart runs `bin`, the
/// binary this workspace built, so `verify` can check that it exists and is executable.
fn unit_with_binary(dir: &TempDir, unit: &str, installed: &str, bin: &Path) -> String {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(unit);
    let text = std::fs::read_to_string(&source).expect("read the unit");
    assert!(
        text.contains(&format!("ExecStart={installed} ")),
        "{unit} does not start {installed}"
    );
    let path = dir.join(unit);
    std::fs::write(&path, text.replace(installed, &bin.display().to_string()))
        .expect("write the unit copy");
    path.display().to_string()
}

fn bin_for(unit: &str) -> std::path::PathBuf {
    if unit.contains("relay") {
        relay_bin()
    } else {
        agent_bin()
    }
}

#[test]
fn systemd_analyze_verify_accepts_both_units() {
    require_systemd_analyze();
    let dir = TempDir::new();
    for (unit, installed) in UNITS {
        let path = unit_with_binary(&dir, unit, installed, &bin_for(unit));
        let out = output(Command::new("systemd-analyze").args(["verify", &path]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "systemd-analyze verify {unit} failed: {stderr}"
        );
        // verify exits 0 on some warnings about the unit itself; there must be none.
        let own: Vec<&str> = stderr.lines().filter(|l| l.contains(unit)).collect();
        assert!(
            own.is_empty(),
            "systemd-analyze verify warns about {unit}: {own:?}"
        );
    }
}

#[test]
fn units_are_hardened() {
    for (unit, _) in UNITS {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(unit),
        )
        .expect("read the unit");
        for directive in [
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
            "ProtectSystem=strict",
            "StateDirectory=",
            "PrivateTmp=yes",
            "ProtectHome=yes",
            "LimitNOFILE=",
            "RestrictAddressFamilies=",
            "SystemCallArchitectures=native",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(directive)),
                "{unit} lacks {directive}"
            );
        }
    }
}

/// The figure `systemd-analyze security` gives a unit ("Overall exposure level for
/// UNIT: 2.8 OK").
fn exposure(path: &str, unit: &str) -> String {
    let out = output(Command::new("systemd-analyze").args([
        "security",
        "--offline=yes",
        "--no-pager",
        path,
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let marker = format!("Overall exposure level for {unit}: ");
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(&marker).map(|(_, rest)| rest.to_owned()))
        .unwrap_or_else(|| panic!("no exposure level for {unit} in:\n{stdout}"));
    line.split_whitespace()
        .next()
        .expect("a figure after the marker")
        .to_owned()
}

#[test]
fn readme_states_the_measured_exposure() {
    require_systemd_analyze();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let dir = TempDir::new();
    for (unit, installed) in UNITS {
        let path = unit_with_binary(&dir, unit, installed, &bin_for(unit));
        let figure = exposure(&path, unit);
        let claim = format!("`{unit}`: exposure {figure}");
        assert!(
            readme.contains(&claim),
            "README.md should state \"{claim}\" (what systemd-analyze security measures)"
        );
    }
}
