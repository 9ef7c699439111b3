//! Cards, amounts and the simulated card network.
//!
//! The network behaves like a payment provider's test mode: a number must pass the Luhn check
//! and the card must not be expired; `4000 0000 0000 0002` is declined, `4000 0000 0000 9995` is
//! declined for insufficient funds, and any other valid number is approved (`4242 4242 4242 4242`
//! is the usual one). A card's number lives only in memory for the call; its `Debug` shows the
//! last four digits.

use shopmesh_problem::Invalid;
use time::OffsetDateTime;

/// Largest amount accepted, in minor units.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// A card number that passed the Luhn check.
#[derive(Clone, PartialEq, Eq)]
pub struct CardNumber(String);

impl std::fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CardNumber(**** {})", self.last4())
    }
}

impl CardNumber {
    /// Parses a number: 12 to 19 digits (spaces and dashes ignored) with a valid Luhn digit.
    pub fn parse(raw: &str) -> Result<CardNumber, Invalid> {
        let digits: String = raw.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
        let bad = || {
            Invalid::new(
                "card.number",
                "invalid_card_number",
                "is not a valid card number",
            )
        };
        if !(12..=19).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        if !luhn(&digits) {
            return Err(bad());
        }
        Ok(CardNumber(digits))
    }

    /// The last four digits: all that is ever stored.
    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }

    /// The brand, from the leading digits.
    pub fn brand(&self) -> &'static str {
        match self.0.as_bytes() {
            [b'4', ..] => "visa",
            [b'5', b'1'..=b'5', ..] | [b'2', ..] => "mastercard",
            [b'3', b'4' | b'7', ..] => "amex",
            _ => "card",
        }
    }
}

fn luhn(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if !i.is_multiple_of(2) {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A card as presented for one charge.
#[derive(Debug, Clone)]
pub struct Card {
    /// The number.
    pub number: CardNumber,
    /// Expiry month, 1 to 12.
    pub exp_month: u8,
    /// Expiry year, four digits.
    pub exp_year: u16,
}

impl Card {
    /// Parses a card; the CVC is checked for shape only and then forgotten.
    pub fn parse(number: &str, exp_month: u32, exp_year: u32, cvc: &str) -> Result<Card, Invalid> {
        let number = CardNumber::parse(number)?;
        let exp_month = u8::try_from(exp_month)
            .ok()
            .filter(|m| (1..=12).contains(m))
            .ok_or_else(|| Invalid::new("card.exp_month", "invalid_expiry", "must be 1 to 12"))?;
        let exp_year = u16::try_from(exp_year)
            .ok()
            .filter(|y| (2000..=2100).contains(y))
            .ok_or_else(|| {
                Invalid::new(
                    "card.exp_year",
                    "invalid_expiry",
                    "must be a four-digit year",
                )
            })?;
        if !(3..=4).contains(&cvc.len()) || !cvc.chars().all(|c| c.is_ascii_digit()) {
            return Err(Invalid::new(
                "card.cvc",
                "invalid_cvc",
                "must be 3 or 4 digits",
            ));
        }
        Ok(Card {
            number,
            exp_month,
            exp_year,
        })
    }

    /// Whether the card is still valid at `now` (through the end of its expiry month).
    pub fn valid_at(&self, now: OffsetDateTime) -> bool {
        let (year, month) = (now.year(), u8::from(now.month()));
        (i32::from(self.exp_year), self.exp_month) >= (year, month)
    }
}

/// An amount to charge: 1 to [`MAX_AMOUNT`] minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(i64);

impl Amount {
    /// Checks an amount.
    pub fn parse(minor: i64) -> Result<Amount, Invalid> {
        if (1..=MAX_AMOUNT).contains(&minor) {
            Ok(Amount(minor))
        } else {
            Err(Invalid::new(
                "amount",
                "invalid_amount",
                "must be a positive number of minor units",
            ))
        }
    }

    /// Minor units.
    pub fn get(self) -> i64 {
        self.0
    }
}

/// The currency code, shared with the catalog and the events.
pub use shopmesh_contracts::Currency;

/// Why the network said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decline {
    /// Generic decline.
    CardDeclined,
    /// Not enough money.
    InsufficientFunds,
    /// The card has expired.
    ExpiredCard,
}

impl Decline {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            Decline::CardDeclined => "card_declined",
            Decline::InsufficientFunds => "insufficient_funds",
            Decline::ExpiredCard => "expired_card",
        }
    }
}

/// The simulated network's answer for a card at `now`.
pub fn authorize(card: &Card, now: OffsetDateTime) -> Result<(), Decline> {
    if !card.valid_at(now) {
        return Err(Decline::ExpiredCard);
    }
    match card.number.0.as_str() {
        "4000000000000002" => Err(Decline::CardDeclined),
        "4000000000009995" => Err(Decline::InsufficientFunds),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn card(number: &str) -> Card {
        Card::parse(number, 12, 2035, "123").expect("card")
    }

    #[test]
    fn the_luhn_check_accepts_real_test_numbers_and_rejects_typos() {
        for good in [
            "4242 4242 4242 4242",
            "4000-0000-0000-0002",
            "5555555555554444",
            "378282246310005",
        ] {
            assert!(CardNumber::parse(good).is_ok(), "{good}");
        }
        for bad in ["4242424242424241", "1234", "4242x42424242424", ""] {
            let err = CardNumber::parse(bad).expect_err(bad);
            assert_eq!(err.field, "card.number");
        }
    }

    #[test]
    fn the_test_numbers_behave_like_a_providers_test_mode() {
        let now = datetime!(2026-11-22 12:00 UTC);
        assert_eq!(authorize(&card("4242424242424242"), now), Ok(()));
        assert_eq!(
            authorize(&card("4000000000000002"), now),
            Err(Decline::CardDeclined)
        );
        assert_eq!(
            authorize(&card("4000000000009995"), now),
            Err(Decline::InsufficientFunds)
        );
    }

    #[test]
    fn a_card_is_valid_through_the_end_of_its_expiry_month() {
        let c = Card::parse("4242424242424242", 11, 2026, "123").expect("card");
        assert!(c.valid_at(datetime!(2026-11-30 23:59 UTC)));
        assert!(!c.valid_at(datetime!(2026-12-01 00:00 UTC)));
        assert_eq!(
            authorize(&c, datetime!(2027-01-01 0:00 UTC)),
            Err(Decline::ExpiredCard)
        );
    }

    #[test]
    fn malformed_expiry_and_cvc_name_their_field() {
        assert_eq!(
            Card::parse("4242424242424242", 13, 2030, "123")
                .expect_err("m")
                .field,
            "card.exp_month"
        );
        assert_eq!(
            Card::parse("4242424242424242", 1, 30, "123")
                .expect_err("y")
                .field,
            "card.exp_year"
        );
        assert_eq!(
            Card::parse("4242424242424242", 1, 2030, "12a")
                .expect_err("c")
                .field,
            "card.cvc"
        );
    }

    #[test]
    fn debug_output_shows_only_the_last_four_digits() {
        let c = card("4242424242424242");
        let debug = format!("{c:?}");
        assert!(debug.contains("4242"));
        assert!(!debug.contains("424242424242"), "{debug}");
        assert_eq!(c.number.brand(), "visa");
    }
}
