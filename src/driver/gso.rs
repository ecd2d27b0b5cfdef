//! Encrypted datagrams laid out back to back, so consecutive ones for one peer go
//! out in a single GSO system call.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{send, Link, Shared};
use crate::tun::MAX_PACKET;
use crate::udp::{UdpTransport, MAX_GSO_BYTES};
use crate::wg::{Output, DATA_OVERHEAD, MIN_OUT_BUF};

/// Consecutive datagrams for one destination, laid out back to back in one buffer so
/// the kernel can send them with a single GSO system call.
pub(super) struct GsoBatch {
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

    async fn flush<L: Link>(
        &mut self,
        shared: &Shared<L>,
        socket: &UdpTransport,
        buf: &[u8],
        end: usize,
    ) {
        if let Some((to, range, seg)) = self.take(end) {
            send(shared, socket, to, &buf[range], seg).await;
        }
    }
}

/// Room for one batch of encrypted datagrams laid out back to back.
pub(super) struct SealBuffer {
    pub(super) out: Vec<u8>,
    /// Largest encrypted datagram of one packet.
    slot: usize,
}

impl SealBuffer {
    /// Sized for the largest packet, whatever the start MTU: the link's MTU may be
    /// raised later. Only the bytes a batch fills are touched.
    pub(super) fn new() -> SealBuffer {
        let slot = (MAX_PACKET + DATA_OVERHEAD).max(MIN_OUT_BUF);
        SealBuffer {
            out: vec![0u8; slot * tun_rs::IDEAL_BATCH_SIZE + MIN_OUT_BUF],
            slot,
        }
    }

    /// Encrypts `packets` and sends them, consecutive datagrams for one peer in
    /// one GSO system call. The batch goes out as soon as it is sealed.
    pub(super) async fn seal_and_send<'p, L: Link>(
        &mut self,
        shared: &Shared<L>,
        socket: &UdpTransport,
        now: Instant,
        packets: impl Iterator<Item = &'p [u8]>,
    ) {
        let max_segments = socket.max_gso_segments();
        let refused = shared.gso_refused.load(Ordering::Relaxed);
        let mut batch = GsoBatch::new();
        let mut end = 0;
        for packet in packets {
            let room = &mut self.out[end..end + self.slot];
            let (to, len) = match shared.device.handle_packet(now, packet, room) {
                Output::Transmit { to, datagram } => (to, datagram.len()),
                _ => continue,
            };
            let max_segments = if len >= refused { 1 } else { max_segments };
            if !batch.accepts(to, len, end, max_segments) {
                // Flush everything before this datagram, then start a new batch with it.
                batch.flush(shared, socket, &self.out, end).await;
            }
            batch.push(to, end, len);
            end += len;
        }
        batch.flush(shared, socket, &self.out, end).await;
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
        let seal = SealBuffer::new();
        assert!(seal.slot >= 65_535 + DATA_OVERHEAD);
        assert!(seal.out.len() >= seal.slot * tun_rs::IDEAL_BATCH_SIZE);
    }
}
