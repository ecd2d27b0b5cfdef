//! Driving the `sidecar-agent` binary: locating or building it, writing its wg-quick style
//! config, starting it inside a namespace and reading its metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

use super::netns::Netns;
use super::process::{self, ChildGuard, TempDir};
use super::wg::{self, Peer, PeerStatus};
use super::{unique_name, wait_until};

/// The agent binary: `$SIDECAR_AGENT_BIN`, else the one in this test executable's
/// profile directory, brought up to date with cargo first (so a stale binary is
/// never measured or tested).
pub fn agent_bin() -> PathBuf {
    workspace_bin("sidecar-agent", "sidecar-agent", "SIDECAR_AGENT_BIN")
}

/// Binary `bin` of workspace package `package`: `$env_var` if set, else the one in this
/// test executable's profile directory, built (or brought up to date) with cargo once per
/// test process.
pub fn workspace_bin(package: &str, bin: &str, env_var: &str) -> PathBuf {
    static BINS: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    // Held across the build so concurrent tests wait for one cargo run, not start several.
    let mut bins = BINS.lock().unwrap_or_else(|e| e.into_inner());
    bins.entry(format!("{package}/{bin}"))
        .or_insert_with(|| locate_or_build(package, bin, env_var))
        .clone()
}

fn locate_or_build(package: &str, bin_name: &str, env_var: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(env_var) {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "{env_var}={bin:?} does not exist");
        return bin;
    }
    // Test and bench executables live in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is in <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let bin = profile_dir.join(bin_name);
    {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", bin_name, "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "{cmd:?} failed: {status}");
    }
    assert!(
        bin.is_file(),
        "{bin:?} is missing after building it; set {env_var} to the binary"
    );
    bin
}

/// The `[Interface]` and `[Peer]` sections of a wg-quick file for `sidecar-agent up`.
#[derive(Clone, Debug, Default)]
pub struct AgentConfig {
    pub private_key: String,
    pub addresses: Vec<String>,
    pub listen_port: Option<u16>,
    pub mtu: Option<u16>,
    pub peers: Vec<Peer>,
    /// `SIDECAR_NOISE` for the agent (the noise backend), when set.
    pub noise_backend: Option<String>,
}

impl AgentConfig {
    pub fn render(&self) -> String {
        let mut s = String::from("[Interface]\n");
        let _ = writeln!(s, "PrivateKey = {}", self.private_key);
        if !self.addresses.is_empty() {
            let _ = writeln!(s, "Address = {}", self.addresses.join(", "));
        }
        if let Some(port) = self.listen_port {
            let _ = writeln!(s, "ListenPort = {port}");
        }
        if let Some(mtu) = self.mtu {
            let _ = writeln!(s, "MTU = {mtu}");
        }
        for peer in &self.peers {
            let _ = writeln!(s, "\n[Peer]\nPublicKey = {}", peer.public_key);
            if let Some(psk) = &peer.preshared_key {
                let _ = writeln!(s, "PresharedKey = {psk}");
            }
            if !peer.allowed_ips.is_empty() {
                let _ = writeln!(s, "AllowedIPs = {}", peer.allowed_ips.join(", "));
            }
            if let Some(endpoint) = &peer.endpoint {
                let _ = writeln!(s, "Endpoint = {endpoint}");
            }
            if let Some(secs) = peer.keepalive {
                let _ = writeln!(s, "PersistentKeepalive = {secs}");
            }
        }
        s
    }
}

/// A running `sidecar-agent up` inside a namespace; stopped with SIGTERM on drop.
pub struct Agent<'ns> {
    ns: &'ns Netns,
    pub iface: String,
    child: ChildGuard,
    // Holds the config file for as long as the agent may re-read it.
    _dir: TempDir,
}

impl<'ns> Agent<'ns> {
    /// Starts the agent and waits until `wg show` answers through its socket.
    pub fn start(ns: &'ns Netns, config: &AgentConfig) -> Self {
        let iface = unique_name("sa");
        let dir = TempDir::new();
        let conf = dir.join(&format!("{iface}.conf"));
        std::fs::write(&conf, config.render()).expect("write agent config");
        let mut cmd = ns.program(agent_bin());
        cmd.args(["up", "--config"])
            .arg(&conf)
            .args(["--interface", &iface]);
        if let Some(backend) = &config.noise_backend {
            cmd.env("SIDECAR_NOISE", backend);
        }
        let mut child = ChildGuard::spawn(&format!("sidecar-agent {iface}"), cmd);

        let socket = wg::uapi_socket(&iface);
        let ready = wait_until(Duration::from_secs(15), || {
            !child.is_running()
                || (socket.exists() && ns.try_exec(&format!("wg show {iface}")).status.success())
        });
        assert!(
            ready && child.is_running(),
            "sidecar-agent {iface} did not become ready (exit: {:?}):\n{}",
            child.try_wait(),
            child.stderr_tail(40)
        );
        Agent {
            ns,
            iface,
            child,
            _dir: dir,
        }
    }

    /// The last `lines` lines of the agent's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.child.stderr_tail(lines)
    }

    /// `wg ARGS` with `{}` in `args` replaced by the interface name.
    pub fn wg(&self, args: &str) -> String {
        self.ns
            .exec(&format!("wg {}", args.replace("{}", &self.iface)))
    }

    pub fn dump(&self) -> Vec<PeerStatus> {
        wg::dump(self.ns, &self.iface)
    }

    pub fn peer(&self, public_key: &str) -> Option<PeerStatus> {
        wg::peer_status(self.ns, &self.iface, public_key)
    }

    /// The output of `sidecar-agent metrics IFACE`.
    pub fn metrics(&self) -> String {
        let mut cmd = self.ns.program(agent_bin());
        cmd.args(["metrics", &self.iface]);
        process::run_ok(cmd)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        self.child.stderr()
    }

    /// Stops the agent the way a service manager does and returns how it exited.
    pub fn stop(&mut self) -> ExitStatus {
        self.child.terminate(Duration::from_secs(5))
    }

    /// Sends `signal` and waits up to `timeout` for the agent to exit by itself.
    pub fn signal_and_wait(
        &mut self,
        signal: libc::c_int,
        timeout: Duration,
    ) -> Option<ExitStatus> {
        self.child.signal(signal);
        self.child.wait_timeout(timeout)
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        self.stop();
        // Only left behind if the agent had to be killed or failed to clean up; the name
        // is ours alone.
        let _ = std::fs::remove_file(wg::uapi_socket(&self.iface));
    }
}

/// Value of the Prometheus sample `name` whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, rest) = match line.find('{') {
                Some(open) => {
                    let close = line.rfind('}')?;
                    (&line[..open], (&line[open + 1..close], &line[close + 1..]))
                }
                None => {
                    let (series, value) = line.split_once(char::is_whitespace)?;
                    (series, ("", value))
                }
            };
            let (label_text, value) = rest;
            if series != name {
                return None;
            }
            let have: Vec<(&str, &str)> = label_text
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.trim(), v.trim().trim_matches('"')))
                })
                .collect();
            if !labels.iter().all(|want| have.contains(want)) {
                return None;
            }
            value.split_whitespace().next()?.parse().ok()
        })
}

/// What `sidecar-agent status --state-dir DIR` prints, or `None` while it fails (no
/// status written yet).
pub fn agent_status(state_dir: &Path) -> Option<String> {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("status").arg("--state-dir").arg(state_dir);
    let out = process::output(&mut cmd);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_matches_labels_in_any_order() {
        let text = "# HELP x y\n\
            sidecar_peer_rx_dropped_total{reason=\"source\",peer=\"ab+/=\"} 7\n\
            sidecar_peer_rx_dropped_total{peer=\"ab+/=\",reason=\"other\"} 1\n\
            sidecar_up 1\n";
        let drops = metric_value(
            text,
            "sidecar_peer_rx_dropped_total",
            &[("peer", "ab+/="), ("reason", "source")],
        );
        assert_eq!(drops, Some(7.0));
        assert_eq!(metric_value(text, "sidecar_up", &[]), Some(1.0));
        assert_eq!(metric_value(text, "missing", &[]), None);
    }
}
