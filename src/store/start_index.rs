//! The start index: one file per token folder, `.kakao-tokend.index`, keeping what each account's start
//! needs from its token file and state file (digests and times, never a token), with the version of
//! each file it came from. At start, a token file whose `stat` still matches is not opened, read or
//! parsed: at 100,000 accounts the reads were most of the start-up's CPU, and a `stat` is a third of one.
//!
//! It is a cache and nothing else: any doubt means the files are read, as without it.
//! - A version is its device, inode, size, modification and change times, hashed. A write in place
//!   changes the change time, which no one can set back; a rename brings another inode.
//! - Written by the daemon as it stops, and while it runs once files have changed (at most every
//!   `start_index_interval`, by [`IndexBuilder`]), for the accounts whose machines still hold what they
//!   last read or wrote, with the versions they read or wrote. A crash leaves the last one, whose
//!   entries changed since then fail their `stat`.
//! - A file changed less than [`SETTLED`] before the index is written is left out: a write in place in
//!   the same tick of the file system's clock as the version seen would keep its times, and the index
//!   trusts only what inotify had time to report (a write brings an event, and the daemon reads the
//!   file again).
//! - The file ends with a digest of its bytes, and starts with a digest of a fixed text by this build's
//!   digest function: a torn file, or one from a build that digests otherwise, is not used.
//!
//! A stop's index also keeps the folder's listing, as git's untracked cache does: what a listing at the
//! stop found for each token file (its backups, whether it has a state file), with the folder's version.
//! At the next start a folder whose `stat` still matches is not listed: no name in it was added, removed
//! or renamed since. With five backups per account, listing a folder of 100,000 accounts (700,000 names)
//! was a third of a restart's CPU.
//! - The listing is recorded only when it is whole and vouched for: no temp file in the folder (a write
//!   in progress, or a crash's leftovers for the next start to remove), the folder unchanged while it
//!   was listed, and its last change a clock tick in the past, so that no later one can share its times.
//! - The index is then written in place, not renamed: a rename would change the folder it describes.
//! - A token file the listing does not cover (an account added since) has the folder listed after all.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kakao_tokend_core::machine::Held;
use kakao_tokend_core::record::{Reader, Writer};

use super::*;
use crate::config::Account;

/// The index's name in each token folder.
pub const INDEX_NAME: &str = ".kakao-tokend.index";

const MAGIC: &[u8; 8] = b"KTDINDX3";

/// A file whose change time is this close to the index's writing is left out (see the module's note).
pub const SETTLED: Duration = Duration::from_secs(2);

/// How long past the folder's last change its listing waits to be recorded, on a file system whose
/// times have fractions of a second: more than one tick of the kernel's coarse clock (at most 10 ms),
/// from which a change's time is taken, so that a change after the listing has a later time.
const FOLDER_TICK: Duration = Duration::from_millis(20);

/// An index larger than this is not one this daemon wrote (100,000 accounts take about 10 MB).
const INDEX_CAP: usize = 256 << 20;

/// A state file's stamp when there was none.
pub const NO_STATE_FILE: u64 = 1;

/// The version of a state file that is not there.
pub const NO_STATE_FILE_VERSION: Version = Version {
    stamp: NO_STATE_FILE,
    changed: 0,
};

/// A file's version as its metadata tells it; the stamp is never 0 (unknown) or [`NO_STATE_FILE`].
pub fn version_of(meta: &fs::Metadata) -> Version {
    let fields = [
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        meta.ctime() as u64,
        meta.ctime_nsec() as u64,
    ];
    let mut bytes = [0u8; 56];
    for (chunk, field) in bytes.chunks_exact_mut(8).zip(fields) {
        chunk.copy_from_slice(&field.to_le_bytes());
    }
    Version {
        stamp: digest(&bytes).max(NO_STATE_FILE + 1),
        changed: u32::try_from(meta.ctime()).unwrap_or(0),
    }
}

/// Whether a version changed at `changed` (whole seconds) is settled by `now`: any write since has
/// another change time.
pub fn settled(changed: u32, now: SystemTime) -> bool {
    let changed = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(changed));
    // Whole seconds: one more for the fraction dropped.
    changed + SETTLED + Duration::from_secs(1) <= now
}

/// What the index keeps for one token file.
#[derive(Debug, Clone)]
pub struct Known {
    /// The token file's version ([`Version::stamp`]).
    pub token: u64,
    /// What the machine held of it.
    pub held: Held,
    /// The state file's version and content; `None` when there was no state file.
    pub state: Option<(u64, AccountState)>,
}

impl Known {
    /// The versions of the token file and the state file, if they are still the ones this was taken
    /// from. `listed`: whether the folder's listing saw a state file for it (`None` when the folder was
    /// not listed).
    pub fn still_holds(&self, token_file: &Path, listed: Option<bool>) -> Option<(Version, Version)> {
        let token = fs::metadata(token_file).ok().map(|m| version_of(&m))?;
        if token.stamp != self.token {
            return None;
        }
        // The token file's path and the suffix: `state_path`, without taking the path apart.
        let state_file = || {
            let mut p = token_file.as_os_str().to_owned();
            p.push(STATE_SUFFIX);
            PathBuf::from(p)
        };
        let state = match (&self.state, listed) {
            (None, Some(false)) => NO_STATE_FILE_VERSION,
            (None, None) => match fs::symlink_metadata(state_file()) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => NO_STATE_FILE_VERSION,
                _ => return None,
            },
            (None, Some(true)) | (Some(_), Some(false)) => return None,
            (Some((stamp, _)), _) => {
                let state = fs::symlink_metadata(state_file()).ok().map(|m| version_of(&m))?;
                if state.stamp != *stamp {
                    return None;
                }
                state
            }
        };
        Some((token, state))
    }

    /// Appends what is known; false when it has no record.
    fn write_body(&self, w: &mut Writer) -> bool {
        w.u64(self.token);
        self.held.to_record(w)
            && match &self.state {
                None => {
                    w.u8(0);
                    true
                }
                Some((stamp, state)) => {
                    w.u8(1);
                    w.u64(*stamp);
                    state.to_record(w)
                }
            }
    }

    fn read_body(r: &mut Reader<'_>) -> Option<Known> {
        let token = r.u64()?;
        let held = Held::from_record(r)?;
        let state = match r.u8()? {
            0 => None,
            1 => Some((r.u64()?, AccountState::from_record(r)?)),
            _ => return None,
        };
        Some(Known { token, held, state })
    }
}

/// What the folder's listing said of one token file, as the index keeps it.
#[derive(Debug, Default)]
pub struct Listed {
    /// Whether a state file was there.
    pub state_file: bool,
    pub backups: Backups,
}

impl Listed {
    fn write(&self, w: &mut Writer) -> bool {
        let Ok(count) = u16::try_from(self.backups.known.len()) else {
            return false;
        };
        w.u8(u8::from(self.state_file));
        w.u16(count);
        for &key in &self.backups.known {
            w.u64(key);
        }
        true
    }

    fn read(r: &mut Reader<'_>) -> Option<Listed> {
        let state_file = match r.u8()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let count = usize::from(r.u16()?);
        let mut known = Vec::with_capacity(count);
        for _ in 0..count {
            known.push(r.u64()?);
        }
        // Oldest first, as a listing leaves them.
        known.is_sorted().then_some(Listed {
            state_file,
            backups: Backups { known },
        })
    }

    fn skip(r: &mut Reader<'_>) -> Option<()> {
        r.u8()?;
        let count = usize::from(r.u16()?);
        (0..count).try_for_each(|_| r.u64().map(drop))
    }
}

/// Appends one token file's entry: the name, then the rest with its length first, so that a load finds
/// each entry's place without reading the rest. The rest: what the folder's listing said of it, first
/// (read as the folder's accounts are handed out), then what its start needs (read as it starts).
/// False, and nothing written, when it does not fit.
fn write_entry(name: &str, listed: Option<&Listed>, known: Option<&Known>, w: &mut Writer) -> bool {
    let start = w.0.len();
    if !w.bytes(name.as_bytes()) {
        return false;
    }
    let len_at = w.0.len();
    w.u16(0);
    let ok = match listed {
        None => {
            w.u8(0);
            true
        }
        Some(listed) => {
            w.u8(1);
            listed.write(w)
        }
    } && match known {
        None => {
            w.u8(0);
            true
        }
        Some(known) => {
            w.u8(1);
            known.write_body(w)
        }
    };
    match u16::try_from(w.0.len() - len_at - 2) {
        Ok(len) if ok => {
            w.0[len_at..len_at + 2].copy_from_slice(&len.to_le_bytes());
            true
        }
        _ => {
            w.0.truncate(start);
            false
        }
    }
}

/// The next entry's name, and the reader past the entry.
fn skip_entry<'a>(r: &mut Reader<'a>) -> Option<&'a [u8]> {
    let name = r.bytes()?;
    r.bytes()?;
    Some(name)
}

/// Why a folder's index was not used.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot be read: {0}")]
    Io(io::Error),
    #[error("is damaged or was written by another version: the token files are read instead")]
    Unusable,
}

/// A digest of a fixed text: another value means another digest function, whose digests do not compare.
fn probe() -> u64 {
    digest(b"kakao-tokend start index")
}

/// One folder's index: its bytes as read, and where each token file's entry starts. The entries are
/// read out when each account starts, so that 100,000 of them are not 100,000 allocations freed among
/// the accounts' own, where the memory would stay with the process.
#[derive(Debug, Default)]
pub struct StartIndex {
    bytes: Vec<u8>,
    /// By the token file's name ([`name_key`]); the name at the entry is checked when it is read.
    at: foldhash::HashMap<u64, u32>,
    /// The version of the folder whose listing the entries keep; 0 when they keep none.
    folder: u64,
}

/// An account's entry in its folder's index, until its start reads it.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    index: Arc<StartIndex>,
    at: u32,
}

impl IndexEntry {
    /// The rest of the entry, if it is the one of the token file `name`.
    fn body(&self, name: &[u8]) -> Option<Reader<'_>> {
        let mut r = Reader(self.index.bytes.get(self.at as usize..)?);
        (r.bytes()? == name).then_some(())?;
        Some(Reader(r.bytes()?))
    }

    /// What the index kept for `token_file`.
    pub fn get(&self, token_file: &Path) -> Option<Known> {
        use std::os::unix::ffi::OsStrExt;
        let mut r = self.body(token_file.file_name()?.as_bytes())?;
        match r.u8()? {
            0 => {}
            1 => Listed::skip(&mut r)?,
            _ => return None,
        }
        (r.u8()? == 1).then_some(())?;
        let known = Known::read_body(&mut r)?;
        r.is_empty().then_some(known)
    }

    /// What the folder's recorded listing said of the token file `name`, if the index keeps it.
    pub fn listed(&self, name: &str) -> Option<Listed> {
        let mut r = self.body(name.as_bytes())?;
        (r.u8()? == 1).then_some(())?;
        Listed::read(&mut r)
    }
}

impl StartIndex {
    /// The folder's index; empty when there is none.
    pub fn load(dir: &Path) -> Result<StartIndex, IndexError> {
        let path = dir.join(INDEX_NAME);
        let bytes = match read_regular(&path, INDEX_CAP, false) {
            // Empty: a stop that could not finish writing it emptied it (see `write_in_place`).
            Ok((bytes, _)) if bytes.is_empty() => return Ok(StartIndex::default()),
            Ok((bytes, _)) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StartIndex::default()),
            Err(e) => return Err(IndexError::Io(e)),
        };
        Self::parse(bytes).ok_or(IndexError::Unusable)
    }

    /// Whether the index holds the listing of `dir` and the folder is still the version it was taken
    /// from: no name in it added, removed or renamed since.
    pub fn lists(&self, dir: &Path) -> bool {
        self.folder != 0 && fs::metadata(dir).is_ok_and(|m| version_of(&m).stamp == self.folder)
    }

    fn parse(mut bytes: Vec<u8>) -> Option<StartIndex> {
        let (body, sum) = bytes.split_last_chunk::<8>()?;
        if digest(body) != u64::from_le_bytes(*sum) {
            return None;
        }
        let body_len = body.len();
        let mut r = Reader(body.strip_prefix(MAGIC)?);
        if r.u64()? != probe() {
            return None;
        }
        let folder = r.u64()?;
        let count = r.u32()? as usize;
        let mut at = foldhash::HashMap::default();
        at.reserve(count.min(body_len / 32));
        for _ in 0..count {
            let offset = u32::try_from(body_len - r.0.len()).ok()?;
            at.insert(name_key(skip_entry(&mut r)?), offset);
        }
        if !r.is_empty() {
            return None;
        }
        bytes.truncate(body_len);
        Some(StartIndex { bytes, at, folder })
    }

    /// Shared by the accounts of the folder until each has started.
    pub fn shared(self) -> SharedIndex {
        SharedIndex((!self.at.is_empty()).then(|| Arc::new(self)))
    }
}

/// A key for a file's name in this process's maps (the index's offsets, the listing's state files):
/// foldhash, not the files' digest (SipHash), as the key is never kept and a collision costs only a
/// look at a file.
pub(super) fn name_key(name: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::default().hash_one(name)
}

/// Bytes an index entry usually takes: a name, a token file's versions and times, a state, and five
/// backup keys.
const ENTRY_ESTIMATE: usize = 160;

/// A folder's index, shared by its accounts' entries; none when the folder has no index.
#[derive(Debug, Default)]
pub struct SharedIndex(Option<Arc<StartIndex>>);

impl SharedIndex {
    /// The entry for the token file `name`, if the index has one.
    pub fn entry(&self, name: &str) -> Option<IndexEntry> {
        let index = self.0.as_ref()?;
        let at = *index.at.get(&name_key(name.as_bytes()))?;
        Some(IndexEntry {
            index: index.clone(),
            at,
        })
    }
}

/// One index's bytes as its entries are added: the folder's version when the entries keep its listing
/// (else 0), then the entries, each a token file's name with what its listing found and what its start
/// needs. An entry too large for the format (thousands of backups) is written without its listing, which
/// has the folder listed at the next start.
struct Encoder {
    /// The folder's version when the entries keep its listing, else 0.
    folder: u64,
    w: Writer,
    count: u32,
    /// Entries that keep what an account's start needs.
    known: usize,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

/// Where the entry count sits: after the magic, the probe and the folder's version.
const COUNT_AT: usize = 24;

impl Encoder {
    /// Sized for `entries` at once: grown by doubling, 100,000 entries left copies and holes of up to
    /// twice the index's size in the heap.
    fn new(folder: u64, entries: usize) -> Encoder {
        let mut w = Writer(Vec::with_capacity(COUNT_AT + 12 + entries * ENTRY_ESTIMATE));
        w.0.extend_from_slice(MAGIC);
        w.u64(probe());
        w.u64(folder);
        w.u32(0);
        Encoder {
            folder,
            w,
            count: 0,
            known: 0,
        }
    }

    fn add(&mut self, name: &str, listed: Option<&Listed>, known: Option<&Known>) {
        let w = &mut self.w;
        if write_entry(name, listed, known, w) || (known.is_some() && write_entry(name, None, known, w)) {
            self.count += 1;
            self.known += usize::from(known.is_some());
        }
    }

    /// The bytes, and how many entries keep what an account's start needs.
    fn finish(mut self) -> (Vec<u8>, usize) {
        self.w.0[COUNT_AT..COUNT_AT + 4].copy_from_slice(&self.count.to_le_bytes());
        let sum = digest(&self.w.0);
        self.w.u64(sum);
        (self.w.0, self.known)
    }
}

/// What writing the indexes did.
#[derive(Debug, Default)]
pub struct Written {
    /// Accounts whose next start may skip reading their files.
    pub accounts: usize,
    pub folders: usize,
    /// Folders whose listing the index keeps.
    pub listings: usize,
    /// Folders whose index could not be written, and why.
    pub failed: Vec<(PathBuf, io::Error)>,
}

/// Writes each folder's index from what the daemon knew of its accounts as it stopped, with the
/// folder's listing when it can be vouched for. Every folder that holds one of `accounts` gets an index
/// (perhaps empty), so none is left describing older versions. No token file is looked at: an entry
/// whose file changed since is found out by its `stat` at the next start.
pub fn write_indexes(mut accounts: Vec<(Arc<Account>, Option<Known>)>) -> Written {
    // Grouped by folder in place: at 100,000 accounts a grouped copy of the entries was tens of MiB on
    // top of the daemon's own.
    accounts.sort_unstable_by(|(a, _), (b, _)| folder(&a.token_file).cmp(folder(&b.token_file)));
    let groups: Vec<_> = accounts
        .chunk_by(|(a, _), (b, _)| folder(&a.token_file) == folder(&b.token_file))
        .map(|group| (folder(&group[0].0.token_file), group))
        .collect();
    // Every folder's index file made first: making one changes its folder, whose listing then waits a
    // tick past that change. Made one folder at a time, 100,000 folders of one account each would wait
    // 100,000 ticks at their first stop; made together, their ticks pass together.
    for (dir, _) in &groups {
        let _ = open_in_place(dir);
    }
    let mut written = Written::default();
    for (dir, group) in groups {
        let in_place = open_in_place(dir);
        // Only an index written in place can keep the listing: a rename changes the folder.
        let listing = in_place.as_ref().ok().and_then(|_| record_listing(dir));
        let (folder, mut scan) = listing.map_or((0, None), |(folder, scan)| (folder, Some(scan)));
        let mut index = Encoder::new(folder, group.len());
        for (cfg, known) in group {
            let name = file_name(&cfg.token_file);
            let listed = scan.as_mut().map(|scan| {
                let found = scan.take(&name);
                Listed {
                    state_file: found.maybe_state,
                    backups: found.backups,
                }
            });
            index.add(&name, listed.as_ref(), known.as_ref());
        }
        written.record(dir, in_place, index);
    }
    written
}

impl Written {
    /// Writes one folder's index: in place when `in_place` holds the file, else by a rename.
    fn record(&mut self, dir: &Path, in_place: io::Result<fs::File>, index: Encoder) {
        let folder = index.folder;
        let (bytes, count) = index.finish();
        let result = match in_place {
            Ok(file) => write_in_place(&file, &bytes),
            Err(_) => replace_index(dir, &bytes),
        };
        match result {
            Ok(()) => {
                self.accounts += count;
                self.folders += 1;
                self.listings += usize::from(folder != 0);
            }
            Err(e) => self.failed.push((dir.to_path_buf(), e)),
        }
    }
}

/// The start indexes written while the daemon runs: each account's entry encoded as it is added, so
/// that no copy of what 100,000 accounts hold is gathered first (that copy, and the folder's listing,
/// were 65 MB at the peak of a write). They keep no listing: in a folder whose token files keep
/// changing, one would rarely still hold at the next start, and listing it is most of a write's CPU.
#[derive(Debug, Default)]
pub struct IndexBuilder {
    folders: std::collections::BTreeMap<PathBuf, Encoder>,
}

impl IndexBuilder {
    /// For the token files `files`, whose entries are then added one by one: each folder's index is
    /// sized for its files at once.
    pub fn for_files<'a>(files: impl Iterator<Item = &'a Path>) -> IndexBuilder {
        let mut counts: std::collections::BTreeMap<&Path, usize> = Default::default();
        for file in files {
            *counts.entry(folder(file)).or_default() += 1;
        }
        IndexBuilder {
            folders: counts
                .into_iter()
                .map(|(dir, n)| (dir.to_path_buf(), Encoder::new(0, n)))
                .collect(),
        }
    }

    /// The entry of `token_file`, one of those the builder was made for.
    pub fn add(&mut self, token_file: &Path, known: Option<&Known>) {
        if let Some(index) = self.folders.get_mut(folder(token_file)) {
            index.add(&file_name(token_file), None, known);
        }
    }

    /// Writes every folder's index, in place where it can be.
    pub fn write(self) -> Written {
        let mut written = Written::default();
        for (dir, index) in self.folders {
            let in_place = open_in_place(&dir);
            written.record(&dir, in_place, index);
        }
        written
    }
}

/// The folder's listing as it stands, with the folder's version that vouches for it at the next start.
/// None when a temp file is there (a write in progress, or a crash's leftovers for the next start to
/// remove), or when the folder changed while it was listed or could not be seen to have settled.
fn record_listing(dir: &Path) -> Option<(u64, FolderScan)> {
    let before = fs::metadata(dir).ok()?;
    let scan = FolderScan::of(dir).ok()?;
    if !scan.temps.is_empty() {
        return None;
    }
    let after = past_its_tick(dir, &before)?;
    let version = version_of(&before).stamp;
    (version_of(&after).stamp == version).then_some((version, scan))
}

/// The folder's metadata again, once its last change is far enough in the past that a later change
/// cannot have the same times. Where the file system keeps fractions of a second, that is a tick of the
/// clock (a wait of at most [`FOLDER_TICK`]); where it keeps whole seconds, it is [`settled`], and a
/// folder changed more recently is not vouched for.
fn past_its_tick(dir: &Path, meta: &fs::Metadata) -> Option<fs::Metadata> {
    let at = |secs: i64, nanos: i64| {
        SystemTime::UNIX_EPOCH + Duration::new(u64::try_from(secs).unwrap_or(0), u32::try_from(nanos).unwrap_or(0))
    };
    let last = at(meta.mtime(), meta.mtime_nsec()).max(at(meta.ctime(), meta.ctime_nsec()));
    if meta.mtime_nsec() != 0 && meta.ctime_nsec() != 0 {
        let until = last + FOLDER_TICK;
        while let Ok(wait) = until.duration_since(SystemTime::now()) {
            // More than a tick ahead: a change dated in the future, or a clock set back.
            if wait > FOLDER_TICK {
                return None;
            }
            std::thread::sleep(wait);
        }
    } else if !settled(
        u32::try_from(meta.ctime().max(meta.mtime())).unwrap_or(u32::MAX),
        SystemTime::now(),
    ) {
        return None;
    }
    fs::metadata(dir).ok()
}

/// The index file, opened to be written in place: only a private regular file of this user's, with no
/// other name, is (the folder is the user's own, so anything else was put there by hand).
fn open_in_place(dir: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(dir.join(INDEX_NAME))?;
    let meta = file.metadata()?;
    let private = meta.is_file()
        && meta.mode() & 0o077 == 0
        && meta.nlink() == 1
        && meta.uid() == nix::unistd::geteuid().as_raw();
    if private {
        Ok(file)
    } else {
        Err(io::Error::other("the start index is not a private regular file"))
    }
}

/// The bytes over the index, then the file cut to their length. A reader meanwhile finds a mix, which
/// fails the digest; so does a file that a power loss leaves torn (no fsync). A write that fails empties
/// the file, which the next start takes for no index rather than a damaged one.
fn write_in_place(file: &fs::File, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let result = file
        .write_all_at(bytes, 0)
        .and_then(|()| file.set_len(bytes.len() as u64));
    if result.is_err() {
        let _ = file.set_len(0);
    }
    result
}

/// A temp file, then a rename over the index, where it cannot be written in place: a reader finds the
/// old index or the new one. No fsync, as above.
fn replace_index(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".kakao-tokend.index.tmp-")
        .rand_bytes(10)
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(dir.join(INDEX_NAME)).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakao_tokend_core::machine::{FileRead, Input, Machine, Now};

    const TOKEN: &str = r#"{"token_type":"bearer","access_token":"at-0123456789","expires_in":21599,"refresh_token":"rt-0123456789","refresh_token_expires_in":5183999,"expires_at":"2026-12-05T00:00:00Z","refresh_token_expires_at":"2027-02-01T00:00:00Z"}"#;

    /// An account with its token file and state file in a folder of its own.
    fn account(dir: &Path) -> Arc<Account> {
        let config = dir.join("config.toml");
        let token_file = dir.join("me.json");
        fs::write(
            &config,
            format!(
                "[accounts.me]\nclient_id = \"k\"\ntoken_file = \"{}\"\n",
                token_file.display()
            ),
        )
        .unwrap();
        fs::write(&token_file, TOKEN).unwrap();
        let mut state = AccountState::default();
        state.failed(2, "KOE000".into(), Some("no answer".into()), false);
        state.save(&token_file).unwrap();
        crate::config::Config::load(&config).unwrap().accounts["me"].clone()
    }

    /// What a daemon that read the files would know of them.
    fn known(cfg: &Arc<Account>) -> Known {
        let mut m = Machine::new(cfg.clone());
        let input = Input {
            now: Now {
                wall: jiff::Timestamp::now(),
                mono: Duration::ZERO,
            },
            jitter: 0.5,
            policy: Default::default(),
        };
        let token = read_token_file(&cfg.token_file).unwrap();
        let state = AccountState::load(&cfg.token_file).unwrap().unwrap();
        let state_meta = fs::symlink_metadata(state_path(&cfg.token_file)).unwrap();
        let stamp = token.version.stamp;
        m.start(
            Some(state.clone()),
            FileRead {
                token: Ok(token),
                state: None,
            },
            &input,
        );
        Known {
            token: stamp,
            held: m.current().unwrap().clone(),
            state: Some((version_of(&state_meta).stamp, state)),
        }
    }

    /// `me.json`'s entry in the index of `dir`.
    fn entry_in(dir: &Path) -> Option<IndexEntry> {
        StartIndex::load(dir).unwrap().shared().entry("me.json")
    }

    fn record(held: &Held) -> Vec<u8> {
        let mut w = Writer::default();
        assert!(held.to_record(&mut w));
        w.0
    }

    #[test]
    fn an_index_keeps_what_the_files_said_until_one_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = account(dir.path());
        let known = known(&cfg);
        let written = write_indexes(vec![(cfg.clone(), Some(known.clone()))]);
        assert_eq!((written.accounts, written.folders), (1, 1));
        let index = dir.path().join(INDEX_NAME);
        assert_eq!(fs::metadata(&index).unwrap().permissions().mode() & 0o777, 0o600);
        let text = fs::read(&index).unwrap();
        assert!(
            !text.windows(13).any(|w| w == b"at-0123456789" || w == b"rt-0123456789"),
            "the index holds no token"
        );

        let loaded = StartIndex::load(dir.path()).unwrap().shared();
        assert!(loaded.entry("other.json").is_none());
        let entry = loaded.entry("me.json").expect("the entry");
        assert!(
            entry.get(&dir.path().join("other.json")).is_none(),
            "the name is checked"
        );
        let back = entry.get(&cfg.token_file).expect("the entry");
        assert_eq!(back.token, known.token);
        assert_eq!(record(&back.held), record(&known.held));
        assert_eq!(back.state.as_ref().map(|s| &s.1), known.state.as_ref().map(|s| &s.1));
        assert!(back.still_holds(&cfg.token_file, Some(true)).is_some());
        assert!(back.still_holds(&cfg.token_file, None).is_some());
        // The listing saw no state file: something moved it away.
        assert!(back.still_holds(&cfg.token_file, Some(false)).is_none());

        // The same bytes' length rewritten in place, the modification time set back: the change time
        // still tells.
        let mtime = fs::metadata(&cfg.token_file).unwrap().modified().unwrap();
        let other = TOKEN.replace("at-0123456789", "at-9876543210");
        let f = fs::OpenOptions::new().write(true).open(&cfg.token_file).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, other.as_bytes(), 0).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        assert_eq!(fs::metadata(&cfg.token_file).unwrap().modified().unwrap(), mtime);
        assert!(back.still_holds(&cfg.token_file, Some(true)).is_none());
    }

    #[test]
    fn a_changed_state_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = account(dir.path());
        let known = known(&cfg);
        assert!(known.still_holds(&cfg.token_file, Some(true)).is_some());
        AccountState::default().save(&cfg.token_file).unwrap();
        assert!(known.still_holds(&cfg.token_file, Some(true)).is_none());
        let none = Known { state: None, ..known };
        assert!(none.still_holds(&cfg.token_file, None).is_none());
        fs::remove_file(state_path(&cfg.token_file)).unwrap();
        assert!(none.still_holds(&cfg.token_file, None).is_some());
        assert!(none.still_holds(&cfg.token_file, Some(false)).is_some());
    }

    /// A version changed just now may be changed again in the same tick of the file system's clock, with
    /// the same times: it is not written until that tick is well past.
    #[test]
    fn a_version_settles_once_its_tick_is_past() {
        let now = SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 500_000_000);
        assert!(!settled(1_800_000_000, now));
        assert!(!settled(1_799_999_998, now));
        assert!(settled(1_799_999_997, now));
        assert!(settled(0, now));
    }

    /// Every folder of the accounts gets an index, an account with nothing known included: an older
    /// index, which may describe versions since replaced, is not left behind.
    #[test]
    fn each_folder_gets_a_new_index() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = account(dir.path());
        let known = known(&cfg);
        let written = write_indexes(vec![(cfg.clone(), Some(known))]);
        assert_eq!((written.accounts, written.folders), (1, 1));
        assert!(entry_in(dir.path()).is_some_and(|e| e.get(&cfg.token_file).is_some()));
        let written = write_indexes(vec![(cfg.clone(), None)]);
        assert_eq!((written.accounts, written.folders), (0, 1));
        // The entry keeps the folder's listing, and nothing for the account's start.
        let entry = entry_in(dir.path()).expect("the listing's entry");
        assert!(entry.get(&cfg.token_file).is_none());
        assert!(entry.listed("me.json").is_some());
    }

    /// An entry that does not read back (here a flag out of range, in an index whose digest is whole)
    /// is no entry: the account's files are read.
    #[test]
    fn an_entry_that_does_not_read_back_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = account(dir.path());
        write_indexes(vec![(cfg.clone(), Some(known(&cfg)))]);
        let index = dir.path().join(INDEX_NAME);
        let mut bytes = fs::read(&index).unwrap();
        // Header 28, name 2 + 7, length 2, the listing (its flag, the state file's flag, no backups: 4),
        // what is known (its flag 1, token 8), then the held record: digest 8, two times 12 each, two
        // counts 8 each, and the refresh token's flag.
        assert_eq!(bytes[28 + 2 + 7 + 2], 1, "the listing is kept");
        let flag = 28 + 2 + 7 + 2 + 4 + 1 + 8 + 8 + 12 + 12 + 8 + 8;
        assert_eq!(bytes[flag], 1);
        bytes[flag] = 9;
        let body = bytes.len() - 8;
        let sum = digest(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum.to_le_bytes());
        fs::write(&index, &bytes).unwrap();
        let entry = entry_in(dir.path()).expect("the entry is listed");
        assert!(entry.get(&cfg.token_file).is_none());
    }

    #[test]
    fn a_damaged_foreign_or_linked_index_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        assert!(entry_in(dir.path()).is_none(), "no index: nothing known");
        let cfg = account(dir.path());
        write_indexes(vec![(cfg.clone(), Some(known(&cfg)))]);
        let index = dir.path().join(INDEX_NAME);
        let good = fs::read(&index).unwrap();
        // Empty is what a stop that could not finish its write leaves: no index, nothing to report.
        fs::write(&index, b"").unwrap();
        assert!(StartIndex::load(dir.path()).is_ok_and(|i| i.shared().entry("me.json").is_none()));
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("cut short", good[..good.len() - 3].to_vec()),
            ("cut to its header", good[..20].to_vec()),
        ];
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x40;
        cases.push(("a byte flipped", flipped));
        let mut other_build = good.clone();
        other_build[8] ^= 1;
        cases.push(("another build's digest", other_build));
        for (what, bytes) in cases {
            fs::write(&index, &bytes).unwrap();
            assert!(
                matches!(StartIndex::load(dir.path()), Err(IndexError::Unusable)),
                "{what}"
            );
        }
        fs::remove_file(&index).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, &good).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &index).unwrap();
        assert!(
            matches!(StartIndex::load(dir.path()), Err(IndexError::Io(_))),
            "a symlink is not followed"
        );
    }
    /// What a start takes from a folder for `name`: backups, whether a state file is there, temps.
    fn found(scan: &mut FolderScan, name: &str) -> (Vec<BackupKey>, bool, usize) {
        let found = scan.take(name);
        (found.backups.known, found.maybe_state, found.stale_temps.len())
    }

    /// A write while running, over accounts of two folders added out of the folders' order: each
    /// folder gets its own account's entry and no listing, so the next start lists it; an account with
    /// nothing to keep no longer has what it kept before.
    #[test]
    fn a_write_while_running_keeps_each_folders_entries_and_no_listing() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (account(one.path()), account(two.path()));
        let (first, second) = if one.path() < two.path() { (&b, &a) } else { (&a, &b) };
        let mut builder =
            IndexBuilder::for_files([&first.token_file, &second.token_file].into_iter().map(|p| p.as_path()));
        builder.add(&first.token_file, Some(&known(first)));
        builder.add(&second.token_file, Some(&known(second)));
        let written = builder.write();
        assert_eq!((written.accounts, written.folders, written.listings), (2, 2, 0));
        for (dir, cfg) in [(one.path(), &a), (two.path(), &b)] {
            let index = StartIndex::load(dir).unwrap();
            assert!(!index.lists(dir));
            let entry = index.shared().entry("me.json").expect("the entry");
            assert!(entry.get(&cfg.token_file).is_some(), "{}", dir.display());
        }
        // Written again with nothing to keep for `a`: what its folder's index kept of it is gone.
        let mut builder = IndexBuilder::for_files(std::iter::once(a.token_file.as_path()));
        builder.add(&a.token_file, None);
        assert_eq!(builder.write().accounts, 0);
        let entry = StartIndex::load(one.path()).unwrap().shared().entry("me.json");
        assert!(entry.and_then(|e| e.get(&a.token_file)).is_none());
    }

    /// The listing a stop records is the folder's own, and it is used only while no name in the folder
    /// was added, removed or renamed; a token file it does not cover has the folder listed after all.
    #[test]
    fn the_recorded_listing_is_the_folders_own_until_a_name_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = account(dir.path());
        for name in [
            "me.json.20261201_000000",
            "me.json.20261202_000000-1",
            "other.json.20261203_000000",
        ] {
            fs::write(dir.path().join(name), TOKEN).unwrap();
        }
        fs::write(dir.path().join("other.json"), TOKEN).unwrap();
        let written = write_indexes(vec![(cfg.clone(), Some(known(&cfg)))]);
        assert_eq!((written.accounts, written.listings), (1, 1));
        let inode = fs::metadata(dir.path().join(INDEX_NAME)).unwrap().ino();

        let index = StartIndex::load(dir.path()).unwrap();
        assert!(index.lists(dir.path()));
        let mut recorded = FolderScan::at_start(dir.path(), index);
        assert!(recorded.from_index());
        let mut listed = FolderScan::of(dir.path()).unwrap();
        let me = found(&mut recorded, "me.json");
        assert_eq!(me, found(&mut listed, "me.json"));
        let keys = |list: &[(u64, u32)]| list.iter().map(|&(s, n)| pack_key(s, n).unwrap()).collect::<Vec<_>>();
        assert_eq!(me, (keys(&[(20261201000000, 0), (20261202000000, 1)]), true, 0));
        assert!(recorded.from_index());
        // `other.json` has no entry: its backups come from the folder's own listing.
        assert_eq!(found(&mut recorded, "other.json"), found(&mut listed, "other.json"));
        assert!(!recorded.from_index());

        // A token file rewritten in place changes no name: the listing still holds. The index was
        // rewritten in place too (the same inode), or the folder would have changed.
        let f = fs::OpenOptions::new().write(true).open(&cfg.token_file).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b" ", 0).unwrap();
        drop(f);
        assert_eq!(write_indexes(vec![(cfg, None)]).listings, 1);
        assert_eq!(fs::metadata(dir.path().join(INDEX_NAME)).unwrap().ino(), inode);
        let index = StartIndex::load(dir.path()).unwrap();
        assert!(index.lists(dir.path()));
        assert_eq!(
            found(&mut FolderScan::at_start(dir.path(), index), "me.json").0.len(),
            2
        );

        // A backup deleted by hand: the folder is listed.
        fs::remove_file(dir.path().join("me.json.20261201_000000")).unwrap();
        let index = StartIndex::load(dir.path()).unwrap();
        assert!(!index.lists(dir.path()));
        let mut scan = FolderScan::at_start(dir.path(), index);
        assert!(!scan.from_index());
        assert_eq!(found(&mut scan, "me.json"), (keys(&[(20261202000000, 1)]), true, 0));
    }

    /// Accounts in folders of their own, at their first stop (no index yet): each folder's index is
    /// made, and each keeps its folder's listing.
    #[test]
    fn every_folder_keeps_its_listing_at_the_first_stop() {
        let root = tempfile::tempdir().unwrap();
        let accounts: Vec<_> = (0..20)
            .map(|i| {
                let dir = root.path().join(format!("f{i}"));
                fs::create_dir(&dir).unwrap();
                let cfg = account(&dir);
                let known = known(&cfg);
                (cfg, Some(known))
            })
            .collect();
        let written = write_indexes(accounts);
        assert_eq!((written.accounts, written.folders, written.listings), (20, 20, 20));
        for i in 0..20 {
            let dir = root.path().join(format!("f{i}"));
            assert!(StartIndex::load(&dir).unwrap().lists(&dir), "f{i}");
        }
    }

    /// A temp file is a write in progress or a crash's leftover that the next start must remove: the
    /// listing is not recorded beside it, and the next start lists the folder and finds it.
    #[test]
    fn no_listing_is_recorded_beside_a_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = account(dir.path());
        fs::write(dir.path().join(".me.json.tmp-a1b2c3"), b"").unwrap();
        let written = write_indexes(vec![(cfg.clone(), Some(known(&cfg)))]);
        assert_eq!((written.accounts, written.listings), (1, 0));
        let index = StartIndex::load(dir.path()).unwrap();
        assert!(!index.lists(dir.path()));
        let mut scan = FolderScan::at_start(dir.path(), index);
        assert!(!scan.from_index());
        assert_eq!(found(&mut scan, "me.json").2, 1);
    }

    /// An index that is not a private regular file of this user's is not written through: it is
    /// replaced by a new file, which cannot keep the listing (the rename changes the folder).
    #[test]
    fn a_linked_or_shared_index_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = account(dir.path());
        let index = dir.path().join(INDEX_NAME);
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"keep").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &index).unwrap();
        let written = write_indexes(vec![(cfg.clone(), Some(known(&cfg)))]);
        assert_eq!((written.accounts, written.listings), (1, 0));
        assert_eq!(fs::read(&elsewhere).unwrap(), b"keep");
        assert!(fs::symlink_metadata(&index).unwrap().is_file());
        assert!(entry_in(dir.path()).is_some());

        fs::set_permissions(&index, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(write_indexes(vec![(cfg.clone(), Some(known(&cfg)))]).listings, 0);
        assert_eq!(fs::metadata(&index).unwrap().permissions().mode() & 0o777, 0o600);
        // Private again, it is written in place, with the listing.
        assert_eq!(write_indexes(vec![(cfg.clone(), Some(known(&cfg)))]).listings, 1);
    }
}
