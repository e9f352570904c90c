//! A full disk and a folder the daemon cannot write to, for real: a 256 KiB tmpfs filled to the last
//! block, and a folder made read-only under a daemon running as an unprivileged user (root ignores
//! modes). Room for the new file is taken before each request, so a disk that is already full, or a
//! folder already read-only, stops the refresh before anything is sent. A disk that fills while a
//! request is on the wire is met by that room, and a refresh whose room is the oldest backup needs no
//! new space at all. A folder that turns read-only then leaves the refreshed token, and with it the only
//! live refresh token, in memory. Either way the old file stays whole, the error is logged once, and all
//! is written within one backoff step of the cause going away.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Env, FileReader, NONROOT, account_of, level, message};
use fake_kakao::{FakeEventKind, FakeSettings, Fault};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::Signal;

use common::LONG;
/// The backoff step for 3 s tokens (its floor), plus slack for the write itself.
const STEP: Duration = Duration::from_secs(2);

/// A tmpfs of `size` mounted on a folder for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let opts = format!("size={size},mode=0755");
        nix::mount::mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), Some(opts.as_str())).unwrap();
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// Writes zeros into `path` until the file system says it is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let block = [0u8; 4096];
    loop {
        match f.write_all(&block).and_then(|()| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => return,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

/// Moves the account's token file into `folder` (beside the config, which must exist) and logs in
/// there; returns the token file's path.
fn log_in_within(env: &Env, folder: &str) -> PathBuf {
    let account = env.account("me").replace(
        "token_file = \"me.json\"",
        &format!("token_file = \"{folder}/me.json\""),
    );
    let config = format!("[daemon]\nrefresh_before_expiry = \"66%\"\nbackups = 2\n\n{account}");
    std::fs::write(&env.config, config).unwrap();
    env.login_at(&env.fake, &format!("{folder}/me"));
    env.path(folder).join("me.json")
}

/// A 256 KiB tmpfs at `small/`, holding the account's token file: (the mount, the folder, the file).
fn on_a_small_disk(env: &Env) -> Option<(Tmpfs, PathBuf, PathBuf)> {
    if !common::can_run_as_root("a test on a small tmpfs") {
        return None;
    }
    let small = env.path("small");
    let tmpfs = Tmpfs::mount(&small, "256k");
    let file = log_in_within(env, "small");
    Some((tmpfs, small, file))
}

/// Waits for the write failure, then for `retries` more attempts, asserting that nothing was sent
/// meanwhile, the file stayed as it was, and `temps` temp files are beside it (1: the one holding a
/// refreshed token that could not be renamed into place); returns the failure's message.
async fn ride_out_write_failures(d: &mut Daemon, env: &Env, file: &Path, retries: usize, temps: usize) -> String {
    let failed = d.wait_event(LONG, Some("me"), "write_failed").await;
    let requests = env.fake.stats().token_requests;
    let before = std::fs::read(file).unwrap();
    for _ in 0..retries {
        d.wait_log(LONG, |v| {
            level(v) == "DEBUG" && account_of(v) == Some("me") && message(v).contains("cannot write token file")
        })
        .await;
    }
    assert_eq!(
        env.fake.stats().token_requests,
        requests,
        "a refresh was sent while the token file could not be written"
    );
    assert_eq!(std::fs::read(file).unwrap(), before, "the old file changed");
    let folder = file.parent().unwrap();
    let left = common::temp_files(folder, "me.json");
    assert_eq!(left.len(), temps, "temp files beside the token file: {left:?}");
    message(&failed).to_owned()
}

/// Holds the next token request at the fake for a second and returns once it has arrived: the daemon
/// has taken its room for the file and the request is on the wire.
async fn hold_next_request(env: &Env) {
    let mut events = env.fake.subscribe();
    env.fake.push_fault(Fault::Delay(Duration::from_secs(1)));
    env.wait_fake(&mut events, LONG, |e| e.kind == FakeEventKind::Faulted)
        .await;
}

/// Problems logged at warn or error for the account, by message.
fn problems(d: &Daemon) -> Vec<String> {
    problems_in(&d.events())
}

fn problems_in(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter(|v| account_of(v) == Some("me") && matches!(level(v), "WARN" | "ERROR"))
        .map(|v| message(v).to_owned())
        .collect()
}

/// Every refresh rotates: a refreshed token carries the only live refresh token.
fn rotating() -> FakeSettings {
    FakeSettings {
        rotate_within: 3600,
        ..FakeSettings::fast(3, 3600)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_refresh_before_anything_is_sent() {
    let env = Env::new(rotating()).await;
    let Some((_tmpfs, small, file)) = on_a_small_disk(&env) else {
        return;
    };
    let reader = FileReader::start(file.clone());
    let mut d = env.spawn();
    d.wait_event(LONG, Some("me"), "refreshed").await;

    fill(&small.join("filler"));
    let failure = ride_out_write_failures(&mut d, &env, &file, 3, 0).await;
    assert!(
        failure.contains("No space left on device") && failure.contains("no refresh is sent"),
        "{failure}"
    );

    std::fs::remove_file(small.join("filler")).unwrap();
    let freed = Instant::now();
    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert!(
        freed.elapsed() <= STEP,
        "refreshed {:?} after space came back",
        freed.elapsed()
    );
    assert!(env.fake.refresh_token_alive(&common::refresh_token_of(&file)));
    assert_eq!(env.fake.stats().refused, 0);

    // One warning for the whole episode, however many retries.
    let logged = problems(&d);
    assert_eq!(logged.len(), 1, "{logged:#?}");
    let counts = reader.finish();
    assert_eq!((counts.torn, counts.missing), (0, 0), "{counts:?}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

/// With all its backups kept, a refresh takes its room from the oldest backup, which it would delete:
/// it needs no new space, so a full disk does not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_still_takes_the_refresh_into_the_oldest_backup() {
    let env = Env::new(rotating()).await;
    let Some((_tmpfs, small, file)) = on_a_small_disk(&env) else {
        return;
    };
    let mut d = env.spawn();
    // `backups = 2`: the next refresh would prune the oldest.
    while kakao_tokend::store::list_backups(&file).unwrap().len() < 2 {
        d.wait_event(LONG, Some("me"), "refreshed").await;
    }
    fill(&small.join("filler"));
    let before = std::fs::read(&file).unwrap();
    let backups_before = kakao_tokend::store::list_backups(&file).unwrap();

    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert!(small.join("filler").exists());
    assert_ne!(std::fs::read(&file).unwrap(), before);
    assert!(env.fake.refresh_token_alive(&common::refresh_token_of(&file)));
    let backups = kakao_tokend::store::list_backups(&file).unwrap();
    assert_eq!(backups.len(), 2, "{backups:?}");
    assert!(
        !backups.contains(&backups_before[0]),
        "the oldest backup was not the one to go"
    );
    assert_eq!(common::temp_files(&small, "me.json"), Vec::<String>::new());
    assert!(problems(&d).is_empty(), "{:#?}", problems(&d));
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_while_a_request_is_on_the_wire_still_takes_the_rotated_token() {
    let env = Env::new(rotating()).await;
    let Some((_tmpfs, small, file)) = on_a_small_disk(&env) else {
        return;
    };
    let before = std::fs::read(&file).unwrap();
    let mut d = env.spawn();

    hold_next_request(&env).await;
    fill(&small.join("filler"));
    // The answer rotates the refresh token; the room taken before the request holds it.
    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert!(small.join("filler").exists());
    assert_ne!(std::fs::read(&file).unwrap(), before);
    assert!(env.fake.refresh_token_alive(&common::refresh_token_of(&file)));
    let rotated = d
        .wait_log(LONG, |v| common::event(v) == "rotated" && v["written"] == true)
        .await;
    // Up to that line: the next attempt, a second later on the disk still full, rightly warns.
    let events = d.events();
    let upto = events.iter().position(|v| *v == rotated).unwrap();
    let logged = problems_in(&events[..upto]);
    assert!(logged.is_empty(), "{logged:#?}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_the_daemon_cannot_write_to_is_reported_once_and_nothing_is_lost() {
    let env = Env::new(rotating()).await;
    let tokens = env.path("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let file = log_in_within(&env, "tokens");
    // The daemon's user owns its folder and file; it reads the config, which root owns.
    for p in [env.dir.path(), tokens.as_path(), file.as_path()] {
        std::os::unix::fs::chown(p, Some(NONROOT), Some(NONROOT)).unwrap();
    }
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let reader = FileReader::start(file.clone());
    if !common::can_run_as_root("a folder the daemon cannot write to") {
        return;
    }
    let mut d = Daemon::from_command(common::as_nonroot(&["run"], &env.config));
    d.wait_event(LONG, Some("me"), "refreshed").await;
    let (read_only, writable) = (
        std::fs::Permissions::from_mode(0o500),
        std::fs::Permissions::from_mode(0o700),
    );

    // Read-only before a refresh: nothing is sent.
    std::fs::set_permissions(&tokens, read_only.clone()).unwrap();
    let failure = ride_out_write_failures(&mut d, &env, &file, 3, 0).await;
    assert!(
        failure.contains("Permission denied") && failure.contains("no refresh is sent"),
        "{failure}"
    );
    std::fs::set_permissions(&tokens, writable.clone()).unwrap();
    let fixed = Instant::now();
    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert!(
        fixed.elapsed() <= STEP,
        "refreshed {:?} after the folder was fixed",
        fixed.elapsed()
    );

    // Read-only while a request is on the wire: the rename fails after Kakao has rotated the refresh
    // token, which the daemon then holds in memory, sending nothing, until it can write it.
    hold_next_request(&env).await;
    std::fs::set_permissions(&tokens, read_only).unwrap();
    let failure = ride_out_write_failures(&mut d, &env, &file, 3, 1).await;
    assert!(failure.contains("held in memory"), "{failure}");
    let held_temp = tokens.join(&common::temp_files(&tokens, "me.json")[0]);
    let held = d
        .events()
        .iter()
        .any(|v| common::event(v) == "rotated" && v["written"] == false);
    assert!(held);
    std::fs::set_permissions(&tokens, writable).unwrap();
    let fixed = Instant::now();
    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert!(
        fixed.elapsed() <= STEP,
        "written {:?} after the folder was fixed",
        fixed.elapsed()
    );
    // The temp file that held it was renamed into place. (Another may exist by now: the next refresh,
    // due at once for a token held this long, takes its room before its request.)
    assert!(!held_temp.exists(), "{} was left behind", held_temp.display());
    // The chain lives: the next refresh, sent with the refresh token that write put on disk, is answered
    // (every refresh rotates, so a lost one would be refused). Reading the file and asking the fake
    // instead would race that next refresh, due at once for a token held this long.
    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert_eq!(env.fake.stats().refused, 0, "the rotated refresh token was lost");

    // One warning per episode.
    let logged = problems(&d);
    assert_eq!(logged.len(), 2, "{logged:#?}");

    // Stopped while a rotated token is still held: one last try, and when that fails too, an error
    // that says what is lost and what to do.
    hold_next_request(&env).await;
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o500)).unwrap();
    ride_out_write_failures(&mut d, &env, &file, 1, 1).await;
    d.signal(Signal::SIGTERM);
    let last = d.wait_event(LONG, Some("me"), "unwritten_at_stop").await;
    assert_eq!(level(&last), "ERROR");
    assert!(message(&last).contains("kakao-tokend login --account me"), "{last}");
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o700)).unwrap();
    let counts = reader.finish();
    assert_eq!((counts.torn, counts.missing), (0, 0), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_command_on_a_full_disk_sends_nothing_and_says_so() {
    let env = Env::new(rotating()).await;
    let Some((_tmpfs, small, file)) = on_a_small_disk(&env) else {
        return;
    };
    let before = std::fs::read(&file).unwrap();
    fill(&small.join("filler"));

    let out = common::output_swept(
        std::process::Command::new(common::BIN)
            .args(["refresh", "--account", "me", "--config"])
            .arg(&env.config)
            .env("RUST_LOG", ""),
        false,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("no refresh was sent, so nothing is lost"),
        "{err}"
    );
    assert_eq!(env.fake.stats().token_requests, 0);
    assert_eq!(std::fs::read(&file).unwrap(), before);
    assert!(common::temp_files(&small, "me.json").is_empty());

    // With room again, the same command works and the chain goes on.
    std::fs::remove_file(small.join("filler")).unwrap();
    let out = common::output_swept(
        std::process::Command::new(common::BIN)
            .args(["refresh", "--account", "me", "--config"])
            .arg(&env.config),
        false,
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.fake.refresh_token_alive(&common::refresh_token_of(&file)));
}
