//! One refresh, shared by the daemon and the commands: the locked transaction (read, reserve room,
//! request, merge, publish) that both go through, and for commands the whole sequence with its record
//! in the state file.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;

use crate::config::{Account, DaemonSettings};
use crate::oauth::{OAuthClient, TokenError};
use crate::outputs;
use crate::outputs::Published;
use crate::store::{self, AccountState, Current, PublishReport, ReadError, Reservation, StateFile, TokenLock};
use crate::token::{self, TokenFile};

/// A token file under its lock: the one way the daemon and the commands refresh it. The lock is held
/// from the read to the write, so no other process (a second daemon, `kakao-tokend refresh`) sends the
/// same refresh token in between; and room for the new file is taken before the request, because Kakao
/// kills the old refresh token as it answers, and a full disk must show while that costs nothing.
#[derive(Debug)]
pub struct Transaction {
    path: PathBuf,
    room: Option<Reservation>,
    _lock: TokenLock,
}

impl Transaction {
    /// Waits for the lock.
    pub async fn begin(path: &Path) -> io::Result<Transaction> {
        let lock = TokenLock::acquire(path).await?;
        Ok(Transaction::new(path, lock))
    }

    /// Takes the lock if it is free.
    pub fn try_begin(path: &Path) -> io::Result<Option<Transaction>> {
        Ok(TokenLock::try_acquire(path)?.map(|lock| Transaction::new(path, lock)))
    }

    fn new(path: &Path, lock: TokenLock) -> Transaction {
        Transaction {
            path: path.to_path_buf(),
            room: None,
            _lock: lock,
        }
    }

    /// The token file as it is now: another process may have just refreshed or replaced it.
    pub fn read(&self) -> Result<Current, ReadError> {
        store::read_token_file(&self.path)
    }

    /// Uses the room an earlier failed write kept (a temp file that already holds the new token).
    pub fn keep_room(&mut self, room: Option<Reservation>) {
        if room.is_some() {
            self.room = room;
        }
    }

    /// Takes room beside the file for a version about the size of one of `len` bytes.
    pub fn reserve(&mut self, len: usize) -> io::Result<()> {
        if self.room.is_none() {
            self.room = Some(Reservation::take(&self.path, len)?);
        }
        Ok(())
    }

    /// Sends the refresh request for `current` (reserve first) and merges the answer into it.
    pub async fn request(
        &self,
        client: &OAuthClient,
        account: &Account,
        current: &TokenFile,
        timeout: Duration,
    ) -> Result<Refreshed, TokenError> {
        debug_assert!(self.room.is_some(), "room is reserved before a request");
        request(client, account, current, timeout).await
    }

    /// Publishes `file` (its bytes, `bytes`) into the reserved room, with backups and the env file. A
    /// failed write hands back its temp file in [`Published::room`], to be kept for the retry.
    pub async fn publish(
        &mut self,
        account: &Account,
        file: &TokenFile,
        bytes: &[u8],
        keep_backups: u32,
        backups: Option<store::Backups>,
    ) -> Published {
        outputs::publish_async(account, file, bytes, keep_backups, backups, self.room.take()).await
    }
}

pub use kakao_tokend_core::machine::Refreshed;

/// Sends the refresh request for `current` and merges the answer into it.
async fn request(
    client: &OAuthClient,
    account: &Account,
    current: &TokenFile,
    timeout: Duration,
) -> Result<Refreshed, TokenError> {
    let Some(refresh_token) = &current.refresh_token else {
        return Err(TokenError::NoRefreshToken);
    };
    let sent_at = Timestamp::now();
    let resp = client.refresh(account, refresh_token, timeout).await?;
    let (file, refused) = match token::usable(&resp) {
        token::Usable::Whole => (token::merge(current, resp, sent_at), None),
        // Kakao has already killed the old refresh token: keep the new one, with the old access token.
        token::Usable::RefreshTokenOnly(why) => (token::merge_refresh_token_only(current, resp, sent_at), Some(why)),
        token::Usable::Nothing(why) => return Err(TokenError::Unusable(why)),
    };
    let rotated = file.refresh_token != current.refresh_token;
    let progressed = match (current.expires_at, file.expires_at) {
        (Some(old), Some(new)) => new > old,
        _ => true,
    };
    let bytes = file.to_bytes();
    Ok(Refreshed {
        file,
        bytes,
        rotated,
        progressed,
        sent_at,
        refused,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshNowError {
    #[error("cannot take the lock {path}: {source}")]
    Lock { path: String, source: io::Error },
    #[error("token file {path} {source}")]
    Read { path: String, source: ReadError },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("cannot write token file {path}: {source}; the old file is unchanged")]
    Write { path: String, source: io::Error },
    #[error("cannot write beside token file {path}: {source}; no refresh was sent, so nothing is lost")]
    Unwritable { path: String, source: io::Error },
}

#[derive(Debug)]
pub enum Outcome {
    Refreshed(Box<Refreshed>, PublishReport),
    /// Someone else had already done it (seen under the lock); this is the file as it is.
    NotNeeded(Current),
}

/// Refreshes `account` now, for a command: takes the lock, re-reads the file, asks `needed` whether a
/// refresh is still wanted (another process may have just done it), refreshes, publishes with backups,
/// and records the outcome in the state file, which a running daemon's `status` shares.
pub async fn refresh_now(
    client: &OAuthClient,
    account: &Account,
    settings: &DaemonSettings,
    needed: impl Fn(&TokenFile) -> bool,
) -> Result<Outcome, RefreshNowError> {
    let path = &account.token_file;
    let shown = path.display().to_string();
    let mut tx = Transaction::begin(path).await.map_err(|source| RefreshNowError::Lock {
        path: store::lock_path(path).display().to_string(),
        source,
    })?;
    let current = tx.read().map_err(|source| RefreshNowError::Read {
        path: shown.clone(),
        source,
    })?;
    if !needed(&current.file) {
        return Ok(Outcome::NotNeeded(current));
    }
    tx.reserve(current.len).map_err(|source| RefreshNowError::Unwritable {
        path: shown.clone(),
        source,
    })?;
    let mut state = AccountState::load(path).ok().flatten().unwrap_or_default();
    let attempt_at = Timestamp::now();
    match tx
        .request(client, account, &current.file, settings.request_timeout)
        .await
    {
        Ok(refreshed) => {
            let published = tx
                .publish(account, &refreshed.file, &refreshed.bytes, settings.backups, None)
                .await;
            let report = published.result.map_err(|source| RefreshNowError::Write {
                path: shown.clone(),
                source,
            })?;
            if let Some(why) = refreshed.refused.clone() {
                // Only the rotated refresh token was kept: the refresh itself failed, and no hook runs.
                let e = TokenError::Unusable(why);
                state.record_failure(attempt_at, e.code(), e.to_string(), e.needs_login());
                let _ = state.save(path);
                return Err(e.into());
            }
            state.record_success(refreshed.sent_at);
            let _ = state.save(path);
            if let Some(e) = &report.env_error {
                tracing::warn!(account = %account.name, "token file written, but the env file could not be: {e}");
            }
            if let Err(e) = outputs::run_hook(account, settings.hook_timeout).await {
                tracing::warn!(account = %account.name, "on_refresh hook failed: {e}");
            }
            Ok(Outcome::Refreshed(Box::new(refreshed), report))
        }
        Err(e) => {
            state.record_failure(attempt_at, e.code(), e.to_string(), e.needs_login());
            let _ = state.save(path);
            Err(e.into())
        }
    }
}
