//! systemd integration of the real binary: the notify protocol over a real unix datagram socket, and
//! `run --once` for init containers and cron.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixDatagram;

use common::{Daemon, Env};
use fake_kakao::FakeSettings;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use common::LONG;

/// Receives every datagram sent to `NOTIFY_SOCKET`, one message per datagram.
fn listen(sock: UnixDatagram) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            if tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

async fn expect(rx: &mut mpsc::UnboundedReceiver<String>, pred: impl Fn(&str) -> bool, what: &str) -> String {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) if pred(&m) => return m,
            Ok(Some(_)) => {}
            _ => panic!("no {what} from the daemon"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_reload_watchdog_status_and_stop_over_a_real_notify_socket() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["me", "gone"]);
    env.login("me");
    let sock_path = env.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut rx = listen(sock);
    let socket = sock_path.to_string_lossy().into_owned();
    let mut d = Daemon::spawn(&env.config, &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "400000")]);

    // READY=1 comes once every account is loaded and scheduled (or parked, as "gone" has no file).
    let ready = expect(&mut rx, |m| m.contains("READY=1"), "READY=1").await;
    assert!(
        ready.contains("STATUS=2 accounts: 1 valid, 1 need attention; next refresh "),
        "{ready}"
    );
    d.wait_event(LONG, Some("gone"), "token_file_missing").await;

    // The watchdog is pinged at half of WATCHDOG_USEC.
    for _ in 0..3 {
        expect(&mut rx, |m| m.lines().any(|l| l == "WATCHDOG=1"), "WATCHDOG=1").await;
    }

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again with the new account count.
    env.write_config("", &["me"]);
    d.signal(Signal::SIGHUP);
    let reloading = expect(&mut rx, |m| m.contains("RELOADING=1"), "RELOADING=1").await;
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC missing")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready = expect(&mut rx, |m| m.contains("READY=1"), "READY=1 after reload").await;
    assert!(ready.contains("STATUS=1 accounts: 1 valid"), "{ready}");

    d.signal(Signal::SIGTERM);
    expect(&mut rx, |m| m.contains("STOPPING=1"), "STOPPING=1").await;
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_refreshes_what_is_due_and_force_refreshes_everything() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["fresh", "stale"]);
    let fresh = env.login("fresh");
    let mut stale = env.login("stale");
    stale.expires_at = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1));
    std::fs::write(env.path("stale.json"), stale.to_bytes()).unwrap();

    let run = |args: &'static [&'static str]| {
        let config = env.config.clone();
        tokio::task::spawn_blocking(move || {
            common::output_swept(
                std::process::Command::new(common::BIN)
                    .args(args)
                    .arg("--config")
                    .arg(config),
                false,
            )
        })
    };
    let out = run(&["run", "--once"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("fresh: not due") && text.contains("stale: refreshed"),
        "{text}"
    );
    assert_eq!(env.fake.stats().refreshes, 1);
    assert_eq!(env.token("fresh").access_token, fresh.access_token);
    assert!(env.fake.access_token_valid(env.token("stale").access_token.expose()));

    let out = run(&["run", "--once", "--force"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(env.fake.stats().refreshes, 3);
    assert_ne!(env.token("fresh").access_token, fresh.access_token);

    // --force without --once is a usage error.
    let out = run(&["run", "--force"]).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn client_secret_file_is_found_in_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("me.client_secret"), "s3cret\n").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[accounts.me]\nclient_id = \"x\"\nclient_secret_file = \"me.client_secret\"\ntoken_file = \"me.json\"\n",
    )
    .unwrap();
    let check = |creds_dir: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.args(["check-config", "--config"])
            .arg(&config)
            .env_remove("CREDENTIALS_DIRECTORY");
        if let Some(d) = creds_dir {
            cmd.env("CREDENTIALS_DIRECTORY", d);
        }
        common::output_swept(&mut cmd, false)
    };
    let out = check(Some(creds.path()));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // Without systemd's credentials the relative name is looked up beside the config, and is missing.
    let out = check(None);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts.me.client_secret_file"));
}
