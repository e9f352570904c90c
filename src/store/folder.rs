//! One listing of a token file's folder at start: the backups kept, the temp files a crash left, and
//! which token files have a state file. At the daemon's start it may come from the folder's start index
//! instead, which keeps the listing a stop made while the folder has not changed since.

use std::fs::{self};
use std::io::{self};
use std::path::{Path, PathBuf};

use super::*;

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
            .is_some_and(|m| split_backup_suffix(m).is_some());
    middle_ok && !random.is_empty() && random.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The token file name a temp file of ours belongs to, if it is one (see [`is_temp_name`]).
pub fn temp_file_owner(candidate: &str) -> Option<String> {
    let (head, _) = candidate.strip_prefix('.')?.rsplit_once(".tmp-")?;
    let owner = head
        .strip_suffix(".state")
        .or_else(|| {
            let (owner, stamp) = head.rsplit_once('.')?;
            split_backup_suffix(stamp).map(|_| owner)
        })
        .unwrap_or(head);
    is_temp_name(owner, candidate).then(|| owner.to_string())
}

/// The buffer a listing reads names into: a few hundred `getdents64` calls for 700,000 names.
const LISTING_BUFFER: usize = 256 << 10;

/// What one listing of a folder says about each token file in it: temp files a crash left behind, the
/// backups kept, and whether it has a state file. One listing per folder, however many token files it
/// holds.
#[derive(Debug, Default)]
pub struct FolderScan {
    pub temps: foldhash::HashMap<String, Vec<PathBuf>>,
    /// By the token file's name, as a [`ListingKey`]: at five backups per token file, a string made
    /// and compared per backup was most of the listing's own time.
    pub backups: foldhash::HashMap<u128, Backups>,
    pub keys: ListingKey,
    /// The token files with a state file beside them, by a digest of the name: no string is made or
    /// compared per state file (a collision only means a look for a state file that is not there).
    pub states: foldhash::HashSet<u64>,
    /// The listing went through: an empty scan of a folder that could not be listed says nothing.
    pub listed: bool,
    /// The folder's start index, when the daemon uses one.
    pub index: SharedIndex,
    /// The folder, while its listing is taken from its start index rather than from the folder.
    recorded: Option<PathBuf>,
}

/// A key for a token file's name in one listing's maps: 128 bits from two hashers seeded at random for
/// this process, so that two names share one with a chance of about 2^-128 (backups found under a name
/// are pruned as that name's), and the map holds no string to follow and compare per backup.
#[derive(Debug, Clone, Default)]
pub struct ListingKey(foldhash::fast::RandomState, foldhash::fast::RandomState);

impl ListingKey {
    pub fn of(&self, name: &str) -> u128 {
        use std::hash::BuildHasher;
        (u128::from(self.0.hash_one(name)) << 64) | u128::from(self.1.hash_one(name))
    }
}

/// What the listing found for one token file.
#[derive(Debug, Default)]
pub struct Found {
    /// Temp files a crash left, to remove under the lock.
    pub stale_temps: Vec<PathBuf>,
    pub backups: Backups,
    /// Whether a state file may be there: `false` only when the listing saw none. At start, a look for
    /// a state file that is not there costs as much as the token file's read (the kernel's lookup of a
    /// missing name), and most token files have none until their first refresh.
    pub maybe_state: bool,
    /// Its entry in the folder's start index, to be checked against the files.
    pub known: Option<IndexEntry>,
}

impl FolderScan {
    /// The folder's listing at the daemon's start: the one its start index keeps while the folder is
    /// still as the index recorded it (no name added, removed or renamed since), else the folder's own.
    pub fn at_start(dir: &Path, index: StartIndex) -> FolderScan {
        if index.lists(dir) {
            return FolderScan {
                listed: true,
                index: index.shared(),
                recorded: Some(dir.to_path_buf()),
                ..FolderScan::default()
            };
        }
        let mut scan = FolderScan::of(dir).unwrap_or_default();
        scan.index = index.shared();
        scan
    }

    /// Whether every token file taken so far had its listing from the start index.
    pub fn from_index(&self) -> bool {
        self.recorded.is_some()
    }

    pub fn of(dir: &Path) -> io::Result<FolderScan> {
        use rustix::fs::{Mode, OFlags, RawDir};
        let mut scan = FolderScan::default();
        // The names as the kernel lists them, borrowed from one buffer that `getdents64` fills:
        // `fs::read_dir` makes two strings per entry (at 100,000 accounts with state files, 400,000
        // allocations at every start), and glibc's `readdir_r` copies each entry out (with five backups
        // per account, 700,000 copies and a sixteenth of a start).
        let folder = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let mut buf = Vec::with_capacity(LISTING_BUFFER);
        let mut listing = RawDir::new(&folder, buf.spare_capacity_mut());
        while let Some(entry) = listing.next() {
            let entry = entry?;
            // A name that is not UTF-8 is no file of an account's: the config's names are UTF-8.
            let Ok(name) = std::str::from_utf8(entry.file_name().to_bytes()) else {
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            if let Some(owner) = temp_file_owner(name) {
                scan.temps.entry(owner).or_default().push(dir.join(name));
            } else if let Some(owner) = name.strip_suffix(STATE_SUFFIX) {
                scan.states.insert(name_key(owner.as_bytes()));
            } else if let Some((owner, _)) = name.rsplit_once('.')
                // NAME.json.YYYYmmdd_HHMMSS[-N]: the stamp follows the last dot, suffix included.
                && let Some(key) = parse_backup(owner, name)
            {
                // Room for the shipped default's five at once: no reallocation as they are found, which
                // at 100,000 token files left the heap full of freed small blocks that stay resident.
                let backups = scan.backups.entry(scan.keys.of(owner)).or_insert_with(|| Backups {
                    known: Vec::with_capacity(5),
                });
                backups.known.push(key);
            }
        }
        for b in scan.backups.values_mut() {
            b.known.sort_unstable();
            b.known.shrink_to_fit();
        }
        scan.listed = true;
        Ok(scan)
    }

    /// Takes out what belongs to the token file `token_name`.
    pub fn take(&mut self, token_name: &str) -> Found {
        let known = self.index.entry(token_name);
        if self.recorded.is_some() {
            if let Some(listed) = known.as_ref().and_then(|entry| entry.listed(token_name)) {
                return Found {
                    stale_temps: Vec::new(),
                    backups: listed.backups,
                    maybe_state: listed.state_file,
                    known,
                };
            }
            // A token file the recorded listing does not cover (an account added since the stop).
            self.list_after_all();
        }
        // Most folders hold no temp file and many no backup: no name is hashed for an empty map.
        fn take<T: Default>(map: &mut foldhash::HashMap<String, T>, name: &str) -> T {
            if map.is_empty() {
                T::default()
            } else {
                map.remove(name).unwrap_or_default()
            }
        }
        Found {
            stale_temps: take(&mut self.temps, token_name),
            backups: if self.backups.is_empty() {
                Backups::default()
            } else {
                self.backups.remove(&self.keys.of(token_name)).unwrap_or_default()
            },
            maybe_state: !self.listed
                || (!self.states.is_empty() && self.states.remove(&name_key(token_name.as_bytes()))),
            known,
        }
    }

    /// The folder's own listing in place of the recorded one, with the same start index.
    fn list_after_all(&mut self) {
        if let Some(dir) = self.recorded.take() {
            let index = std::mem::take(&mut self.index);
            *self = FolderScan::of(&dir).unwrap_or_default();
            self.index = index;
        }
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
