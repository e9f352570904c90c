//! One refresh, shared by the daemon and the commands: the request and the merge, and for commands the
//! whole locked read-refresh-publish-record sequence.

use std::io;
use std::time::Duration;

use jiff::Timestamp;

use crate::config::{Account, DaemonSettings};
use crate::oauth::{OAuthClient, TokenError};
use crate::outputs;
use crate::store::{self, AccountState, Current, PublishReport, ReadError, TokenLock};
use crate::token::{self, TokenFile};

/// A refreshed token, merged with what it replaces, not yet written.
#[derive(Debug, Clone)]
pub struct Refreshed {
    pub file: TokenFile,
    pub bytes: Vec<u8>,
    /// The provider sent a new refresh token (and, with Kakao, killed the old one).
    pub rotated: bool,
    /// The access token's expiry moved forward.
    pub progressed: bool,
    pub sent_at: Timestamp,
}

/// Sends the refresh request for `current` and merges the answer into it.
pub async fn request(
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
    let file = token::merge(current, resp, sent_at);
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

impl AccountState {
    pub fn record_success(&mut self, at: Timestamp) {
        self.last_attempt_at = Some(token::floor_to_second(at));
        self.last_success_at = Some(token::floor_to_second(at));
        self.consecutive_failures = 0;
        self.last_error_code = None;
        self.last_error = None;
        self.needs_login = false;
    }

    pub fn record_failure(&mut self, at: Timestamp, e: &TokenError) {
        self.last_attempt_at = Some(token::floor_to_second(at));
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_error_code = Some(e.code());
        self.last_error = Some(e.to_string());
        self.needs_login |= e.needs_login();
    }
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
    let _lock = TokenLock::acquire(path).await.map_err(|source| RefreshNowError::Lock {
        path: store::lock_path(path).display().to_string(),
        source,
    })?;
    let current = store::read_token_file(path).map_err(|source| RefreshNowError::Read {
        path: shown.clone(),
        source,
    })?;
    if !needed(&current.file) {
        return Ok(Outcome::NotNeeded(current));
    }
    let reserved = store::Reservation::take(path, current.len).map_err(|source| RefreshNowError::Unwritable {
        path: shown.clone(),
        source,
    })?;
    let mut state = AccountState::load(path).ok().flatten().unwrap_or_default();
    let attempt_at = Timestamp::now();
    match request(client, account, &current.file, settings.request_timeout).await {
        Ok(refreshed) => {
            let published = outputs::publish_async(
                account,
                &refreshed.file,
                &refreshed.bytes,
                settings.backups,
                None,
                Some(reserved),
            )
            .await;
            let report = published.result.map_err(|source| RefreshNowError::Write {
                path: shown.clone(),
                source,
            })?;
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
            state.record_failure(attempt_at, &e);
            let _ = state.save(path);
            Err(e.into())
        }
    }
}
