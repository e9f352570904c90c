//! Fuzz targets for the two parsers that take hostile input: the token endpoint's answer (with the
//! status, Location and Retry-After that come with it) and the config loader. Each runs rounds of
//! generated cases for `FUZZ_SECONDS` (60 by default), every round from a seed it prints, and fails on a
//! panic or a broken property. They are `#[ignore]`d in plain `cargo test` (a minute each); CI runs them:
//!   FUZZ_SECONDS=60 cargo test --release --test fuzz -- --ignored
//! A failing seed is replayed with FUZZ_SEED=<seed>.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::time::{Duration, Instant};

use kakao_tokend::config::Config;
use kakao_tokend::token::{self, TokenFile, Usable};
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Value, json};

/// Runs `test` on cases from `strategy` in seeded rounds until the time is up.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let fixed: Option<u64> = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut rounds, mut cases) = (0u64, 0u64);
    loop {
        let seed = fixed.unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).unwrap();
            u64::from_le_bytes(b)
        });
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let config = ProptestConfig {
            cases: 500,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: FUZZ_SEED={seed}: {e}");
        }
        rounds += 1;
        cases += 500;
        if fixed.is_some() || Instant::now() >= deadline {
            break;
        }
    }
    eprintln!("{name}: {cases} cases in {rounds} rounds, no failure (last seed printed on failure only)");
}

/// Strings a hostile provider might send: controls, quotes, shell and env-file syntax, long runs.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._~+/=-]{1,64}",
        "\\PC{0,40}",
        "[\\x00-\\x7f]{0,40}",
        Just("AT\nLD_PRELOAD=/tmp/evil.so".to_string()),
        Just("$(reboot)".to_string()),
        Just("\u{1b}[2J\u{202e}".to_string()),
        "[a]{1000,3000}",
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        hostile_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const ANSWER_FIELDS: &[&str] = &[
    "access_token",
    "refresh_token",
    "expires_in",
    "refresh_token_expires_in",
    "token_type",
    "scope",
    "id_token",
    "expires_at",
    "refresh_token_expires_at",
    "error",
    "error_description",
    "error_code",
];

/// A whole exchange: status, Location, Retry-After and a body, either bytes or a token-like object.
fn exchange() -> impl Strategy<Value = (u16, Option<String>, Option<String>, Vec<u8>)> {
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec((prop::sample::select(ANSWER_FIELDS), any_json()), 0..8).prop_map(|fields| {
            Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                .to_string()
                .into_bytes()
        }),
        (
            hostile_string(),
            prop::option::of(any::<i64>()),
            prop::option::of(hostile_string())
        )
            .prop_map(
                |(at, exp, rt)| json!({"access_token": at, "expires_in": exp, "refresh_token": rt})
                    .to_string()
                    .into_bytes()
            ),
    ];
    (
        prop_oneof![
            Just(200u16),
            Just(400),
            Just(401),
            Just(302),
            Just(307),
            Just(429),
            Just(503),
            100u16..600
        ],
        prop::option::of(hostile_string()),
        prop::option::of("[0-9a-zA-Z ,:]{0,30}"),
        body,
    )
}

#[test]
#[ignore = "a fuzz run of FUZZ_SECONDS (60): cargo test --release --test fuzz -- --ignored"]
fn fuzz_the_token_answer() {
    let current = TokenFile::parse(br#"{"access_token":"A1","refresh_token":"R1","expires_in":21599}"#).unwrap();
    fuzz("token answer", exchange(), |(status, location, retry_after, body)| {
        let shown_location = location.clone();
        match kakao_tokend::oauth::classify(
            "https://kauth.example/oauth/token",
            status,
            location.as_deref(),
            retry_after.as_deref(),
            &body,
        ) {
            Ok(resp) => {
                let at = jiff::Timestamp::now();
                let file = match token::usable(&resp) {
                    Usable::Whole => token::merge(&current, resp, at),
                    Usable::RefreshTokenOnly(_) => {
                        let f = token::merge_refresh_token_only(&current, resp, at);
                        prop_assert_eq!(&f.access_token, &current.access_token);
                        f
                    }
                    Usable::Nothing(_) => return Ok(()),
                };
                // What is written parses back as itself, and its tokens obey the rule.
                prop_assert_eq!(&TokenFile::parse(&file.to_bytes()).unwrap(), &file);
                prop_assert!(token::token_chars_ok(file.access_token.expose()));
                let env = String::from_utf8(kakao_tokend::outputs::env_file_contents(&file)).unwrap();
                prop_assert!(env.lines().all(|l| l.starts_with("KAKAO_ACCESS_TOKEN")), "{}", env);
            }
            Err(e) => {
                let shown = e.to_string();
                prop_assert!(!shown.chars().any(char::is_control), "{:?}", shown);
                // A Location's query (which may carry a code or a token) is never shown as one.
                if let Some(l) = shown_location.filter(|l| l.contains('?')) {
                    let query = l.split_once('?').unwrap().1;
                    prop_assert!(!shown.contains(&format!("?{query}")), "{}", shown);
                }
            }
        }
        Ok(())
    });
}

const SECRET: &str = "Zq7SECRETvalue9x";

/// TOML a user (or a broken editor) could write: known tables and keys with values of any type, the
/// secret among them, then cut or damaged at a random place.
fn config_text() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "client_id",
        "client_secret",
        "redirect_uri",
        "token_file",
        "auth_url",
        "api_url",
        "token_url",
        "scope",
        "on_refresh",
        "env_file",
        "file_mode",
        "file_group",
        "pkce",
        "allow_insecure_http",
        "notify_by_message",
        "log_format",
        "backups",
        "request_timeout",
        "refresh_before_expiry",
        "metrics_listen",
        "bogus",
    ]);
    let value = prop_oneof![
        Just(format!("\"{SECRET}\"")),
        Just(format!("\"https://{SECRET}@example.com\"")),
        Just(format!("[\"{SECRET}\"]")),
        Just(format!("{{ x = \"{SECRET}\" }}")),
        Just(format!("\"{SECRET}")),
        "\"[a-z0-9:/._%-]{0,20}\"",
        any::<i64>().prop_map(|i| i.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
    ];
    let table = prop::sample::select(vec![
        "[daemon]",
        "[accounts.me]",
        "[accounts.you]",
        "[accounts.Bad-Name]",
        "",
    ]);
    let line = (table, prop::collection::vec((keys, value), 0..6)).prop_map(|(t, kv)| {
        let mut s = format!("{t}\n");
        for (k, v) in kv {
            s.push_str(&format!("{k} = {v}\n"));
        }
        s
    });
    (
        prop::collection::vec(line, 0..4),
        any::<prop::sample::Index>(),
        prop::option::of("[\\x00-\\x7f]{1,3}"),
    )
        .prop_map(|(tables, cut, junk)| {
            let mut text = tables.concat();
            if let Some(junk) = junk {
                let at = cut.index(text.len() + 1);
                let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
                text.insert_str(at, &junk);
            }
            text
        })
}

#[test]
#[ignore = "a fuzz run of FUZZ_SECONDS (60): cargo test --release --test fuzz -- --ignored"]
fn fuzz_the_config_loader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    fuzz("config loader", config_text(), |text| {
        std::fs::write(&path, &text).unwrap();
        if let Err(e) = Config::load(&path) {
            let shown = e.to_string();
            prop_assert!(shown.contains("config.toml"), "{}", shown);
            // No config error prints a value: the secret never, wherever it was put.
            prop_assert!(!shown.contains(SECRET), "{}\n--- from ---\n{}", shown, text);
        }
        Ok(())
    });
}
