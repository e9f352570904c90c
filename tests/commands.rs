//! The commands for people, each run as the real binary against the fake Kakao over loopback.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};

use common::{BIN, CLIENT_ID, CLIENT_SECRET, Env};
use fake_kakao::{FakeClient, FakeEventKind, FakeSettings};
use kakao_tokend::store::{self, StateFile};
use kakao_tokend::token::TokenFile;
use serde_json::Value;

async fn run(env: &Env, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--config").arg(&env.config).env("BROWSER", "true");
    let prints_token = args.first() == Some(&"token");
    tokio::task::spawn_blocking(move || common::output_swept(&mut cmd, prints_token))
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn no_redirects() -> reqwest::Client {
    kakao_tokend::crypto::install_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Plays the browser at the fake's authorize endpoint: returns where Kakao sends it back to.
async fn browse_authorize(url: &str) -> String {
    let resp = no_redirects().get(url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 302, "{url}");
    resp.headers()["location"].to_str().unwrap().to_string()
}

/// A running `login`: its stdout's first URL line is the authorize address.
struct Login {
    child: std::process::Child,
    url: String,
    stdout: std::thread::JoinHandle<String>,
}

impl Login {
    async fn start(env: &Env, extra: &[&str]) -> Login {
        let mut child = Command::new(BIN)
            .env("RUST_LOG", "trace")
            .arg("login")
            .args(extra)
            .arg("--config")
            .arg(&env.config)
            .env("BROWSER", "true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep reading stdout to the end, so the command never writes into a closed pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stdout = std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut all = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("http")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let url = rx.await.expect("login printed no URL");
        Login { child, url, stdout }
    }

    fn paste(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
    }

    /// Waits for the exit; the returned output's stdout is everything the command printed.
    async fn finish(self) -> Output {
        let Login { child, stdout, .. } = self;
        tokio::task::spawn_blocking(move || {
            let mut out = child.wait_with_output().unwrap();
            out.stdout = stdout.join().unwrap().into_bytes();
            common::assert_no_secrets("login (stderr)", &String::from_utf8_lossy(&out.stderr));
            common::assert_no_secrets("login (stdout)", &String::from_utf8_lossy(&out.stdout));
            out
        })
        .await
        .unwrap()
    }
}

/// A port for a loopback redirect, which `login` binds itself and which must be written into the
/// config first. Taken below the kernel's ephemeral range (32768 and up), from which every port-0
/// listener and every outgoing connection of the other tests draws, and checked free.
fn free_port() -> u16 {
    loop {
        let port = fastrand::u16(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_through_the_loopback_callback_refuses_a_forged_one_and_exchanges_the_code_once() {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let mut app = FakeClient::new(CLIENT_ID);
    app.redirect_uris = vec![redirect.clone()];
    let env = Env::new(FakeSettings {
        clients: vec![app],
        ..FakeSettings::default()
    })
    .await;
    let url = env.fake.url();
    std::fs::write(
        &env.config,
        format!(
            "[accounts.me]\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\nredirect_uri = \"{redirect}\"\nscope = \"talk_message\"\ntoken_file = \"tokens/me.json\"\nauth_url = \"{url}\"\napi_url = \"{url}\"\n"
        ),
    )
    .unwrap();
    let login = Login::start(&env, &[]).await;
    let authorize = reqwest::Url::parse(&login.url).unwrap();
    let q: std::collections::HashMap<String, String> = authorize.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], redirect);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["scope"], "talk_message");
    assert!(q["state"].len() >= 16);

    // A forged callback (wrong state) is refused with 400 and ignored.
    let forged = no_redirects()
        .get(format!("{redirect}?code=forged-code&state=not-the-state"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 400);

    // The real browser trip: the fake's consent redirects to the listener, which shows a success page.
    let back = browse_authorize(&login.url).await;
    assert!(back.starts_with(&redirect), "{back}");
    let page = no_redirects().get(&back).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("Logged in"));

    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let file = TokenFile::parse(&std::fs::read(env.path("tokens/me.json")).unwrap()).unwrap();
    assert!(env.fake.access_token_valid(file.access_token.expose()));
    assert!(
        env.fake
            .refresh_token_alive(file.refresh_token.as_ref().unwrap().expose())
    );
    assert_eq!(file.scope.as_deref(), Some("talk_message"));
    assert!(file.expires_at.is_some() && file.refresh_token_expires_at.is_some());
    let exchanges = env
        .fake
        .events()
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                FakeEventKind::Issued {
                    grant: "authorization_code",
                    ..
                }
            )
        })
        .count();
    assert_eq!(exchanges, 1);
    assert_eq!(env.fake.stats().refused, 0);
    // The forged code was never sent to the provider, and no token was printed.
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(!all.contains(file.access_token.expose()) && !all.contains(file.refresh_token.unwrap().expose()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_by_pasting_the_address_the_browser_ended_on() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    let mut login = Login::start(&env, &["--account", "me"]).await;
    let back = browse_authorize(&login.url).await;
    assert!(back.starts_with("https://localhost.com"), "{back}");
    // PKCE S256 by default: the address carries the challenge, the exchange its verifier.
    let q: std::collections::HashMap<String, String> = reqwest::Url::parse(&login.url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    login.paste(&back);
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("logged in"));
    let file = env.token("me");
    assert!(env.fake.access_token_valid(file.access_token.expose()));
    let state = store::AccountState::load(&env.path("me.json")).unwrap().unwrap();
    assert!(state.last_success_at().is_some() && !state.needs_login());
}

/// A provider that answers with its own `expires_at` and `refresh_token_expires_at` (seconds since the
/// epoch, as Strava does): login writes a file every reader can parse, and the daemon keeps it fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_with_its_own_expires_at_logs_in_and_is_kept_fresh() {
    let env = Env::new(FakeSettings {
        absolute_expiry: true,
        standard_oauth2: true,
        ..FakeSettings::fast(3, 3600)
    })
    .await;
    env.write_config("", &["me"]);
    let mut login = Login::start(&env, &["--account", "me"]).await;
    let back = browse_authorize(&login.url).await;
    login.paste(&back);
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let check = |env: &Env| {
        let raw: Value = serde_json::from_slice(&env.token_bytes("me")).unwrap();
        let file = env.token("me");
        // The file's own time is RFC 3339 and written once; the provider's is kept beside it.
        assert!(raw["expires_at"].is_string(), "{raw}");
        assert!(raw["provider_expires_at"].is_u64(), "{raw}");
        assert!(raw["provider_refresh_token_expires_at"].is_u64(), "{raw}");
        let text = String::from_utf8(env.token_bytes("me")).unwrap();
        assert_eq!(text.matches("\"expires_at\"").count(), 1, "{text}");
        let theirs = raw["provider_expires_at"].as_i64().unwrap();
        let ours = file.expires_at.unwrap().as_second();
        assert!((theirs - ours).abs() <= 1, "{theirs} vs {ours}");
        file
    };
    let first = check(&env);
    // What an earlier version wrote for such a provider: the provider's value as a second `expires_at`,
    // which a JSON reader takes over the first. Such a file is adopted, not refused.
    let raw = String::from_utf8(env.token_bytes("me")).unwrap();
    let theirs = serde_json::from_str::<Value>(&raw).unwrap()["provider_expires_at"].clone();
    let old = format!(
        "{},\n  \"expires_at\": {theirs}\n}}\n",
        raw.trim_end().trim_end_matches('}').trim_end()
    );
    let adopted = TokenFile::parse(old.as_bytes()).unwrap().expires_at.unwrap();
    assert!((adopted.as_second() - first.expires_at.unwrap().as_second()).abs() <= 1);
    std::fs::write(env.path("me.json"), &old).unwrap();
    let mut d = env.spawn();
    for _ in 0..2 {
        d.wait_event(common::LONG, Some("me"), "refreshed").await;
    }
    let now = check(&env);
    assert_ne!(now.access_token, first.access_token);
    assert!(env.fake.access_token_valid(now.access_token.expose()));
    assert!(
        env.fake
            .refresh_token_alive(now.refresh_token.as_ref().unwrap().expose())
    );
    let stats = env.fake.stats();
    assert_eq!(stats.refused, 0, "{stats:?}");
    assert!(
        !d.all_lines()
            .iter()
            .any(|l| l.contains("unreadable") || l.contains("must be a string")),
        "{:#?}",
        d.all_lines()
    );
    let out = run(&env, &["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_explains_a_cancel_a_reused_code_and_a_foreign_address() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);

    env.fake.deny_next_authorize();
    let mut login = Login::start(&env, &[]).await;
    let back = browse_authorize(&login.url).await;
    login.paste(&back);
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cancelled (access_denied)"),
        "{}",
        text(&out.stderr)
    );

    // A code used once already (the seed's KOE320), pasted bare.
    let mut first = Login::start(&env, &[]).await;
    let back = browse_authorize(&first.url).await;
    first.paste(&back);
    assert_eq!(first.finish().await.status.code(), Some(0));
    let code = reqwest::Url::parse(&back)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let mut again = Login::start(&env, &[]).await;
    again.paste(&code);
    let out = again.finish().await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("KOE320") && err.contains("kakao-tokend login --account me"),
        "{err}"
    );
    assert!(!err.contains(&code), "the code was echoed: {err}");

    // An address from another login (its state differs) is refused before any exchange.
    let requests = env.fake.stats().token_requests;
    let mut other = Login::start(&env, &[]).await;
    other.paste(&back);
    let out = other.finish().await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("state does not match"));
    assert_eq!(env.fake.stats().token_requests, requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_refreshes_every_account_and_fails_for_a_dead_one() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("backups = 2", &["good", "dead"]);
    let good = env.login("good");
    let dead = env.login("dead");
    env.fake.unlink_user_of(dead.refresh_token.as_ref().unwrap().expose());
    let dead_before = env.token_bytes("dead");
    let out = run(&env, &["refresh"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("good: refreshed"), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("KOE322") && err.contains("kakao-tokend login --account dead"),
        "{err}"
    );
    assert_ne!(env.token("good").access_token, good.access_token);
    assert_eq!(
        env.token("good").refresh_token,
        good.refresh_token,
        "no rotation here, the old one is kept"
    );
    assert_eq!(store::list_backups(&env.path("good.json")).unwrap().len(), 1);
    assert_eq!(env.token_bytes("dead"), dead_before);
    let state = store::AccountState::load(&env.path("dead.json")).unwrap().unwrap();
    assert!(state.needs_login());

    let out = run(&env, &["refresh", "--account", "good"]).await;
    assert_eq!(out.status.code(), Some(0));
    let out = run(&env, &["refresh", "--account", "nobody"]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_each_state_and_exits_by_validity_without_printing_tokens() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["valid", "expired", "missing", "relogin", "broken"]);
    let valid = env.login("valid");
    let mut expired = env.login("expired");
    expired.expires_at = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60));
    std::fs::write(env.path("expired.json"), expired.to_bytes()).unwrap();
    env.login("relogin");
    let mut relogin = store::AccountState::default();
    relogin.failed(1, "KOE322".into(), None, true);
    relogin.save(&env.path("relogin.json")).unwrap();
    std::fs::write(env.path("broken.json"), "{not json").unwrap();

    let out = run(&env, &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let state = |name: &str| {
        all.iter().find(|v| v["account"] == name).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(state("valid"), "valid");
    assert_eq!(state("expired"), "expired");
    assert_eq!(state("missing"), "missing");
    assert_eq!(state("relogin"), "needs_login");
    assert_eq!(state("broken"), "unreadable");
    for v in &all {
        for key in [
            "account",
            "token_file",
            "state",
            "access_token_expires_at",
            "refresh_token_expires_at",
            "last_refresh_at",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
    }
    let v = all.iter().find(|v| v["account"] == "valid").unwrap();
    assert_eq!(v["access_token_expires_at"], valid.expires_at.unwrap().to_string());

    let out = run(&env, &["status", "--account", "valid"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("valid: valid"));
    let out = run(&env, &["status"]).await;
    let shown = text(&out.stdout) + &text(&out.stderr);
    assert!(shown.contains("kakao-tokend login --account missing"));
    for f in ["valid", "expired", "relogin"] {
        let t = env.token(f);
        assert!(!shown.contains(t.access_token.expose()) && !shown.contains(t.refresh_token.unwrap().expose()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_the_access_token_and_refreshes_an_expired_one_first() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    let file = env.login("me");
    let out = run(&env, &["token"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), format!("{}\n", file.access_token.expose()));
    assert_eq!(env.fake.stats().refreshes, 0);

    let mut expired = file.clone();
    expired.expires_at = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1));
    std::fs::write(env.path("me.json"), expired.to_bytes()).unwrap();
    let out = run(&env, &["token", "--account", "me"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed = text(&out.stdout).trim().to_string();
    assert_ne!(printed, file.access_token.expose());
    assert!(env.fake.access_token_valid(&printed));
    assert_eq!(env.token("me").access_token.expose(), printed);
    assert_eq!(env.fake.stats().refreshes, 1);
    // At the default log level the command prints the token and nothing else.
    let out = common::output_swept(
        Command::new(BIN)
            .args(["token", "--account", "me", "--config"])
            .arg(&env.config)
            .env("RUST_LOG", ""),
        true,
    );
    assert_eq!(text(&out.stdout).trim(), printed);
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    // The sweep every test runs would have caught the token anywhere else.
    assert_eq!(
        common::secrets_in(&printed),
        ["fake-at-"],
        "the secrets sweep missed an access token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_delivers_a_text_message_with_its_link() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    env.login("me");
    let out = run(
        &env,
        &[
            "send",
            "--link",
            "https://example.com/a",
            "--button-title",
            "열기",
            "안녕하세요, kakao-tokend",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let messages = env.fake.messages();
    assert_eq!(messages.len(), 1);
    let t = &messages[0].1;
    assert_eq!(t["object_type"], "text");
    assert_eq!(t["text"], "안녕하세요, kakao-tokend");
    assert_eq!(t["link"]["web_url"], "https://example.com/a");
    assert_eq!(t["link"]["mobile_web_url"], "https://example.com/a");
    assert_eq!(t["button_title"], "열기");

    // Without --link an empty link object is still sent, as Kakao requires one.
    assert_eq!(run(&env, &["send", "no link"]).await.status.code(), Some(0));
    assert_eq!(env.fake.messages()[1].1["link"], serde_json::json!({}));

    // 201 characters (Korean ones count as one each) are refused before anything is sent.
    let long: String = "가".repeat(201);
    let out = run(&env, &["send", &long]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("200"));
    assert_eq!(run(&env, &["send", &"가".repeat(200)]).await.status.code(), Some(0));
    assert_eq!(env.fake.messages().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_refreshes_an_expired_token_first_and_retries_once_after_401() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    let mut file = env.login("me");
    file.expires_at = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(5));
    std::fs::write(env.path("me.json"), file.to_bytes()).unwrap();
    let out = run(&env, &["send", "after refresh"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(env.fake.stats().refreshes, 1);
    assert_eq!(env.fake.messages().len(), 1);

    // A token the API refuses although its expiry says it is valid (revoked): refresh once, retry once.
    let mut revoked = env.token("me");
    revoked.access_token = kakao_tokend::secret::Secret::new("revoked-token");
    std::fs::write(env.path("me.json"), revoked.to_bytes()).unwrap();
    let out = run(&env, &["send", "after 401"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(env.fake.stats().refreshes, 2);
    assert_eq!(env.fake.messages().len(), 2);
    assert_ne!(env.token("me").access_token.expose(), "revoked-token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_without_talk_message_consent_says_how_to_fix_it() {
    let mut app = FakeClient::new(CLIENT_ID);
    app.scopes = vec!["profile_nickname".into()];
    let env = Env::new(FakeSettings {
        clients: vec![app],
        ..FakeSettings::default()
    })
    .await;
    env.write_config("", &["me"]);
    env.login("me");
    let out = run(&env, &["send", "hello"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("-402") && err.contains("talk_message") && err.contains("동의항목"),
        "{err}"
    );
    assert!(err.contains("kakao-tokend login --account me"), "{err}");
    assert!(env.fake.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_a_good_config_and_names_the_problem_in_a_bad_one() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    let out = run(&env, &["check-config"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("OK, 1 account"));

    std::fs::write(
        &env.config,
        "[accounts.me]\nclient_id = \"x\"\ntoken_file = \"/proc/kakao-tokend-check/me.json\"\n",
    )
    .unwrap();
    let out = run(&env, &["check-config"]).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("accounts.me.token_file"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(&env.config, "[accounts.me]\nclient_idd = \"x\"\n").unwrap();
    let out = run(&env, &["check-config"]).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("client_idd"));

    // The shipped example config is valid.
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kakao-tokend.toml");
    let out = common::output_swept(Command::new(BIN).args(["check-config", "--config"]).arg(shipped), false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// A hostile API server answers `send` with an endless body: the answer is read up to the token
/// endpoint's 1 MiB cap and refused, instead of filling memory (a 10 GB answer once took RSS to 1.2 GB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reads_at_most_a_mebibyte_of_a_hostile_answer() {
    let env = Env::new(FakeSettings::default()).await;
    let endless = axum::Router::new().fallback(|| async {
        let chunk = vec![b' '; 64 * 1024];
        let body = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
        axum::body::Body::from_stream(body)
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, endless).await });
    let account = env.account("me").replace(
        &format!("api_url = \"{}\"", env.fake.url()),
        &format!("api_url = \"{api}\""),
    );
    std::fs::write(&env.config, account).unwrap();
    env.login("me");
    let out = run(&env, &["send", "hello"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("over 1048576 bytes"),
        "{}",
        text(&out.stderr)
    );
}

/// A provider that refuses PKCE: with the default, login says what the provider said; with
/// `pkce = false` on the account, it logs in without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkce_can_be_turned_off_for_a_provider_that_refuses_it() {
    let env = Env::new(FakeSettings {
        refuse_pkce: true,
        ..FakeSettings::default()
    })
    .await;
    env.write_config("", &["me"]);
    let mut login = Login::start(&env, &["--account", "me"]).await;
    let back = browse_authorize(&login.url).await;
    assert!(back.contains("error=invalid_request"), "{back}");
    login.paste(&back);
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("code_challenge is not supported"),
        "{}",
        text(&out.stderr)
    );

    let account = env
        .account("me")
        .replace("[accounts.me]\n", "[accounts.me]\npkce = false\n");
    std::fs::write(&env.config, account).unwrap();
    let mut login = Login::start(&env, &["--account", "me"]).await;
    assert!(!login.url.contains("code_challenge"), "{}", login.url);
    let back = browse_authorize(&login.url).await;
    login.paste(&back);
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(env.fake.access_token_valid(env.token("me").access_token.expose()));
}

/// A loopback redirect whose port another program holds: login fails at once and names the port,
/// rather than let that program receive the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_names_the_port_of_a_taken_loopback_redirect() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let redirect = format!("http://localhost:{port}/callback");
    let mut app = FakeClient::new(CLIENT_ID);
    app.redirect_uris = vec![redirect.clone()];
    let env = Env::new(FakeSettings {
        clients: vec![app],
        ..FakeSettings::default()
    })
    .await;
    let account = env.account("me").replace(
        "redirect_uri = \"https://localhost.com\"",
        &format!("redirect_uri = \"{redirect}\""),
    );
    std::fs::write(&env.config, account).unwrap();
    let out = run(&env, &["login", "--account", "me"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("(port {port})")),
        "{}",
        text(&out.stderr)
    );
    drop(taken);
}

/// A RUST_LOG that is not a filter is a configuration error, 78, for the daemon and every command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rust_log_exits_78_everywhere() {
    let env = Env::new(FakeSettings::default()).await;
    env.write_config("", &["me"]);
    env.login("me");
    for args in [
        &["run"][..],
        &["status"],
        &["refresh"],
        &["token"],
        &["check-config"],
        &["send", "hi"],
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg("--config")
            .arg(&env.config)
            .env("RUST_LOG", "kakao_tokend=[[");
        let out = tokio::task::spawn_blocking(move || common::output_swept(&mut cmd, true))
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{args:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("RUST_LOG"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}
