//! Stock for the demo catalog (`demo/catalog.json`, shared with the catalog service).

use serde::Deserialize;
use uuid::Uuid;

use crate::domain::Quantity;
use crate::error::Error;
use crate::store::Store;

#[derive(Deserialize)]
struct DemoFile {
    products: Vec<DemoProduct>,
}

#[derive(Deserialize)]
struct DemoProduct {
    id: Uuid,
    stock: i64,
}

/// Gives each demo product its initial stock, unless it has a stock record already.
pub async fn seed(store: &Store) -> Result<u64, Error> {
    let file: DemoFile = serde_json::from_str(include_str!("../../../../demo/catalog.json"))
        .map_err(|e| Error::Internal(anyhow::anyhow!("demo/catalog.json: {e}")))?;
    let mut added = 0;
    for product in file.products {
        if store
            .seed(product.id, Quantity::parse("stock", product.stock)?)
            .await?
        {
            added += 1;
        }
    }
    Ok(added)
}
