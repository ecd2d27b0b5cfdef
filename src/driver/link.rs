//! Where plaintext packets come from and go to: a TUN device, or a userspace TCP/IP
//! stack in the process. The driver reads a batch, feeds it to the device, and
//! writes what comes out, through this one trait.

use std::future::Future;
use std::io;

use crate::tun::{TunDevice, TunReader, TunWriter};

/// A packet source and sink for the driver. Readers and writers hold the buffers of
/// one task, allocated once.
pub trait Link: Send + Sync + 'static {
    type Reader: Send + Sync;
    type Writer: Send + Sync;

    /// For logs: the interface name, or what stands in for one.
    fn name(&self) -> &str;
    fn mtu(&self) -> u16;
    /// Whether segmentation offloads are on.
    fn offload(&self) -> bool;

    fn reader(&self) -> Self::Reader;
    fn writer(&self) -> Self::Writer;

    /// Waits for packets to encrypt and returns how many `reader` now holds. An
    /// error of kind `NotConnected` means the link is gone.
    fn read(&self, reader: &mut Self::Reader) -> impl Future<Output = io::Result<usize>> + Send;
    /// Packet `i` of the last read.
    fn packet(reader: &Self::Reader, i: usize) -> &[u8];

    /// Room for the next packet to write, at least `len` bytes.
    fn slot(writer: &mut Self::Writer, len: usize) -> &mut [u8];
    /// Keeps `start..start + len` of the slot as a packet. It may be written at
    /// once or batched until [`Link::flush`] (or until the batch is full).
    fn commit(
        &self,
        writer: &mut Self::Writer,
        start: usize,
        len: usize,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes whatever is batched.
    fn flush(&self, writer: &mut Self::Writer) -> impl Future<Output = io::Result<()>> + Send;
}

impl Link for TunDevice {
    type Reader = TunReader;
    type Writer = TunWriter;

    fn name(&self) -> &str {
        TunDevice::name(self)
    }

    fn mtu(&self) -> u16 {
        TunDevice::mtu(self)
    }

    fn offload(&self) -> bool {
        TunDevice::offload(self)
    }

    fn reader(&self) -> TunReader {
        TunReader::new()
    }

    fn writer(&self) -> TunWriter {
        TunWriter::new()
    }

    async fn read(&self, reader: &mut TunReader) -> io::Result<usize> {
        reader.read(self).await.map_err(|e| {
            if e.raw_os_error() == Some(libc::EBADFD) {
                io::Error::new(io::ErrorKind::NotConnected, e)
            } else {
                e
            }
        })
    }

    fn packet(reader: &TunReader, i: usize) -> &[u8] {
        reader.packet(i)
    }

    fn slot(writer: &mut TunWriter, len: usize) -> &mut [u8] {
        writer.slot(len)
    }

    async fn commit(&self, writer: &mut TunWriter, start: usize, len: usize) -> io::Result<()> {
        writer.commit(start, len);
        if writer.is_full() {
            writer.flush(self).await
        } else {
            Ok(())
        }
    }

    async fn flush(&self, writer: &mut TunWriter) -> io::Result<()> {
        writer.flush(self).await
    }
}
