//! Files that are not what they seem, put where the daemon keeps its own: a token file that is a symlink
//! to /dev/zero or a FIFO, and a dangling lock symlink pointing out of the folder. Each is refused with a
//! clear word, at once, and nothing is created outside the folder.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::time::Duration;

use common::{BIN, Env};
use fake_kakao::FakeSettings;

/// A command of the binary, which must end within `limit` (a FIFO once hung `status` for ever).
async fn run_within(env: &Env, args: &[&str], limit: Duration) -> Output {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&env.config)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, child)
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not finish within {limit:?}"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    common::assert_no_secrets(&format!("{args:?}"), &stderr);
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_that_is_a_symlink_to_dev_zero_is_refused_at_once() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    std::os::unix::fs::symlink("/dev/zero", env.path("me.json")).unwrap();
    let out = run_within(&env, &["status", "--json"], Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(1));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status[0]["state"], "unreadable", "{status}");
    let out = run_within(&env, &["status"], Duration::from_secs(10)).await;
    assert!(
        text(&out.stdout).contains("not a regular file"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_that_is_a_fifo_does_not_hang_a_reader() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    let made = std::process::Command::new("mkfifo")
        .arg(env.path("me.json"))
        .status()
        .unwrap();
    assert!(made.success());
    let out = run_within(&env, &["status"], Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("not a regular file"),
        "{}",
        text(&out.stdout)
    );
    let out = run_within(&env, &["refresh"], Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not a regular file"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dangling_lock_symlink_creates_nothing_outside_the_folder() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    env.login("me");
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("planted");
    std::os::unix::fs::symlink(&target, env.path("me.json.lock")).unwrap();
    let out = run_within(&env, &["refresh"], Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is a symbolic link"),
        "{}",
        text(&out.stderr)
    );
    assert!(!target.exists(), "the lock was created through the symlink");
    // The state file, another of the daemon's own, is not read through a symlink either.
    std::fs::remove_file(env.path("me.json.lock")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", env.path("me.json.state")).unwrap();
    let out = run_within(&env, &["status"], Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Who else may write the token folder, or read the secret: loose modes are warned about by
/// `check-config` and at start; a folder anyone may write to without the sticky bit is refused (78).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loose_permissions_are_warned_about_and_an_open_folder_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    env.login("me");
    let chmod =
        |p: &std::path::Path, mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    // The config holds client_secret (Env turns it on): readable by everyone is a warning.
    chmod(&env.config, 0o644);
    chmod(env.dir.path(), 0o1777);
    let out = run_within(&env, &["check-config"], Duration::from_secs(10)).await;
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("holds a client_secret and is readable by everyone"),
        "{said}"
    );
    assert!(said.contains("is writable by everyone (mode 1777)"), "{said}");

    chmod(env.dir.path(), 0o777);
    let out = run_within(&env, &["check-config"], Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("without the sticky bit"),
        "{}",
        text(&out.stderr)
    );
    let out = run_within(&env, &["run"], Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("without the sticky bit"),
        "{}",
        text(&out.stderr)
    );

    // A secret file others can read.
    chmod(env.dir.path(), 0o700);
    chmod(&env.config, 0o600);
    let secret = env.path("me.secret");
    std::fs::write(&secret, common::CLIENT_SECRET).unwrap();
    chmod(&secret, 0o644);
    let config = std::fs::read_to_string(&env.config).unwrap();
    let config = config.replace(
        &format!("client_secret = \"{}\"", common::CLIENT_SECRET),
        "client_secret_file = \"me.secret\"",
    );
    std::fs::write(&env.config, config).unwrap();
    let out = run_within(&env, &["check-config"], Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("can be read by others (mode 0644)"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("holds a client_secret"),
        "{}",
        text(&out.stderr)
    );
}
