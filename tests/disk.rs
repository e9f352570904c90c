//! A full disk and a folder the daemon cannot write to, for real: a 256 KiB tmpfs filled to the last
//! block, and a folder made read-only under a daemon running as an unprivileged user (root ignores
//! modes). The write fails cleanly, the old file stays whole, the refreshed token (a rotated refresh
//! token among it) is held in memory and no further refresh is sent, the error is logged once, and the
//! held token is written within one backoff step of the space or the permission coming back.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Env, FileReader, NONROOT, account_of, level, message};
use kakao_tokend::fake::FakeSettings;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::Signal;

const LONG: Duration = Duration::from_secs(30);
/// The backoff step for 3 s tokens (its floor), plus slack for the write itself.
const STEP: Duration = Duration::from_secs(2);

/// A tmpfs of `size` mounted on a folder for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
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

/// The account's config with its token file moved into `folder` (relative to the config).
fn config_with_folder(env: &Env, folder: &str) -> String {
    let account = env.account("me").replace(
        "token_file = \"me.json\"",
        &format!("token_file = \"{folder}/me.json\""),
    );
    format!("[daemon]\nrefresh_before_expiry = \"66%\"\nbackups = 2\n\n{account}")
}

/// Waits for the write failure, then for `retries` more attempts, asserting nothing was sent meanwhile
/// and the file is as it was; returns the failure's message.
async fn ride_out_write_failures(d: &mut Daemon, env: &Env, file: &Path, before: &[u8], retries: usize) -> String {
    let failed = d.wait_message(LONG, Some("me"), "cannot write token file").await;
    let requests = env.fake.stats().token_requests;
    for _ in 0..retries {
        d.wait_log(LONG, |v| {
            level(v) == "DEBUG" && account_of(v) == Some("me") && message(v).contains("cannot write token file")
        })
        .await;
    }
    assert_eq!(
        env.fake.stats().token_requests,
        requests,
        "a refresh was sent while a refreshed token waited to be written"
    );
    assert_eq!(std::fs::read(file).unwrap(), before, "the old file changed");
    let folder = file.parent().unwrap();
    assert!(
        common::temp_files(folder, "me.json").is_empty(),
        "a failed write left its temp file"
    );
    message(&failed).to_owned()
}

/// Problems logged at warn or error for the account, by message.
fn problems(d: &Daemon) -> Vec<String> {
    d.events()
        .iter()
        .filter(|v| account_of(v) == Some("me") && matches!(level(v), "WARN" | "ERROR"))
        .map(|v| message(v).to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_old_file_and_the_held_token_is_written_when_space_returns() {
    // Every refresh rotates: the token held in memory carries the only live refresh token.
    let env = Env::new(FakeSettings {
        rotate_within: 3600,
        ..FakeSettings::fast(3, 3600)
    })
    .await;
    let small = env.path("small");
    let _tmpfs = Tmpfs::mount(&small, "256k");
    std::fs::write(&env.config, config_with_folder(&env, "small")).unwrap();
    env.login_at(&env.fake, "small/me");
    let file = small.join("me.json");
    let reader = FileReader::start(file.clone());
    let mut d = env.spawn();
    d.wait_message(LONG, Some("me"), "refreshed").await;

    fill(&small.join("filler"));
    let before = std::fs::read(&file).unwrap();
    let failure = ride_out_write_failures(&mut d, &env, &file, &before, 3).await;
    assert!(
        failure.contains("No space left on device") && failure.contains("the old file is kept"),
        "{failure}"
    );
    // The refresh that met the full disk rotated: the only live refresh token is in memory.
    let held_rotation = d
        .events()
        .iter()
        .any(|v| message(v) == "provider rotated the refresh token" && v["written"] == false);
    assert!(held_rotation);

    std::fs::remove_file(small.join("filler")).unwrap();
    let freed = Instant::now();
    d.wait_message(LONG, Some("me"), "refreshed").await;
    assert!(
        freed.elapsed() <= STEP,
        "written {:?} after space came back",
        freed.elapsed()
    );
    // The held token reached the disk: its refresh token is the live one, and none was refused.
    let rt = common::refresh_token_of(&file);
    assert!(env.fake.refresh_token_alive(&rt), "the rotated refresh token was lost");
    assert_ne!(std::fs::read(&file).unwrap(), before);
    d.wait_message(LONG, Some("me"), "refreshed").await;
    assert_eq!(env.fake.stats().refused, 0);

    // One warning for the whole episode, however many retries.
    let logged = problems(&d);
    assert_eq!(logged.len(), 1, "{logged:#?}");
    let counts = reader.finish();
    assert_eq!((counts.torn, counts.missing), (0, 0), "{counts:?}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_the_daemon_cannot_write_to_is_reported_once_and_the_write_retried() {
    let env = Env::new(FakeSettings {
        rotate_within: 3600,
        ..FakeSettings::fast(3, 3600)
    })
    .await;
    let tokens = env.path("tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::write(&env.config, config_with_folder(&env, "tokens")).unwrap();
    env.login_at(&env.fake, "tokens/me");
    // The daemon's user owns its folder and file; it reads the config, which root owns.
    for p in [env.dir.path(), tokens.as_path(), &tokens.join("me.json")] {
        std::os::unix::fs::chown(p, Some(NONROOT), Some(NONROOT)).unwrap();
    }
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file = tokens.join("me.json");
    let reader = FileReader::start(file.clone());
    let mut d = Daemon::from_command(common::as_nonroot(&["run"], &env.config));
    d.wait_message(LONG, Some("me"), "refreshed").await;

    // Read and search, but no new entries: no temp file, no rename.
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o500)).unwrap();
    let before = std::fs::read(&file).unwrap();
    let failure = ride_out_write_failures(&mut d, &env, &file, &before, 3).await;
    assert!(failure.contains("Permission denied"), "{failure}");

    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o700)).unwrap();
    let fixed = Instant::now();
    d.wait_message(LONG, Some("me"), "refreshed").await;
    assert!(
        fixed.elapsed() <= STEP,
        "written {:?} after the folder was fixed",
        fixed.elapsed()
    );
    assert!(env.fake.refresh_token_alive(&common::refresh_token_of(&file)));
    assert_eq!(env.fake.stats().refused, 0);
    let logged = problems(&d);
    assert_eq!(logged.len(), 1, "{logged:#?}");
    let counts = reader.finish();
    assert_eq!((counts.torn, counts.missing), (0, 0), "{counts:?}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}
