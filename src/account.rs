//! One account's life in the daemon: a task that sleeps until its token is due, refreshes it under the
//! lock, publishes the result, and backs off or parks on failure. Thousands of these cost a timer each.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use std::sync::Mutex;

use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, warn};

use crate::config::{Account, DaemonSettings};
use crate::kakao_errors::ErrorClass;
use crate::oauth::{OAuthClient, TokenError};
use crate::outputs;
use crate::refresh;
use crate::schedule::{self, RetryReason, TokenTimes};
use crate::store::{self, AccountState, Current, ReadError, TokenLock, read_token_file};
use crate::token;

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
    /// The account was removed from the config.
    Stop,
}

/// A task's commands: a Notify and three flags rather than a channel, which thousands of idle accounts
/// would each pay about a kilobyte for. Commands coalesce: two "file changed" are one re-read.
#[derive(Debug, Default)]
pub struct Mailbox {
    notify: Notify,
    pending: Mutex<Queued>,
}

#[derive(Debug, Default)]
struct Queued {
    stop: bool,
    reload: Option<Arc<Account>>,
    file_changed: bool,
}

impl Mailbox {
    pub fn send(&self, cmd: Command) {
        {
            let mut p = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match cmd {
                Command::Stop => p.stop = true,
                Command::Reload(cfg) => p.reload = Some(cfg),
                Command::FileChanged => p.file_changed = true,
            }
        }
        // Stores a permit when the task is busy, so nothing sent is missed.
        self.notify.notify_one();
    }

    fn take(&self) -> Option<Command> {
        let mut p = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.stop {
            return Some(Command::Stop);
        }
        if let Some(cfg) = p.reload.take() {
            // A reload re-reads the token file anyway.
            p.file_changed = false;
            return Some(Command::Reload(cfg));
        }
        std::mem::take(&mut p.file_changed).then_some(Command::FileChanged)
    }

    /// The next command, most important first: stop, reload, file changed.
    pub async fn recv(&self) -> Command {
        loop {
            if let Some(cmd) = self.take() {
                return cmd;
            }
            self.notify.notified().await;
        }
    }
}

/// Everything a task needs from the daemon.
#[derive(Debug, Clone)]
pub struct Context {
    pub client: OAuthClient,
    pub shared: watch::Receiver<Arc<Shared>>,
    pub shutdown: watch::Receiver<bool>,
    /// The wall clock's last jump: how much further it moved than the monotonic clock (positive after
    /// a suspend or a step forward), sent when one is noticed.
    pub clock: watch::Receiver<jiff::SignedDuration>,
    /// Where the task says how it stands, after start and after every change (readiness, status line).
    pub reports: mpsc::UnboundedSender<Report>,
}

/// How an account stands, as its task last said.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub account: String,
    /// The access token's expiry, when a token is held.
    pub expires_at: Option<Timestamp>,
    /// When the next refresh (or retry) is due; `None` while parked.
    pub next_attempt: Option<Timestamp>,
    /// No requests until the token file changes or the config is reloaded.
    pub parked: bool,
    pub refresh_token_expires_at: Option<Timestamp>,
    pub last_success_at: Option<Timestamp>,
    pub consecutive_failures: u32,
    /// How the attempt this report follows ended: success, failed (transient), refused (permanent),
    /// write_failed. `None` when no attempt just ended.
    pub outcome: Option<&'static str>,
}

/// A refreshed token not yet on disk, with the exact bytes to write.
#[derive(Debug, Clone)]
struct Pending {
    current: Current,
    bytes: Vec<u8>,
}

/// Why an account makes no requests until its token file changes or the config is reloaded.
#[derive(Debug, Clone, PartialEq)]
enum Parked {
    Missing,
    Unreadable(String),
    NoRefreshToken,
    Refused { code: String },
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Refresh (or retry) at this wall-clock time.
    Due(Timestamp),
    Parked(Parked),
}

pub struct AccountTask {
    cfg: Arc<Account>,
    stale_temps: Vec<std::path::PathBuf>,
    /// This token file's backups as last seen, so a refresh does not list the folder; dropped when
    /// someone else writes the file (they may have made backups too).
    backups: Option<store::Backups>,
    ctx: Context,
    commands: Arc<Mailbox>,
    current: Option<Current>,
    /// A refreshed token that could not be written yet (disk full, folder unwritable). It may hold a
    /// rotated refresh token that exists nowhere else, so it wins over the file until it is written.
    unwritten: Option<Pending>,
    /// The temp file of a write that failed (its folder turned read-only, say), which already holds the
    /// new token: the next try only renames it, and nothing is left behind.
    room: Option<store::Reservation>,
    last_refresh: Option<Timestamp>,
    phase: Phase,
    /// The monotonic twin of `Phase::Due`: timers run on it, so a clock set back cannot delay them.
    deadline: Instant,
    /// How far the wall clock has gone back since the token file with this digest was written: its
    /// times are in the old reckoning, and a reschedule from it (a reload) moves them by this much.
    clock_shift: Option<(u64, jiff::SignedDuration)>,
    failures: u32,
    state: AccountState,
    /// The last problem logged at warn/error level, so a failure that repeats is logged once.
    last_problem: Option<String>,
    /// How the attempt that just ended went, for the next report (metrics count outcomes).
    outcome: Option<&'static str>,
    /// The refresh token (by digest) already warned about, so each alert is raised once.
    alerted: Option<u64>,
}

impl std::fmt::Debug for AccountTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountTask")
            .field("account", &self.cfg.name)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

enum Step {
    Continue,
    Stop,
}

impl AccountTask {
    /// `stale_temps` and `backups`: what the supervisor's one listing of the folder found for this token
    /// file (temp files a crash left, removed under the lock; the backups kept).
    pub fn new(
        cfg: Arc<Account>,
        ctx: Context,
        commands: Arc<Mailbox>,
        stale_temps: Vec<std::path::PathBuf>,
        backups: store::Backups,
    ) -> AccountTask {
        AccountTask {
            cfg,
            stale_temps,
            backups: Some(backups),
            ctx,
            commands,
            current: None,
            unwritten: None,
            room: None,
            last_refresh: None,
            phase: Phase::Parked(Parked::Missing),
            deadline: Instant::now(),
            clock_shift: None,
            failures: 0,
            state: AccountState::default(),
            last_problem: None,
            outcome: None,
            alerted: None,
        }
    }

    fn settings(&self) -> DaemonSettings {
        self.ctx.shared.borrow().settings.clone()
    }

    fn shutting_down(&self) -> bool {
        *self.ctx.shutdown.borrow()
    }

    pub async fn run(mut self) {
        if !Box::pin(self.start()).await {
            return;
        }
        self.serve().await;
        Box::pin(self.last_write()).await;
    }

    /// The task's life, until shutdown or until the account is removed.
    async fn serve(&mut self) {
        loop {
            if self.shutting_down() {
                return;
            }
            let deadline = match &self.phase {
                Phase::Due(_) => Some(self.deadline),
                Phase::Parked(_) => None,
            };
            let mut shutdown = self.ctx.shutdown.clone();
            let mut clock = self.ctx.clock.clone();
            let mailbox = self.commands.clone();
            tokio::select! {
                biased;
                () = stopped(&mut shutdown) => return,
                // Before the mailbox: a reload that reschedules must see the clock's news first.
                _ = clock.changed() => {
                    // Marked seen on the task's own receiver, which the next round clones.
                    let drift = *self.ctx.clock.borrow_and_update();
                    self.clock_jumped(drift);
                }
                cmd = mailbox.recv() => match cmd {
                    Command::Stop => return,
                    Command::Reload(cfg) => self.reload(cfg),
                    Command::FileChanged => self.file_changed(),
                },
                () = sleep_until_opt(deadline) => {
                    // Boxed: the refresh's future (HTTP request, file write) is large, and an idle task
                    // should not carry its space for hours between refreshes.
                    if let Step::Stop = Box::pin(self.attempt()).await {
                        return;
                    }
                }
            }
        }
    }

    /// A refreshed token still waiting to be written gets one last try before the task ends: after it,
    /// the token would be gone, and with it, if the provider rotated, the only live refresh token.
    async fn last_write(&mut self) {
        if self.unwritten.is_none() {
            return;
        }
        if let Ok(Some(_lock)) = TokenLock::try_acquire(&self.cfg.token_file) {
            self.write_pending(None).await;
        }
        if self.unwritten.is_some() {
            error!(
                "stopping with a refreshed token that could not be written to {}: if the provider rotated the refresh token, the old one is dead; log in again: kakao-tokend login --account {}",
                self.cfg.token_file.display(),
                self.cfg.name
            );
        }
    }

    /// Prepares the folder, removes what a crash left behind (under the lock), and loads the file.
    async fn start(&mut self) -> bool {
        let path = self.cfg.token_file.clone();
        if let Some(dir) = path.parent()
            && let Err(e) = create_private_dir(dir)
        {
            error!(folder = %dir.display(), "cannot create the token file's folder: {e}");
        }
        let stale = std::mem::take(&mut self.stale_temps);
        if !stale.is_empty() {
            let mut shutdown = self.ctx.shutdown.clone();
            let lock = tokio::select! {
                l = TokenLock::acquire(&path) => l,
                () = stopped(&mut shutdown) => return false,
            };
            match lock.map(|_lock| store::remove_temp_files(&stale)) {
                Ok(Ok(removed)) if removed > 0 => info!(count = removed, "removed temp files left by an earlier crash"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("cannot clean up temp files beside {}: {e}", path.display()),
                Err(e) => warn!(lock = %store::lock_path(&path).display(), "cannot take the lock to clean up: {e}"),
            }
        }
        if let Ok(Some(state)) = AccountState::load(&path) {
            self.last_refresh = state.last_success_at;
            self.state = state;
        }
        self.load_from_disk(true);
        self.check_refresh_token_expiry();
        true
    }

    fn reload(&mut self, cfg: Arc<Account>) {
        if cfg.token_file != self.cfg.token_file {
            info!(token_file = %cfg.token_file.display(), "token file moved in the config");
            self.current = None;
            self.unwritten = None;
            self.room = None;
            self.last_refresh = None;
            self.backups = None;
        }
        self.cfg = cfg;
        // A reload is the person saying "try again": forget a permanent refusal and any backoff.
        self.failures = 0;
        self.last_problem = None;
        self.load_from_disk(true);
    }

    fn file_changed(&mut self) {
        if self.unwritten.is_some() {
            debug!("token file changed while a newer token waits to be written; keeping the newer one");
            return;
        }
        self.load_from_disk(false);
    }

    /// Reads the token file and decides what to do next. `force` reschedules even when the bytes are
    /// the ones already known (start, reload).
    fn load_from_disk(&mut self, force: bool) {
        if let Some(pending) = self.unwritten.clone() {
            self.current = Some(pending.current);
            self.reschedule();
            return;
        }
        match read_token_file(&self.cfg.token_file) {
            Ok(c) => {
                let same = self.current.as_ref().is_some_and(|old| old.digest == c.digest);
                if same && !force {
                    return;
                }
                if !same && self.current.is_some() {
                    info!("adopted a token file written by someone else");
                    self.failures = 0;
                    self.last_problem = None;
                    // A command (login, refresh) that wrote the file recorded its outcome in the state
                    // file: take that over rather than write an older view back later.
                    if let Ok(Some(state)) = AccountState::load(&self.cfg.token_file) {
                        self.state = state;
                    }
                    self.backups = None;
                } else if c.file.is_seed_format() {
                    info!("token file has no expiry times (the seed's format): refreshing it now");
                }
                self.current = Some(c);
                if matches!(self.phase, Phase::Parked(_)) && self.state.needs_login {
                    self.state.needs_login = false;
                }
                self.reschedule();
            }
            Err(ReadError::Missing) => {
                self.current = None;
                self.park(
                    Parked::Missing,
                    format!(
                        "token file {} does not exist: log in with kakao-tokend login --account {}",
                        self.cfg.token_file.display(),
                        self.cfg.name
                    ),
                );
            }
            Err(e) => {
                self.park(Parked::Unreadable(e.to_string()), format!(
                    "token file {} {e}: it is left as it is; restore a backup or log in with kakao-tokend login --account {}",
                    self.cfg.token_file.display(),
                    self.cfg.name
                ));
            }
        }
    }

    fn park(&mut self, why: Parked, message: String) {
        self.state.needs_login = matches!(why, Parked::Missing | Parked::NoRefreshToken) || self.state.needs_login;
        match why {
            Parked::Unreadable(_) => self.state.last_error_code = Some("unreadable_token_file".into()),
            Parked::Missing => self.state.last_error_code = Some("missing_token_file".into()),
            Parked::NoRefreshToken | Parked::Refused { .. } => {}
        }
        self.state.last_error = Some(message.clone());
        self.state.next_attempt_at = None;
        self.phase = Phase::Parked(why);
        // State before the log line, so that whoever reacts to the line reads a matching state file.
        self.save_state();
        self.report();
        if self.last_problem.as_deref() != Some(message.as_str()) {
            error!("{message}");
            self.last_problem = Some(message);
        }
    }

    /// Schedules the next refresh from the current token's times.
    fn reschedule(&mut self) {
        let Some(cur) = &self.current else { return };
        if cur.file.refresh_token.is_none() && self.unwritten.is_none() {
            let msg = format!(
                "token file {} holds no refresh_token: log in with kakao-tokend login --account {}",
                self.cfg.token_file.display(),
                self.cfg.name
            );
            self.park(Parked::NoRefreshToken, msg);
            return;
        }
        let lifetime =
            Duration::from_secs(cur.file.lifetime_secs().unwrap_or(token::DEFAULT_LIFETIME_SECS).max(0) as u64);
        let shift = self.clock_shift_of(cur.digest);
        let times = TokenTimes {
            expires_at: cur.file.expires_at.map(|t| t.checked_add(shift).unwrap_or(t)),
            lifetime,
            last_refresh: self.last_refresh,
        };
        let now = Timestamp::now();
        let due = schedule::next_refresh(times, self.settings().refresh_before_expiry, fastrand::f64(), now);
        let expires_at = cur.file.expires_at;
        self.set_due(due, now);
        // Said once it is so: whoever reacts to the line finds the timer set.
        if let Some(exp) = expires_at {
            debug!(expires_at = %exp, next_refresh = %token::floor_to_second(due.max(now)), "scheduled");
        }
        self.state.next_attempt_at = Some(token::floor_to_second(due.max(now)));
        self.report();
    }

    /// How far the clock has gone back since the token file with `digest` was written.
    fn clock_shift_of(&self, digest: u64) -> jiff::SignedDuration {
        match self.clock_shift {
            Some((d, shift)) if d == digest => shift,
            _ => jiff::SignedDuration::ZERO,
        }
    }

    /// Due at `at`, reckoned from `now`, the wall-clock reading `at` was computed from: a second reading
    /// could fall on the other side of a clock step and put the timer off by the step.
    fn set_due(&mut self, at: Timestamp, now: Timestamp) {
        self.phase = Phase::Due(at);
        self.deadline = Instant::now() + schedule::until(at, now);
    }

    /// The wall clock jumped: a suspend may have made the refresh due, a clock set back must not delay it.
    fn clock_jumped(&mut self, drift: jiff::SignedDuration) {
        if drift.is_negative() {
            // Times already taken from the wall clock move back with it, so that a later reschedule
            // (a reload re-reading the same file) does not put the refresh off by the jump.
            self.last_refresh = self.last_refresh.map(|t| t.checked_add(drift).unwrap_or(t));
            if let Some(digest) = self.current.as_ref().map(|c| c.digest) {
                let before = self.clock_shift_of(digest);
                self.clock_shift = Some((digest, before.checked_add(drift).unwrap_or(before)));
            }
        }
        let Phase::Due(at) = self.phase else { return };
        let now = Instant::now();
        let (at, remaining) = schedule::after_clock_jump(
            at,
            self.deadline.saturating_duration_since(now),
            drift,
            Timestamp::now(),
        );
        self.phase = Phase::Due(at);
        self.deadline = now + remaining;
        self.state.next_attempt_at = Some(token::floor_to_second(at));
        debug!(next_refresh = %self.state.next_attempt_at.map(|t| t.to_string()).unwrap_or_default(), "rescheduled after the clock jump");
        self.report();
    }

    fn lifetime(&self) -> Option<Duration> {
        self.current
            .as_ref()
            .and_then(|c| c.file.lifetime_secs())
            .map(|s| Duration::from_secs(s.max(0) as u64))
    }

    fn retry_later(&mut self, reason: RetryReason, retry_after: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = schedule::retry_delay(reason, self.failures, self.lifetime(), retry_after, fastrand::f64());
        let now = Timestamp::now();
        let at = schedule::add(now, delay);
        self.set_due(at, now);
        self.state.next_attempt_at = Some(token::floor_to_second(at));
        self.report();
        delay
    }

    /// Logs a problem at `warn` the first time it shows, and at `debug` while it repeats.
    fn report_problem(&mut self, key: String, message: &str) {
        if self.last_problem.as_deref() == Some(key.as_str()) {
            debug!("{message}");
        } else {
            warn!("{message}");
            self.last_problem = Some(key);
        }
    }

    async fn attempt(&mut self) -> Step {
        let permits = self.ctx.shared.borrow().permits.clone();
        let mut shutdown = self.ctx.shutdown.clone();
        let _permit = tokio::select! {
            p = permits.acquire_owned() => p.ok(),
            () = stopped(&mut shutdown) => return Step::Stop,
        };
        let path = self.cfg.token_file.clone();
        let lock = tokio::select! {
            l = TokenLock::acquire(&path) => l,
            () = stopped(&mut shutdown) => return Step::Stop,
        };
        let _lock = match lock {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("cannot take the lock {}: {e}", store::lock_path(&path).display());
                let delay = self.retry_later(RetryReason::Failure, None);
                self.report_problem(
                    format!("lock:{}", e.kind()),
                    &format!("{msg}; retrying in {}", fmt_delay(delay)),
                );
                return Step::Continue;
            }
        };

        if self.unwritten.is_some() {
            self.write_pending(None).await;
            return Step::Continue;
        }

        // Re-read under the lock: another process may have refreshed (or replaced) the file.
        let before = self.current.as_ref().map(|c| c.digest);
        self.load_from_disk(false);
        if self.current.as_ref().map(|c| c.digest) != before
            && let Phase::Due(at) = self.phase
            && at > Timestamp::now()
        {
            debug!("someone else refreshed the token; nothing to do");
            return Step::Continue;
        }
        let Phase::Due(_) = self.phase else {
            return Step::Continue;
        };
        let Some(cur) = self.current.clone() else {
            return Step::Continue;
        };
        if self.shutting_down() {
            return Step::Stop;
        }
        // Room for the new file before the request: Kakao kills the old refresh token as it answers, so
        // a full disk or an unwritable folder must show now, when it costs nothing.
        let reserved = match store::Reservation::take(&path, cur.len) {
            Ok(r) => r,
            Err(e) => {
                self.cannot_write(&e, "no refresh is sent until it can be, and the current file is kept");
                return Step::Continue;
            }
        };

        let timeout = self.settings().request_timeout;
        self.state.last_attempt_at = Some(token::floor_to_second(Timestamp::now()));
        match refresh::request(&self.ctx.client, &self.cfg, &cur.file, timeout).await {
            Ok(refreshed) => {
                self.last_refresh = Some(refreshed.sent_at);
                // Said after the write: until the new refresh token is on disk, nothing else happens.
                let rotated = refreshed.rotated.then_some(refreshed.file.refresh_token_expires_at);
                let progressed = refreshed.progressed;
                let digest = store::digest(&refreshed.bytes);
                self.unwritten = Some(Pending {
                    current: Current {
                        file: refreshed.file,
                        digest,
                        len: refreshed.bytes.len(),
                    },
                    bytes: refreshed.bytes,
                });
                self.write_pending(Some(reserved)).await;
                if let Some(expires) = rotated {
                    info!(
                        refresh_token_expires_at = %expires.map(|t| t.to_string()).unwrap_or_else(|| "unknown".into()),
                        written = self.unwritten.is_none(),
                        "provider rotated the refresh token"
                    );
                }
                if !progressed && self.unwritten.is_none() {
                    let delay = self.retry_later(RetryReason::NoProgress, None);
                    self.report_problem(
                        "no_progress".into(),
                        &format!(
                            "the refresh did not move the access token's expiry forward; backing off {}",
                            fmt_delay(delay)
                        ),
                    );
                    self.save_state();
                }
            }
            Err(e) => self.refresh_failed(&e),
        }
        Step::Continue
    }

    /// Publishes the refreshed token waiting in `unwritten`: the rotated refresh token reaches the disk
    /// before anything else happens. On failure the old file stays and the write is retried.
    async fn write_pending(&mut self, reserved: Option<store::Reservation>) {
        let Some(pending) = self.unwritten.clone() else { return };
        let keep = self.settings().backups;
        // fsync blocks: publish runs on the blocking pool.
        let published = outputs::publish_async(
            &self.cfg,
            &pending.current.file,
            &pending.bytes,
            keep,
            self.backups.take(),
            reserved.or_else(|| self.room.take()),
        )
        .await;
        self.backups = published.backups;
        self.room = published.room;
        match published.result {
            Ok(report) => {
                // The moment the new token is durable: the end of the window in which a crash would lose
                // a rotated refresh token.
                debug!("token file written and synced");
                self.unwritten = None;
                self.current = Some(pending.current.clone());
                if let Some(e) = &report.backup_error {
                    warn!("token file written, but its backup failed: {e}");
                }
                if let Some(e) = &report.env_error {
                    warn!(env_file = ?self.cfg.env_file, "token file written, but the env file could not be: {e}");
                }
                self.spawn_hook();
                if self.failures > 0 || self.last_problem.is_some() {
                    info!(after_failures = self.failures, "recovered");
                }
                self.failures = 0;
                self.last_problem = None;
                self.state.last_success_at = self.last_refresh.map(token::floor_to_second);
                self.state.consecutive_failures = 0;
                self.state.last_error_code = None;
                self.state.last_error = None;
                self.state.needs_login = false;
                self.outcome = Some("success");
                self.reschedule();
                self.check_refresh_token_expiry();
                // State before the log line: whoever reacts to "refreshed" sees both up to date.
                self.save_state();
                info!(
                    expires_at = %pending.current.file.expires_at.map(|t| t.to_string()).unwrap_or_default(),
                    next_refresh = %self.state.next_attempt_at.map(|t| t.to_string()).unwrap_or_default(),
                    backup = %report.backup.as_ref().and_then(|b| b.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    pruned = report.pruned,
                    "refreshed"
                );
            }
            Err(e) => self.cannot_write(&e, "the old file is kept and the new token is held in memory"),
        }
    }

    /// The token file's folder cannot take the file (full, unwritable): retry later, logged once per cause.
    fn cannot_write(&mut self, e: &io::Error, consequence: &str) {
        self.outcome = Some("write_failed");
        let delay = self.retry_later(RetryReason::Failure, None);
        self.state.consecutive_failures = self.failures;
        self.state.last_error_code = Some("write_failed".into());
        let msg = format!(
            "cannot write token file {}: {e}; {consequence}; retrying in {}",
            self.cfg.token_file.display(),
            fmt_delay(delay)
        );
        self.state.last_error = Some(msg.clone());
        self.save_state();
        self.report_problem(format!("write:{}", e.kind()), &msg);
    }

    fn refresh_failed(&mut self, e: &TokenError) {
        self.state.last_error_code = Some(e.code());
        match e.class() {
            ErrorClass::Permanent => {
                self.failures = self.failures.saturating_add(1);
                self.state.consecutive_failures = self.failures;
                self.state.needs_login = e.needs_login();
                let msg = format!(
                    "refresh refused, no more attempts until the token file changes or the config is reloaded: {e}; fix: {}",
                    e.fix(&self.cfg.name)
                );
                self.outcome = Some("refused");
                self.park(Parked::Refused { code: e.code() }, msg);
                if e.needs_login() {
                    let name = &self.cfg.name;
                    let code = e.code();
                    let log = format!(
                        "the refresh token of account {name} is dead ({code}): log in again: kakao-tokend login --account {name}"
                    );
                    let chat = format!(
                        "[kakao-tokend] {name}: 리프레시 토큰이 만료되었습니다 ({code}). 다시 로그인하세요: kakao-tokend login --account {name}"
                    );
                    self.alert(&log, &chat);
                }
            }
            ErrorClass::Transient => {
                let reason = if e.is_rate_limit() {
                    RetryReason::RateLimited
                } else {
                    RetryReason::Failure
                };
                self.outcome = Some("failed");
                let delay = self.retry_later(reason, e.retry_after());
                self.state.consecutive_failures = self.failures;
                let expired = self
                    .current
                    .as_ref()
                    .and_then(|c| c.file.expires_at)
                    .is_some_and(|exp| exp <= Timestamp::now());
                let msg = format!(
                    "refresh failed (attempt {}): {e}; retrying in {}{}",
                    self.failures,
                    fmt_delay(delay),
                    if expired {
                        "; the access token has expired"
                    } else {
                        "; the current token is still valid"
                    }
                );
                self.state.last_error = Some(msg.clone());
                self.save_state();
                self.report_problem(format!("refresh:{}:{expired}", e.code()), &msg);
            }
        }
    }

    /// Runs the account's `on_refresh` hook in a task of its own: a slow or failing hook never holds up
    /// this account's schedule or any other account.
    fn spawn_hook(&self) {
        if self.cfg.on_refresh.is_none() {
            return;
        }
        let (cfg, timeout) = (self.cfg.clone(), self.settings().hook_timeout);
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                match outputs::run_hook(&cfg, timeout).await {
                    Ok(output) => info!(output = output.unwrap_or_default(), "on_refresh hook ran"),
                    Err(e) => warn!("on_refresh hook failed: {e}"),
                }
            }
            .instrument(span),
        );
    }

    /// Warns once per refresh token when it has under [`schedule::refresh_token_warning`] left and the provider
    /// has not sent a new one (Kakao sends one in the old one's last month, at the next refresh).
    fn check_refresh_token_expiry(&mut self) {
        let Some(cur) = &self.current else { return };
        let (Some(rt), Some(expires)) = (&cur.file.refresh_token, cur.file.refresh_token_expires_at) else {
            return;
        };
        let lifetime = cur
            .file
            .refresh_token_expires_in
            .map(|s| Duration::from_secs(s.max(0) as u64));
        let left = schedule::until(expires, Timestamp::now());
        if left >= schedule::refresh_token_warning(lifetime) {
            return;
        }
        let name = &self.cfg.name;
        let log = format!(
            "the refresh token of account {name} expires at {expires} (in {}) and the provider has sent no new one: log in again before then: kakao-tokend login --account {name}",
            fmt_delay(left)
        );
        let chat = format!(
            "[kakao-tokend] {name}: 리프레시 토큰이 {expires}에 만료됩니다. 그 전에 다시 로그인하세요: kakao-tokend login --account {name}"
        );
        let digest = store::digest(rt.expose().as_bytes());
        if self.alerted != Some(digest) {
            self.alerted = Some(digest);
            self.alert(&log, &chat);
        }
    }

    /// Logs an alert and, with `notify_by_message`, sends it to the owner's KakaoTalk while the access
    /// token still works (in a task of its own: it never holds up a refresh).
    fn alert(&self, message: &str, chat: &str) {
        warn!("{message}");
        if !self.cfg.notify_by_message {
            return;
        }
        let Some(cur) = self
            .current
            .as_ref()
            .filter(|c| c.file.expires_at.is_some_and(|e| e > Timestamp::now()))
        else {
            warn!("cannot send the alert by message: the access token does not work either");
            return;
        };
        let (client, cfg, token) = (self.ctx.client.clone(), self.cfg.clone(), cur.file.access_token.clone());
        let timeout = self.settings().request_timeout;
        let text: String = chat.chars().take(crate::kapi::MAX_TEXT_CHARS).collect();
        let template = crate::kapi::text_template(&text, cfg.message_link.as_deref(), None);
        tokio::spawn(
            async move {
                match crate::kapi::send_to_me(&client, &cfg, &token, &template, timeout).await {
                    Ok(()) => info!("alert sent by KakaoTalk message"),
                    Err(e) => warn!("cannot send the alert by message: {e}"),
                }
            }
            .instrument(tracing::Span::current()),
        );
    }

    fn report(&mut self) {
        let report = Report {
            account: self.cfg.name.clone(),
            expires_at: self.current.as_ref().and_then(|c| c.file.expires_at),
            next_attempt: match self.phase {
                Phase::Due(at) => Some(at),
                Phase::Parked(_) => None,
            },
            parked: matches!(self.phase, Phase::Parked(_)),
            refresh_token_expires_at: self.current.as_ref().and_then(|c| c.file.refresh_token_expires_at),
            last_success_at: self.state.last_success_at,
            consecutive_failures: self.failures,
            outcome: self.outcome.take(),
        };
        // The supervisor is gone only at shutdown.
        let _ = self.ctx.reports.send(report);
    }

    fn save_state(&self) {
        if self.current.is_none() && !self.cfg.token_file.parent().is_some_and(Path::exists) {
            return;
        }
        if let Err(e) = self.state.save(&self.cfg.token_file) {
            debug!(
                "cannot write {}: {e}",
                store::state_path(&self.cfg.token_file).display()
            );
        }
    }
}

/// Completes once shutdown has begun.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is dropped here, so the future stays Send.
    let _ = rx.wait_for(|s| *s).await;
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn fmt_delay(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_mailbox_coalesces_and_puts_stop_first() {
        let m = Mailbox::default();
        m.send(Command::FileChanged);
        m.send(Command::FileChanged);
        assert!(matches!(m.recv().await, Command::FileChanged));
        // Both sends were one command; nothing else is pending.
        assert!(m.take().is_none());
        m.send(Command::FileChanged);
        m.send(Command::Stop);
        assert!(matches!(m.recv().await, Command::Stop));
        // A command sent while nobody waits is not lost.
        let m = Arc::new(Mailbox::default());
        let waiter = tokio::spawn({
            let m = m.clone();
            async move { matches!(m.recv().await, Command::FileChanged) }
        });
        m.send(Command::FileChanged);
        assert!(waiter.await.unwrap());
    }
}
