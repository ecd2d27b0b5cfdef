//! Userspace TCP/IP stack for hosts without TUN.
//!
//! Where the container cannot get a TUN device (gVisor, no `CAP_NET_ADMIN`), the agent
//! terminates the container's public addresses here instead: decrypted packets from the
//! tunnel go in through [`NetstackDevice::deliver`], and packets to encrypt come out of
//! [`NetstackDevice::recv`]. TCP and UDP to any port of a public address are forwarded
//! to the container's own address on the same port; pings are answered.
//!
//! One task owns the whole stack (smoltcp interface, sockets, upstream kernel sockets),
//! so the data path takes no locks beyond the two packet queues. Each TCP connection
//! and UDP flow has its own [`Waker`](std::task::Waker) that both smoltcp and tokio
//! wake; the task then services only the flows that are ready.
//!
//! TCP goes through smoltcp, with a listener made for each SYN and its SYN-ACK held
//! until the container accepted the upstream connection (a refused or timed-out
//! connect becomes a RST). Initial sequence numbers are our own (RFC 6528), not
//! smoltcp's; handshakes and UDP flows are bounded so that floods from spoofed
//! sources cannot crowd real clients out (see [`NetstackLimits`]). UDP and echo requests bypass smoltcp: they are parsed and
//! answered with `smoltcp::wire`, since a smoltcp UDP socket serves one port only.
//! Not handled: IP fragments, ICMP errors (no path MTU discovery), UDP replies
//! larger than the MTU; all are dropped and counted.

mod device;
mod driver;
mod half_open;
mod isn;
mod link;
pub mod packet;
mod proxy_header;
mod seq_offset;
mod tcp;
mod udp;
mod wake;

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

pub use proxy_header::ProxyProtocol;

/// Packets waiting for the stack; beyond this [`NetstackDevice::deliver`] drops.
const INPUT_CAPACITY: usize = 4096;
/// Packets waiting for the tunnel; beyond this the stack stops emitting (TCP waits,
/// UDP replies and pings are dropped) until [`NetstackDevice::recv`] catches up.
const OUTPUT_CAPACITY: usize = 4096;
/// Largest IP packet accepted from the tunnel.
const MAX_PACKET: usize = 65_535;

/// What the stack terminates and where it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetstackConfig {
    /// The addresses terminated here: the container's /128 and optional /32.
    pub public: Vec<IpAddr>,
    /// Where IPv6 connections go (the container's own address). When only one of the
    /// targets is set, both families forward to it.
    pub target_v6: Option<IpAddr>,
    /// Where IPv4 connections go.
    pub target_v4: Option<IpAddr>,
    /// The tunnel's IP MTU: no packet handed to [`NetstackDevice::recv`] is larger.
    pub mtu: u16,
    /// Start each forwarded TCP connection with a PROXY protocol header naming the
    /// client, since the container otherwise sees every connection come from us.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// How much one stack holds at once, so that a client cannot exhaust the host's memory
/// or file descriptors, nor a flood from spoofed sources crowd out real clients.
/// Established TCP connections beyond their cap are dropped (counted in
/// [`NetstackStats::dropped_limits`]) until one goes; a new handshake or UDP flow
/// beyond its cap takes the place of the oldest one instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetstackLimits {
    /// TCP connections in the stack; the buffers of a busy one cost 512 KiB.
    pub tcp_connections: usize,
    /// Connections that have not completed their handshake (upstream connect in
    /// progress, or SYN-ACK sent and no ACK yet). Each holds an upstream socket.
    pub tcp_half_open: usize,
    /// The same, per client address, so one source cannot take every place.
    pub tcp_half_open_per_source: usize,
    /// How long a client has to answer our SYN-ACK before its connection and the
    /// upstream one behind it are dropped.
    pub tcp_handshake_timeout: Duration,
    /// UDP flows, each holding an upstream socket.
    pub udp_flows: usize,
    /// The same, per client address.
    pub udp_flows_per_source: usize,
    /// A UDP flow with no datagram either way for this long is forgotten (like a NAT
    /// entry), freeing its place.
    pub udp_idle: Duration,
}

impl NetstackLimits {
    /// Caps that fit `descriptors` upstream sockets: one per UDP flow and one per TCP
    /// connection, split evenly.
    pub fn for_descriptors(descriptors: usize) -> NetstackLimits {
        let default = NetstackLimits::default();
        let half = (descriptors / 2).max(2);
        let tcp_connections = default.tcp_connections.min(half);
        let tcp_half_open = default.tcp_half_open.min(tcp_connections / 2).max(1);
        let udp_flows = default.udp_flows.min(half);
        NetstackLimits {
            tcp_connections,
            tcp_half_open,
            tcp_half_open_per_source: default.tcp_half_open_per_source.min(tcp_half_open),
            udp_flows,
            udp_flows_per_source: default.udp_flows_per_source.min(udp_flows),
            ..default
        }
    }

    /// The most upstream sockets a stack with these caps holds at once.
    pub fn descriptors(&self) -> usize {
        self.tcp_connections + self.udp_flows
    }
}

impl Default for NetstackLimits {
    fn default() -> Self {
        NetstackLimits {
            tcp_connections: 2048,
            tcp_half_open: 256,
            tcp_half_open_per_source: 64,
            tcp_handshake_timeout: Duration::from_secs(3),
            udp_flows: 2048,
            udp_flows_per_source: 512,
            udp_idle: Duration::from_secs(60),
        }
    }
}

/// Counters since [`NetstackDevice::start`]; `*_active` are current values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetstackStats {
    /// TCP connections whose upstream connect succeeded (the client got its SYN-ACK).
    pub tcp_opened: u64,
    /// TCP connection attempts answered with RST because the upstream connect failed.
    pub tcp_refused: u64,
    /// TCP connections currently in the stack, including ones still connecting.
    pub tcp_active: u64,
    /// Handshakes dropped unfinished: past their timeout, or their place taken by a
    /// newer SYN at a half-open cap.
    pub tcp_half_open_dropped: u64,
    pub udp_flows_opened: u64,
    pub udp_flows_active: u64,
    /// UDP flows dropped before their idle time to make room for a new one.
    pub udp_flows_reused: u64,
    /// ICMP and ICMPv6 echo requests answered.
    pub icmp_echoes: u64,
    /// Packets dropped because the input queue was full.
    pub dropped_queue_full: u64,
    /// Packets that failed to parse or had bad checksums.
    pub dropped_malformed: u64,
    /// Well-formed packets the stack does not handle: other protocols, other ICMP
    /// types, addresses that are not ours, IP fragments.
    pub dropped_unsupported: u64,
    /// Packets dropped at a limit: connection and flow caps, replies larger than the
    /// MTU, a full output queue, datagrams the upstream socket would not take.
    pub dropped_limits: u64,
}

impl NetstackStats {
    /// All dropped packets.
    pub fn drops(&self) -> u64 {
        self.dropped_queue_full
            + self.dropped_malformed
            + self.dropped_unsupported
            + self.dropped_limits
    }
}

#[derive(Default)]
struct Counters {
    tcp_opened: AtomicU64,
    tcp_refused: AtomicU64,
    tcp_active: AtomicU64,
    tcp_half_open_dropped: AtomicU64,
    udp_flows_opened: AtomicU64,
    udp_flows_active: AtomicU64,
    udp_flows_reused: AtomicU64,
    icmp_echoes: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_unsupported: AtomicU64,
    dropped_limits: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> NetstackStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetstackStats {
            tcp_opened: get(&self.tcp_opened),
            tcp_refused: get(&self.tcp_refused),
            tcp_active: get(&self.tcp_active),
            tcp_half_open_dropped: get(&self.tcp_half_open_dropped),
            udp_flows_opened: get(&self.udp_flows_opened),
            udp_flows_active: get(&self.udp_flows_active),
            udp_flows_reused: get(&self.udp_flows_reused),
            icmp_echoes: get(&self.icmp_echoes),
            dropped_queue_full: get(&self.dropped_queue_full),
            dropped_malformed: get(&self.dropped_malformed),
            dropped_unsupported: get(&self.dropped_unsupported),
            dropped_limits: get(&self.dropped_limits),
        }
    }
}

#[derive(Default)]
struct Output {
    packets: VecDeque<Vec<u8>>,
    /// The stack ran out of room and holds back TCP segments until the queue drains.
    blocked: bool,
}

/// State shared between the API and the driver task.
#[derive(Default)]
struct Shared {
    input: Mutex<VecDeque<Vec<u8>>>,
    output: Mutex<Output>,
    /// Wakes consumers blocked in `recv`.
    output_ready: Notify,
    /// Wakes the driver: input arrived, a flow became ready, the output drained, or stop.
    wake: Notify,
    /// Flows whose waker fired since the driver last looked.
    ready: Mutex<Vec<u64>>,
    stopped: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
        self.output_ready.notify_waiters();
    }
}

/// The userspace stack behind a container's public addresses.
pub struct NetstackDevice {
    shared: Arc<Shared>,
    mtu: usize,
}

impl NetstackDevice {
    /// Validates `config` and spawns the stack's task on the current tokio runtime,
    /// with the default [`NetstackLimits`].
    pub fn start(config: NetstackConfig) -> io::Result<Arc<NetstackDevice>> {
        NetstackDevice::start_with_limits(config, NetstackLimits::default())
    }

    /// Like [`start`](Self::start), with other caps.
    pub fn start_with_limits(
        config: NetstackConfig,
        limits: NetstackLimits,
    ) -> io::Result<Arc<NetstackDevice>> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("netstack needs a tokio runtime: {e}")))?;
        let shared = Arc::new(Shared::default());
        let driver = driver::Driver::new(&config, limits, shared.clone())?;
        runtime.spawn(tokio::task::coop::unconstrained(driver.run()));
        Ok(Arc::new(NetstackDevice {
            shared,
            mtu: usize::from(config.mtu),
        }))
    }

    /// A decrypted packet from the tunnel (an IP packet for one of `public`). Never
    /// blocks; drops (counted) when the stack's input queue is full.
    pub fn deliver(&self, packet: &[u8]) {
        let counters = &self.shared.counters;
        if packet.is_empty() || packet.len() > MAX_PACKET {
            Counters::bump(&counters.dropped_malformed);
            return;
        }
        if self.shared.stopped() {
            return;
        }
        let packet = packet.to_vec();
        let mut input = self.shared.input.lock();
        if input.len() >= INPUT_CAPACITY {
            drop(input);
            Counters::bump(&counters.dropped_queue_full);
            return;
        }
        let was_empty = input.is_empty();
        input.push_back(packet);
        drop(input);
        // The driver empties the whole queue each round, so only the first packet
        // after that needs to wake it.
        if was_empty {
            self.shared.wake.notify_one();
        }
    }

    /// Next packet the stack wants sent through the tunnel; copies it into `buf` and
    /// returns its length. `buf` should hold at least `mtu` bytes: a packet that does
    /// not fit is dropped with an `InvalidInput` error. Fails with `NotConnected` once
    /// the stack has stopped. Cancel-safe.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let notified = self.shared.output_ready.notified();
            tokio::pin!(notified);
            // Registered before looking, so a packet queued in between still wakes us.
            notified.as_mut().enable();
            match self.try_recv(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => notified.await,
                result => return result,
            }
        }
    }

    /// Like [`recv`](Self::recv) but returns `WouldBlock` instead of waiting, so a
    /// caller can drain a batch.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.shared.stopped() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "netstack stopped",
            ));
        }
        let mut output = self.shared.output.lock();
        let Some(packet) = output.packets.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let more = !output.packets.is_empty();
        let unblock = output.blocked && output.packets.len() <= OUTPUT_CAPACITY / 2;
        if unblock {
            output.blocked = false;
        }
        drop(output);
        if unblock {
            self.shared.wake.notify_one();
        }
        // Pass the baton: with several consumers, one wake-up may cover many packets.
        if more {
            self.shared.output_ready.notify_one();
        }
        let Some(dst) = buf.get_mut(..packet.len()) else {
            Counters::bump(&self.shared.counters.dropped_limits);
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "buffer of {} bytes too small for a {}-byte packet (mtu {})",
                    buf.len(),
                    packet.len(),
                    self.mtu
                ),
            ));
        };
        dst.copy_from_slice(&packet);
        Ok(packet.len())
    }

    /// Stops the stack: its task ends, closing every smoltcp and upstream socket
    /// (upstream connections that were not finished cleanly are reset). Pending and
    /// later `recv` calls fail. Idempotent; dropping the device does the same.
    pub fn stop(&self) {
        self.shared.stop();
    }

    pub fn stats(&self) -> NetstackStats {
        self.shared.counters.snapshot()
    }
}

impl Drop for NetstackDevice {
    fn drop(&mut self) {
        self.shared.stop();
    }
}
