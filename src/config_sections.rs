//! Splits a config's text at its table headers, so that a config of many accounts is read one account at
//! a time. The `toml` crate's document for a whole file takes about 19 bytes per byte of text (290 MiB
//! for 100,000 accounts), all of it held until the last account is read; one account's section is a
//! document of a few kilobytes.
//!
//! Only the plain layout is split: `[daemon]`, `[store]` and `[accounts.NAME]` with NAME a bare key.
//! Anything else (an array of tables, a quoted or dotted name, `[accounts]` itself) returns `None`, and
//! the caller reads the file whole, as TOML defines it, with its errors by position.

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

#[cfg(test)]
mod tests {
    use super::*;

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
