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

/// Largest IP packet (and so largest superpacket) the device hands over, and the
/// largest MTU the kernel lets `ip link set mtu` give it.
pub const MAX_PACKET: usize = 65_535;

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
    /// Every buffer holds the largest packet, not the MTU at start: `ip link set mtu`
    /// may raise it at any time, and a read into a smaller buffer would fail. Pages
    /// a read never reaches are never touched.
    pub fn new() -> TunReader {
        TunReader {
            raw: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            bufs: vec![vec![0; MAX_PACKET]; IDEAL_BATCH_SIZE],
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

impl Default for TunReader {
    fn default() -> Self {
        TunReader::new()
    }
}

impl Default for TunWriter {
    fn default() -> Self {
        TunWriter::new()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    };
    use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4};

    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const PAYLOAD: usize = 100;
    const HEADERS: usize = 20 + 20;

    #[derive(Clone, Copy)]
    struct Segment {
        src_port: u16,
        seq: i32,
        control: TcpControl,
        fill: u8,
    }

    fn segment(src_port: u16, index: i32) -> Segment {
        Segment {
            src_port,
            seq: 1000 + index * PAYLOAD as i32,
            control: TcpControl::None,
            fill: index as u8,
        }
    }

    /// Writes `seg` into the writer's next slot as a checksummed IPv4/TCP packet with
    /// ACK set, the way the decrypting path does.
    fn push(writer: &mut TunWriter, seg: Segment) {
        let payload = [seg.fill; PAYLOAD];
        let tcp = TcpRepr {
            src_port: seg.src_port,
            dst_port: 80,
            control: seg.control,
            seq_number: TcpSeqNumber(seg.seq),
            ack_number: Some(TcpSeqNumber(1)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &payload,
        };
        let ip = Ipv4Repr {
            src_addr: SRC,
            dst_addr: DST,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let len = ip.buffer_len() + tcp.buffer_len();
        assert_eq!(len, HEADERS + PAYLOAD);
        let caps = ChecksumCapabilities::default();
        let slot = writer.slot(len);
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut slot[..]), &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut slot[20..]),
            &IpAddress::Ipv4(SRC),
            &IpAddress::Ipv4(DST),
            &caps,
        );
        writer.commit(0, len);
    }

    /// Coalesces the committed packets as [`TunWriter::flush`] has tun-rs do before
    /// writing to an offloading device; returns each buffer's virtio header and packet.
    fn coalesce(segments: &[Segment]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut writer = TunWriter::new();
        for &seg in segments {
            push(&mut writer, seg);
        }
        let n = writer.count;
        writer
            .gro
            .apply_gro(&mut writer.bufs[..n], TunWriter::OFFSET, false)
            .unwrap();
        writer.bufs[..n]
            .iter()
            .map(|b| {
                let hdr = VirtioNetHdr::decode(&b[..TunWriter::OFFSET]).unwrap();
                (hdr, b[TunWriter::OFFSET..].to_vec())
            })
            .collect()
    }

    fn assert_untouched(out: &[(VirtioNetHdr, Vec<u8>)], what: &str) {
        for (i, (hdr, packet)) in out.iter().enumerate() {
            assert_eq!(packet.len(), HEADERS + PAYLOAD, "{what}: packet {i} grew");
            assert_eq!(hdr.gso_type, 0, "{what}: packet {i} became a superpacket");
            assert_eq!(hdr.gso_size, 0, "{what}: packet {i}");
        }
    }

    #[test]
    fn consecutive_segments_of_one_flow_become_one_superpacket() {
        let out = coalesce(&[segment(5000, 0), segment(5000, 1), segment(5000, 2)]);
        let (hdr, packet) = &out[0];
        assert_eq!(packet.len(), HEADERS + 3 * PAYLOAD, "not coalesced");
        assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(usize::from(hdr.gso_size), PAYLOAD);
        assert_eq!(usize::from(hdr.hdr_len), HEADERS);
        // The kernel finishes the TCP checksum: it starts at the TCP header and goes in
        // its checksum field.
        assert_eq!(hdr.flags & 1, 1, "VIRTIO_NET_HDR_F_NEEDS_CSUM");
        assert_eq!((hdr.csum_start, hdr.csum_offset), (20, 16));

        let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
        assert_eq!(usize::from(ip.total_len()), HEADERS + 3 * PAYLOAD);
        assert!(ip.verify_checksum(), "IPv4 header checksum not updated");
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(
            tcp.seq_number(),
            TcpSeqNumber(1000),
            "superpacket starts at the first"
        );
        let expected: Vec<u8> = (0..3u8).flat_map(|i| [i; PAYLOAD]).collect();
        assert_eq!(tcp.payload(), &expected[..], "payloads in order");
    }

    #[test]
    fn different_flows_are_not_coalesced() {
        let out = coalesce(&[segment(5000, 0), segment(5001, 1), segment(5002, 2)]);
        assert_untouched(&out, "different source ports");
    }

    #[test]
    fn segments_out_of_sequence_are_not_coalesced() {
        let out = coalesce(&[segment(5000, 0), segment(5000, 2)]);
        assert_untouched(&out, "with a gap");
        let out = coalesce(&[segment(5000, 0), segment(5000, 0)]);
        assert_untouched(&out, "a retransmission");
    }

    #[test]
    fn a_segment_just_before_the_superpacket_is_put_in_front() {
        let out = coalesce(&[segment(5000, 1), segment(5000, 0)]);
        let (hdr, packet) = &out[0];
        assert_eq!(packet.len(), HEADERS + 2 * PAYLOAD, "not coalesced");
        assert_eq!(usize::from(hdr.gso_size), PAYLOAD);
        let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
        assert!(ip.verify_checksum());
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(tcp.seq_number(), TcpSeqNumber(1000));
        let expected: Vec<u8> = (0..2u8).flat_map(|i| [i; PAYLOAD]).collect();
        assert_eq!(tcp.payload(), &expected[..], "payloads in sequence order");
    }

    #[test]
    fn segments_with_different_flags_are_not_coalesced() {
        // PSH ends a superpacket: nothing may follow it in one.
        let mut pushed = segment(5000, 0);
        pushed.control = TcpControl::Psh;
        let out = coalesce(&[pushed, segment(5000, 1)]);
        assert_untouched(&out, "after PSH");
        let mut fin = segment(5000, 1);
        fin.control = TcpControl::Fin;
        let out = coalesce(&[segment(5000, 0), fin]);
        assert_untouched(&out, "FIN");
    }
}
