//! The account's async shell: it does the I/O the machine asks for (reads, the locked refresh
//! transaction, writes, hooks, messages) and feeds the results back. It waits for nothing itself: the
//! scheduler ([`super::scheduler`]) keeps it while it is idle and hands it one job at a time.

use std::io;
use std::path::Path;
use std::sync::Arc;

use jiff::Timestamp;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, error, info, warn};

use super::machine::{AfterAnswer, Effect, FileRead, Input, Line, Machine, Now, Report};
use crate::config::{Account, DaemonSettings};
use crate::events::Event;
use crate::oauth::OAuthClient;
use crate::outputs;
use crate::refresh::{self, is_dead_chain};
use crate::store::{self, AccountState, Refusal, StateFile, StoreTransaction, TokenStore, read_token_file};

/// Settings that every account task reads, replaced as a whole on reload.
#[derive(Debug)]
pub struct Shared {
    pub settings: DaemonSettings,
    /// At most `max_concurrent_refreshes` requests in flight across all accounts.
    pub permits: Arc<Semaphore>,
}

impl Shared {
    pub fn new(settings: DaemonSettings) -> Arc<Shared> {
        let permits = Arc::new(Semaphore::new(settings.max_concurrent_refreshes));
        Arc::new(Shared { settings, permits })
    }
}

#[derive(Debug)]
pub enum Command {
    /// SIGHUP: new settings for this account; re-read the token file and try again if parked.
    Reload(Arc<Account>),
    /// The token file's folder saw a change to the token file.
    FileChanged,
    /// The wall clock moved this much further than the monotonic clock (a suspend, a step).
    ClockJumped(jiff::SignedDuration),
    /// The account was removed from the config, or the daemon is stopping.
    Stop,
}

/// An account's commands not yet handed to its task, kept by the scheduler. Commands coalesce: two
/// "file changed" are one re-read, and two clock jumps one of their sum.
#[derive(Debug, Default)]
pub struct Mailbox {
    stop: bool,
    clock: Option<jiff::SignedDuration>,
    reload: Option<Arc<Account>>,
    file_changed: bool,
}

impl Mailbox {
    pub fn send(&mut self, cmd: Command) {
        match cmd {
            Command::Stop => self.stop = true,
            Command::ClockJumped(d) => {
                let sum = self.clock.map_or(d, |c| c.checked_add(d).unwrap_or(d));
                self.clock = Some(sum);
            }
            Command::Reload(cfg) => self.reload = Some(cfg),
            Command::FileChanged => self.file_changed = true,
        }
    }

    /// The next command, most important first: stop, the clock, reload, file changed.
    pub fn take(&mut self) -> Option<Command> {
        if self.stop {
            return Some(Command::Stop);
        }
        // Before a reload: one that reschedules must see the clock's news first.
        if let Some(d) = self.clock.take() {
            return Some(Command::ClockJumped(d));
        }
        if let Some(cfg) = self.reload.take() {
            // A reload re-reads the token file anyway.
            self.file_changed = false;
            return Some(Command::Reload(cfg));
        }
        std::mem::take(&mut self.file_changed).then_some(Command::FileChanged)
    }

    pub fn stopping(&self) -> bool {
        self.stop
    }

    pub fn is_empty(&self) -> bool {
        !self.stop && self.clock.is_none() && self.reload.is_none() && !self.file_changed
    }
}

/// Everything a task needs from the daemon.
#[derive(Debug)]
pub struct Context {
    pub client: OAuthClient,
    /// Where the record of truth lives: the token file, or etcd.
    pub store: Arc<dyn TokenStore>,
    pub shared: watch::Receiver<Arc<Shared>>,
    pub shutdown: watch::Receiver<bool>,
    /// Where the task says how it stands, after start and after every change (readiness, status line).
    pub reports: mpsc::UnboundedSender<Report>,
    /// The monotonic clock's zero for the machines' deadlines.
    pub epoch: Instant,
    /// Accounts started from the start index rather than a read of their files.
    pub from_index: std::sync::atomic::AtomicUsize,
}

pub struct AccountTask {
    machine: Machine,
    /// Temp files a crash left, to remove at start; a boxed slice, 8 bytes less than a `Vec` in every
    /// account for what is nearly always empty.
    stale_temps: Box<[std::path::PathBuf]>,
    /// Whether start looks for a state file: not when the folder's listing saw none.
    maybe_state: bool,
    /// This token file's backups as last seen, so a refresh does not list the folder; dropped when
    /// someone else writes the file (they may have made backups too).
    backups: Option<store::Backups>,
    /// What the last write left for the next step. Boxed, and one field for both: it is there only
    /// between a write and the next step, and every idle account would carry its size.
    after_write: Option<Box<AfterWrite>>,
    /// This token file's entry in the start index, until the start checks it against the files.
    known: Option<store::IndexEntry>,
    /// Which versions of the token file and the state file the machine's view comes from, for the start
    /// index written at stop.
    seen: Seen,
    /// Shared by every account: one pointer each.
    ctx: Arc<Context>,
}

/// The versions of the token file and the state file, with digests of what the machine took from each,
/// so that at stop the index is written only where the machine still holds what those versions say. A
/// stamp of 0 is unknown. Kept in fields, not as two [`store::Version`]s, which would pad to 48 bytes.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    token_digest: u64,
    token: u64,
    state_digest: u64,
    /// [`store::NO_STATE_FILE`] when there was none.
    state: u64,
    token_changed: u32,
    state_changed: u32,
}

impl Seen {
    fn token_read(&mut self, read: &Result<store::Current, store::ReadError>) {
        match read {
            // The seed's format has its times estimated at each read: no record of it is kept.
            Ok(c) if !c.file.is_seed_format() => self.token(c.digest, c.version),
            _ => self.token = 0,
        }
    }

    fn token(&mut self, digest: u64, v: store::Version) {
        (self.token_digest, self.token, self.token_changed) = (digest, v.stamp, v.changed);
    }

    fn state(&mut self, state: Option<&AccountState>, v: store::Version) {
        let digest = state.map_or_else(|| AccountState::default().record_digest(), AccountState::record_digest);
        (self.state_digest, self.state, self.state_changed) = match digest {
            Some(d) => (d, v.stamp, v.changed),
            None => (0, 0, 0),
        };
    }

    fn no_state_file(&mut self) {
        self.state(None, store::NO_STATE_FILE_VERSION);
    }
}

/// How a start goes: from the start index, or from reads of the files.
enum Begin {
    /// With the versions of the token file and the state file found.
    Known(store::Known, (store::Version, store::Version)),
    Read(Option<AccountState>, Result<store::Current, store::ReadError>),
}

/// What a write leaves for the step after it.
#[derive(Debug)]
enum AfterWrite {
    /// The temp file of a write that failed (its folder turned read-only, say), which already holds the
    /// new token: the next try only renames it, and nothing is left behind.
    Failed(store::Reservation),
    /// The token file as this task published it, until the inotify event that publish brings.
    Published(store::FileStamp),
}

impl std::fmt::Debug for AccountTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountTask")
            .field("account", &self.machine.account().name)
            .field("phase", self.machine.phase())
            .finish_non_exhaustive()
    }
}

impl AccountTask {
    /// `found`: what the supervisor's one listing of the folder found for this token file (temp files a
    /// crash left, removed under the lock; the backups kept; whether it has a state file).
    pub fn new(cfg: Arc<Account>, ctx: Arc<Context>, found: store::Found) -> AccountTask {
        AccountTask {
            machine: Machine::new(cfg),
            stale_temps: found.stale_temps.into_boxed_slice(),
            maybe_state: found.maybe_state,
            backups: Some(found.backups),
            after_write: None,
            known: found.known,
            seen: Seen::default(),
            ctx,
        }
    }

    pub fn account(&self) -> &Arc<Account> {
        self.machine.account()
    }

    pub fn name(&self) -> &str {
        &self.machine.account().name
    }

    /// When the timer should fire next, if the machine is waiting for a time.
    pub fn deadline(&self) -> Option<Instant> {
        self.machine.deadline().map(|d| self.ctx.epoch + d)
    }

    /// A refreshed token is waiting to be written: the task must not end before its last try.
    pub fn has_unwritten(&self) -> bool {
        self.machine.unwritten().is_some()
    }

    /// The temp file a failed write kept, for the next try.
    fn take_room(&mut self) -> Option<store::Reservation> {
        match self.after_write.take().map(|a| *a) {
            Some(AfterWrite::Failed(room)) => Some(room),
            _ => None,
        }
    }

    fn cfg(&self) -> Arc<Account> {
        self.machine.account().clone()
    }

    fn settings(&self) -> DaemonSettings {
        self.ctx.shared.borrow().settings.clone()
    }

    fn shutting_down(&self) -> bool {
        *self.ctx.shutdown.borrow()
    }

    /// One reading of both clocks, a random draw and the settings: what every event comes with.
    fn input(&self) -> Input {
        let mono = self.ctx.epoch.elapsed();
        Input {
            now: Now {
                wall: Timestamp::now(),
                mono,
            },
            jitter: fastrand::f64(),
            policy: self.ctx.shared.borrow().settings.refresh_before_expiry,
        }
    }

    /// Reads the account's token (and the state file when the token is new to the machine: someone else
    /// wrote it, and may have recorded the outcome and made backups too) through the store.
    async fn read(&mut self, cfg: &Account) -> FileRead {
        let known = self.machine.known_digest();
        let read = self.ctx.store.read(cfg, known).await;
        self.forget_backups_if_changed(&read, known);
        self.saw(&read);
        read
    }

    /// Under the lock: the same, read as the store's record of truth is now.
    async fn read_locked(&mut self, tx: &mut Box<dyn StoreTransaction>) -> FileRead {
        let known = self.machine.known_digest();
        let read = tx.read(known).await;
        self.forget_backups_if_changed(&read, known);
        self.saw(&read);
        read
    }

    /// A read's versions: the token file's; a state file that came with it was read without one.
    fn saw(&mut self, read: &FileRead) {
        self.seen.token_read(&read.token);
        if read.state.is_some() {
            self.seen.state = 0;
        }
    }

    /// What the start index may keep for this account as the daemon stops: the versions of its files
    /// the machine's view comes from, if it still holds that view. `None` for an account that keeps its
    /// access token in memory (alerts by message), whose start needs the token file itself.
    /// `now`: files changed too shortly before are left out (see [`store::settled`]).
    pub fn index_entry(&self, now: std::time::SystemTime) -> Option<store::Known> {
        let cfg = self.machine.account();
        if cfg.notify_by_message || self.ctx.store.files_are_outputs() || self.machine.unwritten().is_some() {
            return None;
        }
        let held = self.machine.current()?;
        let seen = self.seen;
        if seen.token == 0 || seen.state == 0 || self.machine.known_digest() != Some(seen.token_digest) {
            return None;
        }
        if !store::settled(seen.token_changed, now) || !store::settled(seen.state_changed, now) {
            return None;
        }
        let state = self.machine.state();
        if state.record_digest() != Some(seen.state_digest) {
            return None;
        }
        Some(store::Known {
            token: seen.token,
            held: held.clone(),
            state: (seen.state != store::NO_STATE_FILE).then(|| (seen.state, state.clone())),
        })
    }

    fn forget_backups_if_changed(&mut self, read: &FileRead, known: Option<u64>) {
        if matches!(&read.token, Ok(c) if known.is_some_and(|k| k != c.digest)) {
            self.backups = None;
        }
    }

    /// Carries out the commands the scheduler handed over, most important first.
    pub async fn handle(&mut self, mut mailbox: Mailbox) {
        while let Some(cmd) = mailbox.take() {
            match cmd {
                // The scheduler ends the task; a stop never reaches it.
                Command::Stop => return,
                Command::ClockJumped(drift) => self.clock_jumped(drift).await,
                Command::Reload(cfg) => self.reload(cfg).await,
                Command::FileChanged => self.file_changed().await,
            }
        }
    }

    /// A refreshed token still waiting to be written gets one last try before the task ends: after it,
    /// the token would be gone, and with it, if the provider rotated, the only live refresh token.
    pub async fn last_write(&mut self) {
        let Some(pending) = self.machine.unwritten().cloned() else {
            return;
        };
        let cfg = self.cfg();
        if let Ok(Some(mut tx)) = self.ctx.store.try_begin(&cfg).await {
            tx.keep_room(self.take_room());
            self.write(&mut tx, &cfg, &pending).await;
            tx.release().await;
        }
        let effects = self.machine.stopping();
        self.perform(effects).await;
    }

    /// The span a job of this account's runs in: its lines carry the account's name.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("account", account = %self.name())
    }

    /// Prepares the folder, removes what a crash left behind (under the lock), and loads the file: from
    /// the start index when it still matches the token file and the state file, else by reading them.
    /// Runs in the account's span only if it has something to say: a start from the index with nothing
    /// to clean up usually logs nothing, and at 100,000 accounts the spans were a twelfth of the start.
    pub async fn start(&mut self) {
        let path = self.cfg().token_file.clone();
        let from_file = !self.ctx.store.files_are_outputs();
        // A state file the folder's listing did not see is not looked for.
        let listed = (!self.maybe_state).then_some(false);
        let known = self
            .known
            .take()
            .filter(|_| from_file)
            .and_then(|entry| entry.get(&path))
            .and_then(|k| k.still_holds(&path, listed).map(|versions| (k, versions)));
        match known {
            Some((known, (token, state_version))) if self.stale_temps.is_empty() => {
                let effects = self.start_known(known, token, state_version);
                if effects.iter().all(is_quiet) {
                    self.perform(effects).await;
                } else {
                    let span = self.span();
                    self.perform(effects).instrument(span).await;
                }
            }
            known => {
                let span = self.span();
                self.start_slow(&path, from_file, known).instrument(span).await;
            }
        }
    }

    fn start_known(
        &mut self,
        known: store::Known,
        token: store::Version,
        state_version: store::Version,
    ) -> Vec<Effect> {
        self.seen.token(known.held.digest, token);
        let state = known.state.map(|(_, state)| state);
        self.seen.state(state.as_ref(), state_version);
        self.ctx.from_index.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.machine.start_known(state, known.held, &self.input())
    }

    /// A start that reads the files, or has temp files to remove first.
    async fn start_slow(
        &mut self,
        path: &Path,
        from_file: bool,
        known: Option<(store::Known, (store::Version, store::Version))>,
    ) {
        let begin = match known {
            Some((known, versions)) => Begin::Known(known, versions),
            None => {
                let (state, token) = self.read_at_start(path, from_file).await;
                Begin::Read(state, token)
            }
        };
        if !self.remove_stale_temps(path).await {
            return;
        }
        let effects = match begin {
            Begin::Known(known, (token, state_version)) => self.start_known(known, token, state_version),
            Begin::Read(state, token) => {
                let read = FileRead { token, state: None };
                self.machine.start(state, read, &self.input())
            }
        };
        self.perform(effects).await;
    }

    /// The token file and the state file, read; the folder made if the token file is missing.
    async fn read_at_start(
        &mut self,
        path: &Path,
        from_file: bool,
    ) -> (Option<AccountState>, Result<store::Current, store::ReadError>) {
        // The folder, the state file and the token file, on the runtime thread as the read under the
        // lock is: at start every account does this at once, and a trip each to the blocking pool cost
        // more in thread hand-offs than the small reads from the page cache themselves.
        let token = from_file.then(|| read_token_file(path));
        // A token file that is there has its folder: the folder is looked at only when the file is
        // missing (a stat per account was as costly as the read itself), or when the files are outputs.
        let folder_error = if matches!(token, None | Some(Err(store::ReadError::Missing))) {
            path.parent()
                .and_then(|dir| create_private_dir(dir).err().map(|e| (dir.to_path_buf(), e)))
        } else {
            None
        };
        let state = if std::mem::replace(&mut self.maybe_state, true) {
            match AccountState::load_stamped(path) {
                Ok(Some((state, stamp))) => {
                    self.seen.state(Some(&state), stamp);
                    Some(state)
                }
                Ok(None) => {
                    self.seen.no_state_file();
                    None
                }
                Err(_) => None,
            }
        } else {
            self.seen.no_state_file();
            None
        };
        let token = match token {
            Some(token) => token,
            None => self.ctx.store.read(&self.cfg(), None).await.token,
        };
        self.seen.token_read(&token);
        if let Some((dir, e)) = folder_error {
            error!(folder = %dir.display(), "cannot create the token file's folder: {e}");
        }
        (state, token)
    }

    /// Removes the temp files a crash left, under the lock. False when the daemon stopped meanwhile.
    async fn remove_stale_temps(&mut self, path: &Path) -> bool {
        let stale = std::mem::take(&mut self.stale_temps);
        if stale.is_empty() {
            return true;
        }
        let mut shutdown = self.ctx.shutdown.clone();
        let lock = tokio::select! {
            l = store::TokenLock::acquire(path) => l,
            () = stopped(&mut shutdown) => return false,
        };
        let removed = match lock {
            Ok(lock) => Ok(blocking(move || {
                let _lock = lock;
                store::remove_temp_files(&stale)
            })
            .await),
            Err(e) => Err(e),
        };
        match removed {
            Ok(Ok(removed)) if removed > 0 => info!(
                event = Event::TempFilesRemoved.as_str(),
                count = removed,
                "removed temp files left by an earlier crash"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("cannot clean up temp files beside {}: {e}", path.display()),
            Err(e) => warn!(lock = %store::lock_path(path).display(), "cannot take the lock to clean up: {e}"),
        }
        true
    }

    async fn clock_jumped(&mut self, drift: jiff::SignedDuration) {
        let input = self.input();
        let effects = self.machine.clock_jumped(drift, &input);
        self.perform(effects).await;
    }

    async fn file_changed(&mut self) {
        let cfg = self.cfg();
        // Every publish brings this event for its own rename. A token file still as this task published
        // it (same inode, length and mtime) is not read again; one stat costs less than the read.
        let published = match self.after_write.as_deref() {
            Some(AfterWrite::Published(stamp)) => Some(*stamp),
            _ => None,
        };
        if published.is_some() {
            self.after_write = None;
        }
        if let Some(stamp) = published
            && !self.ctx.store.files_are_outputs()
            && let Ok(meta) = std::fs::symlink_metadata(&cfg.token_file)
            && store::stamp_of(&meta) == stamp
        {
            // The version the rename left (its change time with it), for the start index.
            if let Some(digest) = self.machine.known_digest() {
                self.seen.token(digest, store::version_of(&meta));
            }
            return;
        }
        let read = self.read(&cfg).await;
        let effects = self.machine.file_changed(read, &self.input());
        self.perform(effects).await;
    }

    async fn reload(&mut self, cfg: Arc<Account>) {
        if cfg.token_file != self.cfg().token_file {
            self.after_write = None;
            self.backups = None;
            self.seen = Seen::default();
        }
        let read = self.read(&cfg).await;
        let effects = self.machine.reload(cfg, read, &self.input());
        self.perform(effects).await;
    }

    /// The timer fired: one pass of the locked refresh transaction.
    pub async fn attempt(&mut self) {
        let permits = self.ctx.shared.borrow().permits.clone();
        let mut shutdown = self.ctx.shutdown.clone();
        let _permit = tokio::select! {
            p = permits.acquire_owned() => p.ok(),
            () = stopped(&mut shutdown) => return,
        };
        let cfg = self.cfg();
        let store = self.ctx.store.clone();
        let tx = tokio::select! {
            tx = store.begin(&cfg) => tx,
            () = stopped(&mut shutdown) => return,
        };
        let mut tx = match tx {
            Ok(tx) => tx,
            Err(e) => {
                let effects = self.machine.lock_failed(&e, &self.input());
                self.perform(effects).await;
                return;
            }
        };
        Box::pin(self.attempt_locked(&mut tx, &cfg)).await;
        tx.release().await;
    }

    async fn attempt_locked(&mut self, tx: &mut Box<dyn StoreTransaction>, cfg: &Account) {
        tx.keep_room(self.take_room());

        if let Some(pending) = self.machine.unwritten().cloned() {
            self.write(tx, cfg, &pending).await;
            return;
        }

        // Re-read under the lock: another process may have refreshed (or replaced) the token.
        let read = self.read_locked(tx).await;
        let (current, effects) = self.machine.locked(read, &self.input());
        self.perform(effects).await;
        let Some(current) = current else { return };
        if self.shutting_down() {
            return;
        }
        if let Some(code) = tx.refused_by_peer() {
            // Another replica probed this refresh token and found it dead, and alerted: this one parks
            // without a probe or an alert of its own.
            self.machine.sending(&self.input());
            if let AfterAnswer::Effects(effects) = self
                .machine
                .answered(Err(refresh::refused_by_peer(code)), &self.input())
            {
                let effects = effects
                    .into_iter()
                    .filter(|e| !matches!(e, Effect::Message { .. }))
                    .collect();
                self.perform(effects).await;
            }
            return;
        }
        let settings = self.settings();
        let spare = self
            .backups
            .as_ref()
            .and_then(|b| b.spare(&cfg.token_file, settings.backups));
        if let Err(e) = tx.reserve(current.len, spare) {
            let effects = self.machine.cannot_reserve(&e, &self.input());
            self.perform(effects).await;
            return;
        }
        let timeout = match tx.request_timeout(settings.request_timeout) {
            Ok(t) => t,
            Err(e) => {
                let effects = self.machine.lock_failed(&e, &self.input());
                self.perform(effects).await;
                return;
            }
        };
        self.machine.sending(&self.input());
        let answer = refresh::request(&self.ctx.client, cfg, &current.file, timeout).await;
        let answered_at = Instant::now();
        if let Err(e) = &answer
            && is_dead_chain(e)
        {
            let wait = refresh::store_refusal_wait(self.ctx.store.as_ref(), &settings);
            match tx.explain_refusal(&current.file, wait).await {
                Refusal::Stands => tx.share_refusal(&current.file, &e.code()).await,
                Refusal::Explained(token) => {
                    info!(
                        event = Event::RefusalExplained.as_str(),
                        "the refresh token was refused because a late write had replaced it; following the new record"
                    );
                    let effects = self.machine.file_changed(
                        FileRead {
                            token: *token,
                            state: None,
                        },
                        &self.input(),
                    );
                    self.perform(effects).await;
                    return;
                }
                Refusal::LockLost => {
                    warn!(
                        event = Event::RefusalDiscarded.as_str(),
                        "the refresh token was refused after this replica lost the lock; the lock holder decides"
                    );
                    let read = self.read(cfg).await;
                    let effects = self.machine.file_changed(read, &self.input());
                    self.perform(effects).await;
                    return;
                }
            }
        }
        match self.machine.answered(answer, &self.input()) {
            AfterAnswer::Write(pending) => {
                self.write(tx, cfg, &pending).await;
                // The window in which a kill loses a rotated chain: from the answer to the durable write.
                tracing::debug!(
                    window_us = answered_at.elapsed().as_micros() as u64,
                    "from the provider's answer to the durable write"
                );
            }
            AfterAnswer::Effects(effects) => self.perform(effects).await,
        }
    }

    /// Publishes a refreshed token in the transaction and tells the machine how it went.
    async fn write(&mut self, tx: &mut Box<dyn StoreTransaction>, cfg: &Account, pending: &super::machine::Pending) {
        // fsync blocks: publish runs on the blocking pool.
        let published = tx
            .publish(
                cfg,
                &pending.current.file,
                &pending.bytes,
                self.settings().backups,
                self.backups.take(),
            )
            .await;
        let mut result = published.result;
        self.backups = published.backups;
        let stamp = result.as_mut().ok().and_then(|r| r.stamp.take());
        self.after_write = match (published.room, stamp) {
            (Some(room), _) => Some(Box::new(AfterWrite::Failed(room))),
            (None, Some(stamp)) => Some(Box::new(AfterWrite::Published(stamp))),
            (None, None) => None,
        };
        let effects = self.machine.written(result, &self.input());
        self.perform(effects).await;
    }

    /// Carries out what the machine decided. Writes are not among them: an answer asks for those, and
    /// `attempt` carries them out in the transaction.
    async fn perform(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                // Before what follows: a line after it speaks of the state file as saved.
                Effect::SaveState(state) => self.save_state(&state),
                // The supervisor is gone only at shutdown.
                Effect::Report(report) => drop(self.ctx.reports.send(report)),
                // With etcd, each replica runs the hook when it publishes a new record to its files.
                Effect::RunHook if self.ctx.store.files_are_outputs() => {}
                Effect::RunHook => outputs::spawn_hook(self.cfg(), self.settings().hook_timeout),
                Effect::Message { access_token, text } => self.send_message(access_token, &text),
                Effect::Log(line) => log(line),
            }
        }
    }

    /// On the runtime thread: the state file is advisory and written without fsync (a crash may roll it
    /// back without harm), so its write never waits on the disk, and a refresh keeps its one trip to the
    /// blocking pool for the token file's fsyncs.
    fn save_state(&mut self, state: &AccountState) {
        let path = &self.machine.account().token_file;
        if self.machine.current().is_none() && !path.parent().is_some_and(Path::exists) {
            return;
        }
        match state.save_stamped(path) {
            Ok(version) => self.seen.state(Some(state), version),
            Err(e) => {
                self.seen.state = 0;
                tracing::debug!("cannot write {}: {e}", store::state_path(path).display());
            }
        }
    }

    /// Sends an alert to the owner's KakaoTalk in a task of its own: it never holds up a refresh.
    fn send_message(&self, token: crate::secret::Secret, text: &str) {
        let (client, cfg) = (self.ctx.client.clone(), self.cfg());
        let timeout = self.settings().request_timeout;
        let template = crate::kapi::text_template(text, cfg.message_link.as_deref(), None);
        tokio::spawn(
            async move {
                match crate::kapi::send_to_me(&client, &cfg, &token, &template, timeout).await {
                    Ok(()) => info!(event = Event::AlertSent.as_str(), "alert sent by KakaoTalk message"),
                    Err(e) => warn!(
                        event = Event::AlertFailed.as_str(),
                        "cannot send the alert by message: {e}"
                    ),
                }
            }
            .instrument(tracing::Span::current()),
        );
    }
}

/// Whether carrying out `effect` can write no line: a report, or a debug line while nothing anywhere
/// logs at debug level (a filter that logs one account's span at debug raises the global level too).
fn is_quiet(effect: &Effect) -> bool {
    match effect {
        Effect::Report(_) => true,
        Effect::Log(Line::Scheduled { .. } | Line::Debug(_) | Line::Repeated(..)) => {
            tracing::level_filters::LevelFilter::current() < tracing::level_filters::LevelFilter::DEBUG
        }
        _ => false,
    }
}

fn log(line: Line) {
    let time = |t: Option<Timestamp>| t.map(|t| t.to_string()).unwrap_or_default();
    match line {
        Line::Error(event, m) => error!(event = event.as_str(), "{m}"),
        Line::Warn(event, m) => warn!(event = event.as_str(), "{m}"),
        Line::Info(event, m) => info!(event = event.as_str(), "{m}"),
        Line::Repeated(event, m) => tracing::debug!(event = event.as_str(), "{m}"),
        Line::Debug(m) => tracing::debug!("{m}"),
        Line::Scheduled {
            expires_at,
            next_refresh,
        } => tracing::debug!(
            event = Event::Scheduled.as_str(),
            expires_at = %expires_at,
            next_refresh = %next_refresh,
            "scheduled"
        ),
        Line::Refreshed {
            expires_at,
            next_refresh,
            backup,
            pruned,
        } => info!(
            event = Event::Refreshed.as_str(),
            expires_at = %time(expires_at),
            next_refresh = %time(next_refresh),
            backup = backup.unwrap_or_default(),
            pruned,
            "refreshed"
        ),
        Line::Rotated {
            refresh_token_expires_at,
            written,
        } => info!(
            event = Event::Rotated.as_str(),
            refresh_token_expires_at = %refresh_token_expires_at.map(|t| t.to_string()).unwrap_or_else(|| "unknown".into()),
            written,
            "provider rotated the refresh token"
        ),
    }
}

/// Completes once shutdown has begun.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is dropped here, so the future stays Send.
    let _ = rx.wait_for(|s| *s).await;
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Runs blocking file work on the blocking pool, so that the runtime's threads keep serving every
/// account; a panic in it is passed on.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mailbox_coalesces_and_puts_stop_first() {
        let mut m = Mailbox::default();
        assert!(m.is_empty());
        m.send(Command::FileChanged);
        m.send(Command::FileChanged);
        assert!(!m.is_empty());
        assert!(matches!(m.take(), Some(Command::FileChanged)));
        // Both sends were one command; nothing else is pending.
        assert!(m.take().is_none());
        assert!(m.is_empty());
        m.send(Command::FileChanged);
        m.send(Command::Stop);
        assert!(m.stopping());
        assert!(matches!(m.take(), Some(Command::Stop)));
    }

    /// A start from the index skips the account's span only when nothing it does can write a line.
    #[test]
    fn only_reports_and_unwritten_debug_lines_are_quiet() {
        let report = Effect::Report(Report {
            account: "a".into(),
            expires_at: None,
            next_attempt: None,
            parked: false,
            refresh_token_expires_at: None,
            last_success_at: None,
            consecutive_failures: 0,
            outcome: None,
        });
        assert!(is_quiet(&report));
        for line in [
            Line::Warn(Event::RefreshTokenExpiring, "w".into()),
            Line::Info(Event::Refreshed, "i".into()),
            Line::Error(Event::RefreshFailed, "e".into()),
        ] {
            assert!(!is_quiet(&Effect::Log(line)));
        }
        assert!(!is_quiet(&Effect::RunHook));
        // With anything logging at debug level, a debug line is said, in the span.
        let debug = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(io::sink)
            .finish();
        tracing::subscriber::with_default(debug, || {
            let scheduled = Line::Scheduled {
                expires_at: Timestamp::UNIX_EPOCH,
                next_refresh: Timestamp::UNIX_EPOCH,
            };
            assert!(!is_quiet(&Effect::Log(scheduled)));
            assert!(!is_quiet(&Effect::Log(Line::Debug("d".into()))));
        });
    }

    /// Two clock jumps before the task looks are one of their sum, and come before a reload, which
    /// must reschedule from the clock as it now is.
    #[test]
    fn clock_jumps_add_up_and_come_before_a_reload() {
        use jiff::SignedDuration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[accounts.me]\nclient_id = \"abc\"\ntoken_file = \"me.json\"\n").unwrap();
        let cfg = crate::config::Config::load(&path).unwrap().accounts["me"].clone();
        let mut m = Mailbox::default();
        m.send(Command::Reload(cfg));
        m.send(Command::FileChanged);
        m.send(Command::ClockJumped(SignedDuration::from_secs(-3600)));
        m.send(Command::ClockJumped(SignedDuration::from_secs(-600)));
        match m.take() {
            Some(Command::ClockJumped(d)) => assert_eq!(d, SignedDuration::from_secs(-4200)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(m.take(), Some(Command::Reload(_))));
        // The reload re-reads the file: the change it would have re-read for is folded into it.
        assert!(m.take().is_none());
    }
}
