//! The wall clock jumping under the real binary, through Debian's libfaketime: the daemon's wall clock
//! is moved while its monotonic clock runs on, which is what a suspend (the monotonic clock stops, the
//! wall clock does not) or a clock step looks like from inside. The fake Kakao keeps real time.
//!
//! These need libfaketime, which a fresh machine lacks: there they print `SKIPPED` and pass (the account
//! machine's unit tests cover the same rules without it), except under CI=true, where they fail.
//! `.ci/run` installs Debian's `faketime` before the tests run.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, Daemon, Env};
use fake_kakao::FakeSettings;
use nix::sys::signal::Signal;

/// Longer than the common limit: a refresh here may wait out a whole 30 s token.
const LONG: Duration = Duration::from_secs(common::LONG.as_secs() + 10);
/// 30 s access tokens refreshed at half-life: due 15 s after issue, when nothing jumps.
const ACCESS_TTL: u64 = 30;

/// libfaketime's thread-safe build, from Debian's `faketime` package.
fn libfaketime() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
}

/// Whether the clock tests can run here: `SKIPPED` without libfaketime, a failure under CI=true.
fn can_run() -> bool {
    common::can_run(
        "the clock tests",
        libfaketime()
            .is_none()
            .then(|| "needs libfaketime (Debian: apt-get install faketime; .ci/run installs it)".to_string()),
    )
}

/// The daemon with its wall clock offset by what `offset_file` says ("+0", "-2h", ...), re-read at
/// every call, and its monotonic clock left alone.
fn spawn_with_fake_wall_clock(env: &Env, offset_file: &Path) -> Daemon {
    set_offset(offset_file, "+0");
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&env.config)
        .env("LD_PRELOAD", libfaketime().expect("checked by can_run"))
        .env("FAKETIME_TIMESTAMP_FILE", offset_file)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    Daemon::from_command(cmd)
}

/// A run under way: the account logged in, the daemon started with a fake wall clock (at "+0") and the
/// account scheduled.
struct Run {
    env: Env,
    offset: PathBuf,
    d: Daemon,
    /// When the token the daemon started with was issued.
    issued: Instant,
    first: kakao_tokend::token::TokenFile,
}

async fn start() -> Run {
    let env = Env::new(FakeSettings::fast(ACCESS_TTL, 3600)).await;
    env.write_config(
        "refresh_before_expiry = \"50%\"\nclock_check_interval = \"1s\"",
        &["me"],
    );
    let offset = env.path("faketime");
    let issued = Instant::now();
    let first = env.login("me");
    let mut d = spawn_with_fake_wall_clock(&env, &offset);
    wait_started_and_scheduled(&mut d).await;
    Run {
        env,
        offset,
        d,
        issued,
        first,
    }
}

/// Waits until the daemon has started (its clocks' baseline is taken) and scheduled the account.
async fn wait_started_and_scheduled(d: &mut Daemon) {
    d.wait_event(LONG, None, "started").await;
    let scheduled = |v: &serde_json::Value| common::event(v) == "scheduled";
    if !d.events().iter().any(scheduled) {
        d.wait_log(LONG, scheduled).await;
    }
}

/// Sets the daemon's clock offset. Written whole, by rename: libfaketime re-reads the file at every call,
/// and must never find it empty half-way through a write.
fn set_offset(offset_file: &Path, spec: &str) {
    let tmp = offset_file.with_extension("new");
    std::fs::write(&tmp, spec).unwrap();
    std::fs::rename(&tmp, offset_file).unwrap();
}

/// The daemon's own log lines (not the HTTP stack's), for a failure message.
fn own_log(d: &Daemon) -> String {
    d.events()
        .iter()
        .filter(|v| v["target"].as_str().is_some_and(|t| t.starts_with("kakao_tokend")))
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// CPU time the process has used, from /proc.
fn cpu_time(d: &Daemon) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", d.pid())).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap() as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_set_back_two_hours_does_not_delay_the_refresh() {
    if !can_run() {
        return;
    }
    let Run {
        env,
        offset,
        mut d,
        issued,
        first: old,
    } = start().await;

    set_offset(&offset, "-2h");
    let jump = d.wait_event(LONG, None, "clock_jumped").await;
    let drift = jump["drift_secs"].as_i64().unwrap();
    assert!((drift + 7200).abs() <= 2, "{jump}");
    let cpu_before = cpu_time(&d);

    // Still refreshed at half-life in real time, before the token dies: following the wall clock
    // would have put the refresh two hours off.
    d.wait_event(LONG, Some("me"), "refreshed").await;
    let at = issued.elapsed();
    assert!(
        at < Duration::from_secs(ACCESS_TTL),
        "refreshed {at:?} after issue; log:\n{}",
        own_log(&d)
    );
    assert!(env.fake.access_token_valid(env.token("me").access_token.expose()));
    assert_ne!(env.token("me").access_token, old.access_token);
    // Waiting for it cost next to nothing: no task spun on the clock's news.
    let spent = cpu_time(&d) - cpu_before;
    assert!(
        spent < Duration::from_secs(2),
        "{spent:?} of CPU while idle after the jump"
    );

    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_set_back_then_a_reload_of_the_same_file_does_not_delay_the_refresh() {
    if !can_run() {
        return;
    }
    let Run {
        env,
        offset,
        mut d,
        issued,
        ..
    } = start().await;
    set_offset(&offset, "-2h");
    d.wait_event(LONG, None, "clock_jumped").await;

    // The reload re-reads the file, whose times are in the old reckoning: two hours ahead of the clock.
    d.signal(Signal::SIGHUP);
    d.wait_event(LONG, None, "reloaded").await;
    let scheduled = d.wait_log(LONG, |v| common::event(v) == "scheduled").await;
    d.wait_event(LONG, Some("me"), "refreshed").await;
    let at = issued.elapsed();
    assert!(
        at < Duration::from_secs(ACCESS_TTL),
        "refreshed {at:?} after issue; {scheduled}"
    );
    assert!(env.fake.access_token_valid(env.token("me").access_token.expose()));

    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspend_longer_than_the_token_refreshes_at_once_on_waking() {
    if !can_run() {
        return;
    }
    let Run {
        env,
        offset,
        mut d,
        issued,
        ..
    } = start().await;

    // An hour asleep, as the daemon sees it: the wall clock leaps past the token's whole life.
    set_offset(&offset, "+1h");
    let jump = d.wait_event(LONG, None, "clock_jumped").await;
    assert!((jump["drift_secs"].as_i64().unwrap() - 3600).abs() <= 2, "{jump}");
    let refreshed = d.wait_event(LONG, Some("me"), "refreshed").await;
    let at = issued.elapsed();
    assert!(
        at < Duration::from_secs(ACCESS_TTL / 2 - 3),
        "refreshed {at:?} after issue: not at once on waking; log:\n{}",
        own_log(&d)
    );
    // The new file's times are in the clock's new reckoning, and the next refresh is a half-life away
    // in it, not straight away again.
    let file = env.token("me");
    let expires = file.expires_at.unwrap();
    let woken_now = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    assert!(expires > woken_now, "{expires} is not ahead of {woken_now}");
    let next: jiff::Timestamp = refreshed["next_refresh"].as_str().unwrap().parse().unwrap();
    assert!(
        next >= expires - jiff::SignedDuration::from_secs(ACCESS_TTL as i64 / 2 + 2),
        "{next}"
    );
    assert!(env.fake.access_token_valid(file.access_token.expose()));

    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}
