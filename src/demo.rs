//! `kakao-tokend demo`: the real daemon against the built-in fake Kakao on loopback, with seconds-long
//! tokens, in a temporary folder. No Kakao account needed; it ends by itself.

use std::path::Path;
use std::time::Duration;

use jiff::Timestamp;

use crate::config::Config;
use crate::oauth::OAuthClient;
use crate::secret::Secret;
use crate::store;
use crate::token::TokenFile;
use fake_kakao::{FakeKakao, FakeSettings};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Daemon(#[from] crate::daemon::DaemonError),
    #[error("demo login failed: {0}")]
    Login(String),
}

const CLIENT_ID: &str = "demo-rest-api-key";

/// Logs in through the fake's authorize endpoint the way a browser would, and exchanges the code.
async fn demo_login(client: &OAuthClient, cfg: &crate::config::Account) -> Result<TokenFile, DemoError> {
    let redirect_uri = cfg.redirect_uri.clone().unwrap_or_default();
    let pkce = crate::pkce::Pkce::new().map_err(|e| DemoError::Login(e.to_string()))?;
    let url = crate::login::authorize_url(cfg, &redirect_uri, "demo", Some(&pkce.challenge));
    let resp = client
        .http_for(cfg)
        .get(url)
        .send()
        .await
        .map_err(|e| DemoError::Login(e.to_string()))?;
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| reqwest::Url::parse(l).ok())
        .ok_or_else(|| DemoError::Login("the authorize endpoint did not redirect".into()))?;
    let code = location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| Secret::new(v.into_owned()))
        .ok_or_else(|| DemoError::Login("no code in the redirect".into()))?;
    let sent_at = Timestamp::now();
    let resp = client
        .exchange_code(cfg, &code, &redirect_uri, Some(&pkce.verifier), Duration::from_secs(10))
        .await
        .map_err(|e| DemoError::Login(e.to_string()))?;
    Ok(TokenFile::from_response(resp, sent_at))
}

fn say(line: &str) {
    crate::commands::out(line);
}

pub async fn run(duration: Duration) -> Result<(), DemoError> {
    // Access tokens live 6 s and refresh tokens 20 s, rotating in their last 10 s: Kakao's 6 hours and
    // 2 months (rotating in the last month), sped up.
    let fake = FakeKakao::start(FakeSettings::fast(6, 20)).await?;
    let dir = tempfile::Builder::new().prefix("kakao-tokend-demo-").tempdir()?;
    let config_path = dir.path().join("config.toml");
    let url = fake.url();
    std::fs::write(
        &config_path,
        format!(
            r#"[daemon]
backups = 3
request_timeout = "5s"

[accounts.me]
client_id = "{CLIENT_ID}"
redirect_uri = "https://localhost.com"
token_file = "tokens/me.json"
auth_url = "{url}"
api_url = "{url}"

[accounts.seed]
client_id = "{CLIENT_ID}"
token_file = "tokens/seed.json"
auth_url = "{url}"
api_url = "{url}"
"#
        ),
    )?;
    let config = Config::load(&config_path)?;
    let client = OAuthClient::new().map_err(|e| DemoError::Login(e.to_string()))?;

    say(&format!(
        "kakao-tokend demo: a fake Kakao on {url}, files in {}",
        dir.path().display()
    ));
    say(
        "  access tokens live 6 s, refresh tokens 20 s and rotate in their last 10 s (Kakao: 6 h, 2 months, last month)",
    );

    // Account "me": a login through the authorize endpoint and a code exchange.
    let me = &config.accounts["me"];
    std::fs::create_dir_all(dir.path().join("tokens"))?;
    let first = demo_login(&client, me).await?;
    store::publish_token(&me.token_file, &first.to_bytes(), 0, Timestamp::now(), me.access)?;
    say("  me:   logged in (authorization code exchanged once), token file written in full form");

    // Account "seed": a file exactly as the blog post's script leaves it (the raw response).
    let seed = &config.accounts["seed"];
    let raw = fake.login(CLIENT_ID);
    std::fs::write(&seed.token_file, serde_json::to_vec(&raw).unwrap_or_default())?;
    say("  seed: token file in the seed's format (no expiry times): it will be refreshed at once");
    say(&format!(
        "running the daemon for {}s; its log follows on stderr",
        duration.as_secs()
    ));

    let first_rt = first.refresh_token.clone();
    crate::daemon::run(config.clone(), client, tokio::time::sleep(duration)).await?;

    let stats = fake.stats();
    say("");
    say("what happened:");
    say(&format!(
        "  refreshes: {}   refresh-token rotations: {}   refused: {}",
        stats.refreshes, stats.rotations, stats.refused
    ));
    let mut all_alive = true;
    for (name, acct) in &config.accounts {
        let file = TokenFile::parse(&std::fs::read(&acct.token_file)?).map_err(|e| DemoError::Login(e.to_string()))?;
        let alive = file
            .refresh_token
            .as_ref()
            .is_some_and(|rt| fake.refresh_token_alive(rt.expose()));
        all_alive &= alive;
        let backups = store::list_backups(&acct.token_file)?;
        say(&format!(
            "  {name}: access token valid until {}, refresh token {} (expires {}), {} backups kept",
            file.expires_at.map(|t| t.to_string()).unwrap_or_default(),
            if alive { "alive" } else { "DEAD" },
            file.refresh_token_expires_at
                .map(|t| t.to_string())
                .unwrap_or_else(|| "?".into()),
            backups.len()
        ));
        if name == "me"
            && let (Some(old), Some(new)) = (&first_rt, &file.refresh_token)
            && old != new
        {
            say(&format!(
                "        the first refresh token is {} (Kakao kills it on rotation); the file holds its successor",
                if fake.refresh_token_alive(old.expose()) {
                    "still alive"
                } else {
                    "dead"
                }
            ));
        }
    }
    say(&format!("  token files: {}", show_dir(&dir.path().join("tokens"))));
    if all_alive {
        say("every refresh token chain survived its rotations. Next: README.md, \"Real use\".");
        Ok(())
    } else {
        Err(DemoError::Login("a refresh token chain was lost".into()))
    }
}

fn show_dir(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(" ")
}
