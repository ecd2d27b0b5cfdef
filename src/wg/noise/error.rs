//! Why a message or a packet was refused.

use thiserror::Error;

/// Every way untrusted input or a full buffer can be refused. None of them panics and
/// none of them changes the state a valid message would rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NoiseError {
    #[error("datagram is not a WireGuard message (type, reserved bytes or length)")]
    Malformed,
    #[error("mac1 does not match: not addressed to this key")]
    InvalidMac,
    #[error("authentication of an encrypted field failed")]
    DecryptFailed,
    #[error("a public key or Diffie-Hellman result has low order")]
    LowOrderKey,
    #[error("handshake initiation comes from another peer's static key")]
    WrongPeer,
    #[error("handshake initiation timestamp is not newer than the last one (replay)")]
    TimestampReplay,
    #[error("handshake initiations arrive faster than one per 20 ms")]
    InitiationFlood,
    #[error("receiver index names no session or handshake of this peer")]
    UnknownIndex,
    #[error("counter already received or behind the replay window")]
    Replay,
    #[error("session is older than REJECT_AFTER_TIME or its counter is exhausted")]
    SessionExpired,
    #[error("decrypted packet is neither a well-formed IPv4 nor IPv6 packet")]
    InvalidPacket,
    #[error("output buffer too small")]
    BufferTooSmall,
}
