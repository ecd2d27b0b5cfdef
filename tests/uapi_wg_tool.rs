//! Drives `UapiServer` with the real `wg(8)` binary over `/var/run/wireguard`.
//!
//! The device behind the socket is an in-memory stand-in that applies updates with
//! wireguard-go's semantics, so these tests check the wire protocol end to end
//! without a TUN device or UDP socket. They need root (for `/var/run/wireguard`) and
//! `wg` in `PATH`, and fail without either.
//!
//! They only ever name their own interfaces: `wg show all`/`interfaces` would
//! unlink every stale socket in the directory, other tests' included.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sidecar::uapi::{query, socket_path, split_reply, UapiServer};
use sidecar::wg::{DeviceControl, DeviceInfo, DeviceUpdate, PeerConfig, PeerInfo, UpdateError};
use sidecar::{IpPrefix, Key};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod support;

/// The test device refuses this port, to check how `wg` reports a device error.
const REFUSED_PORT: u16 = 1;

/// `wg` and root, or a loud failure.
fn require() {
    support::require_tools(&["wg"]);
}

/// An interface name unique to this process and test, within the 15-byte limit.
fn interface_name(test: char) -> String {
    format!("sct{}{test}", std::process::id())
}

/// An in-memory device that applies updates as wireguard-go does.
struct MemDevice {
    state: Mutex<DeviceInfo>,
}

impl MemDevice {
    fn snapshot(&self) -> DeviceInfo {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn peer(&self, key: &Key) -> Option<PeerInfo> {
        self.snapshot()
            .peers
            .into_iter()
            .find(|p| p.config.public_key == *key)
    }
}

impl DeviceControl for MemDevice {
    fn info(&self) -> DeviceInfo {
        self.snapshot()
    }

    fn update(&self, update: DeviceUpdate) -> Result<(), UpdateError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // All or nothing: work on a copy.
        let mut next = state.clone();
        apply(&mut next, update)?;
        *state = next;
        Ok(())
    }

    fn metrics(&self) -> String {
        let info = self.snapshot();
        let mut out = String::from("# TYPE sidecar_peers gauge\n");
        let _ = writeln!(out, "sidecar_peers {}\n", info.peers.len());
        out.push_str("# TYPE sidecar_rx_bytes_total counter\n");
        for peer in &info.peers {
            let _ = writeln!(
                out,
                "sidecar_rx_bytes_total{{peer=\"{}\"}} {}",
                peer.config.public_key, peer.rx_bytes
            );
        }
        out
    }
}

/// wireguard-go's `IpcSetOperation`, applied to plain data.
fn apply(info: &mut DeviceInfo, update: DeviceUpdate) -> Result<(), UpdateError> {
    if let Some(key) = update.private_key {
        info.private_key = (!key.is_zero()).then_some(key);
        // A device never has itself as a peer.
        if let Some(own) = info.private_key.map(|k| k.public_key()) {
            info.peers.retain(|p| p.config.public_key != own);
        }
    }
    if let Some(port) = update.listen_port {
        if port == REFUSED_PORT {
            return Err(UpdateError::Port {
                port,
                reason: "refused by the test device".into(),
            });
        }
        info.listen_port = port;
    }
    if let Some(mark) = update.fwmark {
        info.fwmark = mark;
    }
    if update.replace_peers {
        info.peers.clear();
    }
    let own = info.private_key.map(|k| k.public_key());
    for change in update.peers {
        if Some(change.public_key) == own {
            continue;
        }
        let existing = info
            .peers
            .iter()
            .position(|p| p.config.public_key == change.public_key);
        if change.remove {
            if let Some(i) = existing {
                info.peers.remove(i);
            }
            continue;
        }
        let i = match existing {
            Some(i) => i,
            None if change.update_only => continue,
            None => {
                info.peers.push(PeerInfo {
                    config: PeerConfig::new(change.public_key),
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    rx_dropped_source: 0,
                });
                info.peers.len() - 1
            }
        };
        let config = &mut info.peers[i].config;
        if let Some(psk) = change.preshared_key {
            config.preshared_key = (!psk.is_zero()).then_some(psk);
        }
        if let Some(endpoint) = change.endpoint {
            config.endpoint = Some(endpoint);
        }
        if let Some(interval) = change.persistent_keepalive {
            config.persistent_keepalive = (interval != 0).then_some(interval);
        }
        if change.replace_allowed_ips {
            config.allowed_ips.clear();
        }
        for ip in change.allowed_ips {
            // An allowed IP belongs to one peer: adding it moves it here.
            for peer in &mut info.peers {
                peer.config.allowed_ips.retain(|p| *p != ip);
            }
            info.peers[i].config.allowed_ips.push(ip);
        }
    }
    Ok(())
}

/// A server on `/var/run/wireguard/NAME.sock`, stopped on drop (also when a test
/// panics) so that no socket is left for `wg` to find.
struct Harness {
    name: String,
    path: PathBuf,
    device: Arc<MemDevice>,
    runtime: Option<Runtime>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Harness {
    fn start(test: char, state: DeviceInfo) -> Harness {
        let name = interface_name(test);
        let device = Arc::new(MemDevice {
            state: Mutex::new(state),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let control: Arc<dyn DeviceControl> = device.clone();
        let server = runtime
            .block_on(UapiServer::bind(&name, control))
            .expect("bind the uapi socket");
        let path = server.path().to_path_buf();
        let (stop, stopped) = oneshot::channel();
        let task = runtime.spawn(server.run(async {
            let _ = stopped.await;
        }));
        Harness {
            name,
            path,
            device,
            runtime: Some(runtime),
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.as_ref().expect("runtime").block_on(f)
    }

    fn show(&self) -> String {
        wg_ok(&["show", &self.name])
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let (Some(runtime), Some(task)) = (self.runtime.take(), self.task.take()) {
            // The timer must be created inside the runtime, hence the async block.
            let _ = runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        // The server removes it; this covers a server that could not stop.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs `wg ARGS...` and requires success.
fn wg_ok(args: &[&str]) -> String {
    let out = wg(args);
    assert!(
        out.status.success(),
        "wg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("wg prints UTF-8")
}

fn wg(args: &[&str]) -> Output {
    Command::new("wg")
        .args(args)
        .env("WG_COLOR_MODE", "never")
        .output()
        .expect("run wg")
}

fn key_file(dir: &Path, key: &Key) -> PathBuf {
    let path = dir.join("private.key");
    std::fs::write(&path, format!("{key}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("{name}.d"));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn prefix(s: &str) -> IpPrefix {
    s.parse().unwrap()
}

struct Seed {
    state: DeviceInfo,
    private: Key,
    a: Key,
    b: Key,
    handshake_secs: u64,
}

/// A device with a listen port and two peers: A with a handshake 5 s ago and
/// some traffic, B on IPv6 with a preshared key and no handshake yet.
fn seed() -> Seed {
    let private = Key::generate_private();
    let a = Key::generate_private().public_key();
    let b = Key::generate_private().public_key();
    let handshake_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 5;
    let mut peer_a = PeerConfig::new(a);
    peer_a.endpoint = Some("192.0.2.1:51820".parse().unwrap());
    peer_a.persistent_keepalive = Some(25);
    peer_a.allowed_ips = vec![prefix("10.0.0.2/32")];
    let mut peer_b = PeerConfig::new(b);
    peer_b.endpoint = Some("[2001:db8::1]:51820".parse().unwrap());
    peer_b.preshared_key = Some(Key([7; 32]));
    peer_b.allowed_ips = vec![prefix("10.0.0.3/32"), prefix("fd00::3/128")];
    let state = DeviceInfo {
        private_key: Some(private),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![
            PeerInfo {
                config: peer_a,
                last_handshake: Some(UNIX_EPOCH + Duration::new(handshake_secs, 250_000_000)),
                rx_bytes: 1234,
                tx_bytes: 5678,
                rx_dropped_source: 0,
            },
            PeerInfo {
                config: peer_b,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                rx_dropped_source: 0,
            },
        ],
    };
    Seed {
        state,
        private,
        a,
        b,
        handshake_secs,
    }
}

#[test]
fn wg_show_and_set_work_against_the_server() {
    require();
    let Seed {
        state,
        private,
        a,
        b,
        handshake_secs,
    } = seed();
    let h = Harness::start('a', state);
    let path = socket_path(&h.name);
    assert_eq!(h.path, path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let show = h.show();
    for expected in [
        format!("interface: {}", h.name),
        format!("public key: {}", private.public_key()),
        "private key: (hidden)".to_string(),
        "listening port: 51820".to_string(),
        format!("peer: {a}"),
        "endpoint: 192.0.2.1:51820".to_string(),
        "allowed ips: 10.0.0.2/32".to_string(),
        "transfer: 1.21 KiB received, 5.54 KiB sent".to_string(),
        "persistent keepalive: every 25 seconds".to_string(),
        format!("peer: {b}"),
        "preshared key: (hidden)".to_string(),
        "endpoint: [2001:db8::1]:51820".to_string(),
        "allowed ips: 10.0.0.3/32, fd00::3/128".to_string(),
    ] {
        assert!(show.contains(&expected), "missing {expected:?} in\n{show}");
    }
    let handshake_line = show
        .lines()
        .find(|l| l.contains("latest handshake:"))
        .unwrap_or_else(|| panic!("no handshake line in\n{show}"));
    assert!(handshake_line.contains("seconds ago"), "{handshake_line}");

    let dump = wg_ok(&["show", &h.name, "dump"]);
    let lines: Vec<&str> = dump.lines().collect();
    assert_eq!(
        lines[0],
        format!("{private}\t{}\t51820\toff", private.public_key())
    );
    assert!(
        lines.contains(
            &format!("{a}\t(none)\t192.0.2.1:51820\t10.0.0.2/32\t{handshake_secs}\t1234\t5678\t25")
                .as_str()
        ),
        "{dump}"
    );
    assert!(
        lines.contains(
            &format!(
                "{b}\t{}\t[2001:db8::1]:51820\t10.0.0.3/32,fd00::3/128\t0\t0\t0\toff",
                Key([7; 32])
            )
            .as_str()
        ),
        "{dump}"
    );

    // Change a peer: wg sends replace_allowed_ips with the new list.
    wg_ok(&[
        "set",
        &h.name,
        "peer",
        &b.to_string(),
        "allowed-ips",
        "10.9.0.0/16,fd00:9::/64",
        "endpoint",
        "198.51.100.7:4242",
        "persistent-keepalive",
        "15",
    ]);
    let peer = h.device.peer(&b).expect("peer b");
    assert_eq!(
        peer.config.allowed_ips,
        vec![prefix("10.9.0.0/16"), prefix("fd00:9::/64")]
    );
    assert_eq!(
        peer.config.endpoint,
        Some("198.51.100.7:4242".parse().unwrap())
    );
    assert_eq!(peer.config.persistent_keepalive, Some(15));
    assert!(h.show().contains("endpoint: 198.51.100.7:4242"));

    // Add a new peer over IPv6.
    let c = Key::generate_private().public_key();
    wg_ok(&[
        "set",
        &h.name,
        "peer",
        &c.to_string(),
        "endpoint",
        "[2001:db8::5]:1234",
        "allowed-ips",
        "10.0.0.5/32",
    ]);
    let peer = h.device.peer(&c).expect("peer c");
    assert_eq!(
        peer.config.endpoint,
        Some("[2001:db8::5]:1234".parse().unwrap())
    );
    assert!(h.show().contains(&format!("peer: {c}")));

    // Remove a peer.
    wg_ok(&["set", &h.name, "peer", &a.to_string(), "remove"]);
    assert!(h.device.peer(&a).is_none());
    assert!(!h.show().contains(&format!("peer: {a}")));

    // Device settings.
    let scratch = Scratch::new(&h.name);
    let new_private = Key::generate_private();
    let file = key_file(&scratch.0, &new_private);
    wg_ok(&[
        "set",
        &h.name,
        "private-key",
        file.to_str().unwrap(),
        "listen-port",
        "40000",
        "fwmark",
        "0x2a",
    ]);
    let info = h.device.snapshot();
    assert_eq!(info.private_key, Some(new_private));
    assert_eq!(info.listen_port, 40000);
    assert_eq!(info.fwmark, 42);
    let show = h.show();
    assert!(show.contains("listening port: 40000"), "{show}");
    assert!(show.contains("fwmark: 0x2a"), "{show}");
    assert!(show.contains(&format!("public key: {}", new_private.public_key())));

    // A device error reaches wg with the right errno (the sign matters).
    let out = wg(&["set", &h.name, "listen-port", &REFUSED_PORT.to_string()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert_eq!(h.device.snapshot().listen_port, 40000);

    // showconf | setconf round trip: replace_peers plus every field.
    let before = h.device.snapshot();
    let conf = scratch.0.join("wg.conf");
    std::fs::write(&conf, wg_ok(&["showconf", &h.name])).unwrap();
    wg_ok(&["set", &h.name, "peer", &b.to_string(), "remove"]);
    wg_ok(&["setconf", &h.name, conf.to_str().unwrap()]);
    let after = h.device.snapshot();
    assert_eq!(after.private_key, before.private_key);
    assert_eq!(after.listen_port, before.listen_port);
    let configs = |info: &DeviceInfo| {
        let mut c: Vec<PeerConfig> = info.peers.iter().map(|p| p.config.clone()).collect();
        c.sort_by_key(|p| p.public_key);
        c
    };
    assert_eq!(configs(&after), configs(&before));

    // Our metrics extension, through the client helper.
    let reply = h.block_on(query(&path, "metrics=1\n\n")).unwrap();
    let (body, errno) = split_reply(&reply).unwrap();
    assert_eq!(errno, 0);
    assert!(body.contains("sidecar_peers 2\n"), "{body}");
    assert!(!body.contains("\n\n"), "{body:?}");

    drop(h);
    assert!(!path.exists(), "socket left behind");
}

/// Sends `bytes`, half-closes, and reads whatever comes back until EOF.
fn exchange(path: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // The server may hang up before taking everything; that is its right.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    read_to_eof(&mut s)
}

fn read_to_eof(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("server neither answered nor closed")
            }
            // A reset after the reply (our bytes were left unread) ends the exchange.
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A small xorshift generator: the garbage only needs to be varied, not secure.
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

#[test]
fn garbage_on_the_socket_does_not_disturb_the_server() {
    require();
    let seeded = seed();
    let h = Harness::start('b', seeded.state.clone());
    let path = h.path.clone();
    // `dump` rather than `show`: it has absolute handshake times, so it only changes
    // when the device does.
    let dump = || wg_ok(&["show", &h.name, "dump"]);
    let baseline = dump();
    let unchanged = |when: &str| {
        assert_eq!(
            h.device.snapshot(),
            seeded.state,
            "{when}: the device changed"
        );
        assert_eq!(dump(), baseline, "{when}: wg sees a different device");
    };
    let einval = "errno=-22\n\n";
    let is_error_or_close = |reply: &str| reply.is_empty() || reply.starts_with("errno=-");

    // A client that connects and says nothing must not hold up wg.
    let silent = UnixStream::connect(&path).unwrap();

    for round in 0..8u64 {
        let mut bytes = garbage(512, 0x9e37_79b9_7f4a_7c15 ^ (round + 1));
        bytes.push(b'\n');
        let reply = exchange(&path, &bytes);
        assert!(is_error_or_close(&reply), "round {round}: {reply:?}");
        unchanged(&format!("garbage round {round}"));
    }

    // One enormous line.
    let mut long = b"set=1\nlisten_port=".to_vec();
    long.extend(std::iter::repeat_n(b'9', 100_000));
    long.extend_from_slice(b"\n\n");
    assert_eq!(exchange(&path, &long), einval);
    unchanged("a 100 kB line");

    // Invalid UTF-8 in a value.
    assert_eq!(exchange(&path, b"set=1\nlisten_port=\xff\xfe\n\n"), einval);
    unchanged("invalid UTF-8");

    // Half a request, then the client goes away: nothing is applied.
    {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"set=1\nlisten_port=7777\nfwmark=").unwrap();
    }
    // Half a request with a half-close: answered with an error.
    assert_eq!(exchange(&path, b"set=1\nlisten_port=7777\n"), einval);
    unchanged("half requests");

    // An unknown key is refused, and the connection goes on serving.
    {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(b"set=1\nlisten_port=7777\nfrobnicate=1\n\n")
            .unwrap();
        let mut reply = vec![0u8; einval.len()];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(reply, einval.as_bytes());
        s.write_all(b"get=1\n\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let get = read_to_eof(&mut s);
        assert!(get.contains("listen_port=51820\n"), "{get}");
        assert!(get.ends_with("errno=0\n\n"), "{get}");
    }

    // None of it changed the device, and wg still works.
    unchanged("an unknown key");
    let show = h.show();
    assert!(show.contains("listening port: 51820"), "{show}");
    assert!(show.contains(&format!("peer: {}", seeded.a)), "{show}");
    drop(silent);
}

#[test]
fn a_second_server_on_the_same_interface_is_refused() {
    require();
    let h = Harness::start('c', seed().state);
    let other: Arc<dyn DeviceControl> = Arc::new(MemDevice {
        state: Mutex::new(seed().state),
    });
    let err = h
        .block_on(UapiServer::bind(&h.name, other))
        .expect_err("second bind must fail");
    assert_eq!(
        err.to_string(),
        format!("interface {} is already in use", h.name)
    );
    // The first server is unaffected.
    assert!(h.show().contains("listening port: 51820"));

    // Once it is gone, its name is free again, and a stale file is no obstacle.
    let path = h.path.clone();
    drop(h);
    assert!(!path.exists());
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "stale socket file");
    let h = Harness::start('c', seed().state);
    assert!(h.show().contains("listening port: 51820"));
}
