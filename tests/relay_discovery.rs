//! The relay's discovery documents, fetched as an installer or an OAuth client would:
//! each names this relay's own URL and pin, every 401 points at the resource metadata,
//! and the install command the onboarding contract gives runs against this relay.

mod support;

use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::{require_tools, BASE_TOOLS};

#[test]
fn discovery_documents_describe_this_relay_and_its_commands_work() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let from = &topo.router;
    let base = relay.url("");
    let get = |path: &str| {
        let r = relay.request(from, "GET", path, None, None);
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
        r.json
    };

    // Every 401 names the resource metadata, and that URL serves it.
    let denied = relay.request(from, "GET", "/v1/status", None, None);
    assert_eq!(denied.status, 401, "{denied:?}");
    let challenge = denied.header("www-authenticate").unwrap_or_default();
    let metadata_url = challenge
        .split("resource_metadata=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no resource_metadata in {challenge:?}"));
    assert_eq!(
        metadata_url,
        format!("{base}/.well-known/oauth-protected-resource")
    );
    let resource = get(metadata_url.strip_prefix(&base).unwrap());
    assert_eq!(resource["resource"], base.as_str());
    assert_eq!(resource["authorization_servers"][0], base.as_str());
    assert_eq!(
        resource["bearer_methods_supported"],
        serde_json::json!(["header"])
    );
    for scope in ["peers:read", "peers:add", "admin"] {
        assert!(
            resource["scopes_supported"]
                .as_array()
                .unwrap()
                .contains(&scope.into()),
            "{scope} missing: {resource}"
        );
    }

    let server = get("/.well-known/oauth-authorization-server");
    assert_eq!(server["issuer"], base.as_str());
    assert_eq!(
        server["grant_types_supported"],
        serde_json::json!(["urn:ietf:params:oauth:grant-type:device_code"])
    );
    assert_eq!(
        server["device_authorization_endpoint"],
        format!("{base}/v1/device/authorize")
    );
    assert_eq!(server["token_endpoint"], format!("{base}/v1/device/token"));
    // The endpoints it names are the ones that start and finish a device login.
    let start = relay.request(
        from,
        "POST",
        server["device_authorization_endpoint"]
            .as_str()
            .and_then(|u| u.strip_prefix(&base))
            .unwrap(),
        None,
        Some(&serde_json::json!({"scope": "peers:read"})),
    );
    assert_eq!(start.status, 200, "{start:?}");
    let poll = relay.request(
        from,
        "POST",
        server["token_endpoint"]
            .as_str()
            .and_then(|u| u.strip_prefix(&base))
            .unwrap(),
        None,
        Some(&serde_json::json!({"device_code": start.json["device_code"]})),
    );
    assert_eq!(poll.error(), "authorization_pending", "{poll:?}");

    // The onboarding contract carries this relay's pin, and its print-only command
    // really fetches this relay's installer and prints the plan.
    let onboarding = get("/.well-known/agent-onboarding.json");
    assert_eq!(onboarding["relay"]["url"], base.as_str());
    assert_eq!(onboarding["relay"]["pin"], relay.creds.pin.as_str());
    let print_only = onboarding["print_only_command"].as_str().unwrap();
    let mut sh = from.program("sh");
    sh.args(["-c", print_only]);
    let out = sh.output().expect("run the print-only command");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("/usr/local/bin/sidecar-agent"),
        "{print_only} failed: {out:?}"
    );
    for step in onboarding["steps"].as_array().unwrap() {
        for file in step["writes"].as_array().unwrap() {
            let path = file["path"].as_str().unwrap();
            assert!(
                stdout.contains(path),
                "the contract writes {path}, the installer's plan does not:\n{stdout}"
            );
        }
    }

    // The agent card's interface is the API's own description.
    let card = get("/.well-known/agent-card.json");
    assert_eq!(card["provider"]["url"], base.as_str());
    let interface = card["supportedInterfaces"][0]["url"].as_str().unwrap();
    let openapi = get(interface.strip_prefix(&base).unwrap());
    assert!(openapi["paths"]["/.well-known/agent-card.json"].is_object());
    assert!(!card["skills"].as_array().unwrap().is_empty());
}
