//! The inventory's domain: quantities, order lines, reservations, stock levels.

use std::collections::BTreeSet;
use std::time::Duration;

use shopmesh_problem::Invalid;
use uuid::Uuid;

/// Most units in one line or one stock change.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Most lines in one reservation.
pub const MAX_LINES: usize = 100;
/// Longest hold.
pub const MAX_TTL_SECS: i64 = 24 * 60 * 60;

/// A number of units: 1 to [`MAX_QUANTITY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(i64);

impl Quantity {
    /// Checks a quantity given for `field`.
    pub fn parse(
        field: impl Into<std::borrow::Cow<'static, str>>,
        raw: i64,
    ) -> Result<Quantity, Invalid> {
        if (1..=MAX_QUANTITY).contains(&raw) {
            Ok(Quantity(raw))
        } else {
            Err(Invalid::new(
                field,
                "invalid_quantity",
                format!("must be a whole number from 1 to {MAX_QUANTITY}"),
            ))
        }
    }

    /// The units.
    pub fn get(self) -> i64 {
        self.0
    }
}

/// One line of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Line {
    /// The product.
    pub product_id: Uuid,
    /// How many.
    pub quantity: Quantity,
    /// Where the line was in the request, to name it in errors (`lines[position]`).
    pub position: usize,
}

/// The lines of a reservation: 1 to [`MAX_LINES`], each product once, sorted by product id (so
/// that concurrent reservations lock stock rows in the same order and never deadlock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lines(Vec<Line>);

impl Lines {
    /// Parses `(product id, quantity)` pairs; fields are named `lines[i].…`.
    pub fn parse(raw: &[(String, i64)]) -> Result<Lines, Invalid> {
        if raw.is_empty() || raw.len() > MAX_LINES {
            return Err(Invalid::new(
                "lines",
                "invalid_lines",
                format!("must hold 1 to {MAX_LINES} lines"),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut lines = Vec::with_capacity(raw.len());
        for (i, (product_id, quantity)) in raw.iter().enumerate() {
            let product_id = Uuid::parse_str(product_id).map_err(|_| {
                Invalid::new(
                    format!("lines[{i}].product_id"),
                    "invalid_product_id",
                    "must be a UUID",
                )
            })?;
            if !seen.insert(product_id) {
                return Err(Invalid::new(
                    format!("lines[{i}].product_id"),
                    "duplicate_product",
                    "appears in more than one line",
                ));
            }
            let quantity = Quantity::parse(format!("lines[{i}].quantity"), *quantity)?;
            lines.push(Line {
                product_id,
                quantity,
                position: i,
            });
        }
        lines.sort();
        Ok(Lines(lines))
    }

    /// The lines, sorted by product id.
    pub fn iter(&self) -> impl Iterator<Item = &Line> {
        self.0.iter()
    }
}

/// How long a reservation holds: 1 s to 24 h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(Duration);

impl Ttl {
    /// Checks a time-to-live in seconds.
    pub fn parse(secs: i64) -> Result<Ttl, Invalid> {
        if (1..=MAX_TTL_SECS).contains(&secs) {
            Ok(Ttl(Duration::from_secs(secs.unsigned_abs())))
        } else {
            Err(Invalid::new(
                "ttl_seconds",
                "invalid_ttl",
                format!("must be from 1 to {MAX_TTL_SECS} seconds"),
            ))
        }
    }

    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Stock is held for the order.
    Held,
    /// The order is paid; the stock is sold.
    Committed,
    /// The stock went back (cancelled or expired), or the order was released before reserving.
    Released,
}

impl State {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Held => "held",
            State::Committed => "committed",
            State::Released => "released",
        }
    }

    /// From storage.
    pub fn parse(s: &str) -> Option<State> {
        match s {
            "held" => Some(State::Held),
            "committed" => Some(State::Committed),
            "released" => Some(State::Released),
            _ => None,
        }
    }
}

/// One product's stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockLevel {
    /// The product.
    pub product_id: Uuid,
    /// Units in the warehouse, reserved ones included.
    pub on_hand: i64,
    /// Units held for unpaid orders.
    pub reserved: i64,
    /// Units ever added.
    pub added: i64,
    /// Units ever removed by admins.
    pub removed: i64,
    /// Units sold (committed, minus those restocked by cancellations).
    pub sold: i64,
}

impl StockLevel {
    /// No stock at all (a product never stocked).
    pub fn empty(product_id: Uuid) -> Self {
        StockLevel {
            product_id,
            on_hand: 0,
            reserved: 0,
            added: 0,
            removed: 0,
            sold: 0,
        }
    }

    /// Units that can still be reserved.
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }

    /// `added - removed = available + reserved + sold`, and nothing negative.
    pub fn balances(&self) -> bool {
        self.added - self.removed == self.available() + self.reserved + self.sold
            && self.available() >= 0
            && self.reserved >= 0
            && self.sold >= 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_between_one_and_a_million() {
        assert!(Quantity::parse("quantity", 1).is_ok());
        assert!(Quantity::parse("quantity", MAX_QUANTITY).is_ok());
        for bad in [0, -1, MAX_QUANTITY + 1, i64::MIN] {
            assert_eq!(
                Quantity::parse("quantity", bad).expect_err("bad").code,
                "invalid_quantity"
            );
        }
    }

    #[test]
    fn lines_are_sorted_unique_and_name_the_bad_one() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let lines = Lines::parse(&[(b.to_string(), 2), (a.to_string(), 1)]).expect("valid");
        let ids: Vec<Uuid> = lines.iter().map(|l| l.product_id).collect();
        assert_eq!(ids, [a, b]);
        let positions: Vec<usize> = lines.iter().map(|l| l.position).collect();
        assert_eq!(
            positions,
            [1, 0],
            "each line remembers where the request had it"
        );
        let dup = Lines::parse(&[(a.to_string(), 1), (a.to_string(), 2)]).expect_err("dup");
        assert_eq!(dup.field, "lines[1].product_id");
        let bad = Lines::parse(&[(a.to_string(), 1), (b.to_string(), 0)]).expect_err("zero");
        assert_eq!(bad.field, "lines[1].quantity");
        assert_eq!(Lines::parse(&[]).expect_err("empty").field, "lines");
        let id = Lines::parse(&[("x".into(), 1)]).expect_err("id");
        assert_eq!(id.field, "lines[0].product_id");
    }

    #[test]
    fn ttls_are_bounded() {
        assert!(Ttl::parse(1).is_ok());
        assert!(Ttl::parse(0).is_err());
        assert!(Ttl::parse(MAX_TTL_SECS + 1).is_err());
    }

    #[test]
    fn a_stock_level_balances_when_the_totals_agree() {
        let level = StockLevel {
            product_id: Uuid::now_v7(),
            on_hand: 7,
            reserved: 2,
            added: 12,
            removed: 2,
            sold: 3,
        };
        assert!(level.balances());
        assert!(!StockLevel { sold: 4, ..level }.balances());
    }
}
