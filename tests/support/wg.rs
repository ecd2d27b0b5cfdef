//! Keys, peers, `wg show` parsing and the reference implementation (Debian's wireguard-go).

use std::path::PathBuf;
use std::time::Duration;

use super::netns::Netns;
use super::process::{self, ChildGuard};
use super::{unique_name, wait_until};

/// MTU used on every tunnel interface; the same on both implementations so their numbers
/// compare.
pub const MTU: u16 = 1420;

/// Path of the userspace API socket for interface `iface`. `/var/run` is not namespaced,
/// which is why interface names must be unique machine-wide.
pub fn uapi_socket(iface: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{iface}.sock"))
}

#[derive(Clone, Debug)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

impl KeyPair {
    pub fn generate() -> Self {
        let private = process::run_ok(process::command("wg genkey"))
            .trim()
            .to_owned();
        let public = process::run_with_stdin(process::command("wg pubkey"), &private)
            .trim()
            .to_owned();
        KeyPair { private, public }
    }
}

pub fn generate_psk() -> String {
    process::run_ok(process::command("wg genpsk"))
        .trim()
        .to_owned()
}

/// A peer as both wg-quick files and `wg set` describe it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub public_key: String,
    pub preshared_key: Option<String>,
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<String>,
    pub keepalive: Option<u16>,
}

impl Peer {
    pub fn new(public_key: &str) -> Self {
        Peer {
            public_key: public_key.to_owned(),
            ..Peer::default()
        }
    }

    pub fn allow(mut self, cidr: impl Into<String>) -> Self {
        self.allowed_ips.push(cidr.into());
        self
    }

    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    pub fn preshared_key(mut self, psk: impl Into<String>) -> Self {
        self.preshared_key = Some(psk.into());
        self
    }

    pub fn keepalive(mut self, secs: u16) -> Self {
        self.keepalive = Some(secs);
        self
    }

    /// Configures this peer on `iface` with `wg set`, run inside `ns`.
    pub fn apply(&self, ns: &Netns, iface: &str) {
        let mut cmdline = format!("wg set {iface} peer {}", self.public_key);
        if !self.allowed_ips.is_empty() {
            cmdline += &format!(" allowed-ips {}", self.allowed_ips.join(","));
        }
        if let Some(endpoint) = &self.endpoint {
            cmdline += &format!(" endpoint {endpoint}");
        }
        if let Some(secs) = self.keepalive {
            cmdline += &format!(" persistent-keepalive {secs}");
        }
        match &self.preshared_key {
            // `wg` reads keys from files only; stdin avoids secrets in scratch files.
            Some(psk) => {
                cmdline += " preshared-key /dev/stdin";
                ns.exec_with_stdin(&cmdline, psk);
            }
            None => {
                ns.exec(&cmdline);
            }
        }
    }
}

/// One peer line of `wg show IFACE dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the epoch; 0 when there has been no handshake.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Runs `wg show IFACE dump` in `ns` and returns the peers, in output order.
pub fn dump(ns: &Netns, iface: &str) -> Vec<PeerStatus> {
    parse_dump(&ns.exec(&format!("wg show {iface} dump")))
}

pub fn parse_dump(text: &str) -> Vec<PeerStatus> {
    let none = |s: &str| (s != "(none)" && s != "off").then(|| s.to_owned());
    text.lines()
        .map(|line| line.split('\t').collect::<Vec<_>>())
        // The first line describes the interface and has 4 fields; peers have 8.
        .filter(|f| f.len() == 8)
        .map(|f| PeerStatus {
            public_key: f[0].to_owned(),
            endpoint: none(f[2]),
            allowed_ips: none(f[3])
                .map(|a| a.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
            latest_handshake: f[4].parse().expect("latest handshake"),
            rx_bytes: f[5].parse().expect("rx bytes"),
            tx_bytes: f[6].parse().expect("tx bytes"),
        })
        .collect()
}

/// The status of peer `public_key` on `iface`, if configured.
pub fn peer_status(ns: &Netns, iface: &str, public_key: &str) -> Option<PeerStatus> {
    dump(ns, iface)
        .into_iter()
        .find(|p| p.public_key == public_key)
}

/// Debian's wireguard-go running in the foreground inside a namespace, configured with `wg`.
pub struct WireguardGo<'ns> {
    ns: &'ns Netns,
    pub iface: String,
    pub keys: KeyPair,
    pub port: u16,
    child: ChildGuard,
}

impl<'ns> WireguardGo<'ns> {
    /// Starts wireguard-go with a fresh interface, sets its key and port and brings the
    /// interface up with [`MTU`]. Addresses and peers are up to the caller.
    pub fn start(ns: &'ns Netns, keys: &KeyPair, port: u16) -> Self {
        let iface = unique_name("wg");
        let mut cmd = ns.command(&format!("wireguard-go {iface}"));
        cmd.env("WG_PROCESS_FOREGROUND", "1");
        let mut child = ChildGuard::spawn(&format!("wireguard-go {iface}"), cmd);
        let socket = uapi_socket(&iface);
        let ready = wait_until(Duration::from_secs(10), || {
            socket.exists() || !child.is_running()
        });
        assert!(
            ready && socket.exists(),
            "wireguard-go {iface} did not create {socket:?} (exit: {:?}):\n{}",
            child.try_wait(),
            child.stderr_tail(30)
        );
        let wg = WireguardGo {
            ns,
            iface,
            keys: keys.clone(),
            port,
            child,
        };
        ns.exec_with_stdin(
            &format!(
                "wg set {} private-key /dev/stdin listen-port {port}",
                wg.iface
            ),
            &keys.private,
        );
        ns.ip(&format!("link set {} mtu {MTU} up", wg.iface));
        wg
    }

    pub fn add_addr(&self, cidr: &str) {
        self.ns.add_addr(&self.iface, cidr);
    }

    /// Routes `cidr` into the tunnel, for destinations outside the interface's own subnets.
    pub fn add_route(&self, cidr: &str) {
        self.ns.ip(&format!("route add {cidr} dev {}", self.iface));
    }

    pub fn add_peer(&self, peer: &Peer) {
        peer.apply(self.ns, &self.iface);
    }

    /// `wg ARGS` with `{}` in `args` replaced by the interface name.
    pub fn wg(&self, args: &str) -> String {
        self.ns
            .exec(&format!("wg {}", args.replace("{}", &self.iface)))
    }

    pub fn dump(&self) -> Vec<PeerStatus> {
        dump(self.ns, &self.iface)
    }

    pub fn peer(&self, public_key: &str) -> Option<PeerStatus> {
        peer_status(self.ns, &self.iface, public_key)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }
}

impl Drop for WireguardGo<'_> {
    fn drop(&mut self) {
        self.child.terminate(Duration::from_secs(3));
        // Only left behind if it had to be killed; the name is ours alone.
        let _ = std::fs::remove_file(uapi_socket(&self.iface));
    }
}

/// `wireguard-go --version`, first line.
pub fn wireguard_go_version() -> String {
    process::run_ok(process::command("wireguard-go --version"))
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}
