//! The currency code every service and event speaks.

use shopmesh_problem::Invalid;

/// An ISO 4217 currency code, three upper-case letters. The catalog prices in it, payments
/// charge in it, and events carry it as its text ([`Currency::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses a currency code (case-insensitively, surrounding spaces ignored); the problem
    /// names the field `currency`.
    pub fn parse(raw: &str) -> Result<Currency, Invalid> {
        let upper = raw.trim().to_ascii_uppercase();
        match <[u8; 3]>::try_from(upper.as_bytes()) {
            Ok(code) if code.iter().all(u8::is_ascii_uppercase) => Ok(Currency(code)),
            _ => Err(Invalid::new(
                "currency",
                "invalid_currency",
                "must be an ISO 4217 code such as EUR",
            )),
        }
    }

    /// The code.
    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters get in.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

#[cfg(test)]
mod tests {
    use super::Currency;

    #[test]
    fn codes_are_three_letters_read_case_insensitively() {
        assert_eq!(Currency::parse(" eur ").expect("eur").as_str(), "EUR");
        assert_eq!(Currency::parse("USD").expect("usd").as_str(), "USD");
        for bad in ["", "EU", "EURO", "E1R", "€UR", "ÉUR", "€€€"] {
            let invalid = Currency::parse(bad).expect_err(bad);
            assert_eq!(invalid.field, "currency", "{bad}");
        }
    }
}
