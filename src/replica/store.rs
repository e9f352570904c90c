//! The etcd backend of the store seam: the record in `{prefix}/accounts/NAME`, read linearizably under
//! the account's lock; the fenced write; the pending tokens; the shared "needs a login".

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcdv3client::pb;
use jiff::Timestamp;
use tracing::{info, warn};

use super::etcd::{self, Connection, EtcdError, KeyValue, Watch, timed};
use super::lock::{self, Held};
use super::mirror::Mirror;
use super::pending_file;
use super::session::Session;
use crate::account::machine::FileRead;
use crate::config::{Account, EtcdSettings};
use crate::events::Event;
use crate::outputs::{self, Published};
use crate::store::{
    Backups, Current, PublishReport, ReadError, Refusal, Reservation, StoreTransaction, TokenStore, digest,
    read_file_and_state,
};
use crate::token::{self, TokenFile};
use kakao_tokend_core::replica::{Keys, PendingToken, SharedState, plan_pending, refresh_token_hash};

/// What every account shares: the connection, the keys, this replica's lease and name.
#[derive(Debug)]
pub struct Shared {
    pub conn: Arc<Connection>,
    pub keys: Keys,
    pub settings: EtcdSettings,
    pub session: Arc<Session>,
    /// The host name: the value of this replica's lock keys, and part of its pending keys.
    pub host: String,
}

impl Shared {
    /// Puts a rotated token under `{prefix}/pending/NAME/…`, with no lease: it waits there for a lock
    /// holder, whatever becomes of this replica.
    pub async fn put_pending(&self, account: &str, pending: &PendingToken) -> Result<(), EtcdError> {
        let unique = Timestamp::now().as_nanosecond().unsigned_abs();
        let key = self.keys.pending(account, &self.host, unique);
        let value = serde_json::to_vec(pending).map_err(|e| EtcdError::Call(e.to_string()))?;
        let mut c = self.conn.client();
        timed(c.kv.put(pb::PutRequest {
            key: key.into_bytes(),
            value,
            ..Default::default()
        }))
        .await
        .map(drop)
    }
}

/// The record store on etcd. A daemon has a [`Mirror`] that keeps the latest records and publishes them
/// to the local files; a command reads etcd directly.
#[derive(Debug)]
pub struct EtcdStore {
    shared: Arc<Shared>,
    mirror: Option<Arc<Mirror>>,
    /// How long `begin` waits for another replica to let go.
    patience: Duration,
}

impl EtcdStore {
    pub fn new(shared: Arc<Shared>, mirror: Option<Arc<Mirror>>, request_timeout: Duration) -> EtcdStore {
        // A holder may request (request_timeout), then wait for a late write after a KOE322
        // (lease_ttl + request_timeout): a queue of two such holders, and a lease to spare.
        let patience = shared.settings.lease_ttl * 3 + request_timeout * 2;
        EtcdStore {
            shared,
            mirror,
            patience,
        }
    }

    async fn lease(&self) -> io::Result<super::session::Lease> {
        // A command's session starts with it; give the first grant a moment.
        let mut lease = self.shared.session.subscribe_lease();
        let wait = tokio::time::timeout(etcd::CALL_TIMEOUT, async {
            loop {
                if let Some(l) = self.shared.session.held() {
                    return Some(l);
                }
                if lease.changed().await.is_err() {
                    return None;
                }
            }
        });
        match wait.await {
            Ok(Some(l)) => Ok(l),
            _ => Err(io::Error::other(
                "etcd is unreachable: this replica holds no lease, so it sends no refresh",
            )),
        }
    }
}

/// Parses a record's bytes as a token file. A record must be a whole token file: etcd holds what a
/// replica wrote, or what someone put there by hand.
pub fn parse_record(bytes: &[u8]) -> Result<Current, ReadError> {
    if bytes.len() > token::MAX_DOCUMENT_BYTES {
        return Err(ReadError::Parse(token::ParseError::TooLarge));
    }
    let file = TokenFile::parse(bytes).map_err(ReadError::Parse)?;
    Ok(Current {
        file,
        digest: digest(bytes),
        len: bytes.len(),
        version: Default::default(),
    })
}

fn io_err(e: &EtcdError) -> io::Error {
    io::Error::other(e.to_string())
}

#[async_trait]
impl TokenStore for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn is_up(&self) -> bool {
        self.shared.session.is_up()
    }

    fn files_are_outputs(&self) -> bool {
        true
    }

    fn lease_ttl(&self) -> Duration {
        self.shared.settings.lease_ttl
    }

    async fn read(&self, account: &Account, _known: Option<u64>) -> FileRead {
        if let Some(m) = &self.mirror
            && let Some(bytes) = m.record(&account.name)
        {
            return FileRead {
                token: parse_record(&bytes),
                state: None,
            };
        }
        if self.mirror.is_none() {
            let mut c = self.shared.conn.client();
            match timed(c.kv.range(etcd::range(&self.shared.keys.record(&account.name)))).await {
                Ok(r) => {
                    self.shared.session.set_up(true);
                    return FileRead {
                        token: r
                            .kvs
                            .first()
                            .map_or(Err(ReadError::Missing), |kv| parse_record(&kv.value)),
                        state: None,
                    };
                }
                Err(_) => self.shared.session.set_up(false),
            }
        }
        // Not in etcd's view yet (or etcd unreachable): the local file, the last token published here.
        let token = read_file_and_state(&account.token_file, None).await.token;
        FileRead { token, state: None }
    }

    async fn begin(&self, account: &Account) -> io::Result<Box<dyn StoreTransaction>> {
        let lease = self.lease().await?;
        let held = lock::acquire(
            &self.shared.conn.client(),
            &self.shared.keys,
            &account.name,
            lease,
            &self.shared.host,
            self.patience,
        )
        .await
        .map_err(|e| io::Error::other(format!("etcd {}: {e}", self.shared.keys.locks(&account.name))))?;
        Ok(Box::new(EtcdTransaction::new(
            self.shared.clone(),
            account.clone(),
            held,
        )))
    }

    async fn try_begin(&self, account: &Account) -> io::Result<Option<Box<dyn StoreTransaction>>> {
        let Some(lease) = self.shared.session.held() else {
            return Ok(None);
        };
        match lock::acquire(
            &self.shared.conn.client(),
            &self.shared.keys,
            &account.name,
            lease,
            &self.shared.host,
            Duration::from_secs(1),
        )
        .await
        {
            Ok(held) => Ok(Some(Box::new(EtcdTransaction::new(
                self.shared.clone(),
                account.clone(),
                held,
            )))),
            Err(_) => Ok(None),
        }
    }

    async fn put_login(
        &self,
        account: &Account,
        file: &TokenFile,
        keep_backups: u32,
        room: Option<Reservation>,
    ) -> Published {
        let bytes = file.to_bytes();
        let keys = &self.shared.keys;
        let mut c = self.shared.conn.client();
        // A login is a new chain: it wins over any record, and clears "needs a login".
        let put = timed(c.kv.txn(etcd::txn(
            vec![],
            vec![
                etcd::put(&keys.record(&account.name), bytes.clone(), 0),
                etcd::delete(keys.state(&account.name).as_bytes()),
            ],
            vec![],
        )))
        .await;
        // Published here at once too; the daemons' mirrors publish it on every replica. If etcd did not
        // take it, the code is spent: the token is kept in the local file, and the record left as it was.
        let mut published = outputs::publish_async(account, file, &bytes, keep_backups, None, room).await;
        if let Err(e) = put {
            published.result = Err(io::Error::other(format!(
                "etcd did not take the new token ({e}); it is in the local token file only: run login again once etcd answers"
            )));
        }
        published
    }
}

/// One account under its etcd lock.
#[derive(Debug)]
pub struct EtcdTransaction {
    shared: Arc<Shared>,
    account: Arc<Account>,
    held: Option<Held>,
    /// The record's mod revision when read under the lock (0: no record): the write compares it.
    record_revision: i64,
    record_hash: String,
    peer_refusal: Option<String>,
    /// Whether the record was read in this transaction (its revision is what the write compares).
    read_done: bool,
}

impl EtcdTransaction {
    fn new(shared: Arc<Shared>, account: Account, held: Held) -> EtcdTransaction {
        EtcdTransaction {
            shared,
            account: Arc::new(account),
            held: Some(held),
            record_revision: 0,
            record_hash: refresh_token_hash(None),
            peer_refusal: None,
            read_done: false,
        }
    }

    fn held(&self) -> &Held {
        // Set from new() to release(), which consumes the transaction.
        self.held
            .as_ref()
            .unwrap_or_else(|| unreachable!("a transaction holds its lock until released"))
    }

    /// Whether this replica still holds the lock, by its own clock.
    fn lock_held(&self) -> bool {
        let s = &self.shared.session;
        let lease = s.lease();
        lease.id == self.held().lease.id && lease.clock.held(s.now())
    }

    /// The record, the pending tokens and the shared state, as of one revision.
    async fn snapshot(&self) -> Result<(Option<KeyValue>, Vec<KeyValue>, Option<KeyValue>), EtcdError> {
        let keys = &self.shared.keys;
        let name = &self.account.name;
        let mut c = self.shared.conn.client();
        let r = timed(c.kv.txn(etcd::txn(
            vec![],
            vec![
                etcd::get(etcd::range(&keys.record(name))),
                etcd::get(etcd::range_prefix(&keys.pendings(name))),
                etcd::get(etcd::range(&keys.state(name))),
            ],
            vec![],
        )))
        .await?;
        Ok((
            etcd::ranged(&r, 0).first().cloned(),
            etcd::ranged(&r, 1).to_vec(),
            etcd::ranged(&r, 2).first().cloned(),
        ))
    }

    /// Reads under the lock, merging a pending token that continues the record's chain.
    async fn read_and_merge(&mut self) -> Result<Current, ReadError> {
        let (record, pending, state) = self.snapshot().await.map_err(|e| ReadError::Io(io_err(&e)))?;
        self.read_done = true;
        let mut record = record;
        if !pending.is_empty() {
            record = self
                .merge(record, &pending)
                .await
                .map_err(|e| ReadError::Io(io_err(&e)))?;
        }
        let Some(kv) = record else {
            self.record_revision = 0;
            return Err(ReadError::Missing);
        };
        self.record_revision = kv.mod_revision;
        let current = parse_record(&kv.value)?;
        self.record_hash = refresh_token_hash(current.file.refresh_token.as_ref().map(|s| s.expose()));
        self.peer_refusal = state
            .and_then(|kv| serde_json::from_slice::<SharedState>(&kv.value).ok())
            .filter(|s| s.parks(&self.record_hash))
            .map(|s| s.code);
        Ok(current)
    }

    /// Merges the pending token made from `record`, and deletes the ones made from older records, in
    /// one transaction fenced by the lock. Returns the record as it now is.
    async fn merge(&self, record: Option<KeyValue>, pending: &[KeyValue]) -> Result<Option<KeyValue>, EtcdError> {
        let record_hash = record
            .as_ref()
            .and_then(|kv| parse_record(&kv.value).ok())
            .map(|c| refresh_token_hash(c.file.refresh_token.as_ref().map(|s| s.expose())));
        let parsed: Vec<Option<PendingToken>> = pending
            .iter()
            .map(|kv| serde_json::from_slice::<PendingToken>(&kv.value).ok())
            .collect();
        let plan = match &record_hash {
            Some(h) => plan_pending(h, &parsed),
            // No readable record: nothing can be continued; keep the pending tokens for a login to judge.
            None => return Ok(record),
        };
        let keys = &self.shared.keys;
        let record_key = keys.record(&self.account.name);
        let held = self.held();
        let mut ops = Vec::new();
        let mut merged = None;
        if let Some(i) = plan.merge
            && let Some(p) = &parsed[i]
            && parse_record(p.token.as_bytes()).is_ok()
        {
            ops.push(etcd::put(&record_key, p.token.clone().into_bytes(), 0));
            merged = Some(p.replica.clone());
        }
        for kv in pending {
            ops.push(etcd::delete(&kv.key));
        }
        let mut c = self.shared.conn.client();
        let r = timed(c.kv.txn(etcd::txn(
            vec![
                etcd::create_revision_is(&held.key, held.revision),
                etcd::mod_revision_is(&record_key, record.as_ref().map_or(0, |kv| kv.mod_revision)),
            ],
            ops,
            vec![],
        )))
        .await?;
        if !r.succeeded {
            return Err(EtcdError::Call(
                "the record or the lock changed during the merge".into(),
            ));
        }
        if let Some(from) = merged {
            info!(event = Event::PendingMerged.as_str(), from = %from, "merged a rotated token another replica could not write");
        }
        let stale = plan.stale.len();
        if stale > 0 {
            info!(
                event = Event::PendingDiscarded.as_str(),
                count = stale,
                "deleted pending tokens that a newer record replaced"
            );
        }
        let after = timed(c.kv.range(etcd::range(&record_key))).await?;
        Ok(after.kvs.first().cloned())
    }

    /// The token could not be written under the lock: it goes to `pending/` (no lease), or, with etcd
    /// out of reach, to a durable local file pushed later. It is never dropped by choice.
    async fn keep_pending(&self, file: &TokenFile, replaced: &str) -> io::Result<&'static str> {
        let pending = PendingToken {
            replaces: replaced.to_string(),
            replica: self.shared.host.clone(),
            token: String::from_utf8_lossy(&file.to_bytes()).into_owned(),
        };
        match self.shared.put_pending(&self.account.name, &pending).await {
            Ok(()) => Ok("etcd"),
            Err(e) => {
                warn!("cannot put the rotated token under pending/ ({e}); keeping it in a local file");
                let path = self.account.token_file.clone();
                tokio::task::spawn_blocking(move || pending_file::store(&path, &pending))
                    .await
                    .map_err(io::Error::other)??;
                Ok("local")
            }
        }
    }
}

#[async_trait]
impl StoreTransaction for EtcdTransaction {
    async fn read(&mut self, _known: Option<u64>) -> FileRead {
        FileRead {
            token: self.read_and_merge().await,
            state: None,
        }
    }

    fn refused_by_peer(&self) -> Option<String> {
        self.peer_refusal.clone()
    }

    fn request_timeout(&self, configured: Duration) -> io::Result<Duration> {
        let s = &self.shared.session;
        if !self.lock_held() {
            return Err(io::Error::other(
                "the lock's lease lapsed before the request; it will be taken again",
            ));
        }
        s.lease()
            .clock
            .request_budget(s.now(), configured)
            .map_err(io::Error::other)
    }

    async fn publish(
        &mut self,
        _account: &Account,
        file: &TokenFile,
        bytes: &[u8],
        _keep_backups: u32,
        _backups: Option<Backups>,
    ) -> Published {
        // A token left unwritten by an earlier transaction was refreshed from a record this one never
        // read: it goes to pending/, named after the record as it is now, for the merge rule to judge
        // (a login in between wins).
        if !self.read_done {
            let _ = self.read_and_merge().await;
            self.record_revision = -1;
        }
        let keys = &self.shared.keys;
        let name = &self.account.name;
        let held = self.held().clone();
        let record_key = keys.record(name);
        let mut c = self.shared.conn.client();
        // The fenced write: only while this replica's lock key is the one it made, and only over the
        // record it read. A replica whose lease lapsed never overwrites a newer token.
        let started = std::time::Instant::now();
        let write = if self.lock_held() && self.record_revision >= 0 {
            timed(c.kv.txn(etcd::txn(
                vec![
                    etcd::create_revision_is(&held.key, held.revision),
                    etcd::mod_revision_is(&record_key, self.record_revision),
                ],
                vec![
                    etcd::put(&record_key, bytes.to_vec(), 0),
                    etcd::delete(keys.state(name).as_bytes()),
                ],
                vec![],
            )))
            .await
            .map(|r| r.succeeded)
        } else {
            Ok(false)
        };
        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "fenced write");
        let result = match write {
            Ok(true) => {
                self.shared.session.set_up(true);
                Ok(PublishReport::default())
            }
            Ok(false) | Err(_) => {
                let why = match &write {
                    Err(e) => e.to_string(),
                    _ => "the lock or the record changed".into(),
                };
                match self.keep_pending(file, &self.record_hash).await {
                    Ok(place) => {
                        warn!(
                            event = Event::LockLost.as_str(),
                            "the refreshed token could not be written under the lock ({why}); kept as pending in {place}"
                        );
                        info!(
                            event = Event::PendingStored.as_str(),
                            place, "rotated token kept for the lock holder"
                        );
                        Ok(PublishReport::default())
                    }
                    Err(e) => Err(io::Error::other(format!(
                        "the refreshed token could not be written to etcd ({why}) nor kept locally: {e}"
                    ))),
                }
            }
        };
        Published {
            result,
            backups: None,
            room: None,
        }
    }

    async fn explain_refusal(&mut self, sent: &TokenFile, wait: Duration) -> Refusal {
        let sent_hash = refresh_token_hash(sent.refresh_token.as_ref().map(|s| s.expose()));
        let deadline = tokio::time::Instant::now() + wait;
        let keys = self.shared.keys.clone();
        let name = self.account.name.clone();
        loop {
            if !self.lock_held() {
                return Refusal::LockLost;
            }
            // A late write shows as a record that moved on, or a pending token made from ours.
            match self.read_and_merge().await {
                Ok(c) if refresh_token_hash(c.file.refresh_token.as_ref().map(|s| s.expose())) != sent_hash => {
                    return Refusal::Explained(Box::new(Ok(c)));
                }
                Ok(_) | Err(ReadError::Missing) | Err(ReadError::Parse(_)) => {}
                Err(ReadError::Io(_)) => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Refusal::Stands;
            }
            // Wait for any change to the record or the pending keys, up to the deadline.
            let from = self.record_revision.max(1);
            let watch_prefix = format!("{}/", keys.prefix());
            let changed = tokio::time::timeout(deadline - now, async {
                let mut w = Watch::start(
                    self.shared.conn.client(),
                    watch_prefix.as_bytes(),
                    kakao_tokend_core::replica::prefix_end(watch_prefix.as_bytes()),
                    from + 1,
                )
                .await?;
                loop {
                    let r = w.next().await?;
                    if r.events.iter().any(|e| {
                        e.kv.as_ref().is_some_and(|kv| {
                            kv.key == keys.record(&name).as_bytes()
                                || kv.key.starts_with(keys.pendings(&name).as_bytes())
                        })
                    }) {
                        return Ok::<(), EtcdError>(());
                    }
                }
            })
            .await;
            if let Ok(Err(_)) = changed {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn share_refusal(&mut self, sent: &TokenFile, code: &str) {
        let state = SharedState {
            needs_login: true,
            refused: refresh_token_hash(sent.refresh_token.as_ref().map(|s| s.expose())),
            code: code.to_string(),
        };
        let held = self.held().clone();
        let Ok(value) = serde_json::to_vec(&state) else { return };
        let mut c = self.shared.conn.client();
        let _ = timed(c.kv.txn(etcd::txn(
            vec![etcd::create_revision_is(&held.key, held.revision)],
            vec![etcd::put(&self.shared.keys.state(&self.account.name), value, 0)],
            vec![],
        )))
        .await;
    }

    async fn release(mut self: Box<Self>) {
        if let Some(held) = self.held.take() {
            lock::release(&self.shared.conn.client(), &held).await;
        }
    }
}

impl Drop for EtcdTransaction {
    fn drop(&mut self) {
        // Dropped without release (a task cancelled at shutdown): let go in the background.
        if let Some(held) = self.held.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let client = self.shared.conn.client();
            rt.spawn(async move { lock::release(&client, &held).await });
        }
    }
}
