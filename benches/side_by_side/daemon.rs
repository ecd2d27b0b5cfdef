//! The userspace WireGuard implementations under comparison, all driven through the
//! same contract: a foreground process that creates a TUN interface named on its
//! command line and serves the cross-platform userspace API at
//! `/var/run/wireguard/IFACE.sock`, after which `wg` and `ip` do all the configuring.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::agent::agent_bin;
use crate::support::process::{self, ChildGuard, TempDir};
use crate::support::sidecar_wg::sidecar_wg_bin;
use crate::support::wg::{uapi_socket, MTU};
use crate::support::{unique_name, wait_until, KeyPair, Netns, Peer};

/// A userspace WireGuard implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Userspace {
    /// `sidecar-agent up`.
    Sidecar,
    /// `sidecar-wg IFNAME`: the same engine behind wireguard-go's command line.
    SidecarWg,
    /// Mullvad's GotaTun (`gotatun-cli` on crates.io, binary `gotatun`).
    GotaTun,
    /// Cloudflare's boringtun-cli.
    Boringtun,
    /// Debian's wireguard-go.
    WireguardGo,
}

impl Userspace {
    /// The peers ours is compared with, in table order.
    pub const PEERS: [Userspace; 4] = [
        Userspace::SidecarWg,
        Userspace::GotaTun,
        Userspace::Boringtun,
        Userspace::WireguardGo,
    ];

    /// The name used in tables and in `SIDE_BY_SIDE_PEERS`.
    pub fn name(self) -> &'static str {
        match self {
            Userspace::Sidecar => "ours",
            Userspace::SidecarWg => "sidecar-wg",
            Userspace::GotaTun => "gotatun",
            Userspace::Boringtun => "boringtun",
            Userspace::WireguardGo => "wireguard-go",
        }
    }

    pub fn from_name(name: &str) -> Option<Userspace> {
        Self::PEERS.into_iter().find(|p| p.name() == name)
    }

    /// The binary and the crate it comes from when `cargo install` has to fetch it.
    fn binary(self) -> (&'static str, Option<&'static str>) {
        match self {
            Userspace::Sidecar => ("sidecar-agent", None),
            Userspace::SidecarWg => ("sidecar-wg", None),
            Userspace::GotaTun => ("gotatun", Some("gotatun-cli")),
            Userspace::Boringtun => ("boringtun-cli", Some("boringtun-cli")),
            Userspace::WireguardGo => ("wireguard-go", None),
        }
    }
}

/// A located binary of one implementation, with the version it reports.
#[derive(Clone, Debug)]
pub struct Installed {
    pub kind: Userspace,
    pub path: PathBuf,
    pub version: String,
}

/// Finds (and for crates.io peers, installs) `kind`'s binary. Panics when it cannot be
/// had: a missing peer must fail the bench, never drop out of the table.
pub fn install(kind: Userspace) -> Installed {
    let path = match kind.binary() {
        (_, None) if kind == Userspace::Sidecar => agent_bin(),
        (_, None) if kind == Userspace::SidecarWg => sidecar_wg_bin(),
        (bin, None) => find_binary(bin).unwrap_or_else(|| {
            panic!("`{bin}` is not in PATH; install Debian's wireguard-go package")
        }),
        (bin, Some(krate)) => find_binary(bin).unwrap_or_else(|| {
            println!("{bin} is missing: cargo install {krate} --locked");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["install", krate, "--locked"])
                .status()
                .unwrap_or_else(|e| panic!("cannot run cargo install {krate}: {e}"));
            assert!(
                status.success(),
                "cargo install {krate} --locked failed: {status}"
            );
            find_binary(bin)
                .unwrap_or_else(|| panic!("`cargo install {krate}` did not provide `{bin}`"))
        }),
    };
    let version = match kind {
        // The build is the worktree's own.
        Userspace::Sidecar | Userspace::SidecarWg => "this tree, release build".to_owned(),
        _ => {
            let mut cmd = Command::new(&path);
            cmd.arg("--version");
            process::run_ok(cmd)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        }
    };
    Installed {
        kind,
        path,
        version,
    }
}

/// `bin` in PATH, else in cargo's install directory (which a root shell's PATH often
/// lacks).
fn find_binary(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    std::env::split_paths(&path)
        .chain(cargo_home.map(|h| h.join("bin")))
        .map(|dir| dir.join(bin))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// How ours is started, beyond the defaults: for investigating where time goes.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// `KEY=VALUE` pairs for ours (e.g. `SIDECAR_OFFLOAD=off`, `TOKIO_WORKER_THREADS=1`).
    pub env: Vec<(String, String)>,
    /// A CPU list for `taskset -c`, pinning ours.
    pub cpus: Option<String>,
}

/// One running implementation with one interface; stopped (and its socket removed) on
/// drop.
pub struct Daemon<'ns> {
    ns: &'ns Netns,
    pub iface: String,
    child: ChildGuard,
    // The agent's one-line key file lives as long as the agent.
    _dir: Option<TempDir>,
}

impl<'ns> Daemon<'ns> {
    /// Starts `imp` in `ns`, waits for its userspace API, then sets the private key and
    /// listen port with `wg` and the MTU with `ip`, and brings the interface up.
    /// Addresses, routes and peers are up to the caller.
    pub fn start(
        ns: &'ns Netns,
        imp: &Installed,
        launch: &Launch,
        keys: &KeyPair,
        port: u16,
    ) -> Daemon<'ns> {
        let iface = unique_name("sb");
        let mut dir = None;
        let mut cmd = match launch.cpus.as_deref() {
            Some(cpus) if matches!(imp.kind, Userspace::Sidecar | Userspace::SidecarWg) => {
                let mut c = ns.program("taskset");
                c.args(["-c", cpus]).arg(&imp.path);
                c
            }
            _ => ns.program(&imp.path),
        };
        match imp.kind {
            Userspace::Sidecar => {
                // `up` insists on a file with a key; everything else comes from `wg`,
                // as for the others.
                let d = TempDir::new();
                let conf = d.join("key.conf");
                std::fs::write(
                    &conf,
                    format!("[Interface]\nPrivateKey = {}\n", keys.private),
                )
                .expect("write agent key file");
                cmd.args(["up", "--config"])
                    .arg(&conf)
                    .args(["--interface", &iface]);
                cmd.env("RUST_LOG", "warn");
                for (k, v) in &launch.env {
                    cmd.env(k, v);
                }
                dir = Some(d);
            }
            Userspace::GotaTun => {
                // Dropping privileges needs a login name, which a process without a
                // terminal does not have; it would be a no-op for root anyway.
                cmd.args(["--foreground", "--disable-drop-privileges", &iface]);
                cmd.env("WG_LOG_LEVEL", "error");
            }
            Userspace::Boringtun => {
                cmd.args(["--foreground", "--disable-drop-privileges", &iface]);
                cmd.env("WG_LOG_LEVEL", "error");
            }
            Userspace::SidecarWg => {
                cmd.args(["--foreground", &iface]);
                cmd.env("LOG_LEVEL", "error");
                for (k, v) in &launch.env {
                    cmd.env(k, v);
                }
            }
            Userspace::WireguardGo => {
                cmd.arg(&iface);
                cmd.env("WG_PROCESS_FOREGROUND", "1");
            }
        }
        let label = format!("{} {iface}", imp.kind.name());
        let mut child = ChildGuard::spawn(&label, cmd);
        let socket = uapi_socket(&iface);
        let ready = wait_until(Duration::from_secs(15), || {
            !child.is_running()
                || (socket.exists() && ns.try_exec(&format!("wg show {iface}")).status.success())
        });
        assert!(
            ready && child.is_running(),
            "{label} did not serve {socket:?} (exit: {:?}):\n{}",
            child.try_wait(),
            child.stderr_tail(30)
        );
        let daemon = Daemon {
            ns,
            iface,
            child,
            _dir: dir,
        };
        ns.exec_with_stdin(
            &format!(
                "wg set {} private-key /dev/stdin listen-port {port}",
                daemon.iface
            ),
            &keys.private,
        );
        ns.ip(&format!("link set {} mtu {MTU} up", daemon.iface));
        daemon
    }

    pub fn add_addr(&self, cidr: &str) {
        self.ns.add_addr(&self.iface, cidr);
    }

    pub fn add_route(&self, cidr: &str) {
        self.ns.ip(&format!("route add {cidr} dev {}", self.iface));
    }

    pub fn add_peer(&self, peer: &Peer) {
        peer.apply(self.ns, &self.iface);
    }

    /// Panics with the process's log if it has died (a crash mid-run must not pass for
    /// a slow run).
    pub fn assert_running(&mut self) {
        assert!(
            self.child.is_running(),
            "{} exited ({:?}):\n{}",
            self.iface,
            self.child.try_wait(),
            self.child.stderr_tail(30)
        );
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        self.child.terminate(Duration::from_secs(3));
        // Left behind only if the process had to be killed; the name is ours alone.
        let _ = std::fs::remove_file(uapi_socket(&self.iface));
    }
}
