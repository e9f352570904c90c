//! Kakao API calls made with the access token (`kapi.kakao.com`): sending a KakaoTalk message to
//! yourself. Errors are classified from the same table as the token endpoint's.

use std::time::Duration;

use serde_json::{Value, json};

use crate::config::Account;
use crate::kakao_errors::{self, ErrorClass};
use crate::oauth::{OAuthClient, scrub};
use crate::secret::Secret;

/// Kakao's limit for a text template's `text`, in characters.
pub const MAX_TEXT_CHARS: usize = kakao_tokend_core::MAX_MESSAGE_CHARS;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("Kakao refused: {code} ({})", describe(*.code, .msg))]
    Refused { status: u16, code: i64, msg: String },
    #[error("{url} answered HTTP {status} with a body that is not a Kakao answer")]
    Http { url: String, status: u16 },
    #[error(
        "{url} answered HTTP {status} with a body over {} bytes; it was not read",
        crate::token::MAX_DOCUMENT_BYTES
    )]
    TooLarge { url: String, status: u16 },
}

fn describe(code: i64, msg: &str) -> String {
    kakao_errors::lookup(&code.to_string()).map_or_else(|| msg.to_string(), |k| k.meaning.to_string())
}

impl ApiError {
    pub fn code(&self) -> Option<i64> {
        match self {
            ApiError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            ApiError::Refused { code, .. } => {
                kakao_errors::lookup(&code.to_string()).map_or(ErrorClass::Permanent, |k| k.class)
            }
            _ => ErrorClass::Transient,
        }
    }

    pub fn fix(&self, account: &str) -> String {
        match self {
            ApiError::Refused { code, .. } => kakao_errors::lookup(&code.to_string()).map_or_else(
                || "see Kakao's error code reference".into(),
                |k| kakao_errors::fix_for(k, account),
            ),
            _ => "check the network and api_url, then try again".into(),
        }
    }
}

/// The default text template: `link` is required by Kakao, so an empty one is sent when none is given.
pub fn text_template(text: &str, link: Option<&str>, button_title: Option<&str>) -> Value {
    let link = match link {
        Some(url) => json!({"web_url": url, "mobile_web_url": url}),
        None => json!({}),
    };
    let mut t = json!({"object_type": "text", "text": text, "link": link});
    if let Some(title) = button_title {
        t["button_title"] = json!(title);
    }
    t
}

/// Sends `template` to the token owner's "나와의 채팅" (chat with yourself).
pub async fn send_to_me(
    client: &OAuthClient,
    account: &Account,
    access_token: &Secret,
    template: &Value,
    timeout: Duration,
) -> Result<(), ApiError> {
    let url = account
        .api_url
        .join("v2/api/talk/memo/default/send")
        .unwrap_or_else(|_| reqwest::Url::clone(&account.api_url));
    let shown = format!("{}{}", url.origin().ascii_serialization(), url.path());
    let resp = client
        .http_for(account)
        .post(url)
        .bearer_auth(access_token.expose())
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded;charset=utf-8",
        )
        .form(&[("template_object", template.to_string())])
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| ApiError::Transport {
            url: shown.clone(),
            reason: scrub(&e.without_url().to_string()),
        })?;
    let mut resp = resp;
    let status = resp.status().as_u16();
    let body: Option<Value> = match crate::oauth::read_capped(&mut resp).await {
        Ok(bytes) => serde_json::from_slice(&bytes).ok(),
        Err(crate::oauth::Capped::TooLarge) => return Err(ApiError::TooLarge { url: shown, status }),
        Err(crate::oauth::Capped::Read(e)) => {
            return Err(ApiError::Transport {
                url: shown,
                reason: scrub(&e.without_url().to_string()),
            });
        }
    };
    match body {
        Some(b) if b.get("result_code").and_then(Value::as_i64) == Some(0) && status == 200 => Ok(()),
        Some(b) if b.get("code").and_then(Value::as_i64).is_some() => Err(ApiError::Refused {
            status,
            code: b["code"].as_i64().unwrap_or_default(),
            msg: scrub(b.get("msg").and_then(Value::as_str).unwrap_or_default()),
        }),
        _ => Err(ApiError::Http { url: shown, status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_always_carries_a_link() {
        let t = text_template("hi", None, None);
        assert_eq!(t, json!({"object_type":"text","text":"hi","link":{}}));
        let t = text_template("hi", Some("https://example.com"), Some("열기"));
        assert_eq!(t["link"]["mobile_web_url"], "https://example.com");
        assert_eq!(t["button_title"], "열기");
    }

    #[test]
    fn errors_come_from_the_table() {
        let e = ApiError::Refused {
            status: 403,
            code: -402,
            msg: "insufficient scopes.".into(),
        };
        assert!(e.to_string().contains("talk_message"), "{e}");
        assert!(e.fix("me").contains("동의항목"));
        assert!(e.fix("me").contains("kakao-tokend login --account me"));
        assert_eq!(
            ApiError::Refused {
                status: 400,
                code: -1,
                msg: String::new()
            }
            .class(),
            ErrorClass::Transient
        );
    }
}
