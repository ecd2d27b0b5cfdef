//! How `sidecar-agent run` treats its token before it talks to anyone: a token file
//! others can read is refused with the fix named, a token on the command line works
//! but is warned about, and a token file is read without either.
//!
//! Docker is pointed at a socket that does not exist, so each run ends right after
//! its start-up checks, with no daemon or relay needed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PIN: &str = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const TOKEN: &str = "sct_live_0123456789abcdef";

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sidecar-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(dir: &Path, token_args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sidecar-agent"))
        .args(["run", "--relay", "https://127.0.0.1:9", "--pin", PIN])
        .args(token_args)
        .arg("--docker")
        .arg(dir.join("no-docker.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--health-listen", "off"])
        .env_remove("SIDECAR_TOKEN")
        .env_remove("SIDECAR_TOKEN_FILE")
        .env("RUST_LOG", "info")
        .output()
        .expect("run sidecar-agent")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_token_file_others_can_read_is_refused_with_the_fix() {
    let dir = Scratch::new("open");
    let file = dir.0.join("agent.token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&dir.0, &["--token-file", file.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(&file.display().to_string()) && err.contains("chmod 600"),
        "the refusal names the file and the fix: {err}"
    );
    assert!(!err.contains(TOKEN), "the token is never printed: {err}");
}

#[test]
fn a_private_token_file_is_used_without_a_warning() {
    let dir = Scratch::new("private");
    let file = dir.0.join("agent.token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(&dir.0, &["--token-file", file.to_str().unwrap()]);
    let err = stderr(&out);
    // It got past the token to Docker, which is not there.
    assert!(err.contains("Docker"), "{err}");
    assert!(!err.contains("visible to every user"), "{err}");
}

#[test]
fn a_token_on_the_command_line_works_with_a_warning() {
    let dir = Scratch::new("argv");
    let out = run(&dir.0, &["--token", TOKEN]);
    let err = stderr(&out);
    assert!(err.contains("visible to every user"), "{err}");
    assert!(err.contains("Docker"), "it carried on to Docker: {err}");
}

#[test]
fn a_key_file_others_can_read_is_refused_at_start() {
    let dir = Scratch::new("key");
    let keys = dir.0.join("state").join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("abc123.key");
    std::fs::write(&key, "x\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&dir.0, &["--token", TOKEN]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("abc123.key") && err.contains("chmod 600"),
        "{err}"
    );
}
