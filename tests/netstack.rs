//! Netstack mode end to end, in one process and without root: a second smoltcp
//! interface plays the tunnel client, wired to the `NetstackDevice` through
//! `deliver`/`recv` by a pump task, and the "container" is tokio servers on
//! 127.0.0.1 and ::1.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use ring::digest::{digest, SHA256};
use sidecar::netstack::{NetstackConfig, NetstackDevice, NetstackLimits, ProxyProtocol};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp, udp};
use smoltcp::wire::{
    HardwareAddress, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpCidr,
    IpEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Notify;

#[path = "support/proxy_header.rs"]
mod proxy_header;
use proxy_header::parse_proxy_header;

const PUBLIC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x10);
const PUBLIC_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 6, 0, 0, 0, 0, 2);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const MTU: u16 = 1420;
const CLIENT_BUFFER: usize = 256 * 1024;
/// Upper bound for any single step, so a bug fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

// ---------------------------------------------------------------------------
// The client: a smoltcp interface over two queues.

struct Phy {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        self.0.push_back(packet);
        r
    }
}

impl phy::Device for Phy {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxToken(p), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = usize::from(MTU);
        caps
    }
}

struct ClientStack {
    iface: Interface,
    sockets: SocketSet<'static>,
    phy: Phy,
    next_port: u16,
}

#[derive(Clone)]
struct Client {
    stack: Arc<Mutex<ClientStack>>,
    kick: Arc<Notify>,
    epoch: Instant,
}

impl Client {
    fn new() -> Client {
        let mut phy = Phy {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
        };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = 0x5eed;
        let mut iface = Interface::new(config, &mut phy, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv6(CLIENT_V6), 128))
                .unwrap();
            a.push(IpCidr::new(IpAddress::Ipv4(CLIENT_V4), 32)).unwrap();
        });
        Client {
            stack: Arc::new(Mutex::new(ClientStack {
                iface,
                sockets: SocketSet::new(Vec::new()),
                phy,
                next_port: 40000,
            })),
            kick: Arc::new(Notify::new()),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs `f` on the stack and has the pump poll it afterwards.
    fn with<R>(&self, f: impl FnOnce(&mut ClientStack) -> R) -> R {
        let r = f(&mut self.stack.lock().unwrap());
        self.kick.notify_one();
        r
    }

    /// Moves packets between the client interface and the netstack until the netstack stops.
    async fn pump(self, netstack: Arc<NetstackDevice>) {
        let mut buf = vec![0; 65536];
        loop {
            let (out, delay) = {
                let mut guard = self.stack.lock().unwrap();
                let s = &mut *guard;
                let now = self.now();
                s.iface.poll(now, &mut s.phy, &mut s.sockets);
                let out: Vec<_> = s.phy.tx.drain(..).collect();
                let delay = s
                    .iface
                    .poll_delay(now, &s.sockets)
                    .map_or(Duration::from_millis(50), Duration::from);
                (out, delay)
            };
            for p in out {
                netstack.deliver(&p);
            }
            tokio::select! {
                r = netstack.recv(&mut buf) => {
                    let Ok(n) = r else { return };
                    let mut s = self.stack.lock().unwrap();
                    s.phy.rx.push_back(buf[..n].to_vec());
                    while let Ok(n) = netstack.try_recv(&mut buf) {
                        s.phy.rx.push_back(buf[..n].to_vec());
                    }
                }
                () = self.kick.notified() => {}
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(&self, remote: SocketAddr) -> Result<Conn, tcp::State> {
        let handle = self.with(|s| {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; CLIENT_BUFFER]),
                tcp::SocketBuffer::new(vec![0; CLIENT_BUFFER]),
            );
            let local = match remote.ip() {
                IpAddr::V4(_) => IpAddress::Ipv4(CLIENT_V4),
                IpAddr::V6(_) => IpAddress::Ipv6(CLIENT_V6),
            };
            s.next_port += 1;
            socket
                .connect(s.iface.context(), remote, (local, s.next_port))
                .unwrap();
            s.sockets.add(socket)
        });
        let conn = Conn {
            client: self.clone(),
            handle,
        };
        poll_fn(|cx| {
            conn.socket(|s| match s.state() {
                // The server may have sent everything, FIN included, already.
                tcp::State::Established | tcp::State::CloseWait => Poll::Ready(Ok(())),
                tcp::State::SynSent | tcp::State::SynReceived => {
                    s.register_send_waker(cx.waker());
                    s.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                other => Poll::Ready(Err(other)),
            })
        })
        .await?;
        Ok(conn)
    }

    fn udp_socket(&self, local: IpEndpoint) -> SocketHandle {
        self.with(|s| {
            let buffer = || {
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 256 * 1024])
            };
            let mut socket = udp::Socket::new(buffer(), buffer());
            socket.bind(local).unwrap();
            s.sockets.add(socket)
        })
    }

    fn udp_send(&self, handle: SocketHandle, data: &[u8], to: SocketAddr) {
        self.with(|s| {
            s.sockets
                .get_mut::<udp::Socket>(handle)
                .send_slice(data, IpEndpoint::from(to))
                .unwrap()
        });
    }

    async fn udp_recv(&self, handle: SocketHandle) -> (Vec<u8>, IpEndpoint) {
        poll_fn(|cx| {
            self.with(|s| {
                let socket = s.sockets.get_mut::<udp::Socket>(handle);
                let mut buf = vec![0; 65536];
                match socket.recv_slice(&mut buf) {
                    Ok((n, meta)) => Poll::Ready((buf[..n].to_vec(), meta.endpoint)),
                    Err(_) => {
                        socket.register_recv_waker(cx.waker());
                        Poll::Pending
                    }
                }
            })
        })
        .await
    }

    /// Sends one echo request and waits for its reply; returns the reply's payload.
    async fn ping(&self, to: IpAddr, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
        let handle = self.with(|s| {
            let buffer =
                || icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 8192]);
            let mut socket = icmp::Socket::new(buffer(), buffer());
            socket.bind(icmp::Endpoint::Ident(ident)).unwrap();
            let caps = ChecksumCapabilities::default();
            let mut packet;
            match to {
                IpAddr::V4(_) => {
                    let repr = Icmpv4Repr::EchoRequest {
                        ident,
                        seq_no,
                        data,
                    };
                    packet = vec![0; repr.buffer_len()];
                    repr.emit(&mut Icmpv4Packet::new_unchecked(&mut packet[..]), &caps);
                }
                IpAddr::V6(dst) => {
                    let repr = Icmpv6Repr::EchoRequest {
                        ident,
                        seq_no,
                        data,
                    };
                    packet = vec![0; repr.buffer_len()];
                    repr.emit(
                        &CLIENT_V6,
                        &dst,
                        &mut Icmpv6Packet::new_unchecked(&mut packet[..]),
                        &caps,
                    );
                }
            }
            socket.send_slice(&packet, IpAddress::from(to)).unwrap();
            s.sockets.add(socket)
        });
        poll_fn(|cx| {
            self.with(|s| {
                let socket = s.sockets.get_mut::<icmp::Socket>(handle);
                let mut buf = vec![0; 8192];
                let Ok((n, from)) = socket.recv_slice(&mut buf) else {
                    socket.register_recv_waker(cx.waker());
                    return Poll::Pending;
                };
                assert_eq!(
                    from,
                    IpAddress::from(to),
                    "echo reply from the wrong address"
                );
                let caps = ChecksumCapabilities::default();
                let reply = match to {
                    IpAddr::V4(_) => {
                        let p = Icmpv4Packet::new_checked(&buf[..n]).unwrap();
                        match Icmpv4Repr::parse(&p, &caps).unwrap() {
                            Icmpv4Repr::EchoReply {
                                ident: i,
                                seq_no: q,
                                data,
                            } if i == ident && q == seq_no => data.to_vec(),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    IpAddr::V6(dst) => {
                        let p = Icmpv6Packet::new_checked(&buf[..n]).unwrap();
                        match Icmpv6Repr::parse(&dst, &CLIENT_V6, &p, &caps).unwrap() {
                            Icmpv6Repr::EchoReply {
                                ident: i,
                                seq_no: q,
                                data,
                            } if i == ident && q == seq_no => data.to_vec(),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                };
                s.sockets.remove(handle);
                Poll::Ready(reply)
            })
        })
        .await
    }
}

/// A client-side TCP connection.
struct Conn {
    client: Client,
    handle: SocketHandle,
}

impl Conn {
    fn socket<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> R {
        self.client
            .with(|s| f(s.sockets.get_mut::<tcp::Socket>(self.handle)))
    }

    /// The client's own address and port, as the netstack sees them.
    fn local(&self) -> SocketAddr {
        let e = self
            .socket(|s| s.local_endpoint())
            .expect("connected socket");
        SocketAddr::new(e.addr.into(), e.port)
    }

    async fn write_all(&self, mut data: &[u8]) -> Result<(), tcp::State> {
        while !data.is_empty() {
            let n = poll_fn(|cx| {
                self.socket(|s| {
                    if !s.may_send() {
                        return Poll::Ready(Err(s.state()));
                    }
                    match s.send_slice(data) {
                        Ok(0) => {
                            s.register_send_waker(cx.waker());
                            Poll::Pending
                        }
                        Ok(n) => Poll::Ready(Ok(n)),
                        Err(_) => Poll::Ready(Err(s.state())),
                    }
                })
            })
            .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Reads some bytes; 0 at the peer's FIN, an error on reset.
    async fn read(&self, buf: &mut [u8]) -> Result<usize, tcp::State> {
        poll_fn(|cx| {
            self.socket(|s| match s.recv_slice(buf) {
                Ok(0) => {
                    s.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                Ok(n) => Poll::Ready(Ok(n)),
                Err(tcp::RecvError::Finished) => Poll::Ready(Ok(0)),
                Err(tcp::RecvError::InvalidState) => Poll::Ready(Err(s.state())),
            })
        })
        .await
    }

    async fn read_to_end(&self) -> Result<Vec<u8>, tcp::State> {
        let mut out = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        loop {
            match self.read(&mut buf).await? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Sends our FIN.
    fn shutdown(&self) {
        self.socket(|s| s.close());
    }

    /// Waits until the connection is fully closed on our side.
    async fn closed(&self) {
        poll_fn(|cx| {
            self.socket(|s| {
                if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                    Poll::Ready(())
                } else {
                    s.register_recv_waker(cx.waker());
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
            })
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// The container side.

/// Binds the same free port on 127.0.0.1 and ::1.
async fn tcp_pair() -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await.unwrap();
        let port = v6.local_addr().unwrap().port();
        if let Ok(v4) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            return (v4, v6);
        }
    }
    panic!("no port free on both loopback addresses");
}

async fn udp_pair() -> (UdpSocket, UdpSocket) {
    for _ in 0..50 {
        let v6 = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).await.unwrap();
        let port = v6.local_addr().unwrap().port();
        if let Ok(v4) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).await {
            return (v4, v6);
        }
    }
    panic!("no port free on both loopback addresses");
}

/// Echoes every connection back, half-closing after the client's FIN. Records peers.
fn echo_server(listener: TcpListener) -> Arc<Mutex<Vec<SocketAddr>>> {
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = peers.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                return;
            };
            seen.lock().unwrap().push(peer);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    peers
}

fn udp_echo_server(socket: UdpSocket) {
    tokio::spawn(async move {
        let mut buf = vec![0; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
}

/// A netstack and a client pumped into it.
fn setup(target_v6: Option<IpAddr>, target_v4: Option<IpAddr>) -> (Client, Arc<NetstackDevice>) {
    let netstack = NetstackDevice::start(NetstackConfig {
        public: vec![PUBLIC_V6.into(), PUBLIC_V4.into()],
        target_v6,
        target_v4,
        mtu: MTU,
        proxy_protocol: None,
    })
    .unwrap();
    let client = Client::new();
    tokio::spawn(client.clone().pump(netstack.clone()));
    (client, netstack)
}

/// A netstack forwarding to loopback with other caps, and a client pumped into it.
fn setup_limited(limits: NetstackLimits) -> (Client, Arc<NetstackDevice>) {
    let netstack = NetstackDevice::start_with_limits(
        NetstackConfig {
            public: vec![PUBLIC_V6.into(), PUBLIC_V4.into()],
            target_v6: Some(Ipv6Addr::LOCALHOST.into()),
            target_v4: Some(Ipv4Addr::LOCALHOST.into()),
            mtu: MTU,
            proxy_protocol: None,
        },
        limits,
    )
    .unwrap();
    let client = Client::new();
    tokio::spawn(client.clone().pump(netstack.clone()));
    (client, netstack)
}

/// A loopback listener whose accept queue is full, so the kernel drops SYNs to it and
/// connects hang; the filler connections must live as long as the listener is needed.
async fn hanging_listener() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(e)) => panic!("filler connect failed: {e}"),
            Err(_) => break,
        }
        assert!(fillers.len() < 16, "the accept queue never filled up");
    }
    (listener, fillers, addr)
}

/// A netstack forwarding to loopback that heads each connection with `proxy_protocol`.
fn setup_proxied(proxy_protocol: ProxyProtocol) -> (Client, Arc<NetstackDevice>) {
    let netstack = NetstackDevice::start(NetstackConfig {
        public: vec![PUBLIC_V6.into(), PUBLIC_V4.into()],
        target_v6: Some(Ipv6Addr::LOCALHOST.into()),
        target_v4: Some(Ipv4Addr::LOCALHOST.into()),
        mtu: MTU,
        proxy_protocol: Some(proxy_protocol),
    })
    .unwrap();
    let client = Client::new();
    tokio::spawn(client.clone().pump(netstack.clone()));
    (client, netstack)
}

fn setup_loopback() -> (Client, Arc<NetstackDevice>) {
    setup(
        Some(Ipv6Addr::LOCALHOST.into()),
        Some(Ipv4Addr::LOCALHOST.into()),
    )
}

fn public(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        (PUBLIC_V6, port).into()
    } else {
        (PUBLIC_V4, port).into()
    }
}

/// Deterministic test data.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_on_two_ports_both_families() {
    let (client, netstack) = setup_loopback();
    let (a4, a6) = tcp_pair().await;
    let (b4, b6) = tcp_pair().await;
    let ports = [
        a4.local_addr().unwrap().port(),
        b4.local_addr().unwrap().port(),
    ];
    let peers = [
        echo_server(a4),
        echo_server(a6),
        echo_server(b4),
        echo_server(b6),
    ];

    for port in ports {
        for v6 in [true, false] {
            let conn = within("connect", client.connect(public(v6, port)))
                .await
                .expect("connect");
            let msg = format!("hello over {} to port {port}", if v6 { "v6" } else { "v4" });
            conn.write_all(msg.as_bytes()).await.unwrap();
            conn.shutdown();
            let echoed = within("echo", conn.read_to_end()).await.unwrap();
            assert_eq!(echoed, msg.as_bytes());
            within("close", conn.closed()).await;
        }
    }
    // Each family went to its own target.
    for (i, peers) in peers.iter().enumerate() {
        let peers = peers.lock().unwrap();
        assert_eq!(peers.len(), 1, "server {i}");
        assert_eq!(peers[0].is_ipv6(), i % 2 == 1, "server {i} saw {peers:?}");
    }
    let stats = netstack.stats();
    assert_eq!(stats.tcp_opened, 4);
    wait_for("connections to leave the stack", || {
        netstack.stats().tcp_active == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_target_serves_both_families() {
    let (client, _netstack) = setup(None, Some(Ipv4Addr::LOCALHOST.into()));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let peers = echo_server(listener);
    for v6 in [true, false] {
        let conn = within("connect", client.connect(public(v6, port)))
            .await
            .expect("connect");
        conn.write_all(b"ping").await.unwrap();
        conn.shutdown();
        assert_eq!(within("echo", conn.read_to_end()).await.unwrap(), b"ping");
    }
    assert_eq!(peers.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_to_closed_port_is_refused() {
    let (client, netstack) = setup_loopback();
    let (v4, v6) = tcp_pair().await;
    let port = v4.local_addr().unwrap().port();
    drop((v4, v6));

    for v6 in [true, false] {
        let started = Instant::now();
        let result = within("refusal", client.connect(public(v6, port))).await;
        // A reset closes the client's socket at once; a lost SYN-ACK would leave it
        // retransmitting in SYN-SENT until its own timeout.
        assert!(
            matches!(result, Err(tcp::State::Closed)),
            "got {:?}",
            result.err()
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "refusal was slow"
        );
    }
    let stats = netstack.stats();
    assert_eq!((stats.tcp_refused, stats.tcp_opened), (2, 0));
    wait_for("refused connections to leave the stack", || {
        netstack.stats().tcp_active == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_connections_with_checksums() {
    const CONNS: u64 = 50;
    const SIZE: usize = 100_000;
    let (client, netstack) = setup_loopback();
    let (v4, v6) = tcp_pair().await;
    let port = v4.local_addr().unwrap().port();
    echo_server(v4);
    echo_server(v6);

    let tasks: Vec<_> = (0..CONNS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let conn = client
                    .connect(public(i % 2 == 0, port))
                    .await
                    .expect("connect");
                let data = pseudo_random(i + 1, SIZE);
                let (written, echoed) = tokio::join!(
                    async {
                        conn.write_all(&data).await?;
                        conn.shutdown();
                        Ok::<_, tcp::State>(())
                    },
                    conn.read_to_end()
                );
                written.expect("write");
                let echoed = echoed.expect("read");
                assert_eq!(echoed.len(), SIZE, "connection {i}");
                assert_eq!(
                    digest(&SHA256, &echoed).as_ref(),
                    digest(&SHA256, &data).as_ref(),
                    "connection {i}"
                );
                conn.closed().await;
            })
        })
        .collect();
    within("50 transfers", async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    assert_eq!(netstack.stats().tcp_opened, CONNS);
    wait_for("all connections to leave the stack", || {
        netstack.stats().tcp_active == 0
    })
    .await;
    println!("stats after 50 connections: {:?}", netstack.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_in_both_directions() {
    let (client, _netstack) = setup_loopback();
    let (v4, v6) = tcp_pair().await;
    let port = v4.local_addr().unwrap().port();
    drop(v6);

    // The client finishes sending first; the container answers after seeing EOF.
    let server = tokio::spawn(async move {
        let (mut s, _) = v4.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        v4
    });
    let conn = within("connect", client.connect(public(false, port)))
        .await
        .unwrap();
    conn.write_all(&pseudo_random(7, 300_000)).await.unwrap();
    conn.shutdown();
    let answer = within("answer after FIN", conn.read_to_end())
        .await
        .unwrap();
    assert_eq!(answer, b"got 300000 bytes");
    within("close", conn.closed()).await;
    let v4 = server.await.unwrap();

    // The container finishes sending first; the client keeps sending afterwards.
    let server = tokio::spawn(async move {
        let (mut s, _) = v4.accept().await.unwrap();
        s.write_all(b"greeting, and that is all from me")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let conn = within("connect", client.connect(public(false, port)))
        .await
        .unwrap();
    let greeting = within("greeting", conn.read_to_end()).await.unwrap();
    assert_eq!(greeting, b"greeting, and that is all from me");
    let upload = pseudo_random(8, 200_000);
    conn.write_all(&upload).await.unwrap();
    conn.shutdown();
    let got = within("upload after the server's FIN", server)
        .await
        .unwrap();
    assert_eq!(got, upload);
    within("close", conn.closed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_propagate_both_ways() {
    let (client, netstack) = setup_loopback();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut buf = [0; 64];

    // The client aborts: the container sees a reset, not an orderly end of stream.
    let conn = within("connect", client.connect(public(false, port)))
        .await
        .unwrap();
    let (mut upstream, _) = listener.accept().await.unwrap();
    conn.write_all(b"x").await.unwrap();
    upstream.read_exact(&mut buf[..1]).await.unwrap();
    conn.socket(|s| s.abort());
    let ended = within("upstream to notice", upstream.read(&mut buf)).await;
    assert!(
        matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "got {ended:?}"
    );

    // The container aborts: the client sees a reset.
    let conn = within("connect", client.connect(public(false, port)))
        .await
        .unwrap();
    let (upstream, _) = listener.accept().await.unwrap();
    socket2::SockRef::from(&upstream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(upstream);
    let ended = within("client to notice", conn.read(&mut buf)).await;
    assert_eq!(ended, Err(tcp::State::Closed));
    wait_for("connections to leave the stack", || {
        netstack.stats().tcp_active == 0
    })
    .await;
}

#[test]
fn device_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<NetstackDevice>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_both_families() {
    let (client, netstack) = setup_loopback();
    let (v4, v6) = udp_pair().await;
    let port = v4.local_addr().unwrap().port();
    udp_echo_server(v4);
    udp_echo_server(v6);

    for (v6, local) in [
        (true, IpEndpoint::new(IpAddress::Ipv6(CLIENT_V6), 5353)),
        (false, IpEndpoint::new(IpAddress::Ipv4(CLIENT_V4), 5353)),
    ] {
        let socket = client.udp_socket(local);
        for i in 0..5u8 {
            let msg = vec![i; 100 + usize::from(i) * 200];
            client.udp_send(socket, &msg, public(v6, port));
            let r = tokio::time::timeout(Duration::from_secs(3), client.udp_recv(socket)).await;
            let Ok((reply, from)) = r else {
                panic!("no reply: {:?}", netstack.stats())
            };
            assert_eq!(reply, msg);
            assert_eq!(from, IpEndpoint::from(public(v6, port)), "reply source");
        }
    }
    let stats = netstack.stats();
    assert_eq!((stats.udp_flows_opened, stats.udp_flows_active), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_answered_for_both_families() {
    let (client, netstack) = setup_loopback();
    let data = pseudo_random(3, 56);
    for (i, to) in [IpAddr::from(PUBLIC_V4), IpAddr::from(PUBLIC_V6)]
        .into_iter()
        .enumerate()
    {
        let reply = within("echo reply", client.ping(to, 0x1234, i as u16, &data)).await;
        assert_eq!(reply, data);
    }
    assert_eq!(netstack.stats().icmp_echoes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_throughput() {
    let mib: usize = std::env::var("NETSTACK_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 32 } else { 512 });
    let size = mib << 20;
    let (client, _netstack) = setup_loopback();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Download: the container sends `size` bytes; upload: it counts what it gets.
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let chunk = vec![0x5a; 256 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        s.shutdown().await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0; 256 * 1024];
        let mut total = 0;
        loop {
            match s.read(&mut buf).await.unwrap() {
                0 => break total,
                n => total += n,
            }
        }
    });

    let conn = client.connect(public(false, port)).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0; 256 * 1024];
    let mut total = 0;
    within("download", async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&b| b == 0x5a), "corrupted download");
                    total += n;
                }
                Err(e) => panic!("download reset after {total} bytes: {e:?}"),
            }
        }
    })
    .await;
    let down = started.elapsed();
    assert_eq!(total, size);

    let conn = client.connect(public(false, port)).await.unwrap();
    let chunk = vec![0xa5; 256 * 1024];
    let started = Instant::now();
    within("upload", async {
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            conn.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        conn.shutdown();
        assert_eq!(server.await.unwrap(), size);
    })
    .await;
    let up = started.elapsed();
    let rate = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    println!(
        "netstack bulk, {mib} MiB each way ({} build): download {:.1} MB/s ({down:.2?}), upload {:.1} MB/s ({up:.2?})",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        rate(down),
        rate(up)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connect_timeout_resets_client() {
    let (_listener, _fillers, addr) = hanging_listener().await;
    let (client, netstack) = setup(None, Some(Ipv4Addr::LOCALHOST.into()));
    let started = Instant::now();
    let result = within(
        "reset after the connect timeout",
        client.connect(public(true, addr.port())),
    )
    .await;
    let waited = started.elapsed();
    assert!(
        matches!(result, Err(tcp::State::Closed)),
        "got {:?}",
        result.err()
    );
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(10)).contains(&waited),
        "reset after {waited:?}"
    );
    assert_eq!(netstack.stats().tcp_refused, 1);
}

#[tokio::test]
async fn invalid_configs_are_rejected() {
    let good = NetstackConfig {
        public: vec![PUBLIC_V6.into(), PUBLIC_V4.into()],
        target_v6: Some(Ipv6Addr::LOCALHOST.into()),
        target_v4: None,
        mtu: MTU,
        proxy_protocol: None,
    };
    assert!(NetstackDevice::start(good.clone()).is_ok());
    let bad = [
        NetstackConfig {
            public: vec![],
            ..good.clone()
        },
        NetstackConfig {
            target_v6: None,
            ..good.clone()
        },
        NetstackConfig {
            mtu: 1000,
            ..good.clone()
        },
        NetstackConfig {
            public: vec!["ff02::1".parse().unwrap()],
            ..good.clone()
        },
        NetstackConfig {
            public: vec![
                PUBLIC_V6.into(),
                PUBLIC_V4.into(),
                "2001:db8:5::11".parse().unwrap(),
            ],
            ..good.clone()
        },
    ];
    for config in bad {
        match NetstackDevice::start(config.clone()) {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{config:?}"),
            Ok(_) => panic!("accepted {config:?}"),
        }
    }
}

#[test]
fn start_needs_a_runtime() {
    let config = NetstackConfig {
        public: vec![PUBLIC_V4.into()],
        target_v6: None,
        target_v4: Some(Ipv4Addr::LOCALHOST.into()),
        mtu: MTU,
        proxy_protocol: None,
    };
    assert!(NetstackDevice::start(config).is_err());
}

/// Builds a valid TCP SYN, UDP datagram or echo request for the mutation test.
fn valid_packet(kind: u64, v6: bool) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let (src, dst) = if v6 {
        (IpAddress::Ipv6(CLIENT_V6), IpAddress::Ipv6(PUBLIC_V6))
    } else {
        (IpAddress::Ipv4(CLIENT_V4), IpAddress::Ipv4(PUBLIC_V4))
    };
    let ip = |proto, len| -> (Vec<u8>, usize) {
        let hdr = if v6 { 40 } else { 20 };
        let mut p = vec![0; hdr + len];
        match (src, dst) {
            (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len: len,
                hop_limit: 64,
            }
            .emit(&mut Ipv6Packet::new_unchecked(&mut p[..])),
            (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len: len,
                hop_limit: 64,
            }
            .emit(&mut Ipv4Packet::new_unchecked(&mut p[..]), &caps),
            _ => unreachable!(),
        }
        (p, hdr)
    };
    match kind % 3 {
        0 => {
            let repr = TcpRepr {
                src_port: 1000 + (kind % 50) as u16,
                dst_port: 1 + (kind % 7) as u16,
                control: TcpControl::Syn,
                seq_number: TcpSeqNumber(kind as i32),
                ack_number: None,
                window_len: 1000,
                window_scale: Some(3),
                max_seg_size: Some(1380),
                sack_permitted: true,
                sack_ranges: [None; 3],
                timestamp: None,
                payload: &[],
            };
            let (mut p, hdr) = ip(IpProtocol::Tcp, repr.buffer_len());
            repr.emit(
                &mut TcpPacket::new_unchecked(&mut p[hdr..]),
                &src,
                &dst,
                &caps,
            );
            p
        }
        1 => {
            let payload = [0x42; 40];
            let (mut p, hdr) = ip(IpProtocol::Udp, 8 + payload.len());
            UdpRepr {
                src_port: 2000,
                dst_port: 9,
            }
            .emit(
                &mut UdpPacket::new_unchecked(&mut p[hdr..]),
                &src,
                &dst,
                payload.len(),
                |b| b.copy_from_slice(&payload),
                &caps,
            );
            p
        }
        _ => {
            if v6 {
                let repr = Icmpv6Repr::EchoRequest {
                    ident: 1,
                    seq_no: 2,
                    data: b"abcdefgh",
                };
                let (mut p, hdr) = ip(IpProtocol::Icmpv6, repr.buffer_len());
                repr.emit(
                    &CLIENT_V6,
                    &PUBLIC_V6,
                    &mut Icmpv6Packet::new_unchecked(&mut p[hdr..]),
                    &caps,
                );
                p
            } else {
                let repr = Icmpv4Repr::EchoRequest {
                    ident: 1,
                    seq_no: 2,
                    data: b"abcdefgh",
                };
                let (mut p, hdr) = ip(IpProtocol::Icmp, repr.buffer_len());
                repr.emit(&mut Icmpv4Packet::new_unchecked(&mut p[hdr..]), &caps);
                p
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_input_does_not_panic() {
    // No client pump here: the garbage goes straight in and the output is discarded.
    let netstack = NetstackDevice::start(NetstackConfig {
        public: vec![PUBLIC_V6.into(), PUBLIC_V4.into()],
        target_v6: Some(Ipv6Addr::LOCALHOST.into()),
        target_v4: Some(Ipv4Addr::LOCALHOST.into()),
        mtu: MTU,
        proxy_protocol: None,
    })
    .unwrap();
    let drain = {
        let netstack = netstack.clone();
        tokio::spawn(async move {
            let mut buf = vec![0; 65536];
            while netstack.recv(&mut buf).await.is_ok() {}
        })
    };

    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..30_000u64 {
        let mut p = match i % 4 {
            // Pure noise, with the version nibble sometimes plausible.
            0 => {
                let len = (next() % 200) as usize;
                let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if let (Some(b), true) = (p.first_mut(), next() % 2 == 0) {
                    *b = if next() % 2 == 0 { 0x45 } else { 0x60 };
                }
                p
            }
            // Truncated valid packets.
            1 => {
                let p = valid_packet(next(), next() % 2 == 0);
                let cut = (next() as usize) % (p.len() + 1);
                p[..cut].to_vec()
            }
            // Valid packets with a few bytes flipped (headers, flags, lengths).
            2 => {
                let mut p = valid_packet(next(), next() % 2 == 0);
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % p.len();
                    p[at] ^= 1 << (next() % 8);
                }
                p
            }
            // Valid packets, so that real connections and flows come and go as well.
            _ => valid_packet(next(), next() % 2 == 0),
        };
        if p.is_empty() && i % 8 == 0 {
            p.push(0);
        }
        netstack.deliver(&p);
        // Let the stack keep up, so the garbage is parsed rather than dropped at the door.
        if i % 200 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Oversized and empty input too.
    netstack.deliver(&[]);
    netstack.deliver(&vec![0x60; 70_000]);

    let stats = netstack.stats();
    println!("stats after garbage: {stats:?}");
    assert!(stats.drops() > 0);

    // The stack must still be alive and serving.
    drain.abort();
    let _ = drain.await;
    let client = Client::new();
    tokio::spawn(client.clone().pump(netstack.clone()));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    echo_server(listener);
    let conn = within("connect after garbage", client.connect(public(false, port)))
        .await
        .expect("connect");
    conn.write_all(b"still alive").await.unwrap();
    conn.shutdown();
    assert_eq!(
        within("echo after garbage", conn.read_to_end())
            .await
            .unwrap(),
        b"still alive"
    );
    let reply = within(
        "ping after garbage",
        client.ping(PUBLIC_V6.into(), 9, 9, b"x"),
    )
    .await;
    assert_eq!(reply, b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_upstream_connections() {
    let (client, netstack) = setup_loopback();
    let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let conn = within("connect", client.connect(public(true, port)))
        .await
        .unwrap();
    let (mut upstream, _) = listener.accept().await.unwrap();
    conn.write_all(b"before stop").await.unwrap();
    let mut buf = [0; 11];
    upstream.read_exact(&mut buf).await.unwrap();

    netstack.stop();
    // The transfer was cut short, so the container sees a reset rather than a clean EOF.
    let ended = within("upstream to notice", upstream.read(&mut buf)).await;
    assert!(
        matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "got {ended:?}"
    );
    let mut out = [0; 2048];
    assert!(within("recv after stop", netstack.recv(&mut out))
        .await
        .is_err());
    wait_for("connections to be dropped", || {
        netstack.stats().tcp_active == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_refuses_the_next_until_one_closes() {
    let limits = NetstackLimits {
        tcp_connections: 3,
        ..NetstackLimits::default()
    };
    let (client, netstack) = setup_limited(limits);
    let (v4, v6) = tcp_pair().await;
    let port = v4.local_addr().unwrap().port();
    echo_server(v4);
    echo_server(v6);

    let mut conns = Vec::new();
    for i in 0..3 {
        let conn = within(
            "connect under the cap",
            client.connect(public(i % 2 == 0, port)),
        )
        .await
        .unwrap();
        conns.push(conn);
    }
    let extra = client.clone();
    let fourth = tokio::spawn(async move { extra.connect(public(false, port)).await });
    wait_for("the fourth SYN dropped at the cap", || {
        netstack.stats().dropped_limits >= 1
    })
    .await;
    // Long enough for smoltcp's first SYN retransmission (1 s) to be dropped as well.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!fourth.is_finished(), "the fourth connection got an answer");
    let stats = netstack.stats();
    assert_eq!((stats.tcp_opened, stats.tcp_active), (3, 3), "{stats:?}");
    assert!(
        stats.dropped_limits >= 2,
        "retransmitted SYN not dropped: {stats:?}"
    );

    // The connections under the cap still work; closing one makes room.
    let first = conns.remove(0);
    within("echo on a capped stack", first.write_all(b"still here"))
        .await
        .unwrap();
    first.shutdown();
    let echoed = within("echo and FIN", first.read_to_end()).await.unwrap();
    assert_eq!(echoed, b"still here");
    let fourth = within("the fourth connection admitted", fourth)
        .await
        .unwrap()
        .unwrap_or_else(|state| panic!("fourth connection ended in {state:?}"));
    within("echo on the fourth", fourth.write_all(b"4"))
        .await
        .unwrap();
    let mut buf = [0; 1];
    within("echo on the fourth", fourth.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"4");
    let stats = netstack.stats();
    assert_eq!((stats.tcp_opened, stats.tcp_active), (4, 3), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_cap_gives_the_oldest_place_to_a_new_syn() {
    let (_listener, _fillers, addr) = hanging_listener().await;
    let limits = NetstackLimits {
        tcp_half_open: 2,
        ..NetstackLimits::default()
    };
    let (client, netstack) = setup_limited(limits);
    let started = Instant::now();
    let mut pending = Vec::new();
    for _ in 0..2 {
        let c = client.clone();
        pending.push(tokio::spawn(async move {
            c.connect(public(false, addr.port())).await.map(|_| ())
        }));
        // Distinct arrival times, so "oldest" means the first.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for("two connects in progress", || {
        netstack.stats().tcp_active == 2
    })
    .await;
    let c = client.clone();
    let third =
        tokio::spawn(async move { c.connect(public(false, addr.port())).await.map(|_| ()) });
    wait_for("the third SYN takes the first one's place", || {
        netstack.stats().tcp_half_open_dropped >= 1
    })
    .await;
    let stats = netstack.stats();
    assert_eq!(
        (stats.tcp_active, stats.tcp_refused, stats.dropped_limits),
        (2, 0, 0),
        "{stats:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "too slow to tell the cap from the connect timeout"
    );
    // The first client is forgotten silently; its SYN retransmission then starts
    // over and takes the oldest place in turn, so the table never grows.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(netstack.stats().tcp_active, 2);
    for p in pending {
        p.abort();
    }
    third.abort();
}

/// A TCP segment or UDP datagram from any source, as a spoofing attacker sends it.
fn raw_packet(
    src: IpEndpoint,
    dst: IpEndpoint,
    tcp: Option<(TcpControl, u32, Option<u32>)>,
) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let v6 = matches!(dst.addr, IpAddress::Ipv6(_));
    let hdr = if v6 { 40 } else { 20 };
    let (proto, len) = match tcp {
        Some(_) => (IpProtocol::Tcp, 24),
        None => (IpProtocol::Udp, 8 + 5),
    };
    let mut p = vec![0; hdr + len];
    match (src.addr, dst.addr) {
        (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => Ipv6Repr {
            src_addr: s,
            dst_addr: d,
            next_header: proto,
            payload_len: len,
            hop_limit: 64,
        }
        .emit(&mut Ipv6Packet::new_unchecked(&mut p[..])),
        (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => Ipv4Repr {
            src_addr: s,
            dst_addr: d,
            next_header: proto,
            payload_len: len,
            hop_limit: 64,
        }
        .emit(&mut Ipv4Packet::new_unchecked(&mut p[..]), &caps),
        _ => panic!("mixed families"),
    }
    match tcp {
        Some((control, seq, ack)) => TcpRepr {
            src_port: src.port,
            dst_port: dst.port,
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: Some(1380),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        }
        .emit(
            &mut TcpPacket::new_unchecked(&mut p[hdr..]),
            &src.addr,
            &dst.addr,
            &caps,
        ),
        None => UdpRepr {
            src_port: src.port,
            dst_port: dst.port,
        }
        .emit(
            &mut UdpPacket::new_unchecked(&mut p[hdr..]),
            &src.addr,
            &dst.addr,
            5,
            |b| b.copy_from_slice(b"flood"),
            &caps,
        ),
    }
    p
}

/// The i-th of a flood's spoofed sources, in 203.0.113.0/24 and 2001:db8:7::/48.
fn spoofed(i: u32, v6: bool) -> IpEndpoint {
    let addr = if v6 {
        IpAddress::Ipv6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            7,
            0,
            0,
            0,
            (i >> 8) as u16,
            i as u16 | 1,
        ))
    } else {
        IpAddress::Ipv4(Ipv4Addr::new(203, 0, 113, 1 + (i % 250) as u8))
    };
    IpEndpoint::new(addr, 1024 + (i % 60000) as u16)
}

/// (source, destination, flags, seq) of a TCP segment the netstack sent.
fn sent_tcp(packet: &[u8]) -> Option<(IpEndpoint, IpEndpoint, bool, bool, u32)> {
    let (src, dst, payload): (IpAddress, IpAddress, &[u8]) = match packet[0] >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (ip.src_addr().into(), ip.dst_addr().into(), &packet[20..])
        }
        _ => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (ip.src_addr().into(), ip.dst_addr().into(), &packet[40..])
        }
    };
    let tcp = TcpPacket::new_checked(payload).ok()?;
    assert!(
        tcp.verify_checksum(&src, &dst),
        "the netstack sent a segment with a bad checksum"
    );
    Some((
        IpEndpoint::new(src, tcp.src_port()),
        IpEndpoint::new(dst, tcp.dst_port()),
        tcp.syn(),
        tcp.ack(),
        tcp.seq_number().0 as u32,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syn_flood_from_spoofed_sources_leaves_room_for_a_real_client() {
    let limits = NetstackLimits::default();
    let (client, netstack) = setup_loopback();
    let (v4, v6) = tcp_pair().await;
    let port = v4.local_addr().unwrap().port();
    let accepted_v4 = echo_server(v4);
    echo_server(v6);

    const FLOOD: u32 = 3000;
    for i in 0..FLOOD {
        let v6 = i % 2 == 1;
        let dst = IpEndpoint::from(public(v6, port));
        netstack.deliver(&raw_packet(
            spoofed(i, v6),
            dst,
            Some((TcpControl::Syn, i * 7919, None)),
        ));
    }
    // The flood is digested first, so the time below is the real client's alone: with
    // the half-open table full of spoofed entries, an answer within a second means its
    // first SYN got in and it never had to retransmit.
    let digested = u64::from(FLOOD) - limits.tcp_half_open as u64;
    wait_for("the flood to be digested", || {
        netstack.stats().tcp_half_open_dropped >= digested
    })
    .await;
    let started = Instant::now();
    let conn = within(
        "connect after the flood",
        client.connect(public(false, port)),
    )
    .await
    .unwrap();
    within("echo after the flood", conn.write_all(b"real client"))
        .await
        .unwrap();
    let mut buf = [0; 11];
    let mut got = 0;
    while got < buf.len() {
        got += within("echo after the flood", conn.read(&mut buf[got..]))
            .await
            .unwrap();
    }
    let answered = started.elapsed();
    eprintln!("after {FLOOD} spoofed SYNs the real client was answered in {answered:?}");
    assert_eq!(&buf, b"real client");
    assert!(
        answered < Duration::from_secs(1),
        "the real client got its answer after {answered:?}"
    );

    let stats = netstack.stats();
    assert!(
        stats.tcp_active as usize <= limits.tcp_half_open + 1,
        "half-open connections not bounded: {stats:?}"
    );

    assert!(
        accepted_v4.lock().unwrap().len() > 1,
        "the flood never reached the container"
    );
}

/// An accepting server that counts connections the netstack closed on it.
fn counting_server(listener: TcpListener) -> (Arc<Mutex<usize>>, Arc<Mutex<usize>>) {
    let accepted = Arc::new(Mutex::new(0));
    let closed = Arc::new(Mutex::new(0));
    let (a, c) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            *a.lock().unwrap() += 1;
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = [0; 64];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                *c.lock().unwrap() += 1;
            });
        }
    });
    (accepted, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_syn_acks_expire_and_close_their_upstream_connections() {
    let limits = NetstackLimits {
        tcp_handshake_timeout: Duration::from_secs(1),
        tcp_half_open_per_source: 4,
        ..NetstackLimits::default()
    };
    let (_client, netstack) = setup_limited(limits);
    let (v4, _v6) = tcp_pair().await;
    let port = v4.local_addr().unwrap().port();
    let (accepted, closed) = counting_server(v4);

    // Twenty SYNs from one source: only four places, the source's oldest go first.
    let source = spoofed(1, false);
    for i in 0..20u16 {
        let src = IpEndpoint::new(source.addr, 30000 + i);
        let dst = IpEndpoint::from(public(false, port));
        netstack.deliver(&raw_packet(src, dst, Some((TcpControl::Syn, 1, None))));
    }
    wait_for("the source held to its cap", || {
        netstack.stats().tcp_half_open_dropped >= 16
    })
    .await;
    assert!(netstack.stats().tcp_active <= 4, "{:?}", netstack.stats());
    let started = Instant::now();
    wait_for("unanswered handshakes expire", || {
        netstack.stats().tcp_active == 0
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(netstack.stats().tcp_half_open_dropped, 20);
    wait_for("every upstream connection closed", || {
        *closed.lock().unwrap() == *accepted.lock().unwrap()
    })
    .await;
    assert!(*accepted.lock().unwrap() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sequence_numbers_follow_a_keyed_hash_and_a_4_us_clock() {
    // No pump: this test reads the netstack's segments itself.
    let netstack = NetstackDevice::start(NetstackConfig {
        public: vec![PUBLIC_V6.into(), PUBLIC_V4.into()],
        target_v6: Some(Ipv6Addr::LOCALHOST.into()),
        target_v4: Some(Ipv4Addr::LOCALHOST.into()),
        mtu: MTU,
        proxy_protocol: None,
    })
    .unwrap();
    let (v4, v6) = tcp_pair().await;
    let port = v4.local_addr().unwrap().port();
    echo_server(v4);
    echo_server(v6);
    let mut buf = vec![0; 65536];
    let syn_ack = |src: IpEndpoint, dst: IpEndpoint| {
        let netstack = netstack.clone();
        netstack.deliver(&raw_packet(src, dst, Some((TcpControl::Syn, 5000, None))));
        async move {
            let mut buf = vec![0; 65536];
            loop {
                let n = netstack.recv(&mut buf).await.unwrap();
                if let Some((from, to, true, true, seq)) = sent_tcp(&buf[..n]) {
                    if from == dst && to == src {
                        return (seq, Instant::now());
                    }
                }
            }
        }
    };
    let _ = &mut buf;
    let dst = IpEndpoint::from(public(false, port));
    let a = IpEndpoint::new(IpAddress::Ipv4(CLIENT_V4), 41000);
    let (first, t1) = within("SYN-ACK", syn_ack(a, dst)).await;
    // The client gives up; the same 4-tuple comes back a while later.
    netstack.deliver(&raw_packet(a, dst, Some((TcpControl::Rst, 5001, None))));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (second, t2) = within("SYN-ACK again", syn_ack(a, dst)).await;
    let ticks = second.wrapping_sub(first);
    let expected = (t2 - t1).as_micros() as u32 / 4;
    assert!(
        ticks.abs_diff(expected) < 25_000,
        "same 4-tuple: ISN moved {ticks} ticks in {:?} (expected about {expected})",
        t2 - t1
    );

    // Neighbouring 4-tuples share nothing: no counter, no PRNG stepping by one.
    let mut isns = Vec::new();
    for p in 0..16 {
        let src = IpEndpoint::new(IpAddress::Ipv4(CLIENT_V4), 42000 + p);
        let (seq, _) = within("SYN-ACK", syn_ack(src, dst)).await;
        isns.push(seq);
    }
    let close = isns
        .windows(2)
        .filter(|w| w[1].wrapping_sub(w[0]) < 1_000_000)
        .count();
    assert!(close <= 1, "ISNs of neighbouring ports are close: {isns:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flow_cap_reuses_the_oldest_idle_flow() {
    let limits = NetstackLimits {
        udp_flows: 2,
        ..NetstackLimits::default()
    };
    let (client, netstack) = setup_limited(limits);
    let (v4, v6) = udp_pair().await;
    let port = v4.local_addr().unwrap().port();
    udp_echo_server(v4);
    udp_echo_server(v6);
    let socket = |port| client.udp_socket(IpEndpoint::new(IpAddress::Ipv4(CLIENT_V4), port));
    let (a, b, c) = (socket(6001), socket(6002), socket(6003));
    let to = public(false, port);
    let echo = |handle, msg: &'static [u8]| {
        let client = client.clone();
        async move {
            client.udp_send(handle, msg, to);
            tokio::time::timeout(Duration::from_secs(1), client.udp_recv(handle))
                .await
                .ok()
                .map(|(reply, _)| reply)
        }
    };

    assert_eq!(echo(a, b"a").await.as_deref(), Some(&b"a"[..]));
    assert_eq!(echo(b, b"b").await.as_deref(), Some(&b"b"[..]));
    // At the cap: the third flow takes the place of the one quiet longest (a).
    assert_eq!(echo(c, b"c").await.as_deref(), Some(&b"c"[..]));
    assert_eq!(echo(b, b"b").await.as_deref(), Some(&b"b"[..]));
    let stats = netstack.stats();
    assert_eq!(
        (
            stats.udp_flows_opened,
            stats.udp_flows_active,
            stats.udp_flows_reused
        ),
        (3, 2, 1),
        "{stats:?}"
    );
    // a opens again, this time pushing out c, and b kept its flow throughout.
    assert_eq!(echo(a, b"a").await.as_deref(), Some(&b"a"[..]));
    let stats = netstack.stats();
    assert_eq!(
        (stats.udp_flows_opened, stats.udp_flows_reused),
        (4, 2),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flood_of_new_flows_leaves_room_for_a_real_client() {
    let limits = NetstackLimits {
        udp_flows: 500,
        udp_flows_per_source: 100,
        ..NetstackLimits::default()
    };
    let (client, netstack) = setup_limited(limits);
    let (v4, v6) = udp_pair().await;
    let port = v4.local_addr().unwrap().port();
    udp_echo_server(v4);
    udp_echo_server(v6);
    let dst = IpEndpoint::from(public(false, port));
    // 1,000 flows from 250 spoofed sources, then 1,000 from a single one.
    for i in 0..1000 {
        netstack.deliver(&raw_packet(spoofed(i, false), dst, None));
    }
    let one = spoofed(7, false).addr;
    for i in 0..1000 {
        netstack.deliver(&raw_packet(IpEndpoint::new(one, 20000 + i), dst, None));
    }
    wait_for("the flood processed", || {
        netstack.stats().udp_flows_opened >= 2000
    })
    .await;
    let stats = netstack.stats();
    assert!(stats.udp_flows_active <= 500, "{stats:?}");
    assert!(stats.udp_flows_reused >= 1500, "{stats:?}");

    let handle = client.udp_socket(IpEndpoint::new(IpAddress::Ipv4(CLIENT_V4), 7000));
    let started = Instant::now();
    client.udp_send(handle, b"real client", public(false, port));
    let (reply, _) = within("echo after the flood", client.udp_recv(handle)).await;
    assert_eq!(reply, b"real client");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_header_names_the_real_client_before_its_data() {
    for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
        let (client, _netstack) = setup_proxied(version);
        let (v4, v6) = tcp_pair().await;
        let port = v4.local_addr().unwrap().port();
        echo_server(v4);
        echo_server(v6);
        for v6 in [true, false] {
            let conn = within("connect", client.connect(public(v6, port)))
                .await
                .expect("connect");
            let msg = b"EHLO client.example\r\n";
            conn.write_all(msg).await.unwrap();
            conn.shutdown();
            // The server echoes what it received: the header, then the client's bytes.
            let got = within("echo", conn.read_to_end()).await.unwrap();
            let ((source, destination), rest) = parse_proxy_header(version, &got);
            assert_eq!(source, conn.local(), "{version:?} source");
            assert_eq!(destination, public(v6, port), "{version:?} destination");
            assert_eq!(
                rest, msg,
                "{version:?}: the client's bytes follow the header"
            );
        }
    }
}
