//! The agent installer a relay serves at `/install`, as a Docker host's operator runs
//! it: fetched with curl pinned to the relay's key, checked with `sh -n` and
//! shellcheck, its `--print-only` plan against what a full install into a scratch root
//! lays down, and a token that is not an agent token refused before anything is written.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use support::agent::agent_bin;
use support::netns::Netns;
use support::process::{output_with_stdin, run_ok, TempDir};
use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::require_tools;

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
