//! The driver that joins a [`Device`] to a TUN device (or a userspace stand-in for
//! one, see [`PacketLink`]) and a UDP socket: one task encrypts what the TUN device
//! gives, one decrypts what the socket gives, one runs the timers. Each works a
//! batch at a time with buffers allocated once.

use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use quinn_udp::RecvMeta;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::tun::{TunDevice, TunReader, TunWriter};
use crate::udp::{UdpTransport, MAX_GSO_BYTES, RECV_BATCH};
use crate::wg::{
    Action, Device, DeviceControl, DeviceInfo, DeviceUpdate, Released, UpdateError, DATA_OVERHEAD,
    MIN_OUT_BUF,
};

/// How often peer timers run (the protocol's timers have 100 ms-scale granularity).
const TIMER_TICK: Duration = Duration::from_millis(100);

/// Room for one GRO batch from the socket.
const RECV_BUF: usize = 65_536;

#[derive(Default)]
struct IoCounters {
    tun_read_errors: AtomicU64,
    tun_write_errors: AtomicU64,
    udp_send_errors: AtomicU64,
    udp_recv_errors: AtomicU64,
}

/// Where decrypted packets go when there is no TUN device.
pub trait Deliver: Send + Sync + 'static {
    /// Takes one decrypted IP packet. Must not block.
    fn deliver(&self, packet: &[u8]);
}

/// A userspace stand-in for the TUN device (a TCP/IP stack in the process).
pub trait PacketLink: Deliver {
    /// Waits for the next packet to encrypt and copies it into `buf`.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// The next packet if one is ready now (`WouldBlock` otherwise), to fill a batch.
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn mtu(&self) -> u16;
}

enum Link {
    Tun(TunDevice),
    User { deliver: Arc<dyn Deliver>, mtu: u16 },
}

impl Link {
    fn mtu(&self) -> u16 {
        match self {
            Link::Tun(t) => t.mtu(),
            Link::User { mtu, .. } => *mtu,
        }
    }
}

struct Shared {
    device: Arc<Device>,
    link: Link,
    socket: watch::Sender<Arc<UdpTransport>>,
    /// Serializes listen-port changes.
    rebind: Mutex<()>,
    counters: IoCounters,
    /// Woken when a packet enters a shaping queue.
    shaping: Notify,
}

/// A running tunnel. Dropping it stops its tasks.
pub struct Tunnel {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Tunnel {
    /// Starts the data path. Must be called inside a tokio runtime.
    pub fn start(device: Arc<Device>, tun: TunDevice, socket: UdpTransport) -> Tunnel {
        tracing::info!(
            interface = tun.name(),
            mtu = tun.mtu(),
            tun_offload = tun.offload(),
            udp_gso_segments = socket.max_gso_segments(),
            udp_gro_segments = socket.gro_segments(),
            listen_port = socket.local_port(),
            "tunnel up"
        );
        let shared = Shared::new(device, Link::Tun(tun), socket);
        let outbound = tokio::spawn(outbound(shared.clone()));
        Tunnel::with_tasks(shared, outbound)
    }

    /// Starts the data path over a userspace link instead of a TUN device.
    pub fn start_with_link<L: PacketLink>(
        device: Arc<Device>,
        link: Arc<L>,
        socket: UdpTransport,
    ) -> Tunnel {
        tracing::info!(
            mtu = link.mtu(),
            listen_port = socket.local_port(),
            "tunnel up (userspace network stack)"
        );
        let user = Link::User {
            deliver: link.clone(),
            mtu: link.mtu(),
        };
        let shared = Shared::new(device, user, socket);
        let outbound = tokio::spawn(outbound_link(shared.clone(), link));
        Tunnel::with_tasks(shared, outbound)
    }

    fn with_tasks(shared: Arc<Shared>, outbound: JoinHandle<()>) -> Tunnel {
        let tasks = vec![
            outbound,
            tokio::spawn(inbound(shared.clone())),
            tokio::spawn(timers(shared.clone())),
            tokio::spawn(shaper(shared.clone())),
        ];
        Tunnel { shared, tasks }
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.shared.device
    }

    pub fn listen_port(&self) -> u16 {
        self.shared.socket.borrow().local_port()
    }

    /// The control surface (for the userspace API socket).
    pub fn control(&self) -> Arc<dyn DeviceControl> {
        self.shared.clone()
    }

    /// Stops the tasks; the TUN device goes away with the last reference to it.
    pub fn stop(mut self) {
        self.abort();
    }

    fn abort(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.abort();
    }
}

impl Shared {
    fn new(device: Arc<Device>, link: Link, socket: UdpTransport) -> Arc<Shared> {
        let mark = device.fwmark();
        if mark != 0 {
            if let Err(e) = socket.set_fwmark(mark) {
                tracing::warn!(fwmark = mark, error = %e, "could not mark the UDP socket");
            }
        }
        let (tx, _) = watch::channel(Arc::new(socket));
        Arc::new(Shared {
            device,
            link,
            socket: tx,
            rebind: Mutex::new(()),
            counters: IoCounters::default(),
            shaping: Notify::new(),
        })
    }

    /// Hands a decrypted packet on: into the TUN writer's batch, or to the
    /// userspace link at once.
    /// The packet is `start..start + len` of the writer's current slot.
    async fn to_link(&self, writer: &mut TunWriter, start: usize, len: usize) {
        match &self.link {
            Link::Tun(_) => {
                writer.commit(start, len);
                if writer.is_full() {
                    flush_tun(self, writer).await;
                }
            }
            Link::User { deliver, .. } => deliver.deliver(writer.uncommitted(start, len)),
        }
    }
}

impl DeviceControl for Shared {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            private_key: self.device.private_key(),
            listen_port: self.socket.borrow().local_port(),
            fwmark: self.device.fwmark(),
            peers: self.device.peers(),
        }
    }

    fn update(&self, update: DeviceUpdate) -> Result<(), UpdateError> {
        let _guard = self.rebind.lock();
        let mark = update.fwmark.unwrap_or_else(|| self.device.fwmark());
        let mark_error = |e: io::Error| UpdateError::Invalid(format!("fwmark {mark}: {e}"));
        if let Some(port) = update.listen_port {
            if port != self.socket.borrow().local_port() || port == 0 {
                let socket = UdpTransport::bind(port).map_err(|e| UpdateError::Port {
                    port,
                    reason: e.to_string(),
                })?;
                // A new socket keeps the device's mark (or takes the new one).
                if mark != 0 {
                    socket.set_fwmark(mark).map_err(mark_error)?;
                }
                tracing::info!(listen_port = socket.local_port(), "listen port changed");
                self.socket.send_replace(Arc::new(socket));
            }
        }
        if update.fwmark.is_some() {
            self.socket.borrow().set_fwmark(mark).map_err(mark_error)?;
        }
        self.device.apply(&update)?;
        Ok(())
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        self.device.write_metrics(&mut out);
        let c = &self.counters;
        let _ = writeln!(
            out,
            "# HELP sidecar_io_errors_total Failed reads and writes on the TUN device and the UDP socket."
        );
        let _ = writeln!(out, "# TYPE sidecar_io_errors_total counter");
        for (op, v) in [
            ("tun_read", &c.tun_read_errors),
            ("tun_write", &c.tun_write_errors),
            ("udp_send", &c.udp_send_errors),
            ("udp_recv", &c.udp_recv_errors),
        ] {
            let _ = writeln!(
                out,
                "sidecar_io_errors_total{{op=\"{op}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sidecar_offload Whether the data path uses an offload (1) or moves one packet per system call (0)."
        );
        let _ = writeln!(out, "# TYPE sidecar_offload gauge");
        let socket = self.socket.borrow().clone();
        let tun = match &self.link {
            Link::Tun(t) => t.offload(),
            Link::User { .. } => false,
        };
        for (kind, on) in [
            ("tun", tun),
            ("udp_gso", socket.max_gso_segments() > 1),
            ("udp_gro", socket.gro_segments() > 1),
        ] {
            let _ = writeln!(out, "sidecar_offload{{kind=\"{kind}\"}} {}", u8::from(on));
        }
        out
    }
}

/// Sends on the current socket, counting (not propagating) failures: UDP is lossy
/// anyway and one unreachable peer must not stop the others.
async fn send(
    shared: &Shared,
    socket: &UdpTransport,
    to: SocketAddr,
    data: &[u8],
    seg: Option<usize>,
) {
    if let Err(e) = socket.send(to, data, seg).await {
        let n = shared
            .counters
            .udp_send_errors
            .fetch_add(1, Ordering::Relaxed);
        if n.is_power_of_two() {
            tracing::warn!(%to, error = %e, failures = n + 1, "UDP send failed");
        }
    }
}

/// Consecutive datagrams for one destination, laid out back to back in one buffer so
/// the kernel can send them with a single GSO system call.
struct GsoBatch {
    start: usize,
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// The last datagram was shorter than `segment`: nothing may follow it.
    closed: bool,
}

impl GsoBatch {
    fn new() -> GsoBatch {
        GsoBatch {
            start: 0,
            to: None,
            segment: 0,
            count: 0,
            closed: false,
        }
    }

    /// Whether a datagram of `len` bytes for `to`, written at `end`, extends the batch.
    fn accepts(&self, to: SocketAddr, len: usize, end: usize, max_segments: usize) -> bool {
        self.count > 0
            && self.to == Some(to)
            && !self.closed
            && len <= self.segment
            && self.count < max_segments
            && end + len - self.start <= MAX_GSO_BYTES
    }

    fn push(&mut self, to: SocketAddr, at: usize, len: usize) {
        if self.count == 0 {
            self.start = at;
            self.to = Some(to);
            self.segment = len;
        } else if len < self.segment {
            self.closed = true;
        }
        self.count += 1;
    }

    /// Ends the batch, whose last datagram ends at `end`: where to send which bytes,
    /// with which segment size, if it held anything.
    fn take(&mut self, end: usize) -> Option<(SocketAddr, std::ops::Range<usize>, Option<usize>)> {
        let taken = match (self.to, self.count > 0) {
            (Some(to), true) => Some((
                to,
                self.start..end,
                (self.count > 1).then_some(self.segment),
            )),
            _ => None,
        };
        *self = GsoBatch::new();
        taken
    }

    async fn flush(&mut self, shared: &Shared, socket: &UdpTransport, buf: &[u8], end: usize) {
        if let Some((to, range, seg)) = self.take(end) {
            send(shared, socket, to, &buf[range], seg).await;
        }
    }
}

/// Room for one batch of encrypted datagrams laid out back to back.
struct SealBuffer {
    out: Vec<u8>,
    /// Largest encrypted datagram of one packet.
    slot: usize,
    /// Errors the device answered unroutable packets with, going back to the link.
    replies: TunWriter,
}

impl SealBuffer {
    fn new(mtu: u16) -> SealBuffer {
        let slot = (usize::from(mtu).max(1500) + DATA_OVERHEAD).max(MIN_OUT_BUF);
        SealBuffer {
            out: vec![0u8; slot * tun_rs::IDEAL_BATCH_SIZE + MIN_OUT_BUF],
            slot,
            replies: TunWriter::new(),
        }
    }

    /// Encrypts `packets` and sends them, consecutive datagrams for one peer in
    /// one GSO system call.
    async fn seal_and_send<'p>(
        &mut self,
        shared: &Shared,
        socket: &UdpTransport,
        packets: impl Iterator<Item = &'p [u8]>,
    ) {
        let max_segments = socket.max_gso_segments();
        let mut batch = GsoBatch::new();
        let mut end = 0;
        for packet in packets {
            let room = &mut self.out[end..end + self.slot];
            let (to, len) = match shared.device.encapsulate(packet, room) {
                Action::Send { to, datagram } => (to, datagram.len()),
                Action::Shaped => {
                    shared.shaping.notify_one();
                    continue;
                }
                Action::Tunnel(reply) => {
                    let len = reply.len();
                    self.replies.slot(len).copy_from_slice(reply);
                    shared.to_link(&mut self.replies, 0, len).await;
                    continue;
                }
                _ => continue,
            };
            if !batch.accepts(to, len, end, max_segments) {
                // Flush everything before this datagram, then start a new batch with it.
                batch.flush(shared, socket, &self.out, end).await;
            }
            batch.push(to, end, len);
            end += len;
        }
        batch.flush(shared, socket, &self.out, end).await;
        flush_tun(shared, &mut self.replies).await;
    }
}

/// TUN -> encrypt -> UDP.
async fn outbound(shared: Arc<Shared>) {
    let Link::Tun(tun) = &shared.link else {
        return;
    };
    let mut reader = TunReader::new(tun.mtu());
    let mut seal = SealBuffer::new(tun.mtu());
    let mut rx = shared.socket.subscribe();
    loop {
        let n = match reader.read(tun).await {
            Ok(n) => n,
            Err(e) => {
                let c = shared
                    .counters
                    .tun_read_errors
                    .fetch_add(1, Ordering::Relaxed);
                if c.is_power_of_two() {
                    tracing::warn!(error = %e, "TUN read failed");
                }
                if e.raw_os_error() == Some(libc::EBADFD) {
                    return;
                }
                continue;
            }
        };
        let socket = rx.borrow_and_update().clone();
        seal.seal_and_send(&shared, &socket, (0..n).map(|i| reader.packet(i)))
            .await;
    }
}

/// Userspace link -> encrypt -> UDP: waits for one packet, then takes whatever else
/// is ready (up to a batch) so those go out with GSO too.
async fn outbound_link<L: PacketLink>(shared: Arc<Shared>, link: Arc<L>) {
    let mtu = usize::from(link.mtu()).max(1500);
    let mut bufs = vec![vec![0u8; mtu]; tun_rs::IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut seal = SealBuffer::new(link.mtu());
    let mut rx = shared.socket.subscribe();
    loop {
        let mut n = 0;
        match link.recv(&mut bufs[0]).await {
            Ok(len) => {
                sizes[0] = len;
                n = 1;
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                tracing::debug!("userspace link closed");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "userspace link dropped a packet"),
        }
        while n < bufs.len() {
            match link.try_recv(&mut bufs[n]) {
                Ok(len) => {
                    sizes[n] = len;
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) => tracing::debug!(error = %e, "userspace link dropped a packet"),
            }
        }
        let socket = rx.borrow_and_update().clone();
        let packets = bufs.iter().zip(&sizes).take(n).map(|(b, &len)| &b[..len]);
        seal.seal_and_send(&shared, &socket, packets).await;
    }
}

/// UDP -> decrypt -> TUN.
async fn inbound(shared: Arc<Shared>) {
    let mut rx = shared.socket.subscribe();
    let mut socket = rx.borrow_and_update().clone();
    let mut storage: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; RECV_BUF]).collect();
    let mut meta = vec![RecvMeta::default(); RECV_BATCH];
    let mut writer = TunWriter::new();
    let mut reply = vec![0u8; RECV_BUF];
    loop {
        let n = {
            let mut bufs = storage.iter_mut();
            let mut slices: [IoSliceMut<'_>; RECV_BATCH] = std::array::from_fn(|_| {
                IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| &mut b[..]))
            });
            tokio::select! {
                r = socket.recv(&mut slices, &mut meta) => r,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    socket = rx.borrow_and_update().clone();
                    continue;
                }
            }
        };
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                let c = shared
                    .counters
                    .udp_recv_errors
                    .fetch_add(1, Ordering::Relaxed);
                if c.is_power_of_two() {
                    tracing::warn!(error = %e, "UDP receive failed");
                }
                continue;
            }
        };
        for (m, buf) in meta.iter().zip(&storage).take(n) {
            let stride = m.stride.max(1);
            for datagram in buf[..m.len].chunks(stride) {
                let slot = writer.slot(datagram.len().max(MIN_OUT_BUF));
                let base = slot.as_ptr() as usize;
                match shared.device.decapsulate(m.addr, datagram, slot) {
                    Action::Tunnel(packet) => {
                        let (start, len) = (packet.as_ptr() as usize - base, packet.len());
                        shared.to_link(&mut writer, start, len).await;
                    }
                    Action::Send { to, datagram } => {
                        let len = datagram.len();
                        reply[..len].copy_from_slice(datagram);
                        send(&shared, &socket, to, &reply[..len], None).await;
                    }
                    Action::SendThenDrain { to, datagram, peer } => {
                        let len = datagram.len();
                        reply[..len].copy_from_slice(datagram);
                        send(&shared, &socket, to, &reply[..len], None).await;
                        while let Some(Action::Send { to, datagram }) =
                            shared.device.drain_queue(&peer, &mut reply)
                        {
                            let len = datagram.len();
                            send(&shared, &socket, to, &reply[..len], None).await;
                        }
                    }
                    Action::Shaped => shared.shaping.notify_one(),
                    Action::Nothing | Action::Dropped(_) => {}
                }
            }
        }
        flush_tun(&shared, &mut writer).await;
    }
}

async fn flush_tun(shared: &Shared, writer: &mut TunWriter) {
    let Link::Tun(tun) = &shared.link else {
        return;
    };
    if let Err(e) = writer.flush(tun).await {
        let c = shared
            .counters
            .tun_write_errors
            .fetch_add(1, Ordering::Relaxed);
        if c.is_power_of_two() {
            tracing::warn!(error = %e, "TUN write failed");
        }
    }
}

/// Lets shaped packets go as their peers' buckets refill.
async fn shaper(shared: Arc<Shared>) {
    let mut released = Released::default();
    let mut writer = TunWriter::new();
    let slot = (usize::from(shared.link.mtu()).max(1500) + DATA_OVERHEAD).max(MIN_OUT_BUF);
    let mut out = vec![0u8; slot];
    loop {
        let next = shared.device.release_shaped(&mut released);
        if !released.egress.is_empty() {
            let socket = shared.socket.borrow().clone();
            for (peer, packet) in &released.egress {
                if let Action::Send { to, datagram } =
                    shared.device.encapsulate_for(peer, packet, &mut out)
                {
                    let len = datagram.len();
                    send(&shared, &socket, to, &out[..len], None).await;
                }
            }
        }
        for (_, packet) in &released.ingress {
            writer.slot(packet.len()).copy_from_slice(packet);
            shared.to_link(&mut writer, 0, packet.len()).await;
        }
        flush_tun(&shared, &mut writer).await;
        shared.device.recycle_shaped(&mut released);
        match next {
            Some(wait) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.shaping.notified() => {}
                }
            }
            None => shared.shaping.notified().await,
        }
    }
}

/// Handshake retries, rekeys, keepalives.
async fn timers(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; MIN_OUT_BUF.max(256)];
    let mut pending: Vec<(SocketAddr, [u8; 256], usize)> = Vec::new();
    loop {
        tick.tick().await;
        pending.clear();
        shared.device.update_timers(&mut buf, |to, d| {
            let mut copy = [0u8; 256];
            let len = d.len().min(256);
            copy[..len].copy_from_slice(&d[..len]);
            pending.push((to, copy, len));
        });
        if pending.is_empty() {
            continue;
        }
        let socket = shared.socket.borrow().clone();
        for (to, data, len) in &pending {
            send(&shared, &socket, *to, &data[..*len], None).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// Feeds datagrams `(destination, length)` through the batching rule the way
    /// [`SealBuffer::seal_and_send`] does, and returns each send it would make as
    /// `(destination, offset, bytes, segment size)`.
    fn batches(
        datagrams: &[(u16, usize)],
        max_segments: usize,
    ) -> Vec<(u16, usize, usize, Option<usize>)> {
        let mut sends = Vec::new();
        let mut batch = GsoBatch::new();
        let mut end = 0;
        let mut flush = |batch: &mut GsoBatch, end: usize| {
            if let Some((to, range, seg)) = batch.take(end) {
                sends.push((to.port(), range.start, range.len(), seg));
            }
        };
        for &(port, len) in datagrams {
            if !batch.accepts(to(port), len, end, max_segments) {
                flush(&mut batch, end);
            }
            batch.push(to(port), end, len);
            end += len;
        }
        flush(&mut batch, end);
        sends
    }

    #[test]
    fn equal_datagrams_for_one_peer_go_in_one_send() {
        assert_eq!(
            batches(&[(1, 1000), (1, 1000), (1, 1000)], 64),
            vec![(1, 0, 3000, Some(1000))]
        );
    }

    #[test]
    fn a_single_datagram_has_no_segment_size() {
        assert_eq!(batches(&[(1, 700)], 64), vec![(1, 0, 700, None)]);
    }

    #[test]
    fn a_shorter_datagram_ends_the_batch() {
        // The kernel allows only the last segment to be short.
        assert_eq!(
            batches(&[(1, 1000), (1, 400), (1, 1000)], 64),
            vec![(1, 0, 1400, Some(1000)), (1, 1400, 1000, None)]
        );
    }

    #[test]
    fn a_longer_datagram_starts_a_new_batch() {
        assert_eq!(
            batches(&[(1, 400), (1, 1000)], 64),
            vec![(1, 0, 400, None), (1, 400, 1000, None)]
        );
    }

    #[test]
    fn another_destination_starts_a_new_batch_keeping_order() {
        assert_eq!(
            batches(&[(1, 1000), (2, 1000), (2, 1000), (1, 1000)], 64),
            vec![
                (1, 0, 1000, None),
                (2, 1000, 2000, Some(1000)),
                (1, 3000, 1000, None)
            ]
        );
    }

    #[test]
    fn without_gso_every_datagram_is_its_own_send() {
        // max_gso_segments() is 1 where the kernel has no UDP GSO.
        assert_eq!(
            batches(&[(1, 1000), (1, 1000), (1, 1000)], 1),
            vec![
                (1, 0, 1000, None),
                (1, 1000, 1000, None),
                (1, 2000, 1000, None)
            ]
        );
    }

    #[test]
    fn batches_respect_the_segment_count_and_byte_limits() {
        let sends = batches(&[(1, 100); 5], 2);
        assert_eq!(
            sends,
            vec![
                (1, 0, 200, Some(100)),
                (1, 200, 200, Some(100)),
                (1, 400, 100, None)
            ]
        );
        // 1500-byte datagrams: 43 fit in MAX_GSO_BYTES (64 500 bytes), the 44th would not.
        let sends = batches(&[(1, 1500); 44], 64);
        assert_eq!(sends.len(), 2);
        assert_eq!(sends[0], (1, 0, 43 * 1500, Some(1500)));
        assert!(sends.iter().all(|s| s.2 <= MAX_GSO_BYTES));
        assert_eq!(sends[1], (1, 43 * 1500, 1500, None));
    }

    #[test]
    fn seal_buffer_holds_a_full_batch_of_largest_datagrams() {
        for mtu in [1280, 1420, 1500, 9000] {
            let seal = SealBuffer::new(mtu);
            assert!(seal.slot >= usize::from(mtu) + DATA_OVERHEAD);
            assert!(seal.out.len() >= seal.slot * tun_rs::IDEAL_BATCH_SIZE);
        }
    }
}
