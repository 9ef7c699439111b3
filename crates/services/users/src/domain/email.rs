//! E-mail addresses.

use super::Invalid;

/// A syntactically valid e-mail address, trimmed and lower-cased, so `Ann@Example.COM ` and
/// `ann@example.com` are one account. (Local parts are case-sensitive in theory and never in
/// practice; treating them so would let one person register twice.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

const MAX_LEN: usize = 254;
const MAX_LOCAL_LEN: usize = 64;

impl Email {
    /// Parses and normalises an address.
    pub fn parse(raw: &str) -> Result<Email, Invalid> {
        let bad = |message: &str| Invalid::new("email", "invalid_email", message);
        let value = raw.trim().to_lowercase();
        if value.is_empty() {
            return Err(bad("must not be empty"));
        }
        if value.len() > MAX_LEN {
            return Err(bad("must be at most 254 characters"));
        }
        let Some((local, domain)) = value.rsplit_once('@') else {
            return Err(bad("must look like name@example.com"));
        };
        if local.is_empty() || local.len() > MAX_LOCAL_LEN {
            return Err(bad("the part before @ must be 1 to 64 characters"));
        }
        if local.contains('@') {
            return Err(bad("must contain exactly one @"));
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(bad(
                "the part before @ must not start or end with a dot or have two in a row",
            ));
        }
        if !local
            .chars()
            .all(|c| c.is_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c))
        {
            return Err(bad(
                "the part before @ contains a character not allowed in an address",
            ));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 {
            return Err(bad("the domain must have a dot, as in example.com"));
        }
        for label in &labels {
            let valid = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-');
            if !valid {
                return Err(bad("the domain is not a valid host name"));
            }
        }
        Ok(Email(value))
    }

    /// The normalised address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_trimmed_and_lower_cased() {
        let email = Email::parse("  Ann.Lee+shop@Example.COM ").expect("valid");
        assert_eq!(email.as_str(), "ann.lee+shop@example.com");
    }

    #[test]
    fn international_domains_and_local_parts_are_accepted() {
        assert!(Email::parse("jörg@müller.de").is_ok());
    }

    #[test]
    fn malformed_addresses_are_rejected_naming_the_email_field() {
        for bad in [
            "",
            "   ",
            "plainaddress",
            "@example.com",
            "ann@",
            "ann@example",
            "ann@@example.com",
            "ann@exa mple.com",
            "an n@example.com",
            ".ann@example.com",
            "ann..lee@example.com",
            "ann@-example.com",
            "ann@example..com",
            "<script>@example.com",
        ] {
            let err = Email::parse(bad).expect_err(bad);
            assert_eq!(err.field, "email", "{bad}");
            assert_eq!(err.code, "invalid_email", "{bad}");
        }
    }

    #[test]
    fn overlong_addresses_are_rejected() {
        let local = "a".repeat(65);
        assert!(Email::parse(&format!("{local}@example.com")).is_err());
        let domain = format!("{}.com", "b".repeat(250));
        assert!(Email::parse(&format!("a@{domain}")).is_err());
    }
}
