//! The driver: joins a [`Device`] to a [`Link`] (TUN device or userspace stack) and a
//! UDP socket, feeding the device and draining it. One task reads the link, feeds
//! each batch to [`Device::handle_packet`] and sends the results; one reads the
//! socket, feeds [`Device::handle_datagram`] and writes the results to the link;
//! each drains the device's polls after every batch, so a lone packet never waits.
//! One timer task sleeps until [`Device::poll_timeout`] and is woken when a feed
//! makes that deadline earlier. Buffers are allocated once per task.

mod control;
mod gso;
mod inbound;
mod link;
mod outbound;
mod source;
mod timer;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

pub use link::Link;

use crate::tun::MAX_PACKET;
use crate::udp::UdpTransport;
use crate::wg::{Device, DeviceControl, DATA_OVERHEAD, MIN_OUT_BUF};

#[derive(Default)]
struct IoCounters {
    tun_read_errors: AtomicU64,
    tun_write_errors: AtomicU64,
    udp_send_errors: AtomicU64,
    udp_recv_errors: AtomicU64,
}

struct Shared<L: Link> {
    device: Arc<Device>,
    link: Arc<L>,
    socket: watch::Sender<Arc<UdpTransport>>,
    /// Serializes listen-port changes.
    rebind: Mutex<()>,
    counters: IoCounters,
    /// The deadline the timer task sleeps until (ns since `epoch`, MAX = none).
    armed: AtomicU64,
    epoch: Instant,
    /// Wakes the timer task when a feed made the device's deadline earlier.
    wake: Notify,
    /// Set once the link reports it is gone (the interface was deleted).
    closed: watch::Sender<bool>,
    /// Which local address each remote sent to, to reply from it.
    sources: source::Sources,
    /// The smallest GSO segment the kernel refused (larger than the path MTU, after
    /// an MTU raise): datagrams this large go out one per send. MAX = none refused.
    gso_refused: AtomicUsize,
}

/// The listen port of the tasks' shared state, whatever the link.
trait ListenPort: Send + Sync {
    fn listen_port(&self) -> u16;
}

/// A running data path. Dropping it stops its tasks.
pub struct Driver {
    device: Arc<Device>,
    control: Arc<dyn DeviceControl>,
    port: Arc<dyn ListenPort>,
    closed: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Driver {
    /// Starts the data path between `device`, `link` and `socket`. Must be called
    /// inside a tokio runtime.
    pub fn start<L: Link>(device: Arc<Device>, link: Arc<L>, socket: UdpTransport) -> Driver {
        tracing::info!(
            link = link.name(),
            mtu = link.mtu(),
            tun_offload = link.offload(),
            udp_gso_segments = socket.max_gso_segments(),
            udp_gro_segments = socket.gro_segments(),
            listen_port = socket.local_port(),
            "tunnel up"
        );
        let shared = Shared::new(device.clone(), link, socket);
        let closed = shared.closed.subscribe();
        let tasks = vec![
            tokio::spawn(outbound::run(shared.clone())),
            tokio::spawn(inbound::run(shared.clone())),
            tokio::spawn(timer::run(shared.clone())),
        ];
        Driver {
            device,
            control: shared.clone(),
            port: shared,
            closed,
            tasks,
        }
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    pub fn listen_port(&self) -> u16 {
        self.port.listen_port()
    }

    /// The control surface (for the userspace API socket).
    pub fn control(&self) -> Arc<dyn DeviceControl> {
        self.control.clone()
    }

    /// Completes once the link is gone (for a TUN device: the interface was deleted,
    /// so reads fail with `EBADFD`). The data path has stopped reading by then.
    pub async fn link_closed(&self) {
        let mut closed = self.closed.clone();
        // An error means the tasks are gone, which also ends the link's use.
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Stops the tasks; the link goes away with the last reference to it.
    pub fn stop(mut self) {
        self.abort();
    }

    fn abort(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.abort();
    }
}

impl<L: Link> Shared<L> {
    fn new(device: Arc<Device>, link: Arc<L>, socket: UdpTransport) -> Arc<Shared<L>> {
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
            armed: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            wake: Notify::new(),
            closed: watch::channel(false).0,
            sources: source::Sources::default(),
            gso_refused: AtomicUsize::new(usize::MAX),
        })
    }

    /// Room for any one datagram the device writes.
    fn datagram_room(&self) -> usize {
        (self.packet_room() + DATA_OVERHEAD).max(MIN_OUT_BUF)
    }

    /// Room for any one packet the link carries: the largest IP packet, not the
    /// start MTU, because `ip link set mtu` may raise it at any time.
    fn packet_room(&self) -> usize {
        MAX_PACKET
    }

    fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// After a feed: wakes the timer task if the device's deadline is now earlier
    /// than the one it sleeps until.
    fn rearm(&self) {
        if let Some(t) = self.device.poll_timeout() {
            let at = self.ns(t);
            if at < self.armed.fetch_min(at, Ordering::AcqRel) {
                self.wake.notify_one();
            }
        }
    }

    /// Sends everything the device has queued for the network.
    async fn drain_transmit(&self, socket: &UdpTransport, now: Instant, buf: &mut [u8]) {
        while let Some(t) = self.device.poll_transmit(now, buf) {
            send(self, socket, t.to, &buf[..t.len], None).await;
        }
    }

    /// Writes everything the device has queued for the link.
    async fn drain_deliver(&self, now: Instant, writer: &mut L::Writer) {
        let room = self.packet_room();
        let mut any = false;
        loop {
            let slot = L::slot(writer, room);
            let Some(n) = self.device.poll_deliver(now, slot) else {
                break;
            };
            any = true;
            let r = self.link.commit(writer, 0, n).await;
            self.count_write(r);
        }
        if any {
            let r = self.link.flush(writer).await;
            self.count_write(r);
        }
    }

    fn count_write(&self, r: io::Result<()>) {
        if let Err(e) = r {
            let c = self
                .counters
                .tun_write_errors
                .fetch_add(1, Ordering::Relaxed);
            if c.is_power_of_two() {
                tracing::warn!(error = %e, "link write failed");
            }
        }
    }
}

/// Sends on the current socket, counting (not propagating) failures: UDP is lossy
/// anyway and one unreachable peer must not stop the others. A GSO batch the kernel
/// refuses (segments larger than the path MTU take `EINVAL`) goes out one datagram
/// at a time, and later datagrams that large are not batched.
async fn send<L: Link>(
    shared: &Shared<L>,
    socket: &UdpTransport,
    to: SocketAddr,
    data: &[u8],
    seg: Option<usize>,
) {
    let mut r = send_from_source(shared, socket, to, data, seg).await;
    if let (Some(size), Err(e)) = (seg, &r) {
        if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EIO)) {
            if shared.gso_refused.fetch_min(size, Ordering::Relaxed) > size {
                tracing::info!(segment = size, error = %e, "UDP GSO refused for segments this large; sending them one by one");
            }
            r = Ok(());
            for datagram in data.chunks(size) {
                if let Err(e) = send_from_source(shared, socket, to, datagram, None).await {
                    r = Err(e);
                }
            }
        }
    }
    if let Err(e) = r {
        let n = shared
            .counters
            .udp_send_errors
            .fetch_add(1, Ordering::Relaxed);
        if n.is_power_of_two() {
            tracing::warn!(%to, error = %e, failures = n + 1, "UDP send failed");
        }
    }
}

/// Sends from the local address `to` last sent to; if that address is no longer
/// ours, forgets it and lets the kernel pick a source instead.
async fn send_from_source<L: Link>(
    shared: &Shared<L>,
    socket: &UdpTransport,
    to: SocketAddr,
    data: &[u8],
    seg: Option<usize>,
) -> io::Result<()> {
    let src = shared.sources.get(to);
    match socket.send(to, data, seg, src).await {
        Err(e) if src.is_some() && source_refused(&e, seg) => {
            tracing::debug!(%to, ?src, error = %e, "source address gone; letting the kernel choose");
            shared.sources.forget(to);
            socket.send(to, data, seg, None).await
        }
        r => r,
    }
}

/// Whether `e` says our source address is not usable: IPv4 routing answers a source
/// that is no longer local with ENETUNREACH, IPv6 with EINVAL. A GSO send's EINVAL
/// may mean the segment size instead; [`send`] retries those one by one, which comes
/// back here.
fn source_refused(e: &io::Error, seg: Option<usize>) -> bool {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) | Some(libc::ENETUNREACH) => true,
        Some(libc::EINVAL) => seg.is_none(),
        _ => false,
    }
}
