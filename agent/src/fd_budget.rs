//! File descriptors: the agent raises its soft RLIMIT_NOFILE to the hard limit at
//! start, and gives every netstack-mode container a fixed share of it.
//!
//! A netstack container holds one upstream socket per TCP connection and UDP flow of
//! its clients. Without a share, one container under a flood of new flows could take
//! every descriptor, and the next container's TUN device, netstack or UDP socket (or
//! the agent's own connection to Docker) could not be opened.

use std::io;
use std::sync::OnceLock;

use sidecar::netstack::NetstackLimits;

/// Kept for the agent itself: Docker and relay connections, and per container its
/// UDP socket, namespace file and TUN device.
const RESERVE: u64 = 512;
/// The number of netstack containers the shares are sized for; more still work, and
/// each is held to the same share.
const PLANNED_CONTAINERS: u64 = 32;
/// A share never goes below this, even when the limit is tiny.
const MIN_SHARE: u64 = 64;

static SHARE: OnceLock<usize> = OnceLock::new();

/// What [`raise`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub before: u64,
    pub after: u64,
    /// Descriptors one netstack container may hold.
    pub share: usize,
}

/// Raises the soft limit to the hard one and fixes each container's share. Call once,
/// before any container is set up.
pub fn raise() -> io::Result<Raised> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    let share = share_of(limit.rlim_cur);
    let _ = SHARE.set(share);
    Ok(Raised {
        before,
        after: limit.rlim_cur,
        share,
    })
}

fn share_of(limit: u64) -> usize {
    let share = (limit.saturating_sub(RESERVE) / PLANNED_CONTAINERS).max(MIN_SHARE);
    let most = NetstackLimits::default().descriptors() as u64;
    usize::try_from(share.min(most)).unwrap_or(usize::MAX)
}

/// The caps of one netstack container, within its share of descriptors.
pub fn netstack_limits() -> NetstackLimits {
    let share = *SHARE.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in `raise`.
        let cur = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur
        } else {
            1024
        };
        share_of(cur)
    });
    NetstackLimits::for_descriptors(share)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_fit_the_limit_and_the_defaults() {
        // Debian's default soft limit: every planned container fits beside the reserve.
        assert_eq!(share_of(1024), 64);
        let s = share_of(65_536) as u64;
        assert!(s * PLANNED_CONTAINERS + RESERVE <= 65_536, "{s}");
        // A large limit gives the full default caps, no more.
        assert_eq!(share_of(1 << 20), NetstackLimits::default().descriptors());
        let limits = NetstackLimits::for_descriptors(share_of(65_536));
        assert!(limits.descriptors() <= share_of(65_536));
        assert!(limits.tcp_half_open >= 1 && limits.udp_flows_per_source >= 1);
    }
}
