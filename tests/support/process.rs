//! Guards for child processes and scratch directories.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::{unique_name, wait_until};

/// A directory under the system temp dir, removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("sidecar-{}", unique_name("t")));
        std::fs::create_dir_all(&path).expect("create scratch dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A spawned process that is terminated and reaped on drop.
///
/// Output goes to files rather than pipes: a chatty process (an agent with `RUST_LOG=trace`)
/// would otherwise block on a full pipe that nobody drains.
pub struct ChildGuard {
    label: String,
    child: std::process::Child,
    status: Option<ExitStatus>,
    dir: TempDir,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured to files.
    pub fn spawn(label: &str, mut cmd: Command) -> Self {
        let dir = TempDir::new();
        let stdout = std::fs::File::create(dir.join("stdout")).expect("create stdout file");
        let stderr = std::fs::File::create(dir.join("stderr")).expect("create stderr file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label} ({cmd:?}): {e}"));
        ChildGuard {
            label: label.to_owned(),
            child,
            status: None,
            dir,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.try_wait().is_some());
        self.status
    }

    /// Asks the process to stop with SIGTERM, escalating to SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        if self.try_wait().is_none() {
            self.signal(libc::SIGTERM);
            if self.wait_timeout(grace).is_none() {
                let _ = self.child.kill();
                self.status = Some(self.child.wait().expect("wait after kill"));
            }
        }
        self.status.expect("process has exited")
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on a pid we spawned and have not reaped yet, so it cannot
        // have been recycled for an unrelated process.
        unsafe { libc::kill(pid, signal) };
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// The last `lines` lines of stderr, for failure messages.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let all = self.stderr();
        let v: Vec<&str> = all.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(3));
        if std::thread::panicking() {
            // The test harness shows this only for the failing test, which is when the
            // process log is needed to tell a harness bug from an engine bug.
            eprintln!(
                "---- {} ({:?}) stderr (last 60 lines) ----\n{}",
                self.label,
                self.status,
                self.stderr_tail(60)
            );
        }
    }
}

/// Runs `cmd` to completion and panics with its output unless it succeeds.
pub fn run_ok(mut cmd: Command) -> String {
    let out = output(&mut cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("command output is UTF-8")
}

/// Runs `cmd` to completion, whatever its exit status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// Runs `cmd` with `input` on stdin, whatever its exit status.
pub fn output_with_stdin(mut cmd: Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for command")
}

/// Runs `cmd` with `input` on stdin and panics unless it succeeds.
pub fn run_with_stdin(cmd: Command, input: &str) -> String {
    let what = format!("{cmd:?}");
    let out = output_with_stdin(cmd, input);
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("command output is UTF-8")
}

/// Splits a command line on whitespace; the harness never needs quoting.
pub fn command(cmdline: &str) -> Command {
    let mut parts = cmdline.split_whitespace();
    let mut cmd = Command::new(parts.next().expect("empty command line"));
    cmd.args(parts);
    cmd
}
