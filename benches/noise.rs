//! Data-path cost of our Noise (`sidecar::wg::noise`) beside boringtun's `Tunn` and the
//! bare ring ChaCha20-Poly1305 rate, 1420-byte packets on one core, in one run. Prints
//! Gbit/s and the ratios (the target: 95% of the cipher's rate).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand_core::{OsRng, RngCore};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use sidecar::wg::noise::{Identity, NoisePeer, Output};

const SIZE: usize = 1420;

fn packet() -> Vec<u8> {
    let mut p = vec![0u8; SIZE];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(SIZE as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[198, 51, 100, 1]);
    p[16..20].copy_from_slice(&[198, 51, 100, 2]);
    p
}

fn key() -> [u8; 32] {
    let mut k = [0u8; 32];
    OsRng.fill_bytes(&mut k);
    k
}

fn public(k: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(k)).to_bytes()
}

/// Two of our peers with an established session, a -> b.
fn ours() -> (NoisePeer, NoisePeer, Instant) {
    let now = Instant::now();
    let (ka, kb) = (key(), key());
    let ia = Arc::new(Identity::new(ka, SystemTime::now(), now));
    let ib = Arc::new(Identity::new(kb, SystemTime::now(), now));
    let mut a = NoisePeer::new(ia, public(kb), None, 1, now);
    let mut b = NoisePeer::new(ib, public(ka), None, 2, now);
    let (mut x, mut y) = (vec![0u8; 2048], vec![0u8; 2048]);
    let Ok(Output::Transmit(init)) = a.encapsulate(now, &packet(), &mut x) else {
        panic!("no initiation")
    };
    let Ok(Output::Transmit(resp)) = b.decapsulate(now, init, &mut y) else {
        panic!("no response")
    };
    let Ok(Output::Transmit(data)) = a.decapsulate(now, resp, &mut x) else {
        panic!("no confirmation")
    };
    let Ok(Output::Deliver { .. }) = b.decapsulate(now, data, &mut y) else {
        panic!("not delivered")
    };
    (a, b, now)
}

/// Two boringtun Tunns with an established session, a -> b.
fn theirs() -> (Tunn, Tunn) {
    let (ka, kb) = (key(), key());
    let mut a = Tunn::new(
        StaticSecret::from(ka),
        PublicKey::from(public(kb)),
        None,
        None,
        1,
        None,
    );
    let mut b = Tunn::new(
        StaticSecret::from(kb),
        PublicKey::from(public(ka)),
        None,
        None,
        2,
        None,
    );
    let (mut x, mut y) = (vec![0u8; 2048], vec![0u8; 2048]);
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut x, false) else {
        panic!("no initiation")
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, init, &mut y) else {
        panic!("no response")
    };
    if let TunnResult::WriteToNetwork(k) = a.decapsulate(None, resp, &mut x) {
        let _ = b.decapsulate(None, k, &mut y);
    }
    (a, b)
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e9
}

const BURST: usize = 64;

/// Gbit/s of one burst of `op` on 1420-byte packets.
fn burst(mut op: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..BURST {
        op();
    }
    gbps(BURST * SIZE, t.elapsed().as_secs_f64())
}

/// Gbit/s of `open` over a batch of datagrams made beforehand (untimed).
fn burst_over(batch: &[Vec<u8>], mut open: impl FnMut(&[u8])) -> f64 {
    let t = Instant::now();
    for d in batch {
        open(d);
    }
    gbps(batch.len() * SIZE, t.elapsed().as_secs_f64())
}

struct Rig {
    pkt: Vec<u8>,
    ring: LessSafeKey,
    ring_counter: u64,
    ours: (NoisePeer, NoisePeer, Instant),
    theirs: (Tunn, Tunn),
}

impl Rig {
    fn new() -> Rig {
        Rig {
            pkt: packet(),
            ring: LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key()).unwrap()),
            ring_counter: 0,
            ours: ours(),
            theirs: theirs(),
        }
    }

    fn ring_seal(&mut self, buf: &mut [u8]) -> usize {
        self.ring_counter += 1;
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.ring_counter.to_le_bytes());
        buf[..SIZE].copy_from_slice(&self.pkt);
        let tag = self
            .ring
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::empty(),
                &mut buf[..SIZE],
            )
            .unwrap();
        buf[SIZE..SIZE + 16].copy_from_slice(tag.as_ref());
        SIZE + 16
    }
}

fn ours_seal(a: &mut NoisePeer, now: Instant, pkt: &[u8], out: &mut [u8]) -> usize {
    match a.encapsulate(now, pkt, out) {
        Ok(Output::Transmit(d)) => d.len(),
        _ => panic!("ours: no session"),
    }
}

fn theirs_seal(a: &mut Tunn, pkt: &[u8], out: &mut [u8]) -> usize {
    match a.encapsulate(pkt, out) {
        TunnResult::WriteToNetwork(d) => d.len(),
        _ => panic!("boringtun: no session"),
    }
}

fn bench(c: &mut Criterion) {
    let mut rig = Rig::new();
    let Rig {
        pkt,
        ours: (oa, ob, now),
        theirs: (ta, tb),
        ..
    } = &mut rig;
    let (pkt, now) = (pkt.clone(), *now);
    let mut out = vec![0u8; 2048];
    let mut o = vec![0u8; 2048];
    let mut g = c.benchmark_group("noise 1420-byte packets");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.bench_function("ours encapsulate", |b| {
        b.iter(|| black_box(ours_seal(oa, now, &pkt, &mut out)))
    });
    g.bench_function("boringtun encapsulate", |b| {
        b.iter(|| black_box(theirs_seal(ta, &pkt, &mut out)))
    });
    g.bench_function("ours decapsulate", |b| {
        b.iter_batched(
            || {
                let mut d = vec![0u8; 2048];
                let n = ours_seal(oa, now, &pkt, &mut d);
                d.truncate(n);
                d
            },
            |d| matches!(ob.decapsulate(now, &d, &mut o), Ok(Output::Deliver { .. })),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("boringtun decapsulate", |b| {
        b.iter_batched(
            || {
                let mut d = vec![0u8; 2048];
                let n = theirs_seal(ta, &pkt, &mut d);
                d.truncate(n);
                d
            },
            |d| {
                matches!(
                    tb.decapsulate(None, &d, &mut o),
                    TunnResult::WriteToTunnelV4(..)
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // The summary. The machine is shared, so rates are sampled in short interleaved
    // bursts (64 packets each, every column in turn, many rounds) and each column keeps
    // its best burst: the rate of one core when nothing else runs on it.
    let ring_open_key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[9u8; 32]).unwrap());
    let mut sealed = vec![0u8; SIZE + 16];
    sealed[..SIZE].copy_from_slice(&pkt);
    let tag = ring_open_key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::empty(),
            &mut sealed[..SIZE],
        )
        .unwrap();
    sealed[SIZE..].copy_from_slice(tag.as_ref());
    let mut best = [0f64; 6];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        best[0] = best[0].max(burst(|| {
            black_box(rig.ring_seal(&mut out));
        }));
        // Like a decapsulation: a read-only datagram, copied in and opened.
        let batch: Vec<Vec<u8>> = (0..BURST).map(|_| sealed.clone()).collect();
        best[1] = best[1].max(burst_over(&batch, |d| {
            out[..SIZE + 16].copy_from_slice(d);
            let ok = ring_open_key
                .open_in_place(
                    Nonce::assume_unique_for_key([0; 12]),
                    Aad::empty(),
                    &mut out[..SIZE + 16],
                )
                .is_ok();
            assert!(ok);
        }));
        let Rig {
            ours: (oa, ob, _),
            theirs: (ta, tb),
            ..
        } = &mut rig;
        best[2] = best[2].max(burst(|| {
            black_box(ours_seal(oa, now, &pkt, &mut out));
        }));
        best[3] = best[3].max(burst(|| {
            black_box(theirs_seal(ta, &pkt, &mut out));
        }));
        let batch: Vec<Vec<u8>> = (0..BURST)
            .map(|_| {
                let mut d = vec![0u8; 2048];
                let n = ours_seal(oa, now, &pkt, &mut d);
                d.truncate(n);
                d
            })
            .collect();
        best[4] = best[4].max(burst_over(&batch, |d| {
            let r = ob.decapsulate(now, d, &mut o);
            assert!(matches!(r, Ok(Output::Deliver { .. })));
        }));
        let batch: Vec<Vec<u8>> = (0..BURST)
            .map(|_| {
                let mut d = vec![0u8; 2048];
                let n = theirs_seal(ta, &pkt, &mut d);
                d.truncate(n);
                d
            })
            .collect();
        best[5] = best[5].max(burst_over(&batch, |d| {
            let r = tb.decapsulate(None, d, &mut o);
            assert!(matches!(r, TunnResult::WriteToTunnelV4(..)));
        }));
    }
    let [seal, open, oe, te, od, td] = best;
    println!();
    println!("one core, 1420-byte packets, best of interleaved 64-packet bursts over 6 s:");
    println!("  ring chacha20-poly1305 copy+seal     {seal:6.2} Gbit/s");
    println!("  ring chacha20-poly1305 copy+open     {open:6.2} Gbit/s");
    println!(
        "  ours      encapsulate {oe:6.2} Gbit/s  {:5.1}% of ring seal, {:.2}x boringtun",
        oe / seal * 100.0,
        oe / te
    );
    println!(
        "  boringtun encapsulate {te:6.2} Gbit/s  {:5.1}% of ring seal",
        te / seal * 100.0
    );
    println!(
        "  ours      decapsulate {od:6.2} Gbit/s  {:5.1}% of ring open, {:.2}x boringtun",
        od / open * 100.0,
        od / td
    );
    println!(
        "  boringtun decapsulate {td:6.2} Gbit/s  {:5.1}% of ring open",
        td / open * 100.0
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
