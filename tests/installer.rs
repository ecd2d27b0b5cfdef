//! The agent installer a relay serves at `/install`, as a Docker host's operator runs
//! it: fetched with curl pinned to the relay's key, checked with `sh -n` and
//! shellcheck, its `--print-only` plan against what a full install into a scratch root
//! lays down, and a token that is not an agent token refused before anything is written;
//! without a token, the device login it runs, approved or denied by the relay's admin.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;
use support::agent::agent_bin;
use support::netns::Netns;
use support::process::{output_with_stdin, run_ok, ChildGuard, TempDir};
use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::wg::KeyPair;
use support::{require_tools, wait_until};

const TOOLS: &[&str] = &["sh", "shellcheck", "sha256sum", "setpriv", "ip"];

/// `/install` fetched exactly as the README tells an operator to: `curl -fsSL
/// --pinnedpubkey PIN`, from the relay's own namespace.
fn fetch_installer(relay: &Relay) -> String {
    let mut cmd = relay.ns().program("curl");
    cmd.args(["-fsSL", "-k", "--max-time", "20", "--pinnedpubkey"])
        .arg(&relay.creds.pin)
        .arg(relay.url("/install"));
    run_ok(cmd)
}

/// Runs the installer script from stdin in `ns` with `args`, as `nobody` when
/// `unprivileged`, with `env` set; whatever its exit status.
fn run_installer(
    ns: &Netns,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
    unprivileged: bool,
) -> Output {
    let mut cmd = if unprivileged {
        let mut c = ns.program("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh"]);
        c
    } else {
        ns.program("sh")
    };
    cmd.args(["-s", "--"]).args(args);
    cmd.env_remove("SIDECAR_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_with_stdin(cmd, script)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Every entry under `root`: relative path to (mode, contents of files).
fn tree(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.insert(format!("{rel}/"), (mode, Vec::new()));
                walk(root, &path, out);
            } else {
                out.insert(rel, (mode, std::fs::read(&path).expect("read file")));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The `--print-only` plan: `(kind, mode, path)` for `dir` and `file` lines, and the
/// units it would enable.
struct Plan {
    entries: Vec<(String, u32, String)>,
    enables: Vec<String>,
}

fn parse_plan(stdout: &str) -> Plan {
    let mut plan = Plan {
        entries: Vec::new(),
        enables: Vec::new(),
    };
    for line in stdout.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [kind @ ("dir" | "file"), mode, path] => plan.entries.push((
                (*kind).to_owned(),
                u32::from_str_radix(mode, 8).unwrap_or_else(|_| panic!("bad mode in {line:?}")),
                (*path).to_owned(),
            )),
            ["enable", unit] => plan.enables.push((*unit).to_owned()),
            ["start", _] => {}
            _ => panic!("unexpected --print-only line {line:?} in:\n{stdout}"),
        }
    }
    plan
}

fn sha256_of(path: &Path) -> String {
    let out = run_ok({
        let mut c = Command::new("sha256sum");
        c.arg(path);
        c
    });
    out.split_whitespace().next().expect("a digest").to_owned()
}

fn script_value(script: &str, name: &str) -> String {
    let prefix = format!("{name}='");
    script
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.strip_suffix('\''))
        .unwrap_or_else(|| panic!("the installer sets no {name}"))
        .to_owned()
}

#[test]
fn installer_from_the_relay() {
    require_tools(RELAY_TOOLS);
    require_tools(TOOLS);
    // The relay serves the agent next to its own executable: build it first.
    let agent = agent_bin();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let ns = relay.ns();

    // Fetched pinned, it names this relay and the agent it serves.
    let script = fetch_installer(&relay);
    assert!(
        script.starts_with("#!/bin/sh\n"),
        "not a sh script:\n{script}"
    );
    assert_eq!(script_value(&script, "RELAY_URL"), relay.url(""));
    assert_eq!(script_value(&script, "RELAY_PIN"), relay.creds.pin);
    assert_eq!(script_value(&script, "AGENT_SHA256"), sha256_of(&agent));
    let dir = TempDir::new();
    let saved = dir.join("install.sh");
    std::fs::write(&saved, &script).expect("save the script");
    run_ok({
        let mut c = Command::new("sh");
        c.arg("-n").arg(&saved);
        c
    });
    run_ok({
        let mut c = Command::new("shellcheck");
        c.args(["-s", "sh"]).arg(&saved);
        c
    });

    // --print-only, without root and without a token, changes nothing: not the
    // scratch root, and none of the host paths it lists.
    let root = dir.join("root");
    std::fs::create_dir(&root).expect("scratch root");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "docker-host\n").unwrap();
    let before = tree(&root);
    let root_arg = root.display().to_string();
    let out = run_installer(
        ns,
        &script,
        &["--print-only", "--root", &root_arg],
        &[],
        true,
    );
    assert!(
        out.status.success(),
        "--print-only --root failed: {}",
        text(&out.stderr)
    );
    assert_eq!(tree(&root), before, "--print-only changed the scratch root");
    let scratch_plan = parse_plan(&text(&out.stdout));
    assert!(
        scratch_plan.enables.is_empty(),
        "a scratch-root install enables nothing"
    );

    let host = run_installer(ns, &script, &["--print-only"], &[], true);
    assert!(
        host.status.success(),
        "--print-only failed: {}",
        text(&host.stderr)
    );
    let host_plan = parse_plan(&text(&host.stdout));
    assert_eq!(host_plan.enables, ["sidecar-agent.service"]);
    let files: Vec<&str> = host_plan
        .entries
        .iter()
        .filter(|(kind, ..)| kind == "file")
        .map(|(_, _, path)| path.as_str())
        .collect();
    assert_eq!(
        files,
        [
            "/etc/sidecar/agent.token",
            "/etc/sidecar/agent.env",
            "/usr/local/bin/sidecar-agent",
            "/etc/systemd/system/sidecar-agent.service"
        ]
    );
    // The same plan, moved under the scratch root.
    let moved: Vec<(String, u32, String)> = host_plan
        .entries
        .iter()
        .map(|(k, m, p)| (k.clone(), *m, format!("{root_arg}{p}")))
        .collect();
    assert_eq!(scratch_plan.entries, moved);

    // A token without the sct_live_ prefix is refused with nothing written.
    for bad in ["sct_test_abc", "ghp_0123456789", "sct_live"] {
        let out = run_installer(
            ns,
            &script,
            &["--root", &root_arg],
            &[("SIDECAR_TOKEN", bad)],
            false,
        );
        assert!(!out.status.success(), "token {bad:?} was accepted");
        assert!(
            text(&out.stderr).contains("sct_live_"),
            "the refusal of {bad:?} does not name the prefix: {}",
            text(&out.stderr)
        );
        assert_eq!(
            tree(&root),
            before,
            "a refused token {bad:?} left files behind"
        );
    }

    // On the host itself the preflight comes first: a valid token but no root is
    // refused, naming the check, with none of the planned host paths created.
    let token = &relay.creds.default_token;
    let out = run_installer(ns, &script, &[], &[("SIDECAR_TOKEN", token)], true);
    assert!(!out.status.success(), "installed on the host without root");
    assert!(
        text(&out.stderr).contains("run as root"),
        "the refusal without root does not say so: {}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("downloading"),
        "the installer went past its preflight without root: {}",
        text(&out.stderr)
    );

    // A full install into the scratch root lays down exactly the plan.
    let out = run_installer(
        ns,
        &script,
        &["--root", &root_arg],
        &[("SIDECAR_TOKEN", token)],
        false,
    );
    assert!(
        out.status.success(),
        "install into the scratch root failed: {}",
        text(&out.stderr)
    );
    let after = tree(&root);
    // What must be there: what was, the plan's entries with their modes, and the
    // parents `mkdir -p` makes on the way (0755).
    let mut expected: BTreeMap<String, u32> = before
        .iter()
        .map(|(path, (mode, _))| (path.clone(), *mode))
        .collect();
    for (kind, mode, path) in &scratch_plan.entries {
        let rel = path
            .strip_prefix(&format!("{root_arg}/"))
            .unwrap_or_else(|| panic!("{path} is outside the scratch root"));
        let key = if kind == "dir" {
            format!("{rel}/")
        } else {
            rel.to_owned()
        };
        expected.insert(key, *mode);
        let mut parent = Path::new(rel).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            expected.entry(format!("{}/", p.display())).or_insert(0o755);
            parent = p.parent();
        }
    }
    let got: BTreeMap<String, u32> = after.iter().map(|(p, (m, _))| (p.clone(), *m)).collect();
    let show = |m: &BTreeMap<String, u32>| {
        m.iter()
            .map(|(p, mode)| format!("{mode:04o} {p}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        show(&got),
        show(&expected),
        "the install laid down other paths or modes than --print-only listed"
    );
    let bin = root.join("usr/local/bin/sidecar-agent");
    assert_eq!(
        sha256_of(&bin),
        sha256_of(&agent),
        "the installed agent is not the relay's"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/sidecar/agent.token")).unwrap(),
        format!("{token}\n")
    );
    let env = std::fs::read_to_string(root.join("etc/sidecar/agent.env")).unwrap();
    assert!(
        env.contains(&format!("SIDECAR_RELAY={}\n", relay.url(""))),
        "{env}"
    );
    assert!(
        env.contains(&format!("SIDECAR_PIN={}\n", relay.creds.pin)),
        "{env}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/systemd/system/sidecar-agent.service")).unwrap(),
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sidecar-agent.service")
        )
        .unwrap()
    );
    // The installed agent runs.
    let version = run_ok({
        let mut c = Command::new(&bin);
        c.arg("--version");
        c
    });
    assert!(version.starts_with("sidecar-agent "), "{version}");
}

/// The installer saved at `script`, fed to `sh -s` on its stdin as `curl | sh` does,
/// run as root in the relay's namespace into the scratch root `root` without
/// SIDECAR_TOKEN, as a process the test watches.
fn start_tokenless_install(relay: &Relay, script: &Path, root: &Path) -> ChildGuard {
    let mut cmd = relay.ns().program("sh");
    cmd.args(["-c", r#"exec sh -s -- --root "$1" <"$2""#, "install"])
        .arg(root)
        .arg(script);
    cmd.env_remove("SIDECAR_TOKEN")
        .env_remove("SIDECAR_TOKEN_FILE");
    ChildGuard::spawn("install.sh (device login)", cmd)
}

/// The user code the installer's device login printed, once it has.
fn printed_code(install: &mut ChildGuard) -> String {
    let mut code = None;
    wait_until(Duration::from_secs(60), || {
        code = install
            .stdout()
            .lines()
            .find_map(|l| l.strip_prefix("user code: "))
            .map(|c| c.trim().to_owned());
        code.is_some() || !install.is_running()
    });
    code.unwrap_or_else(|| {
        panic!(
            "the installer printed no user code:\n{}\n{}",
            install.stdout(),
            install.stderr_tail(20)
        )
    })
}

#[test]
fn installer_without_a_token_runs_the_device_login() {
    require_tools(RELAY_TOOLS);
    require_tools(TOOLS);
    let agent = agent_bin();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let admin = &relay.creds.admin_token;
    let dir = TempDir::new();
    let script = dir.join("install.sh");
    std::fs::write(&script, fetch_installer(&relay)).expect("save the script");

    // Approved: the token the relay issues is installed 0600, and it works.
    let root = dir.join("approved");
    std::fs::create_dir(&root).expect("scratch root");
    let mut install = start_tokenless_install(&relay, &script, &root);
    let code = printed_code(&mut install);
    assert!(
        install
            .stdout()
            .contains(&relay.url(&format!("/device?code={code}"))),
        "the installer shows where to approve the login:\n{}",
        install.stdout()
    );
    assert!(
        !root.join("etc/sidecar/agent.token").exists(),
        "a token was installed before the approval"
    );
    assert!(
        !root.join("usr/local/bin/sidecar-agent").exists(),
        "the agent was installed before the login was approved"
    );
    // Unbound, so that the check below (curl, no machine fingerprint) can register.
    let approved = relay.call(
        relay.ns(),
        "POST",
        &format!("/v1/admin/device/{code}/approve"),
        admin,
        Some(&json!({"name": "installed-host", "bind_machine": false})),
    );
    assert_eq!(approved.status, 200, "{approved:?}");
    let status = install.wait_timeout(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "the installer did not finish after the approval ({status:?}):\n{}\n{}",
        install.stdout(),
        install.stderr_tail(20)
    );
    let token_file = root.join("etc/sidecar/agent.token");
    let meta = std::fs::metadata(&token_file).expect("the token file exists");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let token = std::fs::read_to_string(&token_file).expect("read the token");
    assert!(token.ends_with('\n'), "{token:?}");
    let token = token.trim();
    assert!(token.starts_with("sct_live_"), "{token:?}");
    assert!(
        !root.join("etc/sidecar/agent.token.login").exists(),
        "the login's temporary token file was left behind"
    );
    assert_eq!(
        sha256_of(&root.join("usr/local/bin/sidecar-agent")),
        sha256_of(&agent),
        "the installed agent is not the relay's"
    );
    let r = relay.register(&topo.router, token, &KeyPair::generate().public, false);
    assert_eq!(r.status, 201, "the installed token registers a peer: {r:?}");

    // Denied: the installer stops with the reason and installs neither agent nor token.
    let root = dir.join("denied");
    std::fs::create_dir(&root).expect("scratch root");
    let mut install = start_tokenless_install(&relay, &script, &root);
    let code = printed_code(&mut install);
    let denied = relay.call(
        relay.ns(),
        "POST",
        &format!("/v1/admin/device/{code}/deny"),
        admin,
        None,
    );
    assert_eq!(denied.status, 200, "{denied:?}");
    let status = install.wait_timeout(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a denied login must stop the installer ({status:?}):\n{}",
        install.stderr_tail(20)
    );
    let stderr = install.stderr();
    assert!(
        stderr.contains("denied") && stderr.contains("the device login did not issue a token"),
        "the installer says why it stopped:\n{stderr}"
    );
    let left: Vec<String> = tree(&root)
        .into_keys()
        .filter(|p| !p.ends_with('/'))
        .collect();
    assert!(
        left.is_empty(),
        "a denied login left files behind: {left:?}"
    );
}
