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
use std::os::fd::{AsRawFd, FromRawFd};
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

/// The router's solicitation for `OWNED_V6`, as a Linux router sends it. With
/// `csum_not_ready` the checksum field holds only the pseudo-header sum, as a sender
/// leaving the checksum to the NIC writes it; otherwise it is the finished checksum
/// with `corrupt` flipped into it.
fn solicitation(csum_not_ready: bool, corrupt: u16) -> Vec<u8> {
    let router_mac = [0x00, 0x00, 0x5e, 0x00, 0x53, 0x01];
    let src: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    let target: Ipv6Addr = OWNED_V6.parse().unwrap();
    let t = target.octets();
    let dst = Ipv6Addr::from(
        0xff02_0000_0000_0000_0000_0001_ff00_0000u128 | (u128::from(target) & 0xff_ffff),
    );
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&router_mac);

    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let sum = |data: &[u8], init: u32| {
        let mut sum = data
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .fold(init, |a, w| a + w);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum
    };
    let checksum = if csum_not_ready {
        sum(&pseudo, 0) as u16
    } else {
        !(sum(&icmp, sum(&pseudo, 0)) as u16) ^ corrupt
    };
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut frame = vec![0x33, 0x33, 0xff, t[13], t[14], t[15]];
    frame.extend_from_slice(&router_mac);
    frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// Sends `frame` on the router's end of the link through a packet socket with a
/// virtio-net header. With `csum_not_ready` the header asks for the ICMPv6 checksum
/// to be completed by the NIC (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), as a VM's virtio
/// device does: the frame crosses the veth with its checksum unfinished.
fn inject_from_router(lab: &Lab, frame: Vec<u8>, csum_not_ready: bool) {
    in_netns(&lab.router, move || {
        // SAFETY: plain system call with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let on: libc::c_int = 1;
        // SAFETY: on is a live c_int and the length is its size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "PACKET_VNET_HDR: {}",
            std::io::Error::last_os_error()
        );
        let ifindex = sidecar::route::interface_index(ROUTER_IF).expect("router link");
        // SAFETY: sockaddr_ll is plain old data, for which all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: addr is a valid sockaddr_ll and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());

        // struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start,
        // csum_offset (native endian, as for a legacy virtio device).
        let (flags, start, offset): (u8, u16, u16) = if csum_not_ready {
            (1, 14 + 40, 2)
        } else {
            (0, 0, 0)
        };
        let mut packet = vec![flags, 0];
        for field in [0u16, 0, start, offset] {
            packet.extend_from_slice(&field.to_ne_bytes());
        }
        packet.extend_from_slice(&frame);
        // SAFETY: packet is valid for reads of packet.len() bytes for the whole call.
        let n = unsafe { libc::send(sock.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0) };
        assert_eq!(
            n,
            packet.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    });
}

#[test]
fn solicitation_with_checksum_left_to_the_nic_is_answered() {
    require_root_and_tools();
    let lab = Lab::new();
    let owned = Arc::new(Owned {
        v6: vec![OWNED_V6.parse().unwrap()],
        ..Owned::default()
    });
    let running = Running::start(&lab.relay, Arc::clone(&owned));
    let responder = running.get();
    // The router's duplicate address detection for its link-local address is a
    // solicitation too; let it pass so that the counts below are ours alone.
    assert!(
        wait_until(Duration::from_secs(5), || run(&[
            "ip",
            "-n",
            &lab.router,
            "-6",
            "addr",
            "show",
            "dev",
            ROUTER_IF,
            "tentative"
        ])
        .trim()
        .is_empty()),
        "router's link-local address stays tentative"
    );
    thread::sleep(Duration::from_millis(100));
    let before = responder.stats();
    let asked_before = owned.asked.lock().unwrap().len();

    // A finished but wrong checksum is refused before the allocation is consulted;
    // the same solicitation unfinished, with the kernel saying so, is answered. The
    // responder handles them in order, so once the second is answered the first has
    // been dealt with.
    inject_from_router(&lab, solicitation(false, 0x0100), false);
    inject_from_router(&lab, solicitation(true, 0), true);
    assert!(
        wait_until(Duration::from_secs(2), || responder.answered()
            > before.answered),
        "solicitation with its checksum left to the NIC not answered: {:?}",
        responder.stats()
    );
    let after = responder.stats();
    assert_eq!(after.solicitations, before.solicitations + 2, "{after:?}");
    assert_eq!(after.answered, before.answered + 1, "{after:?}");
    assert_eq!(
        owned.asked.lock().unwrap()[asked_before..],
        [OWNED_V6.parse::<IpAddr>().unwrap()],
        "only the unfinished solicitation got as far as the allocation"
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
