//! Talking to the token endpoint: one shared HTTP client and the two grant requests. What an answer
//! means (a token, a transient failure, a permanent refusal) is decided by the core's
//! [`kakao_tokend_core::answer`], re-exported here.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use kakao_tokend_core::answer::{TokenError, classify, scrub, scrub_location};

use crate::config::Account;
use crate::secret::Secret;
use crate::token::{MAX_DOCUMENT_BYTES, ParseError, TokenResponse};

/// Why an answer's body was not read whole.
#[derive(Debug)]
pub enum Capped {
    TooLarge,
    Read(reqwest::Error),
}

/// Reads an answer's body, at most [`MAX_DOCUMENT_BYTES`] of it: a provider (or a proxy) streaming
/// garbage cannot fill memory. Every answer the binary reads goes through here.
pub async fn read_capped(resp: &mut reqwest::Response) -> Result<Vec<u8>, Capped> {
    if resp.content_length().is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64) {
        return Err(Capped::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Capped::Read)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(Capped::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// How long past its deadline an exchange may still finish: enough for an answer that has already
/// arrived to be read after the process wakes from a freeze, far inside the 2 s a lease keeps for the
/// write.
pub const ANSWER_GRACE: Duration = Duration::from_millis(200);

pub const USER_AGENT: &str = concat!("kakao-tokend/", env!("CARGO_PKG_VERSION"));

/// The reason chain of a transport error, without the URL's query (there is none on the token
/// endpoint, but be safe) and without any request body (reqwest never prints one).
fn transport_reason(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".to_string());
    } else if e.is_connect() {
        parts.push("connection failed".to_string());
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p == &text) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        parts.push("request failed".into());
    }
    scrub(&parts.join(": "))
}

/// The HTTP client of the process: one connection pool shared by every account (and one more per
/// distinct `ca_file`), rustls, no redirects (a redirected token request could carry the refresh token
/// elsewhere). Proxies come from the standard HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY variables.
#[derive(Clone)]
pub struct OAuthClient {
    http: reqwest::Client,
    /// Clients trusting an extra CA, built on first use and shared by every account naming that file.
    with_ca: Arc<Mutex<HashMap<PathBuf, reqwest::Client>>>,
}

impl fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthClient").finish_non_exhaustive()
    }
}

fn builder() -> reqwest::ClientBuilder {
    crate::crypto::install_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
}

impl OAuthClient {
    pub fn new() -> Result<OAuthClient, reqwest::Error> {
        Ok(OAuthClient {
            http: builder().build()?,
            with_ca: Arc::default(),
        })
    }

    /// The client for `account`: the shared one, or the one that also trusts its `ca_file`.
    pub fn http_for(&self, account: &Account) -> reqwest::Client {
        let Some(ca) = &account.ca_file else {
            return self.http.clone();
        };
        let mut cache = self.with_ca.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = cache.get(&**ca) {
            return c.clone();
        }
        // The config checked the file at load; should it have changed since, fall back to the shared
        // client and let the TLS handshake say what is wrong.
        match crate::ca::load_ca_file(ca)
            .map_err(io::Error::other)
            .and_then(|certs| builder().tls_certs_merge(certs).build().map_err(io::Error::other))
        {
            Ok(client) => {
                cache.insert(ca.to_path_buf(), client.clone());
                client
            }
            Err(e) => {
                tracing::warn!(ca_file = %ca.display(), "cannot use the CA file: {e}");
                self.http.clone()
            }
        }
    }

    /// `grant_type=refresh_token`.
    pub async fn refresh(
        &self,
        account: &Account,
        refresh_token: &Secret,
        timeout: Duration,
    ) -> Result<TokenResponse, TokenError> {
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("client_id", &*account.client_id),
            ("refresh_token", refresh_token.expose()),
        ];
        if let Some(s) = &account.client_secret {
            form.push(("client_secret", s.expose()));
        }
        self.token_request(account, &form, timeout).await
    }

    /// `grant_type=authorization_code`: the code is sent exactly once.
    pub async fn exchange_code(
        &self,
        account: &Account,
        code: &Secret,
        redirect_uri: &str,
        code_verifier: Option<&Secret>,
        timeout: Duration,
    ) -> Result<TokenResponse, TokenError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("client_id", &*account.client_id),
            ("redirect_uri", redirect_uri),
            ("code", code.expose()),
        ];
        if let Some(v) = code_verifier {
            form.push(("code_verifier", v.expose()));
        }
        if let Some(s) = &account.client_secret {
            form.push(("client_secret", s.expose()));
        }
        self.token_request(account, &form, timeout).await
    }

    async fn token_request(
        &self,
        account: &Account,
        form: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<TokenResponse, TokenError> {
        let url: &reqwest::Url = &account.token_url;
        let shown = format!("{}{}", url.origin().ascii_serialization(), url.path());
        let transport = |e: reqwest::Error| TokenError::Transport {
            url: shown.clone(),
            reason: transport_reason(&e),
        };
        // The deadline wraps the whole exchange, with a short grace after it: after a freeze (a paused
        // container, a suspended machine) the deadline has passed when the process wakes, but an answer
        // already in the socket is read rather than dropped. It may hold the only live refresh token.
        let exchange = async {
            let mut resp = self
                .http_for(account)
                .post(url.clone())
                // Set before .form(), which keeps an existing Content-Type: Kakao documents the charset.
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded;charset=utf-8",
                )
                .header(reqwest::header::ACCEPT, "application/json")
                .form(form)
                .send()
                .await
                .map_err(transport)?;
            let status = resp.status();
            let header = |name| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let location = header(reqwest::header::LOCATION);
            let retry_after = header(reqwest::header::RETRY_AFTER);
            let body = match read_capped(&mut resp).await {
                Ok(body) => body,
                Err(Capped::TooLarge) => return Err(TokenError::Malformed(ParseError::TooLarge)),
                Err(Capped::Read(e)) => return Err(transport(e)),
            };
            Ok::<_, TokenError>((status, location, retry_after, body))
        };
        let mut exchange = std::pin::pin!(exchange);
        let answered = match tokio::time::timeout(timeout, &mut exchange).await {
            Ok(r) => Ok(r),
            Err(_) => tokio::time::timeout(ANSWER_GRACE, &mut exchange).await,
        };
        let (status, location, retry_after, body) = match answered {
            Ok(r) => r?,
            Err(_) => {
                return Err(TokenError::Transport {
                    url: shown.clone(),
                    reason: format!("timed out after {}s", timeout.as_secs_f32()),
                });
            }
        };
        classify(
            &shown,
            status.as_u16(),
            location.as_deref(),
            retry_after.as_deref(),
            &body,
        )
    }
}
