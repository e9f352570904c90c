//! What other programs get after each write: an env file, shared modes and groups, and hooks run with a
//! clean environment, under a timeout, without holding anything up.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{Daemon, Env, message};
use fake_kakao::FakeSettings;
use kakao_tokend::store;
use nix::sys::signal::Signal;

use common::LONG;
use std::time::Duration;
const NOGROUP: u32 = 65534;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_file_modes_groups_and_a_hook_with_a_clean_environment() {
    let env = Env::new(FakeSettings::fast(3, 3600)).await;
    let hook_out = env.path("hook.out");
    let mut config = format!("[daemon]\nbackups = 2\n\n{}", env.account("me"));
    config.push_str(&format!(
        "env_file = \"me.env\"\nfile_mode = \"0640\"\nfile_group = \"{NOGROUP}\"\non_refresh = [\"/bin/sh\", \"-c\", \"env > {}; cat $KAKAO_TOKEND_TOKEN_FILE\"]\n",
        hook_out.display()
    ));
    std::fs::write(&env.config, config).unwrap();
    env.login("me");
    let mut d = Daemon::spawn(
        &env.config,
        &[
            ("KAKAO_TOKEND__ACCOUNTS__ME__CLIENT_SECRET", common::CLIENT_SECRET),
            ("NOTIFY_SOCKET", "/nonexistent"),
        ],
    );
    d.wait_event(LONG, Some("me"), "hook_ran").await;
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));

    let hook_env = std::fs::read_to_string(&hook_out).unwrap();
    assert!(hook_env.contains("KAKAO_TOKEND_ACCOUNT=me\n"), "{hook_env}");
    assert!(hook_env.contains(&format!("KAKAO_TOKEND_TOKEN_FILE={}\n", env.path("me.json").display())));
    assert!(hook_env.contains(&format!("KAKAO_TOKEND_ENV_FILE={}\n", env.path("me.env").display())));
    for withheld in [common::CLIENT_SECRET, "KAKAO_TOKEND__", "NOTIFY_SOCKET"] {
        assert!(!hook_env.contains(withheld), "{withheld} reached the hook");
    }

    let token = env.token("me");
    // The hook printed the token file; the log shows its output scrubbed.
    let log = d.all_lines().join("\n");
    assert!(
        log.contains("on_refresh hook ran") && log.contains("[redacted]"),
        "{log}"
    );
    for t in [
        token.access_token.expose(),
        token.refresh_token.as_ref().unwrap().expose(),
    ] {
        assert!(!log.contains(t), "a token reached the log");
    }
    let env_file = std::fs::read_to_string(env.path("me.env")).unwrap();
    assert!(
        env_file.starts_with(&format!("KAKAO_ACCESS_TOKEN={}\n", token.access_token.expose())),
        "{env_file}"
    );
    for f in ["me.json", "me.env"] {
        let meta = std::fs::metadata(env.path(f)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640, "{f}");
        assert_eq!(meta.gid(), NOGROUP, "{f}");
    }
    for b in store::list_backups(&env.path("me.json")).unwrap() {
        assert_eq!(
            std::fs::metadata(&b).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            b.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_or_failing_hook_is_logged_and_holds_nothing_up() {
    let env = Env::new(FakeSettings::fast(3, 3600)).await;
    let mut config = String::from("[daemon]\nhook_timeout = \"8s\"\n\n");
    config.push_str(&env.account("slow"));
    config.push_str("on_refresh = [\"/bin/sleep\", \"30\"]\n\n");
    config.push_str(&env.account("broken"));
    config.push_str("on_refresh = [\"/bin/sh\", \"-c\", \"echo oops; exit 3\"]\n\n");
    config.push_str(&env.account("plain"));
    std::fs::write(&env.config, config).unwrap();
    for a in ["slow", "broken", "plain"] {
        env.login(a);
    }
    let mut d = Daemon::spawn(&env.config, &[]);
    let e = d.wait_event(LONG, Some("broken"), "hook_failed").await;
    assert!(message(&e).contains("oops") && message(&e).contains("3"), "{e}");
    let e = d.wait_event(LONG, Some("slow"), "hook_failed").await;
    // Everything logged before the first hook was killed happened while it hung: its own account and
    // the others kept refreshing meanwhile.
    let lines = d.all_lines();
    let killed_at = lines.iter().position(|l| l.contains(message(&e))).unwrap();
    let before: Vec<serde_json::Value> = lines[..killed_at]
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let refreshed = |who: &str| {
        before
            .iter()
            .filter(|v| common::event(v) == "refreshed" && common::account_of(v) == Some(who))
            .count()
    };
    assert!(
        refreshed("slow") >= 3 && refreshed("plain") >= 3,
        "slow {} plain {}",
        refreshed("slow"),
        refreshed("plain")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_near_its_end_without_a_successor_is_reported_by_log_and_message() {
    // The provider never rotates refresh tokens, and this one (issued for Kakao's 60 days) has 3 left.
    let env = Env::new(FakeSettings {
        rotate_within: 0,
        ..FakeSettings::fast(3, 3600)
    })
    .await;
    let mut config = format!("[daemon]\n\n{}", env.account("me"));
    config.push_str("notify_by_message = true\nmessage_link = \"https://example.com\"\n");
    std::fs::write(&env.config, config).unwrap();
    let mut file = env.login("me");
    file.refresh_token_expires_in = Some(5184000);
    file.refresh_token_expires_at = Some(jiff::Timestamp::now() + jiff::SignedDuration::from_hours(72));
    std::fs::write(env.path("me.json"), file.to_bytes()).unwrap();
    let mut d = Daemon::spawn(&env.config, &[]);
    let e = d.wait_event(LONG, Some("me"), "refresh_token_expiring").await;
    assert_eq!(common::level(&e), "WARN");
    assert!(message(&e).contains("kakao-tokend login --account me"));
    d.wait_event(LONG, Some("me"), "alert_sent").await;
    let sent = env.fake.messages();
    assert_eq!(sent.len(), 1, "one alert per refresh token, not one per refresh");
    let text = sent[0].1["text"].as_str().unwrap();
    assert!(
        text.contains("kakao-tokend login --account me") && text.chars().count() <= 200,
        "{text}"
    );
    // Later refreshes of the same refresh token raise nothing new.
    for _ in 0..2 {
        d.wait_event(LONG, Some("me"), "refreshed").await;
    }
    assert_eq!(env.fake.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_refresh_token_is_reported_by_message_while_the_access_token_works() {
    // The refresh token dies after a second; the access token works for a minute and is refreshed
    // when 90 % of it is left (6 s in), by which time the refresh token is dead: KOE322.
    let env = Env::new(FakeSettings {
        access_ttl: 60,
        refresh_ttl: 1,
        rotate_within: 0,
        ..FakeSettings::default()
    })
    .await;
    let mut config = format!("[daemon]\nrefresh_before_expiry = \"90%\"\n\n{}", env.account("me"));
    config.push_str("notify_by_message = true\n");
    std::fs::write(&env.config, config).unwrap();
    env.login("me");
    let mut d = Daemon::spawn(&env.config, &[]);
    let e = d.wait_event(LONG, Some("me"), "refresh_token_dead").await;
    assert!(message(&e).contains("kakao-tokend login --account me"), "{e}");
    let deadline = tokio::time::Instant::now() + LONG;
    while !env
        .fake
        .messages()
        .iter()
        .any(|(_, t)| t["text"].as_str().unwrap_or_default().contains("만료되었습니다"))
    {
        d.wait_event(deadline - tokio::time::Instant::now(), Some("me"), "alert_sent")
            .await;
    }
}

/// Processes whose command line is exactly `argv`, from /proc.
fn processes_running(argv: &[&str]) -> usize {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| *c == want)
        .count()
}

/// A hostile hook: it starts a background child and outlives its timeout, then another prints 10 MB.
/// The timeout kills the hook's whole process group, grandchild included; a chatty hook's output is
/// read to its end but only 64 KiB of it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_timeout_kills_its_whole_process_group() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    let mut config = String::from("[daemon]\nhook_timeout = \"1s\"\n\n");
    config.push_str(&env.account("me").replace(
        "[accounts.me]\n",
        "[accounts.me]\non_refresh = [\"sh\", \"-c\", \"sleep 3737 & sleep 3738\"]\n",
    ));
    config.push_str(&env.account("chatty").replace(
        "[accounts.chatty]\n",
        "[accounts.chatty]\non_refresh = [\"sh\", \"-c\", \"head -c 10000000 /dev/zero | tr '\\\\0' a; exit 3\"]\n",
    ));
    std::fs::write(&env.config, config).unwrap();
    // Seed-format files: each is refreshed at once, and its hook runs.
    for name in ["me", "chatty"] {
        std::fs::write(
            env.path(&format!("{name}.json")),
            env.fake.login(common::CLIENT_ID).to_string(),
        )
        .unwrap();
    }
    let mut d = env.spawn();
    let chatty = d.wait_event(LONG, Some("chatty"), "hook_failed").await;
    assert!(message(&chatty).contains("exit status: 3"), "{chatty}");
    let e = d.wait_event(LONG, Some("me"), "hook_failed").await;
    assert!(message(&e).contains("killed"), "{e}");
    // SIGKILL is sent to the group before the line is logged, but a killed process leaves /proc only
    // once it has been scheduled to die: a survivor would stay for an hour.
    for (argv, what) in [
        (["sleep", "3738"], "the hook itself survived"),
        (["sleep", "3737"], "the hook's background child survived its timeout"),
    ] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while processes_running(&argv) > 0 {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}
