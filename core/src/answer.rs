//! A token endpoint's answer, classified: a token, or a typed error that says whether to retry, what it
//! means and what fixes it. Pure, so every case has a test; the HTTP exchange itself is the caller's.

use std::time::Duration;

use crate::kakao_errors::{self, ErrorClass};
use crate::token::{ParseError, TokenResponse, Unusable};

/// Why a token request did not produce a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot reach {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url} answered HTTP {status} with a body that is not an OAuth answer")]
    Http {
        url: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error(
        "{url} redirected to {location}; token requests never follow redirects: set token_url to the final address"
    )]
    Redirect { url: String, status: u16, location: String },
    #[error("the provider refused: {}", describe_refusal(.error, .code.as_deref(), .description.as_deref()))]
    Refused {
        status: u16,
        error: String,
        code: Option<String>,
        description: Option<String>,
        retry_after: Option<Duration>,
    },
    /// Another replica's request found this refresh token dead (its code); this replica sent nothing.
    #[error("another replica's request was refused with {code}, for the refresh token this replica holds too")]
    RefusedElsewhere { code: String },
    #[error("the provider's answer {0}")]
    Malformed(ParseError),
    #[error("the token file holds no refresh_token")]
    NoRefreshToken,
    /// The answer parsed, but its tokens cannot be used (see [`crate::token::usable`]).
    #[error("the provider's answer is refused: {0}")]
    Unusable(Unusable),
}

fn describe_refusal(error: &str, code: Option<&str>, description: Option<&str>) -> String {
    let mut s = match code {
        Some(c) => format!("{c} ({error})"),
        None => error.to_string(),
    };
    if let Some(known) = code.and_then(kakao_errors::lookup) {
        s.push_str(": ");
        s.push_str(known.meaning);
    } else if let Some(d) = description {
        s.push_str(": ");
        s.push_str(d);
    }
    s
}

impl TokenError {
    pub fn class(&self) -> ErrorClass {
        match self {
            TokenError::Transport { .. }
            | TokenError::Http { .. }
            | TokenError::Malformed(_)
            | TokenError::Unusable(_) => ErrorClass::Transient,
            // A load balancer's temporary redirect (302, 303, 307) passes; a permanent move needs the config
            // changed.
            TokenError::Redirect {
                status: 302 | 303 | 307,
                ..
            } => ErrorClass::Transient,
            TokenError::Redirect { .. } | TokenError::NoRefreshToken | TokenError::RefusedElsewhere { .. } => {
                ErrorClass::Permanent
            }
            TokenError::Refused {
                status, error, code, ..
            } => {
                if let Some(known) = code.as_deref().and_then(kakao_errors::lookup) {
                    known.class
                } else if *status >= 500 || *status == 429 || *status == 408 {
                    ErrorClass::Transient
                } else {
                    kakao_errors::classify_oauth_error(error)
                }
            }
        }
    }

    /// Kakao's code (KOE322) or the OAuth error (invalid_grant), for the state file and metrics.
    pub fn code(&self) -> String {
        match self {
            TokenError::Transport { .. } => "transport".into(),
            TokenError::Http { status, .. } => format!("http_{status}"),
            TokenError::Redirect { .. } => "redirect".into(),
            TokenError::Refused { error, code, .. } => code.clone().unwrap_or_else(|| error.clone()),
            TokenError::RefusedElsewhere { code } => code.clone(),
            TokenError::Malformed(_) => "malformed_response".into(),
            TokenError::NoRefreshToken => "no_refresh_token".into(),
            TokenError::Unusable(Unusable::Characters(_)) => "unusable_token".into(),
            TokenError::Unusable(Unusable::ShortLifetime(_)) => "short_lifetime".into(),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Http { retry_after, .. } | TokenError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn is_rate_limit(&self) -> bool {
        match self {
            TokenError::Http { status, .. } => *status == 429,
            TokenError::Refused { status, code, .. } => *status == 429 || code.as_deref() == Some("KOE237"),
            _ => false,
        }
    }

    /// A refresh token or code that is dead: only a new login helps.
    pub fn needs_login(&self) -> bool {
        match self {
            TokenError::NoRefreshToken => true,
            TokenError::Refused { error, code, .. } => {
                matches!(code.as_deref(), Some("KOE322" | "KOE320" | "KOE319"))
                    || (code.is_none() && error == "invalid_grant")
            }
            TokenError::RefusedElsewhere { code } => {
                matches!(code.as_str(), "KOE322" | "KOE320" | "KOE319" | "invalid_grant")
            }
            _ => false,
        }
    }

    /// What to do about it, for a person.
    pub fn fix(&self, account: &str) -> String {
        if let TokenError::Refused { code: Some(c), .. } = self
            && let Some(known) = kakao_errors::lookup(c)
        {
            return kakao_errors::fix_for(known, account);
        }
        if self.needs_login() {
            return format!("log in again: kakao-tokend login --account {account}");
        }
        match self.class() {
            ErrorClass::Transient => "nothing: kakao-tokend retries with backoff".into(),
            ErrorClass::Permanent => format!(
                "check client_id, client_secret and the endpoints of account {account}, then reload (SIGHUP) or log in again"
            ),
        }
    }
}

fn is_control_like(ch: char) -> bool {
    ch.is_control() || matches!(ch, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

/// Removes anything that looks like a credential from provider text before it is shown (Kakao's
/// KOE320 description, for one, quotes the authorization code), and its control characters.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().count() >= 16 {
            out.push_str("[redacted]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for ch in text.chars().take(300) {
        if ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | '~' | '+' | '/' | '=') {
            run.push(ch);
        } else {
            flush(&mut run, &mut out);
            // Control characters (a terminal's escape sequences, a newline that would forge a log line)
            // and bidirectional overrides become a space: provider text reaches terminals and journals.
            out.push(if is_control_like(ch) { ' ' } else { ch });
        }
    }
    flush(&mut run, &mut out);
    out
}

fn parse_retry_after(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A redirect's target as it may be shown: scheme, host and path. Its query, fragment and user info may
/// carry a code or a token, and it is the provider's text, so nothing else of it is kept.
pub fn scrub_location(location: &str) -> String {
    match url::Url::parse(location) {
        Ok(u) => format!("{}{}", u.origin().ascii_serialization(), u.path()),
        // A relative target: its path alone, without controls.
        Err(_) => location
            .split(['?', '#'])
            .next()
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect(),
    }
}

/// Turns a finished HTTP exchange into a token or a typed error. Pure, so every case has a test.
pub fn classify(
    url: &str,
    status: u16,
    location: Option<&str>,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<TokenResponse, TokenError> {
    let retry_after = parse_retry_after(retry_after);
    if (200..300).contains(&status) {
        return TokenResponse::parse(body).map_err(TokenError::Malformed);
    }
    if (300..400).contains(&status) {
        return Err(TokenError::Redirect {
            url: url.into(),
            status,
            location: location.map_or_else(|| "?".into(), scrub_location),
        });
    }
    #[derive(serde::Deserialize)]
    struct OAuthErrorBody {
        error: String,
        error_description: Option<String>,
        error_code: Option<String>,
    }
    match serde_json::from_slice::<OAuthErrorBody>(body) {
        Ok(b) if !b.error.is_empty() => Err(TokenError::Refused {
            status,
            error: scrub(&b.error),
            code: b.error_code.map(|c| scrub(&c)),
            description: b.error_description.map(|d| scrub(&d)),
            retry_after,
        }),
        _ => Err(TokenError::Http {
            url: url.into(),
            status,
            retry_after,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(status: u16, body: &str) -> TokenError {
        classify("http://x/oauth/token", status, None, None, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn success_parses() {
        let r = classify("u", 200, None, None, br#"{"access_token":"A","expires_in":5}"#).unwrap();
        assert_eq!(r.expires_in, Some(5));
    }

    #[test]
    fn kakao_refusals_are_classified_from_the_table() {
        let e = err(
            400,
            r#"{"error":"invalid_grant","error_description":"expired_or_invalid_refresh_token","error_code":"KOE322"}"#,
        );
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(e.needs_login());
        assert_eq!(e.code(), "KOE322");
        assert_eq!(e.fix("me"), "log in again: kakao-tokend login --account me");
        let e = err(
            400,
            r#"{"error":"invalid_client","error_description":"Bad client credentials","error_code":"KOE010"}"#,
        );
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(!e.needs_login());
        assert!(e.fix("me").contains("client_secret"));
        let e = err(
            400,
            r#"{"error":"invalid_request","error_description":"token request rate limit exceeded","error_code":"KOE237"}"#,
        );
        assert_eq!(e.class(), ErrorClass::Transient);
        assert!(e.is_rate_limit());
    }

    /// A replica that parks on another's KOE322 says so, rather than what the provider told it.
    #[test]
    fn a_refusal_seen_by_another_replica_parks_and_says_whose_it_was() {
        let e = TokenError::RefusedElsewhere { code: "KOE322".into() };
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(e.needs_login());
        assert_eq!(e.code(), "KOE322");
        assert_eq!(e.fix("me"), "log in again: kakao-tokend login --account me");
        let said = e.to_string();
        assert!(
            said.contains("another replica") && !said.contains("the provider refused"),
            "{said}"
        );
        assert!(!TokenError::RefusedElsewhere { code: "KOE010".into() }.needs_login());
    }

    #[test]
    fn standard_oauth2_refusals() {
        let e = err(400, r#"{"error":"invalid_grant"}"#);
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(e.needs_login());
        assert_eq!(
            err(503, r#"{"error":"temporarily_unavailable"}"#).class(),
            ErrorClass::Transient
        );
        assert_eq!(err(500, r#"{"error":"invalid_grant"}"#).class(), ErrorClass::Transient);
    }

    #[test]
    fn non_oauth_answers_are_transient() {
        for (status, body) in [
            (500, "<html>oops</html>"),
            (502, ""),
            (429, "slow down"),
            (400, "not json"),
            (200, "<html>"),
        ] {
            let e = classify("u", status, None, None, body.as_bytes()).unwrap_err();
            assert_eq!(e.class(), ErrorClass::Transient, "{status} {body}");
        }
        let e = classify("u", 429, None, Some("17"), b"").unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(17)));
        assert!(e.is_rate_limit());
    }

    #[test]
    fn redirects_are_never_followed_and_only_permanent_moves_park() {
        for (status, class) in [
            (301, ErrorClass::Permanent),
            (308, ErrorClass::Permanent),
            (302, ErrorClass::Transient),
            (303, ErrorClass::Transient),
            (307, ErrorClass::Transient),
        ] {
            let e = classify("http://x/oauth/token", status, Some("https://x/oauth/token"), None, b"").unwrap_err();
            assert_eq!(e.class(), class, "{status}");
            assert!(e.to_string().contains("https://x/oauth/token"));
        }
    }

    #[test]
    fn a_redirect_target_is_shown_without_what_may_carry_a_secret() {
        let e = classify(
            "http://x/oauth/token",
            302,
            Some("https://user:pw@lb.example.com/login?code=fake-code-SECRET&token=fake-at-X#frag"),
            None,
            b"",
        )
        .unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("https://lb.example.com/login"), "{shown}");
        for secret in ["fake-code-SECRET", "fake-at-X", "pw", "frag", "user"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert_eq!(scrub_location("/maint\x1b[2J?x=1"), "/maint[2J");
    }

    #[test]
    fn provider_text_reaches_no_terminal_with_its_controls() {
        let e = err(
            400,
            r#"{"error":"invalid_grant\u001b]0;owned\u0007","error_description":"bad\nkakao-tokend: refreshed ok\u001b[2J\u202eevil"}"#,
        );
        let shown = e.to_string();
        assert!(!shown.chars().any(|c| c.is_control() || c == '\u{202e}'), "{shown:?}");
        assert!(shown.contains("bad kakao-tokend: refreshed ok"), "{shown:?}");
    }

    #[test]
    fn provider_text_is_scrubbed_of_credentials() {
        let e = err(
            400,
            r#"{"error":"invalid_grant","error_description":"authorization code not found for code=v5AbCdEfGhIjKlMnOpQrStUv","error_code":"KOE999"}"#,
        );
        let text = e.to_string();
        assert!(!text.contains("v5AbCdEfGhIjKlMnOpQrStUv"), "{text}");
        assert!(text.contains("authorization code not found"), "{text}");
        // Known codes are explained from the table, not from the provider's words.
        let e = err(
            400,
            r#"{"error":"invalid_grant","error_description":"code=SECRETSECRETSECRETSECRET","error_code":"KOE320"}"#,
        );
        assert!(!e.to_string().contains("SECRET"));
        assert!(e.to_string().contains("KOE320"));
    }
}
