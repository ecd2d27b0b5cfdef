//! Files that hold secrets (the agent token, per-container keys): refused when other
//! users can read them, as ssh refuses a private key anyone may read. A secret that
//! leaked once cannot be taken back, so the agent stops instead of warning.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use sidecar_proto::TOKEN_PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path} is readable by other users (mode {mode:04o}); run `chmod {fix:o} {path}`")]
    TooOpen { path: String, mode: u32, fix: u32 },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is empty; put the agent token ({TOKEN_PREFIX}...) in it")]
    Empty { path: String },
}

/// Refuses `path` (a file or a directory) when its group or others bits allow reading
/// (or, for a directory, listing): the fix named is 0600 for a file, 0700 for a directory.
pub fn check_private(path: &Path) -> Result<(), SecretError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            path: path.display().to_string(),
            mode,
            fix: if meta.is_dir() { 0o700 } else { 0o600 },
        });
    }
    Ok(())
}

/// The token in `path` (surrounding whitespace removed), once the file is known to
/// be private.
pub fn read_token_file(path: &Path) -> Result<String, SecretError> {
    check_private(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(SecretError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(token.to_string())
}

/// Every secret under the state directory: the directories themselves and each key
/// file. The first one too open is the error.
pub fn check_state_dir(root: &Path) -> Result<(), SecretError> {
    let keys = root.join("keys");
    let mut paths: Vec<PathBuf> = vec![root.to_path_buf()];
    if keys.exists() {
        paths.push(keys.clone());
        if let Ok(entries) = std::fs::read_dir(&keys) {
            paths.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    for path in paths {
        check_private(&path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sidecar-secrets-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn a_readable_token_file_is_refused_with_the_fix() {
        let dir = temp("token");
        let path = dir.join("token");
        std::fs::write(&path, "sct_live_abc\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token_file(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "sct_live_abc");
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            read_token_file(&path),
            Err(SecretError::Empty { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_open_key_or_directory_is_refused() {
        let dir = temp("state");
        let keys = dir.join("keys");
        std::fs::create_dir(&keys).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
        let key = keys.join("abc.key");
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = check_state_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("abc.key") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_state_dir(&dir).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_state_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("chmod 700"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
