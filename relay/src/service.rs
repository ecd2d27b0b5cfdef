//! The one place where peers change: registration, deletion, token revocation,
//! restore at start, usage sync and the reclaiming of released addresses, between
//! the HTTP layer and store + data plane.
//!
//! # Why a service
//!
//! The store is the truth and the data plane (peer table, routes, neighbour
//! answers, shaping) must always equal it. Each change commits to the store
//! durably first, then applies to the data plane. Without sequencing, two calls
//! on the same key can commit in one order and reach the data plane in the other
//! (a delete's removal landing before a racing registration's add, leaving a peer
//! the store has forgotten). So:
//!
//! - every change to a key runs under that key's lock, from its store commit to
//!   its data-plane change;
//! - a registration also holds its token's lock shared, and a revocation holds it
//!   exclusively while it collects the token's peers, takes their key locks
//!   (ascending, so two revocations cannot deadlock), commits, and takes them off
//!   the data plane;
//! - locks are sharded tables of fixed size (hash of the key or token id), so
//!   they never grow; an unlucky shard only costs waiting;
//! - the work runs on its own task: a client that disconnects drops the HTTP
//!   handler, never a change half done.
//!
//! Lock order: token shard, then key shards in ascending order. Nothing holds a
//! key lock while waiting for a token lock.
//!
//! If a store call fails in a way that leaves its outcome unknown (I/O, backend),
//! the data plane is set from what the store says about the key afterwards.

use std::collections::BTreeSet;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sidecar::Key;
use tokio::sync::{Mutex, MutexGuard, RwLock};

use crate::dataplane::{PeerEntry, RelayDataPlane};
use crate::pq::PqKeys;
use crate::store::{
    PeerRecord, RegisterExtras, Registration, Store, StoreError, TokenChange, TokenRecord,
};

/// Live counters of a peer: (last handshake in unix seconds, rx bytes, tx bytes).
pub type PeerStats = (Option<u64>, u64, u64);

/// How long a deleted peer's addresses stay its own unless configured otherwise.
pub const DEFAULT_ADDRESS_HOLD: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often live counters are written back to the store.
pub const USAGE_SYNC_INTERVAL: Duration = Duration::from_secs(10);
/// How often held leases past their hold time are reclaimed.
pub const RECLAIM_INTERVAL: Duration = Duration::from_secs(300);

const KEY_SHARDS: usize = 256;
const TOKEN_SHARDS: usize = 64;

/// The relay's forwarding side, as the service drives it. Implemented by
/// [`RelayDataPlane`]; tests use recording fakes.
///
/// Calls come only after the store has durably recorded the change, under the
/// key's lock, and are not retried: implementations must apply them (or queue
/// them) infallibly.
pub trait DataPlane: Send + Sync + 'static {
    /// Start forwarding for a peer, or refresh it: called on every successful
    /// registration, including idempotent re-registrations, because those can
    /// change the peer's addresses (IPv4 gained, or re-addressed after an address
    /// plan change). Must be an upsert that keeps a live session.
    fn add_peer(&self, peer: &PeerEntry);
    /// Stop forwarding for a peer (deleted, or its token revoked).
    fn remove_peer(&self, key: &Key);
    /// Live counters for a peer; `None` if the data plane does not know the key
    /// (callers then use the values last persisted in the store).
    fn peer_stats(&self, key: &Key) -> Option<PeerStats>;
    /// Where the peer was last seen, to persist for the next start.
    fn peer_endpoint(&self, _key: &Key) -> Option<SocketAddr> {
        None
    }
    /// Give a restored peer the endpoint it had before a restart.
    fn restore_endpoint(&self, _key: &Key, _endpoint: SocketAddr) {}
}

impl DataPlane for RelayDataPlane {
    fn add_peer(&self, peer: &PeerEntry) {
        self.add(peer);
    }
    fn remove_peer(&self, key: &Key) {
        self.remove(key);
    }
    fn peer_stats(&self, key: &Key) -> Option<PeerStats> {
        self.stats(key)
    }
    fn peer_endpoint(&self, key: &Key) -> Option<SocketAddr> {
        self.endpoint(key)
    }
    fn restore_endpoint(&self, key: &Key, endpoint: SocketAddr) {
        RelayDataPlane::restore_endpoint(self, key, endpoint);
    }
}

/// Settings of the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceOptions {
    /// How long a deleted peer's addresses stay reserved for its key.
    pub address_hold: Duration,
    /// Peers without a completed handshake for this long are expired; `None`: never.
    pub peer_ttl: Option<Duration>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            address_hold: DEFAULT_ADDRESS_HOLD,
            peer_ttl: None,
        }
    }
}

/// What restoring the data plane at start did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Peers put on the data plane.
    pub peers: usize,
    /// Peers left off: their stored address is outside the configured plan.
    pub out_of_plan: usize,
}

/// Sequences every change to peers. Cheap to clone; clones share the locks.
#[derive(Clone)]
pub struct PeerService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    dataplane: Arc<dyn DataPlane>,
    locks: Locks,
    options: ServiceOptions,
    /// Derives each peer's post-quantum preshared key; `None` on a relay without
    /// an X-Wing key (tests of other parts), where no peer gets one.
    pq: Option<Arc<PqKeys>>,
    /// Unix seconds of this start: no peer could handshake while the relay was down,
    /// so expiry counts from here at the earliest.
    started: u64,
}

impl PeerService {
    pub fn new(store: Store, dataplane: Arc<dyn DataPlane>, options: ServiceOptions) -> Self {
        PeerService::with_pq(store, dataplane, options, None)
    }

    /// A service whose peers get the preshared keys their X-Wing ciphertexts give
    /// with `pq`'s key pair.
    pub fn with_pq(
        store: Store,
        dataplane: Arc<dyn DataPlane>,
        options: ServiceOptions,
        pq: Option<Arc<PqKeys>>,
    ) -> Self {
        PeerService {
            inner: Arc::new(Inner {
                store,
                dataplane,
                locks: Locks::new(),
                options,
                pq,
                started: unix_now(),
            }),
        }
    }

    /// The post-quantum keys and policy, if this relay has them.
    pub fn pq(&self) -> Option<&Arc<PqKeys>> {
        self.inner.pq.as_ref()
    }

    /// The store, for reads (authentication, listings). Changes to peers must go
    /// through the service.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn options(&self) -> ServiceOptions {
        self.inner.options
    }

    /// Live counters of a peer, if the data plane has it.
    pub fn peer_stats(&self, key: &Key) -> Option<PeerStats> {
        self.inner.dataplane.peer_stats(key)
    }

    /// Registers (or re-registers) a peer under `token` and puts it on the data
    /// plane. Returns the record and whether it was created. Once this returns
    /// `Ok`, the registration is durable.
    pub async fn register(
        &self,
        token: &TokenRecord,
        reg: Registration,
    ) -> Result<(PeerRecord, bool), StoreError> {
        self.register_with(token, reg, RegisterExtras::default())
            .await
    }

    /// [`PeerService::register`] with the X-Wing ciphertext and machine fingerprint
    /// the client sent (see [`Store::register_with`]).
    pub async fn register_with(
        &self,
        token: &TokenRecord,
        reg: Registration,
        extras: RegisterExtras,
    ) -> Result<(PeerRecord, bool), StoreError> {
        let this = self.clone();
        let token = token.clone();
        detach(async move {
            let inner = &this.inner;
            let _token = inner.locks.token(&token.id).read().await;
            let _key = inner.locks.key(&reg.public_key).lock().await;
            let key = reg.public_key;
            match inner.store.register_with(&token, reg, extras).await {
                Ok((peer, created)) => {
                    // The caller's copy of the token may predate a change of its
                    // limits; under the token lock the stored one is current.
                    let token = inner.store.token(&token.id)?.unwrap_or(token);
                    inner.dataplane.add_peer(&inner.entry(&peer, &token));
                    Ok((peer, created))
                }
                Err(e) => {
                    inner.settle_after(&e, &key);
                    Err(e)
                }
            }
        })
        .await
    }

    /// Deletes a peer of `token_id` and takes it off the data plane. `None` if
    /// the token has no such peer. Its addresses stay held for the key for the
    /// configured hold time.
    pub async fn delete(
        &self,
        token_id: &str,
        key: &Key,
    ) -> Result<Option<PeerRecord>, StoreError> {
        let this = self.clone();
        let token_id = token_id.to_owned();
        let key = *key;
        detach(async move {
            let inner = &this.inner;
            let _key = inner.locks.key(&key).lock().await;
            match inner.store.delete_peer(&token_id, &key).await {
                Ok(removed) => {
                    if removed.is_some() {
                        inner.dataplane.remove_peer(&key);
                    }
                    Ok(removed)
                }
                Err(e) => {
                    inner.settle_after(&e, &key);
                    Err(e)
                }
            }
        })
        .await
    }

    /// Revokes a token and takes all its peers off the data plane; returns them.
    /// [`StoreError::NotFound`] if there is no such token.
    pub async fn revoke_token(&self, id: &str) -> Result<Vec<PeerRecord>, StoreError> {
        let this = self.clone();
        let id = id.to_owned();
        detach(async move {
            let inner = &this.inner;
            // No registration of this token can start or be in flight now, so its
            // peer list can only shrink (deletes) until the revocation commits.
            let _token = inner.locks.token(&id).write().await;
            let keys: Vec<Key> = inner
                .store
                .peers(Some(&id))?
                .iter()
                .map(|p| p.public_key)
                .collect();
            let _keys = inner.locks.keys(&keys).await;
            match inner.store.revoke_token(&id).await {
                Ok(removed) => {
                    for peer in &removed {
                        inner.dataplane.remove_peer(&peer.public_key);
                    }
                    Ok(removed)
                }
                Err(e) => {
                    for key in &keys {
                        inner.settle_after(&e, key);
                    }
                    Err(e)
                }
            }
        })
        .await
    }

    /// Changes a token (see [`Store::update_token`]) and applies its new bandwidth
    /// cap and isolation to its live peers at once.
    pub async fn update_token(
        &self,
        id: &str,
        change: TokenChange,
    ) -> Result<TokenRecord, StoreError> {
        let this = self.clone();
        let id = id.to_owned();
        detach(async move {
            let inner = &this.inner;
            // No registration of this token runs meanwhile, so its peers are these.
            let _token = inner.locks.token(&id).write().await;
            let peers = inner.store.peers(Some(&id))?;
            let keys: Vec<Key> = peers.iter().map(|p| p.public_key).collect();
            let _keys = inner.locks.keys(&keys).await;
            match inner.store.update_token(&id, change).await {
                Ok(token) => {
                    for key in &keys {
                        // Read again under the lock: a delete may have won the race.
                        match inner.store.peer(key)? {
                            Some(peer) => inner.dataplane.add_peer(&inner.entry(&peer, &token)),
                            None => inner.dataplane.remove_peer(key),
                        }
                    }
                    Ok(token)
                }
                Err(e) => {
                    for key in &keys {
                        inner.settle_after(&e, key);
                    }
                    Err(e)
                }
            }
        })
        .await
    }

    /// Puts every stored peer on the data plane with its last endpoint. Run once
    /// at start, before the API serves.
    pub async fn restore(&self) -> Result<Restored, StoreError> {
        let inner = &self.inner;
        let mut restored = Restored::default();
        for peer in inner.store.peers(None)? {
            let _key = inner.locks.key(&peer.public_key).lock().await;
            // Read again under the lock: the listing is not a snapshot.
            let Some(peer) = inner.store.peer(&peer.public_key)? else {
                continue;
            };
            if !inner.store.in_plan(&peer) {
                tracing::warn!(peer = %peer.public_key, ipv6 = %peer.ipv6, "peer's address is outside the configured prefix; it gets a new one when it registers again");
                restored.out_of_plan += 1;
                continue;
            }
            let Some(token) = inner.store.token(&peer.token_id)? else {
                continue;
            };
            inner.dataplane.add_peer(&inner.entry(&peer, &token));
            if let Some(endpoint) = peer.endpoint {
                inner.dataplane.restore_endpoint(&peer.public_key, endpoint);
            }
            restored.peers += 1;
        }
        Ok(restored)
    }

    /// Writes the data plane's live counters and endpoints back to the store.
    /// Returns how many peers were recorded. The store's compare-and-swap never
    /// brings back a peer deleted meanwhile.
    pub async fn sync_usage(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let mut recorded = 0;
        for peer in inner.store.peers(None)? {
            let key = peer.public_key;
            let _key = inner.locks.key(&key).lock().await;
            let Some((handshake, rx, tx)) = inner.dataplane.peer_stats(&key) else {
                continue;
            };
            let endpoint = inner.dataplane.peer_endpoint(&key);
            match inner
                .store
                .record_usage(&key, handshake, rx, tx, endpoint)
                .await
            {
                Ok(()) => recorded += 1,
                Err(e) => tracing::warn!(peer = %key, error = %e, "cannot record usage"),
            }
        }
        Ok(recorded)
    }

    /// Reclaims the leases of peers deleted at least the hold time before `now`
    /// (unix seconds); their addresses may go to other keys from then on. Returns
    /// how many. Reclaimed keys are on no data plane, and the store's transaction
    /// orders this against a racing registration of the same key.
    pub async fn reclaim_expired(&self, now: u64) -> Result<usize, StoreError> {
        let hold = self.inner.options.address_hold.as_secs();
        // Strictly before the cutoff: a peer released exactly `hold` ago is due.
        let cutoff = now.saturating_sub(hold).saturating_add(1);
        self.inner.store.reclaim_released(cutoff).await
    }

    /// Expires the peers whose last sign of life (their last completed handshake,
    /// else their registration) is at least `peer_ttl` before `now` (unix seconds),
    /// as a delete would: off the data plane, out of the quota, addresses held for
    /// the key. Returns how many. Nothing when no `peer_ttl` is set.
    pub async fn expire_idle(&self, now: u64) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let Some(ttl) = inner.options.peer_ttl else {
            return Ok(0);
        };
        let mut expired = 0;
        for listed in inner.store.peers(None)? {
            let key = listed.public_key;
            let _key = inner.locks.key(&key).lock().await;
            // Read again under the lock: it may have re-registered or gone.
            let Some(peer) = inner.store.peer(&key)? else {
                continue;
            };
            let live = inner.dataplane.peer_stats(&key).and_then(|(h, _, _)| h);
            if !idle_past(&peer, live.max(Some(inner.started)), now, ttl.as_secs()) {
                continue;
            }
            match inner.store.delete_peer(&peer.token_id, &key).await {
                Ok(Some(_)) => {
                    inner.dataplane.remove_peer(&key);
                    expired += 1;
                    tracing::info!(peer = %key, token_id = %peer.token_id, ipv6 = %peer.ipv6, last_handshake = ?peer.last_handshake.max(live), ttl_secs = ttl.as_secs(), "expired a peer with no handshake within peer_ttl; its addresses are held for its key");
                }
                Ok(None) => {}
                Err(e) => {
                    inner.settle_after(&e, &key);
                    tracing::warn!(peer = %key, error = %e, "cannot expire an idle peer");
                }
            }
        }
        Ok(expired)
    }

    /// The periodic work: usage sync every [`USAGE_SYNC_INTERVAL`], reclaiming
    /// every [`RECLAIM_INTERVAL`] and, with a `peer_ttl`, expiring idle peers a few
    /// times per ttl. Runs until dropped (abort its task).
    pub async fn run_periodic(self) {
        let mut expiry = self.inner.options.peer_ttl.map(|ttl| {
            let mut t =
                tokio::time::interval((ttl / 4).clamp(Duration::from_secs(1), RECLAIM_INTERVAL));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut usage = tokio::time::interval(USAGE_SYNC_INTERVAL);
        let mut reclaim = tokio::time::interval(RECLAIM_INTERVAL);
        usage.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reclaim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first usage tick is immediate and there is nothing to sync yet.
        usage.tick().await;
        loop {
            tokio::select! {
                _ = usage.tick() => {
                    if let Err(e) = self.sync_usage().await {
                        tracing::warn!(error = %e, "cannot list peers to record usage");
                    }
                }
                _ = reclaim.tick() => match self.reclaim_expired(unix_now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(leases = n, "reclaimed the addresses of peers deleted before the hold time"),
                    Err(e) => tracing::warn!(error = %e, "cannot reclaim released addresses"),
                },
                Some(_) = next_tick(expiry.as_mut()) => {
                    if let Err(e) = self.expire_idle(unix_now()).await {
                        tracing::warn!(error = %e, "cannot list peers to expire idle ones");
                    }
                }
            }
        }
    }
}

impl Inner {
    /// The data plane's view of a stored peer, preshared key included.
    fn entry(&self, peer: &PeerRecord, token: &TokenRecord) -> PeerEntry {
        let psk = self.pq.as_ref().and_then(|pq| pq.psk_for(peer));
        PeerEntry::new(peer, token).with_psk(psk)
    }

    /// After a failed store call: if the failure says nothing changed, nothing
    /// to do; otherwise make the data plane match what the store now holds.
    fn settle_after(&self, err: &StoreError, key: &Key) {
        let unknown = matches!(
            err,
            StoreError::Io(_) | StoreError::Backend(_) | StoreError::Corrupt(_)
        );
        if unknown {
            self.settle(key);
        }
    }

    /// Sets the data plane's view of `key` from the store. Caller holds the key lock.
    fn settle(&self, key: &Key) {
        let current = self.store.peer(key).and_then(|peer| match peer {
            Some(peer) => Ok(self.store.token(&peer.token_id)?.map(|t| (peer, t))),
            None => Ok(None),
        });
        match current {
            Ok(Some((peer, token))) => self.dataplane.add_peer(&self.entry(&peer, &token)),
            Ok(None) => self.dataplane.remove_peer(key),
            Err(e) => {
                // Cannot read the store either: forwarding for a peer the store may
                // have lost is the worse outcome.
                tracing::error!(peer = %key, error = %e, "store unreadable; taking the peer off the data plane");
                self.dataplane.remove_peer(key);
            }
        }
    }
}

/// Fixed-size lock tables for keys and tokens.
struct Locks {
    keys: Vec<Mutex<()>>,
    tokens: Vec<RwLock<()>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Locks {
    fn new() -> Locks {
        Locks {
            keys: (0..KEY_SHARDS).map(|_| Mutex::new(())).collect(),
            tokens: (0..TOKEN_SHARDS).map(|_| RwLock::new(())).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, what: impl Hash, shards: usize) -> usize {
        (self.hasher.hash_one(what) % shards as u64) as usize
    }

    fn key(&self, key: &Key) -> &Mutex<()> {
        &self.keys[self.shard(key.0, KEY_SHARDS)]
    }

    fn token(&self, id: &str) -> &RwLock<()> {
        &self.tokens[self.shard(id, TOKEN_SHARDS)]
    }

    /// The locks of all `keys`, each shard once, taken in ascending order.
    async fn keys(&self, keys: &[Key]) -> Vec<MutexGuard<'_, ()>> {
        let shards: BTreeSet<usize> = keys.iter().map(|k| self.shard(k.0, KEY_SHARDS)).collect();
        let mut guards = Vec::with_capacity(shards.len());
        for shard in shards {
            guards.push(self.keys[shard].lock().await);
        }
        guards
    }
}

/// Runs `work` on its own task, so dropping the caller cannot cut it in half.
async fn detach<T, F>(work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    tokio::spawn(work)
        .await
        .map_err(|e| StoreError::Backend(format!("peer service task failed: {e}")))?
}

/// Whether `peer` has shown no life for `ttl` seconds at `now`: its latest completed
/// handshake (the data plane's `live` one or the stored one), else its registration.
pub fn idle_past(peer: &PeerRecord, live: Option<u64>, now: u64, ttl: u64) -> bool {
    let last = live.max(peer.last_handshake).unwrap_or(0).max(peer.created);
    now.saturating_sub(last) >= ttl
}

/// The next tick of `interval`, or never when there is none.
async fn next_tick(interval: Option<&mut tokio::time::Interval>) -> Option<tokio::time::Instant> {
    match interval {
        Some(i) => Some(i.tick().await),
        None => std::future::pending().await,
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
