//! `sidecar-wg` as a drop-in for wireguard-go: started as `sidecar-wg IFNAME`, driven
//! only by `wg`, `ip` and wg-quick, against Debian's wireguard-go in another namespace.

mod support;

use std::time::{Duration, Instant};

use support::sidecar_wg::{daemons_in, run_detached, SidecarWg};
use support::wg::uapi_socket;
use support::{require_tools, wait_until, Netns, TempDir, BASE_TOOLS};

fn require() {
    require_tools(BASE_TOOLS);
}

#[test]
fn detaches_once_ready_and_exits_when_the_interface_is_deleted() {
    require();
    let ns = Netns::new();
    let wg = SidecarWg::start(&ns);
    let link = ns.ip(&format!("link show {}", wg.iface));
    assert!(link.contains(&wg.iface), "no interface after start: {link}");
    let shown = ns.exec(&format!("wg show {}", wg.iface));
    assert!(shown.contains("listening port"), "wg show: {shown}");

    // A second daemon for the same name is refused with a reason, and the first keeps
    // its interface and socket.
    let log = TempDir::new();
    let again = run_detached(&ns, &wg.iface, &log.join("log"));
    assert!(
        !again.status.success(),
        "a second sidecar-wg {} started",
        wg.iface
    );
    let reason = String::from_utf8_lossy(&again.stderr);
    assert!(
        reason.contains("error:") && reason.contains(&wg.iface),
        "no reason given: {reason}"
    );
    assert!(wg.is_running() && uapi_socket(&wg.iface).exists());

    let deleted = Instant::now();
    ns.ip(&format!("link del {}", wg.iface));
    assert!(
        wait_until(Duration::from_secs(1), || !wg.is_running()),
        "daemon still running 1 s after `ip link del`:\n{}",
        wg.log_tail(20)
    );
    assert!(
        !uapi_socket(&wg.iface).exists(),
        "socket left behind after the interface was deleted"
    );
    assert!(daemons_in(&ns).is_empty());
    eprintln!("daemon gone {:?} after ip link del", deleted.elapsed());
}

#[test]
fn sigterm_removes_the_interface_and_socket() {
    require();
    let ns = Netns::new();
    let wg = SidecarWg::start(&ns);
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(wg.pid as libc::pid_t, libc::SIGTERM) };
    assert!(
        wait_until(Duration::from_secs(3), || !wg.is_running()),
        "daemon ignored SIGTERM"
    );
    assert!(!uapi_socket(&wg.iface).exists(), "socket left behind");
    let links = ns.ip("link show");
    assert!(!links.contains(&wg.iface), "interface left behind: {links}");
}
