//! End-to-end fixture for `sidecar-relay`: a small provider network in namespaces, the
//! relay binary running in it, its HTTPS API driven with curl, and wireguard-go clients
//! behind a NAT configured from nothing but the API's answers.
//!
//! ```text
//!   client (wireguard-go)            client ...
//!        | 203.0.113.128+8i /29         |
//!       nat (masquerade) ---------------+
//!        | 203.0.113.0/25
//!      router ---------------------------- remote (the internet host)
//!        | 2001:db8:1::/64, 192.0.2.0/24     2001:db8:5::/64, 198.51.100.0/24
//!      relay (sidecar-relay, uplink `uplink0`)
//! ```
//!
//! The router has the relay link's /64 (and 192.0.2.0/24, which holds the IPv4 pool)
//! on-link and no route for any peer address: it reaches a peer only because the relay
//! answers its Neighbor Solicitations and ARP requests. The NAT hides the clients, so the
//! relay only ever sees 203.0.113.2 as their endpoint.
//!
//! Every namespace, link, process and directory is owned by a guard; link names are
//! local to their namespace, and the relay's interface name (which names its `wg show`
//! socket in the machine-wide `/var/run/wireguard`) comes from [`unique_name`].

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::agent::workspace_bin;
use super::netns::{veth, Netns};
use super::process::{self, ChildGuard, TempDir};
use super::traffic::ping_with;
use super::wg::{self, KeyPair, Peer, PeerStatus, WireguardGo};
use super::{unique_name, wait_until};

/// Tools the relay tests shell out to, besides [`super::BASE_TOOLS`].
pub const RELAY_TOOLS: &[&str] = &["curl", "nft", "iperf3", "timeout", "sysctl"];

/// The peers' on-link prefix, shared by the router and the relay's uplink.
pub const PEER_PREFIX: &str = "2001:db8:1::/64";
pub const ROUTER_LINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const RELAY_UPLINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const ROUTER_LINK4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const RELAY_UPLINK4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// On-link IPv4 pool inside the relay link's 192.0.2.0/24.
pub const IPV4_POOL: &str = "192.0.2.64/27";
/// With [`Relay::start_routed`]: the prefix and pool the router routes to the relay's
/// uplink address, off every link. The pool takes the last two client-site /29s.
pub const ROUTED_PREFIX: &str = "2001:db8:7::/64";
pub const ROUTED_POOL: &str = "203.0.113.240/28";

/// The host on the internet that talks to the peers.
pub const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 2);
pub const REMOTE4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const REMOTE_NET4: &str = "198.51.100.0/24";

/// The NAT's public (upstream) address: every client's endpoint as the relay sees it.
pub const NAT_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

pub const WG_PORT: u16 = 51820;
pub const API_PORT: u16 = 8443;
/// The port wireguard-go listens on in every client namespace (the NAT remaps them).
pub const CLIENT_PORT: u16 = 51820;

/// Link names, local to their namespaces.
pub const UPLINK: &str = "uplink0";
const ROUTER_TO_RELAY: &str = "relay0";
const ROUTER_TO_REMOTE: &str = "remote0";
const ROUTER_TO_NAT: &str = "nat0";
const NAT_UP: &str = "up0";
const HOST_LINK: &str = "eth0";

/// The relay binary, built from this workspace (or `$SIDECAR_RELAY_BIN`).
pub fn relay_bin() -> PathBuf {
    workspace_bin("sidecar-relay", "sidecar-relay", "SIDECAR_RELAY_BIN")
}

fn sysctl(ns: &Netns, setting: &str) {
    ns.exec(&format!("sysctl -qw {setting}"));
}

/// The namespaces and links; the relay and the clients come on top.
pub struct Topology {
    pub router: Netns,
    /// Where `sidecar-relay run` lives; its uplink is [`UPLINK`].
    pub relay: Netns,
    pub remote: Netns,
    pub nat: Netns,
    sites: AtomicU8,
}

impl Topology {
    pub fn new() -> Self {
        let t = Topology {
            router: Netns::new(),
            relay: Netns::new(),
            remote: Netns::new(),
            nat: Netns::new(),
            sites: AtomicU8::new(0),
        };
        let (router, relay, remote, nat) = (&t.router, &t.relay, &t.remote, &t.nat);
        // Duplicate address detection would keep fresh IPv6 addresses (the link-local
        // ones the neighbor exchange needs among them) tentative for a second or two.
        for ns in [router, relay, remote, nat] {
            sysctl(ns, "net.ipv6.conf.all.accept_dad=0");
            sysctl(ns, "net.ipv6.conf.default.accept_dad=0");
        }

        veth(router, ROUTER_TO_RELAY, relay, UPLINK);
        router.add_addr(ROUTER_TO_RELAY, &format!("{ROUTER_LINK6}/64"));
        router.add_addr(ROUTER_TO_RELAY, &format!("{ROUTER_LINK4}/24"));
        relay.add_addr(UPLINK, &format!("{RELAY_UPLINK6}/64"));
        relay.add_addr(UPLINK, &format!("{RELAY_UPLINK4}/24"));
        relay.ip(&format!(
            "-6 route add default via {ROUTER_LINK6} dev {UPLINK}"
        ));
        relay.ip(&format!(
            "route add default via {ROUTER_LINK4} dev {UPLINK}"
        ));

        veth(router, ROUTER_TO_REMOTE, remote, HOST_LINK);
        router.add_addr(ROUTER_TO_REMOTE, "2001:db8:5::1/64");
        router.add_addr(ROUTER_TO_REMOTE, "198.51.100.1/24");
        remote.add_addr(HOST_LINK, &format!("{REMOTE6}/64"));
        remote.add_addr(HOST_LINK, &format!("{REMOTE4}/24"));
        remote.ip(&format!(
            "-6 route add default via 2001:db8:5::1 dev {HOST_LINK}"
        ));
        remote.ip(&format!(
            "route add default via 198.51.100.1 dev {HOST_LINK}"
        ));

        veth(router, ROUTER_TO_NAT, nat, NAT_UP);
        router.add_addr(ROUTER_TO_NAT, "203.0.113.1/25");
        nat.add_addr(NAT_UP, &format!("{NAT_PUBLIC}/25"));
        nat.ip(&format!("route add default via 203.0.113.1 dev {NAT_UP}"));

        sysctl(router, "net.ipv4.ip_forward=1");
        sysctl(router, "net.ipv6.conf.all.forwarding=1");
        sysctl(nat, "net.ipv4.ip_forward=1");
        nat.exec_with_stdin(
            "nft -f -",
            &format!(
                "table inet nat {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat;\n    oifname \"{NAT_UP}\" masquerade\n  }}\n}}\n"
            ),
        );
        t
    }

    /// A new client namespace behind the NAT, on its own /29 of 203.0.113.128/25.
    pub fn client_site(&self) -> ClientSite {
        let i = self.sites.fetch_add(1, Ordering::Relaxed);
        assert!(i < 16, "203.0.113.128/25 holds 16 client sites");
        let base = 128 + 8 * i;
        let gateway = Ipv4Addr::new(203, 0, 113, base + 1);
        let addr = Ipv4Addr::new(203, 0, 113, base + 2);
        let ns = Netns::new();
        let nat_side = format!("site{i}");
        veth(&self.nat, &nat_side, &ns, HOST_LINK);
        self.nat.add_addr(&nat_side, &format!("{gateway}/29"));
        ns.add_addr(HOST_LINK, &format!("{addr}/29"));
        ns.ip(&format!("route add default via {gateway} dev {HOST_LINK}"));
        ClientSite { ns, addr }
    }

    /// The MAC address of the relay's uplink.
    pub fn relay_uplink_mac(&self) -> String {
        let out = self.relay.ip(&format!("-br link show {UPLINK}"));
        out.split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no MAC in `ip -br link`: {out}"))
            .to_owned()
    }

    /// The link-layer address the router has resolved `addr` to on the relay link, if any.
    pub fn router_neighbor(&self, addr: IpAddr) -> Option<String> {
        let out = self
            .router
            .ip(&format!("neigh show {addr} dev {ROUTER_TO_RELAY}"));
        let words: Vec<&str> = out.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "lladdr")?;
        words.get(at + 1).map(|s| (*s).to_owned())
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// A client namespace behind the NAT.
pub struct ClientSite {
    pub ns: Netns,
    /// Its private underlay address (the NAT rewrites it to [`NAT_PUBLIC`]).
    pub addr: Ipv4Addr,
}

impl ClientSite {
    /// Registers a fresh key with `token` from this site and brings up wireguard-go
    /// configured from the answer alone.
    pub fn connect(&self, relay: &Relay, token: &str, ipv4: bool) -> Client<'_> {
        let keys = KeyPair::generate();
        let resp = relay.register(&self.ns, token, &keys.public, ipv4);
        assert_eq!(
            resp.status, 201,
            "registration of a new key must create it: {resp:?}"
        );
        let alloc = Allocation::from_json(&resp.json);
        Client::configure(self, keys, alloc)
    }
}

/// What `POST /v1/peers` answered.
#[derive(Clone, Debug)]
pub struct Allocation {
    pub pubkey: String,
    pub ipv6: Ipv6Addr,
    pub ipv4: Option<Ipv4Addr>,
    pub relay_public_key: String,
    pub relay_endpoint: String,
    pub keepalive: u16,
    pub mtu: u16,
    pub created: bool,
}

impl Allocation {
    pub fn from_json(v: &Value) -> Self {
        let text = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("allocation lacks {k}: {v}"))
                .to_owned()
        };
        let host = |cidr: String, len: &str| {
            let (addr, l) = cidr
                .split_once('/')
                .unwrap_or_else(|| panic!("{cidr} is not addr/len"));
            assert_eq!(l, len, "{cidr} must be a single address");
            addr.to_owned()
        };
        Allocation {
            pubkey: text("pubkey"),
            ipv6: host(text("ipv6"), "128").parse().expect("ipv6 address"),
            ipv4: v["ipv4"]
                .as_str()
                .map(|a| host(a.to_owned(), "32").parse().expect("ipv4 address")),
            relay_public_key: text("relay_public_key"),
            relay_endpoint: text("relay_endpoint"),
            keepalive: v["keepalive"]
                .as_u64()
                .and_then(|k| u16::try_from(k).ok())
                .expect("keepalive"),
            mtu: v["mtu"]
                .as_u64()
                .and_then(|k| u16::try_from(k).ok())
                .expect("mtu"),
            created: v["created"].as_bool().expect("created"),
        }
    }
}

/// Debian's wireguard-go in a client namespace, set up from an [`Allocation`].
pub struct Client<'s> {
    pub site: &'s ClientSite,
    pub keys: KeyPair,
    pub alloc: Allocation,
    pub wg: WireguardGo<'s>,
}

impl<'s> Client<'s> {
    /// What an agent would do with the allocation: the relay as the only peer for all
    /// traffic, the granted addresses on the interface, IPv6 default route into the
    /// tunnel; for IPv4 (whose underlay default must stay on the NAT) only the remote
    /// network goes into the tunnel.
    pub fn configure(site: &'s ClientSite, keys: KeyPair, alloc: Allocation) -> Self {
        let wg = WireguardGo::start(&site.ns, &keys, CLIENT_PORT);
        let mut peer = Peer::new(&alloc.relay_public_key)
            .allow("::/0")
            .endpoint(alloc.relay_endpoint.clone())
            .keepalive(alloc.keepalive);
        if alloc.ipv4.is_some() {
            peer = peer.allow("0.0.0.0/0");
        }
        wg.add_peer(&peer);
        wg.add_addr(&format!("{}/128", alloc.ipv6));
        if let Some(v4) = alloc.ipv4 {
            wg.add_addr(&format!("{v4}/32"));
        }
        site.ns
            .ip(&format!("link set {} mtu {} up", wg.iface, alloc.mtu));
        site.ns
            .ip(&format!("-6 route add default dev {}", wg.iface));
        if alloc.ipv4.is_some() {
            site.ns
                .ip(&format!("route add {REMOTE_NET4} dev {}", wg.iface));
        }
        Client {
            site,
            keys,
            alloc,
            wg,
        }
    }

    pub fn ns(&self) -> &'s Netns {
        &self.site.ns
    }

    pub fn ipv6(&self) -> IpAddr {
        self.alloc.ipv6.into()
    }

    pub fn ipv4(&self) -> IpAddr {
        self.alloc
            .ipv4
            .expect("this client has no IPv4 address")
            .into()
    }
}

/// An HTTP answer as curl saw it.
#[derive(Clone, Debug)]
pub struct ApiResponse {
    /// 0 when no HTTP response arrived (refused, reset, timed out).
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The body parsed as JSON, `Null` if it is not JSON.
    pub json: Value,
    /// curl's stderr, for failure messages.
    pub curl_error: String,
}

impl ApiResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `error` code of an error body.
    pub fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_default()
    }

    pub fn message(&self) -> &str {
        self.json["message"].as_str().unwrap_or_default()
    }

    /// Parses curl `-i` output: the last header block (after any 1xx) and the body.
    pub fn from_curl_output(stdout: &str, curl_error: String) -> Self {
        let mut rest = stdout;
        let mut status = 0;
        let mut headers = Vec::new();
        while rest.starts_with("HTTP/") {
            let Some((block, after)) = rest.split_once("\r\n\r\n") else {
                break;
            };
            let mut lines = block.lines();
            status = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            rest = after;
        }
        ApiResponse {
            status,
            headers,
            body: rest.to_owned(),
            json: serde_json::from_str(rest).unwrap_or(Value::Null),
            curl_error,
        }
    }
}

/// The credentials `init` printed.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub admin_token: String,
    pub default_token: String,
    pub pin: String,
    pub public_key: String,
}

/// How to set up the relay.
#[derive(Clone, Debug, Default)]
pub struct RelayOptions {
    /// Hand out /32s from [`IPV4_POOL`], on-link (the relay answers ARP for them).
    pub ipv4_pool: bool,
}

/// `sidecar-relay` in the topology's relay namespace, initialized in a scratch directory.
pub struct Relay<'t> {
    ns: &'t Netns,
    /// The TUN interface and `wg show` name, unique on the machine.
    pub iface: String,
    pub creds: Credentials,
    pub config: PathBuf,
    child: Option<ChildGuard>,
    // Dropped last: the store must outlive the process using it.
    _dir: TempDir,
}

impl<'t> Relay<'t> {
    /// `sidecar-relay init` then `run`, waiting until the API answers.
    pub fn start(topo: &'t Topology, opts: &RelayOptions) -> Self {
        let mut relay = Self::init(topo, opts);
        relay.run();
        relay
    }

    /// Like [`Relay::start`], handing out [`ROUTED_PREFIX`] (and [`ROUTED_POOL`]),
    /// which the router routes to the relay's uplink address.
    pub fn start_routed(topo: &'t Topology, opts: &RelayOptions) -> Self {
        let mut relay = Self::init_with(topo, opts, true);
        relay.run();
        relay
    }

    /// `sidecar-relay init` only.
    pub fn init(topo: &'t Topology, opts: &RelayOptions) -> Self {
        Self::init_with(topo, opts, false)
    }

    /// Like [`Relay::start`] with extra `init` arguments, replacing the defaults the
    /// fixture passes (post-quantum keys not required, default token unbound), e.g.
    /// `["--require-pq", "true", "--pq-rotate-secs", "2"]`.
    pub fn start_with_init_args(topo: &'t Topology, opts: &RelayOptions, args: &[&str]) -> Self {
        let mut relay = Self::init_full(topo, opts, false, args);
        relay.run();
        relay
    }

    fn init_with(topo: &'t Topology, opts: &RelayOptions, routed: bool) -> Self {
        // Most tests register plain wireguard-go clients with curl: neither a
        // post-quantum key nor a machine fingerprint, which new relays ask for.
        Self::init_full(
            topo,
            opts,
            routed,
            &["--require-pq", "false", "--bind-default-token", "false"],
        )
    }

    fn init_full(topo: &'t Topology, opts: &RelayOptions, routed: bool, extra: &[&str]) -> Self {
        let ns = &topo.relay;
        let dir = TempDir::new();
        let data = dir.join("relay");
        let iface = unique_name("sr");
        let mut cmd = ns.program(relay_bin());
        let (prefix, pool, mode) = if routed {
            topo.router
                .ip(&format!("-6 route add {ROUTED_PREFIX} via {RELAY_UPLINK6}"));
            topo.router
                .ip(&format!("route add {ROUTED_POOL} via {RELAY_UPLINK4}"));
            (ROUTED_PREFIX, ROUTED_POOL, "routed")
        } else {
            (PEER_PREFIX, IPV4_POOL, "on-link")
        };
        cmd.arg("init")
            .arg("--dir")
            .arg(&data)
            .args(["--ipv6-prefix", prefix, "--ipv6-mode", mode])
            .args(["--uplink", UPLINK])
            .args(["--endpoint", &format!("{RELAY_UPLINK4}:{WG_PORT}")])
            .args(["--api-listen", &format!("{RELAY_UPLINK4}:{API_PORT}")])
            .args(["--interface", &iface]);
        if opts.ipv4_pool {
            cmd.args(["--ipv4-pool", pool, "--ipv4-mode", mode]);
        }
        cmd.args(extra);
        let out = process::run_ok(cmd);
        let after = |prefix: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|| panic!("init printed no `{prefix}` line:\n{out}"))
        };
        let creds = Credentials {
            admin_token: after("admin token (shown once, stored hashed):"),
            default_token: after("agent token \"default\" (shown once):"),
            pin: after("certificate pin:"),
            public_key: after("relay public key:"),
        };
        assert!(
            creds.admin_token.starts_with("sct_live_") && creds.pin.starts_with("sha256//"),
            "unexpected credentials from init:\n{out}"
        );
        Relay {
            ns,
            iface,
            creds,
            config: data.join("relay.toml"),
            child: None,
            _dir: dir,
        }
    }

    pub fn ns(&self) -> &'t Netns {
        self.ns
    }

    /// `sidecar-relay run`; returns once `/v1/health` answers and `wg show` works.
    pub fn run(&mut self) {
        assert!(
            self.child.as_mut().is_none_or(|c| !c.is_running()),
            "relay is already running"
        );
        let mut cmd = self.ns.program(relay_bin());
        cmd.arg("run").arg("--config").arg(&self.config);
        let mut child = ChildGuard::spawn(&format!("sidecar-relay {}", self.iface), cmd);
        let ready = wait_until(Duration::from_secs(20), || {
            if !child.is_running() {
                return true;
            }
            let r = self.request(self.ns, "GET", "/v1/health", None, None);
            r.status == 200
        });
        assert!(
            ready && child.is_running(),
            "sidecar-relay {} did not become ready (exit: {:?}):\n{}",
            self.iface,
            child.try_wait(),
            child.stderr_tail(40)
        );
        let show = self.ns.try_exec(&format!("wg show {}", self.iface));
        assert!(
            show.status.success(),
            "`wg show {}` fails on a running relay: {}",
            self.iface,
            String::from_utf8_lossy(&show.stderr)
        );
        self.child = Some(child);
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// Sends `signal` to the relay process.
    pub fn signal(&self, signal: libc::c_int) {
        self.child
            .as_ref()
            .expect("relay was started")
            .signal(signal);
    }

    /// Waits up to `timeout` for the relay to exit; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("relay was started")
            .wait_timeout(timeout)
    }

    /// Sends `signal` and waits for the exit (SIGTERM drains for up to the API's
    /// 10 s shutdown grace). Panics if the relay is still running after 20 s.
    pub fn stop(&mut self, signal: libc::c_int) -> ExitStatus {
        self.signal(signal);
        let status = self.wait_exit(Duration::from_secs(20));
        status.unwrap_or_else(|| {
            panic!(
                "relay still running 20 s after signal {signal}:\n{}",
                self.log_tail(30)
            )
        })
    }

    /// What the running relay printed on stdout (credentials of a new store).
    pub fn stdout(&self) -> String {
        self.child
            .as_ref()
            .map(ChildGuard::stdout)
            .unwrap_or_default()
    }

    /// The relay's log (stderr) so far.
    pub fn log(&self) -> String {
        self.child
            .as_ref()
            .map(ChildGuard::stderr)
            .unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.child
            .as_ref()
            .map(|c| c.stderr_tail(lines))
            .unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{RELAY_UPLINK4}:{API_PORT}{path}")
    }

    /// One HTTPS request with curl from namespace `from`, pinned to the relay's key.
    /// `auth` is the whole Authorization header value, if any.
    pub fn request(
        &self,
        from: &Netns,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&Value>,
    ) -> ApiResponse {
        match body {
            Some(body) => self.request_raw(
                from,
                method,
                path,
                auth,
                Some(("application/json", &body.to_string())),
            ),
            None => self.request_raw(from, method, path, auth, None),
        }
    }

    /// Like [`Relay::request`] with any body: `(content type, text)`, where an empty
    /// content type sends none at all.
    pub fn request_raw(
        &self,
        from: &Netns,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<(&str, &str)>,
    ) -> ApiResponse {
        let mut cmd = self.curl(from, method, auth);
        if let Some((content_type, _)) = body {
            // curl would add its own form content type; an empty value removes it.
            let header = if content_type.is_empty() {
                "Content-Type:".to_owned()
            } else {
                format!("Content-Type: {content_type}")
            };
            cmd.arg("-H").arg(header).args(["--data-binary", "@-"]);
        }
        cmd.arg(self.url(path));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn curl: {e}"));
        {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            let _ = stdin.write_all(body.map_or("", |(_, text)| text).as_bytes());
        }
        let out = child.wait_with_output().expect("wait for curl");
        ApiResponse::from_curl_output(
            &String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// curl with the common options, without the URL: pinned, response headers in the
    /// output, a bounded run time.
    ///
    /// curl's defaults on purpose (it offers h2): the relay must answer errors that it
    /// sends before reading a request body (401, 403) so that curl sees them.
    pub fn curl(&self, from: &Netns, method: &str, auth: Option<&str>) -> std::process::Command {
        let mut cmd = from.program("curl");
        cmd.args(["-sS", "-i", "-k", "--max-time", "20"])
            .arg("--pinnedpubkey")
            .arg(&self.creds.pin)
            .args(["-X", method]);
        if let Some(auth) = auth {
            cmd.arg("-H").arg(format!("Authorization: {auth}"));
        }
        cmd
    }

    /// A request with `Bearer token`.
    pub fn call(
        &self,
        from: &Netns,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> ApiResponse {
        self.request(from, method, path, Some(&format!("Bearer {token}")), body)
    }

    /// `POST /v1/peers` for `pubkey`.
    pub fn register(&self, from: &Netns, token: &str, pubkey: &str, ipv4: bool) -> ApiResponse {
        self.call(
            from,
            "POST",
            "/v1/peers",
            token,
            Some(&json!({"pubkey": pubkey, "ipv4": ipv4})),
        )
    }

    /// `POST /v1/admin/tokens` with the admin token, from the relay's own namespace (an
    /// operator on the relay host); returns (id, secret).
    pub fn create_token(
        &self,
        name: &str,
        max_peers: u32,
        max_ipv4: u32,
        bandwidth_mbps: Option<u32>,
    ) -> (String, String) {
        // Unbound: curl registrations carry no machine fingerprint.
        let mut body = json!({"name": name, "max_peers": max_peers, "max_ipv4": max_ipv4, "bind_machine": false});
        if let Some(mbps) = bandwidth_mbps {
            body["bandwidth_mbps"] = json!(mbps);
        }
        let r = self.call(
            self.ns,
            "POST",
            "/v1/admin/tokens",
            &self.creds.admin_token,
            Some(&body),
        );
        assert_eq!(r.status, 201, "token creation failed: {r:?}");
        let field = |k: &str| r.json[k].as_str().expect("token field").to_owned();
        (field("id"), field("token"))
    }

    /// `POST /v1/admin/tokens` for a token bound to the machine of its first
    /// registration (the API's default); returns (id, secret).
    pub fn create_bound_token(&self, name: &str, max_peers: u32) -> (String, String) {
        let body = json!({"name": name, "max_peers": max_peers, "max_ipv4": 0});
        let r = self.call(
            self.ns,
            "POST",
            "/v1/admin/tokens",
            &self.creds.admin_token,
            Some(&body),
        );
        assert_eq!(r.status, 201, "token creation failed: {r:?}");
        let field = |k: &str| r.json[k].as_str().expect("token field").to_owned();
        (field("id"), field("token"))
    }

    /// `wg show IFACE preshared-keys` on the relay: (peer public key, preshared key
    /// or `(none)`).
    pub fn preshared_keys(&self) -> Vec<(String, String)> {
        self.ns
            .exec(&format!("wg show {} preshared-keys", self.iface))
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                Some((words.next()?.to_owned(), words.next()?.to_owned()))
            })
            .collect()
    }

    /// The preshared key `wg show` reports for `pubkey`, if the relay has the peer.
    pub fn preshared_key(&self, pubkey: &str) -> Option<String> {
        self.preshared_keys()
            .into_iter()
            .find_map(|(k, psk)| (k == pubkey).then_some(psk))
    }

    /// `GET /v1/peers` with `token`: the listed public keys and their IPv6 addresses.
    pub fn list_peers(&self, token: &str) -> Vec<(String, String)> {
        let r = self.call(self.ns, "GET", "/v1/peers", token, None);
        assert_eq!(r.status, 200, "GET /v1/peers failed: {r:?}");
        r.json["peers"]
            .as_array()
            .expect("peers array")
            .iter()
            .map(|p| {
                (
                    p["pubkey"].as_str().unwrap_or_default().to_owned(),
                    p["ipv6"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// `wg show IFACE dump` on the relay.
    pub fn dump(&self) -> Vec<PeerStatus> {
        wg::dump(self.ns, &self.iface)
    }

    pub fn peer(&self, pubkey: &str) -> Option<PeerStatus> {
        self.dump().into_iter().find(|p| p.public_key == pubkey)
    }
}

impl Drop for Relay<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.terminate(Duration::from_secs(5));
        }
        // Left behind only if the relay was killed; the name is ours alone.
        let _ = std::fs::remove_file(wg::uapi_socket(&self.iface));
    }
}

/// Pings `dst` from `ns` once a second until a reply arrives or `timeout` passes;
/// returns how long it took.
pub fn time_until_reply(ns: &Netns, dst: IpAddr, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    wait_until(timeout, || ping_with(ns, dst, "-c 1 -W 1").received == 1).then(|| start.elapsed())
}

/// An nftables counter in `ns` of packets arriving with source `saddr`, counted before
/// anything else sees them. Removed with the namespace.
pub struct SourceCounter<'n> {
    ns: &'n Netns,
    table: String,
}

impl<'n> SourceCounter<'n> {
    pub fn new(ns: &'n Netns, saddr: IpAddr) -> Self {
        let family = if saddr.is_ipv6() { "ip6" } else { "ip" };
        Self::matching(ns, &format!("{family} saddr {saddr}"))
    }

    /// Counts only packets with source `saddr` that arrive on `iface` (a TUN device:
    /// what a userspace tunnel delivered to the kernel).
    pub fn on_interface(ns: &'n Netns, iface: &str, saddr: IpAddr) -> Self {
        let family = if saddr.is_ipv6() { "ip6" } else { "ip" };
        Self::matching(ns, &format!("iifname \"{iface}\" {family} saddr {saddr}"))
    }

    fn matching(ns: &'n Netns, rule: &str) -> Self {
        let table = unique_name("cnt");
        ns.exec_with_stdin(
            "nft -f -",
            &format!(
                "table inet {table} {{\n  counter seen {{ }}\n  chain pre {{\n    type filter hook prerouting priority raw;\n    {rule} counter name seen\n  }}\n}}\n"
            ),
        );
        SourceCounter { ns, table }
    }

    pub fn packets(&self) -> u64 {
        let out = self
            .ns
            .exec(&format!("nft list counter inet {} seen", self.table));
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .iter()
            .position(|w| *w == "packets")
            .and_then(|i| words.get(i + 1)?.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in: {out}"))
    }
}
