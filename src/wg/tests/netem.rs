//! Network emulation through the device: time moves only as the test says, and
//! every release is found through [`Device::poll_timeout`], as a driver finds it.

use super::*;
use crate::netem::{Conditions, Spread};

fn conditions(latency_ms: u64, jitter_ms: u64, loss: f64) -> Conditions {
    Conditions::new(
        Duration::from_millis(latency_ms),
        Duration::from_millis(jitter_ms),
        Spread::Uniform,
        loss,
    )
    .unwrap()
}

fn numbered(i: u32) -> Vec<u8> {
    let mut payload = vec![0u8; 200];
    payload[..4].copy_from_slice(&i.to_be_bytes());
    ipv4("198.51.100.1", "198.51.100.2", &payload)
}

fn seq_of(pkt: &[u8]) -> u32 {
    u32::from_be_bytes(pkt[20..24].try_into().unwrap())
}

const SLACK: Duration = Duration::from_nanos(crate::wg::emulation::RELEASE_SLACK_NS);

/// What B's link gets from a datagram A sent.
fn at_b(p: &Pair, datagram: &[u8]) -> Vec<u8> {
    match deliver(&p.b, sa(A_ADDR), datagram).remove(0) {
        Out::Tun(pkt) => pkt,
        other => panic!("B could not decrypt a delayed packet: {other:?}"),
    }
}

/// Moves time to each deadline A names until `until`, and returns what A sent
/// and delivered, with the time it went.
fn release_until(dev: &Device, until: Instant) -> Vec<(Instant, Out)> {
    let mut got = Vec::new();
    while let Some(next) = dev.poll_timeout().filter(|t| *t <= until) {
        assert!(next >= now(), "a deadline in the past was left undrained");
        NOW.with(|n| n.set(Some(next)));
        got.extend(drain(dev).into_iter().map(|o| (next, o)));
    }
    NOW.with(|n| n.set(Some(until)));
    got
}

#[test]
fn a_packet_is_held_exactly_the_latency_each_way() {
    let p = pair();
    handshake(&p);
    assert!(p
        .a
        .set_peer_conditions(&p.b_key, Some(conditions(50, 0, 0.0))));
    assert_eq!(p.a.peer_conditions(&p.b_key), Some(conditions(50, 0, 0.0)));
    assert!(!p.a.set_peer_conditions(&p.a_key, None), "no such peer");

    // Towards the peer.
    let sent = now();
    assert!(matches!(send(&p.a, &numbered(1)), Out::Consumed));
    assert!(drain(&p.a).is_empty(), "released before its time");
    // Released half a timer tick early, so a driver's rounded-up wake-up lands on
    // the wanted time on average.
    let held = Duration::from_millis(50) - SLACK;
    assert_eq!(p.a.poll_timeout(), Some(sent + held));
    NOW.with(|n| n.set(Some(sent + held - Duration::from_nanos(1))));
    assert!(drain(&p.a).is_empty(), "released a nanosecond early");
    let got = release_until(&p.a, sent + Duration::from_millis(60));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0 - sent, held);
    let Out::Net(_, datagram) = &got[0].1 else {
        panic!("expected a datagram, got {:?}", got[0].1)
    };
    assert_eq!(seq_of(&at_b(&p, datagram)), 1);

    // From the peer: decrypted now, written to the link 50 ms later.
    let back = ipv4("198.51.100.2", "198.51.100.1", &[7; 100]);
    let (_, datagram) = net(send(&p.b, &back));
    let arrived = now();
    let outs = deliver(&p.a, sa(B_ADDR), &datagram);
    assert!(matches!(outs[..], [Out::Consumed]), "{outs:?}");
    let got = release_until(&p.a, arrived + Duration::from_millis(100));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0 - arrived, held);
    assert!(matches!(&got[0].1, Out::Tun(pkt) if *pkt == back));

    // Cleared: nothing waits any more.
    assert!(p.a.set_peer_conditions(&p.b_key, None));
    assert_eq!(p.a.peer_conditions(&p.b_key), None);
    assert!(matches!(send(&p.a, &numbered(2)), Out::Net(..)));
    assert_eq!(p.a.poll_timeout().filter(|t| *t <= now()), None);
}

#[test]
fn loss_rate_is_within_bounds_in_each_direction() {
    let p = pair();
    handshake(&p);
    assert!(p
        .a
        .set_peer_conditions(&p.b_key, Some(conditions(0, 0, 0.05))));
    let mut passed = 0;
    for i in 0..10_000u32 {
        match send(&p.a, &numbered(i)) {
            Out::Net(..) => passed += 1,
            Out::Dropped(DropReason::EmulatedLoss) => {}
            other => panic!("{other:?}"),
        }
    }
    let lost_out = p.a.dropped(DropReason::EmulatedLoss);
    assert_eq!(passed + lost_out, 10_000);
    // 500 expected; the binomial's deviation is about 22.
    assert!((400..=600).contains(&lost_out), "{lost_out} of 10000 lost");

    let mut delivered = 0;
    for _ in 0..10_000u32 {
        let (_, d) = net(send(&p.b, &ipv4("198.51.100.2", "198.51.100.1", &[1; 64])));
        if matches!(deliver(&p.a, sa(B_ADDR), &d)[0], Out::Tun(_)) {
            delivered += 1;
        }
    }
    let lost_in = p.a.dropped(DropReason::EmulatedLoss) - lost_out;
    assert_eq!(delivered + lost_in, 10_000);
    assert!((400..=600).contains(&lost_in), "{lost_in} of 10000 lost");
    let mut metrics = String::new();
    p.a.write_metrics(now(), std::time::SystemTime::now(), &mut metrics);
    let line = format!(
        "sidecar_dropped_total{{reason=\"netem_loss\"}} {}",
        lost_out + lost_in
    );
    assert!(metrics.contains(&line), "{metrics}");
}

#[test]
fn order_is_kept_without_jitter_even_when_the_latency_drops() {
    let p = pair();
    handshake(&p);
    assert!(p
        .a
        .set_peer_conditions(&p.b_key, Some(conditions(80, 0, 0.0))));
    let start = now();
    for i in 0..400u32 {
        if i == 200 {
            assert!(p
                .a
                .set_peer_conditions(&p.b_key, Some(conditions(10, 0, 0.0))));
        }
        assert!(matches!(send(&p.a, &numbered(i)), Out::Consumed));
        // All sent before the first is due, so nothing needs draining meanwhile.
        advance(Duration::from_micros(100));
    }
    let got = release_until(&p.a, start + Duration::from_secs(1));
    let order: Vec<u32> = got
        .iter()
        .map(|(_, o)| match o {
            Out::Net(_, d) => seq_of(&at_b(&p, d)),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        order,
        (0..400).collect::<Vec<_>>(),
        "delay reordered packets"
    );
    // The first 200 waited 80 ms each; the rest went no earlier than the last of them.
    assert_eq!(got[0].0 - start, Duration::from_millis(80) - SLACK);
    let last_slow = got[199].0;
    assert!(got[200..].iter().all(|(t, _)| *t >= last_slow));
}

#[test]
fn jitter_spreads_the_delay_and_may_reorder() {
    let p = pair();
    handshake(&p);
    assert!(p
        .a
        .set_peer_conditions(&p.b_key, Some(conditions(30, 10, 0.0))));
    let mut sent_at = Vec::new();
    for i in 0..500u32 {
        sent_at.push(now());
        assert!(matches!(send(&p.a, &numbered(i)), Out::Consumed));
        // All sent before the earliest can be due (20 ms).
        advance(Duration::from_micros(30));
    }
    let got = release_until(&p.a, now() + Duration::from_secs(1));
    assert_eq!(got.len(), 500);
    let mut reordered = 0;
    let mut last = 0;
    for (at, o) in &got {
        let Out::Net(_, d) = o else { panic!("{o:?}") };
        let seq = seq_of(&at_b(&p, d));
        let delay = *at - sent_at[seq as usize];
        assert!(
            (Duration::from_millis(20) - SLACK..=Duration::from_millis(40) - SLACK)
                .contains(&delay),
            "{delay:?}"
        );
        if seq < last {
            reordered += 1;
        }
        last = last.max(seq);
    }
    assert!(
        reordered > 0,
        "jitter above the gap between packets reorders"
    );
}

#[test]
fn delay_and_shaping_together_release_everything() {
    let p = pair();
    handshake(&p);
    assert!(p.a.set_peer_rate(&p.b_key, Some(8))); // 1 MB/s
    assert!(p
        .a
        .set_peer_conditions(&p.b_key, Some(conditions(20, 0, 0.0))));
    let start = now();
    for i in 0..40u32 {
        assert!(matches!(send(&p.a, &numbered(i)), Out::Consumed));
    }
    let got = release_until(&p.a, start + Duration::from_secs(1));
    let order: Vec<u32> = got
        .iter()
        .map(|(_, o)| match o {
            Out::Net(_, d) => seq_of(&at_b(&p, d)),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(order, (0..40).collect::<Vec<_>>());
    assert!(got
        .iter()
        .all(|(t, _)| *t - start >= Duration::from_millis(20) - SLACK));
}

/// Ping-like round trips through one tunnel's emulation: a request offered on the
/// way in and, if it got through, its reply on the way out. How many of `pings`
/// got no answer.
fn round_trips_lost(seed: u64, c: Conditions, pings: u32) -> u32 {
    let mut e = crate::netem::Emulation::new(c, seed);
    let packet = [0u8; 64];
    (0..pings)
        .filter(|i| {
            let t = u64::from(*i) * 2_000_000;
            let verdict = e.ingress.offer(t, &packet);
            verdict == crate::netem::Verdict::Lost
                || e.egress.offer(t, &packet) == crate::netem::Verdict::Lost
        })
        .count() as u32
}

#[test]
fn tunnels_to_one_peer_lose_different_packets() {
    // Every container an agent serves has the same peer, the relay.
    let relay = Key::generate_private().public_key();
    let a = Key::generate_private().public_key();
    let b = Key::generate_private().public_key();
    let seed_a = super::emulation::seed(Some(&a), &relay);
    let seed_b = super::emulation::seed(Some(&b), &relay);
    assert_ne!(seed_a, seed_b);
    assert_eq!(
        seed_a,
        super::emulation::seed(Some(&a), &relay),
        "runs repeat"
    );
    let c = conditions(0, 0, 0.05);
    let lost = |seed| {
        let mut line = crate::netem::DelayLine::new(c, seed);
        (0..2_000u32)
            .map(|i| line.offer(u64::from(i), &[0; 64]) == crate::netem::Verdict::Lost)
            .collect::<Vec<_>>()
    };
    let (la, lb) = (lost(seed_a), lost(seed_b));
    let both = la.iter().zip(&lb).filter(|(x, y)| **x && **y).count();
    // Independent at 5 %: 0.25 % of 2,000 (5) lost by both; the same pattern
    // would be about 100.
    assert!(both < 25, "{both} packets lost by both tunnels");
}

#[test]
fn round_trip_loss_over_many_tunnels_is_binomial() {
    // 5 % each way: a ping is lost with 1 - 0.95² = 9.75 %. Over 10,000 pings the
    // count is binomial (mean 975, deviation 29.7) only if the draws are
    // independent per packet and per direction; correlated draws would widen or
    // narrow the spread across tunnels, and a bias would move the mean.
    let relay = Key::generate_private().public_key();
    let c = conditions(0, 0, 0.05);
    let counts: Vec<f64> = (0..200)
        .map(|_| {
            let own = Key::generate_private().public_key();
            f64::from(round_trips_lost(
                super::emulation::seed(Some(&own), &relay),
                c,
                10_000,
            ))
        })
        .collect();
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<f64>() / n;
    let var = counts.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let p = 1.0 - 0.95f64.powi(2);
    let (want_mean, want_var) = (10_000.0 * p, 10_000.0 * p * (1.0 - p));
    // The mean of 200 counts deviates by 2.1; the sample variance by 10 %.
    assert!(
        (mean - want_mean).abs() < 10.0,
        "mean {mean}, want {want_mean}"
    );
    assert!(
        (0.6..1.5).contains(&(var / want_var)),
        "variance {var:.0}, binomial {want_var:.0}"
    );
}
