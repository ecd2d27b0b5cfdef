//! `sidecar-wg`, started the way wg-quick starts wireguard-go: `sidecar-wg IFNAME`,
//! which detaches, then configured with `wg` and `ip` only.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use super::agent::workspace_bin;
use super::netns::Netns;
use super::process::{self, TempDir};
use super::wg::{uapi_socket, KeyPair, Peer, PeerStatus};
use super::{unique_name, wait_until};

/// The `sidecar-wg` binary (`$SIDECAR_WG_BIN`, else built next to this test).
pub fn sidecar_wg_bin() -> PathBuf {
    workspace_bin("sidecar-agent", "sidecar-wg", "SIDECAR_WG_BIN")
}

/// Whether process `pid` exists and has not exited (a zombie has).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the parenthesised command name, which may hold spaces.
            let after = stat.rsplit_once(')')?.1;
            after
                .split_whitespace()
                .next()
                .map(|s| s != "Z" && s != "X")
        })
        .unwrap_or(false)
}

/// Live `sidecar-wg` processes in `ns`.
pub fn daemons_in(ns: &Netns) -> Vec<u32> {
    ns.pids()
        .into_iter()
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "sidecar-wg")
                && process_alive(pid)
        })
        .collect()
}

/// A detached `sidecar-wg` serving one interface, with its log in a scratch file.
/// Dropping it sends SIGTERM (SIGKILL after 3 s) and removes a leftover socket.
pub struct SidecarWg<'ns> {
    ns: &'ns Netns,
    pub iface: String,
    pub pid: u32,
    log_dir: TempDir,
}

impl<'ns> SidecarWg<'ns> {
    /// `sidecar-wg IFNAME` in `ns` with a fresh name; panics unless it exits 0 with the
    /// interface and its socket in place and the daemon running.
    pub fn start(ns: &'ns Netns) -> Self {
        Self::start_with_env(ns, &[])
    }

    /// As [`SidecarWg::start`], with extra environment variables for the daemon.
    pub fn start_with_env(ns: &'ns Netns, env: &[(&str, &str)]) -> Self {
        let iface = unique_name("sw");
        let log_dir = TempDir::new();
        let out = run_detached_with_env(ns, &iface, &log_dir.join("log"), env);
        let log = std::fs::read_to_string(log_dir.join("log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "sidecar-wg {iface} failed ({}): {}\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            uapi_socket(&iface).exists(),
            "sidecar-wg exited 0 before {:?} existed",
            uapi_socket(&iface)
        );
        let pids = daemons_in(ns);
        assert_eq!(
            pids.len(),
            1,
            "expected one daemon in {}: {pids:?}",
            ns.name()
        );
        SidecarWg {
            ns,
            iface,
            pid: pids[0],
            log_dir,
        }
    }

    /// Sets the key and port and brings the interface up with `mtu`, as wg-quick does.
    pub fn configure(&self, keys: &KeyPair, port: u16, mtu: u16) {
        self.ns.exec_with_stdin(
            &format!(
                "wg set {} private-key /dev/stdin listen-port {port}",
                self.iface
            ),
            &keys.private,
        );
        self.ns.ip(&format!("link set {} mtu {mtu} up", self.iface));
    }

    pub fn add_peer(&self, peer: &Peer) {
        peer.apply(self.ns, &self.iface);
    }

    pub fn dump(&self) -> Vec<PeerStatus> {
        super::wg::dump(self.ns, &self.iface)
    }

    pub fn is_running(&self) -> bool {
        process_alive(self.pid)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir.join("log")).unwrap_or_default()
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for SidecarWg<'_> {
    fn drop(&mut self) {
        if process_alive(self.pid) {
            if let Ok(pid) = libc::pid_t::try_from(self.pid) {
                // SAFETY: kill(2) of the daemon this guard started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                if !wait_until(Duration::from_secs(3), || !process_alive(self.pid)) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // Only left behind if it had to be killed; the name is ours alone.
        let _ = std::fs::remove_file(uapi_socket(&self.iface));
    }
}

/// Runs `sidecar-wg --log-file LOG IFACE` in `ns` with a debug log and returns how the
/// detaching command ended.
pub fn run_detached(ns: &Netns, iface: &str, log: &std::path::Path) -> Output {
    run_detached_with_env(ns, iface, log, &[])
}

fn run_detached_with_env(
    ns: &Netns,
    iface: &str,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> Output {
    let mut cmd: Command = ns.program(sidecar_wg_bin());
    cmd.envs(env.iter().copied());
    cmd.arg("--log-file")
        .arg(log)
        .arg(iface)
        .env("LOG_LEVEL", "debug")
        .env_remove("WG_PROCESS_FOREGROUND")
        .env_remove("RUST_LOG");
    process::output(&mut cmd)
}
