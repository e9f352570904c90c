//! The per-account state file (`NAME.json.state`) that `status` reads.

use std::io::{self};
use std::path::Path;

use super::*;

/// A state file is a few hundred bytes; more is not one.
pub(super) const STATE_FILE_CAP: usize = 64 * 1024;

/// Reading and writing the [`AccountState`] beside a token file.
pub trait StateFile: Sized {
    fn load(token_file: &Path) -> io::Result<Option<Self>> {
        Ok(Self::load_stamped(token_file)?.map(|(s, _)| s))
    }

    /// With the version read.
    fn load_stamped(token_file: &Path) -> io::Result<Option<(Self, Version)>>;

    fn save(&self, token_file: &Path) -> io::Result<()> {
        self.save_stamped(token_file).map(drop)
    }

    /// With the version written, when it is known.
    fn save_stamped(&self, token_file: &Path) -> io::Result<Version>;
}

impl StateFile for AccountState {
    fn load_stamped(token_file: &Path) -> io::Result<Option<(AccountState, Version)>> {
        match read_regular(&state_path(token_file), STATE_FILE_CAP, false) {
            Ok((bytes, meta)) => serde_json::from_slice(&bytes)
                .map(|s| Some((s, version_of(&meta))))
                .map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save_stamped(&self, token_file: &Path) -> io::Result<Version> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        bytes.push(b'\n');
        let state = state_path(token_file);
        match swap_in(&state, &spare_path(token_file), &bytes) {
            Swap::Done(stamp) => Ok(stamp),
            Swap::Failed(e) => Err(e),
            Swap::Unavailable => replace_atomic(&state, &bytes).map(|()| Version::UNKNOWN),
        }
    }
}

/// `.NAME.json.state.spare`: the state file's previous version, overwritten with the next one and then
/// swapped with it by name. No file is created or deleted at each save, where a temp file and a rename
/// over the old version would create one inode and free another, which is most of a save's cost in a
/// folder of thousands of accounts.
pub fn spare_path(token_file: &Path) -> std::path::PathBuf {
    folder(token_file).join(format!(".{}.state.spare", file_name(token_file)))
}

enum Swap {
    /// With the new state file's version (unknown when its `stat` failed).
    Done(Version),
    Failed(io::Error),
    /// Another writer holds the spare, or the file system cannot exchange names: write a temp file.
    Unavailable,
}

/// Writes `bytes` into the spare and exchanges it with the state file in one `renameat2`: a reader sees
/// the old state or the new one, never a mix. The spare's `flock` keeps two writers (the daemon and a
/// command) from writing into one file; a writer that waited for it checks that it still holds the
/// spare, not the file another writer just swapped in.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn swap_in(state: &Path, spare: &Path, bytes: &[u8]) -> Swap {
    use std::fs::{OpenOptions, TryLockError};
    use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

    use nix::errno::Errno;
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

    let file = match OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(spare)
    {
        Ok(f) => f,
        // A symlink or anything else in the spare's place: the temp file's way reports what is wrong.
        Err(_) => return Swap::Unavailable,
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Swap::Unavailable,
        Err(TryLockError::Error(e)) => return Swap::Failed(e),
    }
    let held_len = match (file.metadata(), std::fs::symlink_metadata(spare)) {
        (Ok(held), Ok(named)) if held.ino() == named.ino() && held.dev() == named.dev() => held.len(),
        _ => return Swap::Unavailable,
    };
    // Content first, then the length (when it shrank): blocks already allocated are rewritten, not
    // freed and taken again.
    let new_len = bytes.len() as u64;
    if let Err(e) = file.write_all_at(bytes, 0).and_then(|()| {
        if held_len > new_len {
            file.set_len(new_len)
        } else {
            Ok(())
        }
    }) {
        return Swap::Failed(e);
    }
    // The version after the rename, which sets the change time: from the open file, no path lookup.
    let stamp = || file.metadata().map_or(Version::UNKNOWN, |m| version_of(&m));
    match renameat2(AT_FDCWD, spare, AT_FDCWD, state, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => Swap::Done(stamp()),
        // No state file yet: the spare becomes it.
        Err(Errno::ENOENT) => match std::fs::rename(spare, state) {
            Ok(()) => Swap::Done(stamp()),
            Err(e) => Swap::Failed(e),
        },
        // A file system without RENAME_EXCHANGE.
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => Swap::Unavailable,
        Err(e) => Swap::Failed(e.into()),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn swap_in(_state: &Path, _spare: &Path, _bytes: &[u8]) -> Swap {
    Swap::Unavailable
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn state(failures: u32) -> AccountState {
        let mut s = AccountState::default();
        s.failed(failures, "KOE000".into(), None, false);
        s
    }

    #[test]
    fn saves_swap_two_files_and_create_none_after_the_second() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("me.json");
        state(1).save(&token).unwrap();
        state(2).save(&token).unwrap();
        let inodes = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let pair = [inodes(&state_path(&token)), inodes(&spare_path(&token))];
        for n in 3..6 {
            state(n).save(&token).unwrap();
            assert_eq!(AccountState::load(&token).unwrap().unwrap().consecutive_failures(), n);
            let mut now = [inodes(&state_path(&token)), inodes(&spare_path(&token))];
            now.sort_unstable();
            let mut before = pair;
            before.sort_unstable();
            assert_eq!(now, before, "a save created a file");
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_spare_held_by_another_writer_is_left_to_it_and_the_save_still_lands() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("me.json");
        state(1).save(&token).unwrap();
        state(2).save(&token).unwrap();
        let held = std::fs::OpenOptions::new()
            .write(true)
            .open(spare_path(&token))
            .unwrap();
        held.lock().unwrap();
        state(7).save(&token).unwrap();
        assert_eq!(AccountState::load(&token).unwrap().unwrap().consecutive_failures(), 7);
        drop(held);
        state(8).save(&token).unwrap();
        assert_eq!(AccountState::load(&token).unwrap().unwrap().consecutive_failures(), 8);
    }
}
