//! `sidecar-agent run`: follows Docker and gives every container labeled
//! `sidecar.enable=true` its own WireGuard peer on the relay and its own address.
//!
//! The supervisor here only follows Docker and hands each container's events to
//! that container's task ([`crate::container`]); it never waits for the relay, so
//! one container's slow relay call delays neither another's events nor SIGTERM.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::container::{self, Command, Liveness};
use crate::relay_client::RelayClient;
pub use crate::shared::Mode;
use crate::shared::{unix_now, Shared};
use crate::state::StateDir;
use crate::state::StatusRow;

/// How often the status snapshot is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often keys of containers that no longer exist are looked for (and their
/// registrations given back).
const COLLECT_EVERY: Duration = Duration::from_secs(60);
/// Default period of each container's registration check.
pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(30);
/// Default bound on containers talking to the relay at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

pub struct Settings {
    pub relay: RelayClient,
    pub relay_url: String,
    pub docker_socket: Option<String>,
    pub state_dir: PathBuf,
    pub mode: Mode,
    /// How often each container's registration is verified with the relay.
    pub check_every: Duration,
    /// Containers setting up or talking to the relay at once, at most.
    pub max_in_flight: usize,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; `None`: nowhere.
    pub health_listen: Option<SocketAddr>,
}

pub async fn run(settings: Settings) -> Result<()> {
    let state = StateDir::open(&settings.state_dir).with_context(|| {
        format!(
            "cannot use state directory {}",
            settings.state_dir.display()
        )
    })?;
    crate::secrets::check_state_dir(state.root())?;
    let docker = connect_docker(settings.docker_socket.as_deref()).await?;
    let shared = Shared::new(
        settings.relay,
        settings.relay_url,
        settings.mode,
        state,
        docker,
        settings.max_in_flight.max(1),
    );
    let control = crate::control::serve(&settings.state_dir, shared.clone())?;
    let health = match settings.health_listen {
        Some(addr) => Some(crate::health::serve(addr, shared.clone()).await?),
        None => None,
    };
    let mut agent = Agent {
        shared,
        docker_socket: settings.docker_socket,
        liveness: Liveness {
            check_every: settings.check_every,
        },
        tasks: HashMap::new(),
    };
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let result = loop {
        let mut events = agent.events();
        agent.shared.docker_connected.store(true, Ordering::Relaxed);
        // Listed after subscribing, so nothing that happens in between is missed.
        agent.reconcile().await;
        let mut tick = tokio::time::interval(STATUS_EVERY);
        let mut collect = tokio::time::interval(COLLECT_EVERY);
        collect.tick().await;
        let stop = loop {
            tokio::select! {
                _ = term.recv() => break Some("SIGTERM"),
                _ = int.recv() => break Some("SIGINT"),
                _ = tick.tick() => {
                    agent.reap();
                    agent.shared.write_status();
                }
                _ = collect.tick() => agent.collect_garbage().await,
                event = events.next() => match event {
                    Some(Ok(e)) => agent.handle_event(e),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "Docker event stream failed; reconnecting");
                        break None;
                    }
                    None => {
                        tracing::warn!("Docker event stream ended (daemon restart?); reconnecting");
                        break None;
                    }
                },
            }
        };
        if let Some(signal) = stop {
            break agent.shutdown(signal).await;
        }
        agent
            .shared
            .docker_connected
            .store(false, Ordering::Relaxed);
        // Events fired while disconnected are lost: wait, then list and reconcile.
        let reconnect = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            connect_docker(agent.docker_socket.as_deref()).await
        };
        tokio::select! {
            _ = term.recv() => break agent.shutdown("SIGTERM").await,
            _ = int.recv() => break agent.shutdown("SIGINT").await,
            docker = reconnect => match docker {
                Ok(d) => *agent.shared.docker.write() = d,
                Err(e) => tracing::warn!(error = %e, "cannot reconnect to Docker yet"),
            },
        }
    };
    if let Some(h) = health {
        h.abort();
    }
    control.abort();
    let _ = std::fs::remove_file(crate::control::socket_path(&settings.state_dir));
    result
}

async fn connect_docker(socket: Option<&str>) -> Result<Docker> {
    let docker = match socket {
        Some(path) => Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION),
        None => Docker::connect_with_unix_defaults(),
    }
    .context("cannot connect to Docker")?;
    // Older engines refuse a client that claims a newer API than theirs.
    docker
        .negotiate_version()
        .await
        .context("cannot talk to the Docker engine (is dockerd running, and is --docker right?)")
}

struct Agent {
    shared: Arc<Shared>,
    docker_socket: Option<String>,
    liveness: Liveness,
    tasks: HashMap<String, TaskHandle>,
}

struct TaskHandle {
    tx: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl Agent {
    fn events(
        &self,
    ) -> impl futures_util::Stream<Item = Result<bollard::models::EventMessage, bollard::errors::Error>>
    {
        let filters = HashMap::from([
            ("type", vec!["container"]),
            ("event", vec!["start", "die", "destroy"]),
            ("label", vec!["sidecar.enable"]),
        ]);
        self.shared
            .docker()
            .events(Some(EventsOptionsBuilder::new().filters(&filters).build()))
    }

    /// Hands `cmd` to container `id`'s task, starting one if it has none.
    fn send(&mut self, id: &str, cmd: Command) {
        if let Some(h) = self.tasks.get(id) {
            if !h.task.is_finished() {
                match h.tx.send(cmd) {
                    Ok(()) => return,
                    Err(mpsc::error::SendError(c)) => return self.spawn(id, c),
                }
            }
        }
        self.spawn(id, cmd);
    }

    fn spawn(&mut self, id: &str, cmd: Command) {
        let (tx, task) = container::spawn(self.shared.clone(), id.to_string(), self.liveness);
        let _ = tx.send(cmd);
        self.tasks.insert(id.to_string(), TaskHandle { tx, task });
    }

    /// Forgets the tasks that ended (containers removed and given back).
    fn reap(&mut self) {
        self.tasks.retain(|_, h| !h.task.is_finished());
    }

    /// Brings what we run in line with what Docker runs.
    async fn reconcile(&mut self) {
        let filters = HashMap::from([("label", vec!["sidecar.enable"])]);
        let list = match self
            .shared
            .docker()
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(false)
                    .filters(&filters)
                    .build(),
            ))
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list containers");
                return;
            }
        };
        let running: Vec<String> = list.into_iter().filter_map(|c| c.id).collect();
        let gone: Vec<String> = self
            .tasks
            .keys()
            .filter(|id| !running.contains(id))
            .cloned()
            .collect();
        for id in gone {
            self.send(&id, Command::Stop("no longer running"));
        }
        for id in running {
            self.send(&id, Command::Start);
        }
        self.collect_garbage().await;
        self.shared.reconciled.store(true, Ordering::Relaxed);
        self.shared.write_status();
    }

    /// Gives back the registrations of containers removed while we were not
    /// watching (or whose deregistration failed): their keys are still here.
    async fn collect_garbage(&mut self) {
        let existing = match self
            .shared
            .docker()
            .list_containers(Some(ListContainersOptionsBuilder::new().all(true).build()))
            .await
        {
            Ok(list) => list.into_iter().filter_map(|c| c.id).collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list containers to collect stale keys");
                return;
            }
        };
        let ids = match self.shared.state.key_ids() {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list container keys");
                return;
            }
        };
        for id in ids {
            // A task giving it back already ignores this; one that stopped serving it
            // (removed while Docker was not followed) gives it back now.
            if !existing.contains(&id) {
                self.send(&id, Command::Destroy);
            }
        }
    }

    fn handle_event(&mut self, event: bollard::models::EventMessage) {
        let Some(id) = event.actor.as_ref().and_then(|a| a.id.clone()) else {
            return;
        };
        match event.action.as_deref() {
            Some("start") => self.send(&id, Command::Start),
            Some("die") => self.send(&id, Command::Stop("container stopped")),
            Some("destroy") => self.send(&id, Command::Destroy),
            _ => {}
        }
    }

    /// Stops every tunnel; registrations stay so addresses come back on restart.
    /// Tasks in the middle of a relay call are not waited for: their work is either
    /// done on the relay already or will be redone at the next start.
    async fn shutdown(self, signal: &str) -> Result<()> {
        tracing::info!(signal, containers = self.tasks.len(), "shutting down");
        for h in self.tasks.values() {
            h.task.abort();
        }
        for (_, h) in self.tasks {
            let _ = h.task.await;
        }
        for entry in self.shared.rows.lock().values_mut() {
            entry.live = None;
            entry.row.state = "stopped".into();
            entry.row.up = None;
            entry.row.externally_reachable = None;
        }
        self.shared.write_status();
        Ok(())
    }
}

/// `sidecar-agent status`.
pub fn print_status(state_dir: &std::path::Path) -> Result<()> {
    let state = StateDir::open(state_dir)?;
    let rows = state.read_status().with_context(|| {
        format!(
            "no status in {} (is `sidecar-agent run` running with this --state-dir?)",
            state_dir.display()
        )
    })?;
    let age = std::fs::metadata(state.status_path())
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    println!(
        "{:<20} {:<10} {:<42} {:<18} {:<9} {:<16} {:>12} {:>12}",
        "NAME", "STATE", "IPV6", "IPV4", "MODE", "HANDSHAKE", "BYTES IN", "BYTES OUT"
    );
    let now = unix_now();
    for r in &rows {
        let handshake = match r.latest_handshake {
            Some(t) => format!("{}s ago", now.saturating_sub(t)),
            None => "never".into(),
        };
        println!(
            "{:<20} {:<10} {:<42} {:<18} {:<9} {:<16} {:>12} {:>12}",
            truncate(&r.name, 20),
            r.state,
            r.ipv6.as_deref().unwrap_or("-"),
            r.ipv4.as_deref().unwrap_or("-"),
            r.mode.as_deref().unwrap_or("-"),
            handshake,
            r.rx_bytes,
            r.tx_bytes
        );
        if let Some(m) = &r.mode_reason {
            println!("    mode: {m}");
        }
        if r.state == "active" {
            println!("    {}", check_line(r, now));
        }
        if let Some(e) = &r.error {
            println!("    error: {e}");
        }
    }
    if let Some(age) = age.filter(|a| *a > Duration::from_secs(10)) {
        println!(
            "(snapshot is {}s old: the agent may not be running)",
            age.as_secs()
        );
    }
    Ok(())
}

/// What the last registration check said: when, and the relay's view of the tunnel.
fn check_line(r: &StatusRow, now: u64) -> String {
    let yes_no = |v: Option<bool>| match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    let checked = match r.last_check {
        Some(t) => format!("{}s ago", now.saturating_sub(t)),
        None => "not yet".into(),
    };
    let mut line = format!(
        "checked: {checked}  up: {}  externally reachable: {}",
        yes_no(r.up),
        yes_no(r.externally_reachable)
    );
    if r.reregistrations > 0 {
        line.push_str(&format!("  registered again: {}", r.reregistrations));
    }
    line
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}
