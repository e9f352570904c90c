//! The daemon end to end: the real binary against the fake Kakao over loopback.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Env, account_of, level, message};
use fake_kakao::{FakeEventKind, FakeSettings, Fault};
use kakao_tokend::store::{self, StateFile};
use nix::sys::signal::Signal;

use common::LONG;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_ahead_of_expiry_and_keeps_every_rotated_refresh_token() {
    // 3 s access tokens; refresh tokens live 12 s and rotate in their last 6 s.
    let env = Env::new(FakeSettings::fast(3, 12)).await;
    env.write_config("backups = 2", &["me"]);
    let first = env.login("me");
    let first_rt = first.refresh_token.clone().unwrap();
    let mut events = env.fake.subscribe();
    let mut d = env.spawn();

    // Two rotations: the daemon must store each new refresh token, or the next refresh gets KOE322.
    for _ in 0..2 {
        env.wait_fake(&mut events, LONG, |e| {
            matches!(e.kind, FakeEventKind::Issued { rotated: true, .. })
        })
        .await;
    }
    // Stop first: SIGTERM lets a refresh on the wire finish and be written, so the file is final.
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
    let stats = env.fake.stats();
    assert_eq!(stats.refused, 0, "{stats:?}");
    assert!(stats.rotations >= 2);
    assert!(
        !env.fake.refresh_token_alive(first_rt.expose()),
        "the fake must kill a rotated refresh token"
    );

    let file = env.token("me");
    assert!(
        env.fake
            .refresh_token_alive(file.refresh_token.as_ref().unwrap().expose()),
        "the file lost the rotated refresh token"
    );
    assert!(file.expires_at.is_some() && file.refresh_token_expires_at.is_some());
    let mode = std::fs::metadata(env.path("me.json")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Backups: at most 2, each 0600 and a complete token file.
    let backups = store::list_backups(&env.path("me.json")).unwrap();
    assert_eq!(backups.len(), 2, "{backups:?}");
    for b in &backups {
        assert_eq!(std::fs::metadata(b).unwrap().permissions().mode() & 0o777, 0o600);
        kakao_tokend::token::TokenFile::parse(&std::fs::read(b).unwrap()).unwrap();
    }
    // The state file says what happened.
    let state = store::AccountState::load(&env.path("me.json")).unwrap().unwrap();
    assert!(state.last_success_at().is_some());
    assert_eq!(state.consecutive_failures(), 0);
    assert!(!state.needs_login());

    // No secret reached the log.
    let log = d.all_lines().join("\n");
    assert!(!log.contains(file.access_token.expose()) && !log.contains(file.refresh_token.unwrap().expose()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_in_the_seeds_format_is_refreshed_at_once_and_rewritten_in_full_form() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["seed"]);
    let raw = env.fake.login(common::CLIENT_ID);
    let mut raw_with_extra = raw.clone();
    raw_with_extra["my_note"] = serde_json::json!("kept");
    std::fs::write(env.path("seed.json"), raw_with_extra.to_string()).unwrap();
    let mut d = env.spawn();
    d.wait_event(LONG, Some("seed"), "refreshed").await;
    let file = env.token("seed");
    assert!(file.expires_at.is_some());
    // Estimated from the file's mtime: within a few seconds of now + 7200 s.
    let rt_exp = file.refresh_token_expires_at.unwrap();
    let expected = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(7200);
    assert!(
        rt_exp.duration_since(expected).abs() < jiff::SignedDuration::from_secs(10),
        "{rt_exp}"
    );
    assert_eq!(
        file.refresh_token.unwrap().expose(),
        raw["refresh_token"].as_str().unwrap()
    );
    assert_eq!(file.extra["my_note"], "kept");
    // A long-lived token is not refreshed again.
    assert_eq!(env.fake.stats().refreshes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_ridden_out_with_backoff_and_the_file_is_never_damaged() {
    // 20 s tokens: backoff cap is 2 s.
    let env = Env::new(FakeSettings::fast(20, 3600)).await;
    env.write_config("refresh_before_expiry = \"95%\"", &["me", "other"]);
    env.login("me");
    env.login("other");
    env.fake.set_fault(Some(Fault::ServerError(503)));
    let before = env.token_bytes("me");
    let mut d = env.spawn();
    // The first refresh is due at once (95 % of 20 s is 19 s): it meets the outage.
    d.wait_event(LONG, Some("me"), "refresh_failed").await;
    let outage_start = std::time::Instant::now();
    let start_requests = env.fake.stats().token_requests;
    // Ride the outage through several backoff steps: until the fake has refused six more requests
    // (three per account), awaited one by one; retries that stopped would fail the wait.
    let mut faults = env.fake.subscribe();
    for _ in 0..6 {
        env.wait_fake(&mut faults, LONG, |e| e.kind == FakeEventKind::Faulted)
            .await;
    }
    let during = env.fake.stats().token_requests - start_requests;
    let secs = outage_start.elapsed().as_secs_f64();
    // Two accounts, backoff 1 s, 2 s, 2 s...: at most one request per second each (and the two that
    // were on their way when the count began).
    assert!((during as f64) <= 2.0 * secs + 2.0, "{during} requests in {secs:.1}s");
    assert_eq!(env.token_bytes("me"), before, "the file changed during the outage");
    // Repeated identical failures are logged once at warn, then at debug.
    let warns = d
        .events()
        .iter()
        .filter(|v| level(v) == "WARN" && account_of(v) == Some("me") && common::event(v) == "refresh_failed")
        .count();
    assert_eq!(warns, 1);

    env.fake.set_fault(None);
    let recovered = std::time::Instant::now();
    d.wait_event(LONG, Some("me"), "refreshed").await;
    // Within one backoff step (cap 2 s) of the end.
    assert!(
        recovered.elapsed() < Duration::from_secs(5),
        "{:?}",
        recovered.elapsed()
    );
    d.wait_event(LONG, Some("other"), "refreshed").await;
    assert!(env.fake.access_token_valid(env.token("me").access_token.expose()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_refresh_token_parks_the_account_until_its_file_changes_and_others_carry_on() {
    let env = Env::new(FakeSettings::fast(3, 3600)).await;
    env.write_config("", &["gone", "fine"]);
    let gone = env.login("gone");
    env.login("fine");
    // The user unlinked the app: the refresh token dies (KOE322 at the next refresh).
    assert!(env.fake.unlink_user_of(gone.refresh_token.as_ref().unwrap().expose()));
    let before = env.token_bytes("gone");
    let mut d = env.spawn();
    let e = d.wait_event(LONG, Some("gone"), "refresh_refused").await;
    assert_eq!(level(&e), "ERROR");
    assert!(message(&e).contains("KOE322"), "{e}");
    assert!(message(&e).contains("kakao-tokend login --account gone"), "{e}");
    let refused_at = env.fake.stats().refused;
    let state = store::AccountState::load(&env.path("gone.json")).unwrap().unwrap();
    assert!(state.needs_login());
    assert_eq!(state.last_error_code(), Some("KOE322"));

    // Meanwhile the other account refreshes as usual, several times.
    for _ in 0..3 {
        d.wait_event(LONG, Some("fine"), "refreshed").await;
    }
    assert_eq!(env.fake.stats().refused, refused_at, "the parked account kept asking");
    assert_eq!(
        env.token_bytes("gone"),
        before,
        "a refused account's file must stay as it was"
    );

    // A new login written by someone else is adopted without a restart.
    env.login("gone");
    d.wait_event(LONG, Some("gone"), "adopted").await;
    d.wait_event(LONG, Some("gone"), "refreshed").await;
    let state = store::AccountState::load(&env.path("gone.json")).unwrap().unwrap();
    assert!(!state.needs_login());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_someone_breaks_is_left_alone_reported_once_and_adopted_when_fixed() {
    let env = Env::new(FakeSettings::fast(3, 3600)).await;
    env.write_config("", &["me"]);
    env.login("me");
    let mut d = env.spawn();
    d.wait_event(LONG, Some("me"), "refreshed").await;
    let requests = env.fake.stats().token_requests;

    // Someone puts garbage in its place, three kinds in turn.
    let garbage: [&[u8]; 3] = [b"{\"access_token\": 42}", b"\x00\xff not json", b""];
    for junk in garbage {
        std::fs::write(env.path("junk"), junk).unwrap();
        std::fs::rename(env.path("junk"), env.path("me.json")).unwrap();
        d.wait_log(LONG, |v| {
            account_of(v) == Some("me") && message(v).contains("is left as it is")
        })
        .await;
        assert_eq!(
            env.token_bytes("me"),
            junk,
            "the daemon wrote over a file it could not read"
        );
    }
    assert_eq!(
        env.fake.stats().token_requests,
        requests,
        "it refreshed from a file it could not read"
    );
    let errors: Vec<String> = d
        .events()
        .iter()
        .filter(|v| account_of(v) == Some("me") && level(v) == "ERROR")
        .map(|v| message(v).to_owned())
        .collect();
    // One line per distinct problem, each naming the file and the way out.
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("me.json") && e.contains("kakao-tokend login --account me"))
    );

    // A good file (a restored backup, a new login) is picked up without a restart.
    env.login("me");
    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert!(env.fake.access_token_valid(env.token("me").access_token.expose()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_accounts_and_a_broken_config_keeps_the_running_one() {
    let env = Env::new(FakeSettings::fast(3, 3600)).await;
    env.write_config("", &["a"]);
    env.login("a");
    env.login("b");
    let mut d = env.spawn();
    d.wait_event(LONG, Some("a"), "refreshed").await;

    env.write_config("", &["b"]);
    d.signal(Signal::SIGHUP);
    d.wait_event(LONG, None, "reloaded").await;
    d.wait_event(LONG, Some("b"), "refreshed").await;
    let a_after = env.token_bytes("a");

    // A broken config: logged, and the running one stays.
    std::fs::write(&env.config, "[daemon]\nbackups = \"many\"\n").unwrap();
    d.signal(Signal::SIGHUP);
    let e = d.wait_event(LONG, None, "reload_failed").await;
    assert!(message(&e).contains("backups"), "{e}");
    for _ in 0..2 {
        d.wait_event(LONG, Some("b"), "refreshed").await;
    }
    assert_eq!(env.token_bytes("a"), a_after, "a removed account was refreshed");
    d.signal(Signal::SIGINT);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_and_writes_a_refresh_already_on_the_wire() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["me"]);
    // A seed-format file is refreshed at once; the fake takes 2 s to answer it.
    let raw = env.fake.login(common::CLIENT_ID);
    std::fs::write(env.path("me.json"), raw.to_string()).unwrap();
    env.fake.push_fault(Fault::Delay(Duration::from_secs(2)));
    let mut events = env.fake.subscribe();
    let mut d = env.spawn();
    env.wait_fake(&mut events, LONG, |e| e.kind == FakeEventKind::Faulted)
        .await;
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
    // The answer (a new access token) was written, in full form, before the exit.
    let file = env.token("me");
    assert!(file.expires_at.is_some());
    assert_ne!(file.access_token.expose(), raw["access_token"].as_str().unwrap());
    assert!(env.fake.access_token_valid(file.access_token.expose()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nothing_in_flight_exits_at_once() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["me"]);
    env.login("me");
    let mut d = env.spawn();
    d.wait_event(LONG, None, "started").await;
    let t = std::time::Instant::now();
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(env.fake.stats().token_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_and_the_refresh_command_on_one_token_file_never_lose_a_rotation() {
    // Every refresh rotates: any two refreshes with the same token would get KOE322 for the second.
    let env = Env::new(FakeSettings {
        rotate_within: 3600,
        ..FakeSettings::fast(2, 3600)
    })
    .await;
    env.write_config("refresh_before_expiry = \"50%\"", &["me"]);
    env.login("me");
    let mut d1 = env.spawn();
    let mut d2 = env.spawn();
    // Two people running `kakao-tokend refresh` over and over while both daemons work.
    let mut rng = common::seeded_rng("two_daemons_and_the_refresh_command");
    let people: Vec<_> = (0..2)
        .map(|_| {
            let config = env.config.clone();
            let mut rng = fastrand::Rng::with_seed(rng.u64(..));
            tokio::task::spawn_blocking(move || {
                let mut refreshed = 0u64;
                for _ in 0..20 {
                    let out = common::output_swept(
                        std::process::Command::new(common::BIN)
                            .args(["refresh", "--account", "me", "--config"])
                            .arg(&config),
                        false,
                    );
                    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
                    refreshed += u64::from(String::from_utf8_lossy(&out.stdout).contains("me: refreshed"));
                    // A person's pace, not a wait for anything.
                    std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
                }
                refreshed
            })
        })
        .collect();
    let mut by_commands = 0;
    for p in people {
        by_commands += p.await.unwrap();
    }
    d1.signal(Signal::SIGTERM);
    d2.signal(Signal::SIGTERM);
    assert_eq!(d1.wait_exit(LONG).await.code(), Some(0));
    assert_eq!(d2.wait_exit(LONG).await.code(), Some(0));
    let stats = env.fake.stats();
    assert_eq!(
        stats.refused, 0,
        "someone used a refresh token another had rotated away: {stats:?}"
    );
    assert_eq!(stats.rotations, stats.refreshes);
    assert!(env.fake.refresh_token_alive(&env.refresh_token("me")));
    // Every refresh the fake answered was written by exactly one of them: none was done twice.
    let by_daemons = [&d1, &d2]
        .iter()
        .map(|d| d.events().iter().filter(|v| common::event(v) == "refreshed").count() as u64)
        .sum::<u64>();
    assert_eq!(by_commands, 40);
    assert!(by_daemons >= 2, "the daemons hardly ran: {by_daemons}");
    assert_eq!(by_daemons + by_commands, stats.refreshes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_temp_files_are_removed_at_start_and_nothing_else() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["me"]);
    env.login("me");
    for f in [
        ".me.json.tmp-AbC123",
        ".me.json.state.tmp-x",
        "notes.txt",
        "me.json.bak",
    ] {
        std::fs::write(env.path(f), "x").unwrap();
    }
    let mut d = env.spawn();
    d.wait_event(LONG, Some("me"), "temp_files_removed").await;
    assert!(!env.path(".me.json.tmp-AbC123").exists());
    assert!(!env.path(".me.json.state.tmp-x").exists());
    assert!(env.path("notes.txt").exists() && env.path("me.json.bak").exists());
}

#[test]
fn a_broken_config_exits_78_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[daemon]\nlog_formt = \"json\"\n").unwrap();
    let out = common::output_swept(
        std::process::Command::new(common::BIN)
            .args(["run", "--config"])
            .arg(&path),
        false,
    );
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log_formt") && err.contains("bad.toml"), "{err}");

    // --config may come before the subcommand, and the environment variable works too.
    let out = common::output_swept(
        std::process::Command::new(common::BIN)
            .arg("--config")
            .arg(dir.path().join("missing.toml"))
            .arg("run"),
        false,
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    let out = common::output_swept(
        std::process::Command::new(common::BIN)
            .arg("run")
            .env("KAKAO_TOKEND_CONFIG", &path),
        false,
    );
    assert_eq!(out.status.code(), Some(78));

    // An environment override is checked like the file.
    std::fs::write(&path, "[daemon]\n").unwrap();
    let out = common::output_swept(
        std::process::Command::new(common::BIN)
            .args(["run", "--config"])
            .arg(&path)
            .env("KAKAO_TOKEND__DAEMON__LOG_FORMAT", "xml"),
        false,
    );
    assert_eq!(out.status.code(), Some(78));
    // The key and where it came from, never the value (a config error may reach a journal).
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("daemon.log_format") && said.contains("environment"),
        "{said}"
    );
    assert!(!said.contains("xml"), "{said}");

    // A usage error is 2.
    let out = common::output_swept(std::process::Command::new(common::BIN).arg("frobnicate"), false);
    assert_eq!(out.status.code(), Some(2));
}

/// Tokens live in the daemon's memory: it marks itself non-dumpable, so no core file holds them and
/// another process of the same user cannot read its memory. The kernel then hands /proc/PID/ to root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_is_not_dumpable() {
    use std::os::unix::fs::MetadataExt;
    if !common::can_run_as_root("the_daemon_is_not_dumpable") {
        return;
    }
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["me"]);
    env.login("me");
    for entry in std::fs::read_dir(env.dir.path()).unwrap() {
        std::os::unix::fs::chown(entry.unwrap().path(), Some(common::NONROOT), Some(common::NONROOT)).unwrap();
    }
    std::os::unix::fs::chown(env.dir.path(), Some(common::NONROOT), Some(common::NONROOT)).unwrap();
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut d = common::Daemon::from_command(common::as_nonroot(&["run"], &env.config));
    d.wait_event(LONG, None, "started").await;
    let mem = std::fs::metadata(format!("/proc/{}/mem", d.pid())).unwrap();
    assert_eq!(
        mem.uid(),
        0,
        "the daemon's /proc/PID/mem belongs to its user: it is dumpable"
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

/// inotify breaks while a refresh is in flight, and cannot be started again: the daemon stops with an
/// error, but only after the refresh is answered and written, since its rotated refresh token exists
/// nowhere else. (Failpoints make inotify fail; see src/failpoint.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_inotify_stops_the_daemon_only_after_the_refresh_in_flight_is_written() {
    let env = Env::new(FakeSettings {
        // Every refresh rotates.
        rotate_within: 3600,
        ..FakeSettings::fast(3, 3600)
    })
    .await;
    env.write_config("", &["me"]);
    env.login("me");
    let old = env.refresh_token("me");
    env.fake.set_fault(Some(Fault::Delay(Duration::from_secs(2))));
    let mut fake_events = env.fake.subscribe();
    let mut d = common::Daemon::spawn(
        &env.config,
        &[("KAKAO_TOKEND_FAILPOINTS", "inotify_fails,inotify_restart_fails")],
    );
    // The request has arrived; its answer is held 2 s. Now a file changes in the folder, and inotify fails.
    env.wait_fake(&mut fake_events, LONG, |e| e.kind == FakeEventKind::Faulted)
        .await;
    std::fs::write(env.path(kakao_tokend::failpoint::INOTIFY_FAILS_TRIGGER), b"x").unwrap();
    assert_eq!(d.wait_exit(LONG).await.code(), Some(1));
    let log = d.all_lines().join("\n");
    assert!(log.contains("cannot start inotify again"), "{log}");
    let new = env.refresh_token("me");
    assert_ne!(new, old, "the rotated refresh token was dropped at the exit");
    assert!(env.fake.refresh_token_alive(&new));
    assert!(!env.fake.refresh_token_alive(&old));
}

/// A storm: every account due within a second or two, each request slow at the provider. The daemon
/// keeps at most `max_concurrent_refreshes` requests in flight, reaches every account, and none is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_due_accounts_stays_within_the_concurrency_bound_and_reaches_every_account() {
    const ACCOUNTS: usize = 24;
    const BOUND: u64 = 3;
    // 2 s access tokens: every account is due by the time the daemon has started.
    let env = Env::new(FakeSettings::fast(2, 3600)).await;
    let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("a{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    env.write_config(&format!("max_concurrent_refreshes = {BOUND}"), &refs);
    for name in &names {
        env.login(name);
    }
    // Each request takes 150 ms at the provider: requests overlap whenever the daemon lets them.
    env.fake.set_fault(Some(Fault::Delay(Duration::from_millis(150))));
    let mut d = env.spawn();
    let mut refreshed = std::collections::BTreeSet::new();
    while refreshed.len() < ACCOUNTS {
        let line = d.wait_event(LONG, None, "refreshed").await;
        refreshed.insert(account_of(&line).unwrap().to_owned());
    }
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
    let stats = env.fake.stats();
    assert!(
        stats.max_in_flight <= BOUND,
        "more requests in flight than the bound: {stats:?}"
    );
    // The bound was reached, not merely respected by running one at a time.
    assert_eq!(stats.max_in_flight, BOUND, "{stats:?}");
    assert_eq!((stats.koe322, stats.refused), (0, 0), "{stats:?}");
}
