//! The start index end to end: the real binary, stopped and started over token files changed in between
//! in every way a person or a command changes them, and over a damaged index and a crash.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{BIN, Env, LONG, account_of};
use fake_kakao::FakeSettings;
use kakao_tokend::store::{INDEX_NAME, SETTLED};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The index keeps only versions older than [`SETTLED`] (a write in the same tick of the file system's
/// clock would keep a version's times): this waits until the files in `dir` are that old. A condition
/// on the clock itself, so a wait for a time, not for an event.
async fn until_settled(dir: &Path) {
    let newest = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().ctime())
        .max()
        .unwrap();
    let settled = SystemTime::UNIX_EPOCH + Duration::from_secs(newest as u64 + 1) + SETTLED;
    if let Ok(wait) = settled.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait + Duration::from_millis(50)).await;
    }
}

/// Starts the daemon and waits until every account is loaded; returns the daemon, how many accounts
/// started from the index, and each account's `scheduled` line.
async fn start(env: &Env) -> (common::Daemon, u64, Vec<Value>) {
    let (d, loaded) = start_loaded(env).await;
    let from_index = loaded["from_index"].as_u64().unwrap();
    let scheduled = d
        .events()
        .into_iter()
        .filter(|v| common::event(v) == "scheduled")
        .collect();
    (d, from_index, scheduled)
}

/// Stops the daemon with SIGTERM and returns how many accounts the index it wrote keeps.
async fn stop(d: common::Daemon) -> u64 {
    stop_written(d).await["accounts"].as_u64().unwrap()
}

/// Starts the daemon and returns it with its `loaded` line.
async fn start_loaded(env: &Env) -> (common::Daemon, Value) {
    let mut d = env.spawn();
    let loaded = d.wait_event(LONG, None, "loaded").await;
    (d, loaded)
}

/// Stops the daemon with SIGTERM, checks that it exits cleanly, and returns its `start_index_written`
/// line.
async fn stop_written(mut d: common::Daemon) -> Value {
    d.signal(Signal::SIGTERM);
    let written = d
        .wait_log(LONG, |v| {
            common::event(v) == "start_index_written" && v["reason"] == "stop"
        })
        .await;
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
    written
}

fn expires_at_scheduled(scheduled: &[Value], account: &str) -> String {
    let line = scheduled
        .iter()
        .find(|v| account_of(v) == Some(account))
        .unwrap_or_else(|| panic!("no scheduled line for {account}: {scheduled:?}"));
    line["expires_at"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_takes_unchanged_accounts_from_the_index_and_reads_every_changed_file() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["edited", "deleted", "refreshed", "untouched"]);
    let mut secrets = Vec::new();
    for name in ["edited", "deleted", "refreshed", "untouched"] {
        let file = env.login(name);
        secrets.push(file.access_token.expose().to_owned());
        secrets.push(file.refresh_token.unwrap().expose().to_owned());
    }
    until_settled(env.dir.path()).await;

    // First start: no index yet; the stop writes one for all four.
    let (d, from_index, first) = start(&env).await;
    assert_eq!(from_index, 0);
    assert_eq!(stop(d).await, 4);
    let index = env.path(INDEX_NAME);
    let bytes = std::fs::read(&index).unwrap();
    assert_eq!(std::fs::metadata(&index).unwrap().permissions().mode() & 0o777, 0o600);
    for s in &secrets {
        assert!(
            !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
            "the index holds a token"
        );
    }

    // While it is stopped:
    // - `edited` is rewritten in place, to the same length, its modification time set back;
    let path = env.path("edited.json");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let text = String::from_utf8(env.token_bytes("edited")).unwrap();
    let old = env.token("edited").expires_at.unwrap();
    let new = old.checked_sub(jiff::SignedDuration::from_mins(30)).unwrap();
    let edited = text.replace(&old.to_string(), &new.to_string());
    assert_ne!(edited, text);
    assert_eq!(edited.len(), text.len());
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, edited.as_bytes(), 0).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    // - `deleted` is deleted;
    std::fs::remove_file(env.path("deleted.json")).unwrap();
    // - `refreshed` is refreshed by the command, which writes its token file and state file.
    let out = std::process::Command::new(BIN)
        .args(["refresh", "--account", "refreshed", "--config"])
        .arg(&env.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Second start: only `untouched` comes from the index, and every other account from its file.
    let (d, from_index, second) = start(&env).await;
    assert_eq!(from_index, 1);
    assert_eq!(expires_at_scheduled(&second, "edited"), new.to_string());
    assert_eq!(
        expires_at_scheduled(&second, "refreshed"),
        env.token("refreshed").expires_at.unwrap().to_string()
    );
    assert_eq!(
        expires_at_scheduled(&second, "untouched"),
        expires_at_scheduled(&first, "untouched")
    );
    assert_eq!(
        expires_at_scheduled(&second, "untouched"),
        env.token("untouched").expires_at.unwrap().to_string()
    );
    assert!(
        d.events()
            .iter()
            .any(|v| common::event(v) == "token_file_missing" && account_of(v) == Some("deleted")),
        "the deleted file is missed"
    );
    // Files changed moments ago are not kept, nor is the missing one.
    assert_eq!(stop(d).await, 1);

    // A crash writes no index: the last one stays as it was, and is used.
    let before = std::fs::read(&index).unwrap();
    let (mut d, from_index, _) = start(&env).await;
    assert_eq!(from_index, 1);
    d.signal(Signal::SIGKILL);
    d.wait_exit(LONG).await;
    assert_eq!(std::fs::read(&index).unwrap(), before);
    let (d, from_index, _) = start(&env).await;
    assert_eq!(from_index, 1);
    stop(d).await;
}

/// At the default level, a start from the index that has nothing to say writes no line for its
/// account, and one that has (a refresh token near its end) says it with the account's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_from_the_index_at_info_level_speaks_only_when_it_must_and_names_its_account() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["quiet", "ending"]);
    env.login("quiet");
    env.login("ending");
    // `ending`'s refresh token ends in 10 minutes: within the warning's reach (7/60 of its 2 hours).
    let path = env.path("ending.json");
    let mut token: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_mins(10);
    token["refresh_token_expires_at"] = Value::String(soon.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
    std::fs::write(&path, serde_json::to_vec_pretty(&token).unwrap()).unwrap();
    until_settled(env.dir.path()).await;
    let (d, from_index, _) = start(&env).await;
    assert_eq!(from_index, 0);
    assert_eq!(stop(d).await, 2);

    let mut d = common::Daemon::spawn(&env.config, &[("RUST_LOG", "info")]);
    let loaded = d.wait_event(LONG, None, "loaded").await;
    assert_eq!(loaded["from_index"].as_u64(), Some(2));
    let events = d.events();
    let warned: Vec<&Value> = events
        .iter()
        .filter(|v| common::event(v) == "refresh_token_expiring")
        .collect();
    assert_eq!(warned.len(), 1, "{events:?}");
    assert_eq!(account_of(warned[0]), Some("ending"), "{events:?}");
    assert!(
        !events.iter().any(|v| account_of(v) == Some("quiet")),
        "a start with nothing to say wrote a line: {events:?}"
    );
    stop(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_index_is_reported_and_every_file_is_read() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["a", "b"]);
    env.login("a");
    env.login("b");
    until_settled(env.dir.path()).await;
    let (d, _, _) = start(&env).await;
    assert_eq!(stop(d).await, 2);
    let index = env.path(INDEX_NAME);

    let mut bytes = std::fs::read(&index).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&index, &bytes).unwrap();
    let mut d = env.spawn();
    let unusable = d.wait_event(LONG, None, "start_index_unusable").await;
    assert_eq!(
        unusable["folder"].as_str().unwrap(),
        env.dir.path().display().to_string()
    );
    let loaded = d.wait_event(LONG, None, "loaded").await;
    assert_eq!(loaded["from_index"].as_u64(), Some(0));
    assert_eq!(loaded["accounts"].as_u64(), Some(2));
    // Each account was read and scheduled all the same.
    let scheduled = d
        .events()
        .into_iter()
        .filter(|v| common::event(v) == "scheduled")
        .count();
    assert_eq!(scheduled, 2);
    // The stop replaces the damaged index with a whole one.
    assert_eq!(stop(d).await, 2);
    let (d, from_index, _) = start(&env).await;
    assert_eq!(from_index, 2);
    stop(d).await;
}

/// Starts the daemon and returns it with how many folders' listings came from the index.
async fn start_listing(env: &Env) -> (common::Daemon, u64) {
    let (d, loaded) = start_loaded(env).await;
    (d, loaded["listings_from_index"].as_u64().unwrap())
}

/// Stops the daemon and returns how many folders' listings the index it wrote keeps.
async fn stop_listing(d: common::Daemon) -> u64 {
    stop_written(d).await["listings"].as_u64().unwrap()
}

/// A stop keeps the folder's listing in the index; the next start takes the backups from it while no
/// name in the folder has changed (a file rewritten in place changes none), and prunes by it; a name
/// added by hand has the folder listed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_takes_the_folders_listing_from_the_index_until_a_name_changes() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("backups = 2", &["a", "b"]);
    env.login("a");
    env.login("b");
    let token = env.token_bytes("a");
    for stamp in ["20260101_000000", "20260102_000000"] {
        std::fs::write(env.path(&format!("a.json.{stamp}")), &token).unwrap();
    }
    let (d, listed) = start_listing(&env).await;
    assert_eq!(listed, 0, "no index yet");
    assert_eq!(stop_listing(d).await, 1);

    // `a` rewritten in place, to the same length, with its access token ended a minute ago: no name
    // changes, so the listing holds, and the start refreshes `a` at once.
    let path = env.path("a.json");
    let text = String::from_utf8(env.token_bytes("a")).unwrap();
    let old = env.token("a").expires_at.unwrap();
    let ended = jiff::Timestamp::now() - jiff::SignedDuration::from_mins(1);
    let ended = ended.round(jiff::Unit::Second).unwrap();
    let edited = text.replace(&old.to_string(), &ended.to_string());
    assert_eq!(edited.len(), text.len());
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, edited.as_bytes(), 0).unwrap();
    drop(f);

    let (mut d, listed) = start_listing(&env).await;
    assert_eq!(listed, 1);
    d.wait_event(LONG, Some("a"), "refreshed").await;
    // The refresh kept the file it replaced and pruned to two by the recorded backups: the oldest
    // hand-made one went.
    let mut backups: Vec<String> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("a.json.2"))
        .collect();
    backups.sort();
    assert_eq!(backups.len(), 2, "{backups:?}");
    assert_eq!(backups[0], "a.json.20260102_000000", "{backups:?}");
    assert_eq!(stop_listing(d).await, 1);

    // A backup put there by hand is a new name: the folder is listed, and the listing kept anew.
    std::fs::write(env.path("b.json.20260103_000000"), &token).unwrap();
    let (d, listed) = start_listing(&env).await;
    assert_eq!(listed, 0);
    assert_eq!(stop_listing(d).await, 1);
    let (d, listed) = start_listing(&env).await;
    assert_eq!(listed, 1);
    stop_listing(d).await;
}

/// While it runs, the daemon brings the index up to date (`daemon.start_index_interval`), so that a
/// crash costs the next start only the files changed since: here none, after one account's token file
/// was replaced while it ran and the index written again with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_written_while_running_serves_the_start_after_a_crash() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("start_index_interval = \"2s\"", &["a", "b", "c"]);
    for name in ["a", "b", "c"] {
        env.login(name);
    }
    until_settled(env.dir.path()).await;
    let (mut d, from_index, _) = start(&env).await;
    assert_eq!(from_index, 0);
    // What the start read is written an interval later, without a stop.
    let written = d
        .wait_log(LONG, |v| {
            common::event(v) == "start_index_written" && v["reason"] == "interval"
        })
        .await;
    assert_eq!(written["accounts"].as_u64(), Some(3), "{written}");

    // `b` logs in again while the daemon runs: a new token file, which the daemon reads.
    let new = env.login("b").expires_at.unwrap().to_string();
    d.wait_log(LONG, |v| {
        common::event(v) == "scheduled" && account_of(v) == Some("b") && v["expires_at"] == new.as_str()
    })
    .await;
    // The next writes leave `b` out until its new file has settled, then keep it.
    d.wait_log(LONG, |v| {
        common::event(v) == "start_index_written" && v["reason"] == "interval" && v["accounts"] == 3
    })
    .await;
    d.signal(Signal::SIGKILL);
    d.wait_exit(LONG).await;

    let (d, from_index, scheduled) = start(&env).await;
    assert_eq!(from_index, 3);
    assert_eq!(expires_at_scheduled(&scheduled, "b"), new);
    stop(d).await;
}
