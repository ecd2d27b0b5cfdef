//! The stack as the driver's userspace link (in place of a TUN device).

use std::io;

use super::NetstackDevice;
use crate::driver::Link;

/// Buffers for one batch read from the stack.
pub struct StackReader {
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl Link for NetstackDevice {
    type Reader = StackReader;
    /// Room for one decrypted packet, handed to the stack as soon as it is written.
    type Writer = Vec<u8>;

    fn name(&self) -> &str {
        "userspace network stack"
    }

    fn mtu(&self) -> u16 {
        u16::try_from(self.mtu).unwrap_or(u16::MAX)
    }

    fn offload(&self) -> bool {
        false
    }

    fn reader(&self) -> StackReader {
        let mtu = self.mtu.max(1500);
        StackReader {
            bufs: vec![vec![0u8; mtu]; tun_rs::IDEAL_BATCH_SIZE],
            sizes: vec![0; tun_rs::IDEAL_BATCH_SIZE],
        }
    }

    fn writer(&self) -> Vec<u8> {
        Vec::with_capacity(self.mtu.max(1500) + 64)
    }

    /// Waits for one packet, then takes whatever else is ready (up to a batch) so
    /// those go out with GSO too.
    async fn read(&self, r: &mut StackReader) -> io::Result<usize> {
        loop {
            match NetstackDevice::recv(self, &mut r.bufs[0]).await {
                Ok(len) => {
                    r.sizes[0] = len;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Err(e),
                Err(e) => tracing::debug!(error = %e, "userspace link dropped a packet"),
            }
        }
        let mut n = 1;
        while n < r.bufs.len() {
            match NetstackDevice::try_recv(self, &mut r.bufs[n]) {
                Ok(len) => {
                    r.sizes[n] = len;
                    n += 1;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected
                    ) =>
                {
                    break
                }
                Err(e) => tracing::debug!(error = %e, "userspace link dropped a packet"),
            }
        }
        Ok(n)
    }

    fn packet(r: &StackReader, i: usize) -> &[u8] {
        &r.bufs[i][..r.sizes[i]]
    }

    fn slot(w: &mut Vec<u8>, len: usize) -> &mut [u8] {
        if w.len() < len {
            w.resize(len, 0);
        }
        &mut w[..]
    }

    async fn commit(&self, w: &mut Vec<u8>, start: usize, len: usize) -> io::Result<()> {
        NetstackDevice::deliver(self, &w[start..start + len]);
        Ok(())
    }

    async fn flush(&self, _: &mut Vec<u8>) -> io::Result<()> {
        Ok(())
    }
}
