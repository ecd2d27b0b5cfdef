//! What the supervisor and every container task share: settings, clients, the
//! bound on relay calls in flight, the status rows and the agent's own counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use parking_lot::{Mutex, RwLock};
use sidecar::netem::Conditions;
use sidecar::wg::Device;
use sidecar::Key;
use tokio::sync::{watch, Semaphore};

use crate::relay_client::RelayClient;
use crate::state::{StateDir, StatusRow};

/// How the agent serves containers: the `--mode` of `sidecar-agent run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A TUN device in the container; netstack where none can be made.
    Auto,
    /// A TUN device in the container's network namespace.
    Tun,
    /// A userspace TCP/IP stack in the agent that forwards to the container.
    Netstack,
}

/// Counters of the agent itself, for `/metrics`.
#[derive(Default)]
pub struct Counters {
    /// Registrations that succeeded (first ones and re-registrations).
    pub registrations: AtomicU64,
    /// Registrations made again because the relay no longer had them.
    pub reregistrations: AtomicU64,
    /// Failed setups, checks and deregistrations.
    pub errors: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running tunnel's device and the relay's key on it, for live counters.
pub type Live = (Arc<Device>, Key);

/// One container's published state: its status row and, while its tunnel runs,
/// the device to read live counters from.
#[derive(Clone)]
pub struct Entry {
    pub row: StatusRow,
    pub live: Option<Live>,
    /// Emulated conditions set at run time (`sidecar-agent shape`), in place of
    /// the labels' until the container is removed; `Some(None)` cleared them.
    pub shaped: Option<Option<Conditions>>,
}

impl Entry {
    /// The conditions in force: a run-time change, else what the labels ask.
    pub fn conditions(&self, labels: Option<Conditions>) -> Option<Conditions> {
        self.shaped.unwrap_or(labels)
    }

    /// The row with the live counters folded in.
    pub fn snapshot(&self) -> StatusRow {
        let mut row = self.row.clone();
        if let Some((device, key)) = &self.live {
            if let Some(p) = device.peer(key) {
                row.latest_handshake = device
                    .last_handshake(&p, Instant::now(), SystemTime::now())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                row.rx_bytes = p.rx_bytes();
                row.tx_bytes = p.tx_bytes();
            }
        }
        row
    }
}

pub struct Shared {
    pub relay: RelayClient,
    pub relay_url: String,
    pub mode: Mode,
    pub state: StateDir,
    pub docker: RwLock<Docker>,
    /// Bounds the containers talking to the relay (or setting up) at once, so a
    /// burst of starts cannot open hundreds of connections.
    pub in_flight: Semaphore,
    pub counters: Counters,
    pub rows: Mutex<HashMap<String, Entry>>,
    /// Bumped whenever one of our registrations is given back: containers refused
    /// for the token's limits ask again.
    pub room: watch::Sender<u64>,
    /// Set once the first reconcile with Docker is done (for `/readyz`).
    pub reconciled: AtomicBool,
    /// Whether the Docker event stream is followed right now (for `/readyz`).
    pub docker_connected: AtomicBool,
}

impl Shared {
    pub fn new(
        relay: RelayClient,
        relay_url: String,
        mode: Mode,
        state: StateDir,
        docker: Docker,
        max_in_flight: usize,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            relay,
            relay_url,
            mode,
            state,
            docker: RwLock::new(docker),
            in_flight: Semaphore::new(max_in_flight),
            counters: Counters::default(),
            rows: Mutex::new(HashMap::new()),
            room: watch::channel(0).0,
            reconciled: AtomicBool::new(false),
            docker_connected: AtomicBool::new(false),
        })
    }

    pub fn docker(&self) -> Docker {
        self.docker.read().clone()
    }

    /// Changes container `id`'s row (creating it) with `f`.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
        let mut rows = self.rows.lock();
        let entry = rows.entry(id.to_string()).or_insert_with(|| Entry {
            row: StatusRow {
                container: id.to_string(),
                ..StatusRow::default()
            },
            live: None,
            shaped: None,
        });
        f(entry);
    }

    /// The conditions container `id` should have (see [`Entry::conditions`]).
    pub fn conditions_for(&self, id: &str, labels: Option<Conditions>) -> Option<Conditions> {
        match self.rows.lock().get(id) {
            Some(e) => e.conditions(labels),
            None => labels,
        }
    }

    /// Sets container `name_or_id`'s emulated conditions at run time (`None`
    /// clears them), on its running tunnel at once and on every later one; the
    /// container's id, or why not.
    pub fn shape(
        &self,
        name_or_id: &str,
        conditions: Option<Conditions>,
    ) -> Result<String, String> {
        let rows = self.rows.lock();
        let by_name: Vec<&String> = rows
            .iter()
            .filter(|(id, e)| {
                e.row.name == name_or_id || (name_or_id.len() >= 4 && id.starts_with(name_or_id))
            })
            .map(|(id, _)| id)
            .collect();
        let id = match by_name[..] {
            [id] => id.clone(),
            [] => {
                return Err(format!(
                    "no container {name_or_id:?} is served by this agent"
                ))
            }
            _ => return Err(format!("{name_or_id:?} names more than one container")),
        };
        drop(rows);
        self.shape_id(&id, conditions)?;
        Ok(id)
    }

    /// [`Shared::shape`] for exactly container `id`.
    pub fn shape_id(&self, id: &str, conditions: Option<Conditions>) -> Result<(), String> {
        let mut rows = self.rows.lock();
        let entry = rows
            .get_mut(id)
            .ok_or_else(|| format!("container {} is not served any more", short(id)))?;
        entry.shaped = Some(conditions);
        if let Some((device, key)) = &entry.live {
            device.set_peer_conditions(key, conditions);
        }
        Ok(())
    }

    pub fn forget(&self, id: &str) {
        self.rows.lock().remove(id);
    }

    /// Every row, live counters included, sorted by name.
    pub fn snapshot(&self) -> Vec<(StatusRow, Option<Live>)> {
        let mut rows: Vec<_> = self
            .rows
            .lock()
            .values()
            .map(|e| (e.snapshot(), e.live.clone()))
            .collect();
        rows.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        rows
    }

    pub fn write_status(&self) {
        let rows: Vec<StatusRow> = self.snapshot().into_iter().map(|(r, _)| r).collect();
        if let Err(e) = self.state.write_status(&rows) {
            tracing::warn!(error = %e, "cannot write the status file");
        }
    }

    pub fn room_freed(&self) {
        self.room.send_modify(|n| *n = n.wrapping_add(1));
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
