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

const FIELDS: &[&str] = &[
    "access_token",
    "token_type",
    "expires_in",
    "refresh_token",
    "refresh_token_expires_in",
    "scope",
    "id_token",
    "expires_at",
    "refresh_token_expires_at",
];

/// Token-shaped objects whose known fields hold any JSON at all.
fn token_like() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(FIELDS), any_json()), 0..9)
        .prop_map(|fields| Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
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
