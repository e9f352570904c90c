//! The atomic, durable write: a synced temp file beside the target, renamed over it, and the folder
//! synced; the room a refresh reserves first; and the publish of a token file with its backup.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use jiff::Timestamp;

use super::*;

/// What tells one version of a file from another without reading it: a rename brings another inode, and
/// a write in place a new modification time.
pub fn stamp_of(meta: &fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    FileStamp {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
    }
}

/// This process's effective user id, asked of the kernel once: every refresh checks files against it.
pub(super) fn euid() -> u32 {
    static EUID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *EUID.get_or_init(|| nix::unistd::geteuid().as_raw())
}

/// Makes a rename or a new link in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens `path` for reading without blocking (a FIFO would otherwise hang the reader), requires a
/// regular file once it is open (so a swap between a check and the open cannot fool it), and reads at
/// most `cap` + 1 bytes (so a symlink to /dev/zero, or a file growing under it, cannot fill memory; the
/// caller sees the extra byte and refuses). `follow`: whether a symlink at `path` is followed.
pub fn read_regular(path: &Path, cap: usize, follow: bool) -> io::Result<(Vec<u8>, fs::Metadata)> {
    read_open(&open_regular(path, follow)?, cap)
}

/// The open of [`read_regular`], for a reader that locks the file before [`read_open`] reads it.
pub(super) fn open_regular(path: &Path, follow: bool) -> io::Result<File> {
    let mut flags = nix::libc::O_NONBLOCK;
    if !follow {
        flags |= nix::libc::O_NOFOLLOW;
    }
    let open = |flags| OpenOptions::new().read(true).custom_flags(flags).open(path);
    // Without an access-time update: the first read of a file written since it was last read (every
    // token file at start, and under the lock before each refresh) would otherwise write its inode.
    // Only the file's owner may ask; for anyone else the read is as usual.
    match open(flags | nix::libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => open(flags),
        other => other,
    }
    .map_err(|e| symlink_refused(e, path))
}

/// The read of [`read_regular`], from a file it opened.
pub(super) fn read_open(file: &File, cap: usize) -> io::Result<(Vec<u8>, fs::Metadata)> {
    use std::io::Read;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is not a regular file (a FIFO, a device or a folder): replace it with the token file",
        ));
    }
    // Sized from the metadata, one byte over: a single read that stops short at the size the metadata
    // gave has met the end (a regular file's read is short only there), with no second read to find it.
    // A file that changed size meanwhile is read on to its end, and never past `cap` + 1 bytes.
    let limit = cap.saturating_add(1);
    let size = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    let mut bytes = vec![0u8; size.min(cap).saturating_add(1)];
    let mut filled = 0;
    let mut file = file;
    loop {
        let n = match file.read(&mut bytes[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        filled += n;
        // The buffer is always larger than `size`, so a read that reached `size` stopped short there.
        if n == 0 || filled == limit || filled == size {
            break;
        }
        if filled == bytes.len() {
            bytes.resize(filled.saturating_mul(2).min(limit), 0);
        }
    }
    bytes.truncate(filled);
    Ok((bytes, meta))
}

/// O_NOFOLLOW met a symlink where the daemon keeps a file of its own: say so plainly.
pub(super) fn symlink_refused(e: io::Error, path: &Path) -> io::Error {
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
pub(super) fn temp_beside(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .rand_bytes(10)
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(folder(path))
}

pub(super) fn write_synced_temp(path: &Path, bytes: &[u8]) -> io::Result<tempfile::NamedTempFile> {
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
    /// Always there but in `drop` and [`Reservation::into_parts`].
    tmp: Option<tempfile::NamedTempFile>,
    /// The file's length now: the zeros written, or the recycled backup's content.
    len: u64,
    /// The backup this file was, while it still holds that backup's content (see [`Spare`]).
    recycled: Option<Spare>,
}

impl Reservation {
    /// Room for a file of `current_len` bytes to grow to twice its size, and at least a 4 KiB block.
    pub fn take(path: &Path, current_len: usize) -> io::Result<Reservation> {
        Reservation::take_reusing(path, current_len, None)
    }

    /// The same, made of `spare` when there is one and it is fit: the oldest backup, which the publish
    /// would delete. A refresh then creates no file and deletes none, where a new temp file and a pruned
    /// backup would take one inode and free another.
    pub fn take_reusing(path: &Path, current_len: usize, spare: Option<Spare>) -> io::Result<Reservation> {
        let room = current_len.saturating_mul(2).max(4096) as u64;
        if let Some(spare) = spare
            && let Some(reservation) = Reservation::recycle(path, room, spare)
        {
            return Ok(reservation);
        }
        let mut tmp = temp_beside(path)?;
        // File systems allocate (tmpfs) or reserve (ext4, XFS delayed allocation) space at write time,
        // so a full disk shows here, with no fsync needed.
        tmp.write_all(&vec![0u8; room as usize])?;
        tmp.flush()?;
        Ok(Reservation::holding(tmp, room))
    }

    /// Renames the spare backup to a temp name and keeps it if it is ours alone: a regular file, 0600,
    /// owned by this user, with no other name (someone may have linked a backup elsewhere to keep it),
    /// and with blocks enough for `room`. Anything else goes back under its name, untouched.
    fn recycle(path: &Path, room: u64, spare: Spare) -> Option<Reservation> {
        use std::os::unix::fs::MetadataExt;
        let temp = folder(path).join(format!("{}{}", temp_prefix(path), random_suffix()));
        fs::rename(&spare.path, &temp).ok()?;
        let fit = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&temp)
            .and_then(|file| Ok((file.metadata()?, file)))
            .ok()
            .filter(|(m, _)| {
                m.is_file()
                    && m.nlink() == 1
                    && m.mode() & 0o7777 == 0o600
                    && m.uid() == euid()
                    && m.blocks().saturating_mul(512) >= room
            });
        match fit.and_then(|fit| Some((fit, tempfile::TempPath::try_from_path(&temp).ok()?))) {
            Some(((meta, file), temp)) => Some(Reservation {
                tmp: Some(tempfile::NamedTempFile::from_parts(file, temp)),
                len: meta.len(),
                recycled: Some(spare),
            }),
            None => {
                let _ = fs::rename(&temp, &spare.path);
                None
            }
        }
    }

    fn holding(tmp: tempfile::NamedTempFile, len: u64) -> Reservation {
        Reservation {
            tmp: Some(tmp),
            len,
            recycled: None,
        }
    }

    /// The backup this reservation was made of, whose name is gone once the reservation is written.
    pub(super) fn recycled_key(&self) -> Option<BackupKey> {
        self.recycled.as_ref().map(|s| s.key)
    }

    /// The temp file and its length, to be written: from here on it is not a backup any more.
    fn into_parts(mut self) -> (tempfile::NamedTempFile, u64) {
        self.recycled = None;
        let tmp = self
            .tmp
            .take()
            .expect("a reservation holds its file until it is used or dropped");
        (tmp, self.len)
    }
}

impl Drop for Reservation {
    /// An unused reservation made of a backup (the request failed) puts the backup back under its name:
    /// a failed attempt costs no backup. Any other goes with its temp file.
    fn drop(&mut self) {
        if let (Some(tmp), Some(spare)) = (self.tmp.take(), self.recycled.take())
            && fs::rename(tmp.path(), &spare.path).is_ok()
        {
            let _ = tmp.keep();
        }
    }
}

/// `.NAME.tmp-`: how the name of a temp file beside `path` begins (see `is_temp_name`).
fn temp_prefix(path: &Path) -> String {
    format!(".{}.tmp-", file_name(path))
}

/// Ten letters and digits, as the temp files' names end.
fn random_suffix() -> String {
    std::iter::repeat_with(fastrand::alphanumeric).take(10).collect()
}

/// The temp file gets its final mode and group before it is renamed into place, so the published file
/// is never readable by more than it should be, not even for an instant.
pub(super) fn write_synced_temp_with(
    path: &Path,
    bytes: &[u8],
    access: FileAccess,
    reserved: &mut Option<Reservation>,
) -> io::Result<tempfile::NamedTempFile> {
    let (tmp, len) = match reserved.take() {
        Some(r) => r.into_parts(),
        None => (temp_beside(path)?, 0),
    };
    match fill_synced(tmp.as_file(), len, bytes, access) {
        Ok(()) => Ok(tmp),
        Err(e) => {
            // Kept for the next try: a folder that stopped taking new files still has this one. Its
            // length is unknown after a failed write, and at most the larger of the two.
            *reserved = Some(Reservation::holding(tmp, len.max(bytes.len() as u64)));
            Err(e)
        }
    }
}

/// Writes `bytes` over a file of `len` bytes from its start, then makes it the final mode and group and
/// syncs it. Blocks already allocated are rewritten, not freed and taken again.
pub(super) fn fill_synced(file: &File, len: u64, bytes: &[u8], access: FileAccess) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, 0)?;
    // A reservation larger than the content is cut to it.
    if len > bytes.len() as u64 {
        file.set_len(bytes.len() as u64)?;
    }
    let mut owner_or_mode = false;
    if let Some(gid) = access.gid {
        std::os::unix::fs::fchown(file, None, Some(gid))?;
        owner_or_mode = true;
    }
    if access.mode != 0o600 {
        file.set_permissions(fs::Permissions::from_mode(access.mode))?;
        owner_or_mode = true;
    }
    // fdatasync keeps the content and all it takes to read it back (the length, the blocks), and skips
    // the inode's times: a version as long as the file it overwrites (a recycled backup of the same
    // account usually is) costs one write instead of two. A group or mode just set must last too.
    if owner_or_mode {
        file.sync_all()
    } else {
        file.sync_data()
    }
}

/// Replaces `path` with `bytes` so that a reader sees the old file or the new one, never a missing or
/// partial one, and so that the new one survives a crash: temp file 0600, fsync, rename, fsync folder.
pub fn write_atomic(path: &Path, bytes: &[u8], access: FileAccess) -> io::Result<()> {
    let tmp = write_synced_temp_with(path, bytes, access, &mut None)?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(folder(path))
}

/// Atomic but not durable: for the advisory state file, which a crash may roll back without harm.
pub(super) fn replace_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
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
    // A reservation made of the oldest backup: once written, that backup's name is gone.
    let recycled = reserved.as_ref().and_then(Reservation::recycled_key);
    let written = write_synced_temp_with(path, bytes, access, reserved);
    if let (Some(key), Some(known)) = (recycled, backups.as_mut()) {
        known.forget(key);
    }
    let tmp = written?;
    // What the daemon's own inotify event will find (a rename keeps the inode, length and mtime). Closed
    // before the rename: a close after it would bring a second event, under the token file's name.
    let mut report = PublishReport {
        stamp: tmp.as_file().metadata().ok().map(|m| stamp_of(&m)),
        ..PublishReport::default()
    };
    let (file, tmp) = tmp.into_parts();
    drop(file);
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
        let reopened = OpenOptions::new().read(true).write(true).open(&e.path);
        if let Ok(file) = reopened {
            *reserved = Some(Reservation::holding(
                tempfile::NamedTempFile::from_parts(file, e.path),
                bytes.len() as u64,
            ));
        }
        return Err(e.error);
    }
    sync_dir(folder(path))?;
    report.pruned = usize::from(recycled.is_some());
    if keep_backups > 0
        && let Some(known) = backups.as_mut()
    {
        match known.prune(path, keep_backups as usize) {
            Ok(n) => report.pruned += n,
            Err(e) => report.backup_error = report.backup_error.or(Some(e)),
        }
    }
    Ok(report)
}
