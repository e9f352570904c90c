//! What is known about one account besides its token: the state file (`NAME.json.state`, which `status`
//! and health checks read), the token file as last read, why a read failed, how a write went, and the
//! names of the files kept beside a token file. Plain data and the rules that change it; reading and
//! writing the files is the store's job.

use std::io;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::compact::Secs;
use crate::record::{Reader, Writer};
use crate::token::{self, TokenFile};

/// The account's state file. Its fields change only through the methods below, each one rule of how an
/// attempt, a success, a failure, a park or a schedule changes it: the account machine, the commands
/// and `login` all go through them, so the file means the same whoever wrote it.
///
/// Every account keeps one in memory, so it is held compactly (40 bytes, not 128): times in whole
/// seconds, and the last problem boxed, since most accounts have none. On disk it is [`StateFile`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "StateFile", into = "StateFile")]
pub struct AccountState {
    last_attempt_at: Secs,
    last_success_at: Secs,
    next_attempt_at: Secs,
    consecutive_failures: u32,
    needs_login: bool,
    problem: Option<Box<Problem>>,
}

/// Why the last attempt failed or the account parked, until a success.
#[derive(Debug, Clone, Default, PartialEq)]
struct Problem {
    code: Option<String>,
    message: Option<String>,
}

/// The state file as written: the field names and order `status`, health checks and earlier versions
/// know.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct StateFile {
    last_attempt_at: Option<Timestamp>,
    last_success_at: Option<Timestamp>,
    consecutive_failures: u32,
    last_error_code: Option<String>,
    last_error: Option<String>,
    needs_login: bool,
    next_attempt_at: Option<Timestamp>,
}

impl From<StateFile> for AccountState {
    fn from(f: StateFile) -> AccountState {
        let problem = (f.last_error_code.is_some() || f.last_error.is_some()).then(|| {
            Box::new(Problem {
                code: f.last_error_code,
                message: f.last_error,
            })
        });
        AccountState {
            last_attempt_at: Secs::of_time(f.last_attempt_at),
            last_success_at: Secs::of_time(f.last_success_at),
            next_attempt_at: Secs::of_time(f.next_attempt_at),
            consecutive_failures: f.consecutive_failures,
            needs_login: f.needs_login,
            problem,
        }
    }
}

impl From<AccountState> for StateFile {
    fn from(s: AccountState) -> StateFile {
        let (last_error_code, last_error) = s.problem.map(|p| (p.code, p.message)).unwrap_or_default();
        StateFile {
            last_attempt_at: s.last_attempt_at.time(),
            last_success_at: s.last_success_at.time(),
            consecutive_failures: s.consecutive_failures,
            last_error_code,
            last_error,
            needs_login: s.needs_login,
            next_attempt_at: s.next_attempt_at.time(),
        }
    }
}

impl AccountState {
    /// Appends what a start takes from this state to a start index record: every field but
    /// `next_attempt_at`, which a start sets anew (and which the daemon changes at each reschedule
    /// without saving). False when a message is too long for a record: the state file is then read.
    pub fn to_record(&self, w: &mut Writer) -> bool {
        w.secs(self.last_attempt_at);
        w.secs(self.last_success_at);
        w.u32(self.consecutive_failures);
        w.u8(u8::from(self.needs_login));
        match &self.problem {
            None => {
                w.u8(0);
                true
            }
            Some(p) => {
                w.u8(1);
                w.opt_str(p.code.as_deref()) && w.opt_str(p.message.as_deref())
            }
        }
    }

    pub fn from_record(r: &mut Reader<'_>) -> Option<AccountState> {
        Some(AccountState {
            last_attempt_at: r.secs()?,
            last_success_at: r.secs()?,
            next_attempt_at: Secs::NONE,
            consecutive_failures: r.u32()?,
            needs_login: match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            },
            problem: match r.u8()? {
                0 => None,
                1 => Some(Box::new(Problem {
                    code: r.opt_str()?,
                    message: r.opt_str()?,
                })),
                _ => return None,
            },
        })
    }

    /// A digest of this state's record: equal digests, equal states as a start sees them. How the
    /// daemon tells whether the state it holds is the one it last saved or loaded.
    pub fn record_digest(&self) -> Option<u64> {
        let mut w = Writer::default();
        self.to_record(&mut w).then(|| digest(&w.0))
    }

    pub fn last_attempt_at(&self) -> Option<Timestamp> {
        self.last_attempt_at.time()
    }

    pub fn last_success_at(&self) -> Option<Timestamp> {
        self.last_success_at.time()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn last_error_code(&self) -> Option<&str> {
        self.problem.as_ref().and_then(|p| p.code.as_deref())
    }

    pub fn last_error(&self) -> Option<&str> {
        self.problem.as_ref().and_then(|p| p.message.as_deref())
    }

    pub fn needs_login(&self) -> bool {
        self.needs_login
    }

    pub fn next_attempt_at(&self) -> Option<Timestamp> {
        self.next_attempt_at.time()
    }

    fn problem(&mut self) -> &mut Problem {
        self.problem.get_or_insert_default()
    }

    /// A request is about to leave.
    pub fn attempted(&mut self, at: Timestamp) {
        self.last_attempt_at = Secs::of_time(Some(at));
    }

    /// A refreshed (or new) token was written; `at` is when its request left.
    pub fn succeeded(&mut self, at: Option<Timestamp>) {
        self.last_success_at = Secs::of_time(at);
        self.consecutive_failures = 0;
        self.problem = None;
        self.needs_login = false;
    }

    /// An attempt failed: the count so far, the code, what was said (`None` keeps the last words), and
    /// whether only a new login can fix it.
    pub fn failed(&mut self, failures: u32, code: String, message: Option<String>, needs_login: bool) {
        self.consecutive_failures = failures;
        let problem = self.problem();
        problem.code = Some(code);
        if let Some(m) = message {
            problem.message = Some(m);
        }
        self.needs_login = needs_login;
    }

    /// No attempts until the file changes or a reload: why (`code`, when the park has one of its own),
    /// what was said, and whether a login is needed (added to what was known).
    pub fn parked(&mut self, code: Option<&str>, message: String, needs_login: bool) {
        self.needs_login |= needs_login;
        let problem = self.problem();
        if let Some(code) = code {
            problem.code = Some(code.to_string());
        }
        problem.message = Some(message);
        self.next_attempt_at = Secs::NONE;
    }

    /// The next attempt is due at `at` (`None`: none is).
    pub fn scheduled(&mut self, at: Option<Timestamp>) {
        self.next_attempt_at = Secs::of_time(at);
    }

    /// A new token file arrived for a parked account: whatever needed a login no longer does.
    pub fn login_seen(&mut self) {
        self.needs_login = false;
    }

    /// A command's whole attempt that worked: sent at `at` and written.
    pub fn record_success(&mut self, at: Timestamp) {
        self.attempted(at);
        self.succeeded(Some(at));
    }

    /// A command's whole attempt that failed.
    pub fn record_failure(&mut self, at: Timestamp, code: String, message: String, needs_login: bool) {
        self.attempted(at);
        let failures = self.consecutive_failures.saturating_add(1);
        let needs_login = self.needs_login || needs_login;
        self.failed(failures, code, Some(message), needs_login);
    }
}

/// A token file as read, with a digest of its exact bytes (to tell one's own writes from others'
/// without keeping a second copy of every file in memory).
#[derive(Debug, Clone)]
pub struct Current {
    pub file: TokenFile,
    pub digest: u64,
    /// The file's size in bytes, for the room the next version reserves.
    pub len: usize,
    /// Which version of the file this was read from: what the start index compares with the file at
    /// the next start.
    pub version: Version,
}

/// A version of a file, as its `stat` tells it: device, inode, size, modification and change times,
/// hashed (`stamp`, 0 when unknown), and the change time in whole seconds (`changed`), which says when
/// the version can no longer be mistaken for a write in the same tick of the file system's clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Version {
    pub stamp: u64,
    pub changed: u32,
}

impl Version {
    pub const UNKNOWN: Version = Version { stamp: 0, changed: 0 };
}

/// A digest of a token file's bytes: equal bytes, equal digest; a 64-bit collision between two
/// versions of one file is not a practical concern.
pub fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("does not exist")]
    Missing,
    #[error("cannot be read: {0}")]
    Io(io::Error),
    #[error("{0}")]
    Parse(token::ParseError),
}

/// How a publish went beyond the token file itself.
#[derive(Debug, Default)]
pub struct PublishReport {
    pub backup: Option<PathBuf>,
    pub pruned: usize,
    /// A backup or prune that failed. The token file itself was published.
    pub backup_error: Option<io::Error>,
    /// The env file could not be written. The token file itself was published.
    pub env_error: Option<io::Error>,
    /// The published file as its rename left it.
    pub stamp: Option<FileStamp>,
}

/// A file's identity and times, as `stat` gives them: equal stamps mean the same version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime: (i64, i64),
}

pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn folder(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    folder(path).join(format!("{}{suffix}", file_name(path)))
}

/// `NAME.json.lock`: whoever holds it is the only refresher.
pub fn lock_path(token_file: &Path) -> PathBuf {
    sibling(token_file, ".lock")
}

/// `NAME.json.state`: the [`AccountState`].
pub fn state_path(token_file: &Path) -> PathBuf {
    sibling(token_file, STATE_SUFFIX)
}

/// What the state file's name adds to the token file's.
pub const STATE_SUFFIX: &str = ".state";

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_failure_then_a_success() {
        let mut s = AccountState::default();
        s.record_failure(ts("2026-01-01T00:00:00.5Z"), "KOE322".into(), "dead".into(), true);
        s.record_failure(ts("2026-01-01T00:01:00Z"), "transport".into(), "down".into(), false);
        assert_eq!(s.consecutive_failures(), 2);
        assert!(s.needs_login(), "a needed login is not forgotten by a later failure");
        assert_eq!(s.last_error_code(), Some("transport"));
        s.record_success(ts("2026-01-01T00:02:00.9Z"));
        assert_eq!(s.last_success_at(), Some(ts("2026-01-01T00:02:00Z")));
        assert_eq!(
            (s.consecutive_failures(), s.last_error_code(), s.needs_login()),
            (0, None, false)
        );
    }

    /// The compact form in memory writes the file it always wrote, and reads it back the same.
    #[test]
    fn the_state_file_keeps_its_format() {
        let mut s = AccountState::default();
        s.record_failure(ts("2026-01-01T00:00:00.5Z"), "KOE322".into(), "dead".into(), true);
        s.scheduled(Some(ts("1969-12-31T23:59:59Z")));
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            text,
            r#"{"last_attempt_at":"2026-01-01T00:00:00Z","last_success_at":null,"consecutive_failures":1,"last_error_code":"KOE322","last_error":"dead","needs_login":true,"next_attempt_at":"1969-12-31T23:59:59Z"}"#
        );
        let back: AccountState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        let empty: AccountState = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, AccountState::default());
        assert_eq!((empty.last_attempt_at(), empty.last_error()), (None, None));
        assert_eq!(size_of::<AccountState>(), 40);
    }

    #[test]
    fn names_beside_a_token_file() {
        assert_eq!(lock_path(Path::new("/t/me.json")), Path::new("/t/me.json.lock"));
        assert_eq!(state_path(Path::new("me.json")), Path::new("./me.json.state"));
    }
}
