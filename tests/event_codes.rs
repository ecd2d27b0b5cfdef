//! `sidecar-agent --log-format codes` as an operator reads it: events logged as stable
//! codes with their fields, the same events as plain messages without the option, and
//! `sidecar-agent explain CODE` for every code the log showed.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use support::agent::agent_bin;
use support::process::{output, TempDir};

/// A pin no relay has; the agent never reaches a relay here (it stops at Docker).
const PIN: &str = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const ARGV_TOKEN_WARNING: &str = "--token on the command line is visible to every user";

/// Runs `sidecar-agent [extra] run` with the token on its command line and a Docker
/// socket that does not exist, so it logs its start-up events and exits; its stderr.
fn run_agent(extra: &[&str]) -> String {
    let dir = TempDir::new();
    let state = dir.join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = Command::new(agent_bin());
    cmd.env_remove("SIDECAR_LOG_FORMAT")
        .env_remove("SIDECAR_TOKEN")
        .env_remove("SIDECAR_TOKEN_FILE")
        .env_remove("RUST_LOG")
        .args(extra)
        .args(["run", "--relay", "https://[2001:db8::1]:8443", "--pin", PIN])
        .args(["--token", "sct_live_eventcodes", "--health-listen", "off"])
        .arg("--docker")
        .arg(dir.join("no-docker.sock"))
        .arg("--state-dir")
        .arg(&state);
    let out = output(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the agent ran without a Docker daemon:\n{stderr}"
    );
    assert!(
        stderr.contains("cannot connect to Docker"),
        "the agent did not stop at Docker:\n{stderr}"
    );
    stderr
}

/// The `LEVEL CODE` pairs of the coded lines (`TIME LEVEL SCnnnn field=value ...`).
fn coded(stderr: &str) -> Vec<(String, String)> {
    stderr
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (_time, level, code) = (words.next()?, words.next()?, words.next()?);
            code.starts_with("SC")
                .then(|| (level.to_owned(), code.to_owned()))
        })
        .collect()
}

#[test]
fn codes_replace_messages_and_each_is_explained() {
    let text = run_agent(&[]);
    assert!(
        text.contains(ARGV_TOKEN_WARNING) && text.contains("file descriptor limit"),
        "the default log does not name its events:\n{text}"
    );
    assert!(coded(&text).is_empty(), "codes without the option:\n{text}");

    let codes_log = run_agent(&["--log-format", "codes"]);
    let seen = coded(&codes_log);
    assert!(
        seen.contains(&("INFO".into(), "SC1001".into())),
        "no INFO SC1001 (descriptor limit) in:\n{codes_log}"
    );
    assert!(
        seen.contains(&("WARN".into(), "SC1005".into())),
        "no WARN SC1005 (token in argv) in:\n{codes_log}"
    );
    assert!(
        !codes_log.contains(ARGV_TOKEN_WARNING),
        "the coded log still carries the message:\n{codes_log}"
    );
    // The event's fields stay, after its code.
    let limit = codes_log
        .lines()
        .find(|l| l.contains(" SC1001 "))
        .expect("the SC1001 line");
    for field in ["before=", "after=", "per_container="] {
        assert!(limit.contains(field), "SC1001 lacks {field}: {limit}");
    }

    for (_, code) in &seen {
        let out = output(Command::new(agent_bin()).args(["explain", code]));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "explain {code} failed: {out:?}");
        assert!(
            stdout.starts_with(&format!("{code}: ")) && stdout.contains("what to do: "),
            "explain {code} says: {stdout}"
        );
    }
    let lower = output(Command::new(agent_bin()).args(["explain", "sc1005"]));
    assert!(
        String::from_utf8_lossy(&lower.stdout).contains(ARGV_TOKEN_WARNING),
        "explain sc1005 does not quote the message it replaces: {lower:?}"
    );

    let unknown = output(Command::new(agent_bin()).args(["explain", "SC9999"]));
    assert!(!unknown.status.success(), "explain SC9999 succeeded");
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("not a sidecar-agent event code"),
        "explain SC9999 says: {unknown:?}"
    );
}
