//! A string that never shows itself in logs, errors or `Debug` output.
//!
//! Tokens and client secrets live in [`Secret`] from the moment they are parsed. It has no `Serialize`:
//! a struct that derives one cannot carry a secret into its output by accident. The two places that need
//! the real value (the token file's writer, the HTTP form) call [`Secret::expose`] by name; everything
//! meant for people redacts.

use std::fmt;

use serde::{Deserialize, Deserializer};

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The real value, for the one place that needs it (a request body, the `token` command).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("abc123-very-secret");
        assert!(!format!("{s:?}").contains("abc123"));
        assert!(!format!("{s}").contains("abc123"));
        assert_eq!(s.expose(), "abc123-very-secret");
    }

    #[test]
    fn deserializes_the_real_value() {
        let back: Secret = serde_json::from_str("\"xyz\"").unwrap();
        assert_eq!(back.expose(), "xyz");
    }
}
