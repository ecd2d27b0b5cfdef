//! The relay's persistent state: API tokens, registered peers and their address
//! leases, kept in sled. No HTTP here; [`crate::service::PeerService`] calls into
//! [`Store`] for every change to peers.
//!
//! # Layout
//!
//! One sled database with these trees (all keys are raw bytes, values JSON unless
//! noted):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `tokens` | token id | token record + SHA-256 of its secret |
//! | `token_hashes` | SHA-256(secret), 32 bytes | token id |
//! | `token_usage` | token id | peers u32 BE, ipv4 u32 BE (8 bytes) |
//! | `revoking` | token id | empty: a revocation that has not finished yet |
//! | `peers` | public key, 32 bytes | [`PeerRecord`] |
//! | `token_peers` | token id, 0, public key | empty (peers of one token) |
//! | `containers` | token id, 0, container, 0, public key | empty |
//! | `v6_owner` | IPv6 address, 16 bytes | public key of the peer or held lease |
//! | `v4_owner` | IPv4 address, 4 bytes | public key of the current peer |
//! | `v4_lease` | IPv4 address | public key it was last leased to (until reclaimed) |
//! | `leases` | public key | last IPv6 and IPv4 of that key, and when it was released |
//! | `released` | release time u64 BE, public key | empty: a lease on hold, oldest first |
//! | `v4_free` | sequence u64 BE | an IPv4 address released by a deleted peer |
//! | `v4_free_seq` | IPv4 address | its sequence in `v4_free` (one entry per address) |
//! | `meta` | name | schema version, IPv4 cursor, `v4_free` head/tail |
//!
//! # Consistency
//!
//! Every change that touches more than one key runs as one sled transaction over all
//! the trees. sled 0.34 serialises transactions behind a process-wide lock, so
//! allocation is a plain read-check-write inside the closure; the closure has no side
//! effects because sled may run it again. Quota counters live in `token_usage` and
//! are updated in the same transaction, so registering never scans other peers.
//!
//! # Durability
//!
//! sled only makes writes durable at a flush (its background flusher runs every
//! 500 ms). Every mutating method is `async` and flushes before it returns, so once a
//! caller sees `Ok` the change survives `kill -9`. The exception is
//! [`Store::record_usage`]: traffic counters are not acknowledged to anyone and ride
//! on the background flush. Transactions and flushes run on tokio's blocking pool so
//! they never stall the runtime.
//!
//! # Addresses
//!
//! IPv6: the search starts at the first 8 bytes of SHA-256(public key) used as the
//! host part (see [`plan`]) and probes linearly past taken or reserved addresses.
//! A deleted peer's `v6_owner` entry stays while its lease is on hold, so during
//! the hold its IPv6 address is given to no other key and the key finds it again.
//!
//! IPv4: a key gets its previous address back if it is free. Otherwise the lowest
//! never-leased address (a cursor in `meta` makes this O(1) amortised); only when
//! none is left, the address released longest ago (`v4_free`, FIFO). IPv4 is scarce,
//! so a held lease keeps its IPv4 address only as long as the pool has others.
//!
//! # Reclaiming
//!
//! Deleting a peer (or revoking its token) puts its lease on hold: the lease gets
//! its release time and an entry in `released`. Registering the key again lifts
//! the hold. [`Store::reclaim_released`] removes leases released before a cutoff
//! with their `v6_owner` and `v4_lease` entries, after which the addresses may go
//! to other keys. So every tree holds current peers plus held leases (and
//! `v4_free` at most one entry per pool address): register/delete churn grows
//! neither the store nor the share of the prefix in use.
//!
//! # Cost
//!
//! A registration is a fixed number of point reads and writes plus one fsync; quota
//! checks read the token's counters, never its peers. IPv6 probing is O(1) expected
//! in a /64. `v6_owner` and `leases` hold every current and held key (roughly
//! 150 bytes per key before sled's overhead). The ignored test
//! `ten_thousand_registrations` reports the rate per thousand peers and the size on
//! disk; [`Store::temporary`] gives benchmarks a throwaway store that still fsyncs.
//!
//! # Changing the address plan
//!
//! Addresses are checked against the plan the store was opened with. Peers whose
//! stored address is outside it (other prefix, pool removed or shrunk, address now
//! reserved) are kept and counted in a warning at open ([`Store::out_of_plan`] lists
//! them). The next registration of such a key re-addresses it inside the current
//! plan (dropping an IPv4 that no longer fits unless a new one is requested); no
//! allocation ever hands out an address outside the current plan.

mod commit_latency;
mod plan;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use ring::digest::{digest, SHA256};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sidecar::{IpPrefix, Key};
pub use sidecar_proto::Scope;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

pub use commit_latency::CommitLatency;
use plan::Plan;

/// Prefix of every token secret, so leaked secrets are easy to recognise and scan for.
pub const SECRET_PREFIX: &str = "sct_live_";
/// Length of the base64url (no padding) part of a secret: 32 random bytes.
const SECRET_B64_LEN: usize = 43;
/// Longest accepted name or container label, in characters.
pub const LABEL_MAX: usize = 128;

const SCHEMA_VERSION: &[u8] = b"1";
const META_SCHEMA: &[u8] = b"schema";
const META_V4_CURSOR: &[u8] = b"v4_cursor";
const META_FREE_HEAD: &[u8] = b"v4_free_head";
const META_FREE_TAIL: &[u8] = b"v4_free_tail";
/// Set once every released lease of an older store has its `released` entry.
const META_RELEASED_INDEX: &[u8] = b"released_index";
/// Leases reclaimed per transaction, so one sweep never builds a huge one.
const RECLAIM_BATCH: usize = 256;

/// Where peer addresses come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressPlan {
    /// Each peer gets a /128 out of this prefix.
    pub ipv6: IpPrefix,
    /// Peers that ask (and whose token allows it) get a /32 out of this pool.
    pub ipv4_pool: Option<IpPrefix>,
    /// Addresses never handed out, such as the relay's own.
    pub reserved: Vec<IpAddr>,
}

/// An API token. The secret itself is never stored; see [`Store::create_token`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub max_peers: u32,
    pub max_ipv4: u32,
    pub bandwidth_mbps: Option<u32>,
    /// Peers of this token cannot reach each other through the relay.
    #[serde(default)]
    pub isolate_peers: bool,
    pub admin: bool,
    /// Unix seconds.
    pub created: u64,
    /// Registrations must all come from the machine of the first one. Tokens stored
    /// before machine binding existed read as unbound, so their agents keep working.
    #[serde(default)]
    pub bind_machine: bool,
    /// The fingerprint of the machine the token is bound to, once bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// What the token may do, sorted. Tokens stored before scopes existed have none
    /// here and keep what their `admin` flag implied; see [`TokenRecord::scopes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<Scope>>,
}

impl TokenRecord {
    /// The token's scopes; for a token stored without any, those it had before
    /// scopes existed: all three for an admin token, `peers:read` and `peers:add`
    /// for the others.
    pub fn scopes(&self) -> Vec<Scope> {
        match &self.scopes {
            Some(scopes) => scopes.clone(),
            None if self.admin => Scope::ALL.to_vec(),
            None => DEFAULT_SCOPES.to_vec(),
        }
    }

    /// Whether the token may use a route that needs `scope`. `admin` implies the
    /// other two: an operator's token can do everything an agent's can.
    pub fn has_scope(&self, scope: Scope) -> bool {
        let scopes = self.scopes();
        scopes.contains(&scope) || scopes.contains(&Scope::Admin)
    }
}

/// What a token created without scopes may do: what an agent needs.
pub const DEFAULT_SCOPES: [Scope; 2] = [Scope::PeersRead, Scope::PeersAdd];

/// `scopes` sorted and deduplicated, or [`StoreError::Invalid`] if empty.
fn checked_scopes(scopes: Vec<Scope>) -> Result<Vec<Scope>, StoreError> {
    let scopes = Scope::normalize(scopes);
    if scopes.is_empty() {
        return Err(StoreError::Invalid(
            "scopes is empty: a token needs at least one scope".into(),
        ));
    }
    Ok(scopes)
}

/// A change to a token; see [`Store::update_token`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenChange {
    pub name: Option<String>,
    pub max_peers: Option<u32>,
    pub max_ipv4: Option<u32>,
    pub bandwidth_mbps: Option<u32>,
    pub isolate_peers: Option<bool>,
    /// Replaces the scopes; the `admin` flag follows them.
    pub scopes: Option<Vec<Scope>>,
}

/// What a new token may do; see [`Store::create_token`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSpec {
    pub name: String,
    pub max_peers: u32,
    pub max_ipv4: u32,
    pub bandwidth_mbps: Option<u32>,
    pub isolate_peers: bool,
    pub admin: bool,
}

/// What `POST /v1/admin/tokens` asks for: never an admin token (those are made at
/// first start only).
impl From<sidecar_proto::CreateToken> for TokenSpec {
    fn from(req: sidecar_proto::CreateToken) -> TokenSpec {
        TokenSpec {
            name: req.name,
            max_peers: req.max_peers,
            max_ipv4: req.max_ipv4,
            bandwidth_mbps: req.bandwidth_mbps,
            isolate_peers: req.isolate_peers,
            admin: false,
        }
    }
}

impl TokenSpec {
    /// A tenant token with these quotas, unshaped and not isolated.
    pub fn tenant(name: &str, max_peers: u32, max_ipv4: u32) -> TokenSpec {
        TokenSpec {
            name: name.to_owned(),
            max_peers,
            max_ipv4,
            bandwidth_mbps: None,
            isolate_peers: false,
            admin: false,
        }
    }
}

/// A registered WireGuard peer and its addresses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerRecord {
    #[serde(with = "key_base64")]
    pub public_key: Key,
    pub token_id: String,
    pub ipv6: Ipv6Addr,
    pub ipv4: Option<Ipv4Addr>,
    pub name: Option<String>,
    pub container: Option<String>,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last completed handshake, as last reported.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The peer's WireGuard endpoint as last seen, so a restarted relay can reach a
    /// peer behind NAT at once instead of waiting for the peer to handshake again.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// Base64 X-Wing ciphertext of the latest registration that carried one; the
    /// preshared key is derived from it (with the relay's X-Wing secret) and never
    /// stored itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pq_ciphertext: Option<String>,
    /// Encapsulations this peer has registered, bound into its preshared key; never
    /// goes back while the peer exists.
    #[serde(default)]
    pub pq_counter: u64,
}

/// A request to register (or re-register) a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub public_key: Key,
    /// Also wants an IPv4 address.
    pub ipv4: bool,
    pub name: Option<String>,
    pub container: Option<String>,
}

/// What a registration carries besides the peer itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegisterExtras {
    /// Base64 X-Wing ciphertext (already checked to decode). `None` clears the
    /// peer's preshared key: the client registering has none.
    pub pq_ciphertext: Option<String>,
    /// The machine fingerprint the client sent.
    pub machine: Option<String>,
}

/// How much of its limits a token uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub peers: u32,
    pub ipv4: u32,
}

/// What [`Store::verify`] checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub tokens: usize,
    pub peers: usize,
    pub ipv4: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token limit {limit} reached (at most {max})")]
    Quota { limit: &'static str, max: u32 },
    #[error("this relay has no IPv4 pool")]
    Ipv4Unavailable,
    #[error("no free {family} address left")]
    PoolExhausted { family: &'static str },
    #[error("this public key is registered under another token")]
    Conflict,
    #[error("not found")]
    NotFound,
    /// The token given to [`Store::register`] no longer exists (revoked meanwhile).
    #[error("token does not exist (revoked?)")]
    UnknownToken,
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The token is bound to another machine than the one registering.
    #[error("this token is bound to another machine")]
    MachineMismatch,
    /// The token is bound to a machine and the registration sent no fingerprint.
    #[error("this token is bound to a machine and the registration named none")]
    MachineRequired,
    #[error("relay store is corrupt: {0}; restore it from a backup or remove it")]
    Corrupt(String),
    #[error("relay store {0} is in use by another process")]
    Locked(String),
    #[error("relay store I/O error: {0}")]
    Io(String),
    #[error("relay store error: {0}")]
    Backend(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        match e {
            sled::Error::Corruption { at, .. } => {
                StoreError::Corrupt(format!("sled detected corruption at {at:?}"))
            }
            // sled reports a held file lock only as an I/O error with this text.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked(io.to_string())
            }
            sled::Error::Io(io) => StoreError::Io(io.to_string()),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// The relay's state. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    trees: Trees,
    /// The same trees as a slice, for multi-tree transactions.
    all: Vec<sled::Tree>,
    plan: Plan,
    /// Kept in memory because `Tree::len` walks the whole tree.
    peer_count: AtomicUsize,
    commits: CommitLatency,
}

type TxError = ConflictableTransactionError<StoreError>;
type TxResult<T> = Result<T, TxError>;

/// Declares the trees once: the struct of handles, how to open them, and the view
/// a transaction closure gets (same field names, in the same order).
macro_rules! trees {
    ($($name:ident),+ $(,)?) => {
        #[derive(Clone)]
        struct Trees { $($name: sled::Tree,)+ }

        impl Trees {
            fn open(db: &sled::Db) -> Result<Trees, StoreError> {
                Ok(Trees { $($name: db.open_tree(stringify!($name))?,)+ })
            }

            fn all(&self) -> Vec<sled::Tree> {
                vec![$(self.$name.clone(),)+]
            }

            fn named(&self) -> Vec<(&'static str, &sled::Tree)> {
                vec![$((stringify!($name), &self.$name),)+]
            }
        }

        struct Tx<'a> { $($name: &'a TransactionalTree,)+ }

        impl<'a> Tx<'a> {
            fn new(views: &'a [TransactionalTree]) -> Result<Tx<'a>, StoreError> {
                let mut it = views.iter();
                Ok(Tx { $($name: it.next().ok_or_else(|| {
                    StoreError::Backend("transaction is missing a tree".into())
                })?,)+ })
            }
        }
    };
}

trees!(
    tokens,
    token_hashes,
    token_usage,
    revoking,
    peers,
    token_peers,
    containers,
    v6_owner,
    v4_owner,
    v4_lease,
    leases,
    released,
    v4_free,
    v4_free_seq,
    meta,
);

#[derive(Serialize, Deserialize)]
struct StoredToken {
    token: TokenRecord,
    /// Base64 of SHA-256(secret); needed to drop the `token_hashes` entry on revoke.
    secret_sha256: String,
}

#[derive(Serialize, Deserialize)]
struct Lease {
    ipv6: Ipv6Addr,
    ipv4: Option<Ipv4Addr>,
    /// Unix seconds when the key's peer was deleted; `None` while it is registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    released: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct V4Cursor {
    /// [`Plan::v4_fingerprint`] the cursor was computed under.
    plan: String,
    /// Pool offset of the first address that may never have been leased.
    next: u64,
}

impl Store {
    /// Opens (or creates) the store in `dir`. sled locks the directory: a second
    /// open, from this or another process, fails with [`StoreError::Locked`].
    pub fn open(dir: &Path, plan: AddressPlan) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            // The default cache is 1 GiB; peer records are small.
            .cache_capacity(64 << 20)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| match StoreError::from(e) {
                StoreError::Locked(_) => StoreError::Locked(dir.display().to_string()),
                StoreError::Corrupt(m) => StoreError::Corrupt(format!("{}: {m}", dir.display())),
                other => other,
            })?;
        Store::from_db(db, plan)
    }

    /// A store in a temporary directory, removed on drop. For tests and benchmarks:
    /// it flushes like a real one, so it measures the same work.
    pub fn temporary(plan: AddressPlan) -> Result<Store, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        Store::from_db(db, plan)
    }

    fn from_db(db: sled::Db, address_plan: AddressPlan) -> Result<Store, StoreError> {
        let plan = Plan::new(&address_plan)?;
        let trees = Trees::open(&db)?;
        match trees.meta.get(META_SCHEMA)? {
            None => {
                trees.meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(StoreError::Corrupt(format!(
                    "schema version {:?} is not the supported {:?}",
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(SCHEMA_VERSION)
                )))
            }
        }
        let store = Store {
            inner: Arc::new(Inner {
                all: trees.all(),
                db,
                trees,
                plan,
                peer_count: AtomicUsize::new(0),
                commits: CommitLatency::default(),
            }),
        };

        // A crash between the two steps of a revocation leaves its marker behind.
        let pending: Vec<String> = store
            .inner
            .trees
            .revoking
            .iter()
            .keys()
            .map(|k| {
                k.map_err(StoreError::from)
                    .and_then(|k| utf8("token id", &k))
            })
            .collect::<Result<_, _>>()?;
        for id in pending {
            let removed = store.finish_revocation(&id, now_secs())?;
            tracing::info!(token = %id, peers = removed.len(), "finished an interrupted token revocation");
        }

        if store.inner.trees.meta.get(META_RELEASED_INDEX)?.is_none() {
            let held = store.index_released_leases(now_secs())?;
            if held > 0 {
                tracing::info!(
                    leases = held,
                    "put the leases of earlier deleted peers on hold"
                );
            }
        }

        let mut count = 0;
        let mut outside = 0;
        for item in store.inner.trees.peers.iter() {
            let (_, v) = item?;
            let rec: PeerRecord = decode("peer", &v)?;
            count += 1;
            if !store.in_plan(&rec) {
                outside += 1;
            }
        }
        store.inner.peer_count.store(count, Ordering::Relaxed);
        if outside > 0 {
            tracing::warn!(
                peers = outside,
                plan = %store.inner.plan.describe(),
                "peers have addresses outside the current address plan; \
                 they keep them until they register again and are then re-addressed"
            );
        }
        store.inner.db.flush()?;
        Ok(store)
    }

    /// Creates a token and returns it with its secret. The secret is shown only
    /// here: the store keeps its SHA-256 alone.
    pub async fn create_token(&self, spec: TokenSpec) -> Result<(TokenRecord, String), StoreError> {
        self.create_token_with(spec, false).await
    }

    /// [`Store::create_token`], bound to the machine of its first registration when
    /// `bind_machine` is set.
    pub async fn create_token_with(
        &self,
        spec: TokenSpec,
        bind_machine: bool,
    ) -> Result<(TokenRecord, String), StoreError> {
        self.create_scoped_token(spec, bind_machine, None).await
    }

    /// [`Store::create_token_with`] limited to `scopes` (at least one) when given,
    /// rather than those `spec.admin` implies; the token is an admin token exactly
    /// when `scopes` has [`Scope::Admin`].
    pub async fn create_scoped_token(
        &self,
        mut spec: TokenSpec,
        bind_machine: bool,
        scopes: Option<Vec<Scope>>,
    ) -> Result<(TokenRecord, String), StoreError> {
        validate_label("token name", &spec.name)?;
        let scopes = scopes.map(checked_scopes).transpose()?;
        if let Some(scopes) = &scopes {
            spec.admin = scopes.contains(&Scope::Admin);
        }
        let this = self.clone();
        blocking(move || {
            this.durably("create_token", || {
                // A clash of 48 random bits is unlikely; retrying keeps it harmless.
                for _ in 0..8 {
                    let id = format!("tok_{}", hex(&random_bytes::<6>()?));
                    let secret = format!(
                        "{SECRET_PREFIX}{}",
                        URL_SAFE_NO_PAD.encode(random_bytes::<32>()?)
                    );
                    let hash = sha256(secret.as_bytes());
                    let record = TokenRecord {
                        id: id.clone(),
                        name: spec.name.clone(),
                        max_peers: spec.max_peers,
                        max_ipv4: spec.max_ipv4,
                        bandwidth_mbps: spec.bandwidth_mbps,
                        isolate_peers: spec.isolate_peers,
                        admin: spec.admin,
                        created: now_secs(),
                        bind_machine,
                        machine: None,
                        scopes: scopes.clone(),
                    };
                    let value = encode(&StoredToken {
                        token: record.clone(),
                        secret_sha256: STANDARD.encode(hash),
                    })?;
                    let inserted = this.txn(|tx| {
                        if tx.tokens.get(id.as_bytes())?.is_some()
                            || tx.revoking.get(id.as_bytes())?.is_some()
                            || tx.token_hashes.get(hash)?.is_some()
                        {
                            return Ok(false);
                        }
                        tx.tokens.insert(id.as_bytes(), value.as_slice())?;
                        tx.token_hashes.insert(&hash[..], id.as_bytes())?;
                        tx.token_usage
                            .insert(id.as_bytes(), &encode_usage(TokenUsage::default())[..])?;
                        Ok(true)
                    })?;
                    if inserted {
                        this.inner.db.flush()?;
                        return Ok((record, secret));
                    }
                }
                Err(StoreError::Backend(
                    "could not generate a unique token id".into(),
                ))
            })
        })
        .await
    }

    /// Changes a token's name, limits or isolation as `change` says (each `None`
    /// keeps its field; a bandwidth of 0 removes the cap). Returns the new record.
    /// [`StoreError::NotFound`] if there is no such token.
    pub async fn update_token(
        &self,
        id: &str,
        change: TokenChange,
    ) -> Result<TokenRecord, StoreError> {
        if let Some(name) = &change.name {
            validate_label("token name", name)?;
        }
        let scopes = change.scopes.clone().map(checked_scopes).transpose()?;
        let this = self.clone();
        let id = id.to_owned();
        blocking(move || {
            this.durably("update_token", || {
                let record = this.txn(|tx| {
                    let Some(v) = tx.tokens.get(id.as_bytes())? else {
                        return Ok(None);
                    };
                    let mut stored = decode::<StoredToken>("token", &v).map_err(abort)?;
                    let t = &mut stored.token;
                    if let Some(name) = &change.name {
                        t.name = name.clone();
                    }
                    if let Some(n) = change.max_peers {
                        t.max_peers = n;
                    }
                    if let Some(n) = change.max_ipv4 {
                        t.max_ipv4 = n;
                    }
                    if let Some(mbps) = change.bandwidth_mbps {
                        t.bandwidth_mbps = (mbps > 0).then_some(mbps);
                    }
                    if let Some(isolate) = change.isolate_peers {
                        t.isolate_peers = isolate;
                    }
                    if let Some(scopes) = &scopes {
                        t.admin = scopes.contains(&Scope::Admin);
                        t.scopes = Some(scopes.clone());
                    }
                    let value = encode(&stored).map_err(abort)?;
                    tx.tokens.insert(id.as_bytes(), value.as_slice())?;
                    Ok(Some(stored.token))
                })?;
                let record = record.ok_or(StoreError::NotFound)?;
                this.inner.db.flush()?;
                Ok(record)
            })
        })
        .await
    }

    /// The token whose secret this is, if any. Looks the secret up by its hash, so no
    /// comparison of secrets leaks timing.
    pub fn authenticate(&self, secret: &str) -> Result<Option<TokenRecord>, StoreError> {
        if !looks_like_secret(secret) {
            return Ok(None);
        }
        let hash = sha256(secret.as_bytes());
        let Some(id) = self.inner.trees.token_hashes.get(hash)? else {
            return Ok(None);
        };
        // Absent if revoked between the two reads.
        match self.inner.trees.tokens.get(&id)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode::<StoredToken>("token", &v)?.token)),
        }
    }

    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        match self.inner.trees.tokens.get(id.as_bytes())? {
            None => Ok(None),
            Some(v) => Ok(Some(decode::<StoredToken>("token", &v)?.token)),
        }
    }

    /// All tokens, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.trees.tokens.iter() {
            let (_, v) = item?;
            out.push(decode::<StoredToken>("token", &v)?.token);
        }
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Deletes the token and its peers and returns the peers removed. Their leases
    /// go on hold, so the keys get the same addresses if they register again
    /// elsewhere before the hold ends.
    pub async fn revoke_token(&self, id: &str) -> Result<Vec<PeerRecord>, StoreError> {
        let this = self.clone();
        let id = id.to_owned();
        blocking(move || {
            this.durably("revoke_token", || {
                // Step 1 removes the token, so no registration can add a peer to it;
                // then its peer list is stable and step 2 can remove them all. The
                // marker lets `open` finish step 2 after a crash.
                let exists = this.txn(|tx| match tx.tokens.get(id.as_bytes())? {
                    Some(v) => {
                        let stored: StoredToken = decode("token", &v).abort()?;
                        let hash = STANDARD
                            .decode(&stored.secret_sha256)
                            .map_err(|e| StoreError::Corrupt(format!("token hash of {id}: {e}")))
                            .abort()?;
                        tx.tokens.remove(id.as_bytes())?;
                        tx.token_hashes.remove(hash)?;
                        tx.revoking.insert(id.as_bytes(), &[][..])?;
                        Ok(true)
                    }
                    None => Ok(tx.revoking.get(id.as_bytes())?.is_some()),
                })?;
                if !exists {
                    return Err(StoreError::NotFound);
                }
                let removed = this.finish_revocation(&id, now_secs())?;
                this.inner.db.flush()?;
                Ok(removed)
            })
        })
        .await
    }

    /// Step 2 of a revocation: removes the peers of a token already removed.
    fn finish_revocation(&self, id: &str, now: u64) -> Result<Vec<PeerRecord>, StoreError> {
        let mut keys = Vec::new();
        for item in self.inner.trees.token_peers.scan_prefix(token_prefix(id)) {
            let (k, _) = item?;
            keys.push(key_from_bytes(&k[k.len().saturating_sub(32)..])?);
        }
        let plan = &self.inner.plan;
        let removed = self.txn(|tx| {
            let mut removed = Vec::with_capacity(keys.len());
            for key in &keys {
                if let Some(rec) = remove_peer(tx, plan, key, id, now)? {
                    removed.push(rec);
                }
            }
            tx.token_usage.remove(id.as_bytes())?;
            tx.revoking.remove(id.as_bytes())?;
            Ok(removed)
        })?;
        self.uncount(removed.len());
        Ok(removed)
    }

    /// Forgets the machine a token is bound to; the next registration binds it
    /// again. [`StoreError::NotFound`] if there is no such token.
    pub async fn unbind_machine(&self, id: &str) -> Result<TokenRecord, StoreError> {
        let this = self.clone();
        let id = id.to_owned();
        blocking(move || {
            this.durably("unbind_machine", || {
                let record = this.txn(|tx| {
                    let Some(v) = tx.tokens.get(id.as_bytes())? else {
                        return Err(abort(StoreError::NotFound));
                    };
                    let mut stored: StoredToken = decode("token", &v).abort()?;
                    stored.token.machine = None;
                    tx.tokens.insert(id.as_bytes(), encode(&stored).abort()?)?;
                    Ok(stored.token)
                })?;
                this.inner.db.flush()?;
                Ok(record)
            })
        })
        .await
    }

    /// Current peer and IPv4 counts of a token (O(1): kept as counters).
    pub fn usage(&self, token_id: &str) -> Result<TokenUsage, StoreError> {
        if !self.inner.trees.tokens.contains_key(token_id.as_bytes())? {
            return Err(StoreError::NotFound);
        }
        match self.inner.trees.token_usage.get(token_id.as_bytes())? {
            None => Ok(TokenUsage::default()),
            Some(v) => decode_usage(&v),
        }
    }

    /// Registers a peer under `token`, or returns its existing record.
    ///
    /// The limits come from the stored token, not from `token`, so a token changed
    /// or revoked since authentication is honoured. Re-registering a key is
    /// idempotent (`created == false`, nothing counted twice): it keeps its
    /// addresses, gains an IPv4 address if it now asks for one, and takes the new
    /// name or container when given. A key deleted earlier gets its old addresses
    /// back (the IPv4 one if still free).
    pub async fn register(
        &self,
        token: &TokenRecord,
        reg: Registration,
    ) -> Result<(PeerRecord, bool), StoreError> {
        self.register_with(token, reg, RegisterExtras::default())
            .await
    }

    /// [`Store::register`] with what the client sent besides the peer: the X-Wing
    /// ciphertext (stored, with the counter moved on) and the machine fingerprint
    /// (checked against the token's binding, or binding it, in the same
    /// transaction, so two first registrations cannot bind two machines).
    pub async fn register_with(
        &self,
        token: &TokenRecord,
        reg: Registration,
        extras: RegisterExtras,
    ) -> Result<(PeerRecord, bool), StoreError> {
        if reg.public_key.is_zero() {
            return Err(StoreError::Invalid("the all-zero public key".into()));
        }
        if let Some(name) = &reg.name {
            validate_label("name", name)?;
        }
        if let Some(container) = &reg.container {
            validate_label("container", container)?;
        }
        let this = self.clone();
        let token_id = token.id.clone();
        blocking(move || {
            this.durably("register", || {
                let now = now_secs();
                let plan = &this.inner.plan;
                let outcome =
                    this.txn(|tx| register_tx(tx, plan, &token_id, &reg, &extras, now))?;
                // Flush even for an existing peer: its registration may be another
                // caller's that has not been flushed yet, and we are about to confirm it.
                this.inner.db.flush()?;
                let (rec, created) = outcome?;
                if created {
                    this.inner.peer_count.fetch_add(1, Ordering::Relaxed);
                }
                Ok((rec, created))
            })
        })
        .await
    }

    /// Peers of one token, or all peers (for data plane start-up).
    pub fn peers(&self, token_id: Option<&str>) -> Result<Vec<PeerRecord>, StoreError> {
        let trees = &self.inner.trees;
        let mut out = Vec::new();
        match token_id {
            None => {
                for item in trees.peers.iter() {
                    let (_, v) = item?;
                    out.push(decode("peer", &v)?);
                }
            }
            Some(id) => {
                for item in trees.token_peers.scan_prefix(token_prefix(id)) {
                    let (k, _) = item?;
                    let key = key_from_bytes(&k[k.len().saturating_sub(32)..])?;
                    // The index is read outside a transaction: skip entries whose
                    // peer went away or moved meanwhile.
                    if let Some(rec) = self.peer(&key)? {
                        if rec.token_id == id {
                            out.push(rec);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    pub fn peer(&self, key: &Key) -> Result<Option<PeerRecord>, StoreError> {
        match self.inner.trees.peers.get(key.0)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode("peer", &v)?)),
        }
    }

    /// The peer of `token_id` registered for `container`; the newest if several are.
    pub fn peer_by_container(
        &self,
        token_id: &str,
        container: &str,
    ) -> Result<Option<PeerRecord>, StoreError> {
        let mut best: Option<PeerRecord> = None;
        let prefix = container_prefix(token_id, container);
        for item in self.inner.trees.containers.scan_prefix(&prefix) {
            let (k, _) = item?;
            let key = key_from_bytes(&k[k.len().saturating_sub(32)..])?;
            let Some(rec) = self.peer(&key)? else {
                continue;
            };
            if rec.token_id != token_id || rec.container.as_deref() != Some(container) {
                continue;
            }
            if best.as_ref().is_none_or(|b| rec.created >= b.created) {
                best = Some(rec);
            }
        }
        Ok(best)
    }

    /// Deletes a peer of `token_id`. `None` if the key is not registered under that
    /// token (a peer of another token is not touched, nor revealed). The lease goes
    /// on hold: the IPv6 address stays the key's until [`Store::reclaim_released`]
    /// passes its release time, the IPv4 one until then or until the pool runs out
    /// of never-used addresses.
    pub async fn delete_peer(
        &self,
        token_id: &str,
        key: &Key,
    ) -> Result<Option<PeerRecord>, StoreError> {
        let this = self.clone();
        let token_id = token_id.to_owned();
        let key = *key;
        blocking(move || {
            this.durably("delete_peer", || {
                let plan = &this.inner.plan;
                let now = now_secs();
                let removed = this.txn(|tx| remove_peer(tx, plan, &key, &token_id, now))?;
                this.inner.db.flush()?;
                if removed.is_some() {
                    this.uncount(1);
                }
                Ok(removed)
            })
        })
        .await
    }

    /// Records traffic statistics. `rx_bytes` and `tx_bytes` are totals and replace
    /// the stored values; `last_handshake: None` keeps the stored one. A peer deleted
    /// meanwhile is ignored.
    ///
    /// Not flushed: statistics are not acknowledged to anyone, so they ride on
    /// sled's background flush (500 ms) and a crash may lose the last update. Call
    /// it from a periodic task rather than per packet.
    pub async fn record_usage(
        &self,
        key: &Key,
        last_handshake: Option<u64>,
        rx_bytes: u64,
        tx_bytes: u64,
        endpoint: Option<SocketAddr>,
    ) -> Result<(), StoreError> {
        let peers = &self.inner.trees.peers;
        // Compare-and-swap, not a blind write: a blind write could resurrect a peer
        // deleted between our read and write, or undo a concurrent re-registration.
        loop {
            let Some(current) = peers.get(key.0)? else {
                return Ok(());
            };
            let mut rec: PeerRecord = decode("peer", &current)?;
            let before = (rec.last_handshake, rec.rx_bytes, rec.tx_bytes, rec.endpoint);
            rec.last_handshake = last_handshake.or(rec.last_handshake);
            rec.rx_bytes = rx_bytes;
            rec.tx_bytes = tx_bytes;
            rec.endpoint = endpoint.or(rec.endpoint);
            if before == (rec.last_handshake, rec.rx_bytes, rec.tx_bytes, rec.endpoint) {
                return Ok(());
            }
            let new = encode(&rec)?;
            if peers
                .compare_and_swap(key.0, Some(current), Some(new))?
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// Reclaims the leases of peers deleted before `released_before` (unix
    /// seconds): their records go, and their addresses may be given to other keys.
    /// Returns how many were reclaimed. Not flushed: losing a sweep to a crash only
    /// means the next one does the work.
    pub async fn reclaim_released(&self, released_before: u64) -> Result<usize, StoreError> {
        let this = self.clone();
        blocking(move || {
            let mut total = 0;
            loop {
                let mut batch = Vec::with_capacity(RECLAIM_BATCH);
                for item in this
                    .inner
                    .trees
                    .released
                    .range(..&released_before.to_be_bytes()[..])
                {
                    let (k, _) = item?;
                    batch.push(k);
                    if batch.len() == RECLAIM_BATCH {
                        break;
                    }
                }
                if batch.is_empty() {
                    return Ok(total);
                }
                let done = batch.len();
                total += this.txn(|tx| {
                    let mut reclaimed = 0;
                    for k in &batch {
                        if reclaim_one(tx, k)? {
                            reclaimed += 1;
                        }
                    }
                    Ok(reclaimed)
                })?;
                if done < RECLAIM_BATCH {
                    return Ok(total);
                }
            }
        })
        .await
    }

    /// Number of leases on hold (deleted peers whose addresses are still kept).
    /// O(held).
    pub fn held(&self) -> usize {
        self.inner.trees.released.len()
    }

    /// Entries per tree, for capacity checks and tests. O(entries).
    pub fn entry_counts(&self) -> Vec<(&'static str, usize)> {
        self.inner
            .trees
            .named()
            .into_iter()
            .map(|(name, tree)| (name, tree.len()))
            .collect()
    }

    /// Stores written before leases went on hold kept the leases of deleted peers
    /// forever; put each on hold from `now`, once.
    fn index_released_leases(&self, now: u64) -> Result<usize, StoreError> {
        let t = &self.inner.trees;
        let mut orphans = Vec::new();
        for item in t.leases.iter() {
            let (k, v) = item?;
            let lease: Lease = decode("lease", &v)?;
            if lease.released.is_none() && !t.peers.contains_key(&k)? {
                orphans.push(key_from_bytes(&k)?);
            }
        }
        let held = orphans.len();
        self.txn(|tx| {
            for key in &orphans {
                if let Some(v) = tx.leases.get(key.0)? {
                    let mut lease: Lease = decode("lease", &v).abort()?;
                    lease.released = Some(now);
                    tx.leases.insert(&key.0[..], encode(&lease).abort()?)?;
                    tx.released.insert(released_key(now, key), &[][..])?;
                }
            }
            tx.meta.insert(META_RELEASED_INDEX, &[1u8][..])?;
            Ok(())
        })?;
        self.inner.db.flush()?;
        Ok(held)
    }

    /// Number of registered peers (kept in memory; O(1)).
    pub fn peer_count(&self) -> usize {
        self.inner.peer_count.load(Ordering::Relaxed)
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        // sled's `flush_async` lets its worker thread drop its handle on the database
        // only after the future completes, so the directory could still be locked
        // for a moment after the last `Store` is dropped; a blocking flush is done
        // with the database when it returns.
        let db = self.inner.db.clone();
        blocking(move || {
            db.flush()?;
            Ok(())
        })
        .await
    }

    /// Bytes the database takes on disk (for capacity reports and benchmarks).
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.size_on_disk()?)
    }

    /// True if the peer's stored addresses fit the plan the store was opened with.
    pub fn in_plan(&self, peer: &PeerRecord) -> bool {
        let plan = &self.inner.plan;
        plan.v6_allowed(peer.ipv6) && peer.ipv4.is_none_or(|a| plan.v4_allowed(a))
    }

    /// Peers whose stored addresses a plan change left outside the current plan.
    pub fn out_of_plan(&self) -> Result<Vec<PeerRecord>, StoreError> {
        Ok(self
            .peers(None)?
            .into_iter()
            .filter(|p| !self.in_plan(p))
            .collect())
    }

    /// Checks the invariants between the trees: every peer owns its addresses, no
    /// address belongs to two peers, indexes and counters match. O(peers); meant for
    /// tests and an operator's consistency check, not for the request path.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let t = &self.inner.trees;
        let mut problems = Vec::new();
        let mut v6: HashMap<Ipv6Addr, Key> = HashMap::new();
        let mut v4: HashMap<Ipv4Addr, Key> = HashMap::new();
        let mut per_token: HashMap<String, TokenUsage> = HashMap::new();
        let mut keys: HashSet<Key> = HashSet::new();
        let mut peers = 0;
        for item in t.peers.iter() {
            let (k, v) = item?;
            let key = key_from_bytes(&k)?;
            let rec: PeerRecord = decode("peer", &v)?;
            peers += 1;
            keys.insert(key);
            if rec.public_key != key {
                problems.push(format!("peer stored under {key} names {}", rec.public_key));
            }
            if let Some(other) = v6.insert(rec.ipv6, key) {
                problems.push(format!("{} belongs to {other} and {key}", rec.ipv6));
            }
            if t.v6_owner.get(rec.ipv6.octets())?.as_deref() != Some(&key.0[..]) {
                problems.push(format!("v6_owner of {} is not {key}", rec.ipv6));
            }
            if let Some(a) = rec.ipv4 {
                if let Some(other) = v4.insert(a, key) {
                    problems.push(format!("{a} belongs to {other} and {key}"));
                }
                if t.v4_owner.get(a.octets())?.as_deref() != Some(&key.0[..]) {
                    problems.push(format!("v4_owner of {a} is not {key}"));
                }
            }
            if !t
                .token_peers
                .contains_key(token_peer_key(&rec.token_id, &key))?
            {
                problems.push(format!("{key} is missing from its token's index"));
            }
            if !t.tokens.contains_key(rec.token_id.as_bytes())? {
                problems.push(format!("{key} belongs to missing token {}", rec.token_id));
            }
            let usage = per_token.entry(rec.token_id.clone()).or_default();
            usage.peers += 1;
            usage.ipv4 += u32::from(rec.ipv4.is_some());
        }
        for item in t.v4_owner.iter() {
            let (a, owner) = item?;
            let addr = ipv4_from_bytes(&a)?;
            if v4.get(&addr).map(|k| &k.0[..]) != Some(&owner[..]) {
                problems.push(format!(
                    "v4_owner lists {addr} for a peer that does not hold it"
                ));
            }
        }
        for item in t.v6_owner.iter() {
            let (a, owner) = item?;
            let addr = <[u8; 16]>::try_from(a.as_ref())
                .map(Ipv6Addr::from)
                .map_err(|_| StoreError::Corrupt("stored IPv6 address is not 16 bytes".into()))?;
            if v6.get(&addr).map(|k| &k.0[..]) == Some(&owner[..]) {
                continue;
            }
            let held = match t.leases.get(&owner)? {
                Some(v) => {
                    let lease: Lease = decode("lease", &v)?;
                    lease.ipv6 == addr && lease.released.is_some()
                }
                None => false,
            };
            if !held {
                problems.push(format!(
                    "v6_owner lists {addr} for neither a peer nor a held lease"
                ));
            }
        }
        for item in t.released.iter() {
            let (k, _) = item?;
            let held = k.len() == 40
                && match t.leases.get(&k[8..])? {
                    Some(v) => {
                        let lease: Lease = decode("lease", &v)?;
                        lease
                            .released
                            .map(u64::to_be_bytes)
                            .as_ref()
                            .map(|b| &b[..])
                            == Some(&k[..8])
                    }
                    None => false,
                };
            if !held {
                problems.push("a released entry names no held lease".into());
            }
        }
        for item in t.token_peers.iter() {
            let (k, _) = item?;
            let key = key_from_bytes(&k[k.len().saturating_sub(32)..])?;
            if !keys.contains(&key) {
                problems.push(format!("token index lists deleted peer {key}"));
            }
        }
        let mut tokens = 0;
        for item in t.tokens.iter() {
            let (id, _) = item?;
            let id = utf8("token id", &id)?;
            tokens += 1;
            let stored = match t.token_usage.get(id.as_bytes())? {
                None => TokenUsage::default(),
                Some(v) => decode_usage(&v)?,
            };
            let actual = per_token.get(&id).copied().unwrap_or_default();
            if stored != actual {
                problems.push(format!("usage of {id} is {stored:?}, peers say {actual:?}"));
            }
        }
        if problems.is_empty() {
            Ok(VerifyReport {
                tokens,
                peers,
                ipv4: v4.len(),
            })
        } else {
            problems.truncate(20);
            Err(StoreError::Corrupt(problems.join("; ")))
        }
    }

    /// Saturating, because `open` finishes interrupted revocations before it has
    /// counted the peers.
    fn uncount(&self, n: usize) {
        let _ = self
            .inner
            .peer_count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(n))
            });
    }

    /// How long durable commits have taken so far, for `/metrics`.
    pub fn commit_latency(&self) -> &CommitLatency {
        &self.inner.commits
    }

    /// Runs `commit` (a mutating call's transaction and flush) and records how long it
    /// took under `operation`, whatever its outcome: a refused registration still
    /// waited for the transaction and the flush.
    fn durably<T>(
        &self,
        operation: &'static str,
        commit: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = commit();
        self.inner.commits.record(operation, started.elapsed());
        result
    }

    /// Runs `f` as one transaction over all trees.
    fn txn<A>(&self, f: impl Fn(&Tx<'_>) -> TxResult<A>) -> Result<A, StoreError> {
        let result: Result<A, TransactionError<StoreError>> =
            self.inner.all[..].transaction(|views| {
                let tx = Tx::new(views).abort()?;
                f(&tx)
            });
        result.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        })
    }
}

/// The registration proper. The outer `Err` aborts the transaction; an inner `Err`
/// (address exhaustion) commits, so the IPv4 search does not repeat its work next
/// time, but has written nothing else.
fn register_tx(
    tx: &Tx<'_>,
    plan: &Plan,
    token_id: &str,
    reg: &Registration,
    extras: &RegisterExtras,
    now: u64,
) -> TxResult<Result<(PeerRecord, bool), StoreError>> {
    let key = &reg.public_key;
    let Some(token) = tx.tokens.get(token_id.as_bytes())? else {
        return Err(abort(StoreError::UnknownToken));
    };
    let mut stored_token = decode::<StoredToken>("token", &token).abort()?;
    if stored_token.token.bind_machine {
        match (&stored_token.token.machine, &extras.machine) {
            (_, None) => return Err(abort(StoreError::MachineRequired)),
            (Some(bound), Some(given)) if bound != given => {
                return Err(abort(StoreError::MachineMismatch))
            }
            (Some(_), Some(_)) => {}
            (None, Some(given)) => {
                stored_token.token.machine = Some(given.clone());
                tx.tokens
                    .insert(token_id.as_bytes(), encode(&stored_token).abort()?)?;
            }
        }
    }
    let limits = stored_token.token;
    let mut usage = read_usage(tx, token_id)?;
    let lease = match tx.leases.get(key.0)? {
        None => None,
        Some(v) => Some(decode::<Lease>("lease", &v).abort()?),
    };
    // Registering again lifts the hold; `write_lease` below clears the release time.
    if let Some(t) = lease.as_ref().and_then(|l| l.released) {
        tx.released.remove(released_key(t, key))?;
    }

    if let Some(current) = tx.peers.get(key.0)? {
        let mut rec: PeerRecord = decode("peer", &current).abort()?;
        if rec.token_id != token_id {
            return Err(abort(StoreError::Conflict));
        }
        let before = rec.clone();
        let stale_v4 = rec.ipv4.filter(|a| !plan.v4_allowed(*a));
        let wants_v4 = reg.ipv4 && (rec.ipv4.is_none() || stale_v4.is_some());
        if wants_v4 && plan.v4_pool().is_none() {
            return Err(abort(StoreError::Ipv4Unavailable));
        }
        let v4_in_use = usage.ipv4.saturating_sub(u32::from(stale_v4.is_some()));
        if wants_v4 && v4_in_use >= limits.max_ipv4 {
            return Err(abort(StoreError::Quota {
                limit: "max_ipv4",
                max: limits.max_ipv4,
            }));
        }
        // Find everything before writing anything, so a failure leaves no trace.
        let new_v6 = if plan.v6_allowed(rec.ipv6) {
            None
        } else {
            match alloc_v6(tx, plan, key)? {
                Some(a) => Some(a),
                None => return Ok(Err(StoreError::PoolExhausted { family: "ipv6" })),
            }
        };
        let new_v4 = if wants_v4 {
            match alloc_v4(tx, plan, lease.as_ref().and_then(|l| l.ipv4))? {
                Some(a) => Some(a),
                None => return Ok(Err(StoreError::PoolExhausted { family: "ipv4" })),
            }
        } else {
            None
        };

        if let Some(a) = new_v6 {
            // The old address is outside the plan now: nobody else can get it.
            if tx.v6_owner.get(rec.ipv6.octets())?.as_deref() == Some(&key.0[..]) {
                tx.v6_owner.remove(&rec.ipv6.octets()[..])?;
            }
            tx.v6_owner.insert(&a.octets()[..], &key.0[..])?;
            rec.ipv6 = a;
        }
        if let Some(old) = stale_v4 {
            // Outside the pool now, so it does not go back on the free list.
            if tx.v4_owner.get(old.octets())?.as_deref() == Some(&key.0[..]) {
                tx.v4_owner.remove(&old.octets()[..])?;
            }
            rec.ipv4 = None;
            usage.ipv4 = usage.ipv4.saturating_sub(1);
        }
        if let Some(a) = new_v4 {
            take_v4(tx, a, key)?;
            rec.ipv4 = Some(a);
            usage.ipv4 += 1;
        }
        if reg.name.is_some() && reg.name != rec.name {
            rec.name.clone_from(&reg.name);
        }
        if extras.pq_ciphertext.is_some() {
            rec.pq_counter += 1;
        }
        rec.pq_ciphertext.clone_from(&extras.pq_ciphertext);
        if reg.container.is_some() && reg.container != rec.container {
            if let Some(old) = &rec.container {
                tx.containers.remove(container_key(token_id, old, key))?;
            }
            rec.container.clone_from(&reg.container);
            if let Some(new) = &rec.container {
                tx.containers
                    .insert(container_key(token_id, new, key), &[][..])?;
            }
        }
        if rec != before {
            tx.peers.insert(&key.0[..], encode(&rec).abort()?)?;
            write_usage(tx, token_id, usage)?;
            write_lease(tx, key, rec.ipv6, rec.ipv4.or(lease.and_then(|l| l.ipv4)))?;
        }
        return Ok(Ok((rec, false)));
    }

    if reg.ipv4 && plan.v4_pool().is_none() {
        return Err(abort(StoreError::Ipv4Unavailable));
    }
    if usage.peers >= limits.max_peers {
        return Err(abort(StoreError::Quota {
            limit: "max_peers",
            max: limits.max_peers,
        }));
    }
    if reg.ipv4 && usage.ipv4 >= limits.max_ipv4 {
        return Err(abort(StoreError::Quota {
            limit: "max_ipv4",
            max: limits.max_ipv4,
        }));
    }
    let leased_v6 = match &lease {
        Some(l) if plan.v6_allowed(l.ipv6) => {
            let owner = tx.v6_owner.get(l.ipv6.octets())?;
            owner
                .is_none_or(|o| o.as_ref() == &key.0[..])
                .then_some(l.ipv6)
        }
        _ => None,
    };
    let ipv6 = match leased_v6 {
        Some(a) => a,
        None => match alloc_v6(tx, plan, key)? {
            Some(a) => a,
            None => return Ok(Err(StoreError::PoolExhausted { family: "ipv6" })),
        },
    };
    let ipv4 = if reg.ipv4 {
        match alloc_v4(tx, plan, lease.as_ref().and_then(|l| l.ipv4))? {
            Some(a) => Some(a),
            None => return Ok(Err(StoreError::PoolExhausted { family: "ipv4" })),
        }
    } else {
        None
    };
    let rec = PeerRecord {
        public_key: *key,
        token_id: token_id.to_owned(),
        ipv6,
        ipv4,
        name: reg.name.clone(),
        container: reg.container.clone(),
        created: now,
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
        endpoint: None,
        pq_ciphertext: extras.pq_ciphertext.clone(),
        pq_counter: u64::from(extras.pq_ciphertext.is_some()),
    };
    tx.peers.insert(&key.0[..], encode(&rec).abort()?)?;
    tx.token_peers
        .insert(token_peer_key(token_id, key), &[][..])?;
    if let Some(c) = &rec.container {
        tx.containers
            .insert(container_key(token_id, c, key), &[][..])?;
    }
    tx.v6_owner.insert(&ipv6.octets()[..], &key.0[..])?;
    if let Some(a) = ipv4 {
        take_v4(tx, a, key)?;
    }
    // Keep the old IPv4 in the lease when this registration did not ask for one, so
    // a later request still prefers it.
    write_lease(tx, key, ipv6, ipv4.or(lease.and_then(|l| l.ipv4)))?;
    usage.peers += 1;
    usage.ipv4 += u32::from(ipv4.is_some());
    write_usage(tx, token_id, usage)?;
    Ok(Ok((rec, true)))
}

/// Removes a peer of `token_id`, releases its IPv4 address and puts its lease on
/// hold from `now`.
fn remove_peer(
    tx: &Tx<'_>,
    plan: &Plan,
    key: &Key,
    token_id: &str,
    now: u64,
) -> TxResult<Option<PeerRecord>> {
    let Some(current) = tx.peers.get(key.0)? else {
        return Ok(None);
    };
    let rec: PeerRecord = decode("peer", &current).abort()?;
    if rec.token_id != token_id {
        return Ok(None);
    }
    tx.peers.remove(&key.0[..])?;
    tx.token_peers.remove(token_peer_key(token_id, key))?;
    if let Some(c) = &rec.container {
        tx.containers.remove(container_key(token_id, c, key))?;
    }
    if let Some(a) = rec.ipv4 {
        if tx.v4_owner.get(a.octets())?.as_deref() == Some(&key.0[..]) {
            tx.v4_owner.remove(&a.octets()[..])?;
            if plan.v4_allowed(a) {
                // One entry per address: re-queue it rather than adding a second.
                unqueue_v4(tx, a)?;
                let tail = read_u64(tx.meta, META_FREE_TAIL)?;
                tx.v4_free
                    .insert(&tail.to_be_bytes()[..], &a.octets()[..])?;
                tx.v4_free_seq
                    .insert(&a.octets()[..], &tail.to_be_bytes()[..])?;
                tx.meta
                    .insert(META_FREE_TAIL, &(tail + 1).to_be_bytes()[..])?;
            }
        }
    }
    // The IPv6 owner entry stays while the lease is held.
    let previous = match tx.leases.get(key.0)? {
        None => None,
        Some(v) => Some(decode::<Lease>("lease", &v).abort()?),
    };
    if let Some(t) = previous.as_ref().and_then(|l| l.released) {
        tx.released.remove(released_key(t, key))?;
    }
    let lease = Lease {
        ipv6: rec.ipv6,
        ipv4: rec.ipv4.or(previous.and_then(|l| l.ipv4)),
        released: Some(now),
    };
    tx.leases.insert(&key.0[..], encode(&lease).abort()?)?;
    tx.released.insert(released_key(now, key), &[][..])?;
    let mut usage = read_usage(tx, token_id)?;
    usage.peers = usage.peers.saturating_sub(1);
    usage.ipv4 = usage.ipv4.saturating_sub(u32::from(rec.ipv4.is_some()));
    write_usage(tx, token_id, usage)?;
    Ok(Some(rec))
}

/// The first address along `key`'s probe sequence that is free or already the key's.
fn alloc_v6(tx: &Tx<'_>, plan: &Plan, key: &Key) -> TxResult<Option<Ipv6Addr>> {
    for addr in plan.v6_candidates(key) {
        match tx.v6_owner.get(addr.octets())? {
            None => return Ok(Some(addr)),
            Some(owner) if owner.as_ref() == &key.0[..] => return Ok(Some(addr)),
            Some(_) => {}
        }
    }
    Ok(None)
}

/// Picks an IPv4 address: `preferred` (the key's previous one) if free, else the
/// lowest never-leased one, else the one released longest ago. Writes only the
/// search state (cursor, free-list head), never the allocation itself.
fn alloc_v4(tx: &Tx<'_>, plan: &Plan, preferred: Option<Ipv4Addr>) -> TxResult<Option<Ipv4Addr>> {
    let Some(pool) = plan.v4_pool() else {
        return Ok(None);
    };
    if let Some(a) = preferred {
        if plan.v4_allowed(a) && tx.v4_owner.get(a.octets())?.is_none() {
            return Ok(Some(a));
        }
    }

    // Every offset below the cursor has been leased (or is unusable) under this
    // plan, so the search resumes there; after a plan change it starts over.
    let mut next = match tx.meta.get(META_V4_CURSOR)? {
        Some(v) => {
            let cursor: V4Cursor = decode("IPv4 cursor", &v).abort()?;
            if cursor.plan == plan.v4_fingerprint() {
                cursor.next
            } else {
                0
            }
        }
        None => 0,
    };
    let start = next;
    let mut found = None;
    while next < pool.size() {
        let offset = next;
        next += 1;
        if let Some(a) = plan.v4_usable(pool, offset) {
            if tx.v4_lease.get(a.octets())?.is_none() && tx.v4_owner.get(a.octets())?.is_none() {
                found = Some(a);
                break;
            }
        }
    }
    if next != start {
        let cursor = V4Cursor {
            plan: plan.v4_fingerprint().to_owned(),
            next,
        };
        tx.meta.insert(META_V4_CURSOR, encode(&cursor).abort()?)?;
    }
    if found.is_some() {
        return Ok(found);
    }

    // Entries are hints: an address may have been reclaimed by its old key since it
    // was released, or fallen out of the plan. Drop those on the way.
    let mut head = read_u64(tx.meta, META_FREE_HEAD)?;
    let tail = read_u64(tx.meta, META_FREE_TAIL)?;
    let head_before = head;
    while head < tail {
        let seq = head.to_be_bytes();
        let entry = tx.v4_free.remove(&seq[..])?;
        head += 1;
        let Some(bytes) = entry else { continue };
        let a = ipv4_from_bytes(&bytes).abort()?;
        if tx.v4_free_seq.get(a.octets())?.as_deref() == Some(&seq[..]) {
            tx.v4_free_seq.remove(&a.octets()[..])?;
        }
        if plan.v4_allowed(a) && tx.v4_owner.get(a.octets())?.is_none() {
            found = Some(a);
            break;
        }
    }
    if head != head_before {
        tx.meta.insert(META_FREE_HEAD, &head.to_be_bytes()[..])?;
    }
    Ok(found)
}

fn take_v4(tx: &Tx<'_>, addr: Ipv4Addr, key: &Key) -> TxResult<()> {
    tx.v4_owner.insert(&addr.octets()[..], &key.0[..])?;
    tx.v4_lease.insert(&addr.octets()[..], &key.0[..])?;
    unqueue_v4(tx, addr)
}

/// Takes `addr` off the free list, if it is on it.
fn unqueue_v4(tx: &Tx<'_>, addr: Ipv4Addr) -> TxResult<()> {
    if let Some(seq) = tx.v4_free_seq.remove(&addr.octets()[..])? {
        tx.v4_free.remove(seq)?;
    }
    Ok(())
}

/// A registered key's lease: not on hold.
fn write_lease(tx: &Tx<'_>, key: &Key, ipv6: Ipv6Addr, ipv4: Option<Ipv4Addr>) -> TxResult<()> {
    let value = encode(&Lease {
        ipv6,
        ipv4,
        released: None,
    })
    .abort()?;
    tx.leases.insert(&key.0[..], value)?;
    Ok(())
}

/// `released` index key: release time first, so a range scan finds the oldest.
fn released_key(released: u64, key: &Key) -> Vec<u8> {
    let mut k = Vec::with_capacity(40);
    k.extend_from_slice(&released.to_be_bytes());
    k.extend_from_slice(&key.0);
    k
}

/// Reclaims the held lease named by one `released` entry; false if the entry was
/// stale (the key registered again, or was released again later).
fn reclaim_one(tx: &Tx<'_>, entry: &[u8]) -> TxResult<bool> {
    tx.released.remove(entry)?;
    let (Ok(time), Ok(key)) = (
        <[u8; 8]>::try_from(&entry[..entry.len().min(8)]),
        key_from_bytes(&entry[entry.len().min(8)..]),
    ) else {
        return Err(abort(StoreError::Corrupt(format!(
            "released entry has {} bytes, not 40",
            entry.len()
        ))));
    };
    let Some(v) = tx.leases.get(key.0)? else {
        return Ok(false);
    };
    let lease: Lease = decode("lease", &v).abort()?;
    if lease.released != Some(u64::from_be_bytes(time)) || tx.peers.get(key.0)?.is_some() {
        return Ok(false);
    }
    tx.leases.remove(&key.0[..])?;
    if tx.v6_owner.get(lease.ipv6.octets())?.as_deref() == Some(&key.0[..]) {
        tx.v6_owner.remove(&lease.ipv6.octets()[..])?;
    }
    if let Some(a) = lease.ipv4 {
        if tx.v4_lease.get(a.octets())?.as_deref() == Some(&key.0[..]) {
            tx.v4_lease.remove(&a.octets()[..])?;
        }
    }
    Ok(true)
}

fn read_usage(tx: &Tx<'_>, token_id: &str) -> TxResult<TokenUsage> {
    match tx.token_usage.get(token_id.as_bytes())? {
        None => Ok(TokenUsage::default()),
        Some(v) => decode_usage(&v).abort(),
    }
}

fn write_usage(tx: &Tx<'_>, token_id: &str, usage: TokenUsage) -> TxResult<()> {
    tx.token_usage
        .insert(token_id.as_bytes(), &encode_usage(usage)[..])?;
    Ok(())
}

fn read_u64(tree: &TransactionalTree, name: &[u8]) -> TxResult<u64> {
    match tree.get(name)? {
        None => Ok(0),
        Some(v) => match <[u8; 8]>::try_from(v.as_ref()) {
            Ok(b) => Ok(u64::from_be_bytes(b)),
            Err(_) => Err(abort(StoreError::Corrupt(format!(
                "meta value {} has {} bytes, not 8",
                String::from_utf8_lossy(name),
                v.len()
            )))),
        },
    }
}

fn abort(e: StoreError) -> TxError {
    ConflictableTransactionError::Abort(e)
}

/// Turns a store result into a transaction abort.
trait AbortExt<T> {
    fn abort(self) -> TxResult<T>;
}

impl<T> AbortExt<T> for Result<T, StoreError> {
    fn abort(self) -> TxResult<T> {
        self.map_err(abort)
    }
}

/// Runs blocking store work (a transaction and an fsync) off the async runtime.
fn blocking<T, F>(f: F) -> impl Future<Output = Result<T, StoreError>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    let task = tokio::task::spawn_blocking(f);
    async move {
        task.await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("undecodable {what} record: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("encoding: {e}")))
}

fn encode_usage(u: TokenUsage) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&u.peers.to_be_bytes());
    out[4..].copy_from_slice(&u.ipv4.to_be_bytes());
    out
}

fn decode_usage(bytes: &[u8]) -> Result<TokenUsage, StoreError> {
    let b = <[u8; 8]>::try_from(bytes).map_err(|_| {
        StoreError::Corrupt(format!("usage counter has {} bytes, not 8", bytes.len()))
    })?;
    Ok(TokenUsage {
        peers: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        ipv4: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    })
}

fn key_from_bytes(bytes: &[u8]) -> Result<Key, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(Key)
        .map_err(|_| StoreError::Corrupt(format!("stored key has {} bytes, not 32", bytes.len())))
}

fn ipv4_from_bytes(bytes: &[u8]) -> Result<Ipv4Addr, StoreError> {
    <[u8; 4]>::try_from(bytes)
        .map(Ipv4Addr::from)
        .map_err(|_| StoreError::Corrupt(format!("stored IPv4 address has {} bytes", bytes.len())))
}

fn utf8(what: &str, bytes: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| StoreError::Corrupt(format!("stored {what} is not UTF-8")))
}

/// Token ids never contain 0, so it separates the id from what follows.
fn token_prefix(token_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(token_id.len() + 1);
    k.extend_from_slice(token_id.as_bytes());
    k.push(0);
    k
}

fn token_peer_key(token_id: &str, key: &Key) -> Vec<u8> {
    let mut k = token_prefix(token_id);
    k.extend_from_slice(&key.0);
    k
}

/// Labels cannot contain 0 (control characters are rejected), so it terminates the
/// container and "web" does not match "web2".
fn container_prefix(token_id: &str, container: &str) -> Vec<u8> {
    let mut k = token_prefix(token_id);
    k.extend_from_slice(container.as_bytes());
    k.push(0);
    k
}

fn container_key(token_id: &str, container: &str, key: &Key) -> Vec<u8> {
    let mut k = container_prefix(token_id, container);
    k.extend_from_slice(&key.0);
    k
}

/// Names and container labels: 1 to 128 printable characters. Control characters
/// would break logs and the index layout; invisible formatting characters (bidi
/// overrides, zero-width) would let two different names look the same.
pub(crate) fn validate_label(what: &str, s: &str) -> Result<(), StoreError> {
    if s.is_empty() {
        return Err(StoreError::Invalid(format!("{what} is empty")));
    }
    if s.chars().count() > LABEL_MAX {
        return Err(StoreError::Invalid(format!(
            "{what} is longer than {LABEL_MAX} characters"
        )));
    }
    let invisible = |c: char| {
        matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}' | '\u{feff}')
    };
    if s.chars().any(|c| c.is_control() || invisible(c)) {
        return Err(StoreError::Invalid(format!(
            "{what} contains a non-printable character"
        )));
    }
    Ok(())
}

/// Cheap shape check so garbage never costs a hash and a lookup.
fn looks_like_secret(secret: &str) -> bool {
    secret.strip_prefix(SECRET_PREFIX).is_some_and(|rest| {
        rest.len() == SECRET_B64_LEN
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, data).as_ref());
    out
}

fn random_bytes<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut out = [0u8; N];
    OsRng
        .try_fill_bytes(&mut out)
        .map_err(|e| StoreError::Backend(format!("no randomness: {e}")))?;
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Public keys as the base64 text WireGuard tools use.
mod key_base64 {
    use serde::{Deserialize, Deserializer, Serializer};
    use sidecar::Key;

    pub fn serialize<S: Serializer>(key: &Key, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&key.to_base64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        let s = String::deserialize(d)?;
        Key::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
