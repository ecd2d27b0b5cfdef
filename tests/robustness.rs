//! Hostile input on both of the agent's doors, the UDP port and the API socket: afterwards
//! the agent must still be running, still serve `wg`, and still carry traffic.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use support::traffic::ping_until_reply;
use support::tunnel::{AGENT_PORT, WGGO_PORT};
use support::wg::uapi_socket;
use support::{
    endpoint, inner, ping, require_tools, underlay, wait_until, Endpoints, Family, Pair, Tunnel,
    BASE_TOOLS,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Deterministic xorshift64* so a failure reproduces with the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A WireGuard message header of type `kind` followed by random bytes, `len` in total.
    fn message(&mut self, kind: u8, len: usize) -> Vec<u8> {
        let mut m = self.bytes(len);
        m[..4].copy_from_slice(&[kind, 0, 0, 0]);
        m
    }
}

/// Datagrams that are each wrong in a way a parser has to survive.
fn malformed_datagrams(family: Family) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let max_udp_payload = match family {
        Family::V4 => 65_507,
        Family::V6 => 65_527,
    };
    let mut datagrams = vec![
        Vec::new(),
        vec![1],
        vec![4],
        vec![0, 0, 0, 0],
        vec![5, 0, 0, 0],
        vec![255; 4],
        // Handshake initiation one byte short of its fixed 148 bytes, and one over.
        rng.message(1, 147),
        rng.message(1, 149),
        // Right sizes, garbage MACs.
        rng.message(1, 148),
        rng.message(2, 92),
        rng.message(3, 64),
        rng.message(2, 91),
        rng.message(3, 63),
        // Transport data: header only, header plus a partial tag, garbage of several sizes.
        rng.message(4, 16),
        rng.message(4, 31),
        rng.message(4, 32),
        rng.message(4, 1200),
        rng.message(4, 1500),
        rng.message(4, max_udp_payload),
        rng.bytes(max_udp_payload),
    ];
    // Valid type bytes with nonzero reserved bytes must not be taken for real messages.
    let mut reserved = rng.message(1, 148);
    reserved[1] = 1;
    datagrams.push(reserved);
    for _ in 0..500 {
        let len = (rng.next() % 300) as usize;
        datagrams.push(rng.bytes(len));
    }
    for _ in 0..500 {
        let kind = 1 + (rng.next() % 4) as u8;
        let len = 4 + (rng.next() % 200) as usize;
        datagrams.push(rng.message(kind, len));
    }
    datagrams
}

fn malformed_udp(outer: Family) {
    require_tools(BASE_TOOLS);
    let pair = Pair::new();
    let mut t = Tunnel::new(&pair, outer, Endpoints::Both);
    assert!(ping_until_reply(
        &pair.b,
        inner(Family::V4, 1),
        HANDSHAKE_TIMEOUT
    ));

    let bind: SocketAddr = match outer {
        Family::V4 => "0.0.0.0:0",
        Family::V6 => "[::]:0",
    }
    .parse()
    .expect("bind address");
    let socket: UdpSocket = pair.b.udp_socket(bind);
    let target = SocketAddr::new(underlay(outer, 1), AGENT_PORT);
    let datagrams = malformed_datagrams(outer);
    for d in &datagrams {
        // ENOBUFS/ECONNREFUSED on a flood is fine: what arrives is what matters.
        let _ = socket.send_to(d, target);
    }
    // Judge the agent once it has read everything that reached its socket.
    let drained = wait_until(Duration::from_secs(10), || {
        let ss = pair.a.exec(&format!("ss -Huan sport = :{AGENT_PORT}"));
        ss.lines().all(|l| l.split_whitespace().nth(1) == Some("0"))
    });
    assert!(
        drained,
        "the agent left datagrams unread: {}",
        pair.a.exec(&format!("ss -Huan sport = :{AGENT_PORT}"))
    );

    assert!(
        t.agent.is_running(),
        "agent died after {} malformed datagrams:\n{}",
        datagrams.len(),
        t.agent.log()
    );
    for f in Family::BOTH {
        let p = ping(&pair.a, inner(f, 2));
        assert!(p.all_received(), "A -> B over inner {f:?}:\n{}", p.output);
        let p = ping(&pair.b, inner(f, 1));
        assert!(p.all_received(), "B -> A over inner {f:?}:\n{}", p.output);
    }
    // Unauthenticated packets from another port must not redirect the peer.
    assert_eq!(
        t.agent.peer(&t.wggo_keys.public).and_then(|p| p.endpoint),
        Some(endpoint(underlay(outer, 2), WGGO_PORT))
    );
}

#[test]
fn malformed_udp_outer_v4() {
    malformed_udp(Family::V4);
}

#[test]
fn malformed_udp_outer_v6() {
    malformed_udp(Family::V6);
}

/// Connects to the API socket, sends `bytes`, closes our write side and returns whatever
/// the agent answered (possibly nothing) within a short time.
fn uapi_exchange(iface: &str, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(uapi_socket(iface)).expect("connect to UAPI socket");
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    // The agent may hang up mid-way through garbage; that is a fine reaction.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn uapi_garbage_leaves_wg_working() {
    require_tools(BASE_TOOLS);
    require_tools(&["timeout"]);
    let pair = Pair::new();
    let mut t = Tunnel::new(&pair, Family::V4, Endpoints::Both);
    let iface = t.agent.iface.clone();
    let mut rng = Rng(0x0dd_ba11);

    uapi_exchange(&iface, &rng.bytes(4096));
    uapi_exchange(&iface, &[0u8; 1024]);
    uapi_exchange(&iface, b"\n\n\n");
    uapi_exchange(&iface, b"get=2\n\n");
    // One line far longer than any real key=value pair.
    let mut long = b"set=1\nprivate_key=".to_vec();
    long.resize(long.len() + (1 << 20), b'a');
    uapi_exchange(&iface, &long);
    // Requests cut off half-way, as by a client that crashed.
    uapi_exchange(&iface, b"set=1\nprivate_key=");
    uapi_exchange(&iface, b"get=1\n");
    uapi_exchange(&iface, b"set=1\npublic_key=");

    // An invalid but well-formed set is refused with an errno, and changes nothing.
    let answer = uapi_exchange(&iface, b"set=1\nlisten_port=notaport\n\n");
    let errno = answer
        .lines()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|n| n.trim().parse::<i64>().ok());
    assert!(
        errno.is_some_and(|e| e != 0),
        "invalid set answered with {answer:?}, expected a nonzero errno"
    );
    assert_eq!(
        t.agent.wg("show {} listen-port").trim(),
        AGENT_PORT.to_string()
    );

    // A client that stalls mid-request must not lock out everyone else.
    let mut stalled = UnixStream::connect(uapi_socket(&iface)).expect("connect");
    stalled.write_all(b"get=1\n").expect("write half a request");
    let show = pair.a.try_exec(&format!("timeout 5 wg show {iface} dump"));
    assert!(
        show.status.success(),
        "`wg show` while another client stalls: {}",
        String::from_utf8_lossy(&show.stderr)
    );
    drop(stalled);

    assert!(
        t.agent.is_running(),
        "agent died on API garbage:\n{}",
        t.agent.log()
    );
    let show = t.agent.wg("show {}");
    assert!(
        show.contains(&t.wggo_keys.public),
        "peer missing from `wg show` after garbage:\n{show}"
    );
    assert!(ping_until_reply(
        &pair.a,
        inner(Family::V4, 2),
        HANDSHAKE_TIMEOUT
    ));
}
