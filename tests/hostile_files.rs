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
