//! One refresh, shared by the daemon and the commands: the request and the merge of its answer, and
//! for commands the whole locked sequence (read, reserve room, request, publish) through the store, with
//! its record in the state file.

use std::io;
use std::time::Duration;

use jiff::Timestamp;

use crate::config::{Account, DaemonSettings};
use crate::oauth::{OAuthClient, TokenError};
use crate::outputs;
use crate::store::{self, AccountState, Current, PublishReport, ReadError, StateFile, TokenStore};
use crate::token::{self, TokenFile};

pub use kakao_tokend_core::machine::Refreshed;

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
    store: &dyn TokenStore,
    account: &Account,
    settings: &DaemonSettings,
    needed: impl Fn(&TokenFile) -> bool,
) -> Result<Outcome, RefreshNowError> {
    let path = &account.token_file;
    let shown = path.display().to_string();
    let mut tx = store.begin(account).await.map_err(|source| RefreshNowError::Lock {
        path: if store.files_are_outputs() {
            format!("the {} lock of account {}", store.kind(), account.name)
        } else {
            store::lock_path(path).display().to_string()
        },
        source,
    })?;
    let current = tx.read(None).await.token.map_err(|source| RefreshNowError::Read {
        path: shown.clone(),
        source,
    })?;
    if let Some(code) = tx.refused_by_peer() {
        return Err(RefreshNowError::Token(refused_by_peer(code)));
    }
    if !needed(&current.file) {
        return Ok(Outcome::NotNeeded(current));
    }
    tx.reserve(current.len, None)
        .map_err(|source| RefreshNowError::Unwritable {
            path: shown.clone(),
            source,
        })?;
    let mut state = AccountState::load(path).ok().flatten().unwrap_or_default();
    let attempt_at = Timestamp::now();
    let timeout = tx
        .request_timeout(settings.request_timeout)
        .map_err(|source| RefreshNowError::Unwritable {
            path: shown.clone(),
            source,
        })?;
    let answer = request(client, account, &current.file, timeout).await;
    if let Err(e) = &answer
        && is_dead_chain(e)
    {
        let wait = store_refusal_wait(store, settings);
        match tx.explain_refusal(&current.file, wait).await {
            store::Refusal::Stands => tx.share_refusal(&current.file, &e.code()).await,
            store::Refusal::Explained(_) => {
                let read = tx.read(None).await.token.map_err(|source| RefreshNowError::Read {
                    path: shown.clone(),
                    source,
                })?;
                return Ok(Outcome::NotNeeded(read));
            }
            store::Refusal::LockLost => {}
        }
    }
    match answer {
        Ok(refreshed) => {
            let published = tx
                .publish(account, &refreshed.file, &refreshed.bytes, settings.backups, None)
                .await;
            tx.release().await;
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
            if !store.files_are_outputs()
                && let Err(e) = outputs::run_hook(account, settings.hook_timeout).await
            {
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

/// How long a lock holder waits, after a KOE322, for a late write that would explain it: a replica whose
/// lease lapsed mid-request may still be writing its rotated token to `pending/`.
pub fn store_refusal_wait(store: &dyn TokenStore, settings: &DaemonSettings) -> Duration {
    if store.files_are_outputs() {
        store.lease_ttl() + settings.request_timeout
    } else {
        Duration::ZERO
    }
}

/// A refusal that ends the chain: the refresh token sent is dead.
pub fn is_dead_chain(e: &TokenError) -> bool {
    matches!(e, TokenError::Refused { .. }) && e.needs_login()
}

/// The refusal another replica saw for this record's refresh token: parked on, never probed again.
pub fn refused_by_peer(code: String) -> TokenError {
    TokenError::RefusedElsewhere { code }
}
