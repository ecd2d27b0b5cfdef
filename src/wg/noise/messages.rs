//! The four message formats of the whitepaper's section 5.4, parsed without copying.

use super::NoiseError;

pub const INITIATION_LEN: usize = 148;
pub const RESPONSE_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;
/// Type, reserved, receiver index and counter in front of a data message's ciphertext.
pub const DATA_HEADER_LEN: usize = 16;
/// Header plus the Poly1305 tag: what a data message adds to a packet (before padding).
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + 16;

pub(crate) const TYPE_INITIATION: u8 = 1;
pub(crate) const TYPE_RESPONSE: u8 = 2;
pub(crate) const TYPE_COOKIE_REPLY: u8 = 3;
pub(crate) const TYPE_DATA: u8 = 4;

/// Byte offsets of the fields that more than one file needs.
pub(crate) mod offset {
    pub const INIT_EPHEMERAL: usize = 8;
    pub const INIT_STATIC: usize = 40;
    pub const INIT_TIMESTAMP: usize = 88;
    pub const INIT_MAC1: usize = 116;
    pub const INIT_MAC2: usize = 132;
    pub const RESP_EPHEMERAL: usize = 12;
    pub const RESP_EMPTY: usize = 44;
    pub const RESP_MAC1: usize = 60;
    pub const RESP_MAC2: usize = 76;
    pub const COOKIE_NONCE: usize = 8;
    pub const COOKIE_BODY: usize = 32;
}

/// A datagram recognised by type and exact length; nothing is authenticated yet.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    Initiation {
        sender: u32,
        bytes: &'a [u8; INITIATION_LEN],
    },
    Response {
        sender: u32,
        receiver: u32,
        bytes: &'a [u8; RESPONSE_LEN],
    },
    CookieReply {
        receiver: u32,
        bytes: &'a [u8; COOKIE_REPLY_LEN],
    },
    Data {
        receiver: u32,
        counter: u64,
        bytes: &'a [u8],
    },
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> Message<'a> {
    pub fn parse(datagram: &'a [u8]) -> Result<Message<'a>, NoiseError> {
        if datagram.len() < 4 || datagram[1..4] != [0, 0, 0] {
            return Err(NoiseError::Malformed);
        }
        let m = match (datagram[0], datagram.len()) {
            (TYPE_INITIATION, INITIATION_LEN) => Message::Initiation {
                sender: u32_at(datagram, 4),
                bytes: datagram.try_into().map_err(|_| NoiseError::Malformed)?,
            },
            (TYPE_RESPONSE, RESPONSE_LEN) => Message::Response {
                sender: u32_at(datagram, 4),
                receiver: u32_at(datagram, 8),
                bytes: datagram.try_into().map_err(|_| NoiseError::Malformed)?,
            },
            (TYPE_COOKIE_REPLY, COOKIE_REPLY_LEN) => Message::CookieReply {
                receiver: u32_at(datagram, 4),
                bytes: datagram.try_into().map_err(|_| NoiseError::Malformed)?,
            },
            (TYPE_DATA, n) if n >= DATA_OVERHEAD => Message::Data {
                receiver: u32_at(datagram, 4),
                counter: u64::from_le_bytes(datagram[8..16].try_into().unwrap_or_default()),
                bytes: datagram,
            },
            _ => return Err(NoiseError::Malformed),
        };
        Ok(m)
    }

    /// The local index a response, cookie reply or data message is addressed to: the
    /// device routes by `index >> 8` to the peer (see [`super::NoisePeer::new`]).
    pub fn receiver(&self) -> Option<u32> {
        match *self {
            Message::Initiation { .. } => None,
            Message::Response { receiver, .. }
            | Message::CookieReply { receiver, .. }
            | Message::Data { receiver, .. } => Some(receiver),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_lengths_and_zero_reserved_bytes_parse() {
        let mut init = [0u8; INITIATION_LEN];
        init[0] = TYPE_INITIATION;
        init[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(
            Message::parse(&init),
            Ok(Message::Initiation { sender: 7, .. })
        ));
        assert_eq!(
            Message::parse(&init[..147]).unwrap_err(),
            NoiseError::Malformed
        );
        init[2] = 1;
        assert_eq!(Message::parse(&init).unwrap_err(), NoiseError::Malformed);
        let mut data = [0u8; DATA_OVERHEAD];
        data[0] = TYPE_DATA;
        data[8] = 9;
        assert!(matches!(
            Message::parse(&data),
            Ok(Message::Data { counter: 9, .. })
        ));
        assert!(Message::parse(&data[..DATA_OVERHEAD - 1]).is_err());
        assert!(Message::parse(&[]).is_err());
        assert!(Message::parse(&[5, 0, 0, 0]).is_err());
    }
}
