//! The catalog's consumer of `stock.changed`: the latest availability per product, for lists.

use shopmesh_contracts::StockChanged;
use shopmesh_db::TxConn;
use shopmesh_events::Envelope;
use shopmesh_events::consumer::{Handler, HandlerFuture};

/// Keeps `availability` current.
pub struct Availability;

impl Handler for Availability {
    /// Its only effect is in the transaction.
    fn may_repeat(&self) -> bool {
        true
    }

    fn handle<'a>(&'a self, tx: &'a mut TxConn, event: &'a Envelope) -> HandlerFuture<'a> {
        Box::pin(async move {
            let Some(stock) = event.decode::<StockChanged>()? else {
                return Ok(());
            };
            sqlx::query(
                "INSERT INTO availability (product_id, available, position) VALUES ($1, $2, $3) \
                 ON CONFLICT (product_id) DO UPDATE SET available = excluded.available, \
                 position = excluded.position WHERE availability.position < excluded.position",
            )
            .bind(stock.product_id.hyphenated().to_string())
            .bind(stock.available)
            .bind(event.position)
            .execute(tx)
            .await?;
            Ok(())
        })
    }
}
