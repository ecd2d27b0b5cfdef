//! A WireGuard handshake flood from spoofed sources, for the relay's DoS gate.
//!
//! Every datagram is a real handshake initiation (valid mac1, so it passes the cheap
//! check and costs the relay the most an anonymous sender can make it pay) from a fresh
//! random key, sent through a raw IPv4 socket with a forged source address from
//! [`SPOOF_NET`] and a random source port. [`prepare_router`] makes the router count the
//! relay's answers to those addresses (the cookie replies) and then drop them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::{OsRng, RngCore};

use super::Netns;

/// The forged sources: 126 hosts the router routes nowhere.
pub const SPOOF_NET: &str = "198.51.100.128/25";
const SPOOF_BASE: [u8; 3] = [198, 51, 100];
const NFT_TABLE: &str = "flood_count";

/// `n` handshake initiations to `relay_public`, each from its own random key.
pub fn initiations(relay_public: [u8; 32], n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let secret = StaticSecret::random_from_rng(OsRng);
            let mut tunn = Tunn::new(
                secret,
                PublicKey::from(relay_public),
                None,
                None,
                i as u32 + 1,
                None,
            );
            let mut buf = vec![0u8; 256];
            match tunn.format_handshake_initiation(&mut buf, false) {
                TunnResult::WriteToNetwork(packet) => packet.to_vec(),
                _ => panic!("boringtun formatted no handshake initiation"),
            }
        })
        .collect()
}

/// In `router`: a blackhole for [`SPOOF_NET`], and a counter of the relay's UDP
/// datagrams from `relay` port `port` towards it, read by [`cookie_replies`].
pub fn prepare_router(router: &Netns, relay: SocketAddrV4) {
    router.ip(&format!("route add blackhole {SPOOF_NET}"));
    router.exec_with_stdin(
        "nft -f -",
        &format!(
            "table ip {NFT_TABLE} {{\n  chain pre {{\n    type filter hook prerouting priority -300;\n    \
             ip saddr {} ip daddr {SPOOF_NET} udp sport {} counter\n  }}\n}}\n",
            relay.ip(),
            relay.port()
        ),
    );
}

/// Datagrams the relay has sent to spoofed sources so far (see [`prepare_router`]).
pub fn cookie_replies(router: &Netns) -> u64 {
    let out = router.exec(&format!("nft list table ip {NFT_TABLE}"));
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "packets")
        .and_then(|i| words.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in:\n{out}"))
}

/// A running flood; [`Flood::stop`] ends it.
pub struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, Duration)>>,
}

fn raw_socket(ns: &Netns) -> OwnedFd {
    ns.enter(|| {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(
            fd >= 0,
            "raw socket: {} (needs root)",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
}

/// IPv4 + UDP around `payload`. The kernel fills in the IP checksum and length;
/// a zero UDP checksum means "none" in IPv4.
fn datagram(src: Ipv4Addr, sport: u16, dst: SocketAddrV4, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let total = (20 + 8 + payload.len()) as u16;
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.ip().octets());
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
}

impl Flood {
    /// Sends `per_second` initiations a second to `target` from `from`, cycling
    /// through `initiations` and the spoofed sources, until stopped.
    pub fn start(
        from: &Netns,
        target: SocketAddrV4,
        initiations: Vec<Vec<u8>>,
        per_second: u32,
    ) -> Flood {
        assert!(!initiations.is_empty());
        let socket = raw_socket(from);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: an all-zero sockaddr_in is valid; the fields are set below.
            let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            to.sin_family = libc::AF_INET as libc::sa_family_t;
            to.sin_addr.s_addr = u32::from_ne_bytes(target.ip().octets());
            let mut packet = Vec::with_capacity(256);
            let start = Instant::now();
            let mut sent: u64 = 0;
            while !stopped.load(Ordering::Relaxed) {
                // Catch up with the schedule, then nap: the average rate is exact even
                // though the sleeps are not.
                let due = (start.elapsed().as_secs_f64() * f64::from(per_second)) as u64;
                while sent < due {
                    let i = sent as usize;
                    let host = 129 + (i % 126) as u8;
                    let src = Ipv4Addr::new(SPOOF_BASE[0], SPOOF_BASE[1], SPOOF_BASE[2], host);
                    let sport = 1024 + (OsRng.next_u32() % 60000) as u16;
                    datagram(
                        src,
                        sport,
                        target,
                        &initiations[i % initiations.len()],
                        &mut packet,
                    );
                    // SAFETY: packet and `to` are valid for the lengths given.
                    let rc = unsafe {
                        libc::sendto(
                            socket.as_raw_fd(),
                            packet.as_ptr().cast(),
                            packet.len(),
                            0,
                            std::ptr::addr_of!(to).cast(),
                            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        )
                    };
                    if rc < 0 {
                        // A full queue: count nothing, try again next round.
                        break;
                    }
                    sent += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            (sent, start.elapsed())
        });
        Flood {
            stop,
            thread: Some(thread),
        }
    }

    /// Ends the flood: how many initiations went out, and over how long.
    pub fn stop(mut self) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("stopped once")
            .join()
            .expect("flood thread panicked")
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
