//! The agent's stable event codes: with `--log-format codes` each log event an operator
//! acts on is printed as its code (e.g. `SC1201`) with its fields, and
//! `sidecar-agent explain CODE` prints what it means and what to do. Codes never change
//! meaning; a retired event keeps its number unused.
//!
//! Events are matched by their message text, so the log lines themselves stay as they
//! are; a unit test checks every message here is still one the agent logs.

/// One event: its code, the exact log message, what it means and the fix.
pub struct Event {
    pub code: &'static str,
    pub message: &'static str,
    pub meaning: &'static str,
    pub fix: &'static str,
}

/// Every coded event. 10xx startup and shutdown, 11xx Docker, 12xx registration and the
/// relay, 13xx containers, 14xx local state.
pub const EVENTS: &[Event] = &[
    Event {
        code: "SC1001",
        message: "file descriptor limit",
        meaning: "The agent raised its open-file limit at start and split it among containers.",
        fix: "Nothing to do; raise LimitNOFILE in the unit for more netstack connections per container.",
    },
    Event {
        code: "SC1002",
        message: "cannot raise the file descriptor limit",
        meaning: "The soft open-file limit could not be raised; netstack containers get fewer connections.",
        fix: "Set LimitNOFILE=1048576 (the shipped unit does) or `ulimit -n` before starting the agent.",
    },
    Event {
        code: "SC1003",
        message: "serving /healthz, /readyz and /metrics",
        meaning: "The health and metrics endpoint is listening.",
        fix: "Nothing to do; scrape /metrics or point a health check at /readyz.",
    },
    Event {
        code: "SC1004",
        message: "shutting down",
        meaning: "The agent got SIGTERM or SIGINT and is stopping its containers' tunnels.",
        fix: "Nothing to do; containers keep their addresses when the agent starts again.",
    },
    Event {
        code: "SC1005",
        message: "--token on the command line is visible to every user of this host (ps, /proc); put it in a file readable only by root and pass --token-file, or set SIDECAR_TOKEN",
        meaning: "The agent token was given with --token, which every user can read in `ps`.",
        fix: "Write the token to /etc/sidecar/agent.token (mode 0600) and pass --token-file.",
    },
    Event {
        code: "SC1101",
        message: "Docker event stream failed; reconnecting",
        meaning: "The connection to the Docker daemon's event stream broke.",
        fix: "Check `systemctl status docker`; the agent reconnects by itself.",
    },
    Event {
        code: "SC1102",
        message: "Docker event stream ended (daemon restart?); reconnecting",
        meaning: "Docker closed the event stream, usually because the daemon restarted.",
        fix: "Nothing to do if Docker is back; otherwise start it.",
    },
    Event {
        code: "SC1103",
        message: "cannot reconnect to Docker yet",
        meaning: "The Docker daemon does not answer; no container changes are seen until it does.",
        fix: "Start Docker, or check --docker / DOCKER_HOST points at its socket.",
    },
    Event {
        code: "SC1104",
        message: "cannot list containers",
        meaning: "Listing containers from Docker failed.",
        fix: "Check the Docker daemon and that the agent may use its socket.",
    },
    Event {
        code: "SC1201",
        message: "cannot check the registration",
        meaning: "The relay could not be reached (or answered an error) when verifying a container's registration: the relay is unreachable.",
        fix: "Check the relay is running and reachable on its API port from this host, and the pin (SIDECAR_PIN) matches its certificate.",
    },
    Event {
        code: "SC1202",
        message: "registering again",
        meaning: "The relay no longer knows a container's registration (restart, or it was removed); the agent registers it again.",
        fix: "Nothing to do; if it repeats, check the relay's store and its logs.",
    },
    Event {
        code: "SC1203",
        message: "cannot register again yet",
        meaning: "Registering a container again failed; the agent retries at the next check.",
        fix: "Check the relay is reachable and the token still has room (max_peers) and is not revoked.",
    },
    Event {
        code: "SC1204",
        message: "registered again; tunnel rebuilt",
        meaning: "A container's registration was made again with the same addresses.",
        fix: "Nothing to do.",
    },
    Event {
        code: "SC1205",
        message: "registered again with a new allocation; setting the container up again",
        meaning: "The relay gave a container new addresses when registering it again.",
        fix: "Update DNS records that pointed at the old address.",
    },
    Event {
        code: "SC1206",
        message: "the relay refused the token; using the new one from the token file",
        meaning: "The relay refused the agent token (revoked or wrong) and the token file holds a new one, which the agent now uses.",
        fix: "Nothing to do if the new token works; otherwise create an agent token on the relay and write it to the token file.",
    },
    Event {
        code: "SC1207",
        message: "cannot read the token file again",
        meaning: "After the relay refused the token, the token file could not be read for a new one.",
        fix: "Check the token file exists, is readable by root and holds one sct_live_ token.",
    },
    Event {
        code: "SC1208",
        message: "cannot deregister from the relay yet",
        meaning: "A removed container's registration could not be deleted on the relay; the agent retries.",
        fix: "Check the relay is reachable; the address stays held until the deregistration succeeds.",
    },
    Event {
        code: "SC1209",
        message: "no IPv4 from this relay; serving IPv6 only",
        meaning: "A container asked for IPv4 (sidecar.ipv4=true) but the relay or the token gives none.",
        fix: "Give the token max_ipv4 above 0 on a relay with an IPv4 pool, or drop the label.",
    },
    Event {
        code: "SC1210",
        message: "the relay still holds this container's registration beside another key's; keeping the tunnel",
        meaning: "The relay holds two registrations for one container; the agent keeps its own.",
        fix: "Delete the stale peer on the relay (DELETE /v1/peers/KEY) if it stays.",
    },
    Event {
        code: "SC1301",
        message: "container not set up",
        meaning: "A labeled container could not be given its address; the error says why.",
        fix: "Read the error field; `sidecar-agent status` shows the container's state.",
    },
    Event {
        code: "SC1302",
        message: "using netstack mode",
        meaning: "The container is served by the agent's userspace stack instead of a TUN device.",
        fix: "Nothing to do; for TUN mode give the agent CAP_NET_ADMIN and /dev/net/tun.",
    },
    Event {
        code: "SC1303",
        message: "no TUN device possible in the container; using netstack mode",
        meaning: "Creating a TUN device inside the container failed, so it falls back to netstack mode.",
        fix: "Give the agent CAP_NET_ADMIN and CAP_SYS_ADMIN and /dev/net/tun, or keep netstack mode.",
    },
    Event {
        code: "SC1304",
        message: "no handshake for longer than a rekey; checking the registration",
        meaning: "A container's tunnel has had no handshake for over two minutes.",
        fix: "Check UDP to the relay's WireGuard port is not blocked; the agent re-checks the registration itself.",
    },
    Event {
        code: "SC1305",
        message: "tunnel stopped",
        meaning: "A container's tunnel stopped (the container went down or is set up again): the container is down.",
        fix: "Nothing to do if the container was stopped.",
    },
    Event {
        code: "SC1306",
        message: "deregistered",
        meaning: "A removed container's registration was deleted on the relay and its key removed.",
        fix: "Nothing to do.",
    },
    Event {
        code: "SC1401",
        message: "damaged key",
        meaning: "A container's stored WireGuard key is unreadable; it was released and set aside.",
        fix: "Restart the container to give it a new key and address.",
    },
    Event {
        code: "SC1402",
        message: "cannot read its key",
        meaning: "A container's stored key could not be read while removing it.",
        fix: "Check the state directory (/var/lib/sidecar-agent) is readable by the agent.",
    },
    Event {
        code: "SC1403",
        message: "cannot remove its key",
        meaning: "A removed container's key file could not be deleted.",
        fix: "Check the state directory is writable (the unit's StateDirectory).",
    },
    Event {
        code: "SC1404",
        message: "cannot list container keys",
        meaning: "The state directory's key files could not be listed.",
        fix: "Check the state directory exists and is readable and writable by the agent.",
    },
];

/// The code of the event logged with `message`, if it is one.
pub fn code_for(message: &str) -> Option<&'static str> {
    EVENTS.iter().find(|e| e.message == message).map(|e| e.code)
}

/// `CODE: meaning` and the fix, for `explain`; `None` for an unknown code.
pub fn explain(code: &str) -> Option<String> {
    let code = code.trim().to_ascii_uppercase();
    let e = EVENTS.iter().find(|e| e.code == code)?;
    Some(format!(
        "{}: {}\nlogged as: \"{}\"\nwhat to do: {}\n",
        e.code, e.meaning, e.message, e.fix
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_and_messages_are_unique_and_explained() {
        let mut codes = HashSet::new();
        let mut messages = HashSet::new();
        for e in EVENTS {
            assert!(codes.insert(e.code), "{} twice", e.code);
            assert!(messages.insert(e.message), "{:?} twice", e.message);
            assert!(
                e.code.len() == 6
                    && e.code.starts_with("SC")
                    && e.code[2..].bytes().all(|b| b.is_ascii_digit()),
                "{} is not SC and four digits",
                e.code
            );
            assert!(
                !e.meaning.is_empty() && !e.fix.is_empty(),
                "{} unexplained",
                e.code
            );
            assert!(explain(e.code).is_some_and(|t| t.contains(e.fix)));
        }
        assert!(explain("SC9999").is_none());
    }

    /// A message that the agent no longer logs would make its code silently dead.
    #[test]
    fn every_message_is_logged_by_the_agent() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut source = String::new();
        for entry in std::fs::read_dir(&dir).expect("agent/src") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|x| x == "rs") && !path.ends_with("events.rs") {
                source.push_str(&std::fs::read_to_string(&path).expect("read source"));
            }
        }
        for e in EVENTS {
            assert!(
                source.contains(&format!("\"{}\"", e.message)),
                "{} ({:?}) is not logged anywhere in agent/src",
                e.code,
                e.message
            );
        }
    }
}
