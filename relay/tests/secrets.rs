//! The relay refuses to start with a secret other users can read (its WireGuard key,
//! its TLS key, its data directory), naming the file and the `chmod` that fixes it.
//! The refusal comes before anything privileged, so no namespace is needed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn relay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sidecar-relay"))
}

fn init(name: &str) -> (Scratch, PathBuf) {
    let (s, dir, _) = init_printing(name);
    (s, dir)
}

fn init_printing(name: &str) -> (Scratch, PathBuf, String) {
    let root = std::env::temp_dir().join(format!(
        "sidecar-relay-secrets-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir = root.join("relay");
    let out = relay()
        .args(["init", "--dir"])
        .arg(&dir)
        .args(["--ipv6-prefix", "2001:db8:1::/64", "--ipv6-mode", "routed"])
        .args(["--endpoint", "192.0.2.1:51820"])
        .output()
        .unwrap();
    assert!(out.status.success(), "init: {out:?}");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    (Scratch(root), dir, printed)
}

fn run_refused(dir: &Path) -> String {
    let out = relay()
        .args(["run", "--config"])
        .arg(dir.join("relay.toml"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "started with an open secret: {out:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_secrets_private() {
    let (_s, dir, printed) = init_printing("modes");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("wireguard.key")), 0o600);
    assert_eq!(mode(&dir.join("tls.key")), 0o600);
    // The agent command line it prints keeps the token out of argv.
    let line = printed
        .lines()
        .find(|l| l.contains("sidecar-agent run"))
        .unwrap_or_else(|| panic!("no agent command line:\n{printed}"));
    assert!(
        line.contains("--token-file") && !line.contains("sct_live_"),
        "{line}"
    );
}

#[test]
fn a_readable_key_or_data_directory_is_refused_with_the_fix() {
    let (_s, dir) = init("open");
    let key = dir.join("wireguard.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = run_refused(&dir);
    assert!(
        err.contains(&key.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = run_refused(&dir);
    assert!(err.contains("chmod 700"), "{err}");
}
