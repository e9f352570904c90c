//! `kakao-tokend login`: the browser step of OAuth, done once per account. It builds the authorize URL
//! with a fresh `state`, opens a browser, takes the code from a loopback callback (or from what the user
//! pastes), exchanges it exactly once, and writes the token file as the daemon does.

use std::collections::HashMap;
use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use jiff::Timestamp;
use reqwest::Url;
use tokio::sync::mpsc;

use crate::config::{Account, DaemonSettings};
use crate::oauth::{OAuthClient, TokenError};
use crate::outputs;
use crate::secret::Secret;
use crate::store::{self, AccountState, StateFile, TokenLock};
use crate::token::TokenFile;

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(
        "account {0} has no redirect_uri: set it to a Redirect URI registered under 내 애플리케이션 > 카카오 로그인 > Redirect URI"
    )]
    NoRedirectUri(String),
    #[error("cannot listen on {addr} (port {}) for the redirect: {source}; free the port or change redirect_uri", .addr.port())]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("no answer within {}: run kakao-tokend login again (and finish the browser step sooner)", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the login was cancelled (access_denied): run kakao-tokend login again and agree to the consent items")]
    Denied,
    #[error("the authorize step failed: {error}{}", .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Authorize { error: String, description: Option<String> },
    #[error(
        "the pasted address belongs to another login (its state does not match): paste the address from this login's window"
    )]
    StateMismatch,
    #[error("no code found in what was pasted: paste the whole address the browser ended on, or the code after code=")]
    NoCode,
    #[error("cannot read the answer from stdin: {0}")]
    Stdin(io::Error),
    #[error("the code exchange failed: {0}")]
    Exchange(TokenError),
    #[error("cannot write token file {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error(
        "the operating system gave no randomness for the login's state and PKCE verifier ({0}): check that /dev/urandom or getrandom(2) works"
    )]
    Randomness(getrandom::Error),
}

impl LoginError {
    /// What to do, for errors that come from the provider's table.
    pub fn fix(&self, account: &str) -> Option<String> {
        match self {
            LoginError::Exchange(e) => Some(e.fix(account)),
            _ => None,
        }
    }
}

/// The `state` that ties the redirect to this login (RFC 6749 10.12): 256 bits from the operating
/// system's CSPRNG, so no one who saw earlier logins can forge a callback.
fn random_state() -> Result<String, LoginError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(LoginError::Randomness)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `{authorize_url}?client_id=…&redirect_uri=…&response_type=code&state=…[&scope=…]`, and with PKCE
/// `&code_challenge=…&code_challenge_method=S256`.
pub fn authorize_url(account: &Account, redirect_uri: &str, state: &str, challenge: Option<&str>) -> Url {
    let mut url = Url::clone(&account.authorize_url);
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("client_id", &account.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("response_type", "code")
            .append_pair("state", state);
        if let Some(scope) = &account.scope {
            q.append_pair("scope", scope);
        }
        if let Some(challenge) = challenge {
            q.append_pair("code_challenge", challenge)
                .append_pair("code_challenge_method", crate::pkce::METHOD);
        }
    }
    url
}

/// The addresses to listen on when the redirect URI is a loopback http address with a port: for
/// `localhost`, both 127.0.0.1 and ::1, since the browser may resolve it to either (and another user's
/// listener on the other one would receive the code).
pub fn loopback_listen_addrs(redirect_uri: &str) -> Option<(Vec<SocketAddr>, String)> {
    let url = Url::parse(redirect_uri).ok()?;
    let (first, path) = loopback_listen_addr(redirect_uri)?;
    let mut addrs = vec![first];
    if matches!(url.host(), Some(url::Host::Domain("localhost"))) {
        addrs.push(SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), first.port()));
    }
    Some((addrs, path))
}

/// The first address to listen on when the redirect URI is a loopback http address with a port.
fn loopback_listen_addr(redirect_uri: &str) -> Option<(SocketAddr, String)> {
    let url = Url::parse(redirect_uri).ok()?;
    if url.scheme() != "http" {
        return None;
    }
    let port = url.port()?;
    let ip: std::net::IpAddr = match url.host()? {
        url::Host::Domain("localhost") => [127, 0, 0, 1].into(),
        url::Host::Ipv4(ip) if ip.is_loopback() => ip.into(),
        url::Host::Ipv6(ip) if ip.is_loopback() => ip.into(),
        _ => return None,
    };
    Some((SocketAddr::new(ip, port), url.path().to_string()))
}

/// What came back from the authorize step: a code, or an error, for the expected state.
#[derive(Debug, PartialEq)]
enum Answer {
    Code(Secret),
    Error { error: String, description: Option<String> },
}

/// Compares without a shortcut at the first differing byte, so the time a local attacker's guesses
/// take tells nothing about the `state` (its length is public: 64 hex digits).
fn same_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads `code`/`error` from a redirect's query, checking `state` when there is one.
fn answer_from_query(
    q: &HashMap<String, String>,
    expected_state: &str,
    state_required: bool,
) -> Result<Answer, LoginError> {
    match q.get("state") {
        Some(s) if !same_in_constant_time(s.as_bytes(), expected_state.as_bytes()) => {
            return Err(LoginError::StateMismatch);
        }
        None if state_required => return Err(LoginError::StateMismatch),
        _ => {}
    }
    if let Some(error) = q.get("error") {
        return Ok(Answer::Error {
            error: error.clone(),
            description: q.get("error_description").cloned(),
        });
    }
    q.get("code")
        .filter(|c| !c.is_empty())
        .map(|c| Answer::Code(Secret::new(c.clone())))
        .ok_or(LoginError::NoCode)
}

/// Parses what a user pasted: the whole address the browser ended on, or the bare code.
fn parse_pasted(text: &str, expected_state: &str) -> Result<Answer, LoginError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(LoginError::NoCode);
    }
    let looks_like_url =
        text.contains("://") || text.contains('?') || text.contains("code=") || text.contains("error=");
    if !looks_like_url {
        return Ok(Answer::Code(Secret::new(text)));
    }
    let url = if text.contains("://") {
        Url::parse(text)
    } else if text.contains('?') {
        Url::parse(&format!("https://{text}"))
    } else {
        // Only the query part ("code=...&state=...").
        Url::parse(&format!("https://x/?{text}"))
    }
    .map_err(|_| LoginError::NoCode)?;
    let q: HashMap<String, String> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    answer_from_query(&q, expected_state, false)
}

struct Callback {
    path: String,
    state: String,
    answer: Mutex<Option<mpsc::Sender<Answer>>>,
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><meta charset=utf-8><title>kakao-tokend</title>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{title}</h1><p>{body}</p></body>"
    );
    (status, Html(html)).into_response()
}

async fn on_callback(State(cb): State<Arc<Callback>>, uri: Uri) -> Response {
    if uri.path() != cb.path {
        return page(
            StatusCode::NOT_FOUND,
            "Not found",
            "This is kakao-tokend's login listener.",
        );
    }
    let q: HashMap<String, String> = uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    // Only the callback of this login counts: anything else (a forged or stale request) is refused and
    // ignored, and the listener keeps waiting.
    let answer = match answer_from_query(&q, &cb.state, true) {
        Ok(a) => a,
        Err(_) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Refused",
                "This request does not belong to the login in progress.",
            );
        }
    };
    let Some(tx) = cb
        .answer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    else {
        return page(
            StatusCode::CONFLICT,
            "Already done",
            "This login has already received its answer.",
        );
    };
    let ok = matches!(answer, Answer::Code(_));
    let _ = tx.send(answer).await;
    if ok {
        page(
            StatusCode::OK,
            "Logged in",
            "kakao-tokend received the authorization code. You can close this window.",
        )
    } else {
        page(
            StatusCode::OK,
            "Login not completed",
            "kakao-tokend received an error; see the terminal.",
        )
    }
}

/// The loopback listener for the redirect, bound before the URL is shown so that a fast browser cannot
/// arrive before it.
struct CallbackListener {
    servers: Vec<tokio::task::JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    answers: mpsc::Receiver<Answer>,
}

/// The address family is missing (a host or container without IPv6), as opposed to the address being
/// taken.
fn family_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrNotAvailable
        || e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT)
        || e.raw_os_error() == Some(nix::libc::EADDRNOTAVAIL)
}

impl CallbackListener {
    /// Binds every address; the first must work, a later one (::1 beside 127.0.0.1) may be missing
    /// where IPv6 is, but never taken.
    async fn bind(addrs: &[SocketAddr], path: String, state: String) -> Result<CallbackListener, LoginError> {
        let mut listeners = Vec::new();
        for (i, &addr) in addrs.iter().enumerate() {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => listeners.push(l),
                Err(e) if i > 0 && family_absent(&e) => {}
                Err(source) => return Err(LoginError::Listen { addr, source }),
            }
        }
        let (tx, answers) = mpsc::channel(1);
        let path = if path.is_empty() { "/".to_string() } else { path };
        let cb = Arc::new(Callback {
            path,
            state,
            answer: Mutex::new(Some(tx)),
        });
        let app = Router::new().fallback(on_callback).with_state(cb);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let servers = listeners
            .into_iter()
            .map(|listener| {
                let app = app.clone();
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        })
                        .await;
                })
            })
            .collect();
        Ok(CallbackListener { servers, stop, answers })
    }

    async fn wait(mut self, timeout: Duration) -> Result<Answer, LoginError> {
        let answer = tokio::time::timeout(timeout, self.answers.recv()).await;
        // A graceful stop lets the browser receive its page; a browser holding the connection open
        // gets two seconds.
        let _ = self.stop.send(true);
        let grace = tokio::time::Instant::now() + Duration::from_secs(2);
        for server in &mut self.servers {
            if tokio::time::timeout_at(grace, &mut *server).await.is_err() {
                server.abort();
            }
        }
        match answer {
            Ok(Some(a)) => Ok(a),
            _ => Err(LoginError::Timeout(timeout)),
        }
    }
}

async fn read_pasted(state: String, timeout: Duration) -> Result<Answer, LoginError> {
    let read = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        io::stdin().lock().read_line(&mut line).map(|_| line)
    });
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(Ok(line))) => parse_pasted(&line, &state),
        Ok(Ok(Err(e))) => Err(LoginError::Stdin(e)),
        Ok(Err(e)) => Err(LoginError::Stdin(io::Error::other(e))),
        Err(_) => Err(LoginError::Timeout(timeout)),
    }
}

/// Opens `url` in `$BROWSER` (a `:`-separated list, `%s` standing for the URL) or the desktop's
/// default. Returns whether a browser was started; having none is fine.
pub fn open_browser(url: &str) -> bool {
    let candidates: Vec<String> = match std::env::var("BROWSER") {
        Ok(b) if !b.trim().is_empty() => b.split(':').map(str::to_owned).collect(),
        _ => vec!["xdg-open".into(), "open".into()],
    };
    for c in candidates {
        let mut parts = c.split_whitespace().map(|p| p.replace("%s", url));
        let Some(program) = parts.next() else { continue };
        let mut args: Vec<String> = parts.collect();
        if !c.contains("%s") {
            args.push(url.to_string());
        }
        let spawned = std::process::Command::new(program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if spawned.is_ok() {
            return true;
        }
    }
    false
}

/// How the user is told what to do; the URL goes to stdout on a line of its own, the rest to stderr.
pub trait Prompt {
    fn url(&self, url: &str);
    fn note(&self, text: &str);
}

/// Runs the whole login for `account` and writes its token file. Returns the new file.
pub async fn login(
    client: &OAuthClient,
    store: &dyn store::TokenStore,
    account: &Account,
    settings: &DaemonSettings,
    timeout: Duration,
    prompt: &dyn Prompt,
) -> Result<TokenFile, LoginError> {
    let redirect_uri = account
        .redirect_uri
        .clone()
        .ok_or_else(|| LoginError::NoRedirectUri(account.name.to_string()))?;
    let state = random_state()?;
    let pkce = if account.pkce {
        Some(crate::pkce::Pkce::new().map_err(LoginError::Randomness)?)
    } else {
        None
    };
    let url = authorize_url(
        account,
        &redirect_uri,
        &state,
        pkce.as_ref().map(|p| p.challenge.as_str()),
    );
    let listener = match loopback_listen_addrs(&redirect_uri) {
        Some((addrs, path)) => Some(CallbackListener::bind(&addrs, path, state.clone()).await?),
        None => None,
    };
    prompt.note(&format!(
        "Open this address in a browser and log in to Kakao (account {}):",
        account.name
    ));
    prompt.url(url.as_str());
    let opened = open_browser(url.as_str());
    let answer = match listener {
        Some(listener) => {
            prompt.note(&format!(
                "{}waiting up to {} for the browser to come back to {redirect_uri}",
                if opened { "A browser was opened; " } else { "" },
                humantime::format_duration(timeout)
            ));
            listener.wait(timeout).await?
        }
        None => {
            prompt.note(&format!(
                "After logging in, the browser ends on {redirect_uri}?code=... (a page that may not load: that is fine).\n\
                 Paste that whole address here (or just the code) and press Enter:"
            ));
            read_pasted(state.clone(), timeout).await?
        }
    };
    let code = match answer {
        Answer::Code(c) => c,
        Answer::Error { error, .. } if error == "access_denied" => return Err(LoginError::Denied),
        Answer::Error { error, description } => {
            return Err(LoginError::Authorize {
                error: crate::oauth::scrub(&error),
                description: description.map(|d| crate::oauth::scrub(&d)),
            });
        }
    };

    // The folder, the lock and room for the file come first: a code is spent by its exchange, so a
    // folder that cannot be written to must show before it is.
    let path = account.token_file.clone();
    let write_err = |source: io::Error| LoginError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(write_err)?;
        }
    }
    let _lock = TokenLock::acquire(&path).await.map_err(write_err)?;
    let reserved = store::Reservation::take(&path, 0).map_err(write_err)?;
    // With etcd, the record is where the new token goes: it must answer before the code is spent.
    if store.files_are_outputs() {
        let _ = store.read(account, None).await;
        if !store.is_up() {
            return Err(write_err(io::Error::other(
                "etcd does not answer, so the new token could not be recorded; no code was spent: try again once etcd answers",
            )));
        }
    }

    // The code works exactly once (a second use is KOE320): one request, no retry.
    let sent_at = Timestamp::now();
    let resp = client
        .exchange_code(
            account,
            &code,
            &redirect_uri,
            pkce.as_ref().map(|p| &p.verifier),
            settings.request_timeout,
        )
        .await
        .map_err(LoginError::Exchange)?;
    match crate::token::usable(&resp) {
        crate::token::Usable::Whole => {}
        // A first login has no earlier token to keep: nothing of a hostile answer is written.
        crate::token::Usable::RefreshTokenOnly(why) | crate::token::Usable::Nothing(why) => {
            return Err(LoginError::Exchange(TokenError::Unusable(why)));
        }
    }
    let file = TokenFile::from_response(resp, sent_at);
    let published = store.put_login(account, &file, settings.backups, Some(reserved)).await;
    let report = published.result.map_err(write_err)?;
    if let Some(e) = report.env_error {
        prompt.note(&format!("warning: the env file could not be written: {e}"));
    }
    // With etcd, every replica's daemon runs the hook as it publishes the new record.
    if !store.files_are_outputs()
        && let Err(e) = outputs::run_hook(account, settings.hook_timeout).await
    {
        prompt.note(&format!("warning: on_refresh hook failed: {e}"));
    }
    let mut state = AccountState::default();
    state.record_success(sent_at);
    let _ = state.save(&path);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_comparison() {
        assert!(same_in_constant_time(b"abc", b"abc"));
        assert!(!same_in_constant_time(b"abc", b"abd"));
        assert!(!same_in_constant_time(b"abc", b"ab"));
        assert!(same_in_constant_time(b"", b""));
    }

    #[test]
    fn states_are_256_bits_and_never_repeat() {
        let states: std::collections::HashSet<String> = (0..1000).map(|_| random_state().unwrap()).collect();
        assert_eq!(states.len(), 1000);
        assert!(
            states
                .iter()
                .all(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        );
    }

    #[test]
    fn loopback_redirects_are_recognised() {
        assert_eq!(
            loopback_listen_addr("http://localhost:8765/callback"),
            Some(("127.0.0.1:8765".parse().unwrap(), "/callback".into()))
        );
        assert_eq!(
            loopback_listen_addr("http://127.0.0.1:9/"),
            Some(("127.0.0.1:9".parse().unwrap(), "/".into()))
        );
        assert_eq!(
            loopback_listen_addr("http://[::1]:9/cb"),
            Some(("[::1]:9".parse().unwrap(), "/cb".into()))
        );
        // The seed's redirect: no listener, paste instead.
        assert_eq!(loopback_listen_addr("https://localhost.com"), None);
        assert_eq!(loopback_listen_addr("http://localhost/cb"), None);
        assert_eq!(loopback_listen_addr("https://127.0.0.1:9/cb"), None);
        assert_eq!(loopback_listen_addr("http://example.com:9/cb"), None);
    }

    #[test]
    fn pasted_addresses_and_codes() {
        let code = |a: Answer| match a {
            Answer::Code(c) => c.expose().to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(parse_pasted("https://localhost.com/?code=abc&state=S\n", "S").unwrap()),
            "abc"
        );
        assert_eq!(code(parse_pasted("localhost.com/?code=abc", "S").unwrap()), "abc");
        assert_eq!(code(parse_pasted("  abcDEF123  ", "S").unwrap()), "abcDEF123");
        assert_eq!(code(parse_pasted("code=xyz&state=S", "S").unwrap()), "xyz");
        assert!(matches!(
            parse_pasted("https://localhost.com/?code=abc&state=OTHER", "S"),
            Err(LoginError::StateMismatch)
        ));
        assert!(matches!(
            parse_pasted(
                "https://localhost.com/?error=access_denied&error_description=User%20denied%20access&state=S",
                "S"
            ),
            Ok(Answer::Error { .. })
        ));
        assert!(matches!(
            parse_pasted("https://localhost.com/?foo=1", "S"),
            Err(LoginError::NoCode)
        ));
        assert!(matches!(parse_pasted("", "S"), Err(LoginError::NoCode)));
    }

    #[test]
    fn the_authorize_url_carries_everything_kakao_needs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[accounts.me]\nclient_id = \"KEY\"\nscope = \"talk_message, profile_nickname\"\n",
        )
        .unwrap();
        let cfg = crate::config::Config::load(&path).unwrap();
        let url = authorize_url(&cfg.accounts["me"], "https://localhost.com", "ST", Some("CH"));
        let q: HashMap<String, String> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        assert_eq!(url.path(), "/oauth/authorize");
        assert_eq!(q["client_id"], "KEY");
        assert_eq!(q["redirect_uri"], "https://localhost.com");
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["state"], "ST");
        assert_eq!(q["scope"], "talk_message,profile_nickname");
        assert_eq!(
            (q["code_challenge"].as_str(), q["code_challenge_method"].as_str()),
            ("CH", "S256")
        );
        let plain = authorize_url(&cfg.accounts["me"], "https://localhost.com", "ST", None);
        assert!(!plain.as_str().contains("code_challenge"), "{plain}");
    }

    #[test]
    fn localhost_is_heard_on_both_loopback_addresses() {
        assert_eq!(
            loopback_listen_addrs("http://localhost:8765/cb"),
            Some((
                vec!["127.0.0.1:8765".parse().unwrap(), "[::1]:8765".parse().unwrap()],
                "/cb".into()
            ))
        );
        assert_eq!(
            loopback_listen_addrs("http://127.0.0.1:9/"),
            Some((vec!["127.0.0.1:9".parse().unwrap()], "/".into()))
        );
        assert_eq!(loopback_listen_addrs("https://localhost.com"), None);
    }
}
