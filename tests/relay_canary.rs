//! The warrant canary as its readers meet it: nothing served until the operator signs
//! one, then `GET /v1/canary` (no token) serves the statement with its time, and the
//! signature checks out with OpenSSL by the commands the README gives, and with
//! `sidecar-relay canary verify` against the key the relay logged. A statement or a
//! time changed after signing, or another key, is refused by both. A new signature
//! takes effect without a restart.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::process::{output, run_ok, TempDir};
use support::relay::{relay_bin, Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::{require_tools, BASE_TOOLS};

fn sign(relay: &Relay, statement: &str, dir: &Path) -> String {
    let file = dir.join("statement.txt");
    std::fs::write(&file, statement).unwrap();
    let mut cmd = Command::new(relay_bin());
    cmd.args(["canary", "sign", "--config"])
        .arg(&relay.config)
        .arg("--statement")
        .arg(&file);
    run_ok(cmd)
}

fn fetch(relay: &Relay) -> Value {
    let r = relay.request(relay.ns(), "GET", "/v1/canary", None, None);
    assert_eq!(r.status, 200, "GET /v1/canary: {r:?}");
    r.json
}

/// The README's OpenSSL check, run by sh on `doc` saved in `dir`.
fn openssl_verifies(doc: &Value, dir: &Path) -> bool {
    std::fs::write(dir.join("canary.json"), doc.to_string()).unwrap();
    let script = r#"set -e
jq -r .public_key_pem canary.json > canary.pub
jq -r .signature canary.json | base64 -d > canary.sig
jq -j '"sidecar-canary-v1\n\(.signed)\n\(.statement)"' canary.json > canary.msg
openssl pkeyutl -verify -pubin -inkey canary.pub -rawin -in canary.msg -sigfile canary.sig"#;
    let out = output(Command::new("sh").arg("-c").arg(script).current_dir(dir));
    out.status.success()
}

/// `sidecar-relay canary verify` on `doc`; (success, stdout and stderr).
fn tool_verifies(doc: &Value, dir: &Path, key: Option<&str>) -> (bool, String) {
    let path = dir.join("doc.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    let mut cmd = Command::new(relay_bin());
    cmd.args(["canary", "verify"]).arg(&path);
    if let Some(key) = key {
        cmd.args(["--public-key", key]);
    }
    let out = output(&mut cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_signed_canary_is_served_and_checks_out_with_openssl_and_the_relay_tool() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    require_tools(&["openssl", "jq", "base64"]);
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let scratch = TempDir::new();

    let r = relay.request(relay.ns(), "GET", "/v1/canary", None, None);
    assert_eq!(r.status, 404, "a canary before any was signed: {r:?}");
    assert_eq!(r.json["error"], "not_found");

    let statement = "As of today, no warrants, gag orders or requests for user data \
                     have been received.\n";
    let said = sign(&relay, statement, scratch.path());
    let doc = fetch(&relay);
    assert_eq!(doc["statement"], statement);
    let signed = doc["signed"].as_u64().expect("signed is Unix seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        signed <= now && now - signed < 120,
        "signed {signed}, now {now}"
    );
    let key = doc["public_key"].as_str().expect("public_key").to_owned();
    assert!(said.contains(&key), "sign did not print its key: {said}");
    assert!(
        relay.log_tail(200).contains(&key),
        "the relay does not log its canary key:\n{}",
        relay.log_tail(40)
    );

    assert!(
        openssl_verifies(&doc, scratch.path()),
        "openssl refused a good canary"
    );
    let (ok, out) = tool_verifies(&doc, scratch.path(), Some(&key));
    assert!(ok, "canary verify refused a good canary: {out}");
    assert!(
        out.contains("valid") && out.contains(statement.trim_end()),
        "{out}"
    );

    let mut edited = doc.clone();
    edited["statement"] = Value::from(statement.replace("no warrants", "two warrants"));
    let mut backdated = doc.clone();
    backdated["signed"] = Value::from(signed + 86_400);
    for (what, bad) in [
        ("an edited statement", &edited),
        ("a changed time", &backdated),
    ] {
        assert!(
            !openssl_verifies(bad, scratch.path()),
            "openssl accepted {what}"
        );
        let (ok, out) = tool_verifies(bad, scratch.path(), Some(&key));
        assert!(!ok, "canary verify accepted {what}: {out}");
    }
    // A document re-signed by someone else's key is only caught against the known key.
    let other = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let (ok, out) = tool_verifies(&doc, scratch.path(), Some(&other));
    assert!(!ok && out.contains("not by the expected key"), "{out}");

    // A renewal is served at once, by the same key.
    let renewed = "Renewed: still no warrants.\n";
    sign(&relay, renewed, scratch.path());
    let doc = fetch(&relay);
    assert_eq!(doc["statement"], renewed);
    assert_eq!(doc["public_key"], key.as_str());
    assert!(openssl_verifies(&doc, scratch.path()));
}
