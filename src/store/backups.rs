//! Timestamped backups beside a token file: their names, their listing and their pruning.

use std::fs::{self};
use std::io::{self};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use jiff::Timestamp;

use super::*;

/// `NAME.json.YYYYmmdd_HHMMSS`, then `-1`, `-2`, ... for more within the same second.
pub fn backup_name(token_name: &str, now: Timestamp, n: u32) -> String {
    stamped_name(token_name, stamp_key(now), n)
}

/// Parses a backup's name into a sort key (stamp, n), or `None` if `candidate` is not one of ours.
pub fn backup_key(token_name: &str, candidate: &str) -> Option<(String, u32)> {
    split_backup_name(token_name, candidate).map(|(stamp, n)| (stamp.to_string(), n))
}

/// [`backup_key`] packed, with nothing allocated: a listing parses every backup in the folder. A
/// suffix past [`u16::MAX`] is no backup of ours.
pub(super) fn parse_backup(token_name: &str, candidate: &str) -> Option<BackupKey> {
    split_backup_name(token_name, candidate).and_then(|(stamp, n)| pack_key(pack_stamp(stamp), n))
}

fn split_backup_name<'c>(token_name: &str, candidate: &'c str) -> Option<(&'c str, u32)> {
    split_backup_suffix(candidate.strip_prefix(token_name)?.strip_prefix('.')?)
}

/// What follows `NAME.` in a backup's name: `YYYYmmdd_HHMMSS`, then `-N` for more within that second.
pub(super) fn split_backup_suffix(rest: &str) -> Option<(&str, u32)> {
    let (stamp, n) = match rest.split_once('-') {
        Some((stamp, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (stamp, n.parse().ok()?),
        Some(_) => return None,
        None => (rest, 0),
    };
    let b = stamp.as_bytes();
    let ok =
        b.len() == 15 && b[8] == b'_' && b[..8].iter().all(u8::is_ascii_digit) && b[9..].iter().all(u8::is_ascii_digit);
    ok.then_some((stamp, n))
}

/// A backup's place in age order, which also gives its name: the stamp's fourteen digits as one number
/// (`YYYYmmddHHMMSS`, under 2^47) above the suffix `-N` (0 for none) in the low 16 bits. Eight bytes, as
/// a daemon keeps five per account: at 100,000 accounts a pair of numbers was 4.6 MiB more.
pub(super) type BackupKey = u64;

/// The key of the stamp `stamp` with the suffix `n`; none past the suffixes a key holds.
pub(super) fn pack_key(stamp: u64, n: u32) -> Option<BackupKey> {
    let n = u16::try_from(n).ok()?;
    Some(stamp << 16 | u64::from(n))
}

/// The stamp and the suffix of a key.
pub(super) fn unpack_key(key: BackupKey) -> (u64, u32) {
    (key >> 16, (key & 0xffff) as u32)
}

/// The key of a backup stamp `YYYYmmdd_HHMMSS` (one [`backup_key`] accepted).
pub(super) fn pack_stamp(stamp: &str) -> u64 {
    stamp
        .bytes()
        .filter(u8::is_ascii_digit)
        .fold(0, |n, d| n * 10 + u64::from(d - b'0'))
}

/// The stamp part of the key of a backup made at `now`.
fn stamp_key(now: Timestamp) -> u64 {
    pack_stamp(&now.strftime("%Y%m%d_%H%M%S").to_string())
}

/// The name of the backup with this key; [`backup_name`] for a time.
fn backup_file_name(token_name: &str, key: BackupKey) -> String {
    let (stamp, n) = unpack_key(key);
    stamped_name(token_name, stamp, n)
}

fn stamped_name(token_name: &str, stamp: u64, n: u32) -> String {
    let (day, time) = (stamp / 1_000_000, stamp % 1_000_000);
    if n == 0 {
        format!("{token_name}.{day:08}_{time:06}")
    } else {
        format!("{token_name}.{day:08}_{time:06}-{n}")
    }
}

/// A backup the next publish would delete, offered to become the room for the next version.
#[derive(Debug, Clone)]
pub struct Spare {
    pub(super) key: BackupKey,
    pub(super) path: PathBuf,
}

/// The backups of one token file, oldest first, as keys: eight bytes each rather than a path, since
/// a daemon keeps them for every account between refreshes hours apart.
#[derive(Debug, Clone, Default)]
pub struct Backups {
    pub(super) known: Vec<BackupKey>,
}

impl Backups {
    /// Lists the folder for this token file's backups.
    pub fn scan(path: &Path) -> io::Result<Backups> {
        Ok(FolderScan::of(folder(path))?.take(&file_name(path)).backups)
    }

    /// The backups' paths beside `token_file`, oldest first.
    pub fn paths<'a>(&'a self, token_file: &'a Path) -> impl Iterator<Item = PathBuf> + 'a {
        let (dir, name) = (folder(token_file), file_name(token_file));
        self.known.iter().map(move |k| dir.join(backup_file_name(&name, *k)))
    }

    /// Keeps the current file under a backup name. A hard link costs no copy when the file is already
    /// private (0600); otherwise a private copy is made, so backups are always 0600.
    pub(super) fn add(&mut self, path: &Path, now: Timestamp) -> io::Result<Option<PathBuf>> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let private = meta.permissions().mode() & 0o077 == 0;
        let mut copy = if private {
            None
        } else {
            let (bytes, _) = read_regular(path, token::MAX_DOCUMENT_BYTES, true)?;
            Some(write_synced_temp(path, &bytes)?)
        };
        let name = file_name(path);
        // Number after the highest suffix already used in this second, not into a gap left by pruning,
        // so that name order stays age order.
        let stamp = stamp_key(now);
        let first = self
            .known
            .iter()
            .map(|&k| unpack_key(k))
            .filter(|(s, _)| *s == stamp)
            .map(|(_, n)| n + 1)
            .max()
            .unwrap_or(0);
        for n in first..first + 1000 {
            let Some(key) = pack_key(stamp, n) else {
                break;
            };
            let target = folder(path).join(backup_file_name(&name, key));
            let result = match copy.take() {
                None => fs::hard_link(path, &target),
                Some(tmp) => match tmp.persist_noclobber(&target) {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        copy = Some(e.file);
                        Err(e.error)
                    }
                },
            };
            match result {
                Ok(()) => {
                    self.known.push(key);
                    self.known.sort_unstable();
                    return Ok(Some(target));
                }
                // Someone else's backup in this second: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(
            "too many backups within one second (more than 1000, or suffixes past 65535)",
        ))
    }

    /// The oldest backup, if the next publish would prune it: room for the next version (see
    /// [`Reservation::take_reusing`]).
    pub fn spare(&self, token_file: &Path, keep: u32) -> Option<Spare> {
        let keep = keep as usize;
        if keep == 0 || self.known.len() < keep {
            return None;
        }
        let key = *self.known.first()?;
        Some(Spare {
            key,
            path: folder(token_file).join(backup_file_name(&file_name(token_file), key)),
        })
    }

    /// A backup gone by other means than a prune (it became the new version).
    pub(super) fn forget(&mut self, key: BackupKey) {
        self.known.retain(|k| *k != key);
    }

    /// Deletes all but the newest `keep` of `token_file`'s backups; returns how many went.
    pub(super) fn prune(&mut self, token_file: &Path, keep: usize) -> io::Result<usize> {
        let excess = self.known.len().saturating_sub(keep);
        let (dir, name) = (folder(token_file), file_name(token_file));
        for k in self.known.drain(..excess) {
            match fs::remove_file(dir.join(backup_file_name(&name, k))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(excess)
    }
}

/// The backups of a token file, oldest first.
pub fn list_backups(path: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(Backups::scan(path)?.paths(path).collect())
}
