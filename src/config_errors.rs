//! Config errors that never print a value. A config holds the client secret, and its errors reach the
//! terminal and, on SIGHUP, the journal: a syntax or type error names the line, the column and the key,
//! and what was expected, but not what was found. Pure functions of the file's text and the error.

/// Where a line and column are in `text`, 1-based, from a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Where a file stops being UTF-8: line and column of the first bad byte.
pub fn locate_offset(e: &std::string::FromUtf8Error) -> (usize, usize) {
    let good = e.utf8_error().valid_up_to();
    let text = std::str::from_utf8(&e.as_bytes()[..good]).unwrap_or_default();
    line_column(text, good)
}

/// `s` when it is a plain dotted key (`accounts.me.client_id`), the only text of a broken line that is
/// safe to show: anything else on it may be a value.
fn plain_key(s: &str) -> Option<&str> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    ok.then_some(s)
}

/// A `[table]` header's name, when the line is one and the name is plain.
fn header(line: &str) -> Option<Option<&str>> {
    let t = line.trim();
    if !t.starts_with('[') || t.starts_with("[[") {
        return None;
    }
    Some(
        t.strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .and_then(|(name, _)| plain_key(name)),
    )
}

/// The dotted key a line of TOML sets, from the last `[table]` header above it and its `key =`; `None`
/// when either is not a plain key (a broken line may hold a value where a key belongs).
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let mut table: Option<String> = Some(String::new());
    for (i, l) in text.lines().enumerate() {
        if let Some(name) = header(l) {
            table = name.map(str::to_owned);
            if i + 1 == line {
                return table.filter(|t| !t.is_empty());
            }
            continue;
        }
        if i + 1 == line {
            let table = table?;
            let key = plain_key(l.split_once('=')?.0)?;
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
    }
    None
}

/// The line and column of the value a dotted key is set to, when the file sets it on a line of its own.
pub fn locate(text: &str, dotted: &str) -> Option<(usize, usize)> {
    let mut table = Some(String::new());
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if let Some(name) = header(l) {
            // A table's own error (an unknown field in it) is reported at its header.
            if name == Some(dotted) {
                return Some((i + 1, l.len() - l.trim_start().len() + 1));
            }
            table = name.map(str::to_owned);
        } else if let (Some(t), Some((k, rest))) = (&table, l.split_once('=')) {
            let Some(k) = plain_key(k) else { continue };
            let full = if t.is_empty() {
                k.to_string()
            } else {
                format!("{t}.{k}")
            };
            if full == dotted {
                let eq = l.len() - rest.len() - 1;
                let value_at = eq + 1 + (rest.len() - rest.trim_start().len());
                return Some((i + 1, l[..value_at].chars().count() + 1));
            }
        }
    }
    None
}

/// A TOML syntax error: position, key and the parser's description (which names tokens, not values).
pub fn syntax(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return format!("TOML syntax error: {}", e.message());
    };
    let (line, column) = line_column(text, span.start);
    let key = key_at_line(text, line)
        .map(|k| format!(", key `{k}`"))
        .unwrap_or_default();
    format!(
        "TOML syntax error at line {line}, column {column}{key}: {}",
        first_line(e.message())
    )
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// What kind of value was found, never the value itself: the words of its description before the
/// value (`string "…"` → "a string"). The crate does not export the type, so its text is read.
fn kind(unexpected: &dyn std::fmt::Display) -> String {
    let shown = unexpected.to_string();
    let words = shown.split(['`', '"']).next().unwrap_or_default().trim();
    match words {
        "string" => "a string".into(),
        "boolean" => "a boolean".into(),
        "sequence" => "an array".into(),
        "map" => "a table".into(),
        w if w.contains("integer") => "an integer".into(),
        w if w.contains("floating") => "a float".into(),
        _ => "another kind of value".into(),
    }
}

/// A message with every value the file or the environment sets removed, in case the error quoted one
/// (serde's "unknown variant `x`", "invalid type: string \"x\"", a custom deserializer's words): as
/// written, as Rust escapes it (a tab becomes `\t`), and any double-quoted text at all.
fn without_values(message: &str, values: &[String]) -> String {
    let mut out = message.to_string();
    for v in values.iter().filter(|v| v.len() >= 2) {
        out = out.replace(v.as_str(), "…");
        let escaped = format!("{v:?}");
        if let Some(inner) = escaped.get(1..escaped.len() - 1)
            && inner.len() >= 2
        {
            out = out.replace(inner, "…");
        }
    }
    without_quoted(&out)
}

/// Replaces the inside of every `string "…"` (with its escapes) by "…": serde shows a value of the wrong
/// type that way. Other quoted text (the examples in the config's own messages) stays.
fn without_quoted(message: &str) -> String {
    const MARK: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at + MARK.len()]);
        let mut escaped = false;
        let mut end = None;
        for (i, q) in rest[at + MARK.len()..].char_indices() {
            if escaped {
                escaped = false;
            } else if q == '\\' {
                escaped = true;
            } else if q == '"' {
                end = Some(at + MARK.len() + i);
                break;
            }
        }
        out.push('…');
        match end {
            Some(end) => rest = &rest[end..],
            None => {
                rest = "";
                out.push('"');
            }
        }
    }
    out.push_str(rest);
    out
}

/// Every string value in a TOML table, recursively.
pub fn string_values(table: &toml::Table) -> Vec<String> {
    fn walk(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::String(s) => out.push(s.clone()),
            toml::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            toml::Value::Table(t) => t.values().for_each(|x| walk(x, out)),
            toml::Value::Integer(i) => out.push(i.to_string()),
            toml::Value::Float(f) => out.push(f.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    table.values().for_each(|v| walk(v, &mut out));
    out
}

/// An error from loading or deserializing the merged config, without values. `values` are every value
/// the file and the environment set, removed from any message that may quote one.
pub fn describe(e: &config::ConfigError, text: &str, values: &[String]) -> String {
    use config::ConfigError as E;
    let at = |key: Option<&String>| -> String {
        match key {
            Some(k) => match locate(text, k) {
                Some((line, column)) => format!("line {line}, column {column}, key `{k}`"),
                None => format!("key `{k}` (from the environment)"),
            },
            None => "the config".to_string(),
        }
    };
    match e {
        E::Type {
            unexpected,
            expected,
            key,
            ..
        } => format!("{}: expected {expected}, found {}", at(key.as_ref()), kind(unexpected)),
        E::At { error, key, .. } => match error.as_ref() {
            E::Type {
                unexpected, expected, ..
            } => format!("{}: expected {expected}, found {}", at(key.as_ref()), kind(unexpected)),
            inner => format!("{}: {}", at(key.as_ref()), without_values(&inner.to_string(), values)),
        },
        other => without_values(&other.to_string(), values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_keys() {
        let text = "# c\n[daemon]\nbackups = 3\n\n[accounts.me]\nclient_id = \"x\"\n  client_secret =   \"s\"\n";
        assert_eq!(locate(text, "daemon.backups"), Some((3, 11)));
        assert_eq!(locate(text, "accounts.me.client_secret"), Some((7, 21)));
        assert_eq!(locate(text, "accounts.me.scope"), None);
        // A table is found at its header (an unknown field in it is the table's error).
        assert_eq!(locate(text, "daemon"), Some((2, 1)));
        assert_eq!(locate(text, "accounts.me"), Some((5, 1)));
        assert_eq!(key_at_line(text, 7).as_deref(), Some("accounts.me.client_secret"));
        assert_eq!(key_at_line(text, 5).as_deref(), Some("accounts.me"));
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, text.find("backups").unwrap()), (3, 1));
    }

    #[test]
    fn a_syntax_error_on_the_secret_line_does_not_print_it() {
        let text = "[accounts.me]\nclient_id = \"x\"\nclient_secret = \"s3cret-value\n";
        let e = toml::from_str::<toml::Table>(text).unwrap_err();
        let m = syntax(text, &e);
        assert!(!m.contains("s3cret"), "{m}");
        assert!(m.contains("line 3") && m.contains("`accounts.me.client_secret`"), "{m}");
    }

    #[test]
    fn a_value_escaped_in_a_message_is_removed_too() {
        let value = "\thttps://Zq7SECRET@example.com".to_string();
        let m = without_values(
            "invalid type: string \"\\thttps://Zq7SECRET@example.com\", expected a sequence",
            &[value],
        );
        assert!(!m.contains("Zq7SECRET"), "{m}");
        assert_eq!(m, "invalid type: string \"…\", expected a sequence");
        // A string value serde shows goes even when the values list did not hold it; examples stay.
        assert_eq!(
            without_quoted(r#"invalid type: string "b\"c", expected "33%""#),
            r#"invalid type: string "…", expected "33%""#
        );
    }

    #[test]
    fn quoted_values_are_removed() {
        let m = without_values(
            "unknown variant `s3cret-value`, expected `text` or `json`",
            &["s3cret-value".into()],
        );
        assert_eq!(m, "unknown variant `…`, expected `text` or `json`");
    }
}
