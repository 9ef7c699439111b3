//! Gives back the stock of holds that ran out, so stock never stays held for an order that will
//! not be paid, and never gives back a hold whose order was or may still be paid.
//!
//! A hold runs out with its order (orders asks for the order's time to live), but the payment
//! does not commit the stock itself: orders records the capture with `order.paid`, and the
//! inventory sells the stock when it reads that event ([`sales`]), which may be later than the
//! hold's expiry (the event in flight, this process restarting, the producer unreachable). So
//! before it releases a hold, the sweeper asks orders (`Orders/Outcome`): a paid order's stock
//! is sold here and now; an order that can never be paid (past its expiry, which orders itself
//! enforces on payment, or ended) has its stock given back; an order that may still be paid,
//! or an orders service that does not answer, leaves the hold for a later pass. Each release
//! re-checks, in its own transaction, that the reservation is still held and expired.
//!
//! [`sales`]: crate::sales

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use shopmesh_mesh::GrpcChannel;
use shopmesh_proto::orders::v1::orders_client::OrdersClient;
use shopmesh_proto::orders::v1::{Outcome as WireOutcome, OutcomeRequest};
use uuid::Uuid;

use crate::error::Error;
use crate::store::{Sale, Store};

/// What orders says of an order whose hold ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Paid: sell its stock.
    Paid,
    /// Never to be paid: give its stock back.
    Unpaid,
    /// Still payable: keep the hold.
    Open,
}

/// An answer from orders, or why there is none.
pub type Asked<'a> = Pin<Box<dyn Future<Output = Result<Outcome, tonic::Status>> + Send + 'a>>;

/// Where the sweeper learns an order's outcome (orders' gRPC; tests play it).
pub trait Outcomes: Send + Sync + 'static {
    /// `Orders/Outcome` of `order_id`.
    fn outcome(&self, order_id: Uuid) -> Asked<'_>;
}

/// Orders over the mesh.
#[derive(Debug, Clone)]
pub struct Orders(pub OrdersClient<GrpcChannel>);

impl Outcomes for Orders {
    fn outcome(&self, order_id: Uuid) -> Asked<'_> {
        let mut client = self.0.clone();
        Box::pin(async move {
            let answer = client
                .outcome(OutcomeRequest {
                    order_id: order_id.hyphenated().to_string(),
                })
                .await?
                .into_inner();
            match answer.outcome() {
                WireOutcome::Paid => Ok(Outcome::Paid),
                WireOutcome::Unpaid => Ok(Outcome::Unpaid),
                WireOutcome::Open => Ok(Outcome::Open),
                WireOutcome::Unspecified => {
                    Err(tonic::Status::internal("orders answered no outcome"))
                }
            }
        })
    }
}

/// Sweeps every `interval` until `stop` fires.
pub async fn run(
    store: Store,
    orders: impl Outcomes,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = sweep(&store, &orders).await {
            tracing::warn!(error = %e, "sweeping expired reservations failed; will retry");
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Holds given back.
    pub released: usize,
    /// Holds of paid orders sold.
    pub sold: usize,
    /// Holds left: their order may still be paid, or orders did not answer.
    pub kept: usize,
}

/// One pass over the expired holds, a batch at a time, oldest first. Stops at the first
/// question orders does not answer (the rest wait for the next pass).
pub async fn sweep(store: &Store, orders: &dyn Outcomes) -> Result<Swept, Error> {
    let mut swept = Swept::default();
    // Asked once per pass: a kept hold comes back in the next batch.
    let mut kept = HashSet::new();
    loop {
        let batch = store.expired(100).await?;
        let mut progressed = false;
        for order_id in batch {
            if kept.contains(&order_id) {
                continue;
            }
            let outcome = match orders.outcome(order_id).await {
                Ok(outcome) => outcome,
                Err(status) => {
                    tracing::warn!(%order_id, error = %status.message(),
                        "cannot ask orders about an expired hold; keeping it");
                    swept.kept = kept.len() + 1;
                    return Ok(swept);
                }
            };
            match outcome {
                Outcome::Paid => {
                    if store.sell(order_id).await? == Sale::Sold {
                        swept.sold += 1;
                        progressed = true;
                        metrics::counter!("inventory_reservations_sold_total").increment(1);
                        tracing::info!(%order_id, "expired hold of a paid order sold");
                    }
                }
                Outcome::Unpaid => {
                    if store.release_if_expired(order_id).await? {
                        swept.released += 1;
                        progressed = true;
                        metrics::counter!("inventory_reservations_expired_total").increment(1);
                        tracing::info!(%order_id, "reservation expired; stock released");
                    }
                }
                Outcome::Open => {
                    kept.insert(order_id);
                }
            }
        }
        if !progressed {
            swept.kept = kept.len();
            return Ok(swept);
        }
    }
}
