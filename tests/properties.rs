//! Bad input, generated: whatever bytes a token file, a token response or a config holds, parsing
//! returns a value or a clear error, never panics, and an error never quotes a secret-looking value.

#![allow(clippy::unwrap_used)]

use kakao_tokend::config::Config;
use kakao_tokend::token::{TokenFile, TokenResponse, merge};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-zA-Z0-9 _:-]{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The token file's own fields: every one a response or a file may hold, with a fixed meaning.
const FIELDS: &[&str] = &kakao_tokend::token::OWN_FIELDS;

/// Names a provider may use beside the file's own: the names clashing fields are kept under, and others.
const OTHER_FIELDS: &[&str] = &[
    "provider_expires_at",
    "provider_refresh_token_expires_at",
    "provider_scope",
    "athlete",
    "note",
];

/// Token-shaped objects whose known fields hold any JSON at all.
fn token_like() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(FIELDS), any_json()), 0..9)
        .prop_map(|fields| Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// A string that fits where a token, a type or a scope belongs.
fn word() -> impl Strategy<Value = Value> {
    "[A-Za-z0-9_-]{1,16}".prop_map(Value::from)
}

/// Answers a provider could send on success: a token, maybe the other fields Kakao sends, and any
/// number of the provider's own fields, of any type, under any name, the file's own names included.
fn provider_answer() -> impl Strategy<Value = Value> {
    let all: Vec<&'static str> = FIELDS.iter().chain(OTHER_FIELDS).copied().collect();
    (
        word(),
        prop::option::of(0..100_000_000i64),
        prop::option::of(word()),
        prop::option::of(0..100_000_000i64),
        prop::collection::vec((prop::sample::select(all), any_json()), 0..6),
    )
        .prop_map(|(access, expires_in, refresh, rt_expires_in, extra)| {
            let mut m = serde_json::Map::new();
            // The provider's own fields first, so that the well-formed core below wins where names meet.
            for (k, v) in extra {
                m.insert(k.to_string(), v);
            }
            m.insert("access_token".into(), access);
            for (k, v) in [
                ("expires_in", expires_in.map(Value::from)),
                ("refresh_token", refresh),
                ("refresh_token_expires_in", rt_expires_in.map(Value::from)),
            ] {
                match v {
                    Some(v) => m.insert(k.into(), v),
                    None => m.remove(k),
                };
            }
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = TokenFile::parse(&bytes);
        let _ = TokenResponse::parse(&bytes);
    }

    #[test]
    fn token_like_objects_parse_or_name_the_problem(v in token_like()) {
        let bytes = v.to_string().into_bytes();
        match TokenFile::parse(&bytes) {
            Ok(f) => {
                // What parses, round-trips: the file written is the file read.
                let again = TokenFile::parse(&f.to_bytes()).unwrap();
                prop_assert_eq!(&again, &f);
                prop_assert!(f.expires_in.is_none_or(|s| s >= 0));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        if let Ok(resp) = TokenResponse::parse(&bytes) {
            // Any accepted response merges into any file without panicking, and the expiry it yields is
            // never before the moment the request left.
            let current = TokenFile::parse(br#"{"access_token":"A","refresh_token":"R"}"#).unwrap();
            let sent = jiff::Timestamp::now();
            let merged = merge(&current, resp, sent);
            prop_assert!(merged.expires_at.unwrap() >= kakao_tokend::token::floor_to_second(sent));
            prop_assert!(merged.refresh_token.is_some());
        }
    }

    /// Whatever a provider sends beside its token, and whatever file it lands on, the merged file is
    /// written and read back as itself: a provider's field never makes the file unreadable.
    #[test]
    fn every_merged_file_round_trips_through_write_and_parse(
        first in provider_answer(),
        answers in prop::collection::vec(provider_answer(), 1..4),
        offset in 0..10_000_000i64,
    ) {
        let mut at = jiff::Timestamp::from_second(1_767_225_600 + offset).unwrap();
        let resp = TokenResponse::parse(first.to_string().as_bytes()).unwrap();
        let mut file = TokenFile::from_response(resp, at);
        for answer in answers {
            let bytes = file.to_bytes();
            let read = TokenFile::parse(&bytes);
            prop_assert!(read.is_ok(), "{:?}\n{}", read, String::from_utf8_lossy(&bytes));
            prop_assert_eq!(read.unwrap(), file.clone());
            // Written once, each own field: a reader that takes the last of two would see the other.
            let text = String::from_utf8(bytes).unwrap();
            for field in FIELDS {
                prop_assert!(text.matches(&format!("\"{field}\":")).count() <= 1, "{}", text);
            }
            at += jiff::SignedDuration::from_secs(3600);
            let resp = TokenResponse::parse(answer.to_string().as_bytes()).unwrap();
            let merged = merge(&file, resp, at);
            prop_assert!(merged.expires_at.is_some());
            if answer.get("refresh_token").is_none() {
                // Merge, never drop: no new refresh token keeps the old one.
                prop_assert_eq!(&merged.refresh_token, &file.refresh_token);
            }
            file = merged;
        }
        prop_assert_eq!(TokenFile::parse(&file.to_bytes()).unwrap(), file);
    }

    #[test]
    fn errors_never_quote_the_value_of_a_field(secret in "[A-Za-z0-9]{20,40}", field in prop::sample::select(FIELDS)) {
        // A secret-looking string in the wrong place: inside an array or an object where a string belongs.
        let docs = [
            json!({ field: [&secret] }),
            json!({ field: { "x": &secret } }),
            json!({ "access_token": "A", field: { "v": &secret } }),
        ];
        for doc in docs {
            let text = doc.to_string();
            let errors = [
                TokenFile::parse(text.as_bytes()).err().map(|e| e.to_string()),
                TokenResponse::parse(text.as_bytes()).err().map(|e| e.to_string()),
            ];
            for err in errors.into_iter().flatten() {
                prop_assert!(!err.contains(&secret), "{}", err);
            }
        }
    }

    #[test]
    fn any_config_text_loads_or_fails_with_the_files_name(text in "[\\[\\]a-z_.=\" 0-9%\n]{0,200}") {
        loads_or_names_the_file(text.as_bytes())?;
    }

    #[test]
    fn arbitrary_bytes_as_a_config_load_or_fail_with_the_files_name(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        loads_or_names_the_file(&bytes)?;
    }
}

/// `bytes` as a config file load, or fail with an error that names the file.
fn loads_or_names_the_file(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, bytes).unwrap();
    if let Err(e) = Config::load(&path) {
        prop_assert!(e.to_string().contains("config.toml"), "{}", e);
    }
    Ok(())
}

#[test]
fn a_huge_token_file_is_refused_before_it_is_parsed() {
    let mut huge = b"{\"access_token\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 2 << 20));
    huge.extend(b"\"}");
    let err = TokenFile::parse(&huge).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}

#[test]
fn a_huge_config_file_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.toml");
    let mut text = String::from("[daemon]\nbackups = 2\n");
    // 8 MiB of comments, then a key the config does not know: read in full and refused by name.
    while text.len() < 8 << 20 {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    text.push_str("[accounts.me]\nclient_id = \"x\"\ntoken_file = \"me.json\"\nbogus = 1\n");
    std::fs::write(&path, &text).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("huge.toml") && err.contains("bogus"), "{err}");
}
