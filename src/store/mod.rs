//! Files on disk: the atomic, durable publish of a token file, its timestamped backups, the lock that
//! makes one process the refresher, crash clean-up, and the per-account state file.
//!
//! Beside each token file `NAME.json` live only `NAME.json.lock`, `NAME.json.state`, backups
//! `NAME.json.YYYYmmdd_HHMMSS[-N]`, and, for an instant, temp files
//! `.NAME.json[...].tmp-RANDOM` (the next version's is often the oldest backup, renamed). Each folder
//! also holds the daemon's start index, `.kakao-tokend.index` (see [`StartIndex`]).
//!
//! Which store holds the record of truth is the [`TokenStore`] seam: the file store (one host, the
//! default) or etcd (replicas; see `crate::replica`).

mod atomic;
mod backups;
mod folder;
mod lock;
mod seam;
mod start_index;
mod state_file;
mod token_file;

pub use atomic::*;
pub use backups::*;
pub use folder::*;
pub use lock::*;
pub use seam::{FileStore, FileTransaction, Refusal, StoreTransaction, TokenStore, read_file_and_state};
pub use start_index::*;
pub use state_file::*;
pub use token_file::*;

use crate::token::{self, TokenFile};

pub use kakao_tokend_core::account::FileAccess;
pub use kakao_tokend_core::state::{
    AccountState, Current, FileStamp, PublishReport, ReadError, STATE_SUFFIX, Version, digest, file_name, folder,
    lock_path, state_path,
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self};

    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use jiff::Timestamp;

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

    /// A token file with `n` backups a second apart (0600, as the daemon makes them), and the view of them.
    fn with_backups(dir: &Path, n: u32) -> (std::path::PathBuf, Backups) {
        let path = dir.join("t.json");
        for i in 0..n {
            let backup = dir.join(backup_name("t.json", ts(&format!("2026-01-01T00:00:0{i}Z")), 0));
            write_atomic(&backup, format!("{{\"v\":{i}}}").as_bytes(), FileAccess::default()).unwrap();
        }
        write_atomic(&path, b"{\"v\":\"current\"}", FileAccess::default()).unwrap();
        let backups = Backups::scan(&path).unwrap();
        (path, backups)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_backup_a_publish_would_prune_becomes_the_room_for_the_next_version() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (path, backups) = with_backups(dir.path(), 2);
        let oldest = dir.path().join("t.json.20260101_000000");
        let oldest_inode = fs::metadata(&oldest).unwrap().ino();
        let current_inode = fs::metadata(&path).unwrap().ino();
        // Fewer backups than kept: nothing would be pruned, so nothing is offered.
        assert!(backups.spare(&path, 3).is_none());
        assert!(backups.spare(&path, 0).is_none());

        let spare = backups.spare(&path, 2);
        let mut room = Some(Reservation::take_reusing(&path, 16, spare).unwrap());
        assert!(!oldest.exists(), "the oldest backup is the room now");
        assert_eq!(temps(dir.path()).len(), 1);

        let new = b"{\"v\":\"new\"}";
        let mut view = Some(backups);
        let report = publish_token_with(
            &path,
            new,
            2,
            ts("2026-01-02T00:00:00Z"),
            &mut view,
            FileAccess::default(),
            &mut room,
        )
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), new);
        // No file was created: the new version is the old backup's inode, the last version a backup.
        assert_eq!(fs::metadata(&path).unwrap().ino(), oldest_inode);
        assert_eq!(
            fs::metadata(dir.path().join("t.json.20260102_000000")).unwrap().ino(),
            current_inode
        );
        assert_eq!(mode(&path), 0o600);
        assert_eq!(report.pruned, 1);
        assert_eq!(report.stamp, Some(stamp_of(&fs::symlink_metadata(&path).unwrap())));
        assert_eq!(
            names(dir.path()),
            ["t.json", "t.json.20260101_000001", "t.json.20260102_000000"]
        );
        let kept: Vec<String> = view.unwrap().paths(&path).map(|p| file_name(&p)).collect();
        assert_eq!(kept, ["t.json.20260101_000001", "t.json.20260102_000000"]);
    }

    #[test]
    fn an_unused_room_made_of_a_backup_goes_back_under_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let (path, backups) = with_backups(dir.path(), 2);
        let before = names(dir.path());
        let room = Reservation::take_reusing(&path, 16, backups.spare(&path, 2)).unwrap();
        assert_ne!(names(dir.path()), before);
        // The request failed: the transaction drops its room.
        drop(room);
        assert_eq!(names(dir.path()), before);
        assert_eq!(
            fs::read(dir.path().join("t.json.20260101_000000")).unwrap(),
            b"{\"v\":0}"
        );
    }

    #[test]
    fn a_backup_linked_elsewhere_or_readable_by_others_is_not_made_the_room() {
        let dir = tempfile::tempdir().unwrap();
        let (path, backups) = with_backups(dir.path(), 2);
        let oldest = dir.path().join("t.json.20260101_000000");
        let kept_copy = dir.path().join("archive");
        fs::hard_link(&oldest, &kept_copy).unwrap();
        let room = Reservation::take_reusing(&path, 16, backups.spare(&path, 2)).unwrap();
        assert!(room.recycled_key().is_none());
        assert_eq!(fs::read(&oldest).unwrap(), b"{\"v\":0}");
        drop(room);
        fs::remove_file(&kept_copy).unwrap();

        fs::set_permissions(&oldest, fs::Permissions::from_mode(0o644)).unwrap();
        let room = Reservation::take_reusing(&path, 16, backups.spare(&path, 2)).unwrap();
        assert!(room.recycled_key().is_none());
        assert_eq!(fs::read(&oldest).unwrap(), b"{\"v\":0}");
        drop(room);
        assert!(temps(dir.path()).is_empty());

        // A spare that is no longer there (someone deleted it): a temp file of its own.
        fs::remove_file(&oldest).unwrap();
        let room = Reservation::take_reusing(&path, 16, backups.spare(&path, 2)).unwrap();
        assert!(room.recycled_key().is_none());
        assert_eq!(temps(dir.path()).len(), 1);
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
            assert_eq!(parse_backup("me.json", not_ours), None, "{not_ours}");
        }
    }

    /// A key keeps the suffix in 16 bits: a name with a larger one is not taken for a backup of ours
    /// (so never pruned), and keys order as the backups' ages do.
    #[test]
    fn a_backup_key_holds_suffixes_up_to_65535_in_age_order() {
        let last = "me.json.20260101_000000-65535";
        assert_eq!(parse_backup("me.json", last), pack_key(20260101000000, 65535));
        assert_eq!(parse_backup("me.json", "me.json.20260101_000000-65536"), None);
        assert_eq!(pack_key(20260101000000, 65536), None);
        let newer = parse_backup("me.json", "me.json.20260101_000001").unwrap();
        assert!(parse_backup("me.json", last).unwrap() < newer);
        assert!(pack_key(99991231235959, 65535).unwrap() > newer);
        assert_eq!(
            unpack_key(pack_key(99991231235959, 65535).unwrap()),
            (99991231235959, 65535)
        );
    }

    #[test]
    fn a_backup_key_gives_back_the_name_it_came_from() {
        for (at, n) in [
            ("2026-01-02T03:04:05Z", 0),
            ("1999-12-31T23:59:59Z", 7),
            ("2026-12-03T00:00:00Z", 1),
        ] {
            let name = backup_name("me.json", ts(at), n);
            let (stamp, parsed_n) = backup_key("me.json", &name).unwrap();
            let key = pack_key(pack_stamp(&stamp), parsed_n).unwrap();
            assert_eq!(unpack_key(key), (pack_stamp(&stamp), parsed_n));
            assert_eq!(parse_backup("me.json", &name), Some(key));
            let keys = Backups { known: vec![key] };
            let path: Vec<_> = keys.paths(Path::new("/t/me.json")).collect();
            assert_eq!(path, [Path::new("/t").join(&name)]);
        }
    }

    #[test]
    fn a_regular_read_takes_the_whole_file_and_stops_one_byte_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for len in [0usize, 1, 353, 4096, 10_000] {
            let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            fs::write(&path, &content).unwrap();
            assert_eq!(read_regular(&path, 1 << 20, false).unwrap().0, content, "{len} bytes");
            // Over the cap: the cap and one more byte, so that the caller sees it is too large.
            if len > 10 {
                assert_eq!(read_regular(&path, 10, false).unwrap().0, content[..11], "{len} bytes");
            }
        }
        // A file whose size the metadata does not give (as in /proc) is read to its end all the same.
        let status = read_regular(Path::new("/proc/self/status"), 1 << 20, true).unwrap().0;
        assert!(String::from_utf8(status).unwrap().contains("VmRSS"));
    }

    #[test]
    fn a_read_leaves_the_access_time_as_it_was() {
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"{}").unwrap();
        // Read last before it was written: a plain read would set the access time (relatime).
        let earlier = SystemTime::now() - Duration::from_secs(3600);
        let file = fs::File::options().write(true).open(&path).unwrap();
        file.set_times(fs::FileTimes::new().set_accessed(earlier)).unwrap();
        drop(file);
        let before = fs::metadata(&path).unwrap().accessed().unwrap();
        assert!(before < fs::metadata(&path).unwrap().modified().unwrap());
        assert_eq!(read_regular(&path, 1024, false).unwrap().0, b"{}");
        assert_eq!(fs::metadata(&path).unwrap().accessed().unwrap(), before);
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
            "a.json.state",
            ".b.json.state.spare",
            "c.json.2026",
        ] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        let mut scan = FolderScan::of(dir.path()).unwrap();
        let a = scan.take("a.json");
        // Only a.json has a state file; the spare an earlier build left beside b.json is not one.
        assert!(a.maybe_state);
        let a = a.backups;
        let names: Vec<String> = a.paths(&dir.path().join("a.json")).map(|p| file_name(&p)).collect();
        assert_eq!(
            names,
            [
                "a.json.20260101_000000",
                "a.json.20260101_000000-1",
                "a.json.20260101_000000-2"
            ]
        );
        let b = scan.take("b.json");
        assert_eq!(b.backups.known.len(), 1);
        assert!(scan.backups.is_empty());
        assert!(!b.maybe_state);
        assert!(!scan.take("c.json").maybe_state);
        // A folder that could not be listed says nothing: the state file is looked for.
        let mut unlisted = FolderScan::of(&dir.path().join("missing")).unwrap_or_default();
        assert!(unlisted.take("a.json").maybe_state);
    }

    /// A folder whose names fill the listing's buffer several times over (about 40 bytes each in
    /// `getdents64`'s records) is listed whole: every backup and state file is found.
    #[test]
    fn a_listing_longer_than_its_buffer_finds_every_name() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = 4_000;
        for i in 0..accounts {
            for name in [
                format!("t{i}.json"),
                format!("t{i}.json.state"),
                format!("t{i}.json.20260101_000000"),
                format!("t{i}.json.20260102_000000"),
            ] {
                fs::File::create(dir.path().join(name)).unwrap();
            }
        }
        let mut scan = FolderScan::of(dir.path()).unwrap();
        for i in 0..accounts {
            let found = scan.take(&format!("t{i}.json"));
            assert!(found.maybe_state, "t{i}.json's state file");
            assert_eq!(found.backups.known.len(), 2, "t{i}.json's backups");
        }
        assert!(scan.backups.is_empty() && scan.states.is_empty());
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
        let Found {
            stale_temps: temps,
            backups,
            ..
        } = scan.take("me.json");
        assert_eq!(backups.known.len(), 1);
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
