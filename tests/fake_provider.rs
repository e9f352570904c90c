//! Holds the fake Kakao to Kakao's documented rules (../shared/reference/kakao-api.md), over real HTTP,
//! so that a lenient fake cannot hide a bug in the daemon.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use fake_kakao::{FakeClient, FakeKakao, FakeSettings};
use serde_json::Value;

const CLIENT: &str = "demo-rest-api-key";

fn client() -> reqwest::Client {
    kakao_tokend::crypto::install_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn token(fake: &FakeKakao, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = client()
        .post(format!("{}/oauth/token", fake.url()))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn refresh(fake: &FakeKakao, rt: &str) -> (u16, Value) {
    token(
        fake,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
            ("refresh_token", rt),
        ],
    )
    .await
}

/// Follows the authorize step like a browser and returns the redirect's query.
async fn authorize(fake: &FakeKakao, redirect_uri: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut q = vec![
        ("client_id", CLIENT),
        ("redirect_uri", redirect_uri),
        ("response_type", "code"),
        ("state", "xyz"),
    ];
    q.extend_from_slice(extra);
    let resp = client()
        .get(format!("{}/oauth/authorize", fake.url()))
        .query(&q)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    let loc = reqwest::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    assert!(loc.as_str().starts_with(redirect_uri));
    loc.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test]
async fn authorization_codes_work_exactly_once_and_need_the_same_redirect_uri() {
    let fake = FakeKakao::start(FakeSettings::default()).await.unwrap();
    let q = authorize(&fake, "https://localhost.com", &[("scope", "talk_message")]).await;
    assert_eq!(q["state"], "xyz");
    let code = q["code"].clone();
    let exchange = |redirect: &'static str, code: String| {
        let fake = &fake;
        async move {
            token(
                fake,
                &[
                    ("grant_type", "authorization_code"),
                    ("client_id", CLIENT),
                    ("redirect_uri", redirect),
                    ("code", &code),
                ],
            )
            .await
        }
    };
    let (status, body) = exchange("https://localhost.com", code.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 21599);
    assert_eq!(body["refresh_token_expires_in"], 5183999);
    assert_eq!(body["scope"], "talk_message");
    assert!(body["access_token"].is_string() && body["refresh_token"].is_string());

    // The seed's KOE320: running the exchange a second time with the same code.
    let (status, body) = exchange("https://localhost.com", code).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_code"], "KOE320");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("authorization code not found for code=")
    );

    let code = authorize(&fake, "https://localhost.com", &[]).await["code"].clone();
    let (status, body) = exchange("https://localhost.com/other", code).await;
    assert_eq!((status, body["error_code"].as_str()), (400, Some("KOE303")));
}

#[tokio::test]
async fn cancel_on_the_consent_screen_redirects_with_access_denied() {
    let fake = FakeKakao::start(FakeSettings::default()).await.unwrap();
    fake.deny_next_authorize();
    let q = authorize(&fake, "https://localhost.com", &[]).await;
    assert_eq!(q["error"], "access_denied");
    assert_eq!(q["state"], "xyz");
    assert!(!q.contains_key("code"));
}

#[tokio::test]
async fn refresh_tokens_rotate_only_in_their_last_stretch_and_the_old_one_dies_at_once() {
    // Refresh tokens live 4 s and rotate with under 2 s left.
    let fake = FakeKakao::start(FakeSettings::fast(60, 4)).await.unwrap();
    let login = fake.login(CLIENT);
    let rt1 = login["refresh_token"].as_str().unwrap().to_string();

    let (status, body) = refresh(&fake, &rt1).await;
    assert_eq!(status, 200);
    assert!(body.get("refresh_token").is_none(), "rotated too early: {body}");
    assert!(body.get("refresh_token_expires_in").is_none());
    assert!(body.get("scope").is_none(), "Kakao's refresh response carries no scope");
    assert_eq!(body["expires_in"], 60);
    assert!(fake.refresh_token_alive(&rt1));

    // Into the last stretch: the fake's clock moves, nothing sleeps.
    fake.advance(std::time::Duration::from_millis(2200));
    let (status, body) = refresh(&fake, &rt1).await;
    assert_eq!(status, 200);
    let rt2 = body["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rt2, rt1);
    assert_eq!(body["refresh_token_expires_in"], 4);
    assert!(
        !fake.refresh_token_alive(&rt1),
        "the old refresh token must die at once"
    );

    // The old one is now refused with KOE322, the new one works.
    let (status, body) = refresh(&fake, &rt1).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_code"], "KOE322");
    assert_eq!(body["error_description"], "expired_or_invalid_refresh_token");
    assert_eq!(refresh(&fake, &rt2).await.0, 200);

    // And a refresh token past its lifetime is refused too.
    fake.advance(std::time::Duration::from_millis(4200));
    assert_eq!(refresh(&fake, &rt2).await.1["error_code"], "KOE322");
}

#[tokio::test]
async fn client_errors_use_kakaos_codes() {
    let mut app = FakeClient::new("with-secret");
    app.client_secret = Some("s3cret".into());
    let fake = FakeKakao::start(FakeSettings {
        clients: vec![app],
        ..FakeSettings::default()
    })
    .await
    .unwrap();
    let rt = fake.login("with-secret")["refresh_token"].as_str().unwrap().to_string();
    let (status, body) = token(
        &fake,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "with-secret"),
            ("refresh_token", &rt),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error_code"].as_str(), body["error"].as_str()),
        (401, Some("KOE010"), Some("invalid_client"))
    );
    let (_, body) = token(
        &fake,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "nope"),
            ("refresh_token", &rt),
        ],
    )
    .await;
    assert_eq!(body["error_code"], "KOE101");
    let (_, body) = token(
        &fake,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "with-secret"),
            ("client_secret", "s3cret"),
        ],
    )
    .await;
    assert_eq!(body["error_code"], "KOE319");
    let (status, _) = token(
        &fake,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "with-secret"),
            ("client_secret", "s3cret"),
            ("refresh_token", &rt),
        ],
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_per_user_quota_answers_koe237() {
    // 36 s access tokens scale Kakao's "20 access tokens per 10 minutes" to 20 per second.
    let fake = FakeKakao::start(FakeSettings {
        quotas: true,
        ..FakeSettings::fast(36, 3600)
    })
    .await
    .unwrap();
    let rt = fake.login(CLIENT)["refresh_token"].as_str().unwrap().to_string();
    let mut codes = Vec::new();
    for _ in 0..25 {
        let (status, body) = refresh(&fake, &rt).await;
        codes.push((status, body["error_code"].as_str().map(str::to_owned)));
    }
    let limited = codes
        .iter()
        .filter(|(s, c)| *s == 400 && c.as_deref() == Some("KOE237"))
        .count();
    assert!(limited >= 4, "{codes:?}");
    assert!(codes[..19].iter().all(|(s, _)| *s == 200), "{codes:?}");
}

#[tokio::test]
async fn a_standard_oauth2_provider_rotates_on_every_refresh() {
    let fake = FakeKakao::start(FakeSettings {
        standard_oauth2: true,
        ..FakeSettings::default()
    })
    .await
    .unwrap();
    let login = fake.login(CLIENT);
    assert_eq!(login["token_type"], "Bearer");
    assert!(login.get("refresh_token_expires_in").is_none());
    let rt = login["refresh_token"].as_str().unwrap();
    let (_, body) = refresh(&fake, rt).await;
    assert!(body["refresh_token"].is_string());
    assert!(!fake.refresh_token_alive(rt));
}

#[tokio::test]
async fn the_api_checks_tokens_and_consent() {
    let mut app = FakeClient::new(CLIENT);
    app.scopes = vec![];
    let fake = FakeKakao::start(FakeSettings {
        clients: vec![app],
        ..FakeSettings::default()
    })
    .await
    .unwrap();
    let at = fake.login(CLIENT)["access_token"].as_str().unwrap().to_string();
    let info = client()
        .get(format!("{}/v1/user/access_token_info", fake.url()))
        .bearer_auth(&at)
        .send()
        .await
        .unwrap();
    assert_eq!(info.status().as_u16(), 200);
    let info: Value = info.json().await.unwrap();
    assert!(info["expires_in"].as_u64().unwrap() > 21000);

    let bad = client()
        .get(format!("{}/v1/user/access_token_info", fake.url()))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 401);
    assert_eq!(bad.json::<Value>().await.unwrap()["code"], -401);

    let template = r#"{"object_type":"text","text":"hi","link":{}}"#;
    let send = client()
        .post(format!("{}/v2/api/talk/memo/default/send", fake.url()))
        .bearer_auth(&at)
        .form(&[("template_object", template)])
        .send()
        .await
        .unwrap();
    assert_eq!(send.status().as_u16(), 403);
    let body: Value = send.json().await.unwrap();
    assert_eq!(body["code"], -402);
    assert_eq!(body["required_scopes"][0], "talk_message");
}

/// The `io::Error` at the bottom of a reqwest error, if any.
fn io_kind(e: &reqwest::Error) -> Option<std::io::ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = s.source();
    }
    None
}

#[tokio::test]
async fn the_reset_and_trickle_faults_are_what_they_say_on_the_wire() {
    let fake = FakeKakao::start(FakeSettings::default()).await.unwrap();
    let rt = fake.login(CLIENT)["refresh_token"].as_str().unwrap().to_string();
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", CLIENT),
        ("refresh_token", rt.as_str()),
    ];
    let url = format!("{}/oauth/token", fake.url());

    // Reset: a TCP RST and no answer at all.
    fake.push_fault(fake_kakao::Fault::Reset);
    let err = client().post(&url).form(&form).send().await.unwrap_err();
    assert_eq!(io_kind(&err), Some(std::io::ErrorKind::ConnectionReset), "{err:?}");

    // Trickle: the status and headers come at once, the body a byte at a time and never ends.
    fake.push_fault(fake_kakao::Fault::Trickle(std::time::Duration::from_millis(50)));
    let resp = client().post(&url).form(&form).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = tokio::time::timeout(std::time::Duration::from_millis(500), resp.bytes()).await;
    assert!(body.is_err(), "the trickle ended: {body:?}");

    // Faults are one-shot: the same refresh token still works, as nothing was issued.
    let (status, _) = refresh(&fake, &rt).await;
    assert_eq!(status, 200);
    assert_eq!(fake.stats().faults, 2);
}

/// The fake enforces PKCE as a provider does: a code issued for a challenge is exchanged only with its
/// verifier, so an intercepted code is worthless (and spent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intercepted_pkce_code_cannot_be_exchanged_without_the_verifier() {
    let fake = FakeKakao::start(FakeSettings::default()).await.unwrap();
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    let code = |challenge: &str| {
        let url = format!(
            "{}/oauth/authorize?client_id=demo-rest-api-key&redirect_uri=https%3A%2F%2Flocalhost.com&response_type=code&state=s&code_challenge={challenge}&code_challenge_method=S256",
            fake.url()
        );
        async move {
            let resp = client().get(url).send().await.unwrap();
            let location = resp.headers()["location"].to_str().unwrap().to_string();
            let back = reqwest::Url::parse(&location).unwrap();
            back.query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned()
        }
    };
    let exchange = |code: String, verifier: Option<&'static str>| {
        let mut form = vec![
            ("grant_type", "authorization_code".to_string()),
            ("client_id", "demo-rest-api-key".to_string()),
            ("redirect_uri", "https://localhost.com".to_string()),
            ("code", code),
        ];
        if let Some(v) = verifier {
            form.push(("code_verifier", v.to_string()));
        }
        let url = format!("{}/oauth/token", fake.url());
        async move { client().post(url).form(&form).send().await.unwrap() }
    };
    let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    let stolen = code(challenge).await;
    let resp = exchange(stolen, None).await;
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.text().await.unwrap().contains("code_verifier"));
    let stolen = code(challenge).await;
    assert_eq!(
        exchange(stolen, Some("a-wrong-verifier-of-enough-length-0123456789"))
            .await
            .status()
            .as_u16(),
        400
    );
    let mine = code(challenge).await;
    assert_eq!(exchange(mine, Some(verifier)).await.status().as_u16(), 200);
}
