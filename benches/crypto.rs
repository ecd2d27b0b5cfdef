//! Per-core cost of the engine's hot path: encapsulating and decapsulating 1420-byte
//! packets through the peer table, beside the bare ChaCha20-Poly1305 ceiling of
//! this machine (ring, the same implementation boringtun uses). The summary runs
//! both noise backends: ours (the default) and boringtun's `Tunn`.

use std::net::SocketAddr;
use std::time::Instant;

use sidecar::wg::Output;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use sidecar::wg::{Device, DeviceConfig, NoiseBackend, PeerConfig};
use sidecar::Key;

const SIZE: usize = 1420;

fn endpoint(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Two devices on `backend` with an established session, A -> B.
fn established(backend: NoiseBackend) -> (Device, Device) {
    let (ka, kb) = (Key::generate_private(), Key::generate_private());
    let device = |key| {
        Device::with_config(&DeviceConfig {
            noise_backend: backend,
            ..DeviceConfig::new(key)
        })
    };
    let (a, b) = (device(ka), device(kb));
    let mut to_b = PeerConfig::new(kb.public_key());
    to_b.endpoint = Some(endpoint("192.0.2.2:51820"));
    to_b.allowed_ips = vec!["198.51.100.2/32".parse().unwrap()];
    a.set_peer(&to_b);
    let mut to_a = PeerConfig::new(ka.public_key());
    to_a.endpoint = Some(endpoint("192.0.2.1:51820"));
    to_a.allowed_ips = vec!["198.51.100.1/32".parse().unwrap()];
    b.set_peer(&to_a);

    let now = Instant::now();
    let mut buf = vec![0u8; 2048];
    let Output::Transmit { datagram, .. } = a.handle_packet(now, &packet(), &mut buf) else {
        panic!("no handshake initiation")
    };
    let init = datagram.to_vec();
    let Output::Transmit { datagram, .. } =
        b.handle_datagram(now, endpoint("192.0.2.1:51820"), &init, &mut buf)
    else {
        panic!("no handshake response")
    };
    let resp = datagram.to_vec();
    let _ = a.handle_datagram(now, endpoint("192.0.2.2:51820"), &resp, &mut buf);
    while a.poll_transmit(now, &mut buf).is_some() {}
    (a, b)
}

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

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e9
}

/// Measures one core's rate for `op` over roughly half a second, in Gbit/s.
fn rate(mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed().as_millis() < 500 {
        for _ in 0..1000 {
            op();
        }
        n += 1000;
    }
    gbps(n * SIZE, start.elapsed().as_secs_f64())
}

fn bench(c: &mut Criterion) {
    let (a, b) = established(NoiseBackend::Sidecar);
    // One `now` per batch, as the driver feeds it: a fixed one here.
    let now = Instant::now();
    let pkt = packet();
    let mut out = vec![0u8; 2048];
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).unwrap());
    let mut raw = vec![0u8; SIZE];

    let mut g = c.benchmark_group("1420-byte packets");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("chacha20-poly1305 seal (ceiling)", |bench| {
        let mut counter = 0u64;
        bench.iter(|| {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_le_bytes());
            key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut raw,
            )
            .unwrap()
        })
    });
    g.bench_function("encapsulate", |bench| {
        bench.iter(|| {
            matches!(
                a.handle_packet(now, &pkt, &mut out),
                Output::Transmit { .. }
            )
        })
    });
    g.bench_function("decapsulate", |bench| {
        bench.iter_batched(
            || {
                let mut d = vec![0u8; SIZE + 32];
                let Output::Transmit { datagram, .. } = a.handle_packet(now, &pkt, &mut d) else {
                    panic!("encapsulate failed")
                };
                let n = datagram.len();
                d.truncate(n);
                d
            },
            |d| {
                let mut o = [0u8; 2048];
                matches!(
                    b.handle_datagram(now, endpoint("192.0.2.1:51820"), &d, &mut o),
                    Output::Deliver(_)
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // The summary the issue asks for: engine rates beside the cipher's ceiling.
    let mut counter = 0u64;
    let ceiling = rate(|| {
        counter += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&counter.to_le_bytes());
        let _ = key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut raw,
        );
    });
    println!();
    println!("one core, 1420-byte packets:");
    println!("  chacha20-poly1305 ceiling {ceiling:6.2} Gbit/s");
    for backend in [NoiseBackend::Sidecar, NoiseBackend::Boringtun] {
        let (a, b) = established(backend);
        let (encap, decap) = rates(&a, &b, now, &pkt);
        println!(
            "  {backend:?} encapsulate   {encap:6.2} Gbit/s  ({:.0}% of ceiling)",
            encap / ceiling * 100.0
        );
        println!(
            "  {backend:?} decapsulate   {decap:6.2} Gbit/s  ({:.0}% of ceiling)",
            decap / ceiling * 100.0
        );
    }
}

/// Encapsulate and decapsulate rates A -> B on one core, Gbit/s.
fn rates(a: &Device, b: &Device, now: Instant, pkt: &[u8]) -> (f64, f64) {
    let mut out = vec![0u8; 2048];
    let encap = rate(|| {
        let _ = a.handle_packet(now, pkt, &mut out);
    });
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    let mut o = vec![0u8; 2048];
    // Time the decapsulations alone on a fresh set.
    let mut total = 0.0;
    let mut n = 0usize;
    while total < 0.5 {
        datagrams.clear();
        for _ in 0..1000 {
            if let Output::Transmit { datagram, .. } = a.handle_packet(now, pkt, &mut out) {
                datagrams.push(datagram.to_vec());
            }
        }
        let t = Instant::now();
        for d in &datagrams {
            let _ = b.handle_datagram(now, endpoint("192.0.2.1:51820"), d, &mut o);
        }
        total += t.elapsed().as_secs_f64();
        n += datagrams.len();
    }
    (encap, gbps(n * SIZE, total))
}

criterion_group!(benches, bench);
criterion_main!(benches);
