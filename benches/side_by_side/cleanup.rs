//! Ctrl-C and SIGTERM: the guards that remove namespaces and stop processes run on
//! drop, which a signal's default action skips. A watcher thread takes the signals
//! instead and removes what this process created, found by the process id that every
//! name embeds (see `unique_name`), then exits.

use std::path::Path;
use std::process::Command;

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread spawned after it)
/// and starts the thread that waits for them. Must run before any other thread starts.
/// Children are unaffected: `std::process::Command` clears the signal mask in them.
pub fn on_signal_remove_leftovers() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask only
    // changes this thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        assert_eq!(rc, 0, "pthread_sigmask: {rc}");
        set
    };
    std::thread::spawn(move || {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is a valid signal set and `signal` a valid out-pointer.
        let rc = unsafe { libc::sigwait(&set, &mut signal) };
        assert_eq!(rc, 0, "sigwait: {rc}");
        eprintln!("side_by_side: signal {signal}, removing this run's namespaces and sockets");
        remove_leftovers();
        std::process::exit(128 + signal);
    });
}

/// Whether `name` is `<letters><pid>x<digits>`, the shape of a name made by
/// `unique_name` in this process.
fn is_ours(name: &str, pid: &str) -> bool {
    let rest = name.trim_start_matches(|c: char| c.is_ascii_lowercase());
    rest.strip_prefix(pid)
        .and_then(|r| r.strip_prefix('x'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn remove_leftovers() {
    let pid = std::process::id().to_string();
    let listed = Command::new("ip").args(["netns", "list"]).output();
    let names = listed
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for ns in names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| is_ours(n, &pid))
    {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<libc::pid_t>() {
                    // SAFETY: kill(2) of a process inside a namespace this run created.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    for (dir, suffix) in [("/var/run/wireguard", ".sock"), ("/tmp", "")] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = if suffix.is_empty() {
                // Scratch directories are `sidecar-t<pid>x<n>`.
                name.strip_prefix("sidecar-")
            } else {
                name.strip_suffix(suffix)
            };
            if stem.is_some_and(|s| is_ours(s, &pid)) {
                let path = Path::new(dir).join(&name);
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
    }
}
