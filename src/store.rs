//! Files on disk: the atomic, durable publish of a token file, its timestamped backups, the lock that
//! makes one process the refresher, crash clean-up, and the per-account state file.
//!
//! Beside each token file `NAME.json` live only `NAME.json.lock`, `NAME.json.state`, backups
//! `NAME.json.YYYYmmdd_HHMMSS[-N]`, and, for an instant, temp files `.NAME.json[...].tmp-RANDOM`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use jiff::Timestamp;

use crate::token::{self, TokenFile};

pub use kakao_tokend_core::account::FileAccess;
pub use kakao_tokend_core::state::{
    AccountState, Current, PublishReport, ReadError, digest, file_name, folder, lock_path, state_path,
};

/// The token file's name, as a string (config validation guarantees there is one).
/// Makes a rename or a new link in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens `path` for reading without blocking (a FIFO would otherwise hang the reader), requires a
/// regular file once it is open (so a swap between a check and the open cannot fool it), and reads at
/// most `cap` + 1 bytes (so a symlink to /dev/zero, or a file growing under it, cannot fill memory; the
/// caller sees the extra byte and refuses). `follow`: whether a symlink at `path` is followed.
pub fn read_regular(path: &Path, cap: usize, follow: bool) -> io::Result<(Vec<u8>, fs::Metadata)> {
    use std::io::Read;
    let mut flags = nix::libc::O_NONBLOCK;
    if !follow {
        flags |= nix::libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| symlink_refused(e, path))?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is not a regular file (a FIFO, a device or a folder): replace it with the token file",
        ));
    }
    let mut bytes = Vec::new();
    file.take(cap as u64 + 1).read_to_end(&mut bytes)?;
    Ok((bytes, meta))
}

/// O_NOFOLLOW met a symlink where the daemon keeps a file of its own: say so plainly.
fn symlink_refused(e: io::Error, path: &Path) -> io::Error {
    if e.raw_os_error() == Some(nix::libc::ELOOP) {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link, where kakao-tokend keeps a file of its own: remove it",
                path.display()
            ),
        )
    } else {
        e
    }
}

/// A temp file beside `path`, created 0600 whatever the umask, and removed on drop unless persisted.
fn temp_beside(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!(".{}.tmp-", file_name(path)))
        .rand_bytes(10)
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(folder(path))
}

fn write_synced_temp(path: &Path, bytes: &[u8]) -> io::Result<tempfile::NamedTempFile> {
    write_synced_temp_with(path, bytes, FileAccess::default(), &mut None)
}

/// Space for the next version of a token file, taken before a refresh is sent.
///
/// Kakao kills the old refresh token the moment it answers. A full disk or an unwritable folder found
/// only after the answer leaves the new token in memory alone; found before, it costs nothing, as no
/// request is sent. The reservation is the temp file the new version will be written into, already
/// holding real (not sparse) blocks, which the new version then overwrites in place.
#[derive(Debug)]
pub struct Reservation {
    tmp: tempfile::NamedTempFile,
}

impl Reservation {
    /// Room for a file of `current_len` bytes to grow to twice its size, and at least a 4 KiB block.
    pub fn take(path: &Path, current_len: usize) -> io::Result<Reservation> {
        let mut tmp = temp_beside(path)?;
        // File systems allocate (tmpfs) or reserve (ext4, XFS delayed allocation) space at write time,
        // so a full disk shows here, with no fsync needed.
        tmp.write_all(&vec![0u8; current_len.saturating_mul(2).max(4096)])?;
        tmp.flush()?;
        Ok(Reservation { tmp })
    }
}

/// The temp file gets its final mode and group before it is renamed into place, so the published file
/// is never readable by more than it should be, not even for an instant.
fn write_synced_temp_with(
    path: &Path,
    bytes: &[u8],
    access: FileAccess,
    reserved: &mut Option<Reservation>,
) -> io::Result<tempfile::NamedTempFile> {
    let mut tmp = match reserved.take() {
        Some(r) => r.tmp,
        None => temp_beside(path)?,
    };
    match fill_synced(&mut tmp, bytes, access) {
        Ok(()) => Ok(tmp),
        Err(e) => {
            // Kept for the next try: a folder that stopped taking new files still has this one.
            *reserved = Some(Reservation { tmp });
            Err(e)
        }
    }
}

fn fill_synced(tmp: &mut tempfile::NamedTempFile, bytes: &[u8], access: FileAccess) -> io::Result<()> {
    tmp.rewind()?;
    tmp.write_all(bytes)?;
    // A reservation larger than the content is cut to it.
    tmp.as_file().set_len(bytes.len() as u64)?;
    if let Some(gid) = access.gid {
        std::os::unix::fs::fchown(tmp.as_file(), None, Some(gid))?;
    }
    if access.mode != 0o600 {
        tmp.as_file().set_permissions(fs::Permissions::from_mode(access.mode))?;
    }
    tmp.as_file().sync_all()
}

/// Replaces `path` with `bytes` so that a reader sees the old file or the new one, never a missing or
/// partial one, and so that the new one survives a crash: temp file 0600, fsync, rename, fsync folder.
pub fn write_atomic(path: &Path, bytes: &[u8], access: FileAccess) -> io::Result<()> {
    let tmp = write_synced_temp_with(path, bytes, access, &mut None)?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(folder(path))
}

/// Atomic but not durable: for the advisory state file, which a crash may roll back without harm.
fn replace_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Publishes a new token file, keeping the one it replaces as a backup when `keep_backups > 0`. For a
/// one-off write (a command); the daemon uses [`publish_token_with`] and its own view of the backups.
pub fn publish_token(
    path: &Path,
    bytes: &[u8],
    keep_backups: u32,
    now: Timestamp,
    access: FileAccess,
) -> io::Result<PublishReport> {
    publish_token_with(path, bytes, keep_backups, now, &mut None, access, &mut None)
}

/// Publishes a new token file. `backups` is the caller's view of this file's backups, scanned from the
/// folder when `None`: a daemon keeps it between refreshes so that a folder holding thousands of token
/// files is not listed at every refresh (it drops the view when someone else writes the file).
///
/// Order matters: the new content is on disk (fsynced) before anything else, so a rotated refresh
/// token survives a crash at any later point; the backup link and the rename then share one folder
/// fsync. A failed backup never stops the publish. `reserved`: the room taken before the request, if
/// it was (see [`Reservation`]); after a failure it holds the temp file, for the next try.
pub fn publish_token_with(
    path: &Path,
    bytes: &[u8],
    keep_backups: u32,
    now: Timestamp,
    backups: &mut Option<Backups>,
    access: FileAccess,
    reserved: &mut Option<Reservation>,
) -> io::Result<PublishReport> {
    let tmp = write_synced_temp_with(path, bytes, access, reserved)?;
    let mut report = PublishReport::default();
    if keep_backups > 0 {
        let known = match backups.take() {
            Some(b) => Ok(b),
            None => Backups::scan(path),
        };
        match known {
            Ok(mut known) => {
                match known.add(path, now) {
                    Ok(b) => report.backup = b,
                    Err(e) => report.backup_error = Some(e),
                }
                *backups = Some(known);
            }
            Err(e) => report.backup_error = Some(e),
        }
    }
    if let Err(e) = tmp.persist(path) {
        // The temp file holds the new token, synced: the next try only has to rename it.
        *reserved = Some(Reservation { tmp: e.file });
        return Err(e.error);
    }
    sync_dir(folder(path))?;
    if keep_backups > 0
        && let Some(known) = backups.as_mut()
    {
        match known.prune(keep_backups as usize) {
            Ok(n) => report.pruned = n,
            Err(e) => report.backup_error = report.backup_error.or(Some(e)),
        }
    }
    Ok(report)
}

/// `NAME.json.YYYYmmdd_HHMMSS`, then `-1`, `-2`, ... for more within the same second.
pub fn backup_name(token_name: &str, now: Timestamp, n: u32) -> String {
    let stamp = now.strftime("%Y%m%d_%H%M%S");
    if n == 0 {
        format!("{token_name}.{stamp}")
    } else {
        format!("{token_name}.{stamp}-{n}")
    }
}

/// Parses a backup's name into a sort key (stamp, n), or `None` if `candidate` is not one of ours.
pub fn backup_key(token_name: &str, candidate: &str) -> Option<(String, u32)> {
    let rest = candidate.strip_prefix(token_name)?.strip_prefix('.')?;
    let (stamp, n) = match rest.split_once('-') {
        Some((stamp, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (stamp, n.parse().ok()?),
        Some(_) => return None,
        None => (rest, 0),
    };
    let b = stamp.as_bytes();
    let ok =
        b.len() == 15 && b[8] == b'_' && b[..8].iter().all(u8::is_ascii_digit) && b[9..].iter().all(u8::is_ascii_digit);
    ok.then(|| (stamp.to_string(), n))
}

/// The backups of one token file, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Backups {
    known: Vec<((String, u32), PathBuf)>,
}

impl Backups {
    /// Lists the folder for this token file's backups.
    pub fn scan(path: &Path) -> io::Result<Backups> {
        Ok(FolderScan::of(folder(path))?.take(&file_name(path)).1)
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.known.iter().map(|(_, p)| p.as_path())
    }

    /// Keeps the current file under a backup name. A hard link costs no copy when the file is already
    /// private (0600); otherwise a private copy is made, so backups are always 0600.
    fn add(&mut self, path: &Path, now: Timestamp) -> io::Result<Option<PathBuf>> {
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
        let stamp = now.strftime("%Y%m%d_%H%M%S").to_string();
        let first = self
            .known
            .iter()
            .filter(|((s, _), _)| *s == stamp)
            .map(|((_, n), _)| n + 1)
            .max()
            .unwrap_or(0);
        for n in first..first + 1000 {
            let target = folder(path).join(backup_name(&name, now, n));
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
                    self.known.push(((stamp, n), target.clone()));
                    self.known.sort();
                    return Ok(Some(target));
                }
                // Someone else's backup in this second: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("more than 1000 backups within one second"))
    }

    /// Deletes all but the newest `keep`; returns how many went.
    fn prune(&mut self, keep: usize) -> io::Result<usize> {
        let excess = self.known.len().saturating_sub(keep);
        for (_, p) in self.known.drain(..excess) {
            match fs::remove_file(&p) {
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
    Ok(Backups::scan(path)?.paths().map(Path::to_path_buf).collect())
}

/// Whether `candidate` is a temp file of ours for `token_name`: `.NAME.tmp-R`, `.NAME.state.tmp-R` or
/// `.NAME.<backup stamp>.tmp-R`. Nothing else is ever deleted by crash clean-up.
pub fn is_temp_name(token_name: &str, candidate: &str) -> bool {
    let Some(rest) = candidate.strip_prefix('.').and_then(|c| c.strip_prefix(token_name)) else {
        return false;
    };
    let Some((middle, random)) = rest.rsplit_once(".tmp-") else {
        return false;
    };
    let middle_ok = middle.is_empty()
        || middle == ".state"
        || middle
            .strip_prefix('.')
            .is_some_and(|m| backup_key("x", &format!("x.{m}")).is_some());
    middle_ok && !random.is_empty() && random.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The token file name a temp file of ours belongs to, if it is one (see [`is_temp_name`]).
pub fn temp_file_owner(candidate: &str) -> Option<String> {
    let (head, _) = candidate.strip_prefix('.')?.rsplit_once(".tmp-")?;
    let owner = head
        .strip_suffix(".state")
        .or_else(|| {
            let (owner, stamp) = head.rsplit_once('.')?;
            backup_key("x", &format!("x.{stamp}")).map(|_| owner)
        })
        .unwrap_or(head);
    is_temp_name(owner, candidate).then(|| owner.to_string())
}

/// What one listing of a folder says about each token file in it: temp files a crash left behind and
/// the backups kept. One listing per folder, however many token files it holds.
#[derive(Debug, Default)]
pub struct FolderScan {
    pub temps: std::collections::HashMap<String, Vec<PathBuf>>,
    pub backups: std::collections::HashMap<String, Backups>,
}

impl FolderScan {
    pub fn of(dir: &Path) -> io::Result<FolderScan> {
        let mut scan = FolderScan::default();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(owner) = temp_file_owner(&name) {
                scan.temps.entry(owner).or_default().push(entry.path());
            } else if let Some((owner, _)) = name.rsplit_once('.')
                // NAME.json.YYYYmmdd_HHMMSS[-N]: the stamp follows the last dot, suffix included.
                && let Some(key) = backup_key(owner, &name)
            {
                scan.backups
                    .entry(owner.to_string())
                    .or_default()
                    .known
                    .push((key, entry.path()));
            }
        }
        for b in scan.backups.values_mut() {
            b.known.sort();
        }
        Ok(scan)
    }

    /// Takes out what belongs to the token file `token_name`.
    pub fn take(&mut self, token_name: &str) -> (Vec<PathBuf>, Backups) {
        (
            self.temps.remove(token_name).unwrap_or_default(),
            self.backups.remove(token_name).unwrap_or_default(),
        )
    }
}

/// Removes temp files found by [`FolderScan`]. Call it holding the token file's lock, so that
/// no other process's write in progress is removed.
pub fn remove_temp_files(paths: &[PathBuf]) -> io::Result<usize> {
    let mut removed = 0;
    for p in paths {
        match fs::remove_file(p) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Reads and parses a token file. A file in the seed's format gets its refresh token's expiry
/// estimated from its modification time.
pub fn read_token_file(path: &Path) -> Result<Current, ReadError> {
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::NotFound => ReadError::Missing,
        _ => ReadError::Io(e),
    };
    let (bytes, meta) = read_regular(path, token::MAX_DOCUMENT_BYTES, true).map_err(io_err)?;
    if bytes.len() > token::MAX_DOCUMENT_BYTES {
        return Err(ReadError::Parse(token::ParseError::TooLarge));
    }
    let mut file = TokenFile::parse(&bytes).map_err(ReadError::Parse)?;
    if file.is_seed_format() {
        let modified = meta
            .modified()
            .ok()
            .and_then(|m| Timestamp::try_from(m).ok())
            .unwrap_or_else(Timestamp::now);
        file.estimate_seed_times(modified);
    }
    let digest = digest(&bytes);
    Ok(Current {
        file,
        digest,
        len: bytes.len(),
    })
}

/// The exclusive advisory lock beside a token file. Whoever holds it is the only refresher; it is
/// released when dropped (or when the process dies, which is why it is a lock and not a pid file).
#[derive(Debug)]
pub struct TokenLock {
    _file: File,
}

fn open_lock(token_file: &Path) -> io::Result<File> {
    let path = lock_path(token_file);
    // Open an existing lock file without O_CREAT: creating takes the folder's lock in the kernel, which
    // thousands of accounts sharing one folder would contend for at every refresh. Never through a
    // symlink: a dangling one would make the daemon create a file wherever it points.
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path),
        other => other,
    }
    .map_err(|e| symlink_refused(e, &path))
}

impl TokenLock {
    /// Takes the lock if it is free.
    pub fn try_acquire(token_file: &Path) -> io::Result<Option<TokenLock>> {
        let file = open_lock(token_file)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(TokenLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Waits for the lock. The wait runs on the blocking pool, so the caller can give up on it (at
    /// shutdown) without blocking the runtime; an abandoned wait releases the lock as soon as it gets it.
    pub async fn acquire(token_file: &Path) -> io::Result<TokenLock> {
        if let Some(lock) = Self::try_acquire(token_file)? {
            return Ok(lock);
        }
        let path = token_file.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let file = open_lock(&path)?;
            file.lock()?;
            Ok(TokenLock { _file: file })
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// A state file is a few hundred bytes; more is not one.
const STATE_FILE_CAP: usize = 64 * 1024;

/// Reading and writing the [`AccountState`] beside a token file.
pub trait StateFile: Sized {
    fn load(token_file: &Path) -> io::Result<Option<Self>>;
    fn save(&self, token_file: &Path) -> io::Result<()>;
}

impl StateFile for AccountState {
    fn load(token_file: &Path) -> io::Result<Option<AccountState>> {
        match read_regular(&state_path(token_file), STATE_FILE_CAP, false) {
            Ok((bytes, _)) => serde_json::from_slice(&bytes).map(Some).map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&self, token_file: &Path) -> io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        bytes.push(b'\n');
        replace_atomic(&state_path(token_file), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn temps(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| is_temp_name("t.json", n))
            .collect()
    }

    #[test]
    fn a_reservation_becomes_the_file_cut_to_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        fs::write(&path, b"{\"access_token\":\"old\"}").unwrap();
        let mut room = Some(Reservation::take(&path, 24).unwrap());
        // The room is real: a temp file of at least a block, beside the token file, 0600.
        let left = temps(dir.path());
        assert_eq!(left.len(), 1);
        let tmp = dir.path().join(&left[0]);
        assert_eq!((fs::metadata(&tmp).unwrap().len(), mode(&tmp)), (4096, 0o600));

        let new = b"{\"access_token\":\"new\"}";
        let now = ts("2026-01-01T00:00:00Z");
        publish_token_with(&path, new, 2, now, &mut None, FileAccess::default(), &mut room).unwrap();
        assert!(room.is_none());
        assert_eq!(fs::read(&path).unwrap(), new);
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_rename_hands_the_written_temp_file_back_for_the_next_try() {
        let dir = tempfile::tempdir().unwrap();
        // A folder where the file should be: the rename cannot replace it.
        let path = dir.path().join("t.json");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("x"), b"x").unwrap();
        let mut room = Some(Reservation::take(&path, 10).unwrap());
        let now = ts("2026-01-01T00:00:00Z");
        let new = b"{\"access_token\":\"new\"}";
        assert!(publish_token_with(&path, new, 0, now, &mut None, FileAccess::default(), &mut room).is_err());
        assert!(room.is_some(), "the temp file holding the new token was dropped");
        assert_eq!(temps(dir.path()).len(), 1);

        // Once the way is clear, the same temp file is renamed into place.
        fs::remove_dir_all(&path).unwrap();
        publish_token_with(&path, new, 0, now, &mut None, FileAccess::default(), &mut room).unwrap();
        assert_eq!(fs::read(&path).unwrap(), new);
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn backup_names_and_keys() {
        let now = ts("2026-03-04T05:06:07.9Z");
        assert_eq!(backup_name("me.json", now, 0), "me.json.20260304_050607");
        assert_eq!(backup_name("me.json", now, 2), "me.json.20260304_050607-2");
        assert_eq!(
            backup_key("me.json", "me.json.20260304_050607"),
            Some(("20260304_050607".into(), 0))
        );
        assert_eq!(
            backup_key("me.json", "me.json.20260304_050607-12"),
            Some(("20260304_050607".into(), 12))
        );
        for not_ours in [
            "me.json",
            "me.json.lock",
            "me.json.state",
            "me.json.2026",
            "me.json.20260304_05060x",
            "me.json.20260304_050607-",
            "me.json.20260304_050607-a",
            "you.json.20260304_050607",
            ".me.json.tmp-abc",
        ] {
            assert_eq!(backup_key("me.json", not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn one_folder_scan_attributes_backups_to_their_token_files() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "a.json.20260101_000000",
            "a.json.20260101_000000-2",
            "a.json.20260101_000000-1",
            "b.json.20260102_000000",
            "a.json",
            "a.json.lock",
            "c.json.2026",
        ] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        let mut scan = FolderScan::of(dir.path()).unwrap();
        let (_, a) = scan.take("a.json");
        let names: Vec<String> = a.paths().map(file_name).collect();
        assert_eq!(
            names,
            [
                "a.json.20260101_000000",
                "a.json.20260101_000000-1",
                "a.json.20260101_000000-2"
            ]
        );
        assert_eq!(scan.take("b.json").1.paths().count(), 1);
        assert!(scan.backups.is_empty());
    }

    #[test]
    fn temp_files_are_attributed_to_their_token_file() {
        assert_eq!(temp_file_owner(".me.json.tmp-Ab12").as_deref(), Some("me.json"));
        assert_eq!(temp_file_owner(".me.json.state.tmp-x9").as_deref(), Some("me.json"));
        assert_eq!(
            temp_file_owner(".me.json.20260304_050607-1.tmp-Q").as_deref(),
            Some("me.json")
        );
        assert_eq!(temp_file_owner(".a.b.json.tmp-Q").as_deref(), Some("a.b.json"));
        assert_eq!(temp_file_owner("me.json.tmp-Q"), None);
        assert_eq!(temp_file_owner(".me.json.tmp-"), None);
        assert_eq!(temp_file_owner(".me.json"), None);
    }

    #[test]
    fn temp_names_are_recognised_exactly() {
        for ours in [
            ".me.json.tmp-Ab12",
            ".me.json.state.tmp-x9",
            ".me.json.20260304_050607-1.tmp-Q",
        ] {
            assert!(is_temp_name("me.json", ours), "{ours}");
        }
        for not_ours in [
            "me.json",
            ".me.json",
            ".me.json.tmp-",
            ".me.json.tmp-a/b",
            ".you.json.tmp-abc",
            ".me.json.lock.tmp-abc",
            "me.json.tmp-abc",
            ".me.json.tmp-abc.bak",
        ] {
            assert!(!is_temp_name("me.json", not_ours), "{not_ours}");
        }
    }

    #[test]
    fn publish_writes_private_files_and_rotates_backups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("me.json");
        let now = ts("2026-03-04T05:06:07Z");
        publish_token(&path, b"v0", 2, now, FileAccess::default()).unwrap();
        assert_eq!(mode(&path), 0o600);
        for i in 1..=4 {
            let r = publish_token(&path, format!("v{i}").as_bytes(), 2, now, FileAccess::default()).unwrap();
            assert!(r.backup.is_some() && r.backup_error.is_none());
        }
        assert_eq!(fs::read(&path).unwrap(), b"v4");
        let backups = list_backups(&path).unwrap();
        let names: Vec<String> = backups.iter().map(|p| file_name(p)).collect();
        // Same second: suffixes count up; only the newest two are kept.
        assert_eq!(names, ["me.json.20260304_050607-2", "me.json.20260304_050607-3"]);
        assert_eq!(fs::read(&backups[0]).unwrap(), b"v2");
        assert_eq!(fs::read(&backups[1]).unwrap(), b"v3");
        for b in &backups {
            assert_eq!(mode(b), 0o600);
        }
        // Nothing else was left in the folder.
        let mut all: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        all.sort();
        assert_eq!(all.len(), 3, "{all:?}");
    }

    #[test]
    fn a_shared_file_is_backed_up_as_a_private_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("me.json");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let r = publish_token(&path, b"new", 5, ts("2026-01-01T00:00:00Z"), FileAccess::default()).unwrap();
        let backup = r.backup.unwrap();
        assert_eq!(fs::read(&backup).unwrap(), b"old");
        assert_eq!(mode(&backup), 0o600);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_shared_token_file_gets_its_mode_before_it_appears_and_backups_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("me.json");
        let shared = FileAccess { mode: 0o640, gid: None };
        publish_token(&path, b"one", 3, ts("2026-01-01T00:00:00Z"), shared).unwrap();
        assert_eq!(mode(&path), 0o640);
        let r = publish_token(&path, b"two", 3, ts("2026-01-01T00:00:01Z"), shared).unwrap();
        assert_eq!(mode(&path), 0o640);
        assert_eq!(mode(&r.backup.unwrap()), 0o600);
    }

    #[test]
    fn no_backups_when_zero_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("me.json");
        publish_token(&path, b"a", 0, ts("2026-01-01T00:00:00Z"), FileAccess::default()).unwrap();
        publish_token(&path, b"b", 0, ts("2026-01-01T00:00:00Z"), FileAccess::default()).unwrap();
        assert!(list_backups(&path).unwrap().is_empty());
    }

    #[test]
    fn stale_temp_files_and_only_they_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            ".me.json.tmp-abc",
            ".me.json.state.tmp-def",
            "me.json",
            "me.json.20260101_000000",
            "other",
        ] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        let mut scan = FolderScan::of(dir.path()).unwrap();
        assert_eq!(scan.temps.len(), 1, "{scan:?}");
        let (temps, backups) = scan.take("me.json");
        assert_eq!(backups.paths().count(), 1);
        assert_eq!(remove_temp_files(&temps).unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["me.json", "me.json.20260101_000000", "other"]);
    }

    #[test]
    fn the_lock_is_exclusive_across_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("me.json");
        let held = TokenLock::try_acquire(&path).unwrap().unwrap();
        assert!(TokenLock::try_acquire(&path).unwrap().is_none());
        drop(held);
        assert!(TokenLock::try_acquire(&path).unwrap().is_some());
        assert_eq!(mode(&lock_path(&path)), 0o600);
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("me.json");
        assert_eq!(AccountState::load(&path).unwrap(), None);
        let mut s = AccountState::default();
        s.attempted(ts("2026-01-01T00:00:00Z"));
        s.failed(3, "KOE322".into(), Some("dead".into()), true);
        s.save(&path).unwrap();
        assert_eq!(AccountState::load(&path).unwrap(), Some(s));
        assert_eq!(mode(&state_path(&path)), 0o600);
    }
}
