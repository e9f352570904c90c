//! The one table of Kakao error codes: what each means, whether retrying can help, and what to do.
//!
//! kauth (`kauth.kakao.com`) answers with `{"error", "error_description", "error_code": "KOExxx"}`;
//! kapi (`kapi.kakao.com`) with `{"msg", "code": -NNN}`. Kakao warns that descriptions change, so every
//! decision branches on the code, and every message people read comes from here.

/// Whether repeating the same request later can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff; keep the current token file.
    Transient,
    /// Retrying the same request cannot help: a person has to act (log in again, fix the config).
    Permanent,
}

#[derive(Debug)]
pub struct KakaoCode {
    pub code: &'static str,
    pub class: ErrorClass,
    pub meaning: &'static str,
    /// What to do. `{account}` is replaced with the account's name.
    pub fix: &'static str,
}

const LOGIN_AGAIN: &str = "log in again: kakao-tokend login --account {account}";

pub static KAKAO_CODES: &[KakaoCode] = &[
    // --- kauth: token endpoint ---
    KakaoCode {
        code: "KOE322",
        class: ErrorClass::Permanent,
        meaning: "the refresh token is expired or invalid (its 2 months ran out, a newer one replaced it, or the user unlinked the app)",
        fix: LOGIN_AGAIN,
    },
    KakaoCode {
        code: "KOE320",
        class: ErrorClass::Permanent,
        meaning: "the authorization code was already used, has expired, or was never issued (codes work exactly once)",
        fix: "get a fresh code: kakao-tokend login --account {account}",
    },
    KakaoCode {
        code: "KOE319",
        class: ErrorClass::Permanent,
        meaning: "the request carried no refresh token (the token file has none)",
        fix: LOGIN_AGAIN,
    },
    KakaoCode {
        code: "KOE303",
        class: ErrorClass::Permanent,
        meaning: "redirect_uri differs from the one used to get the authorization code",
        fix: "make redirect_uri in the config match the Redirect URI registered under 내 애플리케이션 > 카카오 로그인 > Redirect URI, then log in again",
    },
    KakaoCode {
        code: "KOE010",
        class: ErrorClass::Permanent,
        meaning: "client_secret is missing or wrong while Client Secret is ON for this app",
        fix: "set client_secret (or client_secret_file) to the value under 내 애플리케이션 > 플랫폼 키 > REST API 키 > Client Secret, then reload (SIGHUP)",
    },
    KakaoCode {
        code: "KOE101",
        class: ErrorClass::Permanent,
        meaning: "client_id is not a valid app key, or not a REST API key",
        fix: "set client_id to the REST API key under 내 애플리케이션 > 플랫폼 키, then reload (SIGHUP)",
    },
    KakaoCode {
        code: "KOE009",
        class: ErrorClass::Permanent,
        meaning: "the token was requested from a platform not registered for this app",
        fix: "register the platform under 내 애플리케이션 > 플랫폼, then reload (SIGHUP)",
    },
    KakaoCode {
        code: "KOE006",
        class: ErrorClass::Permanent,
        meaning: "redirect_uri is not registered for this app",
        fix: "register it under 내 애플리케이션 > 카카오 로그인 > Redirect URI",
    },
    KakaoCode {
        code: "KOE004",
        class: ErrorClass::Permanent,
        meaning: "Kakao Login is not enabled for this app",
        fix: "turn it on under 내 애플리케이션 > 카카오 로그인 > 활성화 설정",
    },
    KakaoCode {
        code: "KOE237",
        class: ErrorClass::Transient,
        meaning: "token request rate limit exceeded (Kakao allows 20 access tokens per 10 minutes and 30 refresh tokens per hour per user)",
        fix: "nothing: kakao-tokend backs off and retries",
    },
    KakaoCode {
        code: "KOE003",
        class: ErrorClass::Transient,
        meaning: "temporary Kakao OAuth server error",
        fix: "nothing: kakao-tokend retries",
    },
    // --- kapi: API calls (send, token info) ---
    KakaoCode {
        code: "-401",
        class: ErrorClass::Permanent,
        meaning: "the access token is invalid or expired",
        fix: "refresh it: kakao-tokend refresh --account {account}",
    },
    KakaoCode {
        code: "-402",
        class: ErrorClass::Permanent,
        meaning: "the user has not consented to what this call needs (for send: 카카오톡 메시지 전송, talk_message)",
        fix: "enable talk_message under 내 애플리케이션 > 카카오 로그인 > 동의항목, set scope = \"talk_message\" for the account, and log in again: kakao-tokend login --account {account}",
    },
    KakaoCode {
        code: "-1",
        class: ErrorClass::Transient,
        meaning: "temporary Kakao internal error",
        fix: "nothing: retry later",
    },
    KakaoCode {
        code: "-2",
        class: ErrorClass::Permanent,
        meaning: "malformed parameters (for send: bad template, text over 200 characters)",
        fix: "check the message and its link",
    },
    KakaoCode {
        code: "-3",
        class: ErrorClass::Permanent,
        meaning: "a setting this API needs is not enabled for the app",
        fix: "check the app's settings under 내 애플리케이션",
    },
    KakaoCode {
        code: "-7",
        class: ErrorClass::Transient,
        meaning: "Kakao service maintenance or internal problem",
        fix: "nothing: retry later",
    },
    KakaoCode {
        code: "-10",
        class: ErrorClass::Transient,
        meaning: "the app's API quota is exhausted",
        fix: "wait for the quota to reset, or raise it in the Kakao developers console",
    },
    KakaoCode {
        code: "-501",
        class: ErrorClass::Permanent,
        meaning: "the user is not a KakaoTalk user",
        fix: "log in with an account that uses KakaoTalk",
    },
    KakaoCode {
        code: "-530",
        class: ErrorClass::Permanent,
        meaning: "the recipient blocks messages",
        fix: "allow messages in KakaoTalk's settings",
    },
    KakaoCode {
        code: "-531",
        class: ErrorClass::Transient,
        meaning: "the sender's monthly message quota is used up",
        fix: "wait for next month",
    },
    KakaoCode {
        code: "-532",
        class: ErrorClass::Transient,
        meaning: "the sender's daily message quota is used up",
        fix: "wait until tomorrow",
    },
    KakaoCode {
        code: "-603",
        class: ErrorClass::Transient,
        meaning: "Kakao internal timeout",
        fix: "nothing: retry later",
    },
    KakaoCode {
        code: "-9798",
        class: ErrorClass::Transient,
        meaning: "Kakao service maintenance",
        fix: "nothing: retry later",
    },
];

/// Looks a code up ("KOE322", "-401").
pub fn lookup(code: &str) -> Option<&'static KakaoCode> {
    KAKAO_CODES.iter().find(|c| c.code.eq_ignore_ascii_case(code))
}

/// Classifies a standard OAuth2 `error` value (RFC 6749 §5.2) when no Kakao code is known.
pub fn classify_oauth_error(error: &str) -> ErrorClass {
    match error {
        "invalid_grant"
        | "invalid_client"
        | "unauthorized_client"
        | "unsupported_grant_type"
        | "invalid_scope"
        | "misconfigured"
        | "access_denied" => ErrorClass::Permanent,
        // invalid_request covers both bugs and Kakao's rate limit (KOE237): retrying with backoff is the
        // safer guess for a long-running daemon, and costs one request per backoff step.
        _ => ErrorClass::Transient,
    }
}

/// Fills in `{account}` in a fix.
pub fn fix_for(code: &KakaoCode, account: &str) -> String {
    code.fix.replace("{account}", account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique() {
        for (i, a) in KAKAO_CODES.iter().enumerate() {
            for b in &KAKAO_CODES[i + 1..] {
                assert_ne!(a.code, b.code);
            }
        }
    }

    #[test]
    fn refresh_token_death_is_permanent_and_rate_limit_is_not() {
        assert_eq!(lookup("KOE322").unwrap().class, ErrorClass::Permanent);
        assert_eq!(lookup("koe237").unwrap().class, ErrorClass::Transient);
        assert_eq!(lookup("KOE010").unwrap().class, ErrorClass::Permanent);
        assert!(lookup("KOE999").is_none());
    }

    #[test]
    fn oauth_errors_without_a_code() {
        assert_eq!(classify_oauth_error("invalid_grant"), ErrorClass::Permanent);
        assert_eq!(classify_oauth_error("invalid_client"), ErrorClass::Permanent);
        assert_eq!(classify_oauth_error("server_error"), ErrorClass::Transient);
        assert_eq!(classify_oauth_error("temporarily_unavailable"), ErrorClass::Transient);
    }

    #[test]
    fn fix_names_the_account() {
        let fix = fix_for(lookup("KOE322").unwrap(), "me");
        assert_eq!(fix, "log in again: kakao-tokend login --account me");
    }
}
