//! Detaching the way wireguard-go does: the command re-executes itself as a child in
//! a new session, and waits on a pipe until the child says the interface and its API
//! socket exist (exit 0) or why they could not be made (exit 1 with that reason).
//!
//! Re-executing, rather than forking, keeps the decision before any thread exists:
//! a fork of a multi-threaded tokio process may leave locks held by threads that are
//! not there any more.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Names the descriptor the parent waits on; set only in the detached child.
pub const READY_FD_ENV: &str = "SIDECAR_WG_READY_FD";

/// The descriptor number the child finds the pipe at.
const CHILD_FD: RawFd = 3;

const READY: &[u8] = b"ready\n";

/// The child's end of the readiness pipe.
pub struct Readiness {
    pipe: std::fs::File,
}

impl Readiness {
    /// The pipe this process was started with, if it is the detached child. The
    /// variable is removed so nothing this process starts inherits it.
    pub fn from_env() -> Option<Readiness> {
        let fd: RawFd = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
        // Called before the runtime starts, while this is the only thread.
        std::env::remove_var(READY_FD_ENV);
        // SAFETY: the parent put the pipe's write end at this descriptor for us alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_cloexec(fd.as_raw_fd());
        Some(Readiness {
            pipe: std::fs::File::from(fd),
        })
    }

    /// Tells the parent the interface is up; it exits 0.
    pub fn ready(mut self) {
        let _ = self.pipe.write_all(READY);
    }

    /// Tells the parent why the interface could not be brought up; it prints this
    /// and exits 1.
    pub fn fail(mut self, reason: &str) {
        let _ = self.pipe.write_all(reason.as_bytes());
    }
}

/// Starts this program again, detached, with the same arguments, and waits until it
/// is ready or has failed. `stderr` is what the child logs to (null when it should
/// be silent). Returns the reason on failure.
pub fn spawn_detached(stderr: Stdio) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (read, write) = pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
    let write_fd = write.as_raw_fd();
    let mut cmd = Command::new(&exe);
    cmd.args(&args)
        .env(READY_FD_ENV, CHILD_FD.to_string())
        .current_dir(Path::new("/"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if write_fd == CHILD_FD {
                // dup2 onto itself keeps close-on-exec; clear it instead.
                if libc::fcntl(CHILD_FD, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(write_fd, CHILD_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    // Only the child may hold the write end now, so end of file means it is done
    // talking: ready, failed, or dead.
    drop(write);
    let mut said = Vec::new();
    let _ = std::fs::File::from(read).read_to_end(&mut said);
    if said == READY {
        return Ok(());
    }
    let status = child.wait();
    let said = String::from_utf8_lossy(&said).trim().to_string();
    if !said.is_empty() {
        return Err(said);
    }
    Err(match status {
        Ok(s) => format!("the background process ended before it was ready ({s})"),
        Err(e) => format!("the background process ended before it was ready: {e}"),
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}
