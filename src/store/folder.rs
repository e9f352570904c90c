//! One listing of a token file's folder at start: the backups kept and the temp files a crash left.

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
                && let Some((stamp, n)) = backup_key(owner, &name)
            {
                scan.backups
                    .entry(owner.to_string())
                    .or_default()
                    .known
                    .push((pack_stamp(&stamp), n));
            }
        }
        for b in scan.backups.values_mut() {
            b.known.sort_unstable();
            b.known.shrink_to_fit();
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
