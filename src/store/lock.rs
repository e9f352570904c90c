//! The advisory lock beside a token file that makes one process on this host its refresher.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::*;

/// The exclusive advisory lock beside a token file. Whoever holds it is the only refresher; it is
/// released when dropped (or when the process dies, which is why it is a lock and not a pid file).
#[derive(Debug)]
pub struct TokenLock {
    _file: File,
}

pub(super) fn open_lock(token_file: &Path) -> io::Result<File> {
    let path = lock_path(token_file);
    // Open an existing lock file without O_CREAT: creating takes the folder's lock in the kernel, which
    // thousands of accounts sharing one folder would contend for at every refresh. Never through a
    // symlink: a dangling one would make the daemon create a file wherever it points.
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path),
        other => other,
    }
    .map_err(|e| symlink_refused(e, &path))
}

impl TokenLock {
    /// Takes the lock if it is free.
    pub fn try_acquire(token_file: &Path) -> io::Result<Option<TokenLock>> {
        let file = open_lock(token_file)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(TokenLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Waits for the lock. The wait runs on the blocking pool, so the caller can give up on it (at
    /// shutdown) without blocking the runtime; an abandoned wait releases the lock as soon as it gets it.
    pub async fn acquire(token_file: &Path) -> io::Result<TokenLock> {
        if let Some(lock) = Self::try_acquire(token_file)? {
            return Ok(lock);
        }
        let path = token_file.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let file = open_lock(&path)?;
            file.lock()?;
            Ok(TokenLock { _file: file })
        })
        .await
        .map_err(io::Error::other)?
    }
}
