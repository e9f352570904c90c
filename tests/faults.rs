//! Provider faults, through the fake Kakao over real loopback: each outage outlasts the access token,
//! and the daemon must back off (a bounded request rate), keep the file as it was, be back within one
//! backoff step of the end, and keep another account on a healthy provider refreshing all the while,
//! even with a single refresh allowed in flight.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{Env, FileReader, account_of, level};
use fake_kakao::{FakeEventKind, FakeKakao, FakeSettings, Fault};
use nix::sys::signal::Signal;

use common::LONG;
/// Access tokens live 4 s: the backoff cap is then its floor, 1 s.
const ACCESS_TTL: u64 = 4;
/// Longer than the access token's lifetime, so the token expires during the outage.
const OUTAGE: Duration = Duration::from_secs(6);

struct Scenario {
    fault: Fault,
    /// The least time between two requests during the outage: the backoff step, or Retry-After, plus
    /// the request timeout for faults that never answer.
    min_gap: Duration,
}

/// What the outage looked like, printed for RELIABILITY.md.
#[derive(Debug)]
#[allow(dead_code)] // Read through Debug.
struct Findings {
    requests: usize,
    smallest_gap: Duration,
    recovery: Duration,
    other_refreshes: u64,
    other_samples: u32,
    reads: u64,
}

async fn ride_out(name: &str, s: Scenario) {
    let env = Env::new(FakeSettings::fast(ACCESS_TTL, 3600)).await;
    let healthy = FakeKakao::start(FakeSettings {
        clients: env.fake.settings().clients.clone(),
        ..FakeSettings::fast(ACCESS_TTL, 3600)
    })
    .await
    .unwrap();
    // One request in flight at a time: a provider that hangs must still not starve the other account.
    let config = format!(
        "[daemon]\nrefresh_before_expiry = \"75%\"\nrequest_timeout = \"1s\"\nmax_concurrent_refreshes = 1\n\n{}{}",
        env.account("me"),
        common::account_at("other", &healthy)
    );
    std::fs::write(&env.config, config).unwrap();
    env.login("me");
    env.login_at(&healthy, "other");

    env.fake.set_fault(Some(s.fault.clone()));
    let before = env.token_bytes("me");
    let reader = FileReader::start(env.path("me.json"));
    let mut d = env.spawn();
    d.wait_event(LONG, Some("me"), "refresh_failed").await;
    let start = SystemTime::now();
    let other_before = healthy.stats().refreshes;
    // The outage's length is the scenario. Meanwhile the other account's file is sampled: its access
    // token must be one the healthy provider accepts at every sample.
    let (mut samples, mut other_invalid) = (0u32, 0u32);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let outage_end = tokio::time::Instant::now() + OUTAGE;
    while tokio::time::Instant::now() < outage_end {
        tick.tick().await;
        samples += 1;
        if !healthy.access_token_valid(env.token("other").access_token.expose()) {
            other_invalid += 1;
        }
    }
    let end = SystemTime::now();
    assert_eq!(
        env.token_bytes("me"),
        before,
        "{name}: the file changed during the outage"
    );
    let other_refreshes = healthy.stats().refreshes - other_before;

    env.fake.set_fault(None);
    let cleared = Instant::now();
    d.wait_event(LONG, Some("me"), "refreshed").await;
    let recovery = cleared.elapsed();
    let counts = reader.finish();

    // Requests the faulty provider saw during the outage, from its own log.
    let during: Vec<SystemTime> = env
        .fake
        .events()
        .iter()
        .filter(|e| e.kind == FakeEventKind::Faulted && e.at >= start && e.at <= end)
        .map(|e| e.at)
        .collect();
    let smallest_gap = during
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .min()
        .unwrap_or(OUTAGE);
    let findings = Findings {
        requests: during.len(),
        smallest_gap,
        recovery,
        other_refreshes,
        other_samples: samples,
        reads: counts.reads,
    };
    eprintln!("{name}: {findings:?}");

    // A bounded rate: no two requests closer than the backoff allows (a little slack for the timer).
    assert!(
        during.len() >= 2,
        "{name}: retries stopped during the outage: {findings:?}"
    );
    assert!(
        smallest_gap + Duration::from_millis(50) >= s.min_gap,
        "{name}: requests {smallest_gap:?} apart, backoff is {:?}",
        s.min_gap
    );
    let most = (OUTAGE.as_secs_f64() / s.min_gap.as_secs_f64()).ceil() as usize + 1;
    assert!(during.len() <= most, "{name}: {} requests in {OUTAGE:?}", during.len());
    // Back within one backoff step of the end (plus a request that may be on the wire, and slack).
    let step = s.min_gap + Duration::from_secs(1);
    assert!(recovery <= step, "{name}: recovered {recovery:?} after the end");
    // The file was never damaged; it is valid again now.
    assert_eq!((counts.torn, counts.missing), (0, 0), "{name}: {counts:?}");
    assert!(counts.reads > 1000, "{name}: the reader hardly ran: {counts:?}");
    assert!(env.fake.access_token_valid(env.token("me").access_token.expose()));
    assert!(env.fake.refresh_token_alive(&env.refresh_token("me")));
    // A clean stop leaves no temp file (while running, the next refresh's may exist at any moment).
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
    assert!(common::temp_files(env.dir.path(), "me.json").is_empty());
    // Logged when the state changed (still valid, then expired), not at every retry.
    let events = d.events();
    let warns = events
        .iter()
        .filter(|v| level(v) == "WARN" && account_of(v) == Some("me"))
        .count();
    assert!((1..=2).contains(&warns), "{name}: {warns} warnings for one outage");
    // The other account went on as if nothing happened: a working token at every sample, refreshes
    // (at worst one request timeout late, waiting for the one permit), never a warning.
    assert_eq!(
        other_invalid, 0,
        "{name}: {other_invalid} of {samples} samples found the other token dead"
    );
    let expected = (OUTAGE.as_secs_f64() / (s.min_gap + STEP).as_secs_f64()).floor() as u64;
    assert!(
        other_refreshes >= expected,
        "{name}: the other account refreshed {other_refreshes} times during the outage"
    );
    let trouble: Vec<&serde_json::Value> = events
        .iter()
        .filter(|v| account_of(v) == Some("other") && matches!(level(v), "WARN" | "ERROR"))
        .collect();
    assert!(trouble.is_empty(), "{name}: the other account had trouble: {trouble:?}");
    assert!(healthy.access_token_valid(env.token("other").access_token.expose()));
}

const STEP: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_outage() {
    ride_out(
        "503",
        Scenario {
            fault: Fault::ServerError(503),
            min_gap: STEP,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_429_with_retry_after_is_obeyed() {
    ride_out(
        "429 Retry-After: 2",
        Scenario {
            fault: Fault::TooManyRequests { retry_after: Some(2) },
            min_gap: Duration::from_secs(2),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kakaos_koe237_rate_limit() {
    ride_out(
        "KOE237",
        Scenario {
            fault: Fault::RateLimited { retry_after: None },
            min_gap: STEP,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_are_not_json() {
    ride_out(
        "not JSON",
        Scenario {
            fault: Fault::NotJson,
            min_gap: STEP,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets() {
    ride_out(
        "connection reset",
        Scenario {
            fault: Fault::Reset,
            min_gap: STEP,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_longer_than_request_timeout() {
    ride_out(
        "hang",
        Scenario {
            fault: Fault::Hang(Duration::from_secs(60)),
            min_gap: TIMEOUT + STEP,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_trickle_of_bytes() {
    ride_out(
        "trickle",
        Scenario {
            fault: Fault::Trickle(Duration::from_millis(100)),
            min_gap: TIMEOUT + STEP,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_token_answers_are_refused_and_never_written() {
    let env = Env::new(FakeSettings::fast(ACCESS_TTL, 3600)).await;
    env.write_config("refresh_before_expiry = \"75%\"", &["me"]);
    env.login("me");
    let ok = |extra: &str| {
        format!(
            r#"{{"token_type":"bearer","access_token":"fake-at-{}"{extra}}}"#,
            "x".repeat(40)
        )
    };
    let answers = [
        (ok(r#","expires_in":-5"#), "expires_in"),
        (ok(r#","expires_in":1e300"#), "expires_in"),
        (ok(r#","expires_in":99999999999999"#), "expires_in"),
        (ok(r#","expires_in":[21599]"#), "expires_in"),
        (ok(r#","expires_in":21599,"refresh_token":17"#), "refresh_token"),
        (
            r#"{"token_type":"bearer","expires_in":21599}"#.to_string(),
            "access_token",
        ),
        (
            r#"{"token_type":"bearer","access_token":"","expires_in":21599}"#.to_string(),
            "access_token",
        ),
        (
            r#"{"access_token":{"v":1},"expires_in":21599}"#.to_string(),
            "access_token",
        ),
        ("[]".to_string(), "JSON object"),
        (r#"{"access_token":"fake-at-trunc"#.to_string(), "JSON"),
        (String::new(), "empty"),
        (
            format!(r#"{{"access_token":"{}"}}"#, "a".repeat(2 << 20)),
            "larger than",
        ),
        // Hostile tokens: a newline that would add a variable to every consumer of the env file, a
        // command substitution, a space; and a lifetime that would make the daemon spin.
        (
            r#"{"access_token":"fake-at-x\nLD_PRELOAD=/tmp/evil.so","expires_in":21599}"#.to_string(),
            "access_token",
        ),
        (
            r#"{"access_token":"fake-at-$(id)","expires_in":21599}"#.to_string(),
            "access_token",
        ),
        (
            ok(r#","expires_in":21599,"refresh_token":"fake-rt-a b""#),
            "refresh_token",
        ),
        (ok(r#","expires_in":0"#), "lives 0 s"),
        (ok(r#","expires_in":1"#), "lives 1 s"),
    ];
    for (body, _) in &answers {
        env.fake.push_fault(Fault::Answer(200, body.clone()));
    }
    let before = env.token_bytes("me");
    let reader = FileReader::start(env.path("me.json"));
    let mut d = env.spawn();
    // Each answer is one failed attempt; the first good answer after them is written.
    d.wait_event(LONG, Some("me"), "refreshed").await;
    let counts = reader.finish();
    let stats = env.fake.stats();
    assert_eq!(stats.faults, answers.len() as u64);
    assert_eq!(stats.refreshes, 1, "{stats:?}");

    // Until then the file stayed as it was: every read saw the old, whole file.
    assert_eq!((counts.torn, counts.missing), (0, 0), "{counts:?}");
    let failures: Vec<String> = d
        .events()
        .iter()
        .filter(|v| account_of(v) == Some("me") && common::event(v) == "refresh_failed")
        .map(|v| common::message(v).to_owned())
        .collect();
    eprintln!("{failures:#?}");
    assert_eq!(failures.len(), answers.len(), "{failures:#?}");
    for ((_, names), said) in answers.iter().zip(&failures) {
        assert!(said.contains(names), "{said:?} does not name {names}");
    }
    let file = env.token("me");
    assert_ne!(env.token_bytes("me"), before);
    assert!(env.fake.access_token_valid(file.access_token.expose()));
    assert!(env.fake.refresh_token_alive(&env.refresh_token("me")));
}

/// A provider that rotates the refresh token but sends an access token that would inject a variable
/// into the env file: the new refresh token is stored (Kakao has already killed the old one) with the
/// previous access token; the hostile one reaches no file, no env file and no hook; the refresh counts
/// as failed and is retried with backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_access_token_never_costs_the_rotated_refresh_token() {
    let env = Env::new(FakeSettings::fast(ACCESS_TTL, 3600)).await;
    let hook_mark = env.path("hook-ran");
    let account = env.account("me").replace(
        "[accounts.me]\n",
        &format!(
            "[accounts.me]\nenv_file = \"me.env\"\non_refresh = [\"touch\", \"{}\"]\n",
            hook_mark.display()
        ),
    );
    std::fs::write(&env.config, format!("[daemon]\n\n{account}")).unwrap();
    let before = env.login("me");
    let hostile = r#"{"token_type":"bearer","access_token":"fake-at-x\nLD_PRELOAD=/tmp/evil.so","expires_in":21599,"refresh_token":"fake-rt-rotated-by-a-hostile-answer","refresh_token_expires_in":100}"#;
    // The hostile answer first, then an outage, so that the retry after it is seen and fails too.
    env.fake.push_fault(Fault::Answer(200, hostile.into()));
    env.fake.push_fault(Fault::ServerError(503));
    let mut d = env.spawn();
    let failed = d
        .wait_log(LONG, |v| {
            account_of(v) == Some("me") && common::event(v) == "refresh_failed"
        })
        .await;
    assert!(common::message(&failed).contains("access_token"), "{failed}");
    assert_eq!(level(&failed), "WARN", "{failed}");

    let file = env.token("me");
    assert_eq!(
        file.refresh_token.as_ref().unwrap().expose(),
        "fake-rt-rotated-by-a-hostile-answer"
    );
    assert_eq!(
        file.access_token, before.access_token,
        "the previous access token is kept"
    );
    assert!(
        !std::fs::read_to_string(env.path("me.json"))
            .unwrap()
            .contains("LD_PRELOAD")
    );
    let env_file = std::fs::read_to_string(env.path("me.env")).unwrap_or_default();
    assert!(!env_file.contains("LD_PRELOAD"), "{env_file}");
    assert!(!hook_mark.exists(), "the hook ran for a refused answer");
    // Retried with backoff: the next request comes (the 503), then another.
    let t = Instant::now();
    let mut rx = env.fake.subscribe();
    env.wait_fake(&mut rx, LONG, |e| e.kind == FakeEventKind::Faulted).await;
    eprintln!("retry after the refused answer came {:?} later", t.elapsed());
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(env.path("me.json.state")).unwrap()).unwrap();
    assert!(state["consecutive_failures"].as_u64().unwrap() >= 1, "{state}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}
