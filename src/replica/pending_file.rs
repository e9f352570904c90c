//! A rotated token that neither the fenced write nor `pending/` could take, because etcd was out of
//! reach: kept durably beside the token file as `NAME.json.pending` (0600) until it is pushed to
//! `pending/` on reconnect or restart.

use std::io;
use std::path::{Path, PathBuf};

use kakao_tokend_core::replica::PendingToken;

use crate::config::FileAccess;
use crate::store::{read_regular, write_atomic};

pub fn path_of(token_file: &Path) -> PathBuf {
    let mut p = token_file.as_os_str().to_owned();
    p.push(".pending");
    PathBuf::from(p)
}

/// Stores `pending`, atomically and durably. A newer one replaces an older: it was made from a later
/// record of the same chain.
pub fn store(token_file: &Path, pending: &PendingToken) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(pending).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(&path_of(token_file), &bytes, FileAccess { mode: 0o600, gid: None })
}

/// The pending token kept beside `token_file`, if any.
pub fn load(token_file: &Path) -> io::Result<Option<PendingToken>> {
    match read_regular(&path_of(token_file), 64 * 1024, false) {
        Ok((bytes, _)) => serde_json::from_slice(&bytes).map(Some).map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes it once etcd holds it.
pub fn remove(token_file: &Path) -> io::Result<()> {
    match std::fs::remove_file(path_of(token_file)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_and_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("me.json");
        assert_eq!(load(&token).unwrap(), None);
        let p = PendingToken {
            replaces: "h".into(),
            replica: "host".into(),
            token: "{}".into(),
        };
        store(&token, &p).unwrap();
        assert_eq!(load(&token).unwrap(), Some(p));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path_of(&token)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        remove(&token).unwrap();
        assert_eq!(load(&token).unwrap(), None);
        remove(&token).unwrap();
    }
}
