//! `/metrics` and `/healthz` over real loopback HTTP from the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Daemon, Env};
use fake_kakao::FakeSettings;
use nix::sys::signal::Signal;
use serde_json::Value;

use common::LONG;

async fn get_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("kakao_tokend_{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_follow_the_accounts() {
    let env = Env::new(FakeSettings::fast(3, 3600)).await;
    // Port 0: the daemon binds a free port and says which; no port is picked, closed and hoped for.
    env.write_config("metrics_listen = \"127.0.0.1:0\"", &["good", "dead"]);
    env.login("good");
    let mut dead = env.login("dead");
    env.fake.unlink_user_of(dead.refresh_token.as_ref().unwrap().expose());
    dead.expires_at = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(10));
    std::fs::write(env.path("dead.json"), dead.to_bytes()).unwrap();

    let mut d = Daemon::spawn(&env.config, &[]);
    let serving = d.wait_event(LONG, None, "metrics_serving").await;
    let bound = serving["listen"].as_str().unwrap().to_string();
    assert!(bound.starts_with("127.0.0.1:") && !bound.ends_with(":0"), "{serving}");
    d.wait_event(LONG, Some("dead"), "refresh_refused").await;
    d.wait_event(LONG, Some("good"), "refreshed").await;
    let base = format!("http://{bound}");
    kakao_tokend::crypto::install_provider();
    let http = reqwest::Client::new();

    let text = get_text(&http, &format!("{base}/metrics")).await;
    let good_exp = metric(&text, "access_token_expiry_timestamp_seconds", "account=\"good\"").expect(&text);
    assert!(good_exp > jiff::Timestamp::now().as_second() as f64, "{text}");
    assert!(metric(&text, "refresh_token_expiry_timestamp_seconds", "account=\"good\"").is_some());
    assert!(metric(&text, "last_success_timestamp_seconds", "account=\"good\"").is_some());
    assert!(metric(&text, "refreshes_total", "account=\"good\",outcome=\"success\"").unwrap() >= 1.0);
    assert_eq!(
        metric(&text, "refreshes_total", "account=\"dead\",outcome=\"refused\""),
        Some(1.0)
    );
    assert_eq!(metric(&text, "consecutive_failures", "account=\"dead\""), Some(1.0));
    assert_eq!(metric(&text, "access_token_valid", "account=\"dead\""), Some(0.0));
    assert_eq!(metric(&text, "access_token_valid", "account=\"good\""), Some(1.0));
    for name in ["good", "dead"] {
        let t = env.token(name);
        assert!(!text.contains(t.access_token.expose()) && !text.contains(t.refresh_token.unwrap().expose()));
    }

    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["status"], "unhealthy");
    let dead_view = body["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["account"] == "dead")
        .unwrap()
        .clone();
    assert_eq!(dead_view["needs_attention"], true);

    // Without the dead account every access token is valid: healthy, and its series are gone.
    env.write_config("metrics_listen = \"127.0.0.1:0\"", &["good"]);
    d.signal(Signal::SIGHUP);
    d.wait_event(LONG, None, "reloaded").await;
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let text = get_text(&http, &format!("{base}/metrics")).await;
    assert!(!text.contains("account=\"dead\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_is_a_clear_startup_error() {
    let env = Env::new(FakeSettings::default()).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    env.write_config(&format!("metrics_listen = \"127.0.0.1:{port}\""), &["me"]);
    env.login("me");
    let mut d = Daemon::spawn(&env.config, &[]);
    let status = d.wait_exit(LONG).await;
    assert_eq!(status.code(), Some(1));
    assert!(d.all_lines().join("\n").contains("daemon.metrics_listen"));
}

/// A slow-loris flood: 200 connections to /metrics that never finish their headers, against a daemon
/// whose open-file limit is 128. The server accepts at most 64 of them, closes each after the 10 s
/// header-read timeout, and the refresher keeps its descriptors: refreshes go on during the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_cannot_starve_the_refresher() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::new(FakeSettings::fast(3, 3600)).await;
    env.write_config("metrics_listen = \"127.0.0.1:0\"", &["me"]);
    env.login("me");
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=128:128", common::BIN, "run", "--config"])
        .arg(&env.config);
    let mut d = Daemon::from_command(cmd);
    // 128 is below what 16 refreshes in flight and 64 scrapes may need: said at start.
    let low = d.wait_event(LONG, None, "descriptors_low").await;
    assert_eq!(
        (low["limit"].as_u64(), low["need"].as_u64()),
        (Some(128), Some(224)),
        "{low}"
    );
    let serving = d.wait_event(LONG, None, "metrics_serving").await;
    let bound = serving["listen"].as_str().unwrap().to_string();
    d.wait_event(LONG, Some("me"), "refreshed").await;

    let flood_began = std::time::Instant::now();
    let mut flood = Vec::new();
    for _ in 0..200 {
        let mut c = tokio::net::TcpStream::connect(&bound).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        flood.push(c);
    }
    // Refreshes go on under the flood (a 3 s token is refreshed every 2 s or so): two issued after it
    // began, and the daemon's write of the second.
    let mut issued = env.fake.subscribe();
    for _ in 0..2 {
        env.wait_fake(&mut issued, LONG, |e| {
            matches!(
                e.kind,
                fake_kakao::FakeEventKind::Issued {
                    grant: "refresh_token",
                    ..
                }
            )
        })
        .await;
    }
    d.wait_event(LONG, Some("me"), "refreshed").await;
    let open = std::fs::read_dir(format!("/proc/{}/fd", d.pid())).unwrap().count();
    eprintln!("daemon descriptors under a 200-connection flood: {open} (limit 128)");
    assert!(open < 128, "{open} descriptors open");
    assert!(
        !d.all_lines().join("\n").contains("Too many open files"),
        "the daemon ran out of descriptors"
    );

    // The first connection was accepted: the header-read timeout closes it (EOF, or a 408 then EOF).
    let mut first = flood.remove(0);
    let mut answer = Vec::new();
    tokio::time::timeout(LONG, first.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "the first half-sent request was closed {:?} after it was opened",
        flood_began.elapsed()
    );
    drop(flood);
    // The flood gone, a scrape is served again.
    let health = reqwest::get(format!("http://{bound}/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_off_loopback_is_warned_about() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("metrics_listen = \"0.0.0.0:0\"", &["me"]);
    env.login("me");
    let mut d = Daemon::spawn(&env.config, &[]);
    let warned = d.wait_event(LONG, None, "metrics_public").await;
    assert_eq!(common::level(&warned), "WARN");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}
