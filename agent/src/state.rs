//! What the agent keeps on disk: one WireGuard key per container (so a restarted
//! agent or container gets the same address back) and a status snapshot for
//! `sidecar-agent status`.

use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sidecar::Key;

/// One row of `sidecar-agent status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusRow {
    pub container: String,
    pub name: String,
    /// `active`, `error` or `stopped`.
    pub state: String,
    pub ipv6: Option<String>,
    pub ipv4: Option<String>,
    /// `tun` or `netstack`.
    pub mode: Option<String>,
    /// Why auto mode chose netstack, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode_reason: Option<String>,
    /// Unix seconds.
    pub latest_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> io::Result<StateDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("keys"))?;
        // The builder's mode covers only what it creates: a directory made beforehand
        // (by an installer, at the umask's 0755) would leave the keys' names readable.
        for dir in [root.to_path_buf(), root.join("keys")] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn key_path(&self, container: &str) -> io::Result<PathBuf> {
        // Container ids are hex; refuse anything that could escape the directory.
        if container.is_empty() || !container.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected container id {container:?}"),
            ));
        }
        Ok(self.root.join("keys").join(format!("{container}.key")))
    }

    /// The container's private key, created (mode 0600) on first use.
    pub fn container_key(&self, container: &str) -> io::Result<Key> {
        if let Some(key) = self.existing_key(container)? {
            return Ok(key);
        }
        let key = Key::generate_private();
        write_private(
            &self.key_path(container)?,
            format!("{}\n", key.to_base64()).as_bytes(),
        )?;
        Ok(key)
    }

    /// The container's private key if it has one.
    pub fn existing_key(&self, container: &str) -> io::Result<Option<Key>> {
        let path = self.key_path(container)?;
        match std::fs::read_to_string(&path) {
            Ok(text) => Key::from_base64(text.trim()).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The containers that have a key here.
    pub fn key_ids(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(self.root.join("keys"))? {
            let name = entry?.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".key")) {
                ids.push(id.to_string());
            }
        }
        Ok(ids)
    }

    /// Forgets a destroyed container's key.
    pub fn remove_key(&self, container: &str) -> io::Result<()> {
        match std::fs::remove_file(self.key_path(container)?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn status_path(&self) -> PathBuf {
        self.root.join("status.json")
    }

    /// Replaces the status snapshot atomically, so a reader never sees half of it.
    pub fn write_status(&self, rows: &[StatusRow]) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(rows).map_err(io::Error::other)?;
        let tmp = self.root.join("status.json.tmp");
        write_private(&tmp, &json)?;
        std::fs::rename(tmp, self.status_path())
    }

    pub fn read_status(&self) -> io::Result<Vec<StatusRow>> {
        let bytes = std::fs::read(self.status_path())?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_and_ids_are_checked() {
        let dir = std::env::temp_dir().join(format!("sidecar-state-{}", std::process::id()));
        let state = StateDir::open(&dir).unwrap();
        let a = state.container_key("abc123").unwrap();
        assert_eq!(state.container_key("abc123").unwrap(), a);
        assert_ne!(state.container_key("def456").unwrap(), a);
        assert!(state.container_key("../etc").is_err());
        let mut ids = state.key_ids().unwrap();
        ids.sort();
        assert_eq!(ids, vec!["abc123", "def456"]);
        state.remove_key("abc123").unwrap();
        assert_ne!(state.container_key("abc123").unwrap(), a);
        let rows = vec![StatusRow {
            container: "abc123".into(),
            name: "web".into(),
            state: "active".into(),
            ..StatusRow::default()
        }];
        state.write_status(&rows).unwrap();
        assert_eq!(state.read_status().unwrap(), rows);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
