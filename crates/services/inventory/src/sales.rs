//! The inventory's consumer of `order.paid`: a paid order's held stock becomes sold, in the
//! transaction that records the event as handled (so once, whatever the transport repeats).
//! Payment does not wait for it: orders records the capture and the event in one commit, and
//! the sweeper never gives back the hold of an order orders may still pay (see [`sweeper`]).
//!
//! [`sweeper`]: crate::sweeper

use shopmesh_contracts::{Contract, OrderPaid};
use shopmesh_db::TxConn;
use shopmesh_events::Envelope;
use shopmesh_events::consumer::{Handler, HandlerError, HandlerFuture};

use crate::store::{Sale, Store};

/// Sells the stock of paid orders.
pub struct Sales;

impl Handler for Sales {
    /// Its only effects are in the transaction.
    fn may_repeat(&self) -> bool {
        true
    }

    /// Orders' other events pass by.
    fn reads(&self, kind: &str) -> bool {
        kind == <OrderPaid as Contract>::KIND
    }

    fn handle<'a>(&'a self, tx: &'a mut TxConn, event: &'a Envelope) -> HandlerFuture<'a> {
        Box::pin(async move {
            let Some(OrderPaid(order)) = event.decode::<OrderPaid>()? else {
                return Ok(());
            };
            let order_id = order.order_id;
            match Store::sell_in(tx, order_id)
                .await
                .map_err(|e| HandlerError::Retry(e.to_string()))?
            {
                Sale::Sold => {
                    metrics::counter!("inventory_reservations_sold_total").increment(1);
                }
                Sale::AlreadySold => {}
                // Cancelled after paying, before this was read: its cancellation gave the
                // stock back, as it should.
                Sale::Released => {
                    tracing::info!(%order_id, "paid order's stock was released before its payment was read");
                }
                Sale::NoReservation => {
                    tracing::warn!(%order_id, "order.paid for an order this inventory holds nothing for");
                }
            }
            Ok(())
        })
    }
}
