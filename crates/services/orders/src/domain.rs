//! The orders domain: order requests, lines, statuses, saga steps, money arithmetic.

use std::collections::BTreeSet;

use shopmesh_problem::Invalid;
use uuid::Uuid;

/// Most lines in one order.
pub const MAX_LINES: usize = 100;
/// Most units in one line.
pub const MAX_QUANTITY: i64 = 1_000;

/// What the customer asked for, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `(product, quantity)` in the customer's order.
    pub lines: Vec<(Uuid, i64)>,
}

impl Request {
    /// Parses `items`: 1 to 100 lines, each product once, quantities 1 to 1000. Fields are named
    /// `items[i].…`.
    pub fn parse(items: &[(String, i64)]) -> Result<Request, Invalid> {
        if items.is_empty() || items.len() > MAX_LINES {
            return Err(Invalid::new(
                "items",
                "invalid_items",
                format!("must hold 1 to {MAX_LINES} lines"),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut lines = Vec::with_capacity(items.len());
        for (i, (product_id, quantity)) in items.iter().enumerate() {
            let product = Uuid::parse_str(product_id).map_err(|_| {
                Invalid::new(
                    format!("items[{i}].product_id"),
                    "invalid_product_id",
                    "must be a UUID",
                )
            })?;
            if !seen.insert(product) {
                return Err(Invalid::new(
                    format!("items[{i}].product_id"),
                    "duplicate_product",
                    "appears in more than one line; add the quantities instead",
                ));
            }
            if !(1..=MAX_QUANTITY).contains(quantity) {
                return Err(Invalid::new(
                    format!("items[{i}].quantity"),
                    "invalid_quantity",
                    format!("must be a whole number from 1 to {MAX_QUANTITY}"),
                ));
            }
            lines.push((product, *quantity));
        }
        Ok(Request { lines })
    }
}

/// A priced line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The product.
    pub product_id: Uuid,
    /// Its SKU when ordered.
    pub sku: String,
    /// Its name when ordered.
    pub name: String,
    /// The catalog's price when ordered, minor units.
    pub unit_price: i64,
    /// Units.
    pub quantity: i64,
}

impl Line {
    /// `unit_price × quantity`, or `None` on overflow.
    pub fn total(&self) -> Option<i64> {
        self.unit_price.checked_mul(self.quantity)
    }
}

/// The sum of the lines, or `None` on overflow.
pub fn total(lines: &[Line]) -> Option<i64> {
    lines
        .iter()
        .try_fold(0i64, |sum, l| sum.checked_add(l.total()?))
}

/// What the customer sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Stock is being reserved.
    Pending,
    /// Placed; waiting for payment until `expires_at`.
    AwaitingPayment,
    /// Paid; stock sold.
    Paid,
    /// Cancelled; stock returned, payment refunded.
    Cancelled,
    /// Not paid in time; stock returned.
    Expired,
    /// Never placed (stock or product unavailable); hidden from the customer.
    Rejected,
}

/// The saga step in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing in flight.
    Idle,
    /// Reserving stock.
    Reserving,
    /// Charging the card.
    Charging,
    /// Committing the stock after a capture.
    Committing,
    /// Releasing stock and refunding for a cancellation.
    Cancelling,
    /// Releasing stock of an order past its expiry.
    Expiring,
}

macro_rules! string_enum {
    ($ty:ident { $($variant:ident => $s:literal),* $(,)? }) => {
        impl $ty {
            /// As stored and shown.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $s),* }
            }
            /// From storage.
            pub fn parse(s: &str) -> Option<$ty> {
                match s { $($s => Some($ty::$variant),)* _ => None }
            }
        }
    };
}

string_enum!(Status {
    Pending => "pending",
    AwaitingPayment => "awaiting_payment",
    Paid => "paid",
    Cancelled => "cancelled",
    Expired => "expired",
    Rejected => "rejected",
});

string_enum!(Step {
    Idle => "idle",
    Reserving => "reserving",
    Charging => "charging",
    Committing => "committing",
    Cancelling => "cancelling",
    Expiring => "expiring",
});

/// An `Idempotency-Key` header value: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses the header value.
    pub fn parse(raw: &str) -> Result<IdempotencyKey, Invalid> {
        if (1..=255).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(IdempotencyKey(raw.to_owned()))
        } else {
            Err(Invalid::new(
                "Idempotency-Key",
                "invalid_idempotency_key",
                "must be 1 to 255 visible ASCII characters (a UUID is ideal)",
            ))
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_bad_line_by_its_place() {
        let a = Uuid::now_v7().to_string();
        let b = Uuid::now_v7().to_string();
        assert_eq!(
            Request::parse(&[(a.clone(), 1), (b.clone(), 0)])
                .expect_err("zero")
                .field,
            "items[1].quantity"
        );
        assert_eq!(
            Request::parse(&[(a.clone(), 1), (a.clone(), 1)])
                .expect_err("dup")
                .field,
            "items[1].product_id"
        );
        assert_eq!(
            Request::parse(&[("x".into(), 1)]).expect_err("id").field,
            "items[0].product_id"
        );
        assert_eq!(
            Request::parse(&[(a.clone(), 1001)]).expect_err("huge").code,
            "invalid_quantity"
        );
        assert_eq!(Request::parse(&[]).expect_err("empty").field, "items");
        assert_eq!(
            Request::parse(&[(a, 2), (b, 1)]).expect("ok").lines.len(),
            2
        );
    }

    #[test]
    fn totals_are_checked_for_overflow() {
        let line = |price, quantity| Line {
            product_id: Uuid::now_v7(),
            sku: "S".into(),
            name: "N".into(),
            unit_price: price,
            quantity,
        };
        assert_eq!(total(&[line(250, 3), line(100, 1)]), Some(850));
        assert_eq!(total(&[line(i64::MAX, 2)]), None);
        assert_eq!(total(&[line(i64::MAX, 1), line(1, 1)]), None);
    }

    #[test]
    fn statuses_and_steps_round_trip() {
        for s in [
            "pending",
            "awaiting_payment",
            "paid",
            "cancelled",
            "expired",
            "rejected",
        ] {
            assert_eq!(Status::parse(s).expect(s).as_str(), s);
        }
        for s in [
            "idle",
            "reserving",
            "charging",
            "committing",
            "cancelling",
            "expiring",
        ] {
            assert_eq!(Step::parse(s).expect(s).as_str(), s);
        }
    }

    #[test]
    fn idempotency_keys_are_visible_ascii() {
        assert!(IdempotencyKey::parse("0190b4e2-7c1d-7000-8000-000000000001").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }
}
