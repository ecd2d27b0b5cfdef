//! The service against a recording data plane: racing changes on overlapping keys
//! and tokens always leave the data plane equal to the store, and reclaiming keeps
//! the store and the prefix bounded under churn (time passed in, no sleeping).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex as PlMutex;
use ring::digest::{digest, SHA256};

use super::*;
use crate::store::{AddressPlan, TokenSpec};

/// The data plane's state, not a log: what a real one would forward for.
#[derive(Default)]
struct StateDataPlane {
    peers: PlMutex<HashMap<Key, PeerEntry>>,
    stats: PlMutex<HashMap<Key, PeerStats>>,
    calls: AtomicU64,
}

impl DataPlane for StateDataPlane {
    fn add_peer(&self, peer: &PeerEntry) {
        self.dawdle(&peer.public_key);
        self.peers.lock().insert(peer.public_key, peer.clone());
    }
    fn remove_peer(&self, key: &Key) {
        self.dawdle(key);
        self.peers.lock().remove(key);
    }
    fn peer_stats(&self, key: &Key) -> Option<PeerStats> {
        self.stats.lock().get(key).copied()
    }
}

impl StateDataPlane {
    /// A real data plane takes a while (netlink routes, the peer table lock), and
    /// not always the same while: that is what lets a later change overtake an
    /// earlier one when nothing orders them.
    fn dawdle(&self, key: &Key) {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let micros = (u64::from(key.0[0]) ^ n.wrapping_mul(0x9e37_79b9)) % 400;
        std::thread::sleep(Duration::from_micros(micros));
    }

    fn snapshot(&self) -> BTreeMap<String, PeerEntry> {
        self.peers
            .lock()
            .values()
            .map(|p| (p.public_key.to_base64(), p.clone()))
            .collect()
    }
}

/// What the data plane must hold according to the store.
fn expected(store: &Store) -> BTreeMap<String, PeerEntry> {
    store
        .peers(None)
        .unwrap()
        .into_iter()
        .map(|p| {
            let token = store
                .token(&p.token_id)
                .unwrap()
                .expect("peer's token exists");
            (p.public_key.to_base64(), PeerEntry::new(&p, &token))
        })
        .collect()
}

fn key(i: u64) -> Key {
    let mut k = [0u8; 32];
    k.copy_from_slice(digest(&SHA256, &i.to_be_bytes()).as_ref());
    Key(k)
}

fn reg(k: Key, ipv4: bool) -> Registration {
    Registration {
        public_key: k,
        ipv4,
        name: None,
        container: None,
    }
}

fn plan(v6: &str, v4: Option<&str>) -> AddressPlan {
    AddressPlan {
        ipv6: v6.parse().unwrap(),
        ipv4_pool: v4.map(|p| p.parse().unwrap()),
        reserved: vec![],
    }
}

fn service(plan: AddressPlan, hold: Duration) -> (PeerService, Arc<StateDataPlane>) {
    let store = Store::temporary(plan).unwrap();
    let dp = Arc::new(StateDataPlane::default());
    let svc = PeerService::new(
        store,
        dp.clone(),
        ServiceOptions {
            address_hold: hold,
            ..ServiceOptions::default()
        },
    );
    (svc, dp)
}

async fn tenant(svc: &PeerService, name: &str, bw: Option<u32>) -> TokenRecord {
    svc.store()
        .create_token(TokenSpec {
            bandwidth_mbps: bw,
            ..TokenSpec::tenant(name, 1000, 1000)
        })
        .await
        .unwrap()
        .0
}

/// A small deterministic generator, so a failing interleaving's inputs repeat.
struct Rng(AtomicU64);

impl Rng {
    fn next(&self, below: u64) -> u64 {
        let mut x = self.0.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.store(x, Ordering::Relaxed);
        x % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_register_delete_revoke_leave_the_data_plane_equal_to_the_store() {
    const KEYS: u64 = 24;
    const OPS: usize = 800;
    const WORKERS: usize = 40;
    let (svc, dp) = service(
        plan("2001:db8:7::/64", Some("192.0.2.0/26")),
        DEFAULT_ADDRESS_HOLD,
    );
    // Tokens come and go: revocations replace a token with a fresh one.
    let mut tokens = Vec::new();
    for i in 0..4 {
        tokens.push(tenant(&svc, &format!("t{i}"), [None, Some(10)][i % 2]).await);
    }
    let tokens = Arc::new(PlMutex::new(tokens));
    let rng = Arc::new(Rng(AtomicU64::new(0x9e37_79b9_7f4a_7c15)));
    // Workers each run a sequence of calls, so every call sees the tokens of
    // its moment; together they keep WORKERS calls in flight.
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let svc = svc.clone();
        let tokens = tokens.clone();
        let rng = rng.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..OPS / WORKERS {
                let k = key(rng.next(KEYS));
                let slot = rng.next(4) as usize;
                let tok = tokens.lock()[slot].clone();
                match rng.next(20) {
                    0..=9 => drop(svc.register(&tok, reg(k, rng.next(2) == 0)).await),
                    10..=18 => drop(svc.delete(&tok.id, &k).await),
                    _ => {
                        if svc.revoke_token(&tok.id).await.is_ok() {
                            let fresh = tenant(&svc, "fresh", None).await;
                            tokens.lock()[slot] = fresh;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    svc.store().verify().unwrap();
    let want = expected(svc.store());
    assert_eq!(dp.snapshot(), want);
    assert!(
        !want.is_empty(),
        "the mix should leave some peers registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_rounds_of_races_on_one_key_and_one_token() {
    // The tightest overlap: everything on one key, two tokens (one of them is
    // revoked and replaced each round), the outcome checked every round.
    let (svc, dp) = service(
        plan("2001:db8:8::/64", Some("192.0.2.0/28")),
        DEFAULT_ADDRESS_HOLD,
    );
    let k = key(7);
    let keeper = tenant(&svc, "keeper", Some(5)).await;
    for round in 0..60 {
        let victim = tenant(&svc, "victim", None).await;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let svc = svc.clone();
            let (victim, keeper) = (victim.clone(), keeper.clone());
            tasks.push(tokio::spawn(async move {
                match (i + round) % 4 {
                    0 => drop(svc.register(&victim, reg(k, i % 2 == 0)).await),
                    1 => drop(svc.register(&keeper, reg(k, false)).await),
                    2 => drop(svc.delete(&victim.id, &k).await),
                    _ => drop(svc.revoke_token(&victim.id).await),
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(dp.snapshot(), expected(svc.store()), "round {round}");
        let _ = svc.revoke_token(&victim.id).await;
        let _ = svc.delete(&keeper.id, &k).await;
        assert!(dp.snapshot().is_empty(), "round {round}");
    }
    svc.store().verify().unwrap();
}

#[tokio::test]
async fn a_dropped_caller_cannot_cut_a_change_in_half() {
    let (svc, dp) = service(plan("2001:db8:9::/64", None), DEFAULT_ADDRESS_HOLD);
    let tok = tenant(&svc, "t", None).await;
    for i in 0..50 {
        let call = svc.register(&tok, reg(key(i), false));
        // Poll once, then drop: the spawned work must still finish.
        let _ = tokio::time::timeout(Duration::from_micros(1), call).await;
    }
    // Every registration that reached the store reaches the data plane.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if svc.store().peer_count() == 50 && dp.snapshot().len() == 50 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "registrations lost");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dp.snapshot(), expected(svc.store()));
}

#[tokio::test]
async fn restore_and_usage_sync_follow_the_store() {
    let store = Store::temporary(plan("2001:db8:a::/64", Some("192.0.2.0/28"))).unwrap();
    let first = PeerService::new(
        store.clone(),
        Arc::new(StateDataPlane::default()),
        ServiceOptions::default(),
    );
    let tok = tenant(&first, "t", Some(3)).await;
    for i in 0..5 {
        first.register(&tok, reg(key(i), i == 0)).await.unwrap();
    }
    first.delete(&tok.id, &key(4)).await.unwrap().unwrap();

    // A new data plane (a restart) gets exactly the stored peers.
    let dp = Arc::new(StateDataPlane::default());
    let svc = PeerService::new(store.clone(), dp.clone(), ServiceOptions::default());
    let restored = svc.restore().await.unwrap();
    assert_eq!(
        restored,
        Restored {
            peers: 4,
            out_of_plan: 0
        }
    );
    assert_eq!(dp.snapshot(), expected(&store));

    dp.stats
        .lock()
        .insert(key(0), (Some(1_700_000_000), 10, 20));
    // A peer the data plane still counts but the store deleted stays deleted.
    dp.stats.lock().insert(key(4), (Some(1_700_000_000), 1, 2));
    assert_eq!(svc.sync_usage().await.unwrap(), 1);
    let rec = store.peer(&key(0)).unwrap().unwrap();
    assert_eq!(
        (rec.last_handshake, rec.rx_bytes, rec.tx_bytes),
        (Some(1_700_000_000), 10, 20)
    );
    assert!(store.peer(&key(4)).unwrap().is_none());
}

#[tokio::test]
async fn a_deleted_key_keeps_its_addresses_for_the_hold_time_only() {
    let hold = Duration::from_secs(3600);
    let (svc, dp) = service(plan("2001:db8:b::/119", Some("192.0.2.0/29")), hold);
    let tok = tenant(&svc, "t", None).await;
    let (first, _) = svc.register(&tok, reg(key(1), true)).await.unwrap();
    let before = unix_now();
    svc.delete(&tok.id, &key(1)).await.unwrap().unwrap();
    assert_eq!(svc.store().held(), 1);

    // Within the hold nothing is reclaimed and the key gets both addresses back.
    assert_eq!(
        svc.reclaim_expired(before + hold.as_secs() - 1)
            .await
            .unwrap(),
        0
    );
    let (again, created) = svc.register(&tok, reg(key(1), true)).await.unwrap();
    assert!(created);
    assert_eq!((again.ipv6, again.ipv4), (first.ipv6, first.ipv4));
    assert_eq!(svc.store().held(), 0, "registering again lifts the hold");

    // Deleted again; once the hold has passed the lease goes.
    svc.delete(&tok.id, &key(1)).await.unwrap().unwrap();
    let released = unix_now();
    assert_eq!(
        svc.reclaim_expired(released + hold.as_secs())
            .await
            .unwrap(),
        1
    );
    assert_eq!(svc.store().held(), 0);
    svc.store().verify().unwrap();
    let counts: HashMap<_, _> = svc.store().entry_counts().into_iter().collect();
    for tree in [
        "peers", "leases", "v6_owner", "v4_owner", "v4_lease", "released",
    ] {
        assert_eq!(counts[tree], 0, "{tree} still has entries: {counts:?}");
    }
    assert!(dp.snapshot().is_empty());
}

#[tokio::test]
async fn a_registered_key_is_never_reclaimed() {
    let (svc, _dp) = service(plan("2001:db8:c::/64", None), Duration::ZERO);
    let tok = tenant(&svc, "t", None).await;
    let (rec, _) = svc.register(&tok, reg(key(1), false)).await.unwrap();
    assert_eq!(
        svc.reclaim_expired(unix_now() + 1_000_000).await.unwrap(),
        0
    );
    svc.delete(&tok.id, &key(1)).await.unwrap().unwrap();
    let (back, _) = svc.register(&tok, reg(key(1), false)).await.unwrap();
    assert_eq!(back.ipv6, rec.ipv6);
    // The stale hold entry, if any, must not take the live peer's address away.
    assert_eq!(
        svc.reclaim_expired(unix_now() + 1_000_000).await.unwrap(),
        0
    );
    assert_eq!(svc.store().peer(&key(1)).unwrap().unwrap().ipv6, rec.ipv6);
    svc.store().verify().unwrap();
}

#[tokio::test]
async fn churn_neither_grows_the_store_nor_uses_up_a_small_prefix() {
    // A /119 has 256 usable addresses and the pool 6; 1,200 distinct keys come and
    // go, far more than either could hold for good.
    const ROUNDS: u64 = 40;
    const PER_ROUND: u64 = 30;
    let hold = Duration::from_secs(600);
    let (svc, dp) = service(plan("2001:db8:d::/119", Some("192.0.2.0/29")), hold);
    let tok = tenant(&svc, "t", None).await;
    let revoked = tenant(&svc, "r", None).await;
    let mut clock = unix_now();
    let mut baseline = None;
    let mut seen = std::collections::HashSet::new();
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            let k = key(round * PER_ROUND + i);
            let (rec, _) = svc
                .register(&tok, reg(k, i < 4))
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            seen.insert(rec.ipv6);
        }
        for i in 0..PER_ROUND {
            svc.delete(&tok.id, &key(round * PER_ROUND + i))
                .await
                .unwrap()
                .unwrap();
        }
        // Past the hold of everything released so far.
        clock = clock.max(unix_now()) + hold.as_secs();
        let reclaimed = svc.reclaim_expired(clock).await.unwrap();
        assert_eq!(reclaimed, PER_ROUND as usize, "round {round}");
        let total: usize = svc.store().entry_counts().iter().map(|(_, n)| n).sum();
        // Only the IPv4 free list may still fill up (to the pool's size).
        let first = *baseline.get_or_insert(total);
        assert!(
            total <= first + 6,
            "round {round}: store grew from {first} to {total} entries"
        );
    }
    // Revocation holds and reclaims like deletion.
    for i in 0..PER_ROUND {
        svc.register(&revoked, reg(key(10_000 + i), false))
            .await
            .unwrap();
    }
    svc.revoke_token(&revoked.id).await.unwrap();
    assert_eq!(svc.store().held(), PER_ROUND as usize);
    clock = clock.max(unix_now()) + hold.as_secs();
    assert_eq!(
        svc.reclaim_expired(clock).await.unwrap(),
        PER_ROUND as usize
    );

    assert!(
        seen.len() <= 256,
        "addresses outside the /119: {}",
        seen.len()
    );
    let counts: HashMap<_, _> = svc.store().entry_counts().into_iter().collect();
    for tree in [
        "peers",
        "leases",
        "v6_owner",
        "v4_owner",
        "v4_lease",
        "released",
        "token_peers",
    ] {
        assert_eq!(counts[tree], 0, "{tree}: {counts:?}");
    }
    assert!(
        counts["v4_free"] <= 6 && counts["v4_free_seq"] <= 6,
        "{counts:?}"
    );
    svc.store().verify().unwrap();
    assert!(dp.snapshot().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_racing_new_registrations_of_its_token_leaves_none_behind() {
    // New keys joining a token while it is revoked: the revocation must neither
    // miss a peer the store gave the token nor remove one it kept.
    let (svc, dp) = service(plan("2001:db8:e::/64", None), DEFAULT_ADDRESS_HOLD);
    for round in 0..80u64 {
        let tok = tenant(&svc, "t", None).await;
        let mut tasks = Vec::new();
        for i in 0..10u64 {
            let (svc, tok) = (svc.clone(), tok.clone());
            tasks.push(tokio::spawn(async move {
                if i == 4 {
                    drop(svc.revoke_token(&tok.id).await);
                } else {
                    drop(svc.register(&tok, reg(key(round * 100 + i), false)).await);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(dp.snapshot(), expected(svc.store()), "round {round}");
        // Whatever registered after the revocation was refused: nothing is left.
        assert!(dp.snapshot().is_empty(), "round {round}");
    }
}

#[test]
fn a_peer_is_idle_past_its_ttl_from_its_last_handshake_or_registration() {
    use super::idle_past;
    let mut peer = crate::store::PeerRecord {
        public_key: Key([9; 32]),
        token_id: "tok_1".into(),
        ipv6: "2001:db8::9".parse().unwrap(),
        ipv4: None,
        name: None,
        container: None,
        created: 1_000,
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
        endpoint: None,
        pq_ciphertext: None,
        pq_counter: 0,
    };
    // Never handshook: counted from the registration.
    assert!(!idle_past(&peer, None, 1_099, 100));
    assert!(idle_past(&peer, None, 1_100, 100));
    // A stored handshake or a newer live one pushes it out.
    peer.last_handshake = Some(1_050);
    assert!(!idle_past(&peer, None, 1_149, 100));
    assert!(idle_past(&peer, None, 1_150, 100));
    assert!(!idle_past(&peer, Some(1_200), 1_250, 100));
    // A clock that went back never expires anyone.
    assert!(!idle_past(&peer, None, 10, 100));
}
