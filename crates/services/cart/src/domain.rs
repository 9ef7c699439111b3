//! The cart's domain: quantities and limits.

use shopmesh_problem::Invalid;

/// Most units of one product in a cart (the most one order line may hold).
pub const MAX_QUANTITY: i64 = 1_000;
/// Most lines in a cart (the most one order may hold).
pub const MAX_LINES: i64 = 100;

/// A quantity in the cart: 1 to [`MAX_QUANTITY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(i64);

impl Quantity {
    /// Checks a quantity.
    pub fn parse(raw: i64) -> Result<Quantity, Invalid> {
        if (1..=MAX_QUANTITY).contains(&raw) {
            Ok(Quantity(raw))
        } else {
            Err(Invalid::new(
                "quantity",
                "invalid_quantity",
                format!("must be a whole number from 1 to {MAX_QUANTITY}"),
            ))
        }
    }

    /// Units.
    pub fn get(self) -> i64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_bounded() {
        assert!(Quantity::parse(1).is_ok());
        assert!(Quantity::parse(MAX_QUANTITY).is_ok());
        for bad in [0, -1, MAX_QUANTITY + 1] {
            assert_eq!(Quantity::parse(bad).expect_err("bad").field, "quantity");
        }
    }
}
