//! The seam between the refresh logic and where the record of truth lives. The daemon and the commands
//! refresh through a [`TokenStore`] and its [`StoreTransaction`], whichever the backend:
//!
//! - [`FileStore`]: the token file is the record, its `flock` the lock (one host; the default);
//! - `replica::EtcdStore`: etcd holds the record, a lease-bound key the lock, and every replica's
//!   token file is an output published from a watch.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use super::{AccountState, Backups, Current, ReadError, Reservation, Spare, StateFile, TokenLock, read_token_file};
use crate::account::machine::FileRead;
use crate::config::Account;
use crate::outputs::{self, Published};
use crate::token::TokenFile;

/// What a KOE322 under the lock turned out to mean.
#[derive(Debug)]
pub enum Refusal {
    /// The chain is dead: the account needs a new login.
    Stands,
    /// A late write explains it: the record moved on (another replica's rotated token, or a login).
    Explained(Box<Result<Current, ReadError>>),
    /// The lock was lost meanwhile: this replica no longer speaks for the account.
    LockLost,
}

/// Where the record of each account's token lives, and its refresh lock.
#[async_trait]
pub trait TokenStore: Send + Sync + fmt::Debug {
    /// `file` or `etcd`, for logs and `status`.
    fn kind(&self) -> &'static str;

    /// Whether the store answers: always for files; etcd's last call for etcd.
    fn is_up(&self) -> bool;

    /// Whether the local token files are outputs only: their edits are not adopted, and hooks run when
    /// a new record is published rather than after this process's own write.
    fn files_are_outputs(&self) -> bool;

    /// The lease a lock hangs on (zero for files, whose lock lives as long as the process).
    fn lease_ttl(&self) -> Duration {
        Duration::ZERO
    }

    /// The account's token as this process knows it now, without the lock. `known` is the digest the
    /// caller last saw: when the token differs, the state recorded beside it comes too.
    async fn read(&self, account: &Account, known: Option<u64>) -> FileRead;

    /// Waits for the account's refresh lock.
    async fn begin(&self, account: &Account) -> io::Result<Box<dyn StoreTransaction>>;

    /// Takes the account's refresh lock if nobody holds it.
    async fn try_begin(&self, account: &Account) -> io::Result<Option<Box<dyn StoreTransaction>>>;

    /// Records a token from a login: a new chain, which wins over whatever is there.
    async fn put_login(
        &self,
        account: &Account,
        file: &TokenFile,
        keep_backups: u32,
        room: Option<Reservation>,
    ) -> Published;
}

/// One account under its refresh lock: read, request, write, in that order, with nothing in between
/// from any other refresher.
#[async_trait]
pub trait StoreTransaction: Send + fmt::Debug {
    /// The record as it is now, under the lock: another process may have just refreshed or replaced it.
    async fn read(&mut self, known: Option<u64>) -> FileRead;

    /// Another replica already found this record's chain dead (its KOE322 code): no request is sent.
    fn refused_by_peer(&self) -> Option<String> {
        None
    }

    /// Uses the room an earlier failed write kept (a temp file that already holds the new token).
    fn keep_room(&mut self, _room: Option<Reservation>) {}

    /// Takes room for a version about `len` bytes long before any request is sent; `spare`, a backup
    /// the publish would delete, may become that room (see [`Reservation::take_reusing`]).
    fn reserve(&mut self, _len: usize, _spare: Option<Spare>) -> io::Result<()> {
        Ok(())
    }

    /// The timeout for a token request sent now, or why none may be sent.
    fn request_timeout(&self, configured: Duration) -> io::Result<Duration> {
        Ok(configured)
    }

    /// Writes `file` (its bytes, `bytes`) as the new record. A failed write hands back its temp file in
    /// [`Published::room`], to be kept for the retry.
    async fn publish(
        &mut self,
        account: &Account,
        file: &TokenFile,
        bytes: &[u8],
        keep_backups: u32,
        backups: Option<Backups>,
    ) -> Published;

    /// After a KOE322 for `sent`: whether a late write explains it. `wait` bounds the wait for one.
    async fn explain_refusal(&mut self, _sent: &TokenFile, _wait: Duration) -> Refusal {
        Refusal::Stands
    }

    /// Shares that the record's chain is dead, so that other replicas send no probe of their own.
    async fn share_refusal(&mut self, _sent: &TokenFile, _code: &str) {}

    /// Lets go of the lock now (dropping does too, later for etcd).
    async fn release(self: Box<Self>) {}
}

/// The token file is the record; its `flock` is the lock.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileStore;

#[async_trait]
impl TokenStore for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn is_up(&self) -> bool {
        true
    }

    fn files_are_outputs(&self) -> bool {
        false
    }

    async fn read(&self, account: &Account, known: Option<u64>) -> FileRead {
        // On the runtime thread, as the read under the lock is. Every refresh's own rename brings an
        // inotify event and this read after it: on the blocking pool it was a second trip per refresh,
        // and a worker's hand-off each way.
        read_file_and_state_now(&account.token_file, known)
    }

    async fn begin(&self, account: &Account) -> io::Result<Box<dyn StoreTransaction>> {
        let tx = FileTransaction::begin(&account.token_file).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: {e}", super::lock_path(&account.token_file).display()),
            )
        })?;
        Ok(Box::new(tx))
    }

    async fn try_begin(&self, account: &Account) -> io::Result<Option<Box<dyn StoreTransaction>>> {
        Ok(FileTransaction::try_begin(&account.token_file)?.map(|t| Box::new(t) as Box<dyn StoreTransaction>))
    }

    async fn put_login(
        &self,
        account: &Account,
        file: &TokenFile,
        keep_backups: u32,
        room: Option<Reservation>,
    ) -> Published {
        outputs::publish_async(account, file, &file.to_bytes(), keep_backups, None, room).await
    }
}

/// A token file under its lock. The lock is held from the read to the write, so no other process (a
/// second daemon, `kakao-tokend refresh`) sends the same refresh token in between; and room for the new
/// file is taken before the request, because Kakao kills the old refresh token as it answers, and a full
/// disk must show while that costs nothing.
#[derive(Debug)]
pub struct FileTransaction {
    path: PathBuf,
    room: Option<Reservation>,
    _lock: TokenLock,
}

impl FileTransaction {
    /// Waits for the lock.
    pub async fn begin(path: &Path) -> io::Result<FileTransaction> {
        let lock = TokenLock::acquire(path).await?;
        Ok(FileTransaction::new(path, lock))
    }

    /// Takes the lock if it is free.
    pub fn try_begin(path: &Path) -> io::Result<Option<FileTransaction>> {
        Ok(TokenLock::try_acquire(path)?.map(|lock| FileTransaction::new(path, lock)))
    }

    fn new(path: &Path, lock: TokenLock) -> FileTransaction {
        FileTransaction {
            path: path.to_path_buf(),
            room: None,
            _lock: lock,
        }
    }
}

#[async_trait]
impl StoreTransaction for FileTransaction {
    async fn read(&mut self, known: Option<u64>) -> FileRead {
        // On the runtime thread, as the reservation is: a read of a small file from the page cache
        // costs less than a trip to the blocking pool, and a refresh makes one trip, for the fsyncs.
        read_file_and_state_now(&self.path, known)
    }

    fn keep_room(&mut self, room: Option<Reservation>) {
        if room.is_some() {
            self.room = room;
        }
    }

    fn reserve(&mut self, len: usize, spare: Option<Spare>) -> io::Result<()> {
        if self.room.is_none() {
            self.room = Some(Reservation::take_reusing(&self.path, len, spare)?);
        }
        Ok(())
    }

    async fn publish(
        &mut self,
        account: &Account,
        file: &TokenFile,
        bytes: &[u8],
        keep_backups: u32,
        backups: Option<Backups>,
    ) -> Published {
        outputs::publish_async(account, file, bytes, keep_backups, backups, self.room.take()).await
    }
}

/// Reads the token file, and the state file when the token file is not the one the caller knows
/// (someone else wrote it, and may have recorded the outcome too), in one trip to the blocking pool.
pub async fn read_file_and_state(path: &Path, known: Option<u64>) -> FileRead {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || read_file_and_state_now(&path, known))
        .await
        .unwrap_or_else(|e| FileRead {
            token: Err(ReadError::Io(io::Error::other(e))),
            state: None,
        })
}

/// The same, on the caller's thread.
pub fn read_file_and_state_now(path: &Path, known: Option<u64>) -> FileRead {
    let token = read_token_file(path);
    let changed = matches!(&token, Ok(c) if known.is_some_and(|k| k != c.digest));
    let state = if changed {
        AccountState::load(path).ok().flatten()
    } else {
        None
    };
    FileRead { token, state }
}
