//! `/metrics` and `/healthz` over real loopback HTTP from the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Daemon, Env};
use fake_kakao::FakeSettings;
use nix::sys::signal::Signal;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.write_config(&format!("metrics_listen = \"127.0.0.1:{port}\""), &["good", "dead"]);
    env.login("good");
    let mut dead = env.login("dead");
    env.fake.unlink_user_of(dead.refresh_token.as_ref().unwrap().expose());
    dead.expires_at = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(10));
    std::fs::write(env.path("dead.json"), dead.to_bytes()).unwrap();

    let mut d = Daemon::spawn(&env.config, &[]);
    d.wait_message(LONG, None, "serving /metrics and /healthz").await;
    d.wait_message(LONG, Some("dead"), "refresh refused").await;
    d.wait_message(LONG, Some("good"), "refreshed").await;
    let base = format!("http://127.0.0.1:{port}");
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
    env.write_config(&format!("metrics_listen = \"127.0.0.1:{port}\""), &["good"]);
    d.signal(Signal::SIGHUP);
    d.wait_message(LONG, None, "reloaded").await;
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
