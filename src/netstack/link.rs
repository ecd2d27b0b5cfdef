//! The stack as the tunnel driver's userspace link (in place of a TUN device).

use std::io;

use super::NetstackDevice;
use crate::tunnel::{Deliver, PacketLink};

impl Deliver for NetstackDevice {
    fn deliver(&self, packet: &[u8]) {
        NetstackDevice::deliver(self, packet)
    }
}

impl PacketLink for NetstackDevice {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        NetstackDevice::recv(self, buf).await
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        NetstackDevice::try_recv(self, buf)
    }

    fn mtu(&self) -> u16 {
        u16::try_from(self.mtu).unwrap_or(u16::MAX)
    }
}
