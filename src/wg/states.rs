//! Making, installing and scheduling the peers' noise states. A state is made from
//! the device's keys as read under the table's lock, but installed under the peer's
//! own lock; a private key change in between must not leave the peer on the old key.

use std::sync::atomic::Ordering;
use std::time::Instant;

use parking_lot::MutexGuard;

use super::device::{Device, State};
use super::peer::PeerRef;
use super::session::NoiseState;

/// A noise state made from the keys of one private key epoch.
pub(crate) struct Fresh {
    state: NoiseState,
    epoch: u64,
}

impl Device {
    /// A new noise state for `peer` from the keys in `state` (the table's lock held,
    /// so keys and epoch belong together); `None` without a private key.
    pub(crate) fn fresh_noise(&self, state: &State, peer: &PeerRef, now: Instant) -> Option<Fresh> {
        let keys = state.keys.as_ref()?;
        let psk = *peer.preshared_key.read();
        Some(Fresh {
            state: NoiseState::new(keys, &peer.public_key, psk, peer.index, now),
            epoch: self.key_epoch.load(Ordering::Acquire),
        })
    }

    /// Puts `fresh` in the peer's slot (its lock held as `slot`) unless the private
    /// key changed since it was made; then the timers visit the peer.
    pub(crate) fn install_noise(
        &self,
        peer: &PeerRef,
        slot: &mut MutexGuard<'_, Option<NoiseState>>,
        fresh: Fresh,
    ) -> bool {
        // The key change bumps the epoch before it clears the peers' states under
        // their locks, so under this lock a stale epoch is always seen.
        if fresh.epoch != self.key_epoch.load(Ordering::Acquire) {
            tracing::debug!(peer = %peer.public_key, "noise state from a replaced private key discarded");
            return false;
        }
        let installed = slot.insert(fresh.state);
        self.schedule(installed);
        self.live.lock().insert(peer.index, peer.clone());
        true
    }

    /// Makes the timers' deadline no later than what `noise` needs next.
    pub(crate) fn schedule(&self, noise: &NoiseState) {
        if let Some(at) = noise.poll_timeout() {
            self.timers_due.lower(self.clock.ns(at));
        }
    }
}
