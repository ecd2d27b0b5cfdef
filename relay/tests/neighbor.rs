//! End to end: a real Linux router resolves allocated addresses through the
//! [`NeighborResponder`] on the relay's uplink.
//!
//! Two scratch network namespaces joined by a veth pair stand in for the upstream
//! router and the relay. The relay routes its "allocated" addresses away from the
//! uplink (blackhole routes, standing in for the TUN), and the router's neighbour table must show the
//! relay uplink's MAC for them, learned from our answers alone. Everything lives in
//! the scratch namespaces (links are created inside them, never in the host's) and is
//! removed by [`Lab`]'s `Drop`, even when an assertion fails. Needs root.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sidecar_relay::neighbor::{NeighborResponder, OwnedAddresses};
use tokio::sync::oneshot;

const ROUTER_MAC: &str = "00:00:5e:00:53:01";
// RFC 7042 documentation unicast MACs.
const RELAY_MAC: &str = "00:00:5e:00:53:02";
const RELAY_MAC_BYTES: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x53, 0x02];
const ROUTER_IF: &str = "rt0";
const UPLINK: &str = "up0";

const OWNED_V6: &str = "2001:db8:1::abcd";
const OWNED_V4: &str = "192.0.2.77";
const FOREIGN_V6: &str = "2001:db8:1::dead";
const FOREIGN_V4: &str = "192.0.2.78";

/// `IFF_ALLMULTI` in `/sys/class/net/DEV/flags`.
const IFF_ALLMULTI: u32 = 0x200;

/// Fails (never skips) without root or without the tools the lab drives. `ping`
/// matters most: `ip netns exec` reports a command it cannot find with the same exit
/// status as a ping nobody answered, so without this check a machine lacking ping
/// looks like a responder that never answers.
fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates network namespaces: run it as root"
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in ["ip", "ping"] {
        assert!(
            std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()),
            "required tool `{tool}` is not in PATH; tests/run.sh installs the test \
             prerequisites (iproute2, iputils-ping)"
        );
    }
}

fn output(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")))
}

fn run(args: &[&str]) -> String {
    let out = output(args);
    assert!(
        out.status.success(),
        "`{}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// The router and relay namespaces and the veth pair between them.
struct Lab {
    router: String,
    relay: String,
}

impl Lab {
    fn new() -> Lab {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let lab = Lab {
            router: format!("nbr-r-{pid}-{n}"),
            relay: format!("nbr-x-{pid}-{n}"),
        };
        // Only a crashed earlier run with our pid can have left these behind.
        lab.remove();
        // From here on, Drop cleans up whatever part of the setup succeeded.
        run(&["ip", "netns", "add", &lab.router]);
        run(&["ip", "netns", "add", &lab.relay]);
        let (r, x) = (lab.router.as_str(), lab.relay.as_str());

        // Created inside the router namespace with the peer end moved straight into
        // the relay's, so neither name ever exists in the host namespace.
        #[rustfmt::skip]
        let setup: &[&[&str]] = &[
            &["ip", "-n", r, "link", "set", "lo", "up"],
            &["ip", "-n", x, "link", "set", "lo", "up"],
            &["ip", "-n", r, "link", "add", ROUTER_IF, "address", ROUTER_MAC, "type", "veth",
              "peer", "name", UPLINK, "address", RELAY_MAC, "netns", x],
            // Short reachability so that the router re-confirms the entry with unicast
            // probes within a second or two.
            &["ip", "netns", "exec", r, "sysctl", "-qw",
              &format!("net.ipv6.neigh.{ROUTER_IF}.base_reachable_time_ms=500")],
            &["ip", "netns", "exec", r, "sysctl", "-qw",
              &format!("net.ipv6.neigh.{ROUTER_IF}.delay_first_probe_time=1")],
            &["ip", "-n", r, "addr", "add", "2001:db8:1::1/64", "dev", ROUTER_IF, "nodad"],
            &["ip", "-n", r, "addr", "add", "192.0.2.1/24", "dev", ROUTER_IF],
            &["ip", "-n", r, "link", "set", ROUTER_IF, "up"],
            &["ip", "-n", x, "addr", "add", "2001:db8:1::2/64", "dev", UPLINK, "nodad"],
            &["ip", "-n", x, "addr", "add", "192.0.2.2/24", "dev", UPLINK],
            &["ip", "-n", x, "link", "set", UPLINK, "up"],
            &["ip", "netns", "exec", x, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
            &["ip", "netns", "exec", x, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            // Blackhole routes stand in for the TUN the allocated addresses live behind
            // (this kernel may lack the dummy driver); the router only needs the relay
            // to claim them on the link.
            &["ip", "-n", x, "-6", "route", "add", "blackhole", &format!("{OWNED_V6}/128")],
            &["ip", "-n", x, "route", "add", "blackhole", &format!("{OWNED_V4}/32")],
        ];
        for args in setup {
            run(args);
        }
        lab
    }

    fn remove(&self) {
        for ns in [&self.router, &self.relay] {
            if std::path::Path::new("/var/run/netns").join(ns).exists() {
                // Deleting a namespace destroys its end of the veth pair, and with it
                // the other end.
                let _ = output(&["ip", "netns", "del", ns]);
            }
        }
    }

    /// Runs `ping` in the router namespace. Whether anything answers does not matter
    /// (exit status 1), but ping must have run and sent (2 means it could not).
    fn ping_from_router(&self, args: &[&str]) {
        let mut cmd = vec!["ip", "netns", "exec", &self.router, "ping", "-q"];
        cmd.extend_from_slice(args);
        let out = output(&cmd);
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "`{}` failed ({}): {}",
            cmd.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The router's neighbour entry for `addr` on the link, as `ip neigh` prints it.
    fn router_neighbor(&self, addr: &str) -> String {
        run(&[
            "ip",
            "-n",
            &self.router,
            "neigh",
            "show",
            "to",
            addr,
            "dev",
            ROUTER_IF,
        ])
        .trim()
        .to_owned()
    }

    fn uplink_flags(&self) -> u32 {
        let path = format!("/sys/class/net/{UPLINK}/flags");
        let flags = run(&["ip", "netns", "exec", &self.relay, "cat", &path]);
        u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).expect("flags")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove();
    }
}

fn is_resolved(entry: &str, mac: &str) -> bool {
    entry.contains(&format!("lladdr {mac}"))
        && ["REACHABLE", "STALE", "DELAY"]
            .iter()
            .any(|state| entry.contains(state))
}

fn state(entry: &str) -> &str {
    entry.split_whitespace().last().unwrap_or("")
}

/// The allocated addresses, remembering every address the responder asked about.
#[derive(Default)]
struct Owned {
    v6: Vec<Ipv6Addr>,
    v4: Vec<Ipv4Addr>,
    asked: Mutex<Vec<IpAddr>>,
}

impl Owned {
    fn was_asked(&self, addr: &str) -> bool {
        let addr: IpAddr = addr.parse().unwrap();
        self.asked.lock().unwrap().contains(&addr)
    }
}

impl OwnedAddresses for Owned {
    fn owns_v6(&self, addr: Ipv6Addr) -> bool {
        self.asked.lock().unwrap().push(addr.into());
        self.v6.contains(&addr)
    }

    fn owns_v4(&self, addr: Ipv4Addr) -> bool {
        self.asked.lock().unwrap().push(addr.into());
        self.v4.contains(&addr)
    }
}

/// Enters namespace `ns` on the calling thread. Only ever called on threads this test
/// spawned for the purpose, never on a tokio worker.
fn enter_netns(ns: &str) {
    let file = File::open(format!("/var/run/netns/{ns}")).expect("open namespace");
    // SAFETY: file is an open namespace descriptor for the duration of the call, and
    // setns affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a fresh thread inside namespace `ns`, within a current-thread runtime.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_owned();
    thread::spawn(move || {
        enter_netns(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// A responder running on its own thread and runtime inside the relay namespace.
struct Running {
    responder: Option<Arc<NeighborResponder>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Running {
    fn start(ns: &str, owned: Arc<Owned>) -> Running {
        let ns = ns.to_owned();
        let (started_tx, started_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = thread::spawn(move || {
            enter_netns(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let responder = match NeighborResponder::start(UPLINK, owned, true, true) {
                    Ok(r) => Arc::new(r),
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(Arc::clone(&responder)));
                let _ = stop_rx.await;
                // The test hands its reference back before asking us to stop.
                if let Ok(responder) = Arc::try_unwrap(responder) {
                    responder.stop().await;
                }
            });
        });
        let responder = started_rx
            .recv()
            .expect("responder thread died")
            .expect("NeighborResponder::start");
        Running {
            responder: Some(responder),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn get(&self) -> &NeighborResponder {
        self.responder.as_ref().expect("running")
    }

    /// Stops the responder and waits until its thread (and the sockets) are gone.
    fn stop(&mut self) {
        self.responder = None;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("responder thread panicked");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn router_resolves_owned_addresses_through_the_responder() {
    require_root_and_tools();
    let lab = Lab::new();
    assert_eq!(
        lab.uplink_flags() & IFF_ALLMULTI,
        0,
        "uplink starts without all-multicast"
    );

    let owned = Arc::new(Owned {
        v6: vec![OWNED_V6.parse().unwrap()],
        v4: vec![OWNED_V4.parse().unwrap()],
        ..Owned::default()
    });
    let mut running = Running::start(&lab.relay, Arc::clone(&owned));
    let responder = running.get();
    assert_eq!(responder.mac(), RELAY_MAC_BYTES);
    assert_eq!(responder.uplink(), UPLINK);
    assert_ne!(
        lab.uplink_flags() & IFF_ALLMULTI,
        0,
        "the responder's membership puts the uplink in all-multicast mode"
    );

    // IPv6: the router's multicast solicitation is answered with the uplink's MAC.
    lab.ping_from_router(&["-c1", "-W1", OWNED_V6]);
    assert!(
        wait_until(Duration::from_secs(3), || is_resolved(
            &lab.router_neighbor(OWNED_V6),
            RELAY_MAC
        )),
        "router did not learn {OWNED_V6}: `{}`; stats {:?}",
        lab.router_neighbor(OWNED_V6),
        responder.stats()
    );
    assert!(responder.answered() >= 1);

    // With a 500 ms base reachable time the router soon re-confirms the entry with
    // reachability probes, which Linux unicasts to the target at our MAC (only an
    // unresolved entry solicits the multicast group). Unanswered, three of them turn
    // the entry FAILED; answered, it goes back to REACHABLE.
    let answered = responder.answered();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let entry = lab.router_neighbor(OWNED_V6);
            responder.answered() > answered
                && state(&entry) == "REACHABLE"
                && entry.contains(RELAY_MAC)
        }),
        "unicast probe not answered: `{}`; stats {:?}",
        lab.router_neighbor(OWNED_V6),
        responder.stats()
    );

    // IPv4: the router's ARP request is answered the same way.
    lab.ping_from_router(&["-c1", "-W1", OWNED_V4]);
    assert!(
        wait_until(Duration::from_secs(3), || is_resolved(
            &lab.router_neighbor(OWNED_V4),
            RELAY_MAC
        )),
        "router did not learn {OWNED_V4}: `{}`; stats {:?}",
        lab.router_neighbor(OWNED_V4),
        responder.stats()
    );
    assert!(responder.stats().arp_answered >= 1);

    // Back to a calm default so that re-probing does not blur what follows.
    run(&[
        "ip",
        "netns",
        "exec",
        &lab.router,
        "sysctl",
        "-qw",
        &format!("net.ipv6.neigh.{ROUTER_IF}.base_reachable_time_ms=30000"),
    ]);

    // Addresses we do not own: the requests reach the responder, which consults the
    // allocation, and go unanswered.
    lab.ping_from_router(&["-c1", "-W1", FOREIGN_V6]);
    lab.ping_from_router(&["-c1", "-W1", FOREIGN_V4]);
    for addr in [FOREIGN_V6, FOREIGN_V4] {
        let entry = lab.router_neighbor(addr);
        assert!(
            !entry.contains("lladdr") && ["INCOMPLETE", "FAILED"].contains(&state(&entry)),
            "{addr} must stay unresolved: `{entry}`"
        );
    }
    assert!(owned.was_asked(FOREIGN_V6) && owned.was_asked(FOREIGN_V4));
    // Once the router gives up, the entry is FAILED for good.
    assert!(
        wait_until(Duration::from_secs(5), || state(
            &lab.router_neighbor(FOREIGN_V6)
        ) == "FAILED"),
        "`{}`",
        lab.router_neighbor(FOREIGN_V6)
    );

    // The kernel filter keeps ordinary traffic away: 100 echo requests per family to
    // the relay's own addresses cost at most the odd solicitation for them.
    let before = responder.stats();
    lab.ping_from_router(&["-c100", "-i0.002", "-W1", "2001:db8:1::2"]);
    lab.ping_from_router(&["-c100", "-i0.002", "-W1", "192.0.2.2"]);
    let after = responder.stats();
    assert!(
        after.solicitations - before.solicitations <= 10,
        "echo traffic reached the IPv6 socket: {before:?} -> {after:?}"
    );
    assert!(
        after.arp_requests - before.arp_requests <= 10,
        "echo traffic reached the ARP socket: {before:?} -> {after:?}"
    );
    assert_eq!(after.send_errors, 0);

    // Stopping closes the sockets, which releases the all-multicast membership.
    running.stop();
    assert_eq!(
        lab.uplink_flags() & IFF_ALLMULTI,
        0,
        "all-multicast must end with the responder"
    );
}

#[test]
fn start_refuses_unusable_uplinks() {
    require_root_and_tools();
    let lab = Lab::new();
    let owned = || -> Arc<dyn OwnedAddresses> { Arc::new(Owned::default()) };

    let (missing, loopback, no_family, ok) = in_netns(&lab.relay, move || {
        (
            NeighborResponder::start("nbr-missing0", owned(), true, true).map(drop),
            NeighborResponder::start("lo", owned(), true, false).map(drop),
            NeighborResponder::start(UPLINK, owned(), false, false).map(drop),
            NeighborResponder::start(UPLINK, owned(), false, true).map(|r| r.mac()),
        )
    });
    assert!(missing.is_err());
    assert_eq!(
        loopback.unwrap_err().kind(),
        std::io::ErrorKind::Unsupported,
        "loopback is not Ethernet"
    );
    assert_eq!(
        no_family.unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert_eq!(ok.expect("IPv4 only"), RELAY_MAC_BYTES);

    // Outside a runtime there is nothing to drive the sockets: an error, not a panic.
    let outside =
        thread::spawn(move || NeighborResponder::start(UPLINK, owned(), true, true).map(drop))
            .join()
            .unwrap();
    assert!(outside.is_err());
}
