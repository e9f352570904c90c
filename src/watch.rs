//! Notices when someone else writes a token file: one inotify watch per folder, not per file and not a
//! poll. A folder watch also sees a file that is replaced by rename, which a watch on the file would miss.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FolderEvent {
    /// Something was written, moved in, or removed at this path.
    Changed(PathBuf),
    /// The kernel dropped events: anything may have changed.
    Overflow,
}

#[derive(Debug)]
pub struct FolderWatcher {
    stream: EventStream<Vec<u8>>,
    watches: Watches,
    by_dir: HashMap<PathBuf, WatchDescriptor>,
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

const MASK: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::DELETE)
    .union(WatchMask::CREATE);

impl FolderWatcher {
    pub fn new() -> io::Result<FolderWatcher> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        let stream = inotify.into_event_stream(vec![0u8; 16 * 1024])?;
        Ok(FolderWatcher {
            stream,
            watches,
            by_dir: HashMap::new(),
            dirs: HashMap::new(),
        })
    }

    /// Watches exactly these folders; returns the ones that could not be watched, with the reason.
    pub fn set_folders(&mut self, folders: &BTreeSet<PathBuf>) -> Vec<(PathBuf, io::Error)> {
        let gone: Vec<PathBuf> = self.by_dir.keys().filter(|d| !folders.contains(*d)).cloned().collect();
        for dir in gone {
            if let Some(wd) = self.by_dir.remove(&dir) {
                self.dirs.remove(&wd);
                // The folder may have been deleted, which removes the watch already.
                let _ = self.watches.remove(wd);
            }
        }
        let mut failed = Vec::new();
        for dir in folders {
            if self.by_dir.contains_key(dir) {
                continue;
            }
            match self.watches.add(dir, MASK) {
                Ok(wd) => {
                    self.by_dir.insert(dir.clone(), wd.clone());
                    self.dirs.insert(wd, dir.clone());
                }
                Err(e) => failed.push((dir.clone(), e)),
            }
        }
        failed
    }

    /// The next event; `None` only if the inotify descriptor fails.
    pub async fn next(&mut self) -> Option<FolderEvent> {
        loop {
            let event = match self.stream.next().await? {
                Ok(e) => e,
                Err(_) => return None,
            };
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                return Some(FolderEvent::Overflow);
            }
            if event.mask.contains(EventMask::IGNORED) {
                // The folder went away (or was unmounted); forget it so set_folders can re-add it.
                if let Some(dir) = self.dirs.remove(&event.wd) {
                    self.by_dir.remove(&dir);
                }
                continue;
            }
            let (Some(dir), Some(name)) = (self.dirs.get(&event.wd), event.name) else {
                continue;
            };
            let name: OsString = name;
            if name == crate::failpoint::INOTIFY_FAILS_TRIGGER && crate::failpoint::armed("inotify_fails") {
                return None;
            }
            return Some(FolderEvent::Changed(dir.join(name)));
        }
    }
}
