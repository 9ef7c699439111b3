//! The gRPC API (`shopmesh.payments.v1.Payments`). Payments has no public HTTP surface.

use shopmesh_problem::Invalid;
use shopmesh_proto::payments::v1::payments_server::{Payments, PaymentsServer};
use shopmesh_proto::payments::v1::{
    ChargeRequest, GetPaymentRequest, Payment as PaymentMessage, RefundRequest,
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{Amount, Card, Currency, authorize};
use crate::error::Error;
use crate::store::{NewCapture, Payment, Store};

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct PaymentsGrpc {
    store: Store,
}

impl PaymentsGrpc {
    /// The tonic server for this service.
    pub fn server(store: Store) -> PaymentsServer<PaymentsGrpc> {
        PaymentsServer::new(PaymentsGrpc { store })
    }
}

fn order_id(raw: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(raw)
        .map_err(|_| Invalid::new("order_id", "invalid_order_id", "must be a UUID").into())
}

fn to_message(p: Payment) -> PaymentMessage {
    PaymentMessage {
        payment_id: p.payment_id,
        order_id: p.order_id,
        amount: p.amount,
        currency: p.currency,
        status: p.status,
        card_last4: p.card_last4,
        card_brand: p.card_brand,
    }
}

impl PaymentsGrpc {
    async fn charge(&self, request: ChargeRequest) -> Result<Payment, Error> {
        let order = order_id(&request.order_id)?;
        let amount = Amount::parse(request.amount)?;
        let currency = Currency::parse(&request.currency)?;
        // A capture already made for this order is the answer to every later charge.
        if let Some(existing) = self.store.payment(order).await? {
            return if existing.amount == amount.get() && existing.currency == currency.as_str() {
                Ok(existing)
            } else {
                Err(Error::Mismatch)
            };
        }
        let raw = request
            .card
            .ok_or_else(|| Invalid::new("card", "missing_card", "is required"))?;
        let card = Card::parse(&raw.number, raw.exp_month, raw.exp_year, &raw.cvc)?;
        let last4 = card.number.last4().to_owned();
        let decision = authorize(&card, OffsetDateTime::now_utc());
        if let Err(decline) = decision {
            self.store
                .record_attempt(
                    order,
                    amount.get(),
                    currency.as_str(),
                    &last4,
                    decline.code(),
                )
                .await?;
            tracing::info!(order_id = %order, card_last4 = %last4, code = decline.code(), "charge declined");
            metrics::counter!("payments_declined_total", "code" => decline.code()).increment(1);
            return Err(Error::Declined(decline));
        }
        let payment = self
            .store
            .capture(&NewCapture {
                order_id: order,
                amount: amount.get(),
                currency: currency.as_str(),
                card_last4: &last4,
                card_brand: card.number.brand(),
            })
            .await?;
        tracing::debug!(order_id = %order, card_last4 = %last4, amount = amount.get(), "charge captured");
        metrics::counter!("payments_captured_total").increment(1);
        Ok(payment)
    }
}

#[tonic::async_trait]
impl Payments for PaymentsGrpc {
    async fn charge(
        &self,
        request: Request<ChargeRequest>,
    ) -> Result<Response<PaymentMessage>, Status> {
        let payment = PaymentsGrpc::charge(self, request.into_inner()).await?;
        Ok(Response::new(to_message(payment)))
    }

    async fn refund(
        &self,
        request: Request<RefundRequest>,
    ) -> Result<Response<PaymentMessage>, Status> {
        let order = order_id(&request.get_ref().order_id)?;
        let payment = self.store.refund(order).await?.ok_or(Error::NotFound)?;
        tracing::info!(order_id = %order, "refunded");
        Ok(Response::new(to_message(payment)))
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<PaymentMessage>, Status> {
        let order = order_id(&request.get_ref().order_id)?;
        let payment = self.store.payment(order).await?.ok_or(Error::NotFound)?;
        Ok(Response::new(to_message(payment)))
    }
}
