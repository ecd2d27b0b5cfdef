use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

/// Set in the child process of the crash test; names the store directory.
const CRASH_ENV: &str = "SIDECAR_STORE_CRASH_DIR";

fn plan() -> AddressPlan {
    AddressPlan {
        ipv6: "2001:db8:1::/64".parse().unwrap(),
        ipv4_pool: Some("192.0.2.0/24".parse().unwrap()),
        reserved: vec!["192.0.2.1".parse().unwrap()],
    }
}

fn plan_v6_only() -> AddressPlan {
    AddressPlan {
        ipv4_pool: None,
        ..plan()
    }
}

fn key(i: u32) -> Key {
    Key(sha256(&i.to_be_bytes()))
}

fn reg(k: Key, ipv4: bool) -> Registration {
    Registration {
        public_key: k,
        ipv4,
        name: None,
        container: None,
    }
}

async fn token(store: &Store, max_peers: u32, max_ipv4: u32) -> TokenRecord {
    store
        .create_token(TokenSpec::tenant("test", max_peers, max_ipv4))
        .await
        .unwrap()
        .0
}

fn all_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn token_secret_is_stored_only_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), plan()).unwrap();
    let (tok, secret) = store
        .create_token(TokenSpec {
            bandwidth_mbps: Some(100),
            admin: true,
            ..TokenSpec::tenant("ci", 5, 1)
        })
        .await
        .unwrap();
    assert!(secret.starts_with(SECRET_PREFIX));
    assert_eq!(secret.len(), SECRET_PREFIX.len() + 43);
    assert!(
        tok.id.starts_with("tok_") && tok.id.len() == 16,
        "{}",
        tok.id
    );
    assert_eq!(store.authenticate(&secret).unwrap(), Some(tok.clone()));
    let random_part = &secret.as_bytes()[SECRET_PREFIX.len()..];
    let raw = URL_SAFE_NO_PAD.decode(random_part).unwrap();

    // Every key and value of every tree.
    for name in store.inner.db.tree_names() {
        let tree = store.inner.db.open_tree(&name).unwrap();
        for item in tree.iter() {
            let (k, v) = item.unwrap();
            for bytes in [&k[..], &v[..]] {
                assert!(!contains(bytes, random_part));
                assert!(!contains(bytes, &raw));
            }
        }
    }
    assert!(store
        .inner
        .trees
        .token_hashes
        .contains_key(sha256(secret.as_bytes()))
        .unwrap());

    // And the bytes on disk, after everything was written out.
    store.flush().await.unwrap();
    drop(store);
    let mut files = Vec::new();
    all_files(dir.path(), &mut files);
    assert!(!files.is_empty());
    let mut id_seen = false;
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        // Proves the scan reads where the records are.
        id_seen |= contains(&bytes, tok.id.as_bytes());
        assert!(!contains(&bytes, random_part), "secret in {}", f.display());
        assert!(!contains(&bytes, &raw), "secret bytes in {}", f.display());
    }
    assert!(id_seen, "the token record is in none of the files");
}

#[tokio::test]
async fn authenticate_right_wrong_and_revoked() {
    let store = Store::temporary(plan()).unwrap();
    let (tok, secret) = store
        .create_token(TokenSpec::tenant("a", 1, 0))
        .await
        .unwrap();
    let (other, other_secret) = store
        .create_token(TokenSpec::tenant("b", 1, 0))
        .await
        .unwrap();
    assert_eq!(store.authenticate(&secret).unwrap(), Some(tok.clone()));
    assert_eq!(store.authenticate(&other_secret).unwrap(), Some(other));

    // Well-formed but unknown, malformed, and empty.
    let mut wrong = secret.clone().into_bytes();
    let last = wrong.len() - 1;
    wrong[last] = if wrong[last] == b'A' { b'B' } else { b'A' };
    let wrong = String::from_utf8(wrong).unwrap();
    assert_eq!(store.authenticate(&wrong).unwrap(), None);
    assert_eq!(store.authenticate("sct_live_short").unwrap(), None);
    assert_eq!(store.authenticate("").unwrap(), None);
    assert_eq!(store.authenticate(&format!("{secret}x")).unwrap(), None);

    store.revoke_token(&tok.id).await.unwrap();
    assert_eq!(store.authenticate(&secret).unwrap(), None);
    assert!(store.authenticate(&other_secret).unwrap().is_some());
    assert_eq!(store.token(&tok.id).unwrap(), None);
    assert_eq!(store.tokens().unwrap().len(), 1);
}

#[tokio::test]
async fn quotas() {
    let store = Store::temporary(plan()).unwrap();
    let tok = token(&store, 2, 1).await;
    let (a, created) = store.register(&tok, reg(key(1), true)).await.unwrap();
    assert!(created && a.ipv4.is_some());
    let err = store.register(&tok, reg(key(2), true)).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Quota {
                limit: "max_ipv4",
                max: 1
            }
        ),
        "{err:?}"
    );
    store.register(&tok, reg(key(2), false)).await.unwrap();
    let err = store.register(&tok, reg(key(3), false)).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Quota {
                limit: "max_peers",
                max: 2
            }
        ),
        "{err:?}"
    );
    // Existing peers re-register at the limit without counting twice.
    let (again, created) = store.register(&tok, reg(key(1), true)).await.unwrap();
    assert!(!created);
    assert_eq!(again, a);
    assert_eq!(
        store.usage(&tok.id).unwrap(),
        TokenUsage { peers: 2, ipv4: 1 }
    );
    // ... but cannot add an IPv4 address past the limit.
    let err = store.register(&tok, reg(key(2), true)).await.unwrap_err();
    assert!(matches!(
        err,
        StoreError::Quota {
            limit: "max_ipv4",
            ..
        }
    ));

    // Deleting frees the quota.
    store.delete_peer(&tok.id, &key(1)).await.unwrap().unwrap();
    assert_eq!(
        store.usage(&tok.id).unwrap(),
        TokenUsage { peers: 1, ipv4: 0 }
    );
    store.register(&tok, reg(key(3), true)).await.unwrap();

    let no_pool = Store::temporary(plan_v6_only()).unwrap();
    let tok = token(&no_pool, 10, 10).await;
    let err = no_pool.register(&tok, reg(key(1), true)).await.unwrap_err();
    assert!(matches!(err, StoreError::Ipv4Unavailable), "{err:?}");
    assert_eq!(no_pool.usage(&tok.id).unwrap(), TokenUsage::default());
    assert!(matches!(
        no_pool.usage("tok_nope"),
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn registration_is_idempotent() {
    let store = Store::temporary(plan()).unwrap();
    let tok = token(&store, 10, 10).await;
    let mut r = reg(key(7), false);
    r.name = Some("web".into());
    let (first, created) = store.register(&tok, r.clone()).await.unwrap();
    assert!(created);
    assert!(plan().ipv6.contains(IpAddr::V6(first.ipv6)));
    assert_eq!(first.ipv4, None);
    let (second, created) = store.register(&tok, r.clone()).await.unwrap();
    assert!(!created);
    assert_eq!(second, first);

    // Adding IPv4 later keeps the IPv6 address and counts once.
    r.ipv4 = true;
    let (third, created) = store.register(&tok, r.clone()).await.unwrap();
    assert!(!created);
    assert_eq!(third.ipv6, first.ipv6);
    assert_eq!(third.ipv4, Some(Ipv4Addr::new(192, 0, 2, 2)));
    let (fourth, _) = store.register(&tok, r.clone()).await.unwrap();
    assert_eq!(fourth, third);
    // Not asking again does not take it away.
    r.ipv4 = false;
    let (fifth, _) = store.register(&tok, r).await.unwrap();
    assert_eq!(fifth.ipv4, third.ipv4);
    assert_eq!(
        store.usage(&tok.id).unwrap(),
        TokenUsage { peers: 1, ipv4: 1 }
    );
    assert_eq!(store.peer_count(), 1);
    store.verify().unwrap();
}

#[tokio::test]
async fn same_addresses_after_delete_and_register() {
    let store = Store::temporary(plan()).unwrap();
    let tok = token(&store, 100, 100).await;
    let (before, _) = store.register(&tok, reg(key(1), true)).await.unwrap();
    let removed = store.delete_peer(&tok.id, &key(1)).await.unwrap();
    assert_eq!(removed, Some(before.clone()));
    assert_eq!(store.peer(&key(1)).unwrap(), None);
    assert_eq!(store.delete_peer(&tok.id, &key(1)).await.unwrap(), None);
    for i in 2..10 {
        store.register(&tok, reg(key(i), true)).await.unwrap();
    }
    let (after, created) = store.register(&tok, reg(key(1), true)).await.unwrap();
    assert!(created);
    assert_eq!(after.ipv6, before.ipv6);
    assert_eq!(after.ipv4, before.ipv4);

    // A key that registered without IPv4 after deletion still prefers its old one.
    store.delete_peer(&tok.id, &key(1)).await.unwrap();
    store.register(&tok, reg(key(1), false)).await.unwrap();
    let (again, _) = store.register(&tok, reg(key(1), true)).await.unwrap();
    assert_eq!(again.ipv4, before.ipv4);
    store.verify().unwrap();
}

#[tokio::test]
async fn ipv6_is_given_to_another_key_only_once_reclaimed() {
    // A /119 has 256 usable addresses (offsets 0x100..0x1ff).
    let small = AddressPlan {
        ipv6: "2001:db8::/119".parse().unwrap(),
        ipv4_pool: None,
        reserved: vec![],
    };
    let store = Store::temporary(small).unwrap();
    let tok = token(&store, 1000, 0).await;
    let mut old = HashMap::new();
    for i in 0..200 {
        let (rec, _) = store.register(&tok, reg(key(i), false)).await.unwrap();
        assert!(u128::from(rec.ipv6) & 0x1ff >= 0x100, "{}", rec.ipv6);
        old.insert(key(i), rec.ipv6);
        store.delete_peer(&tok.id, &key(i)).await.unwrap().unwrap();
    }
    let mut fresh = HashSet::new();
    for i in 1000..1056 {
        let (rec, _) = store.register(&tok, reg(key(i), false)).await.unwrap();
        assert!(!old.values().any(|a| *a == rec.ipv6));
        fresh.insert(rec.ipv6);
    }
    let err = store
        .register(&tok, reg(key(2000), false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::PoolExhausted { family: "ipv6" }),
        "{err:?}"
    );
    // The old keys still find theirs while their leases are held.
    for i in [0, 57, 199] {
        let (rec, _) = store.register(&tok, reg(key(i), false)).await.unwrap();
        assert_eq!(rec.ipv6, old[&key(i)]);
    }
    assert_eq!(store.held(), 197);
    store.verify().unwrap();

    // Reclaiming frees the held addresses (never a registered key's) for others.
    assert_eq!(store.reclaim_released(now_secs() + 1).await.unwrap(), 197);
    assert_eq!(store.held(), 0);
    for i in [0, 57, 199] {
        assert_eq!(store.peer(&key(i)).unwrap().unwrap().ipv6, old[&key(i)]);
    }
    let mut taken: HashSet<Ipv6Addr> = fresh.clone();
    taken.extend([0, 57, 199].map(|i| old[&key(i)]));
    for i in 2000..2197 {
        let (rec, _) = store.register(&tok, reg(key(i), false)).await.unwrap();
        assert!(taken.insert(rec.ipv6), "{} handed out twice", rec.ipv6);
    }
    assert!(matches!(
        store.register(&tok, reg(key(3000), false)).await,
        Err(StoreError::PoolExhausted { family: "ipv6" })
    ));
    store.verify().unwrap();
}

#[tokio::test]
async fn leases_of_an_older_store_go_on_hold_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), plan()).unwrap();
        let tok = token(&store, 10, 10).await;
        store.register(&tok, reg(key(1), true)).await.unwrap();
        store.register(&tok, reg(key(2), false)).await.unwrap();
        store.delete_peer(&tok.id, &key(1)).await.unwrap().unwrap();
        // What a store written before holds existed looks like.
        let t = &store.inner.trees;
        let lease: Lease = decode("lease", &t.leases.get(key(1).0).unwrap().unwrap()).unwrap();
        let old = serde_json::json!({"ipv6": lease.ipv6, "ipv4": lease.ipv4});
        t.leases
            .insert(key(1).0, serde_json::to_vec(&old).unwrap())
            .unwrap();
        t.released.clear().unwrap();
        t.meta.remove(META_RELEASED_INDEX).unwrap();
        store.flush().await.unwrap();
    }
    let store = Store::open(dir.path(), plan()).unwrap();
    assert_eq!(store.held(), 1);
    store.verify().unwrap();
    assert_eq!(store.reclaim_released(now_secs() + 1).await.unwrap(), 1);
    assert!(store.inner.trees.leases.get(key(1).0).unwrap().is_none());
    assert!(store.inner.trees.leases.get(key(2).0).unwrap().is_some());
}

#[tokio::test]
async fn the_ipv4_free_list_holds_each_address_once() {
    let small = AddressPlan {
        ipv4_pool: Some("192.0.2.0/29".parse().unwrap()),
        ..plan()
    };
    let store = Store::temporary(small).unwrap();
    let tok = token(&store, 100, 100).await;
    for round in 0..50 {
        for i in 0..3 {
            store.register(&tok, reg(key(i), true)).await.unwrap();
        }
        for i in 0..3 {
            store.delete_peer(&tok.id, &key(i)).await.unwrap().unwrap();
        }
        let free = store.inner.trees.v4_free.len();
        assert!(free <= 3, "round {round}: {free} free-list entries");
        assert_eq!(store.inner.trees.v4_free_seq.len(), free);
    }
    store.verify().unwrap();
}

#[tokio::test]
async fn ipv4_reused_only_when_pool_exhausted() {
    // .0 network, .7 broadcast, .1 reserved: .2 to .6 are usable.
    let small = AddressPlan {
        ipv4_pool: Some("192.0.2.0/29".parse().unwrap()),
        ..plan()
    };
    let store = Store::temporary(small).unwrap();
    let tok = token(&store, 100, 100).await;
    let v4 = |d| Some(Ipv4Addr::new(192, 0, 2, d));
    let ipv4_of = |r: (PeerRecord, bool)| r.0.ipv4;

    assert_eq!(
        ipv4_of(store.register(&tok, reg(key(1), true)).await.unwrap()),
        v4(2)
    );
    assert_eq!(
        ipv4_of(store.register(&tok, reg(key(2), true)).await.unwrap()),
        v4(3)
    );
    store.delete_peer(&tok.id, &key(1)).await.unwrap();
    // Never-leased addresses go first; .2 stays for key 1.
    assert_eq!(
        ipv4_of(store.register(&tok, reg(key(3), true)).await.unwrap()),
        v4(4)
    );
    assert_eq!(
        ipv4_of(store.register(&tok, reg(key(4), true)).await.unwrap()),
        v4(5)
    );
    assert_eq!(
        ipv4_of(store.register(&tok, reg(key(5), true)).await.unwrap()),
        v4(6)
    );
    // Now only a released one is left.
    assert_eq!(
        ipv4_of(store.register(&tok, reg(key(6), true)).await.unwrap()),
        v4(2)
    );
    let err = store.register(&tok, reg(key(7), true)).await.unwrap_err();
    assert!(
        matches!(err, StoreError::PoolExhausted { family: "ipv4" }),
        "{err:?}"
    );
    // A failed registration leaves nothing behind.
    assert_eq!(store.peer(&key(7)).unwrap(), None);
    assert_eq!(
        store.usage(&tok.id).unwrap(),
        TokenUsage { peers: 5, ipv4: 5 }
    );

    // Key 1's address went to key 6, so key 1 gets whatever is released next.
    store.delete_peer(&tok.id, &key(3)).await.unwrap();
    store.delete_peer(&tok.id, &key(4)).await.unwrap();
    // Key 4 prefers its own .5 over the older release .4.
    assert_eq!(
        ipv4_of(store.register(&tok, reg(key(4), true)).await.unwrap()),
        v4(5)
    );
    assert_eq!(
        ipv4_of(store.register(&tok, reg(key(1), true)).await.unwrap()),
        v4(4)
    );
    let err = store.register(&tok, reg(key(3), true)).await.unwrap_err();
    assert!(matches!(err, StoreError::PoolExhausted { .. }));
    // Registering without IPv4 still works when the pool is full.
    let (rec, _) = store.register(&tok, reg(key(3), false)).await.unwrap();
    assert_eq!(rec.ipv4, None);
    store.verify().unwrap();
}

#[tokio::test]
async fn key_of_another_token_conflicts() {
    let store = Store::temporary(plan()).unwrap();
    let a = token(&store, 10, 10).await;
    let b = token(&store, 10, 10).await;
    let (rec, _) = store.register(&a, reg(key(1), false)).await.unwrap();
    let err = store.register(&b, reg(key(1), true)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    assert_eq!(store.delete_peer(&b.id, &key(1)).await.unwrap(), None);
    assert_eq!(store.peer(&key(1)).unwrap(), Some(rec));
    assert_eq!(store.usage(&b.id).unwrap(), TokenUsage::default());
    assert!(store.peers(Some(&b.id)).unwrap().is_empty());
}

#[tokio::test]
async fn revoke_returns_and_removes_peers() {
    let store = Store::temporary(plan()).unwrap();
    let a = token(&store, 10, 10).await;
    let b = token(&store, 10, 10).await;
    let mut regs = Vec::new();
    for i in 0..3 {
        let mut r = reg(key(i), i == 0);
        r.container = Some(format!("c{i}"));
        regs.push(store.register(&a, r).await.unwrap().0);
    }
    let (kept, _) = store.register(&b, reg(key(10), true)).await.unwrap();
    assert_eq!(store.peer_count(), 4);

    let mut removed = store.revoke_token(&a.id).await.unwrap();
    removed.sort_by_key(|r| r.public_key);
    regs.sort_by_key(|r| r.public_key);
    assert_eq!(removed, regs);
    assert_eq!(store.peer_count(), 1);
    assert!(store.peers(Some(&a.id)).unwrap().is_empty());
    assert_eq!(store.peers(None).unwrap(), vec![kept]);
    assert_eq!(store.peer_by_container(&a.id, "c1").unwrap(), None);
    assert!(matches!(store.usage(&a.id), Err(StoreError::NotFound)));
    assert!(matches!(
        store.revoke_token(&a.id).await,
        Err(StoreError::NotFound)
    ));
    // The stale TokenRecord cannot register any more.
    let err = store.register(&a, reg(key(20), false)).await.unwrap_err();
    assert!(matches!(err, StoreError::UnknownToken), "{err:?}");
    // Leases outlive the token.
    let (back, _) = store.register(&b, reg(key(0), true)).await.unwrap();
    assert_eq!(
        back.ipv6,
        regs.iter().find(|r| r.public_key == key(0)).unwrap().ipv6
    );
    store.verify().unwrap();
}

#[tokio::test]
async fn interrupted_revocation_finishes_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let tok_id;
    {
        let store = Store::open(dir.path(), plan()).unwrap();
        let tok = token(&store, 10, 10).await;
        tok_id = tok.id.clone();
        store.register(&tok, reg(key(1), true)).await.unwrap();
        // Step 1 only, as if the process died right after it.
        store
            .txn(|tx| {
                tx.tokens.remove(tok.id.as_bytes())?;
                tx.revoking.insert(tok.id.as_bytes(), &[][..])?;
                Ok(())
            })
            .unwrap();
        store.flush().await.unwrap();
    }
    let store = Store::open(dir.path(), plan()).unwrap();
    assert_eq!(store.peer(&key(1)).unwrap(), None);
    assert_eq!(store.peer_count(), 0);
    assert!(store.inner.trees.revoking.is_empty());
    assert!(store.inner.trees.token_usage.get(tok_id).unwrap().is_none());
}

#[tokio::test]
async fn listing_and_containers() {
    let store = Store::temporary(plan()).unwrap();
    let a = token(&store, 10, 10).await;
    let b = token(&store, 10, 10).await;
    let mut r = reg(key(1), false);
    r.container = Some("web".into());
    store.register(&a, r.clone()).await.unwrap();
    r.public_key = key(2);
    r.container = Some("web2".into());
    store.register(&a, r.clone()).await.unwrap();
    r.public_key = key(3);
    r.container = Some("web".into());
    store.register(&b, r.clone()).await.unwrap();

    assert_eq!(store.peers(Some(&a.id)).unwrap().len(), 2);
    assert_eq!(store.peers(None).unwrap().len(), 3);
    let found = store.peer_by_container(&a.id, "web").unwrap().unwrap();
    assert_eq!(found.public_key, key(1));
    assert_eq!(
        store
            .peer_by_container(&b.id, "web")
            .unwrap()
            .unwrap()
            .public_key,
        key(3)
    );
    assert_eq!(store.peer_by_container(&a.id, "we").unwrap(), None);

    // A re-registration may move the peer to another container.
    let mut moved = reg(key(1), false);
    moved.container = Some("api".into());
    let (rec, created) = store.register(&a, moved).await.unwrap();
    assert!(!created);
    assert_eq!(rec.container.as_deref(), Some("api"));
    assert_eq!(store.peer_by_container(&a.id, "web").unwrap(), None);
    assert_eq!(
        store
            .peer_by_container(&a.id, "api")
            .unwrap()
            .unwrap()
            .public_key,
        key(1)
    );
    store.verify().unwrap();
}

#[tokio::test]
async fn rejects_invalid_input() {
    let store = Store::temporary(plan()).unwrap();
    let tok = token(&store, 10, 10).await;
    let invalid =
        |r: Result<(PeerRecord, bool), StoreError>| matches!(r, Err(StoreError::Invalid(_)));
    let mut r = reg(key(1), false);
    r.name = Some("x".repeat(129));
    assert!(invalid(store.register(&tok, r.clone()).await));
    r.name = Some("é".repeat(128));
    assert!(store.register(&tok, r.clone()).await.is_ok());
    r.name = Some("a\nb".into());
    assert!(invalid(store.register(&tok, r.clone()).await));
    r.name = None;
    r.container = Some("evil\u{202e}txt".into());
    assert!(invalid(store.register(&tok, r.clone()).await));
    r.container = Some(String::new());
    assert!(invalid(store.register(&tok, r.clone()).await));
    assert!(invalid(
        store.register(&tok, reg(Key([0; 32]), false)).await
    ));
    assert!(matches!(
        store
            .create_token(TokenSpec::tenant("bad\0name", 1, 1))
            .await,
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test]
async fn undecodable_records_are_corrupt_not_panics() {
    let store = Store::temporary(plan()).unwrap();
    let tok = token(&store, 10, 10).await;
    store
        .inner
        .trees
        .peers
        .insert(key(5).0, &b"{not json"[..])
        .unwrap();
    assert!(matches!(store.peer(&key(5)), Err(StoreError::Corrupt(_))));
    assert!(matches!(store.peers(None), Err(StoreError::Corrupt(_))));
    assert!(matches!(
        store.register(&tok, reg(key(5), false)).await,
        Err(StoreError::Corrupt(_))
    ));
    store
        .inner
        .trees
        .token_usage
        .insert(tok.id.as_bytes(), &b"xy"[..])
        .unwrap();
    assert!(matches!(store.usage(&tok.id), Err(StoreError::Corrupt(_))));
    assert!(matches!(
        store.register(&tok, reg(key(6), false)).await,
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test]
async fn record_usage_updates_counters() {
    let store = Store::temporary(plan()).unwrap();
    let tok = token(&store, 10, 10).await;
    store.register(&tok, reg(key(1), false)).await.unwrap();
    store
        .record_usage(
            &key(1),
            Some(1000),
            10,
            20,
            Some("203.0.113.2:4000".parse().unwrap()),
        )
        .await
        .unwrap();
    store
        .record_usage(&key(1), None, 11, 21, None)
        .await
        .unwrap();
    let rec = store.peer(&key(1)).unwrap().unwrap();
    assert_eq!(
        (rec.last_handshake, rec.rx_bytes, rec.tx_bytes, rec.endpoint),
        (
            Some(1000),
            11,
            21,
            Some("203.0.113.2:4000".parse().unwrap())
        )
    );
    // A peer that is gone is not brought back.
    store
        .record_usage(&key(2), Some(1), 1, 1, None)
        .await
        .unwrap();
    assert_eq!(store.peer(&key(2)).unwrap(), None);
    // Statistics do not disturb re-registration.
    let (again, created) = store.register(&tok, reg(key(1), false)).await.unwrap();
    assert!(!created);
    assert_eq!(again.rx_bytes, 11);
}

#[tokio::test]
async fn persists_across_reopen_and_locks() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, secret, peers) = {
        let store = Store::open(dir.path(), plan()).unwrap();
        assert!(matches!(
            Store::open(dir.path(), plan()),
            Err(StoreError::Locked(_))
        ));
        let (tok, secret) = store
            .create_token(TokenSpec {
                bandwidth_mbps: Some(50),
                ..TokenSpec::tenant("p", 10, 10)
            })
            .await
            .unwrap();
        let mut peers = Vec::new();
        for i in 0..3 {
            peers.push(
                store
                    .register(&tok, reg(key(i), i % 2 == 0))
                    .await
                    .unwrap()
                    .0,
            );
        }
        (tok, secret, peers)
    };
    let store = Store::open(dir.path(), plan()).unwrap();
    assert_eq!(store.authenticate(&secret).unwrap(), Some(tok.clone()));
    assert_eq!(store.peer_count(), 3);
    let mut stored = store.peers(Some(&tok.id)).unwrap();
    stored.sort_by_key(|p| p.public_key);
    let mut want = peers.clone();
    want.sort_by_key(|p| p.public_key);
    assert_eq!(stored, want);
    for p in &peers {
        let (again, created) = store
            .register(&tok, reg(p.public_key, false))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(&again, p);
    }
    // The IPv4 search continues where it stopped.
    let (next, _) = store.register(&tok, reg(key(9), true)).await.unwrap();
    assert_eq!(next.ipv4, Some(Ipv4Addr::new(192, 0, 2, 4)));
    store.verify().unwrap();
}

#[tokio::test]
async fn plan_change_readdresses_on_next_registration() {
    let dir = tempfile::tempdir().unwrap();
    let tok = {
        let store = Store::open(dir.path(), plan()).unwrap();
        let tok = token(&store, 10, 10).await;
        store.register(&tok, reg(key(1), true)).await.unwrap();
        store.register(&tok, reg(key(2), false)).await.unwrap();
        tok
    };
    let moved = AddressPlan {
        ipv6: "2001:db8:2::/64".parse().unwrap(),
        ipv4_pool: None,
        reserved: vec![],
    };
    let store = Store::open(dir.path(), moved.clone()).unwrap();
    assert_eq!(store.out_of_plan().unwrap().len(), 2);
    let (rec, created) = store.register(&tok, reg(key(1), false)).await.unwrap();
    assert!(!created);
    assert!(moved.ipv6.contains(IpAddr::V6(rec.ipv6)));
    assert_eq!(rec.ipv4, None);
    assert!(store.in_plan(&rec));
    assert_eq!(store.out_of_plan().unwrap().len(), 1);
    assert_eq!(
        store.usage(&tok.id).unwrap(),
        TokenUsage { peers: 2, ipv4: 0 }
    );
    assert!(matches!(
        store.register(&tok, reg(key(2), true)).await,
        Err(StoreError::Ipv4Unavailable)
    ));
    store.verify().unwrap();
}

/// Registration throughput under contention; run with `--nocapture` to see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_get_distinct_addresses() {
    const TASKS: u32 = 8;
    const EACH: u32 = 200;
    let dir = tempfile::tempdir().unwrap();
    let big = AddressPlan {
        ipv4_pool: Some("10.64.0.0/20".parse().unwrap()),
        ..plan()
    };
    let store = Store::open(dir.path(), big).unwrap();
    let tokens = [
        token(&store, u32::MAX, u32::MAX).await,
        token(&store, u32::MAX, u32::MAX).await,
    ];
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        let tok = tokens[(t % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..EACH {
                let k = key(t * 10_000 + i);
                let (rec, created) = store.register(&tok, reg(k, i % 2 == 0)).await.unwrap();
                assert!(created);
                out.push(rec);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let n = (TASKS * EACH) as usize;
    println!(
        "{n} registrations in {elapsed:?}: {:.0}/s, {} bytes on disk",
        n as f64 / elapsed.as_secs_f64(),
        store.size_on_disk().unwrap()
    );
    let v6: HashSet<_> = all.iter().map(|r| r.ipv6).collect();
    let v4: Vec<_> = all.iter().filter_map(|r| r.ipv4).collect();
    let v4_set: HashSet<_> = v4.iter().collect();
    assert_eq!(v6.len(), n);
    assert_eq!(v4.len(), n / 2);
    assert_eq!(v4_set.len(), n / 2);
    assert_eq!(store.peer_count(), n);
    for r in &all {
        assert_eq!(store.peer(&r.public_key).unwrap().as_ref(), Some(r));
    }
    let report = store.verify().unwrap();
    assert_eq!(report.peers, n);
    assert_eq!(report.ipv4, n / 2);
    let usage = store.usage(&tokens[0].id).unwrap();
    assert_eq!(
        usage,
        TokenUsage {
            peers: n as u32 / 2,
            ipv4: n as u32 / 4
        }
    );
}

fn crash_plan() -> AddressPlan {
    AddressPlan {
        ipv4_pool: Some("10.128.0.0/16".parse().unwrap()),
        ..plan()
    }
}

/// The writer half of [`crash_kill_and_recover`], which runs it explicitly (it is
/// ignored on its own). Prints a line after each call returned, i.e. after the store
/// acknowledged it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of crash_kill_and_recover"]
async fn crash_writer_child() {
    let dir = std::env::var_os(CRASH_ENV)
        .expect("crash_writer_child runs only as the child of crash_kill_and_recover");
    let store = Store::open(Path::new(&dir), crash_plan()).unwrap();
    let (tok, _) = store
        .create_token(TokenSpec::tenant("crash", u32::MAX, u32::MAX))
        .await
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..2 {
        let store = store.clone();
        let tok = tok.clone();
        writers.push(tokio::spawn(async move {
            for i in 0u64.. {
                let k = Key(random_bytes::<32>().unwrap());
                store
                    .register(&tok, reg(k, (i + w) % 2 == 0))
                    .await
                    .unwrap();
                println!("ACK {}", k.to_base64());
                if i % 5 == 3 {
                    println!("DELETING {}", k.to_base64());
                    store.delete_peer(&tok.id, &k).await.unwrap().unwrap();
                    println!("DELETED {}", k.to_base64());
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
}

#[test]
fn crash_kill_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "store::tests::crash_writer_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CRASH_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // Start-up can be slow on a busy machine: time the run from the first ack.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                let ack = line.starts_with("ACK ");
                lines.push(line);
                if ack {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("the writer acknowledged nothing: {lines:?}");
            }
        }
    }
    // A soak run can vary the moment of the kill.
    let run_ms = std::env::var("SIDECAR_STORE_CRASH_RUN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    std::thread::sleep(Duration::from_millis(run_ms));
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(lines_rx.try_iter());

    let mut present = HashSet::new();
    let mut absent = HashSet::new();
    for line in &lines {
        let Some((what, k)) = line.split_once(' ') else {
            continue;
        };
        // A line cut short by the kill is not a complete acknowledgement.
        let Ok(k) = Key::from_base64(k) else { continue };
        match what {
            "ACK" => {
                present.insert(k);
            }
            // In flight when killed: either outcome is fine.
            "DELETING" => {
                present.remove(&k);
            }
            "DELETED" => {
                absent.insert(k);
            }
            _ => {}
        }
    }
    assert!(!present.is_empty());

    let store = Store::open(dir.path(), crash_plan()).unwrap();
    let report = store.verify().unwrap();
    for k in &present {
        assert!(store.peer(k).unwrap().is_some(), "acknowledged {k:?} lost");
    }
    for k in &absent {
        assert!(store.peer(k).unwrap().is_none(), "deleted {k:?} is back");
    }
    println!(
        "crash test: {} acknowledged, {} deleted, {} peers after recovery",
        present.len(),
        absent.len(),
        report.peers
    );

    // New allocations after recovery do not collide with recovered ones.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let tok = store.tokens().unwrap().remove(0);
        for i in 0..50 {
            store.register(&tok, reg(key(i), true)).await.unwrap();
        }
    });
    store.verify().unwrap();
}

/// Scale check for the benchmark: 10,000 registrations, rate per thousand, so a
/// slowdown with size (a scan hiding in `register`) shows. `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow; run by hand"]
async fn ten_thousand_registrations() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        AddressPlan {
            ipv4_pool: Some("10.0.0.0/16".parse().unwrap()),
            ..plan()
        },
    )
    .unwrap();
    let tok = token(&store, u32::MAX, u32::MAX).await;
    let started = Instant::now();
    for chunk in 0..10u32 {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..8u32 {
            let store = store.clone();
            let tok = tok.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..125 {
                    let k = key(chunk * 1000 + w * 125 + i);
                    store.register(&tok, reg(k, i % 4 == 0)).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        println!(
            "peers {:>5}: {:.0} registrations/s",
            (chunk + 1) * 1000,
            1000.0 / t.elapsed().as_secs_f64()
        );
    }
    store.flush().await.unwrap();
    println!(
        "10000 in {:?}, {} bytes on disk ({} per peer)",
        started.elapsed(),
        store.size_on_disk().unwrap(),
        store.size_on_disk().unwrap() / 10_000
    );
    store.verify().unwrap();
}

fn extras(pq: Option<&str>, machine: Option<&str>) -> RegisterExtras {
    RegisterExtras {
        pq_ciphertext: pq.map(str::to_owned),
        machine: machine.map(str::to_owned),
    }
}

#[tokio::test]
async fn a_bound_token_works_only_from_its_first_machine_until_unbound() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), plan()).unwrap();
    let (tok, _) = store
        .create_token_with(TokenSpec::tenant("bound", 10, 0), true)
        .await
        .unwrap();
    assert!(tok.bind_machine && tok.machine.is_none());
    let err = store
        .register_with(&tok, reg(key(1), false), extras(None, None))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::MachineRequired), "{err}");
    store
        .register_with(&tok, reg(key(1), false), extras(None, Some("m-a")))
        .await
        .unwrap();
    assert_eq!(
        store.token(&tok.id).unwrap().unwrap().machine.as_deref(),
        Some("m-a")
    );
    let err = store
        .register_with(&tok, reg(key(2), false), extras(None, Some("m-b")))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::MachineMismatch), "{err}");
    assert!(
        store.peer(&key(2)).unwrap().is_none(),
        "a refused registration leaves nothing"
    );
    store
        .register_with(&tok, reg(key(2), false), extras(None, Some("m-a")))
        .await
        .unwrap();

    store.unbind_machine(&tok.id).await.unwrap();
    store
        .register_with(&tok, reg(key(3), false), extras(None, Some("m-b")))
        .await
        .unwrap();
    assert_eq!(
        store.token(&tok.id).unwrap().unwrap().machine.as_deref(),
        Some("m-b")
    );
    assert!(matches!(
        store.unbind_machine("tok_none").await.unwrap_err(),
        StoreError::NotFound
    ));

    // Unbound tokens (and every token stored before binding existed) take any machine.
    let free = token(&store, 10, 0).await;
    for (i, m) in [(10, Some("m-a")), (11, Some("m-b")), (12, None)] {
        store
            .register_with(&free, reg(key(i), false), extras(None, m))
            .await
            .unwrap();
    }
    assert_eq!(store.token(&free.id).unwrap().unwrap().machine, None);
}

#[tokio::test]
async fn the_pq_counter_moves_on_with_each_ciphertext_and_none_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), plan()).unwrap();
    let tok = token(&store, 10, 0).await;
    let (rec, created) = store
        .register_with(&tok, reg(key(1), false), extras(Some("ct1"), None))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(
        (rec.pq_ciphertext.as_deref(), rec.pq_counter),
        (Some("ct1"), 1)
    );
    let (rec, created) = store
        .register_with(&tok, reg(key(1), false), extras(Some("ct2"), None))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(
        (rec.pq_ciphertext.as_deref(), rec.pq_counter),
        (Some("ct2"), 2)
    );
    let (rec, _) = store.register(&tok, reg(key(1), false)).await.unwrap();
    assert_eq!((rec.pq_ciphertext, rec.pq_counter), (None, 2));
    let (rec, _) = store
        .register_with(&tok, reg(key(1), false), extras(Some("ct3"), None))
        .await
        .unwrap();
    assert_eq!(rec.pq_counter, 3, "the counter never goes back");
    drop(store);
    let store = Store::open(dir.path(), plan()).unwrap();
    let rec = store.peer(&key(1)).unwrap().unwrap();
    assert_eq!(
        (rec.pq_ciphertext.as_deref(), rec.pq_counter),
        (Some("ct3"), 3)
    );
}

#[test]
fn tokens_stored_before_scopes_keep_what_they_could_do() {
    // A record as the store wrote it before scopes existed: no `scopes` field.
    let legacy = |admin: bool| -> TokenRecord {
        serde_json::from_value(serde_json::json!({
            "id": "tok_000000000001", "name": "old", "max_peers": 1, "max_ipv4": 0,
            "bandwidth_mbps": null, "admin": admin, "created": 1
        }))
        .unwrap()
    };
    assert_eq!(legacy(false).scopes, None);
    assert_eq!(
        legacy(false).scopes(),
        vec![Scope::PeersRead, Scope::PeersAdd]
    );
    assert!(!legacy(false).has_scope(Scope::Admin));
    assert_eq!(legacy(true).scopes(), Scope::ALL.to_vec());
    // And such a record is written back without the field, as before.
    assert!(serde_json::to_value(legacy(true))
        .unwrap()
        .get("scopes")
        .is_none());
}

#[tokio::test]
async fn scopes_are_stored_changed_and_kept_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (reader_id, reader_secret, ops_id) = {
        let store = Store::open(dir.path(), plan()).unwrap();
        let (reader, secret) = store
            .create_scoped_token(
                TokenSpec::tenant("reader", 1, 0),
                false,
                Some(vec![Scope::PeersRead, Scope::PeersRead]),
            )
            .await
            .unwrap();
        assert_eq!(reader.scopes(), vec![Scope::PeersRead]);
        assert!(!reader.admin);
        let err = store
            .create_scoped_token(TokenSpec::tenant("none", 1, 0), false, Some(vec![]))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

        let (ops, _) = store
            .create_scoped_token(
                TokenSpec::tenant("ops", 1, 0),
                false,
                Some(vec![Scope::Admin]),
            )
            .await
            .unwrap();
        assert!(ops.admin, "the admin flag follows the admin scope");
        assert!(
            ops.has_scope(Scope::PeersRead) && ops.has_scope(Scope::PeersAdd),
            "admin implies the agent's scopes"
        );
        assert!(!reader.has_scope(Scope::PeersAdd) && !reader.has_scope(Scope::Admin));

        let changed = store
            .update_token(
                &reader.id,
                TokenChange {
                    scopes: Some(vec![Scope::PeersAdd, Scope::PeersRead]),
                    ..TokenChange::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(changed.scopes(), vec![Scope::PeersRead, Scope::PeersAdd]);
        let err = store
            .update_token(
                &reader.id,
                TokenChange {
                    scopes: Some(vec![]),
                    ..TokenChange::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
        let demoted = store
            .update_token(
                &ops.id,
                TokenChange {
                    scopes: Some(vec![Scope::PeersRead]),
                    ..TokenChange::default()
                },
            )
            .await
            .unwrap();
        assert!(!demoted.admin, "taking the admin scope clears the flag");
        (reader.id, secret, ops.id)
    };
    let store = Store::open(dir.path(), plan()).unwrap();
    let reader = store.authenticate(&reader_secret).unwrap().unwrap();
    assert_eq!(reader.id, reader_id);
    assert_eq!(reader.scopes(), vec![Scope::PeersRead, Scope::PeersAdd]);
    let ops = store.token(&ops_id).unwrap().unwrap();
    assert_eq!((ops.admin, ops.scopes()), (false, vec![Scope::PeersRead]));
}

#[tokio::test]
async fn every_durable_commit_is_timed_under_its_operation() {
    let store = Store::temporary(plan()).unwrap();
    let counts = |store: &Store| -> Vec<(&'static str, u64)> {
        store
            .commit_latency()
            .snapshot()
            .into_iter()
            .map(|(op, h)| (op, h.count()))
            .collect()
    };
    let tok = token(&store, 10, 10).await;
    assert_eq!(counts(&store), [("create_token", 1)]);
    store.register(&tok, reg(key(1), false)).await.unwrap();
    store.register(&tok, reg(key(1), false)).await.unwrap();
    store.delete_peer(&tok.id, &key(1)).await.unwrap();
    assert_eq!(
        counts(&store),
        [("create_token", 1), ("delete_peer", 1), ("register", 2)]
    );
    // A refused commit waited for the store too, and is counted.
    assert!(store.revoke_token("tok_nonexistent").await.is_err());
    assert_eq!(
        counts(&store),
        [
            ("create_token", 1),
            ("delete_peer", 1),
            ("register", 2),
            ("revoke_token", 1)
        ]
    );
}
