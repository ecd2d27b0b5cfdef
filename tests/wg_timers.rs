//! WireGuard's session timers on real time: sidecar-agent against Debian's wireguard-go,
//! with pings flowing. The initiator renews its session after REKEY_AFTER_TIME (120 s)
//! without a gap in traffic; a session that cannot be renewed stops carrying data at
//! REJECT_AFTER_TIME (180 s) and the tunnel recovers once handshakes get through again.
//!
//! The engine uses boringtun's own clock, so these tests wait for real. They live in their
//! own file and run in parallel with each other, so the file takes about 3.5 minutes.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::traffic::ping_until_reply;
use support::{
    inner, ping_with, require_tools, wait_until, Endpoints, Family, Netns, Pair, Tunnel, BASE_TOOLS,
};

const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack for a loaded 2-core machine: the timers tick every 100 ms and handshakes are
/// retried every 5 s, but threads may be descheduled for seconds.
const SLACK: Duration = Duration::from_secs(25);
/// Interval of the background pings, and the longest run of lost ones still counted as
/// "traffic never stopped" (a session change loses none; an expired session would
/// lose every ping until a new handshake, at least one round of it).
const PING_INTERVAL: &str = "0.2";
const MAX_LOST_IN_A_ROW: u32 = 10;

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(&["nft"]);
}

/// An nftables table in `ns` that counts WireGuard handshake messages (by their first
/// byte: 1 initiation, 2 response, 3 cookie reply) going out and coming in, and drops
/// them while blocked. Removed with the namespace.
struct HandshakeFilter<'ns> {
    ns: &'ns Netns,
    table: String,
}

impl<'ns> HandshakeFilter<'ns> {
    fn install(ns: &'ns Netns) -> Self {
        let table = support::unique_name("wgt");
        ns.exec_with_stdin(
            "nft -f -",
            &format!(
                "table inet {table} {{
                   counter initiations_out {{ }}
                   set blocked {{ type inet_proto; }}
                   chain out {{
                     type filter hook output priority 0; policy accept;
                     udp length > 8 @th,64,8 1 counter name initiations_out
                     meta l4proto @blocked udp length > 8 @th,64,8 {{ 1, 2, 3 }} drop
                   }}
                   chain in {{
                     type filter hook input priority 0; policy accept;
                     meta l4proto @blocked udp length > 8 @th,64,8 {{ 1, 2, 3 }} drop
                   }}
                 }}"
            ),
        );
        HandshakeFilter { ns, table }
    }

    fn block(&self) {
        self.ns.exec(&format!(
            "nft add element inet {} blocked {{ udp }}",
            self.table
        ));
    }

    fn unblock(&self) {
        self.ns.exec(&format!(
            "nft delete element inet {} blocked {{ udp }}",
            self.table
        ));
    }

    /// Handshake initiations this namespace sent.
    fn initiations_sent(&self) -> u64 {
        let out = self.ns.exec(&format!(
            "nft list counter inet {} initiations_out",
            self.table
        ));
        out.split("packets ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {out}"))
    }
}

/// The latest handshake (seconds since the epoch) each side reports for the other.
fn handshakes(t: &Tunnel) -> (u64, u64) {
    let agent = t
        .agent
        .peer(&t.wggo_keys.public)
        .map(|p| p.latest_handshake);
    let wggo = t
        .wggo
        .peer(&t.agent_keys.public)
        .map(|p| p.latest_handshake);
    (agent.unwrap_or(0), wggo.unwrap_or(0))
}

/// Longest run of consecutive echo requests without a reply in `ping` output.
fn longest_loss(output: &str, transmitted: u32) -> u32 {
    let answered: BTreeSet<u32> = output
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    let (mut run, mut longest) = (0, 0);
    for seq in 1..=transmitted {
        if answered.contains(&seq) {
            run = 0;
        } else {
            run += 1;
            longest = longest.max(run);
        }
    }
    longest
}

/// Brings the tunnel up with the agent as the only side that can initiate, so the agent
/// holds the initiator's role for the first session.
fn tunnel_up(pair: &Pair) -> Tunnel<'_> {
    let t = Tunnel::new(pair, Family::V4, Endpoints::AgentOnly);
    assert!(
        ping_until_reply(&pair.a, inner(Family::V4, 2), HANDSHAKE_TIMEOUT),
        "no first handshake; agent log:\n{}",
        t.agent.log()
    );
    t
}

#[test]
fn initiator_rekeys_after_120_seconds_without_interrupting_traffic() {
    require();
    let pair = Pair::new();
    let filter = HandshakeFilter::install(&pair.a);
    let t = tunnel_up(&pair);
    let session_start = Instant::now();
    let first = handshakes(&t);
    assert!(
        first.0 > 0 && first.1 > 0,
        "handshake not recorded: {first:?}"
    );
    assert_eq!(
        filter.initiations_sent(),
        1,
        "one initiation for the first session"
    );

    // Pings run past the rekey; the session it replaces must carry them until the new one
    // takes over.
    let deadline = REKEY_AFTER_TIME + SLACK;
    let pinger = std::thread::scope(|s| {
        let pinger = s.spawn(|| {
            ping_with(
                &pair.a,
                inner(Family::V4, 2),
                &format!("-i {PING_INTERVAL} -W 2 -w {}", deadline.as_secs() + 5),
            )
        });
        let rekeyed = wait_until(deadline, || {
            // `wg show` twice per poll: no need to poll faster than the clock it reports.
            std::thread::sleep(Duration::from_millis(500));
            let now = handshakes(&t);
            now.0 > first.0 && now.1 > first.1
        });
        let elapsed = session_start.elapsed();
        assert!(
            rekeyed,
            "no new handshake within {deadline:?} of the first; handshakes {:?}, agent log:\n{}",
            handshakes(&t),
            t.agent.log()
        );
        // Not early: 120 s by the engine's clock, less however long the first ping took.
        assert!(
            elapsed >= REKEY_AFTER_TIME - Duration::from_secs(5),
            "rekeyed after only {elapsed:?}"
        );
        pinger.join().expect("ping thread")
    });

    assert_eq!(
        filter.initiations_sent(),
        2,
        "the agent, the first session's initiator, sent the second initiation"
    );
    let lost = longest_loss(&pinger.output, pinger.transmitted);
    assert!(
        pinger.transmitted > 100 && lost <= MAX_LOST_IN_A_ROW,
        "traffic stopped across the rekey: {lost} pings lost in a row of {} sent",
        pinger.transmitted
    );
    // And the new session carries traffic both ways.
    assert!(ping_with(&pair.b, inner(Family::V4, 1), "-c 3 -i 0.2 -W 2").all_received());
}

#[test]
fn session_without_rekey_stops_carrying_data_after_180_seconds() {
    require();
    let pair = Pair::new();
    let filter = HandshakeFilter::install(&pair.a);
    let t = tunnel_up(&pair);
    let session_start = Instant::now();
    let first = handshakes(&t);
    filter.block();
    let to_wggo = inner(Family::V4, 2);
    // The block does not touch data.
    assert!(ping_with(&pair.a, to_wggo, "-c 3 -i 0.2 -W 2").all_received());

    // Data the initiator sends on a session past REKEY_AFTER_TIME makes it rekey (as
    // the kernel and wireguard-go do; boringtun also rekeys at that age without it).
    // Every attempt is dropped, yet the old session still carries data until
    // REJECT_AFTER_TIME.
    let rekey_due = REKEY_AFTER_TIME + Duration::from_secs(2);
    std::thread::sleep(rekey_due.saturating_sub(session_start.elapsed()));
    assert!(ping_with(&pair.a, to_wggo, "-c 2 -i 0.2 -W 2").all_received());
    let still_valid = REKEY_AFTER_TIME + Duration::from_secs(20);
    std::thread::sleep(still_valid.saturating_sub(session_start.elapsed()));
    assert!(
        filter.initiations_sent() >= 2,
        "the agent tried no rekey by {still_valid:?}"
    );
    let before_reject = ping_with(&pair.a, to_wggo, "-c 5 -i 0.2 -W 2");
    assert!(
        before_reject.received >= 3,
        "the session stopped before REJECT_AFTER_TIME ({:?} in):\n{}",
        session_start.elapsed(),
        before_reject.output
    );
    assert_eq!(handshakes(&t), first, "a handshake got through the block");

    // After REJECT_AFTER_TIME neither side sends with, nor accepts, the old keys.
    let expired = REJECT_AFTER_TIME + Duration::from_secs(5);
    std::thread::sleep(expired.saturating_sub(session_start.elapsed()));
    let agent_rx = t.agent.peer(&t.wggo_keys.public).expect("peer").rx_bytes;
    let after_reject = ping_with(&pair.a, to_wggo, "-c 10 -i 0.2 -W 1");
    assert_eq!(
        after_reject.received,
        0,
        "data still flows {:?} after the session began:\n{}",
        session_start.elapsed(),
        after_reject.output
    );
    let from_wggo = ping_with(&pair.b, inner(Family::V4, 1), "-c 5 -i 0.2 -W 1");
    assert_eq!(from_wggo.received, 0, "data still flows the other way");
    assert_eq!(
        t.agent.peer(&t.wggo_keys.public).expect("peer").rx_bytes,
        agent_rx,
        "the agent received data on an expired session"
    );
    // The agent forgets an expired session's handshake time (reports 0); wireguard-go
    // keeps it. Neither may have a newer one.
    let blocked = handshakes(&t);
    assert!(
        blocked.0 <= first.0 && blocked.1 == first.1,
        "a handshake got through the block: {blocked:?}, first {first:?}"
    );

    // Once handshakes pass again, a new session carries traffic.
    filter.unblock();
    assert!(
        ping_until_reply(&pair.a, to_wggo, Duration::from_secs(30)),
        "no recovery after unblocking handshakes; agent log:\n{}",
        t.agent.log()
    );
    let now = handshakes(&t);
    assert!(
        now.0 > first.0 && now.1 > first.1,
        "no new handshake: {now:?}"
    );
    assert!(ping_with(&pair.b, inner(Family::V4, 1), "-c 3 -i 0.2 -W 2").all_received());
}
