//! The per-account state file (`NAME.json.state`) that `status` reads.

use std::io;
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
        let path = state_path(token_file);
        let read = open_regular(&path, false).and_then(|file| {
            // Shared with other readers, never with a save in place: a reader sees one whole version.
            // A save holds the lock only for one write, and never waits for it.
            let _ = file.lock_shared();
            read_open(&file, STATE_FILE_CAP)
        });
        match read {
            // A first save that could not write (a full disk) leaves the file it created empty.
            Ok((bytes, _)) if bytes.is_empty() => Ok(None),
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
        match write_in_place(&state, &bytes) {
            InPlace::Done(version) => Ok(version),
            InPlace::Failed(e) => Err(e),
            InPlace::Unavailable => replace_atomic(&state, &bytes).map(|()| Version::UNKNOWN),
        }
    }
}

/// How much shorter than the file a new state may be and still be written over it, padded with spaces
/// (JSON's trailing whitespace): past that, the file is replaced, so that it never stays much longer
/// than its content (a long error message that has since cleared).
const MAX_PADDING: u64 = 256;

enum InPlace {
    /// With the file's version after the write.
    Done(Version),
    Failed(io::Error),
    /// Not a file to write into (see [`write_in_place`]), or another process holds it: the caller
    /// replaces it with a temp file and a rename.
    Unavailable,
}

/// Writes the state over the state file's one block, under the file's own `flock`. A save is then a
/// write to one inode and touches no name in the folder, where a temp file renamed over the old version
/// (or a spare swapped with it) changed the folder at every save, and the next token file's folder
/// `fsync` wrote that change out. In a folder of 10,000 accounts a save costs half the CPU it did with
/// the spare (BENCHMARKS.md).
///
/// Readers that take the shared lock ([`StateFile::load_stamped`], so `status` and the daemon) see the
/// old state or the new one, never a mix. The file is written through only if it is the daemon user's
/// own private regular file with no other name: a symlink (never followed), a hard link to another file,
/// a file readable by others or of another user is replaced instead, as is one a reader or another
/// writer holds at that moment (the lock is tried, never waited for).
fn write_in_place(state: &Path, bytes: &[u8]) -> InPlace {
    use std::fs::{OpenOptions, TryLockError};
    use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

    let file = match OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // A FIFO without a reader fails the open rather than hanging it; one with a reader fails the
        // checks below.
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(state)
    {
        Ok(f) => f,
        // A symlink or a folder in the state file's place: the temp file's way reports what is wrong.
        Err(_) => return InPlace::Unavailable,
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return InPlace::Unavailable,
        Err(TryLockError::Error(e)) => return InPlace::Failed(e),
    }
    let held = match file.metadata() {
        Ok(m) => m,
        Err(e) => return InPlace::Failed(e),
    };
    if !held.is_file() || held.nlink() != 1 || held.uid() != euid() || held.mode() & 0o077 != 0 {
        return InPlace::Unavailable;
    }
    let (old_len, new_len) = (held.len(), bytes.len() as u64);
    let padded;
    let bytes = if new_len < old_len {
        if old_len - new_len > MAX_PADDING {
            return InPlace::Unavailable;
        }
        // Spaces before the final newline, up to the old length: one write, and no moment at which the
        // file holds the new state followed by the end of the old one.
        let (body, newline) = bytes.split_at(bytes.len().saturating_sub(1));
        let mut b = Vec::with_capacity(old_len as usize);
        b.extend_from_slice(body);
        b.resize(old_len as usize - newline.len(), b' ');
        b.extend_from_slice(newline);
        padded = b;
        &padded[..]
    } else {
        bytes
    };
    if let Err(e) = file.write_all_at(bytes, 0) {
        return InPlace::Failed(e);
    }
    // The version after the write, which set the modification and change times: from the open file.
    InPlace::Done(file.metadata().map_or(Version::UNKNOWN, |m| version_of(&m)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn state(failures: u32, message: &str) -> AccountState {
        let mut s = AccountState::default();
        s.failed(failures, "KOE000".into(), Some(message.to_string()), false);
        s
    }

    /// A folder of its own and the token file `me.json` in it (never written: a state file needs none).
    fn temp_token() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("me.json");
        (dir, token)
    }

    fn failures(token: &Path) -> u32 {
        AccountState::load(token).unwrap().unwrap().consecutive_failures()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn saves_write_the_one_file_in_place_and_touch_no_other_name() {
        let (dir, token) = temp_token();
        state(1, "m").save(&token).unwrap();
        let ino = std::fs::metadata(state_path(&token)).unwrap().ino();
        for n in 2..6 {
            let version = state(n, "m").save_stamped(&token).unwrap();
            assert_eq!(failures(&token), n);
            let meta = std::fs::metadata(state_path(&token)).unwrap();
            assert_eq!(meta.ino(), ino, "save {n} replaced the file");
            assert_eq!(meta.mode() & 0o777, 0o600);
            assert_eq!(version, version_of(&meta), "the version a save reports is the file's");
        }
        assert_eq!(names(dir.path()), ["me.json.state"]);
    }

    #[test]
    fn a_shorter_state_is_padded_and_a_much_shorter_one_replaces_the_file() {
        let (dir, token) = temp_token();
        let path = state_path(&token);
        state(1, &"x".repeat(100)).save(&token).unwrap();
        let (ino, len) = {
            let m = std::fs::metadata(&path).unwrap();
            (m.ino(), m.len())
        };
        state(2, "x").save(&token).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len, "padded to the old length");
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
        assert!(bytes.ends_with(b" \n"), "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(failures(&token), 2);
        assert_eq!(AccountState::load(&token).unwrap().unwrap(), state(2, "x"));

        state(3, &"y".repeat(1000)).save(&token).unwrap();
        state(4, "y").save(&token).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let exact = serde_json::to_vec_pretty(&state(4, "y")).unwrap();
        assert_eq!(
            bytes.len(),
            exact.len() + 1,
            "more than {MAX_PADDING} bytes of padding: replaced"
        );
        assert_eq!(failures(&token), 4);
        assert_eq!(names(dir.path()), ["me.json.state"], "no temp file left");
    }

    #[test]
    fn an_empty_state_file_holds_no_state_and_the_next_save_fills_it() {
        let (_dir, token) = temp_token();
        std::fs::write(state_path(&token), b"").unwrap();
        std::fs::set_permissions(state_path(&token), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(AccountState::load(&token).unwrap(), None);
        state(5, "m").save(&token).unwrap();
        assert_eq!(failures(&token), 5);
    }

    #[test]
    fn a_state_file_a_reader_holds_is_replaced_not_waited_for() {
        let (_dir, token) = temp_token();
        state(1, "m").save(&token).unwrap();
        let reader = std::fs::File::open(state_path(&token)).unwrap();
        reader.lock_shared().unwrap();
        state(7, "m").save(&token).unwrap();
        assert_eq!(failures(&token), 7);
        // The reader's version is whole: the save went to a new file.
        let (held, _) = read_open(&reader, STATE_FILE_CAP).unwrap();
        let held: AccountState = serde_json::from_slice(&held).unwrap();
        assert_eq!(held.consecutive_failures(), 1);
        drop(reader);
        state(8, "m").save(&token).unwrap();
        assert_eq!(failures(&token), 8);
    }

    #[test]
    fn a_state_file_with_another_name_or_readable_by_others_is_replaced_never_written_through() {
        let (dir, token) = temp_token();
        let path = state_path(&token);
        state(1, "m").save(&token).unwrap();
        let elsewhere = dir.path().join("kept-elsewhere");
        std::fs::hard_link(&path, &elsewhere).unwrap();
        state(2, "m").save(&token).unwrap();
        assert_eq!(failures(&token), 2);
        let kept: AccountState = serde_json::from_slice(&std::fs::read(&elsewhere).unwrap()).unwrap();
        assert_eq!(kept.consecutive_failures(), 1, "the other name keeps its content");
        assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 1);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        state(3, "m").save(&token).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "replaced by a private file");
        assert_ne!(meta.ino(), ino);
        assert_eq!(failures(&token), 3);
    }

    #[test]
    fn readers_see_whole_versions_while_saves_pad_and_grow_the_file() {
        let (_dir, token) = temp_token();
        state(0, "").save(&token).unwrap();
        let writer = {
            let token = token.clone();
            std::thread::spawn(move || {
                for n in 1..=2000u32 {
                    // Alternately longer and shorter: grown, then padded.
                    let message = "z".repeat(if n % 2 == 0 { 150 } else { 10 });
                    state(n, &message).save(&token).unwrap();
                }
            })
        };
        let mut reads = 0;
        while !writer.is_finished() {
            let s = AccountState::load(&token).unwrap().unwrap();
            let n = s.consecutive_failures();
            let expected = if n == 0 {
                String::new()
            } else {
                "z".repeat(if n % 2 == 0 { 150 } else { 10 })
            };
            assert_eq!(s, state(n, &expected), "read {reads} saw a mix");
            reads += 1;
        }
        writer.join().unwrap();
        assert_eq!(failures(&token), 2000);
        assert!(reads > 0);
    }
}
