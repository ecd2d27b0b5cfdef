//! Our Noise state machine against boringtun's `Tunn`, an independent implementation, in
//! one process: handshakes both ways, data both ways, preshared keys, the cookie path
//! under load and a rekey. boringtun reads the real clock, so nothing here needs time to
//! pass on its side; our side is fed `now` explicitly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::{OsRng, RngCore};
use sidecar::wg::noise::{
    CookieGate, GateVerdict, Identity, NoisePeer, Output, REKEY_AFTER_TIME, REKEY_TIMEOUT,
};

const OURS_INNER: [u8; 4] = [198, 51, 100, 1];
const THEIRS_INNER: [u8; 4] = [198, 51, 100, 2];

fn key() -> [u8; 32] {
    let mut k = [0u8; 32];
    OsRng.fill_bytes(&mut k);
    k
}

fn public(private: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(private)).to_bytes()
}

/// An IPv4/UDP packet from `src` to `dst` with `len` bytes in all and a recognisable body.
fn packet(src: [u8; 4], dst: [u8; 4], len: usize, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; len];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

struct Pair {
    ours: NoisePeer,
    identity: Arc<Identity>,
    theirs: Tunn,
    t0: Instant,
}

fn pair(psk: Option<[u8; 32]>, limiter: Option<Arc<RateLimiter>>) -> Pair {
    let (our_key, their_key) = (key(), key());
    let t0 = Instant::now();
    let identity = Arc::new(Identity::new(our_key, SystemTime::now(), t0));
    let ours = NoisePeer::new(identity.clone(), public(their_key), psk, 1, t0);
    let theirs = Tunn::new(
        StaticSecret::from(their_key),
        PublicKey::from(public(our_key)),
        psk,
        None,
        2,
        limiter,
    );
    Pair {
        ours,
        identity,
        theirs,
        t0,
    }
}

fn transmit(o: Result<Output<'_>, sidecar::wg::noise::NoiseError>) -> Vec<u8> {
    match o {
        Ok(Output::Transmit(d)) => d.to_vec(),
        other => panic!("expected a datagram to send, got {other:?}"),
    }
}

fn to_network(r: TunnResult<'_>) -> Vec<u8> {
    match r {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        TunnResult::Err(e) => panic!("boringtun refused: {e:?}"),
        _ => panic!("expected boringtun to send a datagram"),
    }
}

/// boringtun decrypts `datagram` and must deliver exactly `expect` from `src`.
fn theirs_delivers(t: &mut Tunn, datagram: &[u8], expect: &[u8]) {
    let mut buf = vec![0u8; 2048];
    match t.decapsulate(None, datagram, &mut buf) {
        TunnResult::WriteToTunnelV4(p, src) => {
            assert_eq!(src, Ipv4Addr::from(OURS_INNER));
            assert_eq!(p, expect);
        }
        TunnResult::Err(e) => panic!("boringtun refused our data: {e:?}"),
        _ => panic!("boringtun did not deliver our data"),
    }
}

/// Ours decrypts `datagram` and must deliver exactly `expect` from boringtun's address.
fn ours_delivers(p: &mut Pair, now: Instant, datagram: &[u8], expect: &[u8]) {
    let mut buf = vec![0u8; 2048];
    match p.ours.decapsulate(now, datagram, &mut buf) {
        Ok(Output::Deliver { packet, source }) => {
            assert_eq!(source, IpAddr::from(THEIRS_INNER));
            assert_eq!(packet, expect);
        }
        other => panic!("ours did not deliver boringtun's data: {other:?}"),
    }
}

/// Ours initiates; the first packet waits for the handshake and then confirms it.
fn ours_initiates(p: &mut Pair, now: Instant) {
    let mut buf = vec![0u8; 2048];
    let first = packet(OURS_INNER, THEIRS_INNER, 100, 1);
    let init = transmit(p.ours.encapsulate(now, &first, &mut buf));
    assert_eq!(init.len(), 148);
    let mut tbuf = vec![0u8; 2048];
    let resp = to_network(p.theirs.decapsulate(None, &init, &mut tbuf));
    assert_eq!(resp.len(), 92);
    let data = transmit(p.ours.decapsulate(now, &resp, &mut buf));
    theirs_delivers(&mut p.theirs, &data, &first);
    assert!(p.ours.has_session(now));
}

/// Data both ways over an established session, 1420 bytes and small.
fn data_both_ways(p: &mut Pair, now: Instant) {
    let mut buf = vec![0u8; 2048];
    let mut tbuf = vec![0u8; 2048];
    for (len, fill) in [(1420, 7u8), (28, 8), (61, 9)] {
        let ours_out = packet(OURS_INNER, THEIRS_INNER, len, fill);
        let d = transmit(p.ours.encapsulate(now, &ours_out, &mut buf));
        theirs_delivers(&mut p.theirs, &d, &ours_out);
        let theirs_out = packet(THEIRS_INNER, OURS_INNER, len, fill ^ 0xff);
        let d = to_network(p.theirs.encapsulate(&theirs_out, &mut tbuf));
        ours_delivers(p, now, &d, &theirs_out);
    }
}

#[test]
fn noise_interop_ours_initiates_without_psk() {
    let mut p = pair(None, None);
    let now = p.t0;
    ours_initiates(&mut p, now);
    data_both_ways(&mut p, now);
}

#[test]
fn noise_interop_ours_initiates_with_psk() {
    let mut p = pair(Some(key()), None);
    let now = p.t0;
    ours_initiates(&mut p, now);
    data_both_ways(&mut p, now);
}

/// boringtun initiates; ours answers and may send only after boringtun's first data.
fn theirs_initiates(p: &mut Pair, now: Instant) {
    let mut buf = vec![0u8; 2048];
    let mut tbuf = vec![0u8; 2048];
    let first = packet(THEIRS_INNER, OURS_INNER, 200, 3);
    let init = to_network(p.theirs.encapsulate(&first, &mut tbuf));
    let resp = transmit(p.ours.decapsulate(now, &init, &mut buf));
    assert_eq!(resp.len(), 92);
    assert!(
        !p.ours.has_session(now),
        "the responder must wait for confirmation"
    );
    let mut confirm = Vec::new();
    if let TunnResult::WriteToNetwork(d) = p.theirs.decapsulate(None, &resp, &mut tbuf) {
        confirm.push(d.to_vec());
    }
    while let TunnResult::WriteToNetwork(d) = p.theirs.decapsulate(None, &[], &mut tbuf) {
        confirm.push(d.to_vec());
    }
    let mut delivered = false;
    for d in &confirm {
        match p
            .ours
            .decapsulate(now, d, &mut buf)
            .expect("boringtun's confirmation")
        {
            Output::Deliver { packet, .. } => {
                assert_eq!(packet, &first[..]);
                delivered = true;
            }
            Output::Done => {}
            Output::Transmit(_) => panic!("nothing to answer"),
        }
    }
    assert!(delivered, "boringtun's queued packet arrives");
    assert!(p.ours.has_session(now));
}

#[test]
fn noise_interop_theirs_initiates_without_psk() {
    let mut p = pair(None, None);
    let now = p.t0;
    theirs_initiates(&mut p, now);
    data_both_ways(&mut p, now);
}

#[test]
fn noise_interop_theirs_initiates_with_psk() {
    let mut p = pair(Some(key()), None);
    let now = p.t0;
    theirs_initiates(&mut p, now);
    data_both_ways(&mut p, now);
}

#[test]
fn noise_interop_different_psk_fails_the_handshake() {
    let (our_key, their_key) = (key(), key());
    let t0 = Instant::now();
    let identity = Arc::new(Identity::new(our_key, SystemTime::now(), t0));
    let mut ours = NoisePeer::new(identity, public(their_key), Some(key()), 1, t0);
    let mut theirs = Tunn::new(
        StaticSecret::from(their_key),
        PublicKey::from(public(our_key)),
        Some(key()),
        None,
        2,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let mut tbuf = vec![0u8; 2048];
    let init = transmit(ours.encapsulate(t0, &packet(OURS_INNER, THEIRS_INNER, 60, 0), &mut buf));
    let resp = to_network(theirs.decapsulate(None, &init, &mut tbuf));
    assert!(ours.decapsulate(t0, &resp, &mut buf).is_err());
    assert!(!ours.has_session(t0));
}

/// boringtun under load (its limiter at 0) answers our initiation with a cookie reply;
/// our retry 5 s later carries mac2 and is answered.
#[test]
fn noise_interop_ours_passes_boringtuns_cookie_gate() {
    let their_key = key();
    let limiter = Arc::new(RateLimiter::new(&PublicKey::from(public(their_key)), 0));
    let (our_key, t0) = (key(), Instant::now());
    let identity = Arc::new(Identity::new(our_key, SystemTime::now(), t0));
    let mut ours = NoisePeer::new(identity, public(their_key), None, 1, t0).with_jitter_seed(7);
    let mut theirs = Tunn::new(
        StaticSecret::from(their_key),
        PublicKey::from(public(our_key)),
        None,
        None,
        2,
        Some(limiter),
    );
    let src = Some(IpAddr::from([192, 0, 2, 1]));
    let mut buf = vec![0u8; 2048];
    let mut tbuf = vec![0u8; 2048];
    let first = packet(OURS_INNER, THEIRS_INNER, 80, 5);
    let init = transmit(ours.encapsulate(t0, &first, &mut buf));
    let cookie = to_network(theirs.decapsulate(src, &init, &mut tbuf));
    assert_eq!(cookie.len(), 64, "a cookie reply, not a response");
    assert_eq!(ours.decapsulate(t0, &cookie, &mut buf), Ok(Output::Done));
    let retry_at = ours.poll_timeout().expect("retransmission scheduled");
    assert!(
        retry_at >= t0 + REKEY_TIMEOUT
            && retry_at <= t0 + REKEY_TIMEOUT + Duration::from_millis(333)
    );
    let retry = ours
        .handle_timeout(retry_at, &mut buf)
        .unwrap()
        .expect("retransmitted initiation")
        .to_vec();
    assert_ne!(&retry[132..148], &[0u8; 16], "the retry carries mac2");
    let resp = to_network(theirs.decapsulate(src, &retry, &mut tbuf));
    assert_eq!(resp.len(), 92);
    let data = transmit(ours.decapsulate(retry_at, &resp, &mut buf));
    theirs_delivers(&mut theirs, &data, &first);
}

/// boringtun's initiation meets our gate under load: a cookie reply, then its retry
/// with mac2 passes and is answered.
#[test]
fn noise_interop_boringtun_passes_our_cookie_gate() {
    let mut p = pair(None, None);
    let now = p.t0;
    let gate = CookieGate::new(&p.identity, 0);
    let from: SocketAddr = "192.0.2.2:51820".parse().unwrap();
    let mut buf = vec![0u8; 2048];
    let mut tbuf = vec![0u8; 2048];
    let init = to_network(p.theirs.format_handshake_initiation(&mut tbuf, false));
    let cookie = match gate.check(now, from, &init, &mut buf).unwrap() {
        GateVerdict::CookieReply(c) => c.to_vec(),
        GateVerdict::Pass => panic!("under load an initiation without mac2 must not pass"),
    };
    assert!(matches!(
        p.theirs.decapsulate(Some(from.ip()), &cookie, &mut tbuf),
        TunnResult::Done
    ));
    let retry = to_network(p.theirs.format_handshake_initiation(&mut tbuf, true));
    assert_eq!(
        gate.check(now, from, &retry, &mut buf),
        Ok(GateVerdict::Pass)
    );
    // The same cookie is bound to the address: from another port it does not pass.
    let elsewhere: SocketAddr = "192.0.2.2:51821".parse().unwrap();
    assert!(matches!(
        gate.check(now, elsewhere, &retry, &mut buf),
        Ok(GateVerdict::CookieReply(_))
    ));
    let opened = p.identity.open_initiation(&retry).unwrap();
    assert_eq!(&opened.peer_public, p.ours.peer_public());
    let resp = transmit(p.ours.accept_initiation(now, &opened, &mut buf));
    let confirm = to_network(p.theirs.decapsulate(None, &resp, &mut tbuf));
    assert_eq!(
        p.ours.decapsulate(now, &confirm, &mut buf),
        Ok(Output::Done)
    );
    data_both_ways(&mut p, now);
}

/// Ours rekeys after REKEY_AFTER_TIME (fed `now`); boringtun accepts the new session and
/// both directions carry data on it.
#[test]
fn noise_interop_ours_rekeys_after_rekey_after_time() {
    let mut p = pair(None, None);
    let t0 = p.t0;
    ours_initiates(&mut p, t0);
    let later = p.t0 + REKEY_AFTER_TIME + Duration::from_secs(1);
    let mut buf = vec![0u8; 2048];
    let mut tbuf = vec![0u8; 2048];
    assert_eq!(
        p.ours
            .handle_timeout(p.t0 + Duration::from_secs(1), &mut buf),
        Ok(None)
    );
    let pkt = packet(OURS_INNER, THEIRS_INNER, 300, 4);
    let d = transmit(p.ours.encapsulate(later, &pkt, &mut buf));
    theirs_delivers(&mut p.theirs, &d, &pkt);
    assert!(
        p.ours.poll_timeout().is_some_and(|t| t <= later),
        "a rekey is due at once"
    );
    let init = p
        .ours
        .handle_timeout(later, &mut buf)
        .unwrap()
        .expect("rekey initiation")
        .to_vec();
    assert_eq!(init.len(), 148);
    let resp = to_network(p.theirs.decapsulate(None, &init, &mut tbuf));
    let confirm = transmit(p.ours.decapsulate(later, &resp, &mut buf));
    assert!(matches!(
        p.theirs.decapsulate(None, &confirm, &mut tbuf),
        TunnResult::Done
    ));
    assert_eq!(p.ours.last_handshake(later), Some(Duration::ZERO));
    data_both_ways(&mut p, later);
}

/// Ours sends a keepalive 10 s after receiving data with nothing to send back, and takes
/// boringtun's keepalive as consumed.
#[test]
fn noise_interop_keepalives() {
    let mut p = pair(None, None);
    let now = p.t0;
    ours_initiates(&mut p, now);
    let mut buf = vec![0u8; 2048];
    let mut tbuf = vec![0u8; 2048];
    let theirs_out = packet(THEIRS_INNER, OURS_INNER, 100, 2);
    let d = to_network(p.theirs.encapsulate(&theirs_out, &mut tbuf));
    ours_delivers(&mut p, now + Duration::from_secs(1), &d, &theirs_out);
    let at = now + Duration::from_secs(11);
    let ka = p
        .ours
        .handle_timeout(at, &mut buf)
        .unwrap()
        .expect("passive keepalive")
        .to_vec();
    assert_eq!(ka.len(), 32, "a keepalive is an empty data message");
    assert!(matches!(
        p.theirs.decapsulate(None, &ka, &mut tbuf),
        TunnResult::Done
    ));
    let theirs_ka = to_network(p.theirs.encapsulate(&[], &mut tbuf));
    assert_eq!(
        p.ours.decapsulate(at, &theirs_ka, &mut buf),
        Ok(Output::Done)
    );
}
