//! Network namespaces and the links between them.

use std::ffi::OsStr;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};

use super::process::{self, ChildGuard};
use super::{cidr, underlay, unique_name, Family};

/// A named network namespace (`ip netns add`), deleted on drop together with every process
/// still running inside it.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Self {
        let name = unique_name("sn");
        // A namespace with this exact name can only be left over from a crashed earlier test
        // process that had our pid, so it is ours to remove.
        if Path::new("/var/run/netns").join(&name).exists() {
            let _ = process::output(Command::new("ip").args(["netns", "del", &name]));
        }
        process::run_ok(process::command(&format!("ip netns add {name}")));
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `cmdline` (split on whitespace) prefixed with `ip netns exec NAME`.
    pub fn command(&self, cmdline: &str) -> Command {
        let mut words = cmdline.split_whitespace();
        let mut cmd = self.program(words.next().expect("empty command line"));
        cmd.args(words);
        cmd
    }

    /// `ip netns exec NAME program`, for a program path and arguments that need no splitting.
    pub fn program(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `cmdline` inside the namespace; panics with its output unless it succeeds.
    pub fn exec(&self, cmdline: &str) -> String {
        process::run_ok(self.command(cmdline))
    }

    /// Runs `cmdline` inside the namespace, whatever its exit status.
    pub fn try_exec(&self, cmdline: &str) -> Output {
        process::output(&mut self.command(cmdline))
    }

    /// Runs `cmdline` inside the namespace with `input` on stdin.
    pub fn exec_with_stdin(&self, cmdline: &str, input: &str) -> String {
        process::run_with_stdin(self.command(cmdline), input)
    }

    /// Starts `cmdline` inside the namespace in the background.
    pub fn spawn(&self, cmdline: &str) -> ChildGuard {
        let program = cmdline.split_whitespace().next().unwrap_or_default();
        ChildGuard::spawn(
            &format!("{program} in {}", self.name),
            self.command(cmdline),
        )
    }

    /// `ip -n NAME <args>`.
    pub fn ip(&self, args: &str) -> String {
        process::run_ok(process::command(&format!("ip -n {} {args}", self.name)))
    }

    /// Adds `addr` (CIDR) to `dev`, skipping IPv6 duplicate address detection so the address
    /// is usable at once instead of after a second of tentative state.
    pub fn add_addr(&self, dev: &str, addr: &str) {
        let nodad = if addr.contains(':') { " nodad" } else { "" };
        self.ip(&format!("addr add {addr} dev {dev}{nodad}"));
    }

    /// Runs `f` on a thread whose network namespace is this one. Sockets created there stay
    /// in this namespace for their lifetime, wherever they are used afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new("/var/run/netns").join(&self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd; it only affects this thread, which
                // exists solely to run `f` and then ends.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread inside namespace panicked")
        })
    }

    /// A UDP socket bound to `bind` inside this namespace.
    pub fn udp_socket(&self, bind: SocketAddr) -> UdpSocket {
        self.enter(|| UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}")))
    }

    /// Pids of the processes running inside this namespace.
    pub fn pids(&self) -> Vec<u32> {
        let out = process::output(Command::new("ip").args(["netns", "pids", &self.name]));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Everything in here was started by this test (usually already stopped by its own
        // guard); a leftover would keep the namespace, its links and its sockets alive.
        for pid in self.pids() {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: plain kill(2) of a process inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = process::output(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// Creates a veth pair with end `dev_a` in `a` and end `dev_b` in `b`, both up. The pair is
/// created directly inside the namespaces, never in the host's, and disappears with them.
pub fn veth(a: &Netns, dev_a: &str, b: &Netns, dev_b: &str) {
    a.ip(&format!(
        "link add {dev_a} type veth peer name {dev_b} netns {}",
        b.name()
    ));
    a.ip(&format!("link set {dev_a} up"));
    b.ip(&format!("link set {dev_b} up"));
}

/// Two namespaces joined by `veth0`, dual-stack underlay: A is host 1 and B is host 2 of
/// 192.0.2.0/24 and 2001:db8:1::/64.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
}

impl Pair {
    pub const LINK: &'static str = "veth0";

    pub fn new() -> Self {
        let pair = Pair {
            a: Netns::new(),
            b: Netns::new(),
        };
        veth(&pair.a, Self::LINK, &pair.b, Self::LINK);
        for family in Family::BOTH {
            let len = family.prefix_len();
            pair.a.add_addr(Self::LINK, &cidr(underlay(family, 1), len));
            pair.b.add_addr(Self::LINK, &cidr(underlay(family, 2), len));
        }
        pair
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}
