//! The TUN device with batched, offloaded I/O.
//!
//! With `IFF_VNET_HDR` offloads the kernel hands us TCP (and UDP) superpackets of up
//! to 64 KiB in one read, which we split into MTU-sized packets, and takes coalesced
//! superpackets back in one write. Where the kernel refuses offloads the same code
//! moves one packet per system call.

use std::io;
use std::net::IpAddr;

use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::prefix::IpPrefix;

/// Largest IP packet (and so largest superpacket) the device hands over.
const MAX_PACKET: usize = 65_535;

/// Environment variable that, set to `off`, keeps offloads off on the TUN device
/// (no virtio-net headers) and the UDP socket (no GSO, no GRO): the one packet per
/// system call path, otherwise only taken on kernels without offloads. For tests and
/// for ruling offloads out when diagnosing a problem.
pub const OFFLOAD_ENV: &str = "SIDECAR_OFFLOAD";

/// Whether offloads may be used, per [`OFFLOAD_ENV`].
pub fn offloads_allowed() -> bool {
    std::env::var_os(OFFLOAD_ENV).is_none_or(|v| v != "off")
}

pub struct TunDevice {
    dev: AsyncDevice,
    name: String,
    mtu: u16,
    offload: bool,
}

impl TunDevice {
    /// Creates and brings up `name` with `mtu`, with offloads when the kernel allows.
    /// Must run inside a tokio runtime.
    pub fn create(name: &str, mtu: u16) -> io::Result<TunDevice> {
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .offload(offload)
                .build_async()
        };
        let (dev, offload) = if !offloads_allowed() {
            tracing::info!(
                "TUN offloads off ({OFFLOAD_ENV}=off); using one packet per system call"
            );
            (build(false)?, false)
        } else {
            match build(true) {
                Ok(dev) => (dev, true),
                Err(e) => {
                    tracing::info!(error = %e, "TUN offloads unavailable; using one packet per system call");
                    (build(false)?, false)
                }
            }
        };
        let offload = offload && dev.tcp_gso();
        Ok(TunDevice {
            dev,
            name: name.to_string(),
            mtu,
            offload,
        })
    }

    /// Wraps a device built elsewhere (for example in another network namespace,
    /// where name-based calls such as [`TunDevice::if_index`] no longer work from
    /// here). Must run inside a tokio runtime.
    pub fn from_sync(
        dev: tun_rs::SyncDevice,
        name: &str,
        mtu: u16,
        offload: bool,
    ) -> io::Result<TunDevice> {
        Ok(TunDevice {
            dev: AsyncDevice::new(dev)?,
            name: name.to_string(),
            mtu,
            offload,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Whether segmentation offloads are on.
    pub fn offload(&self) -> bool {
        self.offload
    }

    pub fn if_index(&self) -> io::Result<u32> {
        self.dev.if_index()
    }

    pub fn add_address(&self, addr: IpPrefix) -> io::Result<()> {
        match addr.addr() {
            IpAddr::V4(a) => self.dev.add_address_v4(a, addr.len()),
            IpAddr::V6(a) => self.dev.add_address_v6(a, addr.len()),
        }
    }

    pub(crate) fn device(&self) -> &AsyncDevice {
        &self.dev
    }
}

/// Buffers for reading batches from the device, allocated once.
pub struct TunReader {
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl TunReader {
    pub fn new(mtu: u16) -> TunReader {
        let slot = usize::from(mtu).max(1500);
        TunReader {
            raw: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            bufs: vec![vec![0; slot]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
        }
    }

    /// Waits for the next read and returns how many packets it yielded.
    pub async fn read(&mut self, tun: &TunDevice) -> io::Result<usize> {
        tun.device()
            .recv_multiple(&mut self.raw, &mut self.bufs, &mut self.sizes, 0)
            .await
    }

    pub fn packet(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.sizes[i]]
    }
}

/// Collects decrypted packets and writes them as one batch, coalescing TCP and UDP
/// flows into superpackets where offloads are on. Allocated once.
pub struct TunWriter {
    bufs: Vec<Vec<u8>>,
    count: usize,
    gro: GROTable,
}

impl TunWriter {
    /// Headroom every buffer keeps for the virtio header.
    const OFFSET: usize = VIRTIO_NET_HDR_LEN;

    pub fn new() -> TunWriter {
        TunWriter {
            // Capacity for a full superpacket, so coalescing never reallocates.
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(Self::OFFSET + MAX_PACKET))
                .collect(),
            count: 0,
            gro: GROTable::new(),
        }
    }

    /// Space for the next packet; [`TunWriter::commit`] it once written.
    pub fn slot(&mut self, len: usize) -> &mut [u8] {
        let buf = &mut self.bufs[self.count];
        buf.resize(Self::OFFSET + len, 0);
        &mut buf[Self::OFFSET..]
    }

    /// Keeps `start..start + len` of the current slot as a packet.
    pub fn commit(&mut self, start: usize, len: usize) {
        let buf = &mut self.bufs[self.count];
        if start != 0 {
            buf.copy_within(
                Self::OFFSET + start..Self::OFFSET + start + len,
                Self::OFFSET,
            );
        }
        buf.truncate(Self::OFFSET + len);
        self.count += 1;
    }

    /// `start..start + len` of the current slot, without keeping it.
    pub fn uncommitted(&self, start: usize, len: usize) -> &[u8] {
        &self.bufs[self.count][Self::OFFSET + start..Self::OFFSET + start + len]
    }

    pub fn is_full(&self) -> bool {
        self.count == self.bufs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub async fn flush(&mut self, tun: &TunDevice) -> io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let n = self.count;
        self.count = 0;
        tun.device()
            .send_multiple(&mut self.gro, &mut self.bufs[..n], Self::OFFSET)
            .await
            .map(|_| ())
    }
}

impl Default for TunWriter {
    fn default() -> Self {
        TunWriter::new()
    }
}
