//! The checkout saga. Every step is written down before its downstream call (`step`) and
//! cleared after it, and every downstream call is idempotent by order id, so any step can be
//! run again: by a retried request, or by [`Saga::resume`] after a crash.
//!
//! ```text
//! place:  pending/reserving ──Reserve──► awaiting_payment      (refused: rejected)
//! pay:    awaiting_payment/charging ──Charge──► /committing ──Commit──► paid
//!                                  (declined: back to awaiting_payment, 402)
//! cancel: awaiting_payment|paid/cancelling ──Release (+Refund)──► cancelled
//! expire: awaiting_payment/expiring ──Release──► expired
//! ```
//!
//! A call with no answer (down, deadline) leaves the step in place and answers 503; the
//! resumer settles it: a `reserving` order is rolled back (Release leaves a tombstone, so a
//! late Reserve cannot hold stock), a `charging` order asks payments whether the capture
//! happened and goes on or back, the others finish their step.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shopmesh_problem::Invalid;
use shopmesh_proto::cart::v1::{CartLine, GetCartRequest, RemoveLinesRequest};
use shopmesh_proto::catalog::v1::GetProductsRequest;
use shopmesh_proto::inventory::v1::{
    CommitRequest, Line as StockLine, ReleaseRequest, ReserveRequest,
};
use shopmesh_proto::payments::v1::{Card, ChargeRequest, GetPaymentRequest, RefundRequest};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::clients::{Downstream, Failure, failure, refusal, unavailable};
use crate::domain::{Line, Request, Status, Step, total};
use crate::error::Error;
use crate::store::{Answered, KeyAnswer, NewOrder, Order, Store};

/// The longest a request waits for another attempt at the same thing (a payment of the same
/// order, an order under the same key) to finish: that attempt's process may be frozen for a
/// few seconds, or dead until its lease ([`LEASE`](crate::store::LEASE), 5 s) runs out and a
/// replica takes its work over (within a worker tick, 1 s, or a key's reclaim, 1 s). The
/// gateway's deadline for orders routes (10 s) leaves room for it. Never past the caller's deadline (see [`patience`]).
pub const SETTLE_WAIT: Duration = Duration::from_secs(8);

/// Until when a request may wait for another attempt to settle: [`SETTLE_WAIT`] from now, or
/// a moment before the caller's deadline if that comes first (the answer must still reach it).
pub fn patience() -> tokio::time::Instant {
    let cap = tokio::time::Instant::now() + SETTLE_WAIT;
    match shopmesh_mesh::deadline::current() {
        Some(deadline) => cap.min(deadline - Duration::from_millis(250)),
        None => cap,
    }
}

/// Runs the saga's steps.
#[derive(Clone)]
pub struct Saga {
    store: Store,
    services: Arc<dyn Downstream>,
    ttl: Duration,
    failpoint: Option<Failpoint>,
    /// Orders whose step a request or the worker of this process is running right now (how
    /// many runs: one may call another, as a payment finding its order expired expires it).
    running: Arc<Mutex<HashMap<Uuid, usize>>>,
}

/// Marks an order's step as being run in this process until dropped (also when the request
/// running it is abandoned at its deadline).
struct Running {
    order_id: Uuid,
    running: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock()
            && let Some(runs) = running.get_mut(&self.order_id)
        {
            *runs -= 1;
            if *runs == 0 {
                running.remove(&self.order_id);
            }
        }
    }
}

/// A test-only switch that freezes the process at one point of the saga, so a test can kill it
/// there. It fires once per data directory (a marker file), so the restarted process runs on.
#[derive(Debug, Clone)]
pub struct Failpoint {
    /// Only `pause_after_charge` exists.
    pub name: String,
    /// Where the marker file goes.
    pub marker: PathBuf,
}

impl Failpoint {
    async fn hit(&self, name: &str) {
        if self.name != name || self.marker.exists() {
            return;
        }
        let _ = std::fs::write(&self.marker, b"fired");
        tracing::warn!(failpoint = name, "failpoint hit: pausing until killed");
        std::future::pending::<()>().await;
    }
}

fn order_field(i: usize) -> String {
    format!("items[{i}].product_id")
}

impl Saga {
    /// A saga over this store and these services; unpaid orders expire after `ttl`.
    pub fn new(
        store: Store,
        services: Arc<dyn Downstream>,
        ttl: Duration,
        failpoint: Option<Failpoint>,
    ) -> Self {
        Saga {
            store,
            services,
            ttl,
            failpoint,
            running: Arc::default(),
        }
    }

    /// Marks `order_id` as running here unless it already is (the check and the mark are one).
    pub fn try_run(&self, order_id: Uuid) -> Option<impl Drop + use<>> {
        let mut running = self.running.lock().ok()?;
        if running.contains_key(&order_id) {
            return None;
        }
        running.insert(order_id, 1);
        Some(Running {
            order_id,
            running: self.running.clone(),
        })
    }

    fn run(&self, order_id: Uuid) -> Running {
        if let Ok(mut running) = self.running.lock() {
            *running.entry(order_id).or_default() += 1;
        }
        Running {
            order_id,
            running: self.running.clone(),
        }
    }

    /// Whether a request or the worker of this process is running `order_id`'s step now. A
    /// step of this process's that is not, and has not moved for a while, was abandoned (its
    /// request gave up at its deadline, say after the process was frozen): the worker
    /// finishes it.
    pub fn is_running(&self, order_id: Uuid) -> bool {
        self.running
            .lock()
            .map_or(true, |running| running.contains_key(&order_id))
    }

    /// The customer's cart lines, as `items` would give them.
    pub async fn cart_lines(&self, user: Uuid) -> Result<Vec<(String, i64)>, Error> {
        let lines = self
            .services
            .cart(GetCartRequest {
                user_id: user.hyphenated().to_string(),
            })
            .await
            .map_err(|status| match failure(&status) {
                Failure::Refused(problem) => refusal(problem),
                Failure::Unknown => unavailable("cart"),
            })?
            .lines;
        Ok(lines
            .into_iter()
            .map(|l| (l.product_id, l.quantity))
            .collect())
    }

    /// Takes an ordered cart's lines out of the cart. Best effort: a failure leaves the lines in
    /// the cart, which is harmless (the order is placed either way).
    pub async fn take_from_cart(&self, user: Uuid, request: &Request) {
        let remove = RemoveLinesRequest {
            user_id: user.hyphenated().to_string(),
            lines: request
                .lines
                .iter()
                .map(|(product, quantity)| CartLine {
                    product_id: product.hyphenated().to_string(),
                    quantity: *quantity,
                })
                .collect(),
        };
        if let Err(status) = self.services.remove_from_cart(remove).await {
            tracing::warn!(%user, error = %status, "ordered lines could not be taken out of the cart");
        }
    }

    /// Prices the request from the catalog, stores the order and reserves its stock. With an
    /// `answer`, the key's answer is stored in the transaction that places the order.
    pub async fn place(
        &self,
        user: Uuid,
        order_id: Uuid,
        request: &Request,
        answer: Option<&KeyAnswer<'_>>,
    ) -> Result<(Order, Option<Answered>), Error> {
        let _running = self.run(order_id);
        let order = self.price(request).await?;
        self.store.insert_pending(order_id, user, &order).await?;
        self.reserve(order_id, &order, answer).await
    }

    /// [`Saga::place`] for an order [`Saga::price`]d and stored as pending already (with its
    /// key's claim: [`Store::claim_key_placing`]): reserves its stock.
    pub async fn place_priced(
        &self,
        order_id: Uuid,
        order: &NewOrder,
        answer: Option<&KeyAnswer<'_>>,
    ) -> Result<(Order, Option<Answered>), Error> {
        let _running = self.run(order_id);
        self.reserve(order_id, order, answer).await
    }

    /// The request priced from the catalog (every product purchasable, one currency), to
    /// expire unpaid after the saga's time to live.
    pub async fn price(&self, request: &Request) -> Result<NewOrder, Error> {
        let ids = request
            .lines
            .iter()
            .map(|(p, _)| p.hyphenated().to_string())
            .collect();
        let products = self
            .services
            .products(GetProductsRequest { ids })
            .await
            .map_err(|status| match failure(&status) {
                Failure::Refused(problem) => refusal(problem),
                Failure::Unknown => unavailable("catalog"),
            })?
            .products;
        let by_id: HashMap<String, _> = products.into_iter().map(|p| (p.id.clone(), p)).collect();
        let mut lines = Vec::with_capacity(request.lines.len());
        let mut currency: Option<String> = None;
        for (i, (product_id, quantity)) in request.lines.iter().enumerate() {
            let product = by_id
                .get(&product_id.hyphenated().to_string())
                .filter(|p| p.purchasable)
                .ok_or_else(|| Error::ProductUnavailable {
                    field: order_field(i),
                })?;
            match &currency {
                None => currency = Some(product.currency.clone()),
                Some(c) if *c != product.currency => return Err(Error::MixedCurrencies),
                Some(_) => {}
            }
            lines.push(Line {
                product_id: *product_id,
                sku: product.sku.clone(),
                name: product.name.clone(),
                unit_price: product.price,
                quantity: *quantity,
            });
        }
        let total = total(&lines).ok_or_else(|| {
            Invalid::new(
                "items",
                "total_too_large",
                "add up to more than can be charged",
            )
        })?;
        Ok(NewOrder {
            lines,
            total,
            currency: currency.unwrap_or_default(),
            expires_at: OffsetDateTime::now_utc() + self.ttl,
        })
    }

    async fn reserve(
        &self,
        order_id: Uuid,
        order: &NewOrder,
        answer: Option<&KeyAnswer<'_>>,
    ) -> Result<(Order, Option<Answered>), Error> {
        let lines = &order.lines;
        let reserve = ReserveRequest {
            order_id: order_id.hyphenated().to_string(),
            lines: lines
                .iter()
                .map(|l| StockLine {
                    product_id: l.product_id.hyphenated().to_string(),
                    quantity: l.quantity,
                })
                .collect(),
            ttl_seconds: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
        };
        match self.services.reserve(reserve).await {
            Ok(_) => {
                let from = (Status::Pending, Step::Reserving);
                let to = (Status::AwaitingPayment, Step::Idle);
                let placed = match answer {
                    Some(answer) => self
                        .store
                        .transition_answering(order_id, from, to, answer, Some(lines))
                        .await?
                        .map(|(order, answered)| (order, Some(answered))),
                    None => self
                        .store
                        .transition_returning(order_id, from, to, None, Some(lines))
                        .await?
                        .map(|order| (order, None)),
                };
                metrics::counter!("orders_placed_total").increment(1);
                tracing::debug!(%order_id, total = order.total, "order placed");
                if let Some(placed) = placed {
                    return Ok(placed);
                }
            }
            Err(status) => {
                return Err(match failure(&status) {
                    Failure::Refused(problem) => {
                        self.store
                            .transition(
                                order_id,
                                (Status::Pending, Step::Reserving),
                                (Status::Rejected, Step::Idle),
                                None,
                            )
                            .await?;
                        refusal(problem)
                    }
                    Failure::Unknown => {
                        // Maybe reserved, maybe not: undo now if we can, else the resumer will.
                        if self.roll_back_reservation(order_id).await.is_ok() {
                            self.store.release_keys_of(order_id).await?;
                        }
                        unavailable("inventory")
                    }
                });
            }
        }
        // Moved by someone else meanwhile (the resumer): as it is now, the key unanswered.
        Ok((self.load(order_id).await?, None))
    }

    async fn roll_back_reservation(&self, order_id: Uuid) -> Result<(), Error> {
        self.release_stock(order_id).await?;
        self.store
            .transition(
                order_id,
                (Status::Pending, Step::Reserving),
                (Status::Rejected, Step::Idle),
                None,
            )
            .await?;
        Ok(())
    }

    async fn load(&self, order_id: Uuid) -> Result<Order, Error> {
        self.store.order(order_id).await?.ok_or(Error::NotFound)
    }

    /// Charges the card and commits the stock. The order counts as running here (see
    /// [`Saga::is_running`]) from its step's start, not while this waits for another attempt:
    /// a wait must not keep the worker from finishing the step it waits for.
    pub async fn pay(&self, order: Order, card: Card) -> Result<Order, Error> {
        // Another attempt at this payment is in flight: the first try of a request the gateway
        // retries (its connection broke), or a double click. Wait briefly for it to settle and
        // answer with the outcome (paid; or payable again, then pay) rather than "busy".
        let order = match (order.status, order.step) {
            (Status::AwaitingPayment, Step::Charging | Step::Committing) => {
                self.settled(order).await?
            }
            _ => order,
        };
        match (order.status, order.step) {
            (Status::Paid, _) => return Ok(order),
            (Status::AwaitingPayment, Step::Idle) => {}
            (Status::AwaitingPayment, _) => return Err(Error::Busy),
            (status, _) => return Err(Error::WrongState(status.as_str())),
        }
        if order.expires_at <= OffsetDateTime::now_utc() {
            self.expire(order.id).await?;
            return Err(Error::Expired);
        }
        let running = self.run(order.id);
        if !self
            .store
            .transition(
                order.id,
                (Status::AwaitingPayment, Step::Idle),
                (Status::AwaitingPayment, Step::Charging),
                None,
            )
            .await?
        {
            // Another attempt got there first: its outcome is this one's when it is paid.
            drop(running);
            let now = self.settled(self.load(order.id).await?).await?;
            return match now.status {
                Status::Paid => Ok(now),
                _ => Err(Error::Busy),
            };
        }
        let charge = ChargeRequest {
            order_id: order.id.hyphenated().to_string(),
            amount: order.total,
            currency: order.currency.clone(),
            card: Some(card),
        };
        let payment = match self.services.charge(charge).await {
            Ok(payment) => payment,
            Err(status) => {
                return Err(match failure(&status) {
                    Failure::Refused(problem) => {
                        // Declined or invalid card: nothing was captured, the order stays payable.
                        self.store
                            .transition(
                                order.id,
                                (Status::AwaitingPayment, Step::Charging),
                                (Status::AwaitingPayment, Step::Idle),
                                None,
                            )
                            .await?;
                        refusal(problem)
                    }
                    Failure::Unknown => unavailable("payments"),
                });
            }
        };
        if let Some(failpoint) = &self.failpoint {
            failpoint.hit("pause_after_charge").await;
        }
        if !self
            .store
            .transition(
                order.id,
                (Status::AwaitingPayment, Step::Charging),
                (Status::AwaitingPayment, Step::Committing),
                Some((&payment.payment_id, &payment.card_last4)),
            )
            .await?
        {
            // Taken over while charging (this process was frozen past its lease): the taker
            // settles the order. If it found the capture, it commits; if it looked before the
            // capture landed, the order is payable again and the capture is kept for it (a
            // charge for the same order answers with it) or refunded when it expires. Never
            // commit stock from here for an order someone else now runs.
            tracing::warn!(order_id = %order.id, "order taken over while charging; leaving it to the taker");
            return Err(Error::Busy);
        }
        self.commit(order.id, Some(&order.lines)).await
    }

    /// `order` once its step in flight is over, or as it stands when [`patience`] runs out.
    async fn settled(&self, mut order: Order) -> Result<Order, Error> {
        let until = patience();
        while order.step != Step::Idle && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            order = self.load(order.id).await?;
        }
        Ok(order)
    }

    /// Commits the stock of a captured order; if the hold ran out, refunds and expires it.
    /// `lines`: the order's, when the caller has them read already.
    async fn commit(&self, order_id: Uuid, lines: Option<&[Line]>) -> Result<Order, Error> {
        let request = CommitRequest {
            order_id: order_id.hyphenated().to_string(),
        };
        match self.services.commit(request).await {
            Ok(_) => {
                let paid = self
                    .store
                    .transition_returning(
                        order_id,
                        (Status::AwaitingPayment, Step::Committing),
                        (Status::Paid, Step::Idle),
                        None,
                        lines,
                    )
                    .await?;
                metrics::counter!("orders_paid_total").increment(1);
                tracing::debug!(%order_id, "order paid");
                match paid {
                    Some(order) => Ok(order),
                    // Someone else (the resumer) finished it first: show it as it is.
                    None => self.load(order_id).await,
                }
            }
            Err(status) => match failure(&status) {
                Failure::Refused(_) => {
                    // The reservation expired or was released: the customer must not pay for
                    // stock they do not get.
                    self.refund(order_id).await?;
                    self.store
                        .transition(
                            order_id,
                            (Status::AwaitingPayment, Step::Committing),
                            (Status::Expired, Step::Idle),
                            None,
                        )
                        .await?;
                    tracing::warn!(%order_id, "payment arrived after the hold ran out; refunded");
                    Err(Error::Expired)
                }
                Failure::Unknown => Err(unavailable("inventory")),
            },
        }
    }

    /// Cancels: gives the stock back, refunds a capture.
    pub async fn cancel(&self, order: Order) -> Result<Order, Error> {
        let _running = self.run(order.id);
        self.cancel_steps(order).await
    }

    async fn cancel_steps(&self, order: Order) -> Result<Order, Error> {
        match (order.status, order.step) {
            (Status::Cancelled, _) => return Ok(order),
            (Status::AwaitingPayment | Status::Paid, Step::Idle) => {}
            (Status::AwaitingPayment | Status::Paid, _) => return Err(Error::Busy),
            (status, _) => return Err(Error::WrongState(status.as_str())),
        }
        if !self
            .store
            .transition(
                order.id,
                (order.status, Step::Idle),
                (order.status, Step::Cancelling),
                None,
            )
            .await?
        {
            return Err(Error::Busy);
        }
        self.finish_cancel(order.id, order.status).await
    }

    async fn finish_cancel(&self, order_id: Uuid, status: Status) -> Result<Order, Error> {
        self.release_stock(order_id).await?;
        // A paid order's capture; for an unpaid one, a charge that landed after a takeover made
        // the order payable again (see `pay`), else nothing (refunding nothing is a no-op).
        self.refund(order_id).await?;
        self.store
            .transition(
                order_id,
                (status, Step::Cancelling),
                (Status::Cancelled, Step::Idle),
                None,
            )
            .await?;
        metrics::counter!("orders_cancelled_total").increment(1);
        tracing::info!(%order_id, "order cancelled");
        self.load(order_id).await
    }

    /// Expires an unpaid order past its time: its stock goes back.
    pub async fn expire(&self, order_id: Uuid) -> Result<(), Error> {
        let _running = self.run(order_id);
        self.expire_steps(order_id).await
    }

    async fn expire_steps(&self, order_id: Uuid) -> Result<(), Error> {
        if !self
            .store
            .transition(
                order_id,
                (Status::AwaitingPayment, Step::Idle),
                (Status::AwaitingPayment, Step::Expiring),
                None,
            )
            .await?
        {
            return Ok(());
        }
        self.finish_expire(order_id).await
    }

    async fn finish_expire(&self, order_id: Uuid) -> Result<(), Error> {
        self.release_stock(order_id).await?;
        // Nothing is captured for an unpaid order, except a charge that landed after a takeover
        // made the order payable again (see `pay`): refunded here (a no-op otherwise).
        self.refund(order_id).await?;
        self.store
            .transition(
                order_id,
                (Status::AwaitingPayment, Step::Expiring),
                (Status::Expired, Step::Idle),
                None,
            )
            .await?;
        metrics::counter!("orders_expired_total").increment(1);
        tracing::info!(%order_id, "order expired");
        Ok(())
    }

    async fn release_stock(&self, order_id: Uuid) -> Result<(), Error> {
        let request = ReleaseRequest {
            order_id: order_id.hyphenated().to_string(),
        };
        match self.services.release(request).await {
            Ok(_) => Ok(()),
            Err(status) => Err(match failure(&status) {
                Failure::Refused(problem) => {
                    Error::Internal(anyhow::anyhow!("inventory refused a release: {problem}"))
                }
                Failure::Unknown => unavailable("inventory"),
            }),
        }
    }

    async fn refund(&self, order_id: Uuid) -> Result<(), Error> {
        let request = RefundRequest {
            order_id: order_id.hyphenated().to_string(),
        };
        match self.services.refund(request).await {
            Ok(_) => Ok(()),
            Err(status) => match failure(&status) {
                // Nothing captured: nothing to refund.
                Failure::Refused(_) if status.code() == tonic::Code::NotFound => Ok(()),
                Failure::Refused(problem) => Err(Error::Internal(anyhow::anyhow!(
                    "payments refused a refund: {problem}"
                ))),
                Failure::Unknown => Err(unavailable("payments")),
            },
        }
    }

    /// Finishes whatever step the order was in when its request or process died.
    pub async fn resume(&self, order_id: Uuid) -> Result<(), Error> {
        let _running = self.run(order_id);
        self.resume_steps(order_id).await
    }

    async fn resume_steps(&self, order_id: Uuid) -> Result<(), Error> {
        let order = self.load(order_id).await?;
        match order.step {
            Step::Idle => Ok(()),
            Step::Reserving => {
                self.roll_back_reservation(order_id).await?;
                self.store.release_keys_of(order_id).await?;
                tracing::info!(%order_id, "interrupted order rolled back");
                Ok(())
            }
            Step::Charging => {
                let request = GetPaymentRequest {
                    order_id: order_id.hyphenated().to_string(),
                };
                match self.services.payment(request).await {
                    Ok(payment) => {
                        if !self
                            .store
                            .transition(
                                order_id,
                                (Status::AwaitingPayment, Step::Charging),
                                (Status::AwaitingPayment, Step::Committing),
                                Some((&payment.payment_id, &payment.card_last4)),
                            )
                            .await?
                        {
                            // Moved meanwhile by whoever runs it now.
                            return Ok(());
                        }
                        tracing::info!(%order_id, "interrupted payment was captured; committing");
                        self.commit(order_id, None).await.map(|_| ())
                    }
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        self.store
                            .transition(
                                order_id,
                                (Status::AwaitingPayment, Step::Charging),
                                (Status::AwaitingPayment, Step::Idle),
                                None,
                            )
                            .await?;
                        tracing::info!(%order_id, "interrupted payment never captured; order payable again");
                        Ok(())
                    }
                    Err(_) => Err(unavailable("payments")),
                }
            }
            Step::Committing => {
                tracing::info!(%order_id, "resuming the commit of a captured order");
                match self.commit(order_id, None).await {
                    Ok(_) | Err(Error::Expired) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Step::Cancelling => self.finish_cancel(order_id, order.status).await.map(|_| ()),
            Step::Expiring => self.finish_expire(order_id).await,
        }
    }
}
