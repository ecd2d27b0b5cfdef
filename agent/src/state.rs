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
    /// When the registration was last checked with the relay, unix seconds.
    #[serde(default)]
    pub last_check: Option<u64>,
    /// The relay's view at that check: a handshake within the last 180 s.
    #[serde(default)]
    pub up: Option<bool>,
    /// The relay's view at that check: it reached the address through its data path.
    #[serde(default)]
    pub externally_reachable: Option<bool>,
    /// Times the registration was found missing on the relay and made again.
    #[serde(default)]
    pub reregistrations: u64,
}

/// Why a container's key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file exists but does not hold a key (torn by a crash, or edited).
    #[error("key file {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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

    /// The container's private key, created (mode 0600) on first use. The file is
    /// written whole under a temporary name and renamed, and the directory synced, so
    /// a crash leaves either no key or the whole key, never part of one.
    pub fn container_key(&self, container: &str) -> Result<Key, KeyError> {
        if let Some(key) = self.existing_key(container)? {
            return Ok(key);
        }
        let path = self.key_path(container).map_err(|source| KeyError::Io {
            path: self.root.join("keys"),
            source,
        })?;
        let key = Key::generate_private();
        write_atomically(&path, format!("{}\n", key.to_base64()).as_bytes())
            .map_err(|source| KeyError::Io { path, source })?;
        Ok(key)
    }

    /// The container's private key if it has one.
    pub fn existing_key(&self, container: &str) -> Result<Option<Key>, KeyError> {
        let path = self.key_path(container).map_err(|source| KeyError::Io {
            path: self.root.join("keys"),
            source,
        })?;
        match std::fs::read_to_string(&path) {
            Ok(text) => Key::from_base64(text.trim())
                .map(Some)
                .map_err(|e| KeyError::Damaged {
                    path: path.clone(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(KeyError::Damaged {
                path,
                reason: "not text".into(),
            }),
            Err(source) => Err(KeyError::Io { path, source }),
        }
    }

    /// Moves a damaged key aside (kept for inspection, no longer a container key), so
    /// the container's next start gets a new key instead of the same failure.
    pub fn set_aside_key(&self, container: &str) -> io::Result<PathBuf> {
        let path = self.key_path(container)?;
        let aside = path.with_extension("key.damaged");
        std::fs::rename(&path, &aside)?;
        sync_dir(&self.root.join("keys"))?;
        Ok(aside)
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
        write_atomically(&self.status_path(), &json)
    }

    pub fn read_status(&self) -> io::Result<Vec<StatusRow>> {
        let bytes = std::fs::read(self.status_path())?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Writes `bytes` (mode 0600) to a temporary name beside `path`, renames it over
/// `path` and syncs the directory, so the rename itself survives a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A dot name that does not end in `.key`, so a leftover is never taken for a key.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // A leftover of an earlier crash keeps the mode it was created with.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
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
        // A torn key is reported as damaged, not taken for a new container.
        let torn = dir.join("keys").join("abc123.key");
        std::fs::write(&torn, "AAAA").unwrap();
        assert!(matches!(
            state.container_key("abc123"),
            Err(KeyError::Damaged { .. })
        ));
        let aside = state.set_aside_key("abc123").unwrap();
        assert!(aside.exists());
        assert!(state.existing_key("abc123").unwrap().is_none());
        let mut ids = state.key_ids().unwrap();
        ids.sort();
        assert_eq!(
            ids,
            vec!["def456"],
            "neither a set-aside key nor a temporary file is a key"
        );
        let fresh = state.container_key("abc123").unwrap();
        assert_ne!(fresh, a);
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
