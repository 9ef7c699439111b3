//! The demo catalog `shopmesh up` starts with (`demo/catalog.json`, shared with inventory, which
//! seeds the stock of the same ids).

use serde::Deserialize;
use uuid::Uuid;

use crate::domain::{
    Category, Currency, Description, ImageUrl, Price, ProductDraft, ProductName, Sku,
};
use crate::error::Error;
use crate::store::Store;

#[derive(Deserialize)]
struct DemoFile {
    products: Vec<DemoProduct>,
}

#[derive(Deserialize)]
struct DemoProduct {
    id: Uuid,
    sku: String,
    name: String,
    description: String,
    price: i64,
    currency: String,
    category: String,
    image_url: Option<String>,
}

/// The demo products, parsed like any admin input.
pub fn demo_products() -> Result<Vec<(Uuid, ProductDraft)>, Error> {
    let file: DemoFile = serde_json::from_str(include_str!("../../../../demo/catalog.json"))
        .map_err(|e| Error::Internal(anyhow::anyhow!("demo/catalog.json: {e}")))?;
    file.products
        .into_iter()
        .map(|p| {
            Ok((
                p.id,
                ProductDraft {
                    sku: Sku::parse(&p.sku)?,
                    name: ProductName::parse(&p.name)?,
                    description: Description::parse(&p.description)?,
                    price: Price::parse(p.price)?,
                    currency: Currency::parse(&p.currency)?,
                    category: Category::parse(&p.category)?,
                    image_url: p.image_url.as_deref().map(ImageUrl::parse).transpose()?,
                    active: true,
                },
            ))
        })
        .collect()
}

/// Adds the demo products that are missing (never touches ones an admin changed or deleted).
pub async fn seed(store: &Store) -> Result<u64, Error> {
    store.insert_missing(&demo_products()?).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_catalog_is_valid_and_has_several_categories() {
        let products = super::demo_products().expect("valid demo file");
        assert!(products.len() >= 24, "a few dozen products");
        let categories: std::collections::BTreeSet<_> = products
            .iter()
            .map(|(_, p)| p.category.as_str().to_owned())
            .collect();
        assert!(categories.len() >= 4, "{categories:?}");
    }
}
