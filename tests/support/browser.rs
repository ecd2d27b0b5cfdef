//! A real browser for the web page tests: Debian's headless `chromium`, driven through
//! `chromedriver` with plain W3C WebDriver JSON over HTTP.
//!
//! chromedriver runs inside a test namespace (where the relay is reachable), listening
//! on that namespace's loopback, so the WebDriver calls are made with curl from the
//! same namespace; no WebDriver client crate is needed for the dozen commands used.
//! Each browser has its own profile directory. On drop the session is closed, then
//! chromedriver is stopped, then any process still running with this browser's
//! profile (chromium's helpers outlive their parent when it is killed) is killed by
//! its pid.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::netns::Netns;
use super::process::{ChildGuard, TempDir};
use super::wait_until;

/// Tools a browser test needs (tests/run.sh installs them from Debian's chromium and
/// chromium-driver packages).
pub const BROWSER_TOOLS: &[&str] = &["chromium", "chromedriver", "curl"];

/// The key under which WebDriver names an element (W3C WebDriver, "elements").
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long [`Browser::wait_text`] and friends wait by default.
pub const WAIT: Duration = Duration::from_secs(15);

/// A WebDriver error answer (`{"value": {"error", "message"}}`).
#[derive(Debug)]
pub struct WebDriverError {
    pub error: String,
    pub message: String,
}

pub struct Browser<'n> {
    ns: &'n Netns,
    port: u16,
    session: String,
    /// Where [`Browser::screenshot`] writes; printed when the browser starts.
    pub screenshots: PathBuf,
    profile: TempDir,
    driver: Option<ChildGuard>,
}

impl<'n> Browser<'n> {
    /// Starts chromedriver in `ns` and opens a headless chromium session. Screenshots
    /// go to `target/ui-screenshots/<name>/`.
    pub fn start(ns: &'n Netns, name: &str) -> Self {
        super::require_tools(BROWSER_TOOLS);
        let port = free_loopback_port(ns);
        let profile = TempDir::new();
        let mut cmd = ns.program("chromedriver");
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .arg(format!(
                "--log-path={}",
                profile.join("chromedriver.log").display()
            ));
        let mut driver = ChildGuard::spawn(&format!("chromedriver in {}", ns.name()), cmd);
        let mut browser = Browser {
            ns,
            port,
            session: String::new(),
            screenshots: screenshot_dir(name),
            profile,
            driver: None,
        };
        let ready = wait_until(Duration::from_secs(20), || {
            !driver.is_running()
                || browser
                    .raw("GET", "/status", None)
                    .is_ok_and(|v| v["ready"] == json!(true))
        });
        assert!(
            ready && driver.is_running(),
            "chromedriver did not become ready (exit {:?}):\n{}",
            driver.try_wait(),
            driver.stderr_tail(30)
        );
        browser.driver = Some(driver);

        let user_data = browser.profile.join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless=new",
                // The tests run as root, where chromium's own sandbox refuses to start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1400,1000",
                // Only in this test browser: the relay's certificate is self-signed and
                // pinned by key elsewhere (curl --pinnedpubkey); the page under test is
                // the same whatever the certificate.
                "--ignore-certificate-errors",
                format!("--user-data-dir={}", user_data.display()),
            ]},
        }}});
        let value = browser
            .raw("POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("chromium did not start: {e:?}"));
        browser.session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {value}"))
            .to_owned();
        std::fs::create_dir_all(&browser.screenshots)
            .unwrap_or_else(|e| panic!("create {}: {e}", browser.screenshots.display()));
        eprintln!(
            "browser screenshots are written to {}",
            browser.screenshots.display()
        );
        browser
    }

    /// One WebDriver command; `path` is relative to the server (`/status`, `/session`).
    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, WebDriverError> {
        let mut cmd = self.ns.program("curl");
        cmd.args(["-sS", "--max-time", "60", "-X", method])
            .args(["-H", "Content-Type: application/json; charset=utf-8"]);
        if body.is_some() {
            cmd.args(["--data-binary", "@-"]);
        }
        cmd.arg(format!("http://127.0.0.1:{}{path}", self.port));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn curl: {e}"));
        if let Some(body) = body {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            stdin
                .write_all(body.to_string().as_bytes())
                .expect("write WebDriver request");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("wait for curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let answer: Value = serde_json::from_str(&text).map_err(|_| WebDriverError {
            error: "no answer".into(),
            message: format!(
                "{method} {path}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        })?;
        let value = answer["value"].clone();
        match value["error"].as_str() {
            Some(error) => Err(WebDriverError {
                error: error.to_owned(),
                message: value["message"].as_str().unwrap_or_default().to_owned(),
            }),
            None => Ok(value),
        }
    }

    /// A command on this session.
    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, WebDriverError> {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
    }

    fn must(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.cmd(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e:?}"))
    }

    pub fn goto(&self, url: &str) {
        self.must("POST", "/url", Some(&json!({ "url": url })));
    }

    pub fn current_url(&self) -> String {
        self.must("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub fn execute(&self, script: &str, args: &[Value]) -> Value {
        self.must(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// The first element matching `css`, if any.
    fn find(&self, css: &str) -> Option<String> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(&json!({"using": "css selector", "value": css})),
            )
            .ok()?;
        v[ELEMENT_KEY].as_str().map(str::to_owned)
    }

    fn displayed(&self, element: &str) -> bool {
        self.cmd("GET", &format!("/element/{element}/displayed"), None)
            .is_ok_and(|v| v == json!(true))
    }

    /// Waits until an element matching `css` is shown; its WebDriver id.
    fn visible(&self, css: &str) -> String {
        let mut found = None;
        let ok = wait_until(WAIT, || {
            found = self.find(css).filter(|e| self.displayed(e));
            found.is_some()
        });
        assert!(
            ok,
            "`{css}` was not shown within {WAIT:?} on {}; the page says:\n{}",
            self.current_url(),
            self.page_text()
        );
        found.expect("found")
    }

    /// Waits until `css` is shown.
    pub fn wait_visible(&self, css: &str) {
        self.visible(css);
    }

    /// Whether an element matching `css` exists and is shown right now.
    pub fn is_visible(&self, css: &str) -> bool {
        self.find(css).is_some_and(|e| self.displayed(&e))
    }

    pub fn click(&self, css: &str) {
        let e = self.visible(css);
        self.must("POST", &format!("/element/{e}/click"), Some(&json!({})));
    }

    /// Clears the field `css` and types `text` into it, as a user would.
    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.visible(css);
        self.must("POST", &format!("/element/{e}/clear"), Some(&json!({})));
        self.must(
            "POST",
            &format!("/element/{e}/value"),
            Some(&json!({ "text": text })),
        );
    }

    /// The text a user sees in `css` now ("" when it is absent or hidden).
    pub fn text(&self, css: &str) -> String {
        self.find(css)
            .and_then(|e| self.cmd("GET", &format!("/element/{e}/text"), None).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// A form field's current value.
    pub fn value(&self, css: &str) -> String {
        self.execute(
            "const e = document.querySelector(arguments[0]); return e ? e.value : null;",
            &[json!(css)],
        )
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Waits up to [`WAIT`] until the text in `css` satisfies `ok`; that text.
    pub fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        self.wait_text_for(css, what, WAIT, ok)
    }

    pub fn wait_text_for(
        &self,
        css: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.text(css);
            if ok(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "`{css}` did not show {what} within {timeout:?} (it shows {t:?}); the page says:\n{}",
                self.page_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the page shows, for failure messages.
    pub fn page_text(&self) -> String {
        self.text("body")
    }

    /// Writes a PNG of the window to the screenshot directory as `name.png`.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.must("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        let path = self.screenshots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        eprintln!("screenshot {}", path.display());
        path
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // chromedriver closes the browser it started.
            let _ = self.cmd("DELETE", "", None);
        }
        if let Some(mut driver) = self.driver.take() {
            driver.terminate(Duration::from_secs(3));
            if std::thread::panicking() {
                let log = std::fs::read_to_string(self.profile.join("chromedriver.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "---- chromedriver log (last 40 lines) ----\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        kill_processes_using(&self.profile.join("profile"));
    }
}

/// Kills (by pid) every process whose command line names `profile`, the unique
/// profile directory of one test browser, so no chromium helper outlives its test.
fn kill_processes_using(profile: &Path) {
    let needle = format!("--user-data-dir={}", profile.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == needle.as_bytes())
        {
            // SAFETY: plain kill(2) of a process of this test's own browser.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A TCP port free on `ns`'s loopback right now (the kernel picks it).
fn free_loopback_port(ns: &Netns) -> u16 {
    ns.enter(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("bind a loopback port: {e}"))
    })
}

/// `target/ui-screenshots/<name>` of this workspace.
fn screenshot_dir(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("ui-screenshots").join(name)
}
