//! Splits a config's text at its table headers, so that a config of many accounts is read one account at
//! a time. The `toml` crate's document for a whole file takes about 19 bytes per byte of text (290 MiB
//! for 100,000 accounts), all of it held until the last account is read; one account's section is a
//! document of a few kilobytes.
//!
//! Only the plain layout is split: `[daemon]`, `[store]` and `[accounts.NAME]` with NAME a bare key.
//! Anything else (an array of tables, a quoted or dotted name, `[accounts]` itself) returns `None`, and
//! the caller reads the file whole, as TOML defines it, with its errors by position.
//!
//! An account's section that holds only `key = "text"` lines (what a generated config of many accounts
//! holds) is read by [`read_plain`] without a TOML parser: at 100,000 accounts the parser's documents
//! were most of the config's reading. Any other section, and any section whose fields do not fit, is
//! left to the `toml` crate.

use toml_parser::lexer::TokenKind;

/// A config's text cut into the part without accounts and one part per account.
#[derive(Debug, PartialEq)]
pub struct Sections<'t> {
    /// The key-values before the first header, then `[daemon]` and `[store]` with their headers.
    pub head: String,
    /// Each `[accounts.NAME]`: the name and the text after its header line, up to the next header.
    pub accounts: Vec<(&'t str, &'t str)>,
}

enum Part<'t> {
    Head,
    Account(&'t str),
}

/// Cuts `text` at every table header; `None` where the layout is not the plain one (see the module).
pub fn split(text: &str) -> Option<Sections<'_>> {
    split_by_lines(text).or_else(|| split_by_tokens(text))
}

/// The same cut, for a text where no value spans lines: no multi-line string anywhere, and on each
/// line the strings close and the brackets and braces balance. Then a line that starts with `[` is a
/// header, with no lexer over the whole text (a third of a 100,000-account config's reading). `None`
/// where that does not hold, or the layout is not the plain one.
fn split_by_lines(text: &str) -> Option<Sections<'_>> {
    if text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut sections = Sections {
        head: String::new(),
        accounts: Vec::new(),
    };
    let mut part = Part::Head;
    let mut part_start = 0;
    let mut line_start = 0;
    while line_start < text.len() {
        let line_end = text[line_start..].find('\n').map_or(text.len(), |i| line_start + i);
        let next = (line_end + 1).min(text.len());
        let line = &text[line_start..line_end];
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if line[indent..].starts_with('[') {
            // The header ends before a comment; a `#` inside a quoted name makes it no plain header anyway.
            let header = line[indent..].split('#').next().unwrap_or_default();
            let header = header.trim_end_matches([' ', '\t', '\r']);
            let header_start = line_start + indent;
            close(&mut sections, &part, &text[part_start..header_start]);
            part = table_part(header)?;
            if let Part::Head = part {
                sections.head.push_str(header);
                sections.head.push('\n');
            }
            part_start = next;
        } else if !self_contained(line) {
            return None;
        }
        line_start = line_end + 1;
    }
    close(&mut sections, &part, &text[part_start..]);
    Some(sections)
}

/// Whether a line that is not a header ends all it opens: its strings close, and its brackets and
/// braces balance, outside strings and before a comment.
fn self_contained(line: &str) -> bool {
    let mut depth = 0u32;
    let mut bytes = line.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'#' => break,
            b'"' => loop {
                match bytes.next() {
                    Some(b'\\') => {
                        bytes.next();
                    }
                    Some(b'"') => break,
                    Some(_) => {}
                    None => return false,
                }
            },
            b'\'' if !bytes.any(|b| b == b'\'') => return false,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            _ => {}
        }
    }
    depth == 0
}

/// The cut by TOML's own lexer, which follows a value over lines.
fn split_by_tokens(text: &str) -> Option<Sections<'_>> {
    let mut sections = Sections {
        head: String::new(),
        accounts: Vec::new(),
    };
    // The part being read, and where its text (after its header line) starts.
    let mut part = Part::Head;
    let mut part_start = 0;
    let mut line_start = true;
    // Inside a value (after `=`), brackets and braces open arrays and inline tables, not headers.
    let mut in_value = false;
    let mut depth = 0u32;
    let mut tokens = toml_parser::Source::new(text).lex();
    while let Some(token) = tokens.next() {
        let span = token.span();
        match token.kind() {
            TokenKind::Whitespace | TokenKind::Comment => {}
            TokenKind::Newline => {
                if depth == 0 {
                    in_value = false;
                    line_start = true;
                }
            }
            TokenKind::Eof => break,
            TokenKind::LeftSquareBracket if line_start && !in_value => {
                // A header: read the rest of its line; the part's text starts on the next one.
                let header_start = span.start();
                let mut header_end = span.end();
                let mut body_start = text.len();
                for t in tokens.by_ref() {
                    match t.kind() {
                        TokenKind::Newline => {
                            body_start = t.span().end();
                            break;
                        }
                        TokenKind::Eof => break,
                        TokenKind::Comment | TokenKind::Whitespace => {}
                        _ => header_end = t.span().end(),
                    }
                }
                close(&mut sections, &part, &text[part_start..header_start]);
                let header = &text[header_start..header_end];
                part = table_part(header)?;
                if let Part::Head = part {
                    sections.head.push_str(header);
                    sections.head.push('\n');
                }
                part_start = body_start;
                line_start = true;
                in_value = false;
            }
            kind => {
                line_start = false;
                match kind {
                    TokenKind::Equals if depth == 0 => in_value = true,
                    TokenKind::LeftSquareBracket | TokenKind::LeftCurlyBracket if in_value => depth += 1,
                    TokenKind::RightSquareBracket | TokenKind::RightCurlyBracket if in_value => {
                        depth = depth.checked_sub(1)?;
                    }
                    _ => {}
                }
            }
        }
    }
    close(&mut sections, &part, &text[part_start..]);
    Some(sections)
}

fn close<'t>(sections: &mut Sections<'t>, part: &Part<'t>, body: &'t str) {
    match part {
        Part::Head => sections.head.push_str(body),
        Part::Account(name) => sections.accounts.push((name, body)),
    }
}

/// The part a header opens: `[daemon]` and `[store]` the head, `[accounts.NAME]` (NAME a bare key) an
/// account; any other header `None`.
fn table_part(header: &str) -> Option<Part<'_>> {
    let name = header.strip_prefix('[')?.strip_suffix(']')?.trim_matches([' ', '\t']);
    let bare = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match name {
        "daemon" | "store" => Some(Part::Head),
        _ => name.strip_prefix("accounts.").filter(|n| bare(n)).map(Part::Account),
    }
}

/// Reads a section of only bare keys, basic strings without escapes, blank lines and comment lines into
/// `T`; `None` for anything else (another form of value, a key or field `T` refuses, a repeated key),
/// which the caller then reads with the `toml` crate, and its rules and errors.
pub fn read_plain<'t, T: serde::Deserialize<'t>>(body: &'t str) -> Option<T> {
    let pairs = plain_pairs(body)?;
    let fields = serde::de::value::MapDeserializer::<_, serde::de::value::Error>::new(
        pairs.into_iter().map(|(k, v)| (k, PlainText(v))),
    );
    T::deserialize(fields).ok()
}

/// The `key = "text"` lines of `body`, or `None` if any line is something else. What is accepted is
/// valid TOML with exactly these values: no control character but tab, no escape, nothing after the
/// closing quote.
fn plain_pairs(body: &str) -> Option<Vec<(&str, &str)>> {
    let mut pairs = Vec::new();
    for line in body.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return None;
        }
        let line = line.trim_matches([' ', '\t']);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=')?;
        let key = key.trim_end_matches([' ', '\t']);
        let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let text = value
            .trim_start_matches([' ', '\t'])
            .strip_prefix('"')?
            .strip_suffix('"')?;
        if !bare || text.contains(['"', '\\']) {
            return None;
        }
        pairs.push((key, text));
    }
    Some(pairs)
}

/// A string value that also fills an `Option` field, as a TOML string does.
struct PlainText<'t>(&'t str);

impl<'de> serde::Deserializer<'de> for PlainText<'de> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_borrowed_str(self.0)
    }

    fn deserialize_option<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> serde::de::IntoDeserializer<'de, serde::de::value::Error> for PlainText<'de> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        client_id: String,
        token_file: Option<std::path::PathBuf>,
        scope: Option<String>,
        #[serde(default)]
        pkce: bool,
    }

    #[test]
    fn a_plain_section_reads_as_toml_does() {
        for body in [
            "client_id = \"1\"\n",
            "client_id=\"1\"\r\n\t token_file = \"/t/a b.json\"  \n# note\n\n",
            "  # only a comment, then\nclient_id = \"\u{d55c}\"\nscope = \"\"\n",
            "client_id = \"1\"\ntoken_file = \"x\"",
        ] {
            let plain: Section = read_plain(body).unwrap_or_else(|| panic!("{body:?}"));
            assert_eq!(plain, toml::from_str::<Section>(body).unwrap(), "{body:?}");
        }
    }

    #[test]
    fn any_other_section_is_left_to_toml() {
        for body in [
            // Other values, escapes, quotes and comments after a value.
            "client_id = \"1\"\npkce = false\n",
            "client_id = '1'\n",
            "client_id = \"a\\tb\"\n",
            "client_id = \"\"\"\n1\"\"\"\n",
            "client_id = \"1\" # one\n",
            "client_id = \"1\nscope = \"2\"\n",
            // Keys that are not bare, or named twice, or unknown.
            "\"client_id\" = \"1\"\n",
            "client.id = \"1\"\n",
            "client_id = \"1\"\nclient_id = \"2\"\n",
            "client_id = \"1\"\nother = \"2\"\n",
            // A control character, a lone carriage return.
            "client_id = \"1\u{7}\"\n",
            "client_id = \"1\"\rscope = \"2\"\n",
            // A missing field.
            "scope = \"2\"\n",
        ] {
            assert_eq!(read_plain::<Section>(body), None, "{body:?}");
        }
    }

    #[test]
    fn the_plain_layout_is_cut_per_account() {
        let text = "# top\nx = 1\n[daemon]\nbackups = 5 # five\n\n[accounts.a]\nclient_id = \"1\"\n\
                    [ accounts.b ]  # b\nclient_id = \"2\"\n[store]\nkind = \"file\"\n";
        let s = split(text).unwrap();
        assert_eq!(
            s.head,
            "# top\nx = 1\n[daemon]\nbackups = 5 # five\n\n[store]\nkind = \"file\"\n"
        );
        assert_eq!(
            s.accounts,
            vec![("a", "client_id = \"1\"\n"), ("b", "client_id = \"2\"\n")]
        );
    }

    #[test]
    fn brackets_inside_values_and_strings_are_not_headers() {
        let text = "[accounts.a]\non_refresh = [\n[\"x\"],\n]\nscope = \"\"\"\n[accounts.b]\n\"\"\"\n\
                    message_link = '''\n[store]'''\nt = {\n a = [1] }\n[accounts.c]\n";
        let s = split(text).unwrap();
        assert_eq!(s.accounts.len(), 2);
        assert_eq!(s.accounts[0].0, "a");
        assert!(s.accounts[0].1.contains("[accounts.b]") && s.accounts[0].1.contains("[store]"));
        assert_eq!(s.accounts[1], ("c", ""));
        assert_eq!(s.head, "");
    }

    #[test]
    fn any_other_layout_is_left_to_the_whole_file_reading() {
        for text in [
            "[[accounts]]\n",
            "[accounts]\na = {}\n",
            "[accounts.\"a\"]\n",
            "[accounts.a.b]\n",
            "[accounts.a]\n[accounts.a.extra]\n",
            "[other]\n",
            "a = ]\n",
        ] {
            assert_eq!(split(text), None, "{text:?}");
        }
    }

    /// Where the cut by lines is taken, it is the lexer's cut exactly; where a value may span lines, it is
    /// not taken.
    #[test]
    fn the_cut_by_lines_is_the_lexers_or_none() {
        let shipped = include_str!("../config/kakao-tokend.toml");
        let cases = [
            (shipped, true),
            (
                "# top\nx = 1\n[daemon]\nbackups = 5 # [five\n\n[accounts.a]\nclient_id = \"1\"\n",
                true,
            ),
            (
                "[ accounts.b ]  # b\r\nclient_id = \"[2\"\r\n  [store]\r\nendpoints = [\"a\", 'b]']\n",
                true,
            ),
            (
                "[accounts.a]\nx = \"a\\\"[\"\non_refresh = [[\"x\"], {a = 1}]\n[accounts.c]",
                true,
            ),
            ("[accounts.a]", true),
            ("", true),
            // Values over lines: a multi-line string or array, or a string that does not close.
            ("[accounts.a]\non_refresh = [\n[\"x\"],\n]\n", false),
            ("[accounts.a]\nscope = \"\"\"\n[accounts.b]\n\"\"\"\n", false),
            ("[accounts.a]\nlink = '''\n[store]'''\n", false),
            ("[accounts.a]\nx = \"[\n[accounts.b]\n", false),
            ("[accounts.a]\nx = ]\n", false),
        ];
        for (text, by_lines) in cases {
            let lines = split_by_lines(text);
            assert_eq!(lines.is_some(), by_lines, "{text:?}");
            if lines.is_some() {
                assert_eq!(lines, split_by_tokens(text), "{text:?}");
            }
        }
    }

    proptest::proptest! {
        /// Texts of headers and of values made of the pieces that open and close strings, arrays and
        /// tables: on TOML, the cut by lines is the lexer's wherever it is taken.
        #[test]
        fn the_cut_by_lines_agrees_on_any_text(
            lines in proptest::collection::vec((0usize..6, 0usize..15), 0..16),
        ) {
            const VALUES: [&str; 15] = [
                "1", "\"a\"", "\"[x\"", "'b]'", "[1, 2]", "[\"a]\", '[']", "{ a = 1 }", "\"\\\"[\"",
                "[[1], [2]]", "\"#[\"", "1 # [", "\"\"\"", "\"", "[", "{",
            ];
            let text: String = lines
                .iter()
                .enumerate()
                .map(|(i, &(kind, value))| match kind {
                    0 => format!("[accounts.a{i}]\n"),
                    1 => format!("  [accounts.b{i}] # b\r\n"),
                    2 => "[daemon]\n".to_string(),
                    _ => format!("k{i} = {}\n", VALUES[value]),
                })
                .collect();
            // Text that is no TOML may be cut otherwise: its pieces are no TOML either, and the file's
            // reading reports the error, whichever cut was taken.
            if let Some(lines) = split_by_lines(&text)
                && toml::from_str::<toml::Table>(&text).is_ok()
            {
                proptest::prop_assert_eq!(Some(lines), split_by_tokens(&text), "{:?}", text);
            }
        }
    }

    #[test]
    fn a_file_without_a_last_newline_or_headers() {
        assert_eq!(split("[accounts.a]").unwrap().accounts, vec![("a", "")]);
        let s = split("[accounts.a]\nclient_id = \"1\"").unwrap();
        assert_eq!(s.accounts, vec![("a", "client_id = \"1\"")]);
        assert_eq!(
            split("").unwrap(),
            Sections {
                head: String::new(),
                accounts: vec![]
            }
        );
    }
}
