//! One account's refresh logic as a state machine without I/O. The shell ([`super::task`]) feeds it
//! events (a file read, the timer, the provider's answer, a write's result, a clock jump, a reload),
//! each with the time and a random draw, and carries out the effects it returns. Every rule about when
//! to refresh, when to back off or park, and which file to believe lives here, so that it is tested in
//! milliseconds with plain `#[test]`s; the shell only reads, writes, sends and sleeps.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::account::Account;
use crate::answer::TokenError;
use crate::compact::{Secs, Stamp};
use crate::events::Event;
use crate::kakao_errors::ErrorClass;
use crate::record::{Reader, Writer};
use crate::schedule::{self, RefreshBefore, RetryReason, TokenTimes};
use crate::secret::Secret;
use crate::state::{self, AccountState, Current, PublishReport, ReadError};
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
    /// The answer's access token could not be used, and only its rotated refresh token is in `file`:
    /// written, then counted as a failed refresh.
    pub refused: Option<token::Unusable>,
}

/// The two clocks, read once per event: the wall clock for the token's times, and the monotonic clock
/// (time since the shell started) for timers, which a clock step cannot move.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Now {
    pub wall: Timestamp,
    pub mono: Duration,
}

/// What comes with every event besides the event itself.
#[derive(Debug, Clone, Copy)]
pub struct Input {
    pub now: Now,
    /// Uniform in [0, 1): spreads refreshes and retries so that accounts do not move in step.
    pub jitter: f64,
    pub policy: RefreshBefore,
}

/// What the shell read from disk: the token file and, when that file is new to the machine, the state
/// file a command may have written beside it.
#[derive(Debug)]
pub struct FileRead {
    pub token: Result<Current, ReadError>,
    pub state: Option<AccountState>,
}

/// A refreshed token not yet on disk, with the exact bytes to write.
#[derive(Clone)]
pub struct Pending {
    pub current: Current,
    pub bytes: Vec<u8>,
}

/// The bytes hold the tokens in the clear: a debug print shows their length only.
impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("current", &self.current)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// What the machine keeps of the token file it knows: the file's digest and times, and none of its
/// tokens. Every idle account holds one, so it is kept small: a refresh takes the tokens from the file
/// it re-reads under the lock, and a write hands the machine the new file whole.
#[derive(Debug, Clone)]
pub struct Held {
    pub digest: u64,
    expires_at: Stamp,
    refresh_token_expires_at: Stamp,
    lifetime_secs: Secs,
    refresh_token_expires_in: Secs,
    /// The refresh token's digest (alerts are raised once per refresh token); `None` when the file
    /// holds no refresh token.
    refresh_token: Option<u64>,
    /// Kept only for an account that sends alerts by message: the access token they are sent with.
    access_token: Option<Box<Secret>>,
}

impl Held {
    fn of(c: &Current, keep_access_token: bool) -> Held {
        let f = &c.file;
        Held {
            digest: c.digest,
            expires_at: Stamp::new(f.expires_at),
            refresh_token_expires_at: Stamp::new(f.refresh_token_expires_at),
            lifetime_secs: Secs::new(f.lifetime_secs()),
            refresh_token_expires_in: Secs::new(f.refresh_token_expires_in),
            refresh_token: f.refresh_token.as_ref().map(|rt| state::digest(rt.expose().as_bytes())),
            access_token: keep_access_token.then(|| Box::new(f.access_token.clone())),
        }
    }

    /// Appends this to a start index record; false (nothing usable written) for an account that keeps
    /// its access token, which no file but the token file may hold.
    pub fn to_record(&self, w: &mut Writer) -> bool {
        if self.access_token.is_some() {
            return false;
        }
        w.u64(self.digest);
        w.stamp(self.expires_at);
        w.stamp(self.refresh_token_expires_at);
        w.secs(self.lifetime_secs);
        w.secs(self.refresh_token_expires_in);
        match self.refresh_token {
            None => w.u8(0),
            Some(d) => {
                w.u8(1);
                w.u64(d);
            }
        }
        true
    }

    pub fn from_record(r: &mut Reader<'_>) -> Option<Held> {
        Some(Held {
            digest: r.u64()?,
            expires_at: r.stamp()?,
            refresh_token_expires_at: r.stamp()?,
            lifetime_secs: r.secs()?,
            refresh_token_expires_in: r.secs()?,
            refresh_token: match r.u8()? {
                0 => None,
                1 => Some(r.u64()?),
                _ => return None,
            },
            access_token: None,
        })
    }

    pub fn expires_at(&self) -> Option<Timestamp> {
        self.expires_at.get()
    }

    pub fn refresh_token_expires_at(&self) -> Option<Timestamp> {
        self.refresh_token_expires_at.get()
    }
}

/// How an account stands, as its machine last said.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub account: Arc<str>,
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

/// What the shell is to do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Write the state file (which `status` reads).
    SaveState(AccountState),
    /// Tell the supervisor (readiness, metrics, the status line).
    Report(Report),
    /// Run the account's `on_refresh` hook.
    RunHook,
    /// Send an alert to the owner's KakaoTalk with this access token, which is still valid.
    Message { access_token: Secret, text: String },
    /// Log a line. Every line the machine has to say is an effect: the ones people and tools react to
    /// come out after the state file they speak of is saved, and the machine itself does no I/O.
    Log(Line),
}

/// What follows an answer: the write of the new token and nothing else, or effects to carry out. A
/// write is not an [`Effect`]: only an answer asks for one, so no other call can return it.
#[derive(Debug)]
pub enum AfterAnswer {
    /// Publish this token under the lock, and answer with [`Machine::written`]. Nothing else happens
    /// to the account until then: it may hold the only live refresh token.
    Write(Box<Pending>),
    Effects(Vec<Effect>),
}

/// A log line the shell writes in its turn among the effects.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Error(Event, String),
    Warn(Event, String),
    Info(Event, String),
    /// A problem that repeats: at debug level, with its event.
    Repeated(Event, String),
    Debug(String),
    /// The next refresh is scheduled (debug level, with its times).
    Scheduled {
        expires_at: Timestamp,
        next_refresh: Timestamp,
    },
    Refreshed {
        expires_at: Option<Timestamp>,
        next_refresh: Option<Timestamp>,
        backup: Option<String>,
        pruned: usize,
    },
    Rotated {
        refresh_token_expires_at: Option<Timestamp>,
        written: bool,
    },
}

/// Why an account makes no requests until its token file changes or the config is reloaded.
#[derive(Debug, Clone, PartialEq)]
pub enum Parked {
    Missing,
    Unreadable(String),
    NoRefreshToken,
    Refused { code: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Refresh (or retry) at this wall-clock time; the timer runs on `Machine::deadline`.
    Due(Timestamp),
    Parked(Parked),
}

/// What the answer to a refresh said beyond the token, kept until the write it leads to is done.
#[derive(Debug, Clone)]
struct Answered {
    rotated: bool,
    refresh_token_expires_at: Option<Timestamp>,
    progressed: bool,
    /// Only the rotated refresh token was usable: once it is written, the refresh counts as failed.
    refused: Option<token::Unusable>,
}

#[derive(Debug)]
pub struct Machine {
    cfg: Arc<Account>,
    current: Option<Held>,
    /// A refreshed token that could not be written yet (disk full, folder unwritable). It may hold a
    /// rotated refresh token that exists nowhere else, so it wins over the file until it is written.
    /// Boxed: it is there for an instant per refresh, and every idle account would carry its size.
    unwritten: Option<Box<Pending>>,
    /// Boxed, as `unwritten` is: it lives from an answer to its write.
    answered: Option<Box<Answered>>,
    /// When the last refresh that worked was sent.
    last_refresh: Stamp,
    phase: Phase,
    /// The monotonic twin of `Phase::Due`: timers run on it, so a clock set back cannot delay them.
    deadline: Duration,
    /// How far the wall clock has gone back since the token file with this digest was written: its
    /// times are in the old reckoning, and a reschedule from it (a reload) moves them by this much.
    /// Boxed: the clock seldom goes back, and every idle account would carry its 32 bytes.
    clock_shift: Option<Box<(u64, SignedDuration)>>,
    failures: u32,
    state: AccountState,
    /// The last problem logged at warn/error level, so a failure that repeats is logged once.
    last_problem: Option<String>,
    /// How the attempt that just ended went, for the next report (metrics count outcomes).
    outcome: Option<&'static str>,
    /// The refresh token (by digest) already warned about, so each alert is raised once.
    alerted: Option<u64>,
    effects: Vec<Effect>,
}

impl Machine {
    pub fn new(cfg: Arc<Account>) -> Machine {
        Machine {
            cfg,
            current: None,
            unwritten: None,
            answered: None,
            last_refresh: Stamp::NONE,
            phase: Phase::Parked(Parked::Missing),
            deadline: Duration::ZERO,
            clock_shift: None,
            failures: 0,
            state: AccountState::default(),
            last_problem: None,
            outcome: None,
            alerted: None,
            effects: Vec::new(),
        }
    }

    pub fn account(&self) -> &Arc<Account> {
        &self.cfg
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// When the timer fires, on the monotonic clock; `None` while parked.
    pub fn deadline(&self) -> Option<Duration> {
        matches!(self.phase, Phase::Due(_)).then_some(self.deadline)
    }

    /// The digest of the token file as the machine knows it: a read with another digest comes with
    /// the state file.
    pub fn known_digest(&self) -> Option<u64> {
        self.current.as_ref().map(|c| c.digest)
    }

    pub fn current(&self) -> Option<&Held> {
        self.current.as_ref()
    }

    /// A refreshed token waiting to be written, which the next attempt writes before anything else.
    pub fn unwritten(&self) -> Option<&Pending> {
        self.unwritten.as_deref()
    }

    pub fn state(&self) -> &AccountState {
        &self.state
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn done(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The task starts: the state file as last saved, and the token file.
    pub fn start(&mut self, state: Option<AccountState>, read: FileRead, input: &Input) -> Vec<Effect> {
        if let Some(state) = state {
            self.last_refresh = Stamp::new(state.last_success_at());
            self.state = state;
        }
        self.load(read, true, input);
        self.check_refresh_token_expiry(input);
        self.done()
    }

    /// The task starts from what the start index kept of the token file and the state file, both found
    /// unchanged since: as [`start`](Self::start) with a read of that file, without reading it.
    pub fn start_known(&mut self, state: Option<AccountState>, held: Held, input: &Input) -> Vec<Effect> {
        if let Some(state) = state {
            self.last_refresh = Stamp::new(state.last_success_at());
            self.state = state;
        }
        self.current = Some(held);
        // As `load` does with a file read: a token file where a login was needed means the login came.
        if matches!(self.phase, Phase::Parked(_)) && self.state.needs_login() {
            self.state.login_seen();
        }
        self.reschedule(input);
        self.check_refresh_token_expiry(input);
        self.done()
    }

    /// SIGHUP: new settings for this account, and the token file read again (from its new path, if it
    /// moved). A reload is the person saying "try again": a refusal and any backoff are forgotten.
    pub fn reload(&mut self, cfg: Arc<Account>, read: FileRead, input: &Input) -> Vec<Effect> {
        if cfg.token_file != self.cfg.token_file {
            self.say(Line::Info(
                Event::TokenFileMoved,
                format!("token file moved in the config to {}", cfg.token_file.display()),
            ));
            self.current = None;
            self.unwritten = None;
            self.answered = None;
            self.last_refresh = Stamp::NONE;
        }
        self.cfg = cfg;
        self.failures = 0;
        self.last_problem = None;
        self.load(read, true, input);
        self.done()
    }

    /// The token file changed on disk.
    pub fn file_changed(&mut self, read: FileRead, input: &Input) -> Vec<Effect> {
        if self.unwritten.is_some() {
            self.say(Line::Debug(
                "token file changed while a newer token waits to be written; keeping the newer one".into(),
            ));
        } else {
            self.load(read, false, input);
        }
        self.done()
    }

    /// The timer fired and the lock could not be taken.
    pub fn lock_failed(&mut self, e: &io::Error, input: &Input) -> Vec<Effect> {
        // The store's error names its lock (a file beside the token file, or an etcd key).
        let msg = format!("cannot take the refresh lock: {e}");
        let delay = self.retry_later(RetryReason::Failure, None, input);
        self.report_problem(
            Event::LockFailed,
            format!("lock:{}", e.kind()),
            &format!("{msg}; retrying in {}", fmt_delay(delay)),
        );
        self.done()
    }

    /// The timer fired and the lock is held: the file as it is now. Returns the file to refresh, or
    /// `None` when there is nothing to send (someone else refreshed it, or it cannot be refreshed).
    pub fn locked(&mut self, read: FileRead, input: &Input) -> (Option<Current>, Vec<Effect>) {
        let before = self.known_digest();
        let read = self.load(read, false, input);
        let refresh = match self.phase {
            Phase::Due(at) if self.known_digest() != before && at > input.now.wall => {
                self.say(Line::Debug("someone else refreshed the token; nothing to do".into()));
                None
            }
            Phase::Due(_) => read,
            Phase::Parked(_) => None,
        };
        (refresh, self.done())
    }

    /// The room for the new file could not be taken: nothing is sent.
    pub fn cannot_reserve(&mut self, e: &io::Error, input: &Input) -> Vec<Effect> {
        self.cannot_write(
            e,
            "no refresh is sent until it can be, and the current file is kept",
            input,
        );
        self.done()
    }

    /// The request is about to leave.
    pub fn sending(&mut self, input: &Input) {
        self.state.attempted(input.now.wall);
    }

    /// The provider answered (or did not).
    pub fn answered(&mut self, result: Result<Refreshed, TokenError>, input: &Input) -> AfterAnswer {
        match result {
            Ok(refreshed) => {
                self.last_refresh = Stamp::new(Some(refreshed.sent_at));
                // After a clock set back the file's expiry is in the old reckoning: moved by the shift,
                // a new expiry that looks earlier may still be later (found by the property test).
                let shifted_progress = self.current.as_ref().is_some_and(|c| {
                    let old = c
                        .expires_at()
                        .map(|t| t.checked_add(self.clock_shift_of(c.digest)).unwrap_or(t));
                    matches!((old, refreshed.file.expires_at), (Some(old), Some(new)) if new > old)
                });
                self.answered = Some(Box::new(Answered {
                    rotated: refreshed.rotated,
                    refresh_token_expires_at: refreshed.file.refresh_token_expires_at,
                    progressed: refreshed.progressed || shifted_progress,
                    refused: refreshed.refused,
                }));
                let digest = state::digest(&refreshed.bytes);
                // A file that keeps the old access token's times (a hostile answer with a rotated
                // refresh token) keeps their reckoning too: the shift follows it to its new digest.
                if let Some(c) = &self.current
                    && c.expires_at().is_some()
                    && c.expires_at() == refreshed.file.expires_at
                {
                    let shift = self.clock_shift_of(c.digest);
                    if !shift.is_zero() {
                        self.clock_shift = Some(Box::new((digest, shift)));
                    }
                }
                let pending = Pending {
                    current: Current {
                        file: refreshed.file,
                        digest,
                        len: refreshed.bytes.len(),
                        version: state::Version::UNKNOWN,
                    },
                    bytes: refreshed.bytes,
                };
                self.unwritten = Some(Box::new(pending.clone()));
                // The rotated refresh token reaches the disk before anything else happens.
                debug_assert!(
                    self.effects.is_empty(),
                    "effects left before a write: {:?}",
                    self.effects
                );
                AfterAnswer::Write(Box::new(pending))
            }
            Err(e) => {
                self.refresh_failed(&e, input);
                AfterAnswer::Effects(self.done())
            }
        }
    }

    /// How the write of [`AfterAnswer::Write`] went. On failure the old file stays, the new token is held,
    /// and the next attempt only writes it.
    pub fn written(&mut self, result: io::Result<PublishReport>, input: &Input) -> Vec<Effect> {
        let Some(pending) = self.unwritten.as_deref().cloned() else {
            return self.done();
        };
        let refused = self.answered.as_ref().and_then(|a| a.refused.clone());
        match result {
            Ok(_) if let Some(why) = refused => {
                // The rotated refresh token is durable; the unusable access token reached nothing. The
                // refresh itself failed: no hook, and a retry with backoff.
                self.say(Line::Debug(
                    "rotated refresh token written and synced, with the previous access token".into(),
                ));
                self.unwritten = None;
                self.current = Some(self.hold(&pending.current));
                self.refresh_failed(&TokenError::Unusable(why), input);
            }
            Ok(report) => {
                // The moment the new token is durable: the end of the window in which a crash would lose
                // a rotated refresh token.
                self.say(Line::Debug("token file written and synced".into()));
                self.unwritten = None;
                self.current = Some(self.hold(&pending.current));
                if let Some(e) = &report.backup_error {
                    self.say(Line::Warn(
                        Event::BackupFailed,
                        format!("token file written, but its backup failed: {e}"),
                    ));
                }
                if let (Some(e), Some(path)) = (&report.env_error, &self.cfg.env_file) {
                    let path = path.display();
                    self.say(Line::Warn(
                        Event::EnvFileFailed,
                        format!("token file written, but the env file {path} could not be: {e}"),
                    ));
                }
                if self.cfg.on_refresh.is_some() {
                    self.effects.push(Effect::RunHook);
                }
                if self.failures > 0 || self.last_problem.is_some() {
                    let failures = self.failures;
                    self.say(Line::Info(
                        Event::Recovered,
                        format!("recovered after {failures} failed attempts"),
                    ));
                }
                self.failures = 0;
                self.last_problem = None;
                self.state.succeeded(self.last_refresh.get());
                self.outcome = Some("success");
                self.reschedule(input);
                self.check_refresh_token_expiry(input);
                // State before the log line: whoever reacts to "refreshed" sees both up to date.
                self.save_state();
                self.say(Line::Refreshed {
                    expires_at: pending.current.file.expires_at,
                    next_refresh: self.state.next_attempt_at(),
                    backup: report
                        .backup
                        .as_ref()
                        .and_then(|b| b.file_name())
                        .map(|n| n.to_string_lossy().into_owned()),
                    pruned: report.pruned,
                });
            }
            Err(e) => self.cannot_write(&e, "the old file is kept and the new token is held in memory", input),
        }
        // Said after the write: until the new refresh token is on disk, nothing else happens.
        if let Some(answer) = self.answered.take() {
            let written = self.unwritten.is_none();
            if answer.rotated {
                self.say(Line::Rotated {
                    refresh_token_expires_at: answer.refresh_token_expires_at,
                    written,
                });
            }
            if !answer.progressed && written && answer.refused.is_none() {
                let delay = self.retry_later(RetryReason::NoProgress, None, input);
                self.report_problem(
                    Event::NoProgress,
                    "no_progress".into(),
                    &format!(
                        "the refresh did not move the access token's expiry forward; backing off {}",
                        fmt_delay(delay)
                    ),
                );
                self.save_state();
            }
        }
        self.done()
    }

    /// The task is ending. A token still unwritten is lost with it: say so, and what to do.
    pub fn stopping(&mut self) -> Vec<Effect> {
        if self.unwritten.is_some() {
            let message = format!(
                "stopping with a refreshed token that could not be written to {}: if the provider rotated the refresh token, the old one is dead; log in again: kakao-tokend login --account {}",
                self.cfg.token_file.display(),
                self.cfg.name
            );
            self.say(Line::Error(Event::UnwrittenAtStop, message));
        }
        self.done()
    }

    /// The wall clock jumped by `drift` more than the monotonic clock: a suspend may have made the
    /// refresh due, and a clock set back must not delay it.
    pub fn clock_jumped(&mut self, drift: SignedDuration, input: &Input) -> Vec<Effect> {
        if drift.is_negative() {
            // Times already taken from the wall clock move back with it, so that a later reschedule
            // (a reload re-reading the same file) does not put the refresh off by the jump.
            let last = self.last_refresh.get();
            self.last_refresh = Stamp::new(last.map(|t| t.checked_add(drift).unwrap_or(t)));
            // A token waiting to be written is the one the next schedule comes from: its times too are
            // in the old reckoning (found by the property test below).
            let held = self
                .unwritten
                .as_ref()
                .map(|p| p.current.digest)
                .or(self.known_digest());
            if let Some(digest) = held {
                let before = self.clock_shift_of(digest);
                self.clock_shift = Some(Box::new((digest, before.checked_add(drift).unwrap_or(before))));
            }
        }
        if let Phase::Due(at) = self.phase {
            let now = input.now;
            let (at, remaining) =
                schedule::after_clock_jump(at, self.deadline.saturating_sub(now.mono), drift, now.wall);
            self.phase = Phase::Due(at);
            self.deadline = now.mono + remaining;
            self.state.scheduled(Some(at));
            self.say(Line::Debug(format!(
                "rescheduled after the clock jump: next refresh {}",
                token::floor_to_second(at)
            )));
            self.report();
        }
        self.done()
    }

    fn hold(&self, c: &Current) -> Held {
        Held::of(c, self.cfg.notify_by_message)
    }

    /// Takes in a read of the token file and decides what to do next. `force` reschedules even when
    /// the bytes are the ones already known (start, reload). Returns the file, tokens and all, that the
    /// machine now goes by.
    fn load(&mut self, read: FileRead, force: bool, input: &Input) -> Option<Current> {
        if let Some(pending) = &self.unwritten {
            let pending = pending.current.clone();
            self.current = Some(self.hold(&pending));
            self.reschedule(input);
            return Some(pending);
        }
        match read.token {
            Ok(c) => {
                let same = self.known_digest() == Some(c.digest);
                if same && !force {
                    return Some(c);
                }
                if !same && self.current.is_some() {
                    self.say(Line::Info(
                        Event::Adopted,
                        "adopted a token file written by someone else".into(),
                    ));
                    self.failures = 0;
                    self.last_problem = None;
                    // A command (login, refresh) that wrote the file recorded its outcome in the state
                    // file: take that over rather than write an older view back later.
                    if let Some(state) = read.state {
                        self.state = state;
                    }
                } else if c.file.is_seed_format() {
                    self.say(Line::Info(
                        Event::SeedFormat,
                        "token file has no expiry times (the seed's format): refreshing it now".into(),
                    ));
                }
                self.current = Some(self.hold(&c));
                if matches!(self.phase, Phase::Parked(_)) && self.state.needs_login() {
                    self.state.login_seen();
                }
                self.reschedule(input);
                Some(c)
            }
            Err(ReadError::Missing) => {
                self.current = None;
                let msg = format!(
                    "token file {} does not exist: log in with kakao-tokend login --account {}",
                    self.cfg.token_file.display(),
                    self.cfg.name
                );
                self.park(Parked::Missing, msg);
                None
            }
            Err(e) => {
                let msg = format!(
                    "token file {} {e}: it is left as it is; restore a backup or log in with kakao-tokend login --account {}",
                    self.cfg.token_file.display(),
                    self.cfg.name
                );
                self.park(Parked::Unreadable(e.to_string()), msg);
                None
            }
        }
    }

    fn park(&mut self, why: Parked, message: String) {
        let code = match why {
            Parked::Unreadable(_) => Some("unreadable_token_file"),
            Parked::Missing => Some("missing_token_file"),
            Parked::NoRefreshToken | Parked::Refused { .. } => None,
        };
        let needs_login = matches!(why, Parked::Missing | Parked::NoRefreshToken);
        self.state.parked(code, message.clone(), needs_login);
        let why_event = why.clone();
        self.phase = Phase::Parked(why);
        // State before the log line, so that whoever reacts to the line reads a matching state file.
        self.save_state();
        self.report();
        if self.last_problem.as_deref() != Some(message.as_str()) {
            let event = match why_event {
                Parked::Missing => Event::TokenFileMissing,
                Parked::Unreadable(_) => Event::TokenFileUnreadable,
                Parked::NoRefreshToken => Event::NoRefreshToken,
                Parked::Refused { .. } => Event::RefreshRefused,
            };
            self.say(Line::Error(event, message.clone()));
            self.last_problem = Some(message);
        }
    }

    /// Schedules the next refresh from the current token's times.
    fn reschedule(&mut self, input: &Input) {
        let Some(cur) = &self.current else { return };
        if cur.refresh_token.is_none() && self.unwritten.is_none() {
            let msg = format!(
                "token file {} holds no refresh_token: log in with kakao-tokend login --account {}",
                self.cfg.token_file.display(),
                self.cfg.name
            );
            self.park(Parked::NoRefreshToken, msg);
            return;
        }
        let lifetime =
            Duration::from_secs(cur.lifetime_secs.get().unwrap_or(token::DEFAULT_LIFETIME_SECS).max(0) as u64);
        let shift = self.clock_shift_of(cur.digest);
        let times = TokenTimes {
            expires_at: cur.expires_at().map(|t| t.checked_add(shift).unwrap_or(t)),
            lifetime,
            last_refresh: self.last_refresh.get(),
        };
        let now = input.now.wall;
        let due = schedule::next_refresh(times, input.policy, input.jitter, now);
        let expires_at = cur.expires_at();
        self.set_due(due, input.now);
        if let Some(exp) = expires_at {
            self.say(Line::Scheduled {
                expires_at: exp,
                next_refresh: token::floor_to_second(due.max(now)),
            });
        }
        self.state.scheduled(Some(due.max(now)));
        self.report();
    }

    /// How far the clock has gone back since the token file with `digest` was written.
    fn clock_shift_of(&self, digest: u64) -> SignedDuration {
        match self.clock_shift.as_deref() {
            Some(&(d, shift)) if d == digest => shift,
            _ => SignedDuration::ZERO,
        }
    }

    /// Due at `at`, reckoned from `now`, the one reading `at` was computed from: a second reading could
    /// fall on the other side of a clock step and put the timer off by the step.
    fn set_due(&mut self, at: Timestamp, now: Now) {
        self.phase = Phase::Due(at);
        self.deadline = now.mono + schedule::until(at, now.wall);
    }

    fn lifetime(&self) -> Option<Duration> {
        self.current
            .as_ref()
            .and_then(|c| c.lifetime_secs.get())
            .map(|s| Duration::from_secs(s.max(0) as u64))
    }

    fn retry_later(&mut self, reason: RetryReason, retry_after: Option<Duration>, input: &Input) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = schedule::retry_delay(reason, self.failures, self.lifetime(), retry_after, input.jitter);
        let at = schedule::add(input.now.wall, delay);
        self.set_due(at, input.now);
        self.state.scheduled(Some(at));
        self.report();
        delay
    }

    /// Logs a problem at `warn` the first time it shows, and at `debug` while it repeats.
    fn report_problem(&mut self, event: Event, key: String, message: &str) {
        if self.last_problem.as_deref() == Some(key.as_str()) {
            self.say(Line::Repeated(event, message.to_owned()));
        } else {
            self.say(Line::Warn(event, message.to_owned()));
            self.last_problem = Some(key);
        }
    }

    fn say(&mut self, line: Line) {
        self.effects.push(Effect::Log(line));
    }

    /// The token file's folder cannot take the file (full, unwritable): retry later, logged once per cause.
    fn cannot_write(&mut self, e: &io::Error, consequence: &str, input: &Input) {
        self.outcome = Some("write_failed");
        let delay = self.retry_later(RetryReason::Failure, None, input);
        let msg = format!(
            "cannot write token file {}: {e}; {consequence}; retrying in {}",
            self.cfg.token_file.display(),
            fmt_delay(delay)
        );
        let needs_login = self.state.needs_login();
        self.state
            .failed(self.failures, "write_failed".into(), Some(msg.clone()), needs_login);
        self.save_state();
        self.report_problem(Event::WriteFailed, format!("write:{}", e.kind()), &msg);
    }

    fn refresh_failed(&mut self, e: &TokenError, input: &Input) {
        match e.class() {
            ErrorClass::Permanent => {
                self.failures = self.failures.saturating_add(1);
                self.state.failed(self.failures, e.code(), None, e.needs_login());
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
                    self.alert(Event::RefreshTokenDead, &log, &chat, input);
                }
            }
            ErrorClass::Transient => {
                let reason = if e.is_rate_limit() {
                    RetryReason::RateLimited
                } else {
                    RetryReason::Failure
                };
                self.outcome = Some("failed");
                let delay = self.retry_later(reason, e.retry_after(), input);
                let expired = self
                    .current
                    .as_ref()
                    .and_then(|c| c.expires_at())
                    .is_some_and(|exp| exp <= input.now.wall);
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
                let needs_login = self.state.needs_login();
                self.state
                    .failed(self.failures, e.code(), Some(msg.clone()), needs_login);
                self.save_state();
                self.report_problem(Event::RefreshFailed, format!("refresh:{}:{expired}", e.code()), &msg);
            }
        }
    }

    /// Warns once per refresh token when it has under [`schedule::refresh_token_warning`] left and the
    /// provider has not sent a new one (Kakao sends one in the old one's last month, at the next refresh).
    fn check_refresh_token_expiry(&mut self, input: &Input) {
        let Some(cur) = &self.current else { return };
        let (Some(digest), Some(expires)) = (cur.refresh_token, cur.refresh_token_expires_at()) else {
            return;
        };
        let lifetime = cur
            .refresh_token_expires_in
            .get()
            .map(|s| Duration::from_secs(s.max(0) as u64));
        let left = schedule::until(expires, input.now.wall);
        if left >= schedule::refresh_token_warning(lifetime) {
            return;
        }
        if self.alerted == Some(digest) {
            return;
        }
        self.alerted = Some(digest);
        let name = &self.cfg.name;
        let log = format!(
            "the refresh token of account {name} expires at {expires} (in {}) and the provider has sent no new one: log in again before then: kakao-tokend login --account {name}",
            fmt_delay(left)
        );
        let chat = format!(
            "[kakao-tokend] {name}: 리프레시 토큰이 {expires}에 만료됩니다. 그 전에 다시 로그인하세요: kakao-tokend login --account {name}"
        );
        self.alert(Event::RefreshTokenExpiring, &log, &chat, input);
    }

    /// Logs an alert and, with `notify_by_message`, has it sent to the owner's KakaoTalk while the
    /// access token still works.
    fn alert(&mut self, event: Event, message: &str, chat: &str, input: &Input) {
        self.say(Line::Warn(event, message.to_owned()));
        if !self.cfg.notify_by_message {
            return;
        }
        let valid = self
            .current
            .as_ref()
            .filter(|c| c.expires_at().is_some_and(|e| e > input.now.wall))
            .and_then(|c| c.access_token.as_deref().cloned());
        match valid {
            Some(access_token) => {
                let text = chat.chars().take(crate::MAX_MESSAGE_CHARS).collect();
                self.effects.push(Effect::Message { access_token, text });
            }
            None => self.say(Line::Warn(
                Event::AlertFailed,
                "cannot send the alert by message: the access token does not work either".into(),
            )),
        }
    }

    fn report(&mut self) {
        let report = Report {
            account: self.cfg.name.clone(),
            expires_at: self.current.as_ref().and_then(Held::expires_at),
            next_attempt: match self.phase {
                Phase::Due(at) => Some(at),
                Phase::Parked(_) => None,
            },
            parked: matches!(self.phase, Phase::Parked(_)),
            refresh_token_expires_at: self.current.as_ref().and_then(Held::refresh_token_expires_at),
            last_success_at: self.state.last_success_at(),
            consecutive_failures: self.failures,
            outcome: self.outcome.take(),
        };
        self.effects.push(Effect::Report(report));
    }

    fn save_state(&mut self) {
        self.effects.push(Effect::SaveState(self.state.clone()));
    }
}

pub fn fmt_delay(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::FileAccess;
    use crate::token::{TokenFile, TokenResponse};

    const H: u64 = 3600;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn account(notify_by_message: bool, on_refresh: bool) -> Arc<Account> {
        let url = |u: &str| u.parse().unwrap();
        Arc::new(Account {
            name: "me".into(),
            client_id: "rest-api-key".into(),
            client_secret: None,
            client_secret_file: None,
            redirect_uri: None,
            token_file: "/tokens/me.json".into(),
            token_url: Arc::new(url("https://kauth.kakao.com/oauth/token")),
            authorize_url: Arc::new(url("https://kauth.kakao.com/oauth/authorize")),
            api_url: Arc::new(url("https://kapi.kakao.com/")),
            scope: None,
            message_link: None,
            on_refresh: on_refresh.then(|| vec!["true".into()].into()),
            env_file: None,
            access: FileAccess::default(),
            ca_file: None,
            notify_by_message,
            allow_insecure_http: false,
            pkce: true,
        })
    }

    fn current(file: TokenFile) -> Current {
        let bytes = file.to_bytes();
        Current {
            file,
            digest: state::digest(&bytes),
            len: bytes.len(),
            version: state::Version::UNKNOWN,
        }
    }

    /// A Kakao login at `at`: a 6 h access token and a refresh token with `rt_left` to live.
    fn login(at: Timestamp, access: &str, rt_left: u64) -> Current {
        let body = format!(
            r#"{{"token_type":"bearer","access_token":"{access}","expires_in":21599,"refresh_token":"rt-{access}","refresh_token_expires_in":{rt_left}}}"#
        );
        current(TokenFile::from_response(
            TokenResponse::parse(body.as_bytes()).unwrap(),
            at,
        ))
    }

    fn read(c: &Current) -> FileRead {
        FileRead {
            token: Ok(c.clone()),
            state: None,
        }
    }

    /// A refresh of `cur` answered at `at`, with a new refresh token when `rotate`.
    fn refreshed(cur: &Current, at: Timestamp, access: &str, rotate: bool) -> Refreshed {
        let rt = if rotate {
            format!(r#","refresh_token":"rt-{access}","refresh_token_expires_in":5183999"#)
        } else {
            String::new()
        };
        let body = format!(r#"{{"access_token":"{access}","expires_in":21599{rt}}}"#);
        let file = token::merge(&cur.file, TokenResponse::parse(body.as_bytes()).unwrap(), at);
        let bytes = file.to_bytes();
        Refreshed {
            rotated: file.refresh_token != cur.file.refresh_token,
            progressed: file.expires_at > cur.file.expires_at,
            file,
            bytes,
            sent_at: at,
            refused: None,
        }
    }

    /// The machine with two clocks the test moves: the wall clock and the monotonic one.
    struct Rig {
        m: Machine,
        wall: Timestamp,
        mono: Duration,
    }

    impl Rig {
        fn new(notify_by_message: bool, on_refresh: bool) -> Rig {
            Rig {
                m: Machine::new(account(notify_by_message, on_refresh)),
                wall: "2026-01-01T00:00:00Z".parse().unwrap(),
                mono: secs(1000),
            }
        }

        fn input(&self) -> Input {
            Input {
                now: Now {
                    wall: self.wall,
                    mono: self.mono,
                },
                jitter: 0.0,
                policy: RefreshBefore::default(),
            }
        }

        /// Time passes on both clocks.
        fn pass(&mut self, d: Duration) {
            self.wall = schedule::add(self.wall, d);
            self.mono += d;
        }

        /// The wall clock alone moves: a step, or a suspend (the monotonic clock stops meanwhile).
        fn jump(&mut self, drift: SignedDuration) -> Vec<Effect> {
            self.wall = self.wall.checked_add(drift).unwrap();
            let input = self.input();
            self.m.clock_jumped(drift, &input)
        }

        /// Time until the timer fires.
        fn until_due(&self) -> Option<Duration> {
            self.m.deadline().map(|d| d.saturating_sub(self.mono))
        }

        /// Lets time pass until the timer fires, and takes the lock on the file as `on_disk`.
        fn fire(&mut self, on_disk: &Current) -> Option<Current> {
            let wait = self.until_due().expect("a timer is set");
            self.pass(wait);
            let input = self.input();
            self.m.locked(read(on_disk), &input).0
        }

        /// The whole transaction, up to the write, answered with `answer`.
        fn refresh(
            &mut self,
            on_disk: &Current,
            answer: impl FnOnce(&Current, Timestamp) -> Result<Refreshed, TokenError>,
        ) -> AfterAnswer {
            let cur = self.fire(on_disk).expect("a refresh is due");
            let input = self.input();
            self.m.sending(&input);
            self.m.answered(answer(&cur, self.wall), &input)
        }

        fn written(&mut self, result: io::Result<PublishReport>) -> Vec<Effect> {
            let input = self.input();
            self.m.written(result, &input)
        }
    }

    fn report() -> PublishReport {
        PublishReport {
            backup: None,
            pruned: 0,
            backup_error: None,
            env_error: None,
            stamp: None,
        }
    }

    fn refused(code: &str) -> TokenError {
        TokenError::Refused {
            status: 400,
            error: "invalid_grant".into(),
            code: Some(code.into()),
            description: None,
            retry_after: None,
        }
    }

    fn unreachable() -> TokenError {
        TokenError::Transport {
            url: "https://kauth.kakao.com/oauth/token".into(),
            reason: "connection refused".into(),
        }
    }

    /// The effects of an answer that asks for no write.
    fn no_write(after: AfterAnswer) -> Vec<Effect> {
        match after {
            AfterAnswer::Effects(effects) => effects,
            AfterAnswer::Write(p) => panic!("an unexpected write: {p:?}"),
        }
    }

    fn outcomes(effects: &[Effect]) -> Vec<&'static str> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Report(r) => r.outcome,
                _ => None,
            })
            .collect()
    }

    fn messages(effects: &[Effect]) -> usize {
        effects.iter().filter(|e| matches!(e, Effect::Message { .. })).count()
    }

    #[test]
    fn a_fresh_kakao_token_is_refreshed_with_a_third_of_its_life_left() {
        let mut r = Rig::new(false, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        let effects = r.m.start(None, read(&file), &r.input());
        // 21599 s, refreshed with 33% left: due after 67% of it, on both clocks alike.
        let due = r.until_due().unwrap();
        assert_eq!(due.as_secs(), (21599.0 * 0.67_f64) as u64, "{due:?}");
        assert_eq!(r.m.phase(), &Phase::Due(schedule::add(r.wall, due)));
        assert!(effects.iter().any(|e| matches!(e, Effect::Report(r) if !r.parked)));
    }

    #[test]
    fn a_clock_set_back_neither_delays_the_timer_nor_a_reload_after_it() {
        let mut r = Rig::new(false, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        r.pass(secs(H));
        let before = r.until_due().unwrap();
        let Phase::Due(at) = r.m.phase().clone() else { panic!() };

        r.jump(SignedDuration::from_hours(-2));
        // The timer runs on the monotonic clock: as long as before. The wall-clock time moves with the clock.
        assert_eq!(r.until_due(), Some(before));
        assert_eq!(r.m.phase(), &Phase::Due(at - SignedDuration::from_hours(2)));

        // A reload re-reads the same file, whose times are in the old reckoning: still no later.
        let cfg = r.m.account().clone();
        r.m.reload(cfg, read(&file), &r.input());
        assert_eq!(r.until_due(), Some(before));
    }

    #[test]
    fn a_suspend_past_the_due_time_refreshes_on_waking() {
        let mut r = Rig::new(false, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        r.pass(secs(60));
        // Asleep for 8 h: the monotonic clock stood still, the wall clock did not.
        r.jump(SignedDuration::from_hours(8));
        assert_eq!(r.until_due(), Some(Duration::ZERO));
        // A short step forward does not bring a distant refresh forward.
        let mut r = Rig::new(false, false);
        r.m.start(None, read(&login(r.wall, "at1", 60 * 24 * H)), &r.input());
        let before = r.until_due().unwrap();
        r.jump(SignedDuration::from_mins(5));
        assert_eq!(r.until_due(), Some(before - secs(300)));
    }

    #[test]
    fn a_missing_file_parks_until_one_is_written() {
        let mut r = Rig::new(false, false);
        let effects = r.m.start(
            None,
            FileRead {
                token: Err(ReadError::Missing),
                state: None,
            },
            &r.input(),
        );
        assert_eq!(r.m.phase(), &Phase::Parked(Parked::Missing));
        assert_eq!(r.m.deadline(), None);
        assert!(r.m.state().needs_login());
        assert_eq!(r.m.state().last_error_code(), Some("missing_token_file"));
        // The state file is saved before the report goes out and before the line that says so.
        let save = effects.iter().position(|e| matches!(e, Effect::SaveState(_))).unwrap();
        let report = effects.iter().position(|e| matches!(e, Effect::Report(_))).unwrap();
        let said = effects
            .iter()
            .position(|e| matches!(e, Effect::Log(Line::Error(_, m)) if m.contains("kakao-tokend login --account me")))
            .unwrap();
        assert!(save < report && report < said, "{effects:?}");

        // A login writes the file: adopted and scheduled, and no longer waiting for a login.
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.file_changed(read(&file), &r.input());
        assert!(r.m.deadline().is_some());
        assert!(!r.m.state().needs_login());
    }

    #[test]
    fn a_refusal_parks_and_a_reload_tries_again() {
        let mut r = Rig::new(false, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        let effects = no_write(r.refresh(&file, |_, _| Err(refused("KOE322"))));
        assert_eq!(outcomes(&effects), ["refused"]);
        assert_eq!(r.m.phase(), &Phase::Parked(Parked::Refused { code: "KOE322".into() }));
        assert!(r.m.state().needs_login());
        // Nothing more is sent while parked, however long it is.
        assert_eq!(r.m.deadline(), None);
        assert_eq!(r.m.failures(), 1);

        let cfg = r.m.account().clone();
        r.m.reload(cfg, read(&file), &r.input());
        assert_eq!(r.m.failures(), 0);
        assert_eq!(r.until_due(), Some(Duration::ZERO), "overdue by now: at once");
    }

    #[test]
    fn transient_failures_back_off_further_each_time_up_to_a_cap() {
        let mut r = Rig::new(false, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        let mut delays = Vec::new();
        for _ in 0..12 {
            let effects = no_write(r.refresh(&file, |_, _| Err(unreachable())));
            assert_eq!(outcomes(&effects), ["failed"]);
            delays.push(r.until_due().unwrap());
        }
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        // With no jitter: 1 s, doubling, up to the cap for a 6 h token (a tenth of it, at most 5 min).
        let cap = schedule::backoff_cap(Some(secs(21599)));
        assert_eq!(cap, secs(300));
        assert_eq!(delays[..4], [secs(1), secs(2), secs(4), secs(8)], "{delays:?}");
        assert_eq!(delays[11], cap, "{delays:?}");
        assert_eq!(r.m.state().consecutive_failures(), 12);
    }

    #[test]
    fn a_rotated_token_is_written_before_anything_else_and_held_until_it_is() {
        let mut r = Rig::new(false, true);
        let file = login(r.wall, "at1", 20 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        let after = r.refresh(&file, |c, at| Ok(refreshed(c, at, "at2", true)));
        // The write and nothing else: no state, no report, no hook before the new refresh token is on disk.
        let AfterAnswer::Write(pending) = &after else {
            panic!("{after:?}")
        };
        assert_eq!(pending.current.file.access_token.expose(), "at2");

        // The disk is full: the old file stays, the new token is held, and a retry is set.
        let effects = r.written(Err(io::Error::from(io::ErrorKind::StorageFull)));
        assert_eq!(outcomes(&effects), ["write_failed"]);
        assert!(r.m.unwritten().is_some());
        assert_eq!(r.m.state().last_error_code(), Some("write_failed"));
        assert!(r.until_due().is_some());

        // The old file seen again (inotify, a reload) does not replace the held token.
        r.m.file_changed(read(&file), &r.input());
        let cfg = r.m.account().clone();
        r.m.reload(cfg, read(&file), &r.input());
        assert_eq!(r.m.unwritten().map(|p| p.current.digest), Some(pending.current.digest));

        // The next attempt only writes it; then the hook runs, the state is saved and reported.
        r.pass(r.until_due().unwrap());
        let effects = r.written(Ok(report()));
        assert!(r.m.unwritten().is_none());
        assert_eq!(r.m.known_digest(), Some(pending.current.digest));
        assert_eq!(outcomes(&effects), ["success"]);
        assert!(effects.iter().any(|e| matches!(e, Effect::RunHook)));
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::SaveState(s) if s.consecutive_failures() == 0))
        );
        assert_eq!(r.m.failures(), 0);
    }

    #[test]
    fn a_refresh_someone_else_made_is_adopted_under_the_lock_not_repeated() {
        let mut r = Rig::new(false, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        let wait = r.until_due().unwrap();
        r.pass(wait);
        // A second daemon (or `kakao-tokend refresh`) refreshed just before this one took the lock.
        let theirs = current(refreshed(&file, r.wall, "theirs", false).file);
        let mut state = AccountState::default();
        state.record_success(r.wall);
        let (to_send, _) = r.m.locked(
            FileRead {
                token: Ok(theirs.clone()),
                state: Some(state.clone()),
            },
            &r.input(),
        );
        assert!(to_send.is_none());
        assert_eq!(r.m.known_digest(), Some(theirs.digest));
        assert_eq!(r.m.state().last_success_at(), state.last_success_at());
        assert!(r.until_due().unwrap() > secs(4 * H));
    }

    #[test]
    fn a_refresh_token_near_its_end_alerts_once_by_message_while_the_access_token_works() {
        let mut r = Rig::new(true, false);
        // A two-month refresh token with five days left and no new one: an alert, sent by message
        // with the live access token.
        let mut near_end = login(r.wall, "at1", 60 * 24 * H).file;
        near_end.refresh_token_expires_at = Some(schedule::add(r.wall, secs(5 * 24 * H)));
        let file = current(near_end);
        let effects = r.m.start(None, read(&file), &r.input());
        assert_eq!(messages(&effects), 1);
        let AfterAnswer::Write(_) = r.refresh(&file, |c, at| Ok(refreshed(c, at, "at2", false))) else {
            panic!("no write")
        };
        let effects = r.written(Ok(report()));
        assert_eq!(messages(&effects), 0, "once per refresh token");

        // A dead refresh token, with the access token expired too: logged, but no message can go out.
        let mut r = Rig::new(true, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        r.pass(secs(7 * H));
        r.m.clock_jumped(SignedDuration::ZERO, &r.input());
        let input = r.input();
        let effects = no_write(r.m.answered(Err(refused("KOE322")), &input));
        assert_eq!(messages(&effects), 0);
        assert!(r.m.state().needs_login());
    }

    #[test]
    fn a_refresh_that_does_not_move_the_expiry_backs_off() {
        let mut r = Rig::new(false, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        r.refresh(&file, |c, _| {
            // The same expiry as before: a provider answering from a cache, say.
            let mut same = refreshed(
                c,
                c.file.expires_at.unwrap() - SignedDuration::from_secs(21599),
                "at2",
                false,
            );
            same.progressed = false;
            Ok(same)
        });
        r.written(Ok(report()));
        assert_eq!(r.m.failures(), 1);
        assert!(r.until_due().unwrap() < secs(H));
    }

    /// Found by the property test: a refreshed token held unwritten (disk full) across a clock set back
    /// is, once written, scheduled from the new reckoning, not two hours late.
    #[test]
    fn a_clock_set_back_while_a_token_waits_to_be_written_does_not_delay_its_refresh() {
        let mut r = Rig::new(false, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        let AfterAnswer::Write(pending) = r.refresh(&file, |c, at| Ok(refreshed(c, at, "at2", false))) else {
            panic!("no write")
        };
        r.written(Err(io::Error::other("disk full")));
        r.jump(SignedDuration::from_secs(-2 * H as i64));
        // The retry writes the held token; the next refresh is then due within the token's real life.
        r.fire(&file);
        r.written(Ok(report()));
        assert_eq!(r.m.current().unwrap().digest, pending.current.digest);
        assert!(r.until_due().unwrap() < secs(5 * H), "{:?}", r.until_due());
    }

    /// Found by the property test: after a clock set back, a new token's expiry looks earlier than the
    /// old one's (written in the old reckoning), but it is not a refresh that made no progress.
    #[test]
    fn a_refresh_after_a_clock_set_back_is_progress() {
        let mut r = Rig::new(false, false);
        let file = login(r.wall, "at1", 60 * 24 * H);
        r.m.start(None, read(&file), &r.input());
        r.jump(SignedDuration::from_secs(-5 * H as i64));
        r.refresh(&file, |c, at| Ok(refreshed(c, at, "at2", false)));
        r.written(Ok(report()));
        assert_eq!(r.m.failures(), 0);
        assert!(r.until_due().unwrap() > secs(3 * H));
    }

    /// What can happen to an account, for the property test below.
    #[derive(Debug, Clone)]
    enum Step {
        /// Time passes on both clocks.
        Pass(u64),
        /// The timer fires (when one is set) and the transaction runs with these outcomes.
        Fire {
            lock_ok: bool,
            room_ok: bool,
            answer: Answer,
            write_ok: bool,
        },
        /// Someone logs in: a new token file.
        Login(u64),
        /// The token file is deleted.
        Remove,
        /// The wall clock alone jumps (seconds, either way).
        Jump(i64),
        /// SIGHUP.
        Reload,
    }

    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Ok {
            rotate: bool,
        },
        Transient,
        Permanent,
        /// An access token that breaks the rule, with a rotated refresh token.
        HostileRotated,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let answer = prop_oneof![
            4 => any::<bool>().prop_map(|rotate| Answer::Ok { rotate }),
            2 => Just(Answer::Transient),
            1 => Just(Answer::Permanent),
            1 => Just(Answer::HostileRotated),
        ];
        prop_oneof![
            3 => (0..30_000u64).prop_map(Step::Pass),
            6 => (prop::bool::weighted(0.9), prop::bool::weighted(0.9), answer, prop::bool::weighted(0.7)).prop_map(
                |(lock_ok, room_ok, answer, write_ok)| Step::Fire { lock_ok, room_ok, answer, write_ok }
            ),
            1 => (H..60 * 24 * H).prop_map(Step::Login),
            1 => Just(Step::Remove),
            1 => (-3 * H as i64..3 * H as i64).prop_map(Step::Jump),
            1 => Just(Step::Reload),
        ]
    }

    /// The test's view of the world: the file on disk, and a rotated refresh token the machine must hold
    /// until it is written.
    struct World {
        r: Rig,
        disk: Option<Current>,
        pending_rt: Option<String>,
        last_permanent: bool,
        names: u32,
    }

    impl World {
        fn read_disk(&self) -> FileRead {
            match &self.disk {
                Some(c) => read(c),
                None => FileRead {
                    token: Err(ReadError::Missing),
                    state: None,
                },
            }
        }

        fn fresh(&mut self, what: &str) -> String {
            self.names += 1;
            format!("{what}{}", self.names)
        }

        /// Effects in the promised order (a write is alone by its type): the lines people react to
        /// after the state file they speak of; a hook only after a write.
        fn check_order(effects: &[Effect], after_good_write: bool) -> Result<(), String> {
            let said = effects
                .iter()
                .position(|e| matches!(e, Effect::Log(Line::Refreshed { .. })));
            let saved = effects.iter().position(|e| matches!(e, Effect::SaveState(_)));
            if let Some(said) = said
                && saved.is_none_or(|saved| saved > said)
            {
                return Err(format!("a line before the state it speaks of: {effects:?}"));
            }
            if !after_good_write && effects.iter().any(|e| matches!(e, Effect::RunHook)) {
                return Err(format!("a hook without a write: {effects:?}"));
            }
            Ok(())
        }

        fn write(&mut self, pending: &Pending, ok: bool) -> Result<(), String> {
            let input = self.r.input();
            let result = if ok {
                Ok(report())
            } else {
                Err(io::Error::other("disk full"))
            };
            let effects = self.r.m.written(result, &input);
            Self::check_order(&effects, ok)?;
            if ok {
                self.disk = Some(pending.current.clone());
                self.pending_rt = None;
            }
            Ok(())
        }

        fn apply(&mut self, step: &Step) -> Result<(), String> {
            match *step {
                Step::Pass(s) => self.r.pass(secs(s)),
                Step::Jump(s) => {
                    let effects = self.r.jump(SignedDuration::from_secs(s));
                    Self::check_order(&effects, false)?;
                }
                Step::Login(rt_left) => {
                    let name = self.fresh("login");
                    self.disk = Some(login(self.r.wall, &name, rt_left));
                    self.last_permanent = false;
                    let (read, input) = (self.read_disk(), self.r.input());
                    Self::check_order(&self.r.m.file_changed(read, &input), false)?;
                }
                Step::Remove => {
                    self.disk = None;
                    let (read, input) = (self.read_disk(), self.r.input());
                    Self::check_order(&self.r.m.file_changed(read, &input), false)?;
                }
                Step::Reload => {
                    self.last_permanent = false;
                    let (cfg, read, input) = (self.r.m.account().clone(), self.read_disk(), self.r.input());
                    Self::check_order(&self.r.m.reload(cfg, read, &input), false)?;
                }
                Step::Fire {
                    lock_ok,
                    room_ok,
                    answer,
                    write_ok,
                } => {
                    let Some(wait) = self.r.until_due() else { return Ok(()) };
                    self.r.pass(wait);
                    let input = self.r.input();
                    if !lock_ok {
                        let effects = self.r.m.lock_failed(&io::Error::other("busy"), &input);
                        return Self::check_order(&effects, false);
                    }
                    // As the shell does: a token waiting to be written is written before anything else.
                    if let Some(p) = self.r.m.unwritten().cloned() {
                        return self.write(&p, write_ok);
                    }
                    let (cur, effects) = self.r.m.locked(self.read_disk(), &input);
                    Self::check_order(&effects, false)?;
                    let Some(cur) = cur else { return Ok(()) };
                    if !room_ok {
                        let effects = self.r.m.cannot_reserve(&io::Error::other("no space"), &input);
                        return Self::check_order(&effects, false);
                    }
                    self.r.m.sending(&input);
                    let at = self.r.wall;
                    let result = match answer {
                        Answer::Ok { rotate } => Ok(refreshed(&cur, at, &self.fresh("at"), rotate)),
                        Answer::Transient => Err(unreachable()),
                        Answer::Permanent => Err(refused("KOE322")),
                        Answer::HostileRotated => {
                            let rt = self.fresh("rt-hostile");
                            let body = format!(
                                r#"{{"access_token":"bad token","expires_in":21599,"refresh_token":"{rt}","refresh_token_expires_in":5183999}}"#
                            );
                            let resp = TokenResponse::parse(body.as_bytes()).unwrap();
                            let file = token::merge_refresh_token_only(&cur.file, resp, at);
                            let bytes = file.to_bytes();
                            Ok(Refreshed {
                                rotated: true,
                                progressed: false,
                                file,
                                bytes,
                                sent_at: at,
                                refused: Some(token::Unusable::Characters("access_token")),
                            })
                        }
                    };
                    if matches!(answer, Answer::Permanent) {
                        self.last_permanent = true;
                    }
                    match self.r.m.answered(result, &input) {
                        AfterAnswer::Effects(effects) => Self::check_order(&effects, false)?,
                        AfterAnswer::Write(p) => {
                            let rt = p.current.file.refresh_token.as_ref().map(|t| t.expose().to_string());
                            if rt != cur.file.refresh_token.as_ref().map(|t| t.expose().to_string()) {
                                // Rotated: from now on the machine must hold it until it is on disk.
                                self.pending_rt = rt;
                            }
                            self.write(&p, write_ok)?;
                        }
                    }
                }
            }
            Ok(())
        }

        /// Plays `steps` from a fresh login, checking the invariants after each.
        fn run(steps: &[Step]) -> Result<(), String> {
            let mut r = Rig::new(false, true);
            let first = login(r.wall, "at0", 60 * 24 * H);
            let input = r.input();
            r.m.start(None, read(&first), &input);
            let mut w = World {
                r,
                disk: Some(first),
                pending_rt: None,
                last_permanent: false,
                names: 0,
            };
            for (i, step) in steps.iter().enumerate() {
                w.apply(step)
                    .and_then(|()| w.check_invariants())
                    .map_err(|e| format!("step {i} {step:?}: {e}"))?;
            }
            Ok(())
        }

        fn check_invariants(&self) -> Result<(), String> {
            let m = &self.r.m;
            // A rotated refresh token not yet on disk is never dropped.
            if let Some(rt) = &self.pending_rt {
                let held = m
                    .unwritten()
                    .and_then(|p| p.current.file.refresh_token.as_ref())
                    .map(|t| t.expose());
                if held != Some(rt.as_str()) {
                    return Err(format!("the rotated refresh token {rt} was dropped (held: {held:?})"));
                }
            }
            // No timer only when parked, and parked only for a reason that holds.
            match (m.deadline(), m.phase()) {
                (None, Phase::Parked(why)) => match why {
                    Parked::Missing if self.disk.is_some() && self.pending_rt.is_none() => {
                        return Err("parked as missing with a file on disk".into());
                    }
                    Parked::Refused { .. } if !self.last_permanent => {
                        return Err("parked as refused without a refusal".into());
                    }
                    Parked::NoRefreshToken | Parked::Unreadable(_) => {
                        return Err(format!("parked as {why:?}, which this world never makes"));
                    }
                    _ => {}
                },
                (Some(deadline), Phase::Due(_)) => {
                    // Never further than a 6 h token's life away.
                    if deadline.saturating_sub(self.r.mono) > secs(6 * H + 60) {
                        return Err(format!("a timer {deadline:?} away from {:?}", self.r.mono));
                    }
                }
                (d, p) => return Err(format!("deadline {d:?} with phase {p:?}")),
            }
            Ok(())
        }
    }

    /// Found by the property test (FUZZ_SEED=17654400437737507991): a hostile answer keeps the old
    /// access token's times, in the reckoning from before the clock went back, under a new digest.
    #[test]
    fn a_hostile_answer_after_a_clock_set_back_keeps_the_shift() {
        let hostile = Step::Fire {
            lock_ok: true,
            room_ok: true,
            answer: Answer::HostileRotated,
            write_ok: false,
        };
        let ok = Step::Fire {
            lock_ok: true,
            room_ok: false,
            answer: Answer::Ok { rotate: false },
            write_ok: true,
        };
        let steps = [Step::Jump(-6653), Step::Jump(-4321), Step::Jump(-10688), hostile, ok];
        World::run(&steps).unwrap();
    }

    /// Random sequences of answers, failures, file changes, clock jumps, reloads and failed writes;
    /// after every step the invariants hold. The seed is printed, and FUZZ_SEED replays one.
    #[test]
    fn the_machine_keeps_its_promises_under_random_events() {
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let seed: u64 = std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).unwrap();
                u64::from_le_bytes(b)
            });
        eprintln!("machine property test: FUZZ_SEED={seed}");
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let config = Config {
            cases: 400,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
        let steps = proptest::collection::vec(step(), 1..80);
        let result = runner.run(&steps, |steps| {
            World::run(&steps).map_err(proptest::test_runner::TestCaseError::fail)
        });
        if let Err(e) = result {
            panic!("FUZZ_SEED={seed}: {e}");
        }
    }

    /// What the start index keeps of a token file and a state file starts the machine exactly as a read
    /// of those files does: the same timer, phase, state, report and lines.
    #[test]
    fn a_start_from_the_index_is_the_start_from_the_files() {
        let wall: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut failing = AccountState::default();
        failing.failed(3, "KOE000".into(), Some("the provider did not answer".into()), false);
        let mut parked = AccountState::default();
        parked.parked(Some("missing_token_file"), "log in".into(), true);
        let mut succeeded = AccountState::default();
        succeeded.succeeded(Some(schedule::add(wall, secs(H))));
        // Not in the record: a start sets it anew.
        succeeded.scheduled(Some(schedule::add(wall, secs(5 * H))));
        let cases = [
            ("fresh", login(wall, "a", 5_183_999), None),
            (
                "refresh token in its last month",
                login(wall, "b", 20 * 24 * H),
                Some(succeeded),
            ),
            (
                "access token expired",
                login(wall.checked_sub(SignedDuration::from_hours(7)).unwrap(), "c", 5_183_999),
                Some(failing),
            ),
            ("a login after a park", login(wall, "d", 5_183_999), Some(parked)),
        ];
        for (what, file, state) in cases {
            let mut by_read = Rig::new(false, false);
            let mut by_index = Rig::new(false, false);
            let read_effects = by_read.m.start(state.clone(), read(&file), &by_read.input());

            let mut w = Writer::default();
            assert!(by_read.m.current().unwrap().to_record(&mut w), "{what}");
            let mut st = Writer::default();
            if let Some(s) = &state {
                assert!(s.to_record(&mut st), "{what}");
            }
            let held = Held::from_record(&mut Reader(&w.0)).expect(what);
            let state_back = state
                .as_ref()
                .map(|_| AccountState::from_record(&mut Reader(&st.0)).expect(what));
            assert_eq!(
                state_back.as_ref().map(AccountState::record_digest),
                state.as_ref().map(AccountState::record_digest),
                "{what}"
            );
            let index_effects = by_index.m.start_known(state_back, held, &by_index.input());

            assert_eq!(by_index.m.deadline(), by_read.m.deadline(), "{what}");
            assert_eq!(
                format!("{:?}", by_index.m.phase()),
                format!("{:?}", by_read.m.phase()),
                "{what}"
            );
            assert_eq!(by_index.m.state(), by_read.m.state(), "{what}");
            assert_eq!(by_index.m.known_digest(), Some(file.digest), "{what}");
            assert_eq!(format!("{index_effects:?}"), format!("{read_effects:?}"), "{what}");
            // And on from there: the first refresh goes the same way.
            let after_read = by_read.refresh(&file, |c, at| Ok(refreshed(c, at, "n", false)));
            let after_index = by_index.refresh(&file, |c, at| Ok(refreshed(c, at, "n", false)));
            assert_eq!(format!("{after_index:?}"), format!("{after_read:?}"), "{what}");
        }
    }

    /// A machine started from a fresh login's file.
    fn started(notify_by_message: bool) -> Rig {
        let mut rig = Rig::new(notify_by_message, false);
        let file = login("2026-01-01T00:00:00Z".parse().unwrap(), "a", 5_183_999);
        let input = rig.input();
        rig.m.start(None, read(&file), &input);
        rig
    }

    /// An account that sends alerts by message keeps its access token, which no file but the token
    /// file may hold: it has no record.
    #[test]
    fn an_account_that_keeps_its_access_token_has_no_record() {
        let rig = started(true);
        let mut w = Writer::default();
        assert!(!rig.m.current().unwrap().to_record(&mut w));
    }

    /// A record cut short, or with a flag out of range, is refused rather than read as something else.
    #[test]
    fn a_damaged_record_is_refused() {
        let rig = started(false);
        let mut w = Writer::default();
        assert!(rig.m.current().unwrap().to_record(&mut w));
        for cut in 0..w.0.len() {
            assert!(Held::from_record(&mut Reader(&w.0[..cut])).is_none(), "cut at {cut}");
        }
        let mut bad = w.0.clone();
        let flag = bad.len() - 9;
        bad[flag] = 2;
        assert!(Held::from_record(&mut Reader(&bad)).is_none());
        let mut s = AccountState::default();
        s.failed(1, "KOE000".into(), Some("x".into()), true);
        let mut w = Writer::default();
        assert!(s.to_record(&mut w));
        for cut in 0..w.0.len() {
            assert!(
                AccountState::from_record(&mut Reader(&w.0[..cut])).is_none(),
                "cut at {cut}"
            );
        }
        assert_eq!(s.record_digest(), s.clone().record_digest());
        assert_ne!(s.record_digest(), AccountState::default().record_digest());
    }
}
