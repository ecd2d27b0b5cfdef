//! TCP initial sequence numbers as RFC 6528 asks for them: a clock that ticks every
//! 4 µs plus a keyed hash of the connection's 4-tuple.
//!
//! smoltcp draws its ISNs from a PCG generator; a few observed SYN-ACKs reveal its
//! state and with it every later ISN, which makes blind injection into a client's
//! connection possible. The hash gives each 4-tuple its own unpredictable offset,
//! and the clock keeps successive incarnations of the same 4-tuple moving forward.

use std::time::Instant;

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::Blake2sMac;
use rand_core::{OsRng, RngCore};
use smoltcp::wire::{IpAddress, IpEndpoint};

pub(super) struct IsnSource {
    key: [u8; 32],
    epoch: Instant,
}

impl IsnSource {
    /// A source with a fresh random key; its clock starts at `epoch`.
    pub(super) fn random(epoch: Instant) -> IsnSource {
        let mut key = [0; 32];
        OsRng.fill_bytes(&mut key);
        IsnSource::with_key(key, epoch)
    }

    pub(super) fn with_key(key: [u8; 32], epoch: Instant) -> IsnSource {
        IsnSource { key, epoch }
    }

    /// The ISN for a connection between our `local` and the client's `remote`
    /// endpoint, opened at `now`.
    pub(super) fn isn(&self, local: IpEndpoint, remote: IpEndpoint, now: Instant) -> u32 {
        let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.key)
            .expect("BLAKE2s takes a 32-byte key");
        for endpoint in [local, remote] {
            match endpoint.addr {
                IpAddress::Ipv4(a) => {
                    mac.update(&[4]);
                    mac.update(&a.octets());
                }
                IpAddress::Ipv6(a) => {
                    mac.update(&[6]);
                    mac.update(&a.octets());
                }
            }
            mac.update(&endpoint.port.to_be_bytes());
        }
        let digest = mac.finalize().into_bytes();
        let hash = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        // The clock wraps every 4.8 hours, as the RFC's 32-bit counter does.
        let ticks = (now.saturating_duration_since(self.epoch).as_micros() / 4) as u32;
        hash.wrapping_add(ticks)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;
    use std::time::Duration;

    use super::*;

    fn endpoint(last: u16, port: u16) -> IpEndpoint {
        IpEndpoint::new(
            IpAddress::Ipv6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)),
            port,
        )
    }

    #[test]
    fn the_clock_advances_one_per_four_microseconds() {
        let epoch = Instant::now();
        let isn = IsnSource::with_key([7; 32], epoch);
        let (l, r) = (endpoint(1, 80), endpoint(2, 40000));
        let a = isn.isn(l, r, epoch + Duration::from_secs(1));
        let b = isn.isn(l, r, epoch + Duration::from_secs(2));
        assert_eq!(b.wrapping_sub(a), 250_000);
    }

    #[test]
    fn depends_on_every_part_of_the_tuple_and_the_key() {
        let epoch = Instant::now();
        let isn = IsnSource::with_key([7; 32], epoch);
        let (l, r) = (endpoint(1, 80), endpoint(2, 40000));
        let base = isn.isn(l, r, epoch);
        let variants = [
            isn.isn(endpoint(1, 81), r, epoch),
            isn.isn(endpoint(3, 80), r, epoch),
            isn.isn(l, endpoint(2, 40001), epoch),
            isn.isn(l, endpoint(4, 40000), epoch),
            isn.isn(r, l, epoch),
            IsnSource::with_key([8; 32], epoch).isn(l, r, epoch),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i} has the same ISN");
        }
    }

    #[test]
    fn consecutive_ports_are_not_a_sequence() {
        // A plain counter or a PRNG stepped once per connection would show a constant
        // or small difference between neighbouring connections.
        let epoch = Instant::now();
        let isn = IsnSource::random(epoch);
        let l = endpoint(1, 443);
        let values: Vec<u32> = (0..64)
            .map(|p| isn.isn(l, endpoint(2, 50000 + p), epoch))
            .collect();
        let diffs: std::collections::HashSet<u32> =
            values.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
        assert!(diffs.len() > 60, "differences repeat: {diffs:?}");
    }
}
