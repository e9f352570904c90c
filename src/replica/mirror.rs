//! Every replica's local files, published from a watch on `{prefix}/accounts/`: the token file, its
//! backups, the env file and the `on_refresh` hook, within a second of any change, a `login` on another
//! host included. Only a higher mod revision than the one published is published; a compaction or a
//! lost connection means a fresh read of every record, then a new watch from there. A local file is
//! never deleted or emptied: a deleted record leaves it as it is.
//!
//! Each (re)connection also pushes the rotated tokens kept in local pending files, and imports a local
//! token file as the first record of an account that etcd does not have yet (create-only: a replica
//! that loses the race keeps a backup of its own file).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcdv3client::pb;
use jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use super::etcd::{self, EtcdError, KeyValue, Watch, timed};
use super::pending_file;
use super::session::Backoff;
use super::store::{Shared, parse_record};
use crate::config::Account;
use crate::events::Event;
use crate::outputs;
use crate::store::{self, TokenLock};
use crate::token;
use kakao_tokend_core::replica::{prefix_end, should_publish};

/// A record as etcd last showed it: its mod revision and its bytes.
type Record = (i64, Arc<[u8]>);

/// What the mirror publishes for: the running config's accounts and how they keep their files.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub accounts: BTreeMap<String, Arc<Account>>,
    pub backups: u32,
    pub hook_timeout: Duration,
}

#[derive(Debug)]
pub struct Mirror {
    shared: Arc<Shared>,
    targets: watch::Receiver<Arc<Targets>>,
    /// The latest record of each account, as etcd last showed it.
    records: Mutex<HashMap<String, Record>>,
    /// The mod revision last published to each account's local files.
    published: Mutex<HashMap<String, i64>>,
    /// Tells the supervisor that an account's record changed, for its task to follow.
    changed: mpsc::UnboundedSender<String>,
    /// Set once every record has been read: the daemon starts its accounts after that, or after a
    /// few seconds without etcd.
    synced: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Mirror {
    pub fn new(
        shared: Arc<Shared>,
        targets: watch::Receiver<Arc<Targets>>,
        changed: mpsc::UnboundedSender<String>,
    ) -> Arc<Mirror> {
        Arc::new(Mirror {
            shared,
            targets,
            records: Mutex::default(),
            published: Mutex::default(),
            changed,
            synced: watch::channel(false).0,
        })
    }

    /// Waits until every record has been read once, at most `patience`.
    pub async fn first_sync(&self, patience: Duration) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(patience, rx.wait_for(|s| *s)).await.is_ok()
    }

    /// The account's record as last seen, if any.
    pub fn record(&self, account: &str) -> Option<Arc<[u8]>> {
        lock(&self.records).get(account).map(|(_, b)| b.clone())
    }

    /// Follows etcd until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        let mut up = self.shared.session.subscribe_up();
        loop {
            // A watch on a connection that died can stay silent for long: when the session finds
            // etcd gone, the watch is dropped and started again once it answers.
            let down = async {
                let _ = up.wait_for(|u| !*u).await;
            };
            tokio::select! {
                r = self.follow() => if let Err(e) = r {
                    debug!("the record watch ended: {e}; reading every record again");
                },
                () = down => debug!("etcd is unreachable: the record watch starts again when it answers"),
            }
            if self.shared.session.is_up() {
                // The watch ended with etcd up: again after a pause, so that a failing call cannot spin.
                tokio::time::sleep(backoff.step()).await;
            } else {
                // Down: again as soon as the session holds a lease, not a poll interval later.
                let _ = up.wait_for(|u| *u).await;
            }
            if self.shared.session.is_up() {
                backoff = Backoff::default();
            }
        }
    }

    /// One connection's worth: push, import, read everything, then watch from there.
    async fn follow(&self) -> Result<(), EtcdError> {
        self.push_local_pending().await;
        let prefix = self.shared.keys.records();
        let mut c = self.shared.conn.client();
        let all = timed(c.kv.range(etcd::range_prefix(&prefix))).await?;
        let revision = all.header.as_ref().map_or(0, |h| h.revision);
        self.import_missing(&all.kvs).await;
        for kv in &all.kvs {
            self.apply(kv).await;
        }
        self.synced.send_replace(true);
        let mut w = Watch::start(
            self.shared.conn.client(),
            prefix.as_bytes(),
            prefix_end(prefix.as_bytes()),
            revision + 1,
        )
        .await?;
        loop {
            let changes = w.next().await?;
            for ev in &changes.events {
                match (ev.r#type == pb::event::EventType::Delete as i32, &ev.kv) {
                    (false, Some(kv)) => self.apply(kv).await,
                    (true, Some(kv)) => warn!(
                        key = %String::from_utf8_lossy(&kv.key),
                        "a record was deleted from etcd; the local files keep the last token"
                    ),
                    _ => {}
                }
            }
        }
    }

    /// Publishes a record to the account's local files if it is newer than the last one published.
    async fn apply(&self, kv: &KeyValue) {
        let key = String::from_utf8_lossy(&kv.key);
        let Some(name) = self.shared.keys.account_of(&key).map(str::to_owned) else {
            return;
        };
        let bytes: Arc<[u8]> = kv.value.clone().into();
        lock(&self.records).insert(name.clone(), (kv.mod_revision, bytes.clone()));
        let targets = self.targets.borrow().clone();
        let Some(account) = targets.accounts.get(&name).cloned() else {
            return;
        };
        if !should_publish(lock(&self.published).get(&name).copied(), kv.mod_revision) {
            return;
        }
        let span = info_span!("account", account = %name);
        let published = self
            .publish(account.clone(), bytes, kv.mod_revision, &targets)
            .instrument(span.clone())
            .await;
        if published {
            lock(&self.published).insert(name.clone(), kv.mod_revision);
        }
        // The account's task follows the record whether or not the local write worked.
        let _ = self.changed.send(name);
    }

    /// Writes the local files for one record; runs the hook when the access token changed.
    async fn publish(&self, account: Arc<Account>, bytes: Arc<[u8]>, revision: i64, targets: &Targets) -> bool {
        let current = match parse_record(&bytes) {
            Ok(c) if token::token_chars_ok(c.file.access_token.expose()) => c,
            Ok(_) => {
                warn!("the record in etcd holds an access token with characters no token has; not published");
                return false;
            }
            Err(e) => {
                warn!("the record in etcd {e}; not published");
                return false;
            }
        };
        let lock = match TokenLock::acquire(&account.token_file).await {
            Ok(l) => l,
            Err(e) => {
                warn!(lock = %store::lock_path(&account.token_file).display(), "cannot take the local lock to publish: {e}");
                return false;
            }
        };
        let keep = targets.backups;
        let acct = account.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _lock = lock;
            let before = store::read_token_file(&acct.token_file).ok();
            if before.as_ref().is_some_and(|b| b.digest == current.digest) {
                return Ok(false);
            }
            let changed = before.is_none_or(|b| b.file.access_token.expose() != current.file.access_token.expose());
            outputs::publish(&acct, &current.file, &bytes, keep, &mut None, &mut None).map(|report| {
                if let Some(e) = report.env_error {
                    warn!("token file published, but the env file could not be written: {e}");
                }
                changed
            })
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match written {
            Ok(changed) => {
                info!(
                    event = Event::RecordPublished.as_str(),
                    revision, "published the record from etcd to the local files"
                );
                if changed {
                    outputs::spawn_hook(account, targets.hook_timeout);
                }
                true
            }
            Err(e) => {
                warn!(
                    event = Event::WriteFailed.as_str(),
                    "cannot publish the record to the local files: {e}; the old file is unchanged"
                );
                false
            }
        }
    }

    /// Pushes rotated tokens kept in local pending files to `pending/`, then removes the files.
    async fn push_local_pending(&self) {
        let targets = self.targets.borrow().clone();
        for account in targets.accounts.values() {
            let path = account.token_file.clone();
            let Ok(Ok(Some(pending))) = tokio::task::spawn_blocking(move || pending_file::load(&path)).await else {
                continue;
            };
            if self.shared.put_pending(&account.name, &pending).await.is_ok() {
                let path = account.token_file.clone();
                let _ = tokio::task::spawn_blocking(move || pending_file::remove(&path)).await;
                info!(account = %account.name, event = Event::PendingStored.as_str(), place = "etcd", "pushed a locally kept rotated token to etcd");
            }
        }
    }

    /// Makes each local token file the first record of an account etcd does not have yet.
    async fn import_missing(&self, present: &[KeyValue]) {
        let targets = self.targets.borrow().clone();
        for account in targets.accounts.values() {
            let key = self.shared.keys.record(&account.name);
            if present.iter().any(|kv| kv.key == key.as_bytes()) {
                continue;
            }
            let path = account.token_file.clone();
            let Ok(Ok(local)) = tokio::task::spawn_blocking(move || {
                store::read_regular(&path, token::MAX_DOCUMENT_BYTES, true).map(|(b, _)| b)
            })
            .await
            else {
                continue;
            };
            if parse_record(&local).is_err() {
                warn!(account = %account.name, "the local token file is not a whole token file; not imported into etcd");
                continue;
            }
            let mut c = self.shared.conn.client();
            let created = timed(c.kv.txn(etcd::txn(
                vec![etcd::create_revision_is(&key, 0)],
                vec![etcd::put(&key, local.clone(), 0)],
                vec![],
            )))
            .await;
            match created {
                Ok(r) if r.succeeded => info!(
                    account = %account.name,
                    event = Event::RecordImported.as_str(),
                    "imported the local token file as the account's first record in etcd"
                ),
                Ok(_) => {
                    // Another replica imported first: its record wins, and this file is kept aside.
                    let path = account.token_file.clone();
                    let kept = tokio::task::spawn_blocking(move || keep_aside(&path, &local)).await;
                    if let Ok(Ok(p)) = kept {
                        info!(account = %account.name, backup = %p.display(), "another replica's token file became the record; this one is kept as a backup");
                    }
                }
                Err(e) => debug!(account = %account.name, "cannot import the local token file now: {e}"),
            }
        }
    }
}

/// A copy of `bytes` as a timestamped backup beside the token file.
fn keep_aside(token_file: &std::path::Path, bytes: &[u8]) -> std::io::Result<std::path::PathBuf> {
    let name = store::file_name(token_file);
    let now = Timestamp::now();
    for n in 0..100 {
        let candidate = store::folder(token_file).join(store::backup_name(&name, now, n));
        if !candidate.exists() {
            store::write_atomic(&candidate, bytes, crate::config::FileAccess { mode: 0o600, gid: None })?;
            return Ok(candidate);
        }
    }
    Err(std::io::Error::other("no free backup name"))
}
