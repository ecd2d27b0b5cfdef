//! The task that owns the stack.
//!
//! Each round: take every queued inbound packet (TCP through smoltcp one packet at a
//! time, UDP and pings answered directly), service the flows whose wakers fired,
//! let smoltcp transmit, and move the outbound packets to the shared queue. Between
//! rounds the task sleeps until input arrives, a flow becomes ready, the output queue
//! drains, or smoltcp's next timer (`poll_delay`) is due.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use super::device::StackDevice;
use super::half_open::HalfOpen;
use super::isn::IsnSource;
use super::packet::{self, Inbound, TcpSegment};
use super::seq_offset::Segment;
use super::tcp::{Events, TcpConn, Verdict, CONNECT_TIMEOUT};
use super::udp::UdpFlow;
use super::wake::FlowWake;
use super::{Counters, NetstackConfig, NetstackLimits, ProxyProtocol, Shared, OUTPUT_CAPACITY};

/// Per-direction socket buffer: with window scaling this is the most a client can
/// have in flight per connection, so it bounds single-connection throughput.
const TCP_BUFFER: usize = 256 * 1024;
/// Idle connections are probed this often, so that clients which vanished (the peer
/// went away without a FIN) do not hold their buffers forever...
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// ...and are reset after this long without hearing from them.
const TCP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a connection stays in TIME-WAIT. smoltcp would keep it 10 s with both
/// buffers; long enough for the delayed ACK of the client's FIN and one retransmission
/// of that FIN is all that matters here (the upstream side is closed at once).
const TIME_WAIT: Duration = Duration::from_secs(2);
/// How often idle UDP flows are looked for.
const UDP_SWEEP: Duration = Duration::from_secs(1);
/// How often unfinished handshakes are checked against their deadline.
const HALF_OPEN_SWEEP: Duration = Duration::from_millis(250);
/// While the output queue is full smoltcp always wants to transmit now; poll less
/// eagerly and let the consumer's wake-up bring us back.
const BLOCKED_POLL: Duration = Duration::from_millis(10);
/// Longest sleep when smoltcp has no timer pending.
const IDLE_POLL: Duration = Duration::from_secs(60);

type Key = (IpEndpoint, IpEndpoint);

pub(super) struct Driver {
    shared: Arc<Shared>,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: StackDevice,
    epoch: Instant,
    public: Vec<IpAddress>,
    target_for_v4: IpAddr,
    target_for_v6: IpAddr,
    proxy_protocol: Option<ProxyProtocol>,
    mtu: usize,
    limits: NetstackLimits,
    tcp: HashMap<u64, TcpConn>,
    tcp_by_key: HashMap<Key, u64>,
    half_open: HalfOpen,
    next_half_open_sweep: Instant,
    isn: IsnSource,
    /// Outbound packets at the front of `dev.tx` already moved to our sequence space.
    shifted: usize,
    udp: HashMap<u64, UdpFlow>,
    udp_by_key: HashMap<Key, u64>,
    udp_per_source: HashMap<IpAddress, usize>,
    next_id: u64,
    next_udp_sweep: Instant,
    /// Connections in TIME-WAIT, oldest first, with the time they may go.
    time_wait: VecDeque<(Instant, u64)>,
    /// The output queue was full at the end of the last round.
    blocked: bool,
    // Scratch buffers swapped with the shared queues, so a round allocates nothing.
    inbox: VecDeque<Vec<u8>>,
    ready: Vec<u64>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Driver {
    pub(super) fn new(
        config: &NetstackConfig,
        limits: NetstackLimits,
        shared: Arc<Shared>,
    ) -> io::Result<Driver> {
        let mut public: Vec<IpAddress> = Vec::new();
        for &ip in &config.public {
            let addr = IpAddress::from(ip);
            if !addr.is_unicast() {
                return Err(invalid(format!("public address {ip} is not unicast")));
            }
            if !public.contains(&addr) {
                public.push(addr);
            }
        }
        if public.is_empty() {
            return Err(invalid("netstack needs at least one public address".into()));
        }
        let target_for_v6 = config.target_v6.or(config.target_v4);
        let target_for_v4 = config.target_v4.or(config.target_v6);
        let (Some(target_for_v4), Some(target_for_v6)) = (target_for_v4, target_for_v6) else {
            return Err(invalid("netstack needs a target address".into()));
        };
        let has_v6 = public.iter().any(|a| matches!(a, IpAddress::Ipv6(_)));
        let min_mtu = if has_v6 { 1280 } else { 576 };
        if config.mtu < min_mtu {
            return Err(invalid(format!(
                "mtu {} is below the minimum of {min_mtu}",
                config.mtu
            )));
        }

        let mtu = usize::from(config.mtu);
        let mut dev = StackDevice::new(mtu);
        let mut iface_config = Config::new(HardwareAddress::Ip);
        // smoltcp's own ISNs are replaced (see `isn`), but it draws other values,
        // such as IPv4 identifications, from this.
        iface_config.random_seed = OsRng.next_u64();
        let epoch = Instant::now();
        let mut iface = Interface::new(iface_config, &mut dev, smoltcp::time::Instant::ZERO);
        let mut full = false;
        iface.update_ip_addrs(|addrs| {
            for addr in &public {
                let prefix = match addr {
                    IpAddress::Ipv4(_) => 32,
                    IpAddress::Ipv6(_) => 128,
                };
                full |= addrs.push(IpCidr::new(*addr, prefix)).is_err();
            }
        });
        if full {
            return Err(invalid(format!(
                "netstack takes at most {} public addresses",
                iface.ip_addrs().len()
            )));
        }

        Ok(Driver {
            shared,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            epoch,
            public,
            target_for_v4,
            target_for_v6,
            proxy_protocol: config.proxy_protocol,
            mtu,
            limits,
            tcp: HashMap::new(),
            tcp_by_key: HashMap::new(),
            half_open: HalfOpen::default(),
            next_half_open_sweep: epoch,
            isn: IsnSource::random(epoch),
            shifted: 0,
            udp: HashMap::new(),
            udp_by_key: HashMap::new(),
            udp_per_source: HashMap::new(),
            next_id: 0,
            next_udp_sweep: epoch,
            time_wait: VecDeque::new(),
            blocked: false,
            inbox: VecDeque::new(),
            ready: Vec::new(),
        })
    }

    pub(super) async fn run(mut self) {
        // Even if a bug makes this task panic, `recv` callers must learn that the
        // stack is gone instead of waiting forever.
        let _stop_on_exit = StopOnExit(self.shared.clone());
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        while !self.shared.stopped() {
            if self.round() {
                // More work is already waiting. Yield anyway so the round does not
                // monopolise a worker thread (tokio's budget does not apply: the task
                // runs unconstrained so I/O is never refused in the middle of a round).
                tokio::task::yield_now().await;
                continue;
            }
            sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + self.next_delay());
            tokio::select! {
                biased;
                () = self.shared.wake.notified() => {}
                () = &mut sleep => {}
            }
        }
        self.shutdown();
    }

    /// One pass over everything that is ready; true when more work is waiting.
    fn round(&mut self) -> bool {
        let now = self.smol_now();
        let clock = Instant::now();
        self.dev.tx.budget =
            OUTPUT_CAPACITY.saturating_sub(self.shared.output.lock().packets.len());

        std::mem::swap(&mut *self.shared.input.lock(), &mut self.inbox);
        while let Some(packet) = self.inbox.pop_front() {
            self.handle_packet(now, clock, packet);
        }
        self.service_ready(clock);
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.shift_outbound(clock);
        self.expire_half_open(clock);
        self.expire_time_wait(clock);
        self.expire_udp(clock);
        let more_output = self.flush();

        more_output || !self.shared.ready.lock().is_empty() || !self.shared.input.lock().is_empty()
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        let micros = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        smoltcp::time::Instant::from_micros(micros)
    }

    fn next_delay(&mut self) -> Duration {
        let now = self.smol_now();
        let mut delay = self
            .iface
            .poll_delay(now, &self.sockets)
            .map_or(IDLE_POLL, |d| Duration::from_micros(d.total_micros()));
        if self.blocked {
            delay = delay.max(BLOCKED_POLL);
        }
        if let Some(&(until, _)) = self.time_wait.front() {
            delay = delay.min(until.saturating_duration_since(Instant::now()));
        }
        if !self.udp.is_empty() {
            delay = delay.min(
                self.next_udp_sweep
                    .saturating_duration_since(Instant::now()),
            );
        }
        if self.half_open.len() > 0 {
            delay = delay.min(
                self.next_half_open_sweep
                    .saturating_duration_since(Instant::now()),
            );
        }
        delay
    }

    fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn handle_packet(&mut self, now: smoltcp::time::Instant, clock: Instant, packet: Vec<u8>) {
        let public = &self.public;
        match packet::classify(&packet, |addr| public.contains(addr)) {
            Err(packet::Malformed) => Counters::bump(&self.counters().dropped_malformed),
            Ok(Inbound::Unsupported) => Counters::bump(&self.counters().dropped_unsupported),
            Ok(Inbound::Echo(reply)) => {
                if reply.len() <= self.mtu && self.dev.tx.push(reply) {
                    Counters::bump(&self.counters().icmp_echoes);
                } else {
                    Counters::bump(&self.counters().dropped_limits);
                }
            }
            Ok(Inbound::Udp {
                local,
                remote,
                payload,
            }) => self.udp_input(clock, (local, remote), &packet[payload]),
            Ok(Inbound::Tcp(segment)) => self.tcp_input(now, clock, segment, packet),
        }
    }

    fn tcp_input(
        &mut self,
        now: smoltcp::time::Instant,
        clock: Instant,
        segment: TcpSegment,
        mut packet: Vec<u8>,
    ) {
        let key = (segment.local, segment.remote);
        let known = self.tcp_by_key.get(&key).copied();
        if segment.opens && known.is_none() {
            self.accept(now, clock, key, packet);
            return;
        }
        let offset = known.and_then(|id| self.tcp.get(&id)?.seq_offset);
        if let (Some(offset), Some(seg)) = (offset, Segment::find(&packet)) {
            seg.unshift_acks(&mut packet, offset);
        }
        // Anything else, including segments for no connection (smoltcp answers those
        // with RST), is smoltcp's business.
        self.dev.rx = Some(packet);
        self.iface
            .poll_ingress_single(now, &mut self.dev, &mut self.sockets);
        self.shift_outbound(clock);
        if let Some(id) = known {
            // Settled here rather than when the flow is serviced later in the round:
            // a SYN right behind this ACK in the same batch must not take its place.
            if self.half_open.contains(id) && self.established(id) {
                self.half_open.remove(id);
            }
        }
        if let (true, Some(id)) = (segment.rst, known) {
            // A RST in SYN-RECEIVED sends the socket back to LISTEN, where it would
            // take the next SYN for its port as if it were a fresh listener. Drop it
            // before any other packet comes in.
            let listening = self.tcp.get(&id).is_some_and(|conn| {
                self.sockets.get::<tcp::Socket>(conn.handle).state() == State::Listen
            });
            if listening {
                self.remove_tcp(id);
            }
        }
    }

    /// A SYN for a connection we do not have: there is no listen-on-every-port socket
    /// in smoltcp, so create a listener for exactly this SYN and hold its SYN-ACK until
    /// the container accepted the upstream connection.
    fn accept(&mut self, now: smoltcp::time::Instant, clock: Instant, key: Key, packet: Vec<u8>) {
        if !self.make_room_for_handshake(&key.1.addr) {
            Counters::bump(&self.counters().dropped_limits);
            return;
        }
        let (local, remote) = key;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        let listen = IpListenEndpoint {
            addr: Some(local.addr),
            port: local.port,
        };
        if socket.listen(listen).is_err() {
            Counters::bump(&self.counters().dropped_malformed);
            return;
        }
        socket.pause_synack(true);
        // Data from upstream arrives in the chunks the container wrote; holding small
        // ones back for Nagle would only add latency.
        socket.set_nagle_enabled(false);
        socket.set_keep_alive(Some(TCP_KEEPALIVE.into()));
        socket.set_timeout(Some(TCP_TIMEOUT.into()));
        let handle = self.sockets.add(socket);

        self.dev.rx = Some(packet);
        self.iface
            .poll_ingress_single(now, &mut self.dev, &mut self.sockets);
        self.shift_outbound(clock);
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        if socket.state() != State::SynReceived || socket.remote_endpoint() != Some(remote) {
            // smoltcp rejected the SYN (bad options, say); classify() let it through.
            self.sockets.remove(handle);
            Counters::bump(&self.counters().dropped_malformed);
            return;
        }

        let id = self.next_flow_id();
        let target = SocketAddr::new(self.target_for(&local.addr), local.port);
        let header = self.proxy_protocol.map(|version| {
            let endpoint = |e: IpEndpoint| SocketAddr::new(e.addr.into(), e.port);
            version.header(endpoint(remote), endpoint(local))
        });
        let wake = FlowWake::new(id, self.shared.clone());
        let conn = TcpConn::new(handle, key, wake, target, header);
        // The first poll of the connect future registers its waker.
        conn.wake.wake();
        tracing::trace!(client = %remote, port = local.port, %target, "new TCP connection");
        self.tcp.insert(id, conn);
        self.tcp_by_key.insert(key, id);
        // The connect times out (and resets the client) first; the rest is for the
        // client's ACK should the connect finish at the last moment.
        let deadline = clock + CONNECT_TIMEOUT + self.limits.tcp_handshake_timeout;
        self.half_open.insert(id, remote.addr, clock, deadline);
        self.update_gauges();
    }

    /// Frees a place for a new handshake from `source` if the caps call for it, by
    /// dropping the oldest unfinished one (the source's own when it is at its cap).
    /// False when the place cannot be had: every connection is established.
    fn make_room_for_handshake(&mut self, source: &IpAddress) -> bool {
        let limits = self.limits;
        let victim = if self.half_open.count_from(source) >= limits.tcp_half_open_per_source {
            self.half_open.oldest(Some(source))
        } else if self.half_open.len() >= limits.tcp_half_open
            || self.tcp.len() >= limits.tcp_connections
        {
            self.half_open.oldest(None)
        } else {
            return true;
        };
        let Some(victim) = victim else {
            return false;
        };
        tracing::trace!(
            id = victim,
            "dropping the oldest unfinished handshake for a new SYN"
        );
        Counters::bump(&self.counters().tcp_half_open_dropped);
        self.remove_tcp(victim);
        true
    }

    /// Drops handshakes past their deadline; the client never answered our SYN-ACK
    /// (a spoofed SYN, most likely), so it gets nothing more from us.
    fn expire_half_open(&mut self, clock: Instant) {
        if clock < self.next_half_open_sweep {
            return;
        }
        self.next_half_open_sweep = clock + HALF_OPEN_SWEEP;
        for id in self.half_open.expired(clock) {
            if self.established(id) {
                self.half_open.remove(id);
            } else {
                Counters::bump(&self.counters().tcp_half_open_dropped);
                self.remove_tcp(id);
            }
        }
    }

    fn established(&self, id: u64) -> bool {
        self.tcp.get(&id).is_some_and(|conn| {
            let state = self.sockets.get::<tcp::Socket>(conn.handle).state();
            !matches!(
                state,
                State::Listen | State::SynReceived | State::SynSent | State::Closed
            )
        })
    }

    /// Moves the TCP segments smoltcp emitted since the last call into our sequence
    /// space, learning each connection's offset from its SYN-ACK.
    fn shift_outbound(&mut self, clock: Instant) {
        let packets = &mut self.dev.tx.packets;
        for packet in packets.iter_mut().skip(self.shifted) {
            let Some(seg) = Segment::find(packet) else {
                continue;
            };
            let Some(conn) = self
                .tcp_by_key
                .get(&(seg.src, seg.dst))
                .and_then(|id| self.tcp.get_mut(id))
            else {
                // RSTs for segments of no connection echo the client's own numbers.
                continue;
            };
            let offset = match conn.seq_offset {
                Some(offset) => offset,
                None if seg.is_syn_ack(packet) => {
                    let offset = self
                        .isn
                        .isn(seg.src, seg.dst, clock)
                        .wrapping_sub(seg.seq(packet));
                    conn.seq_offset = Some(offset);
                    offset
                }
                // Before the SYN-ACK only a RST answering the SYN can go out, and
                // the client checks its ACK, not its sequence number.
                None => continue,
            };
            seg.shift_seq(packet, offset);
        }
        self.shifted = packets.len();
    }

    fn udp_input(&mut self, clock: Instant, key: Key, payload: &[u8]) {
        // (A flow's first datagram opens it; see `open_udp` for what happens at a cap.)
        let id = match self.udp_by_key.get(&key) {
            Some(&id) => id,
            None => match self.open_udp(clock, key) {
                Some(id) => id,
                None => {
                    Counters::bump(&self.counters().dropped_limits);
                    return;
                }
            },
        };
        if let Some(flow) = self.udp.get_mut(&id) {
            if !flow.send(payload, clock) {
                Counters::bump(&self.shared.counters.dropped_limits);
            }
        }
    }

    fn open_udp(&mut self, clock: Instant, key: Key) -> Option<u64> {
        let (local, remote) = key;
        let from_source = self.udp_per_source.get(&remote.addr).copied().unwrap_or(0);
        let victim = if from_source >= self.limits.udp_flows_per_source {
            Some(self.least_recent_udp(Some(&remote.addr))?)
        } else if self.udp.len() >= self.limits.udp_flows {
            Some(self.least_recent_udp(None)?)
        } else {
            None
        };
        if let Some(victim) = victim {
            // Like a NAT table under pressure: the flow that has been quiet longest
            // goes before its idle time, so a flood of new flows cannot keep a new
            // client out. A flow still in use just opens again on its next datagram.
            Counters::bump(&self.counters().udp_flows_reused);
            self.remove_udp(victim);
        }
        let target = SocketAddr::new(self.target_for(&local.addr), local.port);
        let id = self.next_flow_id();
        let wake = FlowWake::new(id, self.shared.clone());
        let flow = match UdpFlow::open(key, target, wake, clock) {
            Ok(flow) => flow,
            Err(e) => {
                tracing::debug!(%target, error = %e, "cannot open upstream UDP socket");
                return None;
            }
        };
        // The first poll of the socket registers interest in replies.
        flow.wake.wake();
        tracing::trace!(client = %remote, port = local.port, %target, "new UDP flow");
        self.udp.insert(id, flow);
        self.udp_by_key.insert(key, id);
        *self.udp_per_source.entry(remote.addr).or_default() += 1;
        Counters::bump(&self.counters().udp_flows_opened);
        self.update_gauges();
        Some(id)
    }

    fn service_ready(&mut self, clock: Instant) {
        let mut ready = std::mem::take(&mut self.ready);
        std::mem::swap(&mut *self.shared.ready.lock(), &mut ready);
        for &id in &ready {
            if self.tcp.contains_key(&id) {
                self.service_tcp(clock, id);
            } else if let Some(flow) = self.udp.get_mut(&id) {
                flow.wake.rearm();
                let delivery = flow.service(&mut self.dev.tx, self.mtu, clock);
                self.shared
                    .counters
                    .dropped_limits
                    .fetch_add(delivery.dropped, std::sync::atomic::Ordering::Relaxed);
            }
        }
        ready.clear();
        self.ready = ready;
    }

    /// The flow (from `source` only, when given) with the oldest activity. A linear
    /// scan: it runs only when a cap is reached, and the table is bounded.
    fn least_recent_udp(&self, source: Option<&IpAddress>) -> Option<u64> {
        self.udp
            .iter()
            .filter(|(_, f)| source.is_none_or(|s| *s == f.key.1.addr))
            .min_by_key(|(id, f)| (f.last_active, **id))
            .map(|(id, _)| *id)
    }

    fn remove_udp(&mut self, id: u64) {
        if let Some(flow) = self.udp.remove(&id) {
            self.udp_by_key.remove(&flow.key);
            forget_source(&mut self.udp_per_source, &flow.key.1.addr);
            self.update_gauges();
        }
    }

    fn service_tcp(&mut self, clock: Instant, id: u64) {
        let Some(conn) = self.tcp.get_mut(&id) else {
            return;
        };
        conn.wake.rearm();
        let mut events = Events::default();
        let verdict = conn.service(
            self.sockets.get_mut::<tcp::Socket>(conn.handle),
            &mut events,
        );
        let counters = &self.shared.counters;
        if events.opened {
            Counters::bump(&counters.tcp_opened);
            self.half_open
                .extend(id, clock + self.limits.tcp_handshake_timeout);
        }
        if events.refused {
            Counters::bump(&counters.tcp_refused);
        }
        if self.half_open.contains(id) && self.established(id) {
            self.half_open.remove(id);
        }
        let Some(conn) = self.tcp.get_mut(&id) else {
            return;
        };
        match verdict {
            Verdict::Keep => {}
            Verdict::Linger => {
                if !conn.lingering {
                    conn.lingering = true;
                    conn.close_upstream();
                    self.time_wait.push_back((clock + TIME_WAIT, id));
                }
            }
            Verdict::Remove => self.remove_tcp(id),
        }
    }

    fn expire_time_wait(&mut self, clock: Instant) {
        while let Some(&(until, id)) = self.time_wait.front() {
            if until > clock {
                break;
            }
            self.time_wait.pop_front();
            self.remove_tcp(id);
        }
    }

    fn remove_tcp(&mut self, id: u64) {
        let Some(mut conn) = self.tcp.remove(&id) else {
            return;
        };
        self.half_open.remove(id);
        conn.close_upstream();
        self.sockets.remove(conn.handle);
        self.tcp_by_key.remove(&conn.key);
        self.update_gauges();
    }

    fn expire_udp(&mut self, clock: Instant) {
        if clock < self.next_udp_sweep {
            return;
        }
        self.next_udp_sweep = clock + UDP_SWEEP;
        let before = self.udp.len();
        let by_key = &mut self.udp_by_key;
        let per_source = &mut self.udp_per_source;
        let idle = self.limits.udp_idle;
        self.udp.retain(|_, flow| {
            let live = clock.duration_since(flow.last_active) < idle;
            if !live {
                by_key.remove(&flow.key);
                forget_source(per_source, &flow.key.1.addr);
            }
            live
        });
        if self.udp.len() != before {
            self.update_gauges();
        }
    }

    /// Moves this round's packets to the output queue; true when smoltcp was held
    /// back although the consumer has already made room.
    fn flush(&mut self) -> bool {
        let tx = &mut self.dev.tx;
        let mut output = self.shared.output.lock();
        let was_empty = output.packets.is_empty();
        output.packets.extend(tx.packets.drain(..));
        self.shifted = 0;
        let mut retry = false;
        self.blocked = false;
        if std::mem::take(&mut tx.exhausted) {
            // `recv` wakes us once the queue is half empty; if it already is, the
            // consumer has no reason to, so go again ourselves.
            if output.packets.len() > OUTPUT_CAPACITY / 2 {
                output.blocked = true;
                self.blocked = true;
            } else {
                retry = true;
            }
        }
        let has_packets = !output.packets.is_empty();
        drop(output);
        if was_empty && has_packets {
            self.shared.output_ready.notify_one();
        }
        let dropped = std::mem::take(&mut self.dev.tx_dropped);
        if dropped > 0 {
            self.shared
                .counters
                .dropped_limits
                .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
        }
        retry
    }

    fn shutdown(&mut self) {
        for (_, mut conn) in self.tcp.drain() {
            conn.close_upstream();
        }
        self.tcp_by_key.clear();
        self.time_wait.clear();
        self.half_open = HalfOpen::default();
        self.udp.clear();
        self.udp_by_key.clear();
        self.udp_per_source.clear();
        self.update_gauges();
    }

    fn update_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let counters = self.counters();
        counters.tcp_active.store(self.tcp.len() as u64, Relaxed);
        counters
            .udp_flows_active
            .store(self.udp.len() as u64, Relaxed);
    }

    fn next_flow_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn target_for(&self, public: &IpAddress) -> IpAddr {
        match public {
            IpAddress::Ipv4(_) => self.target_for_v4,
            IpAddress::Ipv6(_) => self.target_for_v6,
        }
    }
}

fn forget_source(counts: &mut HashMap<IpAddress, usize>, source: &IpAddress) {
    if let Some(n) = counts.get_mut(source) {
        *n -= 1;
        if *n == 0 {
            counts.remove(source);
        }
    }
}

struct StopOnExit(Arc<Shared>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        self.0.stop();
    }
}
