//! The token file and the provider's token response: parsing, validation and the merge rule.
//!
//! Everything here is pure: no I/O, no clock. Each field is read as a `serde_json::Value` and checked
//! here, naming the offending field itself, because serde's own type errors quote the value, and that
//! value can be a token.

use jiff::{SignedDuration, Timestamp};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::secret::Secret;

/// Longest lifetime believed from a provider. Anything longer is a malformed response, not a token
/// that never needs refreshing.
pub const MAX_LIFETIME_SECS: i64 = 10 * 366 * 24 * 3600;

/// Lifetime assumed when a (non-Kakao) provider leaves `expires_in` out (RFC 6749 makes it optional).
pub const DEFAULT_LIFETIME_SECS: i64 = 3600;

/// Token files and responses larger than this are refused before parsing.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("is empty")]
    Empty,
    #[error("is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("is not JSON ({0})")]
    NotJson(String),
    #[error("is not a JSON object")]
    NotObject,
    #[error("has no `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` {problem}")]
    BadField { field: &'static str, problem: &'static str },
}

fn syntax_error(e: &serde_json::Error) -> ParseError {
    // Only the position: serde_json's syntax messages carry no input, but be explicit about it.
    ParseError::NotJson(format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    ))
}

fn parse_object(bytes: &[u8]) -> Result<Fields, ParseError> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(ParseError::TooLarge);
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ParseError::Empty);
    }
    match serde_json::from_slice::<Fields>(bytes) {
        Ok(fields) => Ok(fields),
        // The one type error the reading can meet: a document that is not an object.
        Err(e) if e.is_data() => Err(ParseError::NotObject),
        Err(e) => Err(syntax_error(&e)),
    }
}

/// A JSON object read in one pass: each of [`OWN_FIELDS`] in its slot (the last of a repeated key wins,
/// as in a map), the rest as they came. Read straight into slots, the own fields' names are never
/// copied nor put in a map and taken out again, which was most of a token file's parse.
struct Fields {
    own: [Option<Value>; OWN_FIELDS.len()],
    /// Fields of no known meaning, and own fields set aside as `provider_<name>`.
    extra: Map<String, Value>,
}

/// Where an own field's value is kept in [`Fields::own`].
fn slot_of(name: &str) -> Option<usize> {
    OWN_FIELDS.iter().position(|f| *f == name)
}

impl Fields {
    fn take(&mut self, field: &'static str) -> Option<Value> {
        self.own[slot_of(field)?].take()
    }
}

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> serde::de::Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Fields, A::Error> {
        let mut fields = Fields {
            own: Default::default(),
            extra: Map::new(),
        };
        while let Some(key) = access.next_key::<Key>()? {
            match key {
                Key::Own(slot) => fields.own[slot] = Some(access.next_value()?),
                Key::Other(name) => {
                    fields.extra.insert(name, access.next_value()?);
                }
            }
        }
        Ok(fields)
    }
}

/// A key: the slot of an own field, or any other name.
enum Key {
    Own(usize),
    Other(String),
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl serde::de::Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Key, E> {
        Ok(slot_of(name).map_or_else(|| Key::Other(name.to_owned()), Key::Own))
    }

    fn visit_string<E: serde::de::Error>(self, name: String) -> Result<Key, E> {
        Ok(slot_of(&name).map_or(Key::Other(name), Key::Own))
    }
}

fn take_string(fields: &mut Fields, field: &'static str) -> Result<Option<String>, ParseError> {
    match fields.take(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ParseError::BadField {
            field,
            problem: "must be a string",
        }),
    }
}

fn take_secret(fields: &mut Fields, field: &'static str) -> Result<Option<Secret>, ParseError> {
    match take_string(fields, field)? {
        Some(s) if s.is_empty() => Err(ParseError::BadField {
            field,
            problem: "is empty",
        }),
        other => Ok(other.map(Secret::new)),
    }
}

/// The token file's own fields. A provider field of the same name that does not fit the file's meaning
/// (Strava's integer `expires_at`, a `scope` sent as an array) is kept as `provider_<name>`, so the
/// file stays readable whatever the provider sends.
pub const OWN_FIELDS: [&str; 9] = [
    "token_type",
    "access_token",
    "expires_in",
    "refresh_token",
    "refresh_token_expires_in",
    "scope",
    "id_token",
    "expires_at",
    "refresh_token_expires_at",
];

/// The name a provider's clashing field is kept under.
pub fn set_aside_name(field: &str) -> String {
    format!("provider_{field}")
}

/// Keeps `value` as `provider_<field>`; a field the provider itself sent under that name wins.
fn set_aside(map: &mut Map<String, Value>, field: &str, value: Value) {
    if !value.is_null() {
        map.entry(set_aside_name(field)).or_insert(value);
    }
}

/// A descriptive string field (`token_type`, `scope`, `id_token`): anything but a string is set aside
/// rather than refused, because nothing is computed from it.
fn take_soft_string(fields: &mut Fields, field: &'static str) -> Option<String> {
    match fields.take(field) {
        None | Some(Value::Null) => None,
        // An empty string says nothing: dropped, not kept.
        Some(Value::String(s)) => (!s.is_empty()).then_some(s),
        Some(other) => {
            set_aside(&mut fields.extra, field, other);
            None
        }
    }
}

/// Seconds: an integer, or a string of digits (some providers send one).
fn take_seconds(fields: &mut Fields, field: &'static str) -> Result<Option<i64>, ParseError> {
    let bad = |problem| ParseError::BadField { field, problem };
    let n = match fields.take(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64().ok_or(bad("must be a whole number of seconds"))?,
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| bad("must be a whole number of seconds"))?,
        Some(_) => return Err(bad("must be a whole number of seconds")),
    };
    if n < 0 {
        return Err(bad("is negative"));
    }
    if n > MAX_LIFETIME_SECS {
        return Err(bad("is absurdly large (over ten years)"));
    }
    Ok(Some(n))
}

/// One of the file's absolute times. The file writes RFC 3339; a file that holds a provider's own field
/// of that name instead (seconds since the epoch, as Strava sends) is adopted: whole seconds are read as
/// that instant, and the provider's value is kept aside. Anything else is kept aside and the time is
/// unknown, which makes the daemon refresh at once.
fn take_timestamp(fields: &mut Fields, field: &'static str) -> Option<Timestamp> {
    let value = fields.take(field)?;
    if let Value::String(s) = &value
        && let Ok(ts) = s.parse::<Timestamp>()
    {
        return Some(ts);
    }
    let epoch = match &value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        _ => None,
    };
    set_aside(&mut fields.extra, field, value);
    epoch.filter(|&n| n > 0).and_then(|n| Timestamp::from_second(n).ok())
}

pub fn floor_to_second(ts: Timestamp) -> Timestamp {
    Timestamp::from_second(ts.as_second()).unwrap_or(ts)
}

/// `ts + secs`, saturating at the end of jiff's range (unreachable with validated lifetimes).
pub fn add_secs(ts: Timestamp, secs: i64) -> Timestamp {
    ts.checked_add(SignedDuration::from_secs(secs))
        .unwrap_or(Timestamp::MAX)
}

/// The shortest access-token lifetime accepted: a provider answering `expires_in: 0` would otherwise have
/// the daemon refresh, back up and run the hook every second.
pub const MIN_LIFETIME_SECS: i64 = 2;

/// Whether `token` may be written to the token file, the env file and a hook's world: visible ASCII
/// (0x21–0x7E) without quotes, backslash, backquote or `$`. Every real token format passes (b64token,
/// JWTs, `id|secret`); a newline or a `$(...)` from a hostile provider does not.
pub fn token_chars_ok(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'"' | b'\'' | b'\\' | b'`' | b'$'))
}

/// Why an answer's tokens cannot be used as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("`{0}` holds characters no token has (only visible ASCII without quotes, \\, ` or $ is accepted)")]
    Characters(&'static str),
    #[error("the access token lives {0} s, under the {MIN_LIFETIME_SECS} s accepted")]
    ShortLifetime(i64),
}

/// What a refresh answer may be used for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usable {
    /// All of it.
    Whole,
    /// Only its new refresh token (with the previous access token): the access token is unusable, but
    /// the provider has rotated, and the old refresh token is already dead.
    RefreshTokenOnly(Unusable),
    /// Nothing.
    Nothing(Unusable),
}

/// Sorts a refresh answer by what can be used of it (pure: the rule lives here, the I/O elsewhere).
pub fn usable(resp: &TokenResponse) -> Usable {
    if let Some(rt) = &resp.refresh_token
        && !token_chars_ok(rt.expose())
    {
        return Usable::Nothing(Unusable::Characters("refresh_token"));
    }
    let problem = if !token_chars_ok(resp.access_token.expose()) {
        Unusable::Characters("access_token")
    } else {
        match resp.expires_in {
            Some(secs) if secs < MIN_LIFETIME_SECS => Unusable::ShortLifetime(secs),
            _ => return Usable::Whole,
        }
    };
    if resp.refresh_token.is_some() {
        Usable::RefreshTokenOnly(problem)
    } else {
        Usable::Nothing(problem)
    }
}

/// Keeps `current` but for the refresh token `resp` brought (and its expiry): the file written when an
/// answer rotated the refresh token but its access token cannot be used.
pub fn merge_refresh_token_only(current: &TokenFile, resp: TokenResponse, sent_at: Timestamp) -> TokenFile {
    let sent_at = floor_to_second(sent_at);
    let mut file = current.clone();
    if let Some(rt) = resp.refresh_token {
        file.refresh_token = Some(rt);
        file.refresh_token_expires_in = resp.refresh_token_expires_in;
        file.refresh_token_expires_at = resp.refresh_token_expires_in.map(|s| add_secs(sent_at, s));
    }
    file
}

/// What a token endpoint answered with on success.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenResponse {
    pub token_type: Option<String>,
    pub access_token: Secret,
    pub expires_in: Option<i64>,
    pub refresh_token: Option<Secret>,
    pub refresh_token_expires_in: Option<i64>,
    pub scope: Option<String>,
    pub id_token: Option<Secret>,
    pub extra: Map<String, Value>,
}

impl TokenResponse {
    pub fn parse(bytes: &[u8]) -> Result<TokenResponse, ParseError> {
        let mut fields = parse_object(bytes)?;
        let access_token = take_secret(&mut fields, "access_token")?.ok_or(ParseError::Missing("access_token"))?;
        let resp = TokenResponse {
            token_type: take_soft_string(&mut fields, "token_type"),
            access_token,
            expires_in: take_seconds(&mut fields, "expires_in")?,
            refresh_token: take_secret(&mut fields, "refresh_token")?,
            refresh_token_expires_in: take_seconds(&mut fields, "refresh_token_expires_in")?,
            scope: take_soft_string(&mut fields, "scope"),
            id_token: take_soft_string(&mut fields, "id_token").map(Secret::new),
            extra: Map::new(),
        };
        // The file's absolute times are the daemon's own reckoning: a provider's are kept aside.
        for field in ["expires_at", "refresh_token_expires_at"] {
            if let Some(value) = fields.take(field) {
                set_aside(&mut fields.extra, field, value);
            }
        }
        Ok(TokenResponse {
            extra: fields.extra,
            ..resp
        })
    }
}

/// The published token file: the provider's fields as last received, plus absolute expiry times.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenFile {
    pub token_type: Option<String>,
    pub access_token: Secret,
    pub expires_in: Option<i64>,
    pub refresh_token: Option<Secret>,
    pub refresh_token_expires_in: Option<i64>,
    pub scope: Option<String>,
    pub id_token: Option<Secret>,
    pub expires_at: Option<Timestamp>,
    pub refresh_token_expires_at: Option<Timestamp>,
    /// Fields this version does not know, kept as they were. Parsing never leaves one of
    /// [`OWN_FIELDS`] here; one put here by hand is written as `provider_<name>`.
    pub extra: Map<String, Value>,
}

/// Written by hand rather than derived with `flatten`: a derived map would write an `extra` key that
/// clashes with an own field a second time, and a reader would then see the provider's value.
impl Serialize for TokenFile {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let time = |t: Option<Timestamp>| t.map(|t| floor_to_second(t).to_string());
        if let Some(v) = &self.token_type {
            map.serialize_entry("token_type", v)?;
        }
        map.serialize_entry("access_token", self.access_token.expose())?;
        if let Some(v) = self.expires_in {
            map.serialize_entry("expires_in", &v)?;
        }
        if let Some(v) = &self.refresh_token {
            map.serialize_entry("refresh_token", v.expose())?;
        }
        if let Some(v) = self.refresh_token_expires_in {
            map.serialize_entry("refresh_token_expires_in", &v)?;
        }
        if let Some(v) = &self.scope {
            map.serialize_entry("scope", v)?;
        }
        if let Some(v) = &self.id_token {
            map.serialize_entry("id_token", v.expose())?;
        }
        if let Some(v) = time(self.expires_at) {
            map.serialize_entry("expires_at", &v)?;
        }
        if let Some(v) = time(self.refresh_token_expires_at) {
            map.serialize_entry("refresh_token_expires_at", &v)?;
        }
        for (k, v) in &self.extra {
            if OWN_FIELDS.contains(&k.as_str()) {
                let aside = set_aside_name(k);
                if !self.extra.contains_key(&aside) {
                    map.serialize_entry(&aside, v)?;
                }
            } else {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

impl TokenFile {
    pub fn parse(bytes: &[u8]) -> Result<TokenFile, ParseError> {
        let mut fields = parse_object(bytes)?;
        let access_token = take_secret(&mut fields, "access_token")?.ok_or(ParseError::Missing("access_token"))?;
        let file = TokenFile {
            token_type: take_soft_string(&mut fields, "token_type"),
            access_token,
            expires_in: take_seconds(&mut fields, "expires_in")?,
            refresh_token: take_secret(&mut fields, "refresh_token")?,
            refresh_token_expires_in: take_seconds(&mut fields, "refresh_token_expires_in")?,
            scope: take_soft_string(&mut fields, "scope"),
            id_token: take_soft_string(&mut fields, "id_token").map(Secret::new),
            expires_at: take_timestamp(&mut fields, "expires_at"),
            refresh_token_expires_at: take_timestamp(&mut fields, "refresh_token_expires_at"),
            extra: Map::new(),
        };
        Ok(TokenFile {
            extra: fields.extra,
            ..file
        })
    }

    /// The file's bytes: pretty JSON and a final newline, so `cat` and `jq` both read it well.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// A file in the seed's format: the raw response, with no absolute times. Its access token's expiry
    /// is unknown (so it is refreshed at once) and its refresh token's expiry is estimated from the time
    /// the file was last written.
    pub fn is_seed_format(&self) -> bool {
        self.expires_at.is_none()
    }

    /// Fills in what the seed format leaves out, from the file's modification time.
    pub fn estimate_seed_times(&mut self, modified: Timestamp) {
        if self.refresh_token_expires_at.is_none()
            && let Some(secs) = self.refresh_token_expires_in
        {
            self.refresh_token_expires_at = Some(floor_to_second(add_secs(modified, secs)));
        }
    }

    /// The access token's lifetime as last issued.
    pub fn lifetime_secs(&self) -> Option<i64> {
        self.expires_in
    }

    /// Builds a fresh file from a first response (a login).
    pub fn from_response(resp: TokenResponse, sent_at: Timestamp) -> TokenFile {
        let empty = TokenFile {
            token_type: None,
            access_token: Secret::default(),
            expires_in: None,
            refresh_token: None,
            refresh_token_expires_in: None,
            scope: None,
            id_token: None,
            expires_at: None,
            refresh_token_expires_at: None,
            extra: Map::new(),
        };
        merge(&empty, resp, sent_at)
    }
}

/// Applies a refresh response to the current file. `sent_at` is when the request left, so every
/// absolute time is no later than the true instant.
///
/// Merge, never drop: Kakao sends `refresh_token` only in the old one's last month (and kills the old
/// one at that moment), so a response without one keeps the current refresh token and its expiry.
pub fn merge(current: &TokenFile, resp: TokenResponse, sent_at: Timestamp) -> TokenFile {
    let sent_at = floor_to_second(sent_at);
    let expires_in = resp.expires_in.unwrap_or(DEFAULT_LIFETIME_SECS);
    let (refresh_token, refresh_token_expires_in, refresh_token_expires_at) = match resp.refresh_token {
        Some(rt) => (
            Some(rt),
            resp.refresh_token_expires_in,
            resp.refresh_token_expires_in.map(|s| add_secs(sent_at, s)),
        ),
        None => (
            current.refresh_token.clone(),
            current.refresh_token_expires_in,
            current.refresh_token_expires_at,
        ),
    };
    let mut extra = current.extra.clone();
    extra.extend(resp.extra);
    TokenFile {
        token_type: resp.token_type.or_else(|| current.token_type.clone()),
        access_token: resp.access_token,
        expires_in: Some(expires_in),
        refresh_token,
        refresh_token_expires_in,
        scope: resp.scope.or_else(|| current.scope.clone()),
        id_token: resp.id_token.or_else(|| current.id_token.clone()),
        expires_at: Some(add_secs(sent_at, expires_in)),
        refresh_token_expires_at,
        extra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_characters() {
        for ok in [
            "fake-at-abc",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln",
            "b64+/token==",
            "1234|abcd",
            "a~b_c.d-e:f@g!h#i%j&k(l)m*n,o;p<q=r>s?t[u]v^w{x}y",
        ] {
            assert!(token_chars_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "AT\nLD_PRELOAD=/tmp/evil.so",
            "a b",
            "a\tb",
            "a\"b",
            "a'b",
            "a\\b",
            "a`id`",
            "$(id)",
            "토큰",
            "a\u{7f}",
        ] {
            assert!(!token_chars_ok(bad), "{bad:?}");
        }
    }

    fn answer(json: &str) -> TokenResponse {
        TokenResponse::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn what_an_answer_may_be_used_for() {
        assert_eq!(
            usable(&answer(r#"{"access_token":"AT","expires_in":2}"#)),
            Usable::Whole
        );
        assert_eq!(
            usable(&answer(r#"{"access_token":"AT","expires_in":1,"refresh_token":"RT"}"#)),
            Usable::RefreshTokenOnly(Unusable::ShortLifetime(1))
        );
        assert_eq!(
            usable(&answer(r#"{"access_token":"AT","expires_in":0}"#)),
            Usable::Nothing(Unusable::ShortLifetime(0))
        );
        assert_eq!(
            usable(&answer(r#"{"access_token":"AT\nX=1","refresh_token":"RT2"}"#)),
            Usable::RefreshTokenOnly(Unusable::Characters("access_token"))
        );
        assert_eq!(
            usable(&answer(r#"{"access_token":"AT\nX=1"}"#)),
            Usable::Nothing(Unusable::Characters("access_token"))
        );
        assert_eq!(
            usable(&answer(r#"{"access_token":"AT","refresh_token":"R T"}"#)),
            Usable::Nothing(Unusable::Characters("refresh_token"))
        );
    }

    #[test]
    fn refresh_token_only_keeps_the_access_token() {
        let current = kakao_login();
        let at = ts("2026-01-01T00:00:00Z");
        let resp = answer(
            r#"{"access_token":"A\nB","expires_in":21599,"refresh_token":"RT2","refresh_token_expires_in":100}"#,
        );
        let file = merge_refresh_token_only(&current, resp, at);
        assert_eq!(file.access_token, current.access_token);
        assert_eq!(file.expires_at, current.expires_at);
        assert_eq!(file.refresh_token.as_ref().unwrap().expose(), "RT2");
        assert_eq!(file.refresh_token_expires_at, Some(ts("2026-01-01T00:01:40Z")));
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn kakao_login() -> TokenFile {
        let resp = TokenResponse::parse(
            br#"{"token_type":"bearer","access_token":"AT1","expires_in":21599,
                 "refresh_token":"RT1","refresh_token_expires_in":5183999,"scope":"talk_message"}"#,
        )
        .unwrap();
        TokenFile::from_response(resp, ts("2026-01-01T00:00:00.7Z"))
    }

    #[test]
    fn the_reading_keeps_json_object_rules() {
        // A repeated key: the last one wins, for own fields and others alike.
        let f = TokenFile::parse(br#"{"access_token":"A","access_token":"B","x":1,"x":2}"#).unwrap();
        assert_eq!(f.access_token.expose(), "B");
        assert_eq!(f.extra["x"], 2);
        // An escaped key names the same field.
        let f = TokenFile::parse(br#"{"access\u005ftoken":"A","scope":"s"}"#).unwrap();
        assert_eq!(f.access_token.expose(), "A");
        assert!(f.extra.is_empty());
        // A provider's own `provider_<name>` wins over a clashing field set aside under that name.
        let f = TokenFile::parse(br#"{"access_token":"A","scope":["a"],"provider_scope":"kept"}"#).unwrap();
        assert_eq!(f.scope, None);
        assert_eq!(f.extra["provider_scope"], "kept");
        for (text, want) in [
            (&b"[1, 2]"[..], ParseError::NotObject),
            (b"\"A\"", ParseError::NotObject),
            (b"  \n", ParseError::Empty),
        ] {
            assert_eq!(TokenFile::parse(text).unwrap_err(), want);
        }
        for broken in [&br#"{"access_token":"A""#[..], br#"{"access_token":"A"} x"#, b"{,}"] {
            let e = TokenFile::parse(broken).unwrap_err();
            assert!(matches!(e, ParseError::NotJson(_)), "{e:?}");
        }
        assert_eq!(
            TokenFile::parse(br#"{"access_token":7}"#).unwrap_err(),
            ParseError::BadField {
                field: "access_token",
                problem: "must be a string"
            }
        );
    }

    #[test]
    fn login_gets_absolute_times_floored_to_the_second() {
        let f = kakao_login();
        assert_eq!(f.expires_at, Some(ts("2026-01-01T05:59:59Z")));
        assert_eq!(f.refresh_token_expires_at, Some(ts("2026-03-01T23:59:59Z")));
        let text = String::from_utf8(f.to_bytes()).unwrap();
        assert!(text.contains("\"expires_at\": \"2026-01-01T05:59:59Z\""), "{text}");
    }

    #[test]
    fn refresh_without_rotation_keeps_the_refresh_token() {
        let f = kakao_login();
        let resp = TokenResponse::parse(br#"{"token_type":"bearer","access_token":"AT2","expires_in":21599}"#).unwrap();
        let g = merge(&f, resp, ts("2026-01-01T04:00:00Z"));
        assert_eq!(g.access_token.expose(), "AT2");
        assert_eq!(g.refresh_token.as_ref().unwrap().expose(), "RT1");
        assert_eq!(g.refresh_token_expires_at, f.refresh_token_expires_at);
        assert_eq!(g.refresh_token_expires_in, Some(5183999));
        assert_eq!(g.scope.as_deref(), Some("talk_message"));
        assert_eq!(g.expires_at, Some(ts("2026-01-01T09:59:59Z")));
    }

    #[test]
    fn rotation_replaces_the_refresh_token_and_its_expiry() {
        let f = kakao_login();
        let resp = TokenResponse::parse(
            br#"{"access_token":"AT3","expires_in":21599,"refresh_token":"RT2","refresh_token_expires_in":5184000}"#,
        )
        .unwrap();
        let g = merge(&f, resp, ts("2026-02-01T00:00:00Z"));
        assert_eq!(g.refresh_token.as_ref().unwrap().expose(), "RT2");
        assert_eq!(g.refresh_token_expires_at, Some(ts("2026-04-02T00:00:00Z")));
    }

    #[test]
    fn standard_oauth2_rotation_without_expiry_drops_the_stale_expiry() {
        let f = kakao_login();
        let resp = TokenResponse::parse(
            br#"{"token_type":"Bearer","access_token":"AT","expires_in":3600,"refresh_token":"RTX","id_token":"ID"}"#,
        )
        .unwrap();
        let g = merge(&f, resp, ts("2026-01-01T04:00:00Z"));
        assert_eq!(g.refresh_token.as_ref().unwrap().expose(), "RTX");
        assert_eq!(g.refresh_token_expires_at, None);
        assert_eq!(g.id_token.as_ref().unwrap().expose(), "ID");
        assert_eq!(g.token_type.as_deref(), Some("Bearer"));
    }

    #[test]
    fn unknown_fields_survive_a_round_trip_and_a_merge() {
        let f = TokenFile::parse(
            br#"{"access_token":"A","refresh_token":"R","expires_in":10,"expires_at":"2026-01-01T00:00:10Z","note":{"k":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(f.extra["note"]["k"][1], 2);
        let again = TokenFile::parse(&f.to_bytes()).unwrap();
        assert_eq!(again, f);
        let resp = TokenResponse::parse(br#"{"access_token":"B","expires_in":10}"#).unwrap();
        assert_eq!(merge(&f, resp, ts("2026-01-01T00:00:05Z")).extra["note"]["k"][0], 1);
    }

    #[test]
    fn the_seeds_file_is_accepted_and_estimated() {
        let mut f = TokenFile::parse(
            br#"{"access_token": "A", "token_type": "bearer", "refresh_token": "R", "expires_in": 21599, "scope": "talk_message", "refresh_token_expires_in": 5183999}"#,
        )
        .unwrap();
        assert!(f.is_seed_format());
        f.estimate_seed_times(ts("2026-01-01T00:00:00Z"));
        assert_eq!(f.refresh_token_expires_at, Some(ts("2026-03-01T23:59:59Z")));
        assert_eq!(f.expires_at, None);
    }

    #[test]
    fn errors_name_the_field_and_never_the_value() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "is empty"),
            (b"[1]", "not a JSON object"),
            (b"{\"access_token\": \"SECRET", "not JSON"),
            (b"{\"refresh_token\":\"SECRET\"}", "access_token"),
            (b"{\"access_token\":12345678}", "access_token"),
            (b"{\"access_token\":\"A\",\"expires_in\":\"SECRET\"}", "expires_in"),
            (b"{\"access_token\":\"A\",\"expires_in\":-5}", "negative"),
            (b"{\"access_token\":\"A\",\"expires_in\":99999999999999}", "absurdly"),
        ];
        for (input, want) in cases {
            let err = TokenFile::parse(input).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
            assert!(
                !err.contains("SECRET") && !err.contains("12345678"),
                "{err} leaks the value"
            );
        }
        assert_eq!(
            TokenResponse::parse(&vec![b' '; MAX_DOCUMENT_BYTES + 1]),
            Err(ParseError::TooLarge)
        );
    }

    /// Strava and others answer with their own `expires_at` (seconds since the epoch): kept aside, never
    /// written over the file's own time or beside it under the same name.
    #[test]
    fn a_providers_own_absolute_times_are_kept_aside() {
        let resp = TokenResponse::parse(
            br#"{"token_type":"Bearer","access_token":"AT","expires_in":21600,"expires_at":1767247200,
                 "refresh_token":"RT","refresh_token_expires_at":"soon","scope":["read","activity:read"]}"#,
        )
        .unwrap();
        let f = TokenFile::from_response(resp, ts("2026-01-01T00:00:00Z"));
        let text = String::from_utf8(f.to_bytes()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["expires_at"], "2026-01-01T06:00:00Z");
        assert_eq!(v["provider_expires_at"], 1767247200);
        assert_eq!(v["provider_refresh_token_expires_at"], "soon");
        assert_eq!(v["provider_scope"][1], "activity:read");
        assert_eq!(text.matches("\"expires_at\"").count(), 1, "{text}");
        let again = TokenFile::parse(text.as_bytes()).unwrap();
        assert_eq!(again, f);
    }

    /// A file that holds a provider's field where the file's own belongs (written by another tool, or by
    /// a version that wrote the provider's `expires_at` a second time) is adopted, not refused.
    #[test]
    fn a_file_holding_a_providers_field_is_adopted() {
        let f = TokenFile::parse(
            br#"{"access_token":"A","refresh_token":"R","expires_in":21600,"expires_at":1767247200,
                 "refresh_token_expires_at":{"at":1},"token_type":7,"id_token":["x"]}"#,
        )
        .unwrap();
        assert_eq!(f.expires_at, Some(ts("2026-01-01T06:00:00Z")));
        assert_eq!(f.extra["provider_expires_at"], 1767247200);
        assert_eq!(f.refresh_token_expires_at, None);
        assert_eq!(f.extra["provider_refresh_token_expires_at"]["at"], 1);
        assert_eq!((f.token_type.as_ref(), f.id_token.as_ref()), (None, None));
        assert_eq!(f.extra["provider_token_type"], 7);
        // Unknown times are not guessed: an unreadable or out-of-range value leaves the time unknown.
        for bad in [br#""yesterday""#.as_slice(), b"-5", b"99999999999999", b"1.5", b"true"] {
            let mut doc = br#"{"access_token":"A","expires_at":"#.to_vec();
            doc.extend_from_slice(bad);
            doc.push(b'}');
            let f = TokenFile::parse(&doc).unwrap();
            assert_eq!(f.expires_at, None, "{}", String::from_utf8_lossy(&doc));
            assert!(f.extra.contains_key("provider_expires_at"));
        }
        // Digits in a string are seconds too.
        let f = TokenFile::parse(br#"{"access_token":"A","expires_at":"1767247200"}"#).unwrap();
        assert_eq!(f.expires_at, Some(ts("2026-01-01T06:00:00Z")));
    }

    #[test]
    fn an_own_field_put_in_extra_by_hand_is_written_aside() {
        let mut f = kakao_login();
        f.extra.insert("expires_at".into(), Value::from(5));
        let v: Value = serde_json::from_slice(&f.to_bytes()).unwrap();
        assert_eq!(v["expires_at"], "2026-01-01T05:59:59Z");
        assert_eq!(v["provider_expires_at"], 5);
    }

    #[test]
    fn seconds_may_be_strings() {
        let r = TokenResponse::parse(br#"{"access_token":"A","expires_in":"3600"}"#).unwrap();
        assert_eq!(r.expires_in, Some(3600));
    }
}
