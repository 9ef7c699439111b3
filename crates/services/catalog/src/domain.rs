//! The catalog's domain: products and the values they are made of, parsed once.

use shopmesh_problem::Invalid;
use time::OffsetDateTime;
use uuid::Uuid;

/// Largest price accepted: 10 million in major units, far beyond any product here and far
/// below where sums over order lines could overflow.
pub const MAX_PRICE: i64 = 1_000_000_000;

fn no_control(s: &str) -> bool {
    !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
}

/// A stock-keeping unit: 1 to 64 of `A-Z 0-9 - _ .`, stored upper-case; unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sku(String);

impl Sku {
    /// Parses and upper-cases a SKU.
    pub fn parse(raw: &str) -> Result<Sku, Invalid> {
        let value = raw.trim().to_ascii_uppercase();
        let valid = (1..=64).contains(&value.len())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if valid {
            Ok(Sku(value))
        } else {
            Err(Invalid::new(
                "sku",
                "invalid_sku",
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            ))
        }
    }

    /// The SKU.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product name: 1 to 200 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductName(String);

impl ProductName {
    /// Parses a product name.
    pub fn parse(raw: &str) -> Result<ProductName, Invalid> {
        let value = raw.trim();
        let count = value.chars().count();
        if count == 0 || count > 200 || !no_control(value) || value.contains('\n') {
            return Err(Invalid::new(
                "name",
                "invalid_name",
                "must be 1 to 200 characters on one line",
            ));
        }
        Ok(ProductName(value.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A description: up to 5000 characters; line breaks allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description(String);

impl Description {
    /// Parses a description.
    pub fn parse(raw: &str) -> Result<Description, Invalid> {
        let value = raw.trim();
        if value.chars().count() > 5000 || !no_control(value) {
            return Err(Invalid::new(
                "description",
                "invalid_description",
                "must be at most 5000 characters without control characters",
            ));
        }
        Ok(Description(value.to_owned()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The currency code, shared with payments and the events.
pub use shopmesh_contracts::Currency;

/// A price in minor units (cents), 0 to [`MAX_PRICE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price(i64);

impl Price {
    /// Checks a price.
    pub fn parse(minor: i64) -> Result<Price, Invalid> {
        if (0..=MAX_PRICE).contains(&minor) {
            Ok(Price(minor))
        } else {
            Err(Invalid::new(
                "price",
                "invalid_price",
                format!("must be an integer number of minor units from 0 to {MAX_PRICE}"),
            ))
        }
    }

    /// Minor units.
    pub fn minor(self) -> i64 {
        self.0
    }
}

/// A category slug: 1 to 50 of `a-z 0-9 -`, stored lower-case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Category(String);

impl Category {
    /// Parses and lower-cases a category.
    pub fn parse(raw: &str) -> Result<Category, Invalid> {
        let value = raw.trim().to_ascii_lowercase();
        let valid = (1..=50).contains(&value.len())
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if valid {
            Ok(Category(value))
        } else {
            Err(Invalid::new(
                "category",
                "invalid_category",
                "must be 1 to 50 of a-z, 0-9 and '-'",
            ))
        }
    }

    /// The slug.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An image URL: `http(s)://…` or a path on this site (`/static/…`), at most 2048 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUrl(String);

impl ImageUrl {
    /// Parses an image URL.
    pub fn parse(raw: &str) -> Result<ImageUrl, Invalid> {
        let value = raw.trim();
        let scheme_ok = value.starts_with("https://")
            || value.starts_with("http://")
            || (value.starts_with('/') && !value.starts_with("//"));
        if !scheme_ok
            || value.len() > 2048
            || value.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Invalid::new(
                "image_url",
                "invalid_image_url",
                "must be an http(s) URL or a path starting with /",
            ));
        }
        Ok(ImageUrl(value.to_owned()))
    }

    /// The URL.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Everything an admin sets on a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductDraft {
    /// Unique SKU.
    pub sku: Sku,
    /// Name.
    pub name: ProductName,
    /// Description.
    pub description: Description,
    /// Price.
    pub price: Price,
    /// Currency of the price.
    pub currency: Currency,
    /// Category.
    pub category: Category,
    /// Picture.
    pub image_url: Option<ImageUrl>,
    /// On sale.
    pub active: bool,
}

/// A stored product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// UUIDv7.
    pub id: Uuid,
    /// What an admin set.
    pub draft: ProductDraft,
    /// Created.
    pub created_at: OffsetDateTime,
    /// Last changed.
    pub updated_at: OffsetDateTime,
    /// Deleted (kept for past orders, hidden elsewhere).
    pub deleted: bool,
    /// Units that can be ordered, as of the inventory's last `stock.changed` event (`None`
    /// until one arrives).
    pub available: Option<i64>,
}

impl Product {
    /// Whether it can be put in a cart or an order.
    pub fn purchasable(&self) -> bool {
        self.draft.active && !self.deleted
    }
}

/// The order of a product list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// By name, A to Z (the default).
    NameAsc,
    /// By name, Z to A.
    NameDesc,
    /// Cheapest first.
    PriceAsc,
    /// Dearest first.
    PriceDesc,
}

impl Sort {
    /// Parses `name`, `-name`, `price`, `-price`.
    pub fn parse(raw: &str) -> Result<Sort, Invalid> {
        match raw {
            "name" => Ok(Sort::NameAsc),
            "-name" => Ok(Sort::NameDesc),
            "price" => Ok(Sort::PriceAsc),
            "-price" => Ok(Sort::PriceDesc),
            _ => Err(Invalid::new(
                "sort",
                "invalid_sort",
                "must be one of name, -name, price, -price",
            )),
        }
    }

    /// The query-string form.
    pub fn as_str(self) -> &'static str {
        match self {
            Sort::NameAsc => "name",
            Sort::NameDesc => "-name",
            Sort::PriceAsc => "price",
            Sort::PriceDesc => "-price",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_upper_cased_and_restricted() {
        assert_eq!(Sku::parse(" kit-001 ").expect("ok").as_str(), "KIT-001");
        for bad in ["", "has space", "semi;colon", &"A".repeat(65)] {
            assert_eq!(Sku::parse(bad).expect_err(bad).field, "sku");
        }
    }

    #[test]
    fn prices_are_whole_minor_units_within_bounds() {
        assert_eq!(Price::parse(0).expect("free").minor(), 0);
        assert!(Price::parse(MAX_PRICE).is_ok());
        assert_eq!(
            Price::parse(-1).expect_err("negative").code,
            "invalid_price"
        );
        assert!(Price::parse(MAX_PRICE + 1).is_err());
    }

    #[test]
    fn categories_are_slugs() {
        assert_eq!(
            Category::parse("Home-Office").expect("ok").as_str(),
            "home-office"
        );
        assert!(Category::parse("home office").is_err());
        assert!(Category::parse("").is_err());
    }

    #[test]
    fn image_urls_are_web_urls_or_site_paths() {
        assert!(ImageUrl::parse("https://cdn.example.com/a.png").is_ok());
        assert!(ImageUrl::parse("/static/a.svg").is_ok());
        for bad in [
            "javascript:alert(1)",
            "//evil.example/x.png",
            "ftp://x/y",
            "/a b.png",
        ] {
            assert!(ImageUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_one_line() {
        assert!(ProductName::parse("Chef's Knife").is_ok());
        assert!(ProductName::parse("two\nlines").is_err());
        assert!(ProductName::parse(" ").is_err());
        assert!(Description::parse("two\nlines are fine").is_ok());
    }

    #[test]
    fn sorts_round_trip() {
        for s in ["name", "-name", "price", "-price"] {
            assert_eq!(Sort::parse(s).expect(s).as_str(), s);
        }
        assert_eq!(Sort::parse("rating").expect_err("bad").field, "sort");
    }
}
