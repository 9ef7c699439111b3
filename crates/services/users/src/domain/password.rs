//! Passwords, by the rules of OWASP ASVS 4 §2.1: length is what counts (8 to 128 characters,
//! any Unicode, spaces included, never truncated), no composition rules, and the most common
//! breached passwords are refused.

use std::collections::HashSet;
use std::sync::OnceLock;

use super::{Email, Invalid};

const MIN_CHARS: usize = 8;
const MAX_CHARS: usize = 128;

/// A password that satisfies the policy. Its `Debug` never shows it.
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

fn common() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        include_str!("common_passwords.txt")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    })
}

impl Password {
    /// Checks a new password against the policy. `email` lets us refuse the address itself.
    pub fn parse(raw: String, email: Option<&Email>) -> Result<Password, Invalid> {
        let weak = |message: &str| Invalid::new("password", "weak_password", message);
        let chars = raw.chars().count();
        if chars < MIN_CHARS {
            return Err(weak("must be at least 8 characters"));
        }
        if chars > MAX_CHARS {
            return Err(weak("must be at most 128 characters"));
        }
        let lower = raw.to_lowercase();
        if common().contains(lower.as_str()) {
            return Err(weak(
                "is one of the most commonly used passwords; choose another",
            ));
        }
        if let Some(email) = email
            && (lower == email.as_str() || email.as_str().split('@').next() == Some(lower.as_str()))
        {
            return Err(weak("must not be your e-mail address"));
        }
        if raw.chars().all(|c| raw.starts_with(c)) {
            return Err(weak("must not be one character repeated"));
        }
        Ok(Password(raw))
    }

    /// The password itself, for hashing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: &str) -> Result<Password, Invalid> {
        Password::parse(
            p.to_owned(),
            Some(&Email::parse("ann@example.com").expect("email")),
        )
    }

    #[test]
    fn eight_to_128_characters_are_accepted_counting_characters_not_bytes() {
        assert!(check("correct horse").is_ok());
        assert!(check(&"é".repeat(7)).is_err(), "7 characters, 14 bytes");
        assert!(check("tr0mbone-ü").is_ok());
        assert!(
            check(&format!("{}x", "ab".repeat(63))).is_ok(),
            "127 characters"
        );
        let long = format!("{}xy", "ab".repeat(64));
        let err = check(&long).expect_err("130 characters");
        assert_eq!(err.message, "must be at most 128 characters");
    }

    #[test]
    fn short_passwords_are_weak_and_name_the_password_field() {
        let err = check("short").expect_err("short");
        assert_eq!(err.field, "password");
        assert_eq!(err.code, "weak_password");
    }

    #[test]
    fn the_most_common_passwords_are_refused_whatever_their_case() {
        for p in [
            "password",
            "Password1",
            "12345678",
            "QWERTYUIOP",
            "iloveyou",
        ] {
            assert!(check(p).is_err(), "{p}");
        }
    }

    #[test]
    fn the_email_address_or_its_local_part_is_refused() {
        assert!(check("ann@example.com").is_err());
        assert!(
            Password::parse(
                "annabelle".into(),
                Some(&Email::parse("annabelle@example.com").expect("email"))
            )
            .is_err()
        );
    }

    #[test]
    fn one_repeated_character_is_refused() {
        assert!(check("xxxxxxxxxxxx").is_err());
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let p = check("my secret phrase").expect("ok");
        assert!(!format!("{p:?}").contains("secret"));
    }
}
