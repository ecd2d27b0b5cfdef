//! The seam over our own Noise ([`crate::wg::noise`]): translations of its outputs and
//! errors into what the device speaks. Nothing here reads a clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::{Gate, Opened, Sealed, HANDSHAKES_PER_SECOND_BEFORE_LOAD};
use crate::key::Key;
use crate::wg::metrics::DropReason;
use crate::wg::noise::{
    CookieGate, GateVerdict, Identity, NoiseError, NoisePeer, OpenedInitiation, Output,
};

pub(super) struct Keys {
    identity: Arc<Identity>,
    gate: CookieGate,
}

impl Keys {
    pub(super) fn new(private: Key, wall: SystemTime, anchor: Instant) -> Keys {
        let identity = Arc::new(Identity::new(private.0, wall, anchor));
        let gate = CookieGate::new(&identity, HANDSHAKES_PER_SECOND_BEFORE_LOAD);
        Keys { identity, gate }
    }

    pub(super) fn check_handshake(
        &self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Gate {
        match self.gate.check(now, from, datagram, out) {
            Ok(GateVerdict::Pass) => Gate::Pass,
            Ok(GateVerdict::CookieReply(reply)) => Gate::CookieReply(reply.len()),
            Err(e) => Gate::Reject(drop_reason(e)),
        }
    }

    pub(super) fn open_initiation(&self, datagram: &[u8]) -> Result<OpenedInitiation, DropReason> {
        self.identity.open_initiation(datagram).map_err(drop_reason)
    }

    pub(super) fn peer(
        &self,
        peer: &Key,
        psk: Option<Key>,
        index: u32,
        now: Instant,
    ) -> Box<NoisePeer> {
        Box::new(NoisePeer::new(
            self.identity.clone(),
            peer.0,
            psk.map(|k| k.0),
            index,
            now,
        ))
    }
}

pub(super) fn encapsulate(
    p: &mut NoisePeer,
    now: Instant,
    packet: &[u8],
    out: &mut [u8],
) -> Result<Sealed, DropReason> {
    match p.encapsulate(now, packet, out).map_err(drop_reason)? {
        Output::Transmit(d) => Ok(Sealed::Datagram(d.len())),
        _ => Ok(Sealed::Queued),
    }
}

pub(super) fn decapsulate(
    p: &mut NoisePeer,
    now: Instant,
    datagram: &[u8],
    out: &mut [u8],
) -> Result<Opened, DropReason> {
    p.decapsulate(now, datagram, out)
        .map(opened)
        .map_err(drop_reason)
}

pub(super) fn accept_initiation(
    p: &mut NoisePeer,
    now: Instant,
    initiation: &OpenedInitiation,
    out: &mut [u8],
) -> Result<Opened, DropReason> {
    p.accept_initiation(now, initiation, out)
        .map(opened)
        .map_err(drop_reason)
}

fn opened(o: Output<'_>) -> Opened {
    match o {
        Output::Transmit(d) => Opened::Handshake(d.len()),
        // Ours writes the packet at the start of `out`.
        Output::Deliver { packet, source } => Opened::Packet {
            start: 0,
            len: packet.len(),
            src: source,
        },
        Output::Done => Opened::Consumed,
    }
}

pub(super) fn poll_queued(p: &mut NoisePeer, now: Instant, out: &mut [u8]) -> Option<usize> {
    match p.poll_queued(now, out) {
        Ok(d) => d.map(|d| d.len()),
        Err(e) => {
            tracing::debug!(error = %e, "queued packet not sent");
            None
        }
    }
}

pub(super) fn keepalive(p: &mut NoisePeer, now: Instant, out: &mut [u8]) -> Option<usize> {
    p.send_keepalive(now, out).ok().flatten()
}

pub(super) fn handle_timeout(p: &mut NoisePeer, now: Instant, out: &mut [u8]) -> Option<usize> {
    match p.handle_timeout(now, out) {
        Ok(d) => d.map(|d| d.len()),
        Err(e) => {
            tracing::debug!(error = %e, "timer error");
            None
        }
    }
}

fn drop_reason(e: NoiseError) -> DropReason {
    match e {
        NoiseError::Malformed | NoiseError::InvalidPacket => DropReason::Malformed,
        NoiseError::InvalidMac
        | NoiseError::DecryptFailed
        | NoiseError::LowOrderKey
        | NoiseError::TimestampReplay => DropReason::Unauthenticated,
        NoiseError::WrongPeer | NoiseError::UnknownIndex => DropReason::UnknownPeer,
        NoiseError::Replay => DropReason::Replay,
        NoiseError::BufferTooSmall => DropReason::BufferTooSmall,
        NoiseError::InitiationFlood | NoiseError::SessionExpired => DropReason::Protocol,
    }
}
