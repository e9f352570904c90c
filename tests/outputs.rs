//! What other programs get after each write: an env file, shared modes and groups, and hooks run with a
//! clean environment, under a timeout, without holding anything up.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::{Daemon, Env, message};
use kakao_tokend::fake::FakeSettings;
use kakao_tokend::store;
use nix::sys::signal::Signal;

const LONG: Duration = Duration::from_secs(30);
const NOGROUP: u32 = 65534;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_file_modes_groups_and_a_hook_with_a_clean_environment() {
    let env = Env::new(FakeSettings::fast(3, 3600)).await;
    let hook_out = env.path("hook.out");
    let mut config = format!("[daemon]\nbackups = 2\n\n{}", env.account("me"));
    config.push_str(&format!(
        "env_file = \"me.env\"\nfile_mode = \"0640\"\nfile_group = \"{NOGROUP}\"\non_refresh = [\"/bin/sh\", \"-c\", \"env > {}\"]\n",
        hook_out.display()
    ));
    std::fs::write(&env.config, config).unwrap();
    env.login("me");
    let mut d = Daemon::spawn(
        &env.config,
        &[
            ("KAKAO_TOKEND__ACCOUNTS__ME__CLIENT_SECRET", "topsecret-value"),
            ("NOTIFY_SOCKET", "/nonexistent"),
        ],
    );
    d.wait_message(LONG, Some("me"), "on_refresh hook ran").await;
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));

    let hook_env = std::fs::read_to_string(&hook_out).unwrap();
    assert!(hook_env.contains("KAKAO_TOKEND_ACCOUNT=me\n"), "{hook_env}");
    assert!(hook_env.contains(&format!("KAKAO_TOKEND_TOKEN_FILE={}\n", env.path("me.json").display())));
    assert!(hook_env.contains(&format!("KAKAO_TOKEND_ENV_FILE={}\n", env.path("me.env").display())));
    for withheld in ["topsecret-value", "KAKAO_TOKEND__", "NOTIFY_SOCKET"] {
        assert!(!hook_env.contains(withheld), "{withheld} reached the hook");
    }

    let token = env.token("me");
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
    let mut config = String::from("[daemon]\nhook_timeout = \"1s\"\n\n");
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
    let e = d.wait_message(LONG, Some("broken"), "on_refresh hook failed").await;
    assert!(message(&e).contains("oops") && message(&e).contains("3"), "{e}");
    d.wait_message(LONG, Some("slow"), "did not finish within 1s").await;
    // While the slow hook hung, its own account and the others kept refreshing.
    let refreshed = |who: &str| {
        d.events()
            .iter()
            .filter(|v| message(v) == "refreshed" && common::account_of(v) == Some(who))
            .count()
    };
    assert!(
        refreshed("slow") >= 2 && refreshed("plain") >= 2,
        "slow {} plain {}",
        refreshed("slow"),
        refreshed("plain")
    );
}
