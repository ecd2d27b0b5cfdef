//! Ours against ours with time fed explicitly: every timer of section 6 is checked at the
//! instant it should fire, with no sleeping. Datagrams cross a simulated wire that can
//! drop them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand_core::{OsRng, RngCore};

use super::session::Keypair;
use super::*;

fn key() -> [u8; 32] {
    let mut k = [0u8; 32];
    OsRng.fill_bytes(&mut k);
    k
}

fn packet(src: [u8; 4], dst: [u8; 4], len: usize, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; len];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

const A_IP: [u8; 4] = [198, 51, 100, 1];
const B_IP: [u8; 4] = [198, 51, 100, 2];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Initiation,
    Response,
    CookieReply,
    Keepalive,
    Data,
}

fn kind(d: &[u8]) -> Kind {
    match (d[0], d.len()) {
        (1, _) => Kind::Initiation,
        (2, _) => Kind::Response,
        (3, _) => Kind::CookieReply,
        (4, 32) => Kind::Keepalive,
        _ => Kind::Data,
    }
}

/// A datagram that went on the wire: when, from which side, what.
#[derive(Clone, Copy, Debug)]
struct Sent {
    at: Duration,
    from_a: bool,
    kind: Kind,
}

struct Sim {
    t0: Instant,
    a: NoisePeer,
    b: NoisePeer,
    a_id: Arc<Identity>,
    b_id: Arc<Identity>,
    log: Vec<Sent>,
    delivered_to_a: Vec<Vec<u8>>,
    delivered_to_b: Vec<Vec<u8>>,
    /// Datagrams of these kinds are lost on the wire.
    lose: Vec<Kind>,
}

impl Sim {
    fn new(psk: Option<[u8; 32]>) -> Sim {
        let t0 = Instant::now();
        let (ka, kb) = (key(), key());
        let a_id = Arc::new(Identity::new(ka, SystemTime::now(), t0));
        let b_id = Arc::new(Identity::new(kb, SystemTime::now(), t0));
        let a = NoisePeer::new(a_id.clone(), b_id.public_key(), psk, 1, t0).with_jitter_seed(1);
        let b = NoisePeer::new(b_id.clone(), a_id.public_key(), psk, 2, t0).with_jitter_seed(2);
        Sim {
            t0,
            a,
            b,
            a_id,
            b_id,
            log: Vec::new(),
            delivered_to_a: Vec::new(),
            delivered_to_b: Vec::new(),
            lose: Vec::new(),
        }
    }

    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    fn peer(&mut self, a: bool) -> &mut NoisePeer {
        if a {
            &mut self.a
        } else {
            &mut self.b
        }
    }

    /// Puts a datagram from one side on the wire and carries every consequence.
    fn wire(&mut self, now: Instant, from_a: bool, datagram: Vec<u8>) {
        let k = kind(&datagram);
        self.log.push(Sent {
            at: now - self.t0,
            from_a,
            kind: k,
        });
        if self.lose.contains(&k) {
            return;
        }
        let mut out = vec![0u8; 2048];
        let reply = match self.peer(!from_a).decapsulate(now, &datagram, &mut out) {
            Ok(Output::Transmit(d)) => Some(d.to_vec()),
            Ok(Output::Deliver { packet, .. }) => {
                let p = packet.to_vec();
                if from_a {
                    self.delivered_to_b.push(p);
                } else {
                    self.delivered_to_a.push(p);
                }
                None
            }
            Ok(Output::Done) | Err(_) => None,
        };
        if let Some(r) = reply {
            self.wire(now, !from_a, r);
        }
        self.drain(now, !from_a);
    }

    fn drain(&mut self, now: Instant, a: bool) {
        let mut out = vec![0u8; 2048];
        while let Ok(Some(d)) = self.peer(a).poll_queued(now, &mut out) {
            let d = d.to_vec();
            self.wire(now, a, d);
        }
    }

    fn send(&mut self, now: Instant, from_a: bool, len: usize) {
        let (src, dst) = if from_a { (A_IP, B_IP) } else { (B_IP, A_IP) };
        let p = packet(src, dst, len, 0x11);
        let mut out = vec![0u8; 2048];
        if let Ok(Output::Transmit(d)) = self.peer(from_a).encapsulate(now, &p, &mut out) {
            let d = d.to_vec();
            self.wire(now, from_a, d);
        }
    }

    /// Runs both sides' timers that are due at `now`.
    fn tick(&mut self, now: Instant) {
        for a in [true, false] {
            let mut out = vec![0u8; 2048];
            while let Some(d) = self.peer(a).handle_timeout(now, &mut out).unwrap() {
                let d = d.to_vec();
                self.wire(now, a, d);
            }
        }
    }

    /// Ticks every 100 ms from `from` to `to` seconds, calling `each` every whole second.
    fn run(&mut self, from: f64, to: f64, mut each: impl FnMut(&mut Sim, Instant)) {
        let mut t = from;
        let mut next_whole = from.ceil();
        while t <= to + 1e-9 {
            let now = self.at(t);
            if t + 1e-9 >= next_whole {
                each(self, now);
                next_whole += 1.0;
            }
            self.tick(now);
            t += 0.1;
        }
    }

    fn handshake(&mut self, now: Instant) {
        self.send(now, true, 100);
        assert!(
            self.a.has_session(now) && self.b.has_session(now),
            "handshake completes"
        );
    }

    fn sent(&self, from_a: bool, kind: Kind) -> Vec<Duration> {
        self.log
            .iter()
            .filter(|s| s.from_a == from_a && s.kind == kind)
            .map(|s| s.at)
            .collect()
    }
}

fn secs(d: &[Duration]) -> Vec<f64> {
    d.iter()
        .map(|d| (d.as_secs_f64() * 10.0).round() / 10.0)
        .collect()
}

#[test]
fn rekey_after_120_s_of_traffic_without_a_gap() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    s.run(1.0, 130.0, |s, now| {
        s.send(now, true, 500);
        s.send(now, false, 500);
    });
    let inits = s.sent(true, Kind::Initiation);
    assert_eq!(
        inits.len(),
        2,
        "one initial handshake and one rekey: {:?}",
        secs(&inits)
    );
    assert_eq!(
        inits[1],
        Duration::from_secs(120),
        "the first packet at 120 s triggers the rekey"
    );
    assert!(
        s.sent(false, Kind::Initiation).is_empty(),
        "the responder does not rekey on time"
    );
    // Every packet of the 130 seconds arrived: no gap around the rekey.
    assert_eq!(s.delivered_to_b.len(), 1 + 130);
    assert_eq!(s.delivered_to_a.len(), 130);
    assert_eq!(
        s.a.last_handshake(s.at(130.0)),
        Some(Duration::from_secs(10))
    );
}

#[test]
fn data_is_rejected_180_s_after_the_handshake() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    // Handshakes are lost from now on: the session ages out.
    s.lose = vec![Kind::Initiation, Kind::Response];
    let mut out = vec![0u8; 2048];
    let late = match s
        .a
        .encapsulate(s.at(179.9), &packet(A_IP, B_IP, 60, 1), &mut out)
    {
        Ok(Output::Transmit(d)) => d.to_vec(),
        other => panic!("still a session at 179.9 s: {other:?}"),
    };
    let mut buf = vec![0u8; 2048];
    assert!(matches!(
        s.b.decapsulate(s.at(179.9), &late.clone(), &mut buf),
        Ok(Output::Deliver { .. })
    ));
    assert!(!s.a.has_session(s.at(180.0)));
    let queued =
        s.a.encapsulate(s.at(180.0), &packet(A_IP, B_IP, 60, 2), &mut out)
            .unwrap();
    assert!(
        matches!(&queued, Output::Transmit(d) if kind(d) == Kind::Initiation)
            || queued == Output::Done,
        "at 180 s a packet waits for a new handshake instead of using the old session"
    );
    // A data message sealed in time but arriving at 180 s is refused by the receiver.
    let mut out = vec![0u8; 2048];
    let mut s2 = Sim::new(None);
    s2.handshake(s2.t0);
    let Ok(Output::Transmit(d)) =
        s2.a.encapsulate(s2.at(179.0), &packet(A_IP, B_IP, 60, 3), &mut out)
    else {
        panic!("sealed at 179 s")
    };
    let d = d.to_vec();
    assert_eq!(
        s2.b.decapsulate(s2.at(180.0), &d, &mut buf),
        Err(NoiseError::SessionExpired)
    );
}

#[test]
fn keepalive_after_10_s_of_receiving_only() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    let before = s.sent(true, Kind::Keepalive).len();
    s.send(s.at(1.0), false, 300);
    s.run(1.0, 30.0, |_, _| {});
    let ka = s.sent(true, Kind::Keepalive);
    assert_eq!(
        secs(&ka[before..]),
        vec![11.0],
        "one keepalive, 10 s after the data arrived"
    );
    // Receiving a keepalive does not call for one in return.
    assert!(s
        .sent(false, Kind::Keepalive)
        .iter()
        .all(|t| *t < Duration::from_secs(11)));
}

#[test]
fn no_keepalive_when_data_goes_back() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    s.run(1.0, 30.0, |s, now| {
        s.send(now, false, 300);
        s.send(now, true, 300);
    });
    assert!(s.sent(true, Kind::Keepalive).is_empty());
}

#[test]
fn persistent_keepalive_every_interval_of_silence() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    s.a.set_persistent_keepalive(s.t0, Some(25));
    s.run(0.0, 100.0, |_, _| {});
    let ka = s.sent(true, Kind::Keepalive);
    // The peer's passive keepalive at 10 s (for the handshake's data) counts as traffic.
    assert_eq!(secs(&ka), vec![0.0, 35.0, 60.0, 85.0]);
    // Traffic pushes it back: data at 101 s, the peer's keepalive for it at 111 s.
    s.send(s.at(101.0), true, 100);
    s.run(101.0, 135.0, |_, _| {});
    assert_eq!(
        s.sent(false, Kind::Keepalive).last(),
        Some(&Duration::from_secs(111))
    );
    assert_eq!(
        s.sent(true, Kind::Keepalive).len(),
        ka.len(),
        "nothing before 136 s"
    );
    s.run(135.1, 136.0, |_, _| {});
    // At 136 s the session is old enough that sending also starts a rekey.
    assert_eq!(
        secs(&s.sent(true, Kind::Keepalive)[ka.len()..ka.len() + 1]),
        vec![136.0]
    );
    let ka = s.sent(true, Kind::Keepalive);
    s.a.set_persistent_keepalive(s.at(137.0), None);
    s.run(137.0, 200.0, |_, _| {});
    assert_eq!(s.sent(true, Kind::Keepalive).len(), ka.len(), "stopped");
}

#[test]
fn handshake_retries_every_5_s_with_jitter_and_gives_up_after_90_s() {
    let mut s = Sim::new(None);
    s.lose = vec![Kind::Initiation];
    s.send(s.t0, true, 100);
    s.run(0.0, 200.0, |_, _| {});
    let inits = s.sent(true, Kind::Initiation);
    assert!(inits.len() >= 17 && inits.len() <= 18, "{:?}", secs(&inits));
    for w in inits.windows(2) {
        let gap = w[1] - w[0];
        // Ticks are 100 ms apart, so a deadline is seen up to 100 ms late.
        assert!(
            gap >= REKEY_TIMEOUT
                && gap <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER + Duration::from_millis(100),
            "gap {gap:?}"
        );
    }
    let gaps: Vec<_> = inits.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().any(|g| *g != gaps[0]),
        "the retries are jittered"
    );
    assert!(*inits.last().unwrap() < REKEY_ATTEMPT_TIME);
    let now = s.at(200.0);
    assert!(
        s.a.is_expired(now),
        "after giving up nothing is kept: the packet is dropped"
    );
    let mut out = vec![0u8; 2048];
    assert_eq!(s.a.poll_queued(now, &mut out), Ok(None));
}

#[test]
fn retries_are_reproducible_from_the_seed() {
    let run = || {
        let mut s = Sim::new(None);
        s.lose = vec![Kind::Initiation];
        s.send(s.t0, true, 100);
        let mut deadlines = Vec::new();
        for _ in 0..5 {
            let t = s.a.poll_timeout().unwrap();
            deadlines.push(t - s.t0);
            s.tick(t);
        }
        deadlines
    };
    assert_eq!(run(), run());
}

#[test]
fn sessions_are_erased_540_s_after_the_last_handshake() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    s.run(0.0, 539.0, |_, _| {});
    assert!(!s.a.is_expired(s.at(539.0)) && !s.b.is_expired(s.at(539.0)));
    assert!(
        !s.a.has_session(s.at(200.0)),
        "rejected long before it is erased"
    );
    s.run(539.1, 541.0, |_, _| {});
    let now = s.at(541.0);
    assert!(s.a.is_expired(now) && s.b.is_expired(now));
    assert!(
        s.a.keypairs.is_empty() && s.b.keypairs.is_empty(),
        "key material erased"
    );
    assert_eq!(s.a.poll_timeout(), None, "an erased peer has no timers");
    // A new packet starts over with a new handshake.
    s.send(now, true, 100);
    assert!(s.a.has_session(now));
    assert_eq!(s.delivered_to_b.len(), 2);
}

#[test]
fn data_without_answer_for_15_s_starts_a_new_handshake() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    // From now on the peer hears us but we hear nothing back.
    s.lose = vec![Kind::Keepalive, Kind::Data, Kind::Response];
    s.send(s.at(1.0), true, 100);
    s.run(1.0, 17.0, |_, _| {});
    let inits = s.sent(true, Kind::Initiation);
    // The confirmation sent at 0 s already went unanswered: 15 s after it, not after
    // the later packet.
    assert_eq!(secs(&inits), vec![0.0, 15.0]);
}

#[test]
fn counter_exhaustion_stops_the_session_and_counts_trigger_rekey() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    // After REKEY_TIMEOUT, so the initiation is not held back by the rate limit.
    let now = s.at(6.0);
    let mut out = vec![0u8; 2048];
    s.a.current_keypair()
        .unwrap()
        .set_send_counter(REKEY_AFTER_MESSAGES + 1);
    s.send(now, true, 100);
    assert!(
        s.a.poll_timeout().is_some_and(|t| t <= now),
        "a rekey is due on message count"
    );
    s.tick(now);
    assert_eq!(s.sent(true, Kind::Initiation).len(), 2);
    // The new session starts at counter 0; exhaust it.
    s.a.current_keypair()
        .unwrap()
        .set_send_counter(REJECT_AFTER_MESSAGES - 1);
    let now = s.at(7.0);
    assert!(
        matches!(s.a.encapsulate(now, &packet(A_IP, B_IP, 60, 1), &mut out), Ok(Output::Transmit(d)) if kind(d) == Kind::Data)
    );
    assert!(!s.a.has_session(now), "the last counter was used");
    let b_before = s.delivered_to_b.len();
    s.send(now, true, 60);
    assert_eq!(
        s.delivered_to_b.len(),
        b_before,
        "queued for a new handshake, sent within the rate limit"
    );
    s.run(7.0, 12.0, |_, _| {});
    assert!(s.a.has_session(s.at(12.0)));
    assert!(
        s.delivered_to_b.len() > b_before,
        "the queued packet went out on the next session"
    );
}

#[test]
fn replay_window_on_the_wire() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    let now = s.at(1.0);
    let mut out = vec![0u8; 2048];
    let mut sealed = Vec::new();
    for i in 0..2100 {
        let Ok(Output::Transmit(d)) =
            s.a.encapsulate(now, &packet(A_IP, B_IP, 40, i as u8), &mut out)
        else {
            panic!("sealing")
        };
        sealed.push(d.to_vec());
    }
    let mut buf = vec![0u8; 2048];
    let mut open = |s: &mut Sim, i: usize| {
        s.b.decapsulate(now, &sealed[i], &mut buf)
            .map(|o| matches!(o, Output::Deliver { .. }))
    };
    assert_eq!(open(&mut s, 2), Ok(true));
    assert_eq!(open(&mut s, 0), Ok(true), "reordered");
    assert_eq!(open(&mut s, 1), Ok(true));
    assert_eq!(open(&mut s, 1), Err(NoiseError::Replay), "duplicate");
    assert_eq!(open(&mut s, 2099), Ok(true));
    assert_eq!(
        open(&mut s, 3),
        Err(NoiseError::Replay),
        "too old for the window"
    );
    assert_eq!(
        open(&mut s, 2099 - REPLAY_WINDOW as usize + 1),
        Ok(true),
        "oldest inside the window"
    );
    // A forged counter does not move the window: authentication comes first.
    let mut forged = sealed[2098].clone();
    forged[8..16].copy_from_slice(&5000u64.to_le_bytes());
    assert_eq!(
        s.b.decapsulate(now, &forged, &mut buf),
        Err(NoiseError::DecryptFailed)
    );
    assert!(matches!(
        s.b.decapsulate(now, &sealed[2098], &mut buf),
        Ok(Output::Deliver { .. })
    ));
}

#[test]
fn cookie_gate_demands_mac2_under_load() {
    let mut s = Sim::new(None);
    let gate = CookieGate::new(&s.b_id, 2);
    let from: SocketAddr = "192.0.2.1:4000".parse().unwrap();
    let now = s.t0;
    let mut out = vec![0u8; 2048];
    let mut reply = vec![0u8; 128];
    let init = match s.a.force_handshake(now, &mut out) {
        Ok(d) => d.to_vec(),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        gate.check(now, from, &init, &mut reply),
        Ok(GateVerdict::Pass)
    );
    assert_eq!(
        gate.check(now, from, &init, &mut reply),
        Ok(GateVerdict::Pass)
    );
    assert!(gate.under_load(now), "two per second is the limit");
    let cookie = match gate.check(now, from, &init, &mut reply).unwrap() {
        GateVerdict::CookieReply(c) => c.to_vec(),
        GateVerdict::Pass => panic!("the third in one second needs mac2"),
    };
    assert_eq!(cookie.len(), COOKIE_REPLY_LEN);
    // A cookie reply to an index the peer never used is refused.
    let mut wrong = cookie.clone();
    wrong[4] ^= 1;
    assert!(s.a.decapsulate(now, &wrong, &mut out).is_err());
    assert_eq!(s.a.decapsulate(now, &cookie, &mut out), Ok(Output::Done));
    // The retry after REKEY_TIMEOUT carries mac2: it passes while still under load.
    let retry_at = s.a.poll_timeout().unwrap();
    let later = retry_at - Duration::from_millis(1);
    assert!(later < now + Duration::from_secs(6));
    let mut busy = s.t0 + Duration::from_secs(5);
    for _ in 0..3 {
        let _ = gate.check(busy, from, &init, &mut reply);
        busy += Duration::from_millis(1);
    }
    assert!(gate.under_load(retry_at));
    let retry =
        s.a.handle_timeout(retry_at, &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
    assert_eq!(
        gate.check(retry_at, from, &retry, &mut reply),
        Ok(GateVerdict::Pass)
    );
    // Bound to the address: the same message from another port gets a cookie reply.
    let other: SocketAddr = "192.0.2.1:4001".parse().unwrap();
    assert!(matches!(
        gate.check(retry_at, other, &retry, &mut reply),
        Ok(GateVerdict::CookieReply(_))
    ));
    // Load passes: after a quiet second, mac1 alone is enough again.
    let quiet = retry_at + Duration::from_secs(2);
    assert!(!gate.under_load(quiet));
    assert_eq!(
        gate.check(quiet, other, &init, &mut reply),
        Ok(GateVerdict::Pass)
    );
    // Garbage and messages for another key are refused before any counting.
    let mut bad = init.clone();
    bad[120] ^= 1;
    assert_eq!(
        gate.check(quiet, from, &bad, &mut reply),
        Err(NoiseError::InvalidMac)
    );
    let foreign = CookieGate::new(&s.a_id, 100).check(quiet, from, &init, &mut reply);
    assert_eq!(foreign, Err(NoiseError::InvalidMac));
}

#[test]
fn cookies_expire_with_the_secret() {
    let mut s = Sim::new(None);
    let gate = CookieGate::new(&s.b_id, 0);
    let from: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
    let mut out = vec![0u8; 2048];
    let mut reply = vec![0u8; 128];
    let init = s.a.force_handshake(s.t0, &mut out).unwrap().to_vec();
    let GateVerdict::CookieReply(c) = gate.check(s.t0, from, &init, &mut reply).unwrap() else {
        panic!("limit 0 always demands mac2")
    };
    let c = c.to_vec();
    s.a.decapsulate(s.t0, &c, &mut out).unwrap();
    let fresh = s.a.force_handshake(s.at(100.0), &mut out).unwrap().to_vec();
    assert_eq!(
        gate.check(s.at(100.0), from, &fresh, &mut reply),
        Ok(GateVerdict::Pass)
    );
    // Two minutes on, the jar stops using the cookie and the gate has a new secret.
    let stale = s.a.force_handshake(s.at(121.0), &mut out).unwrap().to_vec();
    assert_eq!(&stale[132..], &[0u8; 16]);
    assert!(matches!(
        gate.check(s.at(121.0), from, &stale, &mut reply),
        Ok(GateVerdict::CookieReply(_))
    ));
}

#[test]
fn initiation_replay_and_flood_are_refused() {
    let mut s = Sim::new(None);
    let mut out = vec![0u8; 2048];
    let init = s.a.force_handshake(s.t0, &mut out).unwrap().to_vec();
    assert!(matches!(
        s.b.decapsulate(s.t0, &init, &mut out),
        Ok(Output::Transmit(_))
    ));
    let later = s.at(1.0);
    assert_eq!(
        s.b.decapsulate(later, &init, &mut out),
        Err(NoiseError::TimestampReplay)
    );
    let second = s.a.force_handshake(s.at(1.0), &mut out).unwrap().to_vec();
    let third = s.a.force_handshake(s.at(1.1), &mut out).unwrap().to_vec();
    assert!(s.b.decapsulate(s.at(1.0), &second, &mut out).is_ok());
    assert_eq!(
        s.b.decapsulate(s.at(1.01), &third, &mut out),
        Err(NoiseError::InitiationFlood)
    );
    assert!(s.b.decapsulate(s.at(1.1), &third, &mut out).is_ok());
    // An initiation from someone else's key does not reach this peer's state.
    let stranger = Arc::new(Identity::new(key(), SystemTime::now(), s.t0));
    let mut c = NoisePeer::new(stranger, s.b_id.public_key(), None, 3, s.t0);
    let foreign = c.force_handshake(s.at(2.0), &mut out).unwrap().to_vec();
    assert_eq!(
        s.b.decapsulate(s.at(2.0), &foreign, &mut out),
        Err(NoiseError::WrongPeer)
    );
    assert_eq!(
        s.b_id.open_initiation(&foreign).unwrap().peer_public,
        c.identity.public_key()
    );
}

#[test]
fn preshared_key_changes_at_the_next_handshake_without_dropping_sessions() {
    let psk1 = key();
    let mut s = Sim::new(Some(psk1));
    s.handshake(s.t0);
    let psk2 = key();
    s.a.set_preshared_key(s.t0, Some(psk2));
    s.b.set_preshared_key(s.t0, Some(psk2));
    let now = s.at(1.0);
    s.send(now, true, 100);
    s.send(now, false, 100);
    assert_eq!(
        (s.delivered_to_b.len(), s.delivered_to_a.len()),
        (2, 1),
        "old session still carries data"
    );
    let mut out = vec![0u8; 2048];
    let init = s.a.force_handshake(now, &mut out).unwrap().to_vec();
    s.wire(now, true, init);
    assert_eq!(
        s.a.last_handshake(now),
        Some(Duration::ZERO),
        "new handshake with the new psk"
    );
    s.send(now, false, 100);
    assert_eq!(s.delivered_to_a.len(), 2);
    // The responder alone changing: its response is made with a key the initiator
    // never had, so the handshake fails but the session stays usable.
    s.b.set_preshared_key(s.at(7.0), Some(key()));
    let now = s.at(7.0);
    let init = s.a.force_handshake(now, &mut out).unwrap().to_vec();
    s.wire(now, true, init);
    assert_eq!(s.a.last_handshake(now), Some(Duration::from_secs(6)));
    s.send(now, true, 100);
    assert_eq!(s.delivered_to_b.len(), 3);
}

#[test]
fn initiator_accepts_a_response_under_its_previous_preshared_key_for_a_grace_period() {
    let psk1 = key();
    let mut s = Sim::new(Some(psk1));
    s.handshake(s.t0);
    let mut out = vec![0u8; 2048];
    // A learns the new key first; B still answers with the old one.
    let psk2 = key();
    s.a.set_preshared_key(s.at(1.0), Some(psk2));
    let now = s.at(10.0);
    let init = s.a.force_handshake(now, &mut out).unwrap().to_vec();
    s.wire(now, true, init);
    assert_eq!(
        s.a.last_handshake(now),
        Some(Duration::ZERO),
        "a response under the previous key completes within the grace period"
    );
    let before = (s.delivered_to_b.len(), s.delivered_to_a.len());
    s.send(now, true, 100);
    s.send(now, false, 100);
    assert_eq!(
        (s.delivered_to_b.len(), s.delivered_to_a.len()),
        (before.0 + 1, before.1 + 1),
        "the session made under the previous key carries data both ways"
    );
    // Past the grace period the previous key is no longer tried.
    let late = s.at(1.0 + PSK_GRACE.as_secs_f64() + 1.0);
    let init = s.a.force_handshake(late, &mut out).unwrap().to_vec();
    s.wire(late, true, init);
    assert_eq!(
        s.a.last_handshake(late),
        Some(late - now),
        "no handshake under the old key after the grace period"
    );
    // B catches up: a handshake under the new key completes, and ends the grace.
    s.b.set_preshared_key(late, Some(psk2));
    let t = late + Duration::from_secs(1);
    let init = s.a.force_handshake(t, &mut out).unwrap().to_vec();
    s.wire(t, true, init);
    assert_eq!(s.a.last_handshake(t), Some(Duration::ZERO));
}

#[test]
fn crossing_initiations_end_with_one_session() {
    let mut s = Sim::new(None);
    let mut out = vec![0u8; 2048];
    let now = s.t0;
    let ia = s.a.force_handshake(now, &mut out).unwrap().to_vec();
    let ib = s.b.force_handshake(now, &mut out).unwrap().to_vec();
    s.wire(now, true, ia);
    s.wire(now, false, ib);
    s.run(0.0, 12.0, |s, now| {
        s.send(now, true, 100);
        s.send(now, false, 100);
    });
    assert!(s.a.has_session(s.at(12.0)) && s.b.has_session(s.at(12.0)));
    assert!(s.delivered_to_a.len() >= 12 && s.delivered_to_b.len() >= 12);
}

/// Random, truncated and bit-flipped messages of every type: never a panic, never a
/// changed session, and the peers still talk afterwards.
#[test]
fn fuzzed_datagrams_are_refused_without_harm() {
    let mut s = Sim::new(None);
    let mut out = vec![0u8; 2048];
    let gate = CookieGate::new(&s.b_id, 0);
    let from: SocketAddr = "192.0.2.9:9".parse().unwrap();
    let mut samples = vec![s.a.force_handshake(s.t0, &mut out).unwrap().to_vec()];
    samples.push(match s.b.decapsulate(s.t0, &samples[0], &mut out) {
        Ok(Output::Transmit(d)) => d.to_vec(),
        other => panic!("{other:?}"),
    });
    let Ok(Output::Transmit(conf)) = s.a.decapsulate(s.t0, &samples[1], &mut out) else {
        panic!("response")
    };
    samples.push(conf.to_vec());
    s.b.decapsulate(s.t0, &samples[2], &mut out).unwrap();
    let GateVerdict::CookieReply(c) = gate.check(s.t0, from, &samples[0], &mut out).unwrap() else {
        panic!("cookie")
    };
    samples.push(c.to_vec());
    let Ok(Output::Transmit(d)) =
        s.a.encapsulate(s.t0, &packet(A_IP, B_IP, 1420, 1), &mut out)
    else {
        panic!("data")
    };
    samples.push(d.to_vec());
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut small = vec![0u8; 64];
    for i in 0..6000 {
        let base = &samples[i % samples.len()];
        let mut d = base.clone();
        match rnd() % 4 {
            0 => d.truncate((rnd() as usize) % (base.len() + 1)),
            1 => {
                for _ in 0..1 + rnd() % 3 {
                    let at = (rnd() as usize) % d.len();
                    d[at] ^= 1 << (rnd() % 8);
                }
            }
            2 => d.iter_mut().skip(1).for_each(|b| *b = rnd() as u8),
            _ => {
                let n = (rnd() as usize) % 200;
                d = (0..n).map(|_| rnd() as u8).collect();
                if n > 0 {
                    d[0] = (rnd() % 5) as u8;
                }
            }
        }
        if d == *base {
            continue;
        }
        let now = s.at(1.0 + i as f64 * 0.001);
        for peer in [&mut s.a, &mut s.b] {
            let r = peer.decapsulate(now, &d, &mut out);
            assert!(
                !matches!(r, Ok(Output::Deliver { .. })),
                "a modified datagram was delivered"
            );
            let _ = peer.decapsulate(now, &d, &mut small);
        }
        let _ = s.b_id.open_initiation(&d);
        let _ = gate.check(now, from, &d, &mut out);
        let _ = gate.check(now, from, &d, &mut small[..10]);
    }
    let now = s.at(8.0);
    s.send(now, true, 700);
    s.send(now, false, 700);
    assert_eq!(
        (s.delivered_to_b.len(), s.delivered_to_a.len()),
        (1, 1),
        "the session survived"
    );
}

#[test]
fn small_output_buffers_are_errors_not_panics() {
    let mut s = Sim::new(None);
    let mut tiny = [0u8; 40];
    assert_eq!(
        s.a.encapsulate(s.t0, &packet(A_IP, B_IP, 100, 1), &mut tiny),
        Err(NoiseError::BufferTooSmall)
    );
    s.handshake(s.at(5.0));
    assert_eq!(
        s.a.encapsulate(s.at(6.0), &packet(A_IP, B_IP, 100, 1), &mut tiny),
        Err(NoiseError::BufferTooSmall)
    );
}

/// Memory per peer: the idle state is inline and small; sessions live on the heap only
/// while they exist.
#[test]
fn per_peer_state_is_small() {
    let idle = std::mem::size_of::<NoisePeer>();
    let keypair = std::mem::size_of::<Keypair>();
    let handshake = std::mem::size_of::<handshake::InitiatorHandshake>();
    println!("NoisePeer idle: {idle} B inline, no heap; keypair: {keypair} B boxed; handshake in flight: {handshake} B boxed");
    println!(
        "established (one key pair): {} B, of which ring's two expanded keys {} B",
        idle + keypair,
        2 * std::mem::size_of::<ring::aead::LessSafeKey>()
    );
    assert!(idle <= 512, "idle peer state {idle} B");
    // The device keeps peers behind locks shared between its send and receive tasks.
    fn shared<T: Send + Sync>() {}
    shared::<NoisePeer>();
    shared::<CookieGate>();
    shared::<Identity>();
    println!(
        "busiest (three key pairs and a handshake): {} B",
        idle + 3 * keypair + handshake
    );
    assert!(idle + keypair <= 2048, "established peer state");
}

#[test]
fn padding_is_cut_off_and_ipv6_sources_are_reported() {
    let mut s = Sim::new(None);
    s.handshake(s.t0);
    let now = s.at(1.0);
    let mut out = vec![0u8; 2048];
    let mut buf = vec![0u8; 2048];
    let mut v6 = vec![0x5au8; 61];
    v6[0] = 0x60;
    v6[4..6].copy_from_slice(&21u16.to_be_bytes());
    let src: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    v6[8..24].copy_from_slice(&src.octets());
    let Ok(Output::Transmit(d)) = s.a.encapsulate(now, &v6, &mut out) else {
        panic!("sealing")
    };
    assert_eq!(d.len(), 64 + DATA_OVERHEAD, "plaintext padded to 16 bytes");
    let d = d.to_vec();
    match s.b.decapsulate(now, &d, &mut buf) {
        Ok(Output::Deliver { packet, source }) => {
            assert_eq!(packet, &v6[..]);
            assert_eq!(source, IpAddr::V6(src));
        }
        other => panic!("{other:?}"),
    }
    // Padding never pushes a full-sized packet past the MTU.
    let full = packet(A_IP, B_IP, DEFAULT_MTU as usize, 3);
    let Ok(Output::Transmit(d)) = s.a.encapsulate(now, &full, &mut out) else {
        panic!("sealing")
    };
    assert_eq!(d.len(), DEFAULT_MTU as usize + DATA_OVERHEAD);
    // A decrypted packet whose header claims more than it carries is refused.
    let mut liar = packet(A_IP, B_IP, 40, 3);
    liar[2..4].copy_from_slice(&100u16.to_be_bytes());
    let Ok(Output::Transmit(d)) = s.a.encapsulate(now, &liar, &mut out) else {
        panic!("sealing")
    };
    let d = d.to_vec();
    assert_eq!(
        s.b.decapsulate(now, &d, &mut buf),
        Err(NoiseError::InvalidPacket)
    );
}
