//! The relay's OpenAPI document against the relay itself: schemathesis (installed by
//! tests/run.sh) generates requests from the document, valid and invalid, sends them to a
//! running relay with an admin token, and checks every answer against the document:
//! no server errors, only documented status codes and content types, responses that
//! match their schemas, valid requests accepted and invalid ones refused, and every
//! route that needs a token refusing requests without one.

mod support;

use std::path::PathBuf;

use support::process::TempDir;
use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::{require_tools, BASE_TOOLS};

/// Fixed so a failure found in CI replays locally with the same requests.
const SEED: &str = "20261203";

fn schemathesis() -> PathBuf {
    let dir = std::env::var_os("SIDECAR_TEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/sidecar-test-tools"));
    let bin = dir.join("schemathesis/bin/schemathesis");
    assert!(
        bin.is_file(),
        "{} is missing: tests/run.sh installs schemathesis there (or set SIDECAR_TEST_TOOLS)",
        bin.display()
    );
    bin
}

#[test]
fn every_answer_of_the_relay_matches_its_openapi_document() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    let bin = schemathesis();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: true });

    let scratch = TempDir::new();
    let mut cmd = topo.router.program(&bin);
    cmd.arg("--config-file")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/relay_api_conformance.toml"
        ))
        .arg("run")
        .arg(relay.url("/api/openapi.json"))
        // The relay's certificate is self-signed and pinned; schemathesis cannot pin,
        // and the connection never leaves the test's own namespaces.
        .args(["--tls-verify", "false"])
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", relay.creds.admin_token))
        .args(["--checks", "all", "--max-examples", "40", "--seed", SEED])
        .args(["--generation-deterministic", "--no-color", "--workers", "2"])
        // Its cache and reports stay out of the repository.
        .current_dir(scratch.path())
        .env("HOME", scratch.path());
    let out = cmd.output().expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found answers that differ from the OpenAPI document (seed {SEED}):\n{stdout}\n{}\n\
         relay log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        relay.log_tail(40)
    );
    // A run that tested nothing would also exit 0.
    assert!(
        stdout.contains("Tested: ") && !stdout.contains("Tested: 0"),
        "schemathesis tested no operation:\n{stdout}"
    );
}
