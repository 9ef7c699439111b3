//! Display names.

use super::Invalid;

/// A display name: 1 to 100 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

const MAX_CHARS: usize = 100;

impl UserName {
    /// Parses a display name.
    pub fn parse(raw: &str) -> Result<UserName, Invalid> {
        let bad = |message: &str| Invalid::new("name", "invalid_name", message);
        let value = raw.trim();
        if value.is_empty() {
            return Err(bad("must not be empty"));
        }
        if value.chars().count() > MAX_CHARS {
            return Err(bad("must be at most 100 characters"));
        }
        if value.chars().any(char::is_control) {
            return Err(bad("must not contain control characters"));
        }
        Ok(UserName(value.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed() {
        assert_eq!(
            UserName::parse("  Ann Lee ").expect("ok").as_str(),
            "Ann Lee"
        );
    }

    #[test]
    fn empty_overlong_or_control_character_names_are_rejected() {
        for bad in ["", "   ", "a\u{0}b", "line\nbreak"] {
            assert_eq!(UserName::parse(bad).expect_err(bad).field, "name");
        }
        assert!(UserName::parse(&"n".repeat(101)).is_err());
        assert!(UserName::parse(&"n".repeat(100)).is_ok());
    }
}
