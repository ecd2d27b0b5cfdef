//! A default route through the tunnel, set up the way wg-quick does it, so the
//! tunnel's own UDP packets do not follow it back into the tunnel: the socket's
//! packets carry a firewall mark; a routing table of that number holds the default
//! route through the interface; a rule sends every unmarked packet to that table,
//! and a rule before it keeps the main table's more specific routes (suppressing
//! only its default route). Removed again when the interface goes.
//!
//! The rules are made with `ip` (iproute2), as wg-quick makes them: they are policy,
//! not data path, and `ip rule` shows exactly what was added.

use std::process::Command;

/// wg-quick's first choice of table and mark.
const FIRST_TABLE: u32 = 51820;

#[derive(Debug, thiserror::Error)]
pub enum FullTunnelError {
    #[error("cannot run `ip` (iproute2 is needed for AllowedIPs of /0): {0}")]
    Spawn(#[from] std::io::Error),
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// Which families have a /0 among the allowed IPs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

impl Families {
    pub fn any(self) -> bool {
        self.v4 || self.v6
    }

    fn flags(self) -> impl Iterator<Item = &'static str> {
        [(self.v4, "-4"), (self.v6, "-6")]
            .into_iter()
            .filter_map(|(on, flag)| on.then_some(flag))
    }
}

/// The first table number from wg-quick's default up that holds no routes yet; it
/// is also the fwmark to give the socket.
pub fn free_table(families: Families) -> Result<u32, FullTunnelError> {
    let mut table = FIRST_TABLE;
    loop {
        let mut used = false;
        for flag in families.flags() {
            // A table that was never used does not exist yet, which `ip` reports as
            // an error.
            used |= match ip(&[flag, "route", "show", "table", &table.to_string()]) {
                Ok(routes) => !routes.trim().is_empty(),
                Err(FullTunnelError::Failed { .. }) => false,
                Err(e) => return Err(e),
            };
        }
        if !used {
            return Ok(table);
        }
        table += 1;
    }
}

/// The routes and rules added; [`FullTunnel::remove`] (or dropping it) takes them out.
#[derive(Debug)]
pub struct FullTunnel {
    families: Families,
    table: u32,
    /// `ip` argument lists that undo what was added, in the order to run them.
    undo: Vec<Vec<String>>,
}

impl FullTunnel {
    /// Adds the default routes of `families` through `interface` in `table` and the
    /// two rules per family. The socket must be marked with `table` already.
    pub fn install(
        interface: &str,
        families: Families,
        table: u32,
    ) -> Result<FullTunnel, FullTunnelError> {
        let mut tunnel = FullTunnel {
            families,
            table,
            undo: Vec::new(),
        };
        let t = table.to_string();
        for flag in families.flags() {
            let default = if flag == "-4" { "0.0.0.0/0" } else { "::/0" };
            let steps: [(&[&str], &[&str]); 3] = [
                (
                    &[flag, "route", "add", default, "dev", interface, "table", &t],
                    &[flag, "route", "del", default, "dev", interface, "table", &t],
                ),
                (
                    &[flag, "rule", "add", "not", "fwmark", &t, "table", &t],
                    &[flag, "rule", "del", "not", "fwmark", &t, "table", &t],
                ),
                (
                    &[
                        flag,
                        "rule",
                        "add",
                        "table",
                        "main",
                        "suppress_prefixlength",
                        "0",
                    ],
                    &[
                        flag,
                        "rule",
                        "del",
                        "table",
                        "main",
                        "suppress_prefixlength",
                        "0",
                    ],
                ),
            ];
            for (add, del) in steps {
                // On failure, dropping `tunnel` undoes the steps already taken.
                ip(add)?;
                tunnel
                    .undo
                    .insert(0, del.iter().map(|s| s.to_string()).collect());
            }
        }
        if families.v4 {
            // Reverse-path filtering must see the mark on replies, as wg-quick arranges.
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/conf/all/src_valid_mark", "1") {
                tracing::warn!(error = %e, "cannot set net.ipv4.conf.all.src_valid_mark");
            }
        }
        tracing::info!(
            table,
            v4 = families.v4,
            v6 = families.v6,
            "default route through the tunnel (fwmark {table})"
        );
        Ok(tunnel)
    }

    pub fn table(&self) -> u32 {
        self.table
    }

    pub fn families(&self) -> Families {
        self.families
    }

    /// Removes the rules and routes (best effort: the interface's routes are gone
    /// already if it was deleted).
    pub fn remove(mut self) {
        self.undo_all();
    }

    fn undo_all(&mut self) {
        for args in self.undo.drain(..) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = ip(&args) {
                tracing::debug!(error = %e, "already gone");
            }
        }
    }
}

impl Drop for FullTunnel {
    fn drop(&mut self) {
        self.undo_all();
    }
}

fn ip(args: &[&str]) -> Result<String, FullTunnelError> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FullTunnelError::Failed {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
