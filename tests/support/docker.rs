//! Real Docker for the agent's end-to-end tests, without a registry and without touching
//! the machine's own networking.
//!
//! - [`ensure_docker_installed`] installs Debian's `docker.io` when `dockerd` is missing
//!   (a fresh CI machine), with service start-up suppressed so no system daemon appears.
//! - [`busybox_rootfs`] builds a tiny image root from Debian's statically linked
//!   `busybox-static` (the plain `busybox` binary is dynamic and cannot start in it).
//! - [`Dockerd`] runs a private `dockerd` inside a test's network namespace, entered with
//!   `nsenter --net` (`ip netns exec` remounts /sys and hides the cgroup mounts dockerd
//!   needs), with its own data root, exec root, socket, pid file and cgroup parent, and
//!   removes all of it again on drop.
//!
//! The daemon runs with `--iptables=false`: the containers only need their address on the
//! default bridge (`docker0`, local to the namespace), and leaving iptables alone keeps
//! parallel daemons from sharing rules. A test that needs Docker's NAT or a published port
//! adds those nftables rules in its own namespace.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use super::netns::Netns;
use super::process::{self, ChildGuard, TempDir};
use super::{unique_name, wait_until};

/// Tools these helpers shell out to (besides what `docker.io` brings).
pub const DOCKER_TOOLS: &[&str] = &["nsenter", "apt-get", "dpkg-deb", "tar"];

/// How long a fresh daemon may take to answer on its socket.
const DAEMON_READY: Duration = Duration::from_secs(60);

/// Installs Debian's `docker.io` (dockerd, containerd, runc, the CLI) unless `dockerd` is
/// already there. Runs once per test process; apt's own lock (waited for) serializes it
/// with other processes.
///
/// The package's maintainer scripts would start a system-wide dockerd (with a `docker0`
/// bridge and iptables rules in the host's namespace); a temporary `policy-rc.d` denies
/// that, unless the machine already has a policy of its own.
pub fn ensure_docker_installed() {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut done = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    if !(in_path("dockerd") && docker_cli_available()) {
        let policy = Path::new("/usr/sbin/policy-rc.d");
        let ours = !policy.exists();
        if ours {
            write_executable(
                policy,
                "#!/bin/sh\n# sidecar tests: no services during install\nexit 101\n",
            );
        }
        let install = || apt_get(&["install", "-y", "--no-install-recommends", "docker.io"]);
        let ok = install() || (apt_get(&["update"]) && install());
        if ours {
            let _ = std::fs::remove_file(policy);
        }
        assert!(
            ok,
            "apt-get install docker.io failed (see the output above)"
        );
        assert!(
            in_path("dockerd") && docker_cli_available(),
            "docker.io is installed but dockerd or docker is still not in PATH"
        );
    }
    *done = true;
}

fn apt_get(args: &[&str]) -> bool {
    Command::new("apt-get")
        .args(["-q", "-o", "DPkg::Lock::Timeout=600"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {path:?}: {e}"));
}

fn in_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|dir| dir.join(tool).is_file())
}

fn docker_cli_available() -> bool {
    Path::new(DEBIAN_DOCKER_CLI).is_file() || in_path("docker")
}

/// The CLI from `docker.io`, of the same version as its daemon.
const DEBIAN_DOCKER_CLI: &str = "/usr/bin/docker";

fn docker_cli() -> &'static str {
    if Path::new(DEBIAN_DOCKER_CLI).is_file() {
        DEBIAN_DOCKER_CLI
    } else {
        "docker"
    }
}

/// gVisor's runtime, from Debian's `runsc` package.
pub const RUNSC: &str = "/usr/bin/runsc";

/// Installs Debian's `runsc` unless it is there. Once per test process, like
/// [`ensure_docker_installed`].
pub fn ensure_runsc_installed() {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut done = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if !*done && !Path::new(RUNSC).is_file() {
        let install = || apt_get(&["install", "-y", "--no-install-recommends", "runsc"]);
        assert!(
            install() || (apt_get(&["update"]) && install()),
            "apt-get install runsc failed (see the output above)"
        );
        assert!(
            Path::new(RUNSC).is_file(),
            "runsc installed but {RUNSC} missing"
        );
    }
    *done = true;
}

/// The program registered as the daemon's `runsc` runtime: runsc itself, run in a
/// private mount namespace where `/proc/sys/net` is hidden.
///
/// Debian's runsc (release 20221219) refuses sandbox networking with "cannot run with
/// network enabled in root network namespace" on kernels that show
/// `/proc/sys/net/core/rmem_default` in every network namespace (6.x; gVisor issue
/// 10704, fixed upstream in 2024): that file was its test for the root namespace. The
/// mount namespace is the runtime's own, so nothing else on the machine sees it.
fn runsc_runtime() -> PathBuf {
    static WRAPPER: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = WRAPPER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cached.as_ref() {
        return p.clone();
    }
    let dir = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    // One file for every test process (its content never changes), written under a
    // name of our own and renamed, so a daemon starting meanwhile never sees half of it.
    let path = dir.join("runsc-runtime");
    let scratch = dir.join(format!("runsc-runtime.{}", std::process::id()));
    write_executable(
        &scratch,
        &format!(
            r#"#!/bin/sh
exec unshare --mount --propagation private sh -c 'mount -t tmpfs sidecar-hide /proc/sys/net && exec {RUNSC} "$@"' runsc "$@"
"#
        ),
    );
    std::fs::rename(&scratch, &path).unwrap_or_else(|e| panic!("rename to {path:?}: {e}"));
    *cached = Some(path.clone());
    path
}

/// A root filesystem holding the static busybox and a symlink for each of its applets
/// (`sh`, `nc`, `httpd`, `ping`, `ip`, `sleep`, ...), plus `/www/index.html`.
///
/// Built once and cached under the target directory (`cargo clean` removes it); the
/// first call downloads `busybox-static` with `apt-get download` (running
/// `apt-get update` first if the package lists are missing).
pub fn busybox_rootfs() -> PathBuf {
    static ROOTFS: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = ROOTFS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cached.as_ref() {
        return p.clone();
    }
    let cache_root = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dest = cache_root.join("busybox-static-rootfs");
    if !dest.join("bin/busybox").is_file() {
        build_rootfs(&dest);
    }
    *cached = Some(dest.clone());
    dest
}

fn build_rootfs(dest: &Path) {
    let scratch = TempDir::new();
    let download = || {
        Command::new("apt-get")
            .args([
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                "download",
                "busybox-static",
            ])
            .current_dir(scratch.path())
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        download() || (apt_get(&["update"]) && download()),
        "apt-get download busybox-static failed"
    );
    let deb = std::fs::read_dir(scratch.path())
        .expect("read scratch dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("apt-get download left no .deb");
    let extracted = scratch.join("x");
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("-x").arg(&deb).arg(&extracted);
    process::run_ok(cmd);
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| extracted.join(p))
        .find(|p| p.is_file())
        .expect("busybox-static has no busybox binary");

    let root = scratch.join("rootfs");
    for dir in ["bin", "etc", "tmp", "proc", "sys", "dev", "www", "root"] {
        std::fs::create_dir_all(root.join(dir)).expect("create rootfs dir");
    }
    std::fs::copy(&busybox, root.join("bin/busybox")).expect("copy busybox");
    let list = process::run_ok({
        let mut c = Command::new(root.join("bin/busybox"));
        c.arg("--list");
        c
    });
    for applet in list.split_whitespace().filter(|a| *a != "busybox") {
        if applet.contains('/') || applet.starts_with('[') {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::fs::write(root.join("www/index.html"), "sidecar\n").expect("write index.html");
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .expect("write passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("write group");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777));
    }
    // Another test process may have finished first; either copy is as good.
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).expect("create cache dir");
    }
    if std::fs::rename(&root, dest).is_err() {
        assert!(
            dest.join("bin/busybox").is_file(),
            "cannot move the busybox rootfs to {dest:?}"
        );
    }
}

/// A private Docker daemon inside a test's network namespace, with the busybox image
/// imported. Drop removes every container, stops the daemon and removes its files,
/// mounts and cgroups.
pub struct Dockerd<'n> {
    ns: &'n Netns,
    /// Unique on this machine; names the exec root, socket, pid file and cgroup parent.
    pub name: String,
    /// The API socket (`unix://` + this for `-H`, or the agent's `--docker`).
    pub socket: PathBuf,
    /// The imported busybox image.
    pub image: String,
    exec_root: PathBuf,
    pidfile: PathBuf,
    child: Option<ChildGuard>,
    /// Earlier runs of the daemon, kept for their logs.
    stopped: Vec<ChildGuard>,
    // Dropped last: the daemon's data must outlive the daemon.
    data: TempDir,
}

impl<'n> Dockerd<'n> {
    /// Installs Docker if needed, starts `dockerd` in `ns` and imports the busybox image.
    pub fn new(ns: &'n Netns) -> Self {
        Self::with_config(ns, "{}")
    }

    /// Like [`Dockerd::new`] with `daemon_json` as the daemon's configuration file (for
    /// example `{"live-restore": true}`, which keeps containers running while the daemon
    /// is down).
    pub fn with_config(ns: &'n Netns, daemon_json: &str) -> Self {
        ensure_docker_installed();
        let rootfs = busybox_rootfs();
        let name = unique_name("dk");
        let data = TempDir::new();
        // Short paths: containerd's and libnetwork's unix sockets live under the exec root.
        let exec_root = PathBuf::from(format!("/run/{name}"));
        let socket = PathBuf::from(format!("/run/{name}.sock"));
        let pidfile = PathBuf::from(format!("/run/{name}.pid"));
        // A config of our own: the machine's /etc/docker/daemon.json is not ours.
        std::fs::write(data.join("daemon.json"), format!("{daemon_json}\n"))
            .expect("write daemon.json");
        let mut d = Dockerd {
            ns,
            name,
            socket,
            image: String::new(),
            exec_root,
            pidfile,
            child: None,
            stopped: Vec::new(),
            data,
        };
        d.start_daemon();
        d.image = format!("{}:busybox", unique_name("sbx"));
        d.import(&rootfs);
        d
    }

    /// Like [`Dockerd::new`], with gVisor registered as runtime `runsc` (default
    /// `--network=sandbox`: the container's network stack runs inside the sandbox).
    pub fn with_runsc(ns: &'n Netns) -> Self {
        ensure_runsc_installed();
        let runtime = runsc_runtime();
        Self::with_config(
            ns,
            &format!(
                r#"{{"runtimes": {{"runsc": {{"path": "{}"}}}}}}"#,
                runtime.display()
            ),
        )
    }

    /// Starts the daemon (again) on the same data root, exec root and socket, and waits
    /// until it answers on its socket.
    pub fn start_daemon(&mut self) {
        assert!(!self.daemon_running(), "dockerd {} already runs", self.name);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.ns.name()))
            .arg("dockerd")
            .arg("--config-file")
            .arg(self.data.join("daemon.json"))
            .arg("--data-root")
            .arg(self.data.join("data"))
            .arg("--exec-root")
            .arg(&self.exec_root)
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--pidfile")
            .arg(&self.pidfile)
            .arg(format!("--cgroup-parent=/{}", self.name))
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--userland-proxy=false",
            ]);
        self.child = Some(ChildGuard::spawn(&format!("dockerd {}", self.name), cmd));
        let ready = wait_until(DAEMON_READY, || {
            !self.daemon_running()
                || self
                    .try_docker(&["version", "--format", "{{.Server.Version}}"])
                    .status
                    .success()
        });
        assert!(
            ready && self.daemon_running(),
            "dockerd {} did not come up:\n{}",
            self.name,
            self.log_tail(40)
        );
    }

    /// Stops the daemon with SIGTERM, as a service manager does, and waits for it to exit;
    /// its files stay for [`Dockerd::start_daemon`]. Panics unless it exits within 30 s.
    pub fn stop_daemon(&mut self) {
        let mut child = self.child.take().expect("dockerd runs");
        child.signal(libc::SIGTERM);
        let status = child.wait_timeout(Duration::from_secs(30));
        assert!(
            status.is_some(),
            "dockerd {} still runs 30 s after SIGTERM:\n{}",
            self.name,
            child.stderr_tail(30)
        );
        // The log of the first run stays readable in a failure message.
        self.stopped.push(child);
    }

    pub fn ns(&self) -> &'n Netns {
        self.ns
    }

    fn daemon_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// The daemon's log so far (its stderr).
    pub fn log_tail(&self, lines: usize) -> String {
        self.stopped
            .iter()
            .chain(self.child.as_ref())
            .map(|c| c.stderr_tail(lines))
            .collect::<Vec<_>>()
            .join("\n--- dockerd restarted ---\n")
    }

    fn import(&self, rootfs: &Path) {
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn tar");
        let out = self
            .docker_cmd(&["import", "-", &self.image])
            .stdin(tar.stdout.take().expect("tar stdout is piped"))
            .output()
            .expect("run docker import");
        let tar_status = tar.wait().expect("wait for tar");
        assert!(
            tar_status.success() && out.status.success(),
            "importing the busybox image failed (tar: {tar_status}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `docker -H unix://SOCKET ARGS`, not yet run.
    pub fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(docker_cli());
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        cmd
    }

    /// Runs the docker CLI, whatever its exit status.
    pub fn try_docker(&self, args: &[&str]) -> Output {
        process::output(&mut self.docker_cmd(args))
    }

    /// Runs the docker CLI and returns its trimmed stdout; panics unless it succeeds.
    pub fn docker(&self, args: &[&str]) -> String {
        process::run_ok(self.docker_cmd(args)).trim().to_owned()
    }

    /// `docker run -d --init` of the busybox image under `name` with `labels`, running
    /// `sh -c CMD`; returns the container id once `docker run` has returned.
    pub fn run_named(&self, name: &str, labels: &[(&str, &str)], cmd: &str) -> String {
        self.run_with(name, &[], labels, cmd)
    }

    /// [`Dockerd::run_named`] with extra `docker run` options (`--rm`, `--restart always`).
    pub fn run_with(
        &self,
        name: &str,
        options: &[&str],
        labels: &[(&str, &str)],
        cmd: &str,
    ) -> String {
        let mut args: Vec<String> = ["run", "-d", "--init", "--name", name]
            .iter()
            .chain(options)
            .map(|s| (*s).to_owned())
            .collect();
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.extend([self.image.clone(), "sh".into(), "-c".into(), cmd.to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.docker(&args)
    }

    /// [`Dockerd::run_named`] with a generated name.
    pub fn run(&self, labels: &[(&str, &str)], cmd: &str) -> String {
        self.run_named(&unique_name("c"), labels, cmd)
    }

    pub fn stop(&self, id: &str) {
        self.docker(&["stop", "-t", "2", id]);
    }

    pub fn start(&self, id: &str) {
        self.docker(&["start", id]);
    }

    pub fn restart(&self, id: &str) {
        self.docker(&["restart", "-t", "2", id]);
    }

    /// `docker rm -f`.
    pub fn rm(&self, id: &str) {
        self.docker(&["rm", "-f", id]);
    }

    /// `docker inspect` of one container.
    pub fn inspect(&self, id: &str) -> Value {
        let text = self.docker(&["inspect", id]);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("docker inspect {id} is not JSON ({e}): {text}"));
        v[0].clone()
    }

    /// The pid of the container's init process (0 when it is not running).
    pub fn pid(&self, id: &str) -> u32 {
        self.inspect(id)["State"]["Pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0)
    }

    /// The container's address on the default bridge.
    pub fn bridge_ip(&self, id: &str) -> Option<Ipv4Addr> {
        self.inspect(id)["NetworkSettings"]["IPAddress"]
            .as_str()
            .and_then(|a| a.parse().ok())
    }

    /// `docker exec ID ARGS`, whatever its exit status.
    pub fn exec(&self, id: &str, args: &[&str]) -> Output {
        let mut all = vec!["exec", id];
        all.extend_from_slice(args);
        self.try_docker(&all)
    }

    /// The network interfaces inside a running container, from its `/proc/net/dev`.
    pub fn interfaces(&self, id: &str) -> Vec<String> {
        let out = self.exec(id, &["cat", "/proc/net/dev"]);
        assert!(
            out.status.success(),
            "cannot read /proc/net/dev in {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(name, _)| name.trim().to_owned())
            .collect()
    }

    /// `cmdline` (split on whitespace), one of this host's tools, run inside the network
    /// namespace of running container `id`; not yet run. Only the network namespace is
    /// the container's: the packets take the path a server in the container would see.
    pub fn net_command(&self, id: &str, cmdline: &str) -> Command {
        let pid = self.pid(id);
        assert_ne!(pid, 0, "container {id} is not running");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{pid}/ns/net"))
            .args(cmdline.split_whitespace());
        cmd
    }

    /// Runs `cmdline` inside container `id`'s network namespace; panics unless it
    /// succeeds.
    pub fn net_exec(&self, id: &str, cmdline: &str) -> String {
        process::run_ok(self.net_command(id, cmdline))
    }

    /// Starts `cmdline` inside container `id`'s network namespace in the background.
    pub fn net_spawn(&self, id: &str, cmdline: &str) -> ChildGuard {
        ChildGuard::spawn(
            &format!("{cmdline} in the network of {id}"),
            self.net_command(id, cmdline),
        )
    }

    /// Ids of all containers, running or not.
    pub fn all_containers(&self) -> Vec<String> {
        let out = self.try_docker(&["ps", "-aq", "--no-trunc"]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Processes outside the daemon's own pid whose command line names our exec root:
    /// the managed containerd and any shim it left behind.
    fn strays(&self) -> Vec<libc::pid_t> {
        let needle = self.exec_root.to_string_lossy().into_owned();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        c.split(|b| *b == 0)
                            .any(|arg| String::from_utf8_lossy(arg).contains(&needle))
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Mount points below our data or exec root, deepest first.
    fn our_mounts(&self) -> Vec<String> {
        let roots = [
            self.data.path().to_string_lossy().into_owned(),
            self.exec_root.to_string_lossy().into_owned(),
        ];
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<String> = info
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| roots.iter().any(|r| m.starts_with(r.as_str())))
            .map(str::to_owned)
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        mounts
    }
}

impl Drop for Dockerd<'_> {
    fn drop(&mut self) {
        if self.daemon_running() {
            let ids = self.all_containers();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids.iter().map(String::as_str));
                let out = self.try_docker(&args);
                if !out.status.success() {
                    eprintln!(
                        "dockerd {}: rm -f failed: {}",
                        self.name,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            child.terminate(Duration::from_secs(15));
        }
        for pid in self.strays() {
            // SAFETY: kill(2) of a process whose command line names our private exec
            // root: the containerd or shim our daemon started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for mount in self.our_mounts() {
            if let Ok(c) = std::ffi::CString::new(mount) {
                // SAFETY: umount2 on a NUL-terminated path below our own directories.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.exec_root);
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.pidfile);
        // The cgroup parent in every hierarchy (v1 has one per controller), children first.
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.filter_map(Result::ok) {
                remove_cgroup_tree(&h.path().join(&self.name));
            }
        }
        let _ = std::io::stderr().flush();
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
}
