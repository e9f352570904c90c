//! The commands for people around the daemon: refresh, status, token, send and check-config (login has
//! its own module). They share the daemon's config, lock, merge and write rules, print results on stdout
//! and problems on stderr, and never print a token, except `token`, whose job that is.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;

use crate::config::{Account, Config};
use crate::exit::Exit;
use crate::kapi::{self, ApiError};
use crate::oauth::OAuthClient;
use crate::refresh::{self, Outcome, RefreshNowError};
use crate::store::{self, AccountState, ReadError, StateFile, TokenStore};
use crate::token::TokenFile;

/// An access token with less than this left is refreshed before `token` or `send` hands it out.
pub const MIN_REMAINING: Duration = Duration::from_secs(60);

/// A line of command output. A closed pipe (`| head -1`) is not worth a panic.
pub fn out(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A line of diagnostics on stderr.
pub fn err(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The accounts a command acts on: the named one, or, with none named, every account (`all`) or the
/// only one.
pub fn select(config: &Config, name: Option<&str>, all: bool) -> Result<Vec<Arc<Account>>, String> {
    let names = || config.accounts.keys().cloned().collect::<Vec<_>>().join(", ");
    match name {
        Some(n) => config
            .accounts
            .get(n)
            .map(|a| vec![a.clone()])
            .ok_or_else(|| format!("no account {n:?} in {} (accounts: {})", config.path.display(), names())),
        None if all => Ok(config.accounts.values().cloned().collect()),
        None => match config.accounts.len() {
            1 => Ok(config.accounts.values().cloned().collect()),
            0 => Err(format!("{} has no [accounts.NAME] table", config.path.display())),
            _ => Err(format!("name one with --account (accounts: {})", names())),
        },
    }
}

fn fresh(file: &TokenFile, now: Timestamp) -> bool {
    file.expires_at
        .is_some_and(|exp| crate::schedule::until(exp, now) >= MIN_REMAINING)
}

fn explain(account: &str, e: &RefreshNowError) -> String {
    let fix = match e {
        RefreshNowError::Token(t) => t.fix(account),
        RefreshNowError::Read {
            source: ReadError::Missing,
            ..
        } => format!("log in: kakao-tokend login --account {account}"),
        RefreshNowError::Read { .. } => {
            format!("restore a backup or log in again: kakao-tokend login --account {account}")
        }
        RefreshNowError::Lock { .. } | RefreshNowError::Write { .. } | RefreshNowError::Unwritable { .. } => {
            "check the folder's permissions and free space".into()
        }
    };
    format!("{account}: {e}\n  fix: {fix}")
}

/// `kakao-tokend refresh`: every named account, now.
pub async fn refresh(client: &OAuthClient, store: &dyn TokenStore, config: &Config, accounts: &[Arc<Account>]) -> Exit {
    let mut failed = 0;
    for a in accounts {
        match refresh::refresh_now(client, store, a, &config.daemon, |_| true).await {
            Ok(Outcome::Refreshed(r, report)) => {
                let mut line = format!(
                    "{}: refreshed; access token valid until {}",
                    a.name,
                    r.file.expires_at.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
                );
                if r.rotated {
                    line.push_str(&format!(
                        "; new refresh token, valid until {}",
                        r.file
                            .refresh_token_expires_at
                            .map(|t| t.to_string())
                            .unwrap_or_else(|| "?".into())
                    ));
                }
                if let Some(b) = report.backup.as_ref().and_then(|b| b.file_name()) {
                    line.push_str(&format!("; backup {}", b.to_string_lossy()));
                }
                out(&line);
            }
            Ok(Outcome::NotNeeded(_)) => out(&format!("{}: already fresh", a.name)),
            Err(e) => {
                failed += 1;
                err(&explain(&a.name, &e));
            }
        }
    }
    if failed == 0 { Exit::Success } else { Exit::Failure }
}

/// Whether `file` is due for a refresh at `now` under the daemon's schedule (no jitter).
pub fn is_due(file: &TokenFile, settings: &crate::config::DaemonSettings, now: Timestamp) -> bool {
    let lifetime = Duration::from_secs(
        file.lifetime_secs()
            .unwrap_or(crate::token::DEFAULT_LIFETIME_SECS)
            .max(0) as u64,
    );
    let times = crate::schedule::TokenTimes {
        expires_at: file.expires_at,
        lifetime,
        last_refresh: None,
    };
    crate::schedule::next_refresh(times, settings.refresh_before_expiry, 0.0, now) <= now
}

/// `kakao-tokend run --once`: refresh what is due (everything with `force`), write, exit; for init
/// containers and cron.
pub async fn run_once(client: &OAuthClient, store: &dyn TokenStore, config: &Config, force: bool) -> Exit {
    let mut failed = 0;
    for a in config.accounts.values() {
        let needed = |f: &TokenFile| force || is_due(f, &config.daemon, Timestamp::now());
        match refresh::refresh_now(client, store, a, &config.daemon, needed).await {
            Ok(Outcome::Refreshed(r, _)) => out(&format!(
                "{}: refreshed; access token valid until {}",
                a.name,
                r.file.expires_at.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
            )),
            Ok(Outcome::NotNeeded(cur)) => out(&format!(
                "{}: not due; access token valid until {}",
                a.name,
                cur.file.expires_at.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
            )),
            Err(e) => {
                failed += 1;
                err(&explain(&a.name, &e));
            }
        }
    }
    if failed == 0 { Exit::Success } else { Exit::Failure }
}

/// One line of `status`, and one object of `status --json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AccountStatus {
    pub account: String,
    pub token_file: String,
    /// valid, expired, missing, unreadable, needs_login
    pub state: &'static str,
    pub access_token_valid: bool,
    pub access_token_expires_at: Option<Timestamp>,
    pub refresh_token_expires_at: Option<Timestamp>,
    pub last_refresh_at: Option<Timestamp>,
    pub consecutive_failures: u32,
    pub last_error_code: Option<String>,
    /// Why the token file is unreadable (never its content).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// With etcd: `up`, or `degraded` when etcd did not answer (the token shown is the local file's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<&'static str>,
}

/// Says how an account stands at `now`, from its token (as the store has it) and its state file.
pub fn status_of(account: &Account, token: Result<store::Current, ReadError>, now: Timestamp) -> AccountStatus {
    let state = AccountState::load(&account.token_file)
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut s = AccountStatus {
        account: account.name.to_string(),
        token_file: account.token_file.display().to_string(),
        state: "valid",
        access_token_valid: false,
        access_token_expires_at: None,
        refresh_token_expires_at: None,
        last_refresh_at: state.last_success_at(),
        consecutive_failures: state.consecutive_failures(),
        last_error_code: state.last_error_code().map(str::to_owned),
        problem: None,
        store: None,
    };
    match token {
        Err(ReadError::Missing) => s.state = "missing",
        Err(e) => {
            s.state = "unreadable";
            s.problem = Some(e.to_string());
        }
        Ok(cur) => {
            let f = &cur.file;
            s.access_token_expires_at = f.expires_at;
            s.refresh_token_expires_at = f.refresh_token_expires_at;
            s.access_token_valid = f.expires_at.is_some_and(|e| e > now);
            let refresh_dead = f.refresh_token.is_none() || f.refresh_token_expires_at.is_some_and(|e| e <= now);
            s.state = if state.needs_login() || refresh_dead {
                "needs_login"
            } else if s.access_token_valid {
                "valid"
            } else {
                "expired"
            };
            if s.last_refresh_at.is_none() {
                s.last_refresh_at = std::fs::metadata(&account.token_file)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| Timestamp::try_from(m).ok())
                    .map(crate::token::floor_to_second);
            }
        }
    }
    s
}

fn when(t: Option<Timestamp>, now: Timestamp) -> String {
    let Some(t) = t else { return "-".into() };
    let d = t.duration_since(now);
    let secs = d.as_secs();
    let span = humantime::format_duration(Duration::from_secs(secs.unsigned_abs())).to_string();
    // Two most significant units are enough for people.
    let span: String = span.split(' ').take(2).collect::<Vec<_>>().join(" ");
    if secs >= 0 {
        format!("{t} (in {span})")
    } else {
        format!("{t} ({span} ago)")
    }
}

/// `kakao-tokend status`. Degraded etcd alone does not fail it while the tokens are valid: a
/// healthcheck must not restart every replica during an etcd outage.
pub async fn status(store: &dyn TokenStore, accounts: &[Arc<Account>], json: bool) -> Exit {
    let now = Timestamp::now();
    let mut all: Vec<AccountStatus> = Vec::new();
    for a in accounts {
        let token = store.read(a, None).await.token;
        let mut s = status_of(a, token, now);
        if store.files_are_outputs() {
            s.store = Some(if store.is_up() { "up" } else { "degraded" });
        }
        all.push(s);
    }
    if json {
        out(&serde_json::to_string_pretty(&all).unwrap_or_else(|_| "[]".into()));
    } else {
        for s in &all {
            out(&format!("{}: {}", s.account, s.state));
            out(&format!("  token file     {}", s.token_file));
            out(&format!("  access token   {}", when(s.access_token_expires_at, now)));
            out(&format!("  refresh token  {}", when(s.refresh_token_expires_at, now)));
            out(&format!("  last refresh   {}", when(s.last_refresh_at, now)));
            if let Some(p) = &s.problem {
                out(&format!("  problem        the token file {p}"));
            }
            match s.store {
                Some("degraded") => out("  store          etcd (degraded: unreachable; showing the local file)"),
                Some(_) => out("  store          etcd"),
                None => {}
            }
            if s.consecutive_failures > 0 || s.last_error_code.is_some() {
                out(&format!(
                    "  last error     {} ({} failures in a row)",
                    s.last_error_code.as_deref().unwrap_or("-"),
                    s.consecutive_failures
                ));
            }
            if s.state == "needs_login" || s.state == "missing" {
                out(&format!("  fix            kakao-tokend login --account {}", s.account));
            }
        }
    }
    if all.iter().all(|s| s.access_token_valid) {
        Exit::Success
    } else {
        Exit::Failure
    }
}

/// A token file whose access token has at least [`MIN_REMAINING`] left, refreshing it first if needed.
pub async fn fresh_token(
    client: &OAuthClient,
    store: &dyn TokenStore,
    config: &Config,
    account: &Account,
) -> Result<TokenFile, String> {
    let now = Timestamp::now();
    match store.read(account, None).await.token {
        Ok(cur) if fresh(&cur.file, now) => return Ok(cur.file),
        Ok(_) => {}
        Err(ReadError::Missing) => {
            return Err(format!(
                "{}: token file {} does not exist\n  fix: kakao-tokend login --account {}",
                account.name,
                account.token_file.display(),
                account.name
            ));
        }
        Err(e) => {
            return Err(format!(
                "{}: token file {} {e}",
                account.name,
                account.token_file.display()
            ));
        }
    }
    match refresh::refresh_now(client, store, account, &config.daemon, |f| !fresh(f, Timestamp::now())).await {
        Ok(Outcome::Refreshed(r, _)) => Ok(r.file),
        Ok(Outcome::NotNeeded(cur)) => Ok(cur.file),
        Err(e) => Err(explain(&account.name, &e)),
    }
}

/// `kakao-tokend token`: the access token alone on stdout.
pub async fn token(client: &OAuthClient, store: &dyn TokenStore, config: &Config, account: &Account) -> Exit {
    match fresh_token(client, store, config, account).await {
        Ok(file) => {
            out(file.access_token.expose());
            Exit::Success
        }
        Err(e) => {
            err(&e);
            Exit::Failure
        }
    }
}

/// `kakao-tokend send`.
pub async fn send(
    client: &OAuthClient,
    store: &dyn TokenStore,
    config: &Config,
    account: &Account,
    text: &str,
    link: Option<&str>,
    button_title: Option<&str>,
) -> Exit {
    let link = link.or(account.message_link.as_deref());
    let template = kapi::text_template(text, link, button_title);
    let timeout = config.daemon.request_timeout;
    let mut file = match fresh_token(client, store, config, account).await {
        Ok(f) => f,
        Err(e) => {
            err(&e);
            return Exit::Failure;
        }
    };
    let mut retried = false;
    loop {
        match kapi::send_to_me(client, account, &file.access_token, &template, timeout).await {
            Ok(()) => {
                out(&format!("{}: sent", account.name));
                return Exit::Success;
            }
            // The token was refused although it looked valid (revoked, or its expiry unknown): refresh
            // once, unless someone else already has, and retry once.
            Err(ApiError::Refused { code: -401, .. }) if !retried => {
                retried = true;
                let used = file.access_token.clone();
                match refresh::refresh_now(client, store, account, &config.daemon, |f| f.access_token == used).await {
                    Ok(Outcome::Refreshed(r, _)) => file = r.file,
                    Ok(Outcome::NotNeeded(cur)) => file = cur.file,
                    Err(e) => {
                        err(&explain(&account.name, &e));
                        return Exit::Failure;
                    }
                }
            }
            Err(e) => {
                err(&format!(
                    "{}: send failed: {e}\n  fix: {}",
                    account.name,
                    e.fix(&account.name)
                ));
                return Exit::Failure;
            }
        }
    }
}

/// `kakao-tokend check-config`: the config loads, and each token file's folder can be written (or
/// created) by this user.
pub fn check_config(config: &Config) -> Exit {
    let mut problems = 0;
    for a in config.accounts.values() {
        let dir = a.token_file.parent().unwrap_or(std::path::Path::new("."));
        let existing = dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(std::path::Path::new("/"));
        let check = if existing.is_dir() {
            tempfile::Builder::new()
                .prefix(".kakao-tokend-check-")
                .tempfile_in(existing)
                .map(drop)
        } else {
            Err(std::io::Error::other(format!("{} is not a folder", existing.display())))
        };
        match check {
            Ok(()) if existing == dir => out(&format!(
                "{}: token file {} (folder writable)",
                a.name,
                a.token_file.display()
            )),
            Ok(()) => out(&format!(
                "{}: token file {} (folder will be created in {})",
                a.name,
                a.token_file.display(),
                existing.display()
            )),
            Err(e) => {
                problems += 1;
                err(&format!(
                    "{}: `accounts.{}.token_file`: cannot write in {}: {e}",
                    config.path.display(),
                    a.name,
                    existing.display()
                ));
            }
        }
        if a.redirect_uri.is_none() {
            out(&format!(
                "{}: note: no redirect_uri, so `login` cannot be used for this account",
                a.name
            ));
        }
    }
    for f in crate::permissions::check(config) {
        match f.severity {
            crate::permissions::Severity::Warn => err(&format!("warning: {}", f.message)),
            crate::permissions::Severity::Refuse => {
                problems += 1;
                err(&f.message);
            }
        }
    }
    if problems > 0 {
        return Exit::Config;
    }
    out(&format!(
        "{}: OK, {} account(s)",
        config.path.display(),
        config.accounts.len()
    ));
    Exit::Success
}
