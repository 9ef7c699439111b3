//! SQL for payments. Portable between SQLite and PostgreSQL.

use shopmesh_db::Db;
use shopmesh_db::{is_unique_violation, micros};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::Error;

/// A stored capture.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Payment {
    /// The order.
    pub order_id: String,
    /// Our id of the capture.
    pub payment_id: String,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217.
    pub currency: String,
    /// `captured` or `refunded`.
    pub status: String,
    /// Last four digits of the card.
    pub card_last4: String,
    /// Card brand.
    pub card_brand: String,
}

/// The outcome recorded for an attempt that captured.
pub const APPROVED: &str = "approved";

/// What a new capture records.
pub struct NewCapture<'a> {
    /// The order.
    pub order_id: Uuid,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217.
    pub currency: &'a str,
    /// Last four digits.
    pub card_last4: &'a str,
    /// Brand.
    pub card_brand: &'a str,
}

/// The payments database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

impl Store {
    /// A store over this database.
    pub fn new(db: Db) -> Self {
        Store { db }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The order's capture, if any.
    pub async fn payment(&self, order_id: Uuid) -> Result<Option<Payment>, Error> {
        Ok(sqlx::query_as(
            "SELECT order_id, payment_id, amount, currency, status, card_last4, card_brand \
             FROM payments WHERE order_id = $1",
        )
        .bind(order_id.hyphenated().to_string())
        .fetch_optional(self.db.pool())
        .await?)
    }

    /// Records a capture and its approved attempt; if the order was captured meanwhile,
    /// records the attempt alone and returns that capture instead. A new capture writes
    /// `payment.captured` in the same transaction (one commit for the attempt, the capture and
    /// its event: a purchase waits for one commit here, not two). When the transaction fails,
    /// the stored capture decides: this one (its commit landed after all: nothing more to
    /// record), another one (the attempt is recorded, that capture answers), or none (the
    /// attempt is recorded, best effort, and the failure answers).
    pub async fn capture(&self, capture: &NewCapture<'_>) -> Result<Payment, Error> {
        let payment_id = Uuid::now_v7();
        let failure = match self.try_capture(capture, payment_id).await {
            Ok(Some(payment)) => return Ok(payment),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        let stored = match (self.payment(capture.order_id).await, failure) {
            (Ok(Some(stored)), _) if stored.payment_id == payment_id.hyphenated().to_string() => {
                return Ok(stored);
            }
            (Ok(stored), failure) => (stored, failure),
            // What was stored is unknown: nothing more is written.
            (Err(_), Some(e)) => return Err(e),
            (Err(e), None) => return Err(e),
        };
        // The approved attempt went with the transaction; the card was approved all the same.
        let recorded = self
            .record_attempt(
                capture.order_id,
                capture.amount,
                capture.currency,
                capture.card_last4,
                APPROVED,
            )
            .await;
        match stored {
            (Some(winner), _) => recorded.map(|()| winner),
            (None, Some(e)) => {
                if let Err(not_recorded) = recorded {
                    tracing::warn!(order_id = %capture.order_id, error = %not_recorded, "an approved attempt could not be recorded");
                }
                Err(e)
            }
            (None, None) => Err(Error::Internal(anyhow::anyhow!("capture vanished"))),
        }
    }

    /// The capture with its attempt and event, in one transaction; `None`, with nothing
    /// written, when a concurrent charge of the same order captured first.
    async fn try_capture(
        &self,
        capture: &NewCapture<'_>,
        payment_id: Uuid,
    ) -> Result<Option<Payment>, Error> {
        let mut tx = self.db.begin_write().await?;
        self.insert_attempt(
            &mut *tx,
            capture.order_id,
            capture.amount,
            capture.currency,
            capture.card_last4,
            APPROVED,
        )
        .await?;
        let result = sqlx::query(
            "INSERT INTO payments (order_id, payment_id, amount, currency, status, card_last4, \
             card_brand, created_at) VALUES ($1, $2, $3, $4, 'captured', $5, $6, $7)",
        )
        .bind(capture.order_id.hyphenated().to_string())
        .bind(payment_id.hyphenated().to_string())
        .bind(capture.amount)
        .bind(capture.currency)
        .bind(capture.card_last4)
        .bind(capture.card_brand)
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(&mut *tx)
        .await;
        match result {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let event = shopmesh_events::Event::of(&shopmesh_contracts::PaymentCaptured {
            order_id: capture.order_id,
            payment_id,
            amount: capture.amount,
            currency: capture.currency.to_owned(),
            card_last4: capture.card_last4.to_owned(),
        })
        .map_err(|e| Error::Internal(e.into()))?;
        shopmesh_events::outbox::append(&mut tx, &event, None).await?;
        tx.commit().await?;
        // What was just written: no need to read it back.
        Ok(Some(Payment {
            order_id: capture.order_id.hyphenated().to_string(),
            payment_id: payment_id.hyphenated().to_string(),
            amount: capture.amount,
            currency: capture.currency.to_owned(),
            status: "captured".to_owned(),
            card_last4: capture.card_last4.to_owned(),
            card_brand: capture.card_brand.to_owned(),
        }))
    }

    /// Records an attempt by itself (a declined one; an approved one whose capture was not
    /// written), never the card number. An attempt that captures is recorded by
    /// [`Store::capture`], in the capture's transaction.
    pub async fn record_attempt(
        &self,
        order_id: Uuid,
        amount: i64,
        currency: &str,
        card_last4: &str,
        outcome: &str,
    ) -> Result<(), Error> {
        self.insert_attempt(
            self.db.pool(),
            order_id,
            amount,
            currency,
            card_last4,
            outcome,
        )
        .await
    }

    async fn insert_attempt<'e>(
        &self,
        conn: impl sqlx::Executor<'e, Database = sqlx::Any>,
        order_id: Uuid,
        amount: i64,
        currency: &str,
        card_last4: &str,
        outcome: &str,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO payment_attempts (id, order_id, amount, currency, card_last4, outcome, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(Uuid::now_v7().hyphenated().to_string())
        .bind(order_id.hyphenated().to_string())
        .bind(amount)
        .bind(currency)
        .bind(card_last4)
        .bind(outcome)
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Marks the order's capture refunded (once, writing `payment.refunded` with it); `None`
    /// when nothing was captured.
    pub async fn refund(&self, order_id: Uuid) -> Result<Option<Payment>, Error> {
        let mut tx = self.db.begin_write().await?;
        let done = sqlx::query(
            "UPDATE payments SET status = 'refunded', refunded_at = $1 \
             WHERE order_id = $2 AND status = 'captured'",
        )
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(order_id.hyphenated().to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() > 0 {
            let (amount, currency): (i64, String) =
                sqlx::query_as("SELECT amount, currency FROM payments WHERE order_id = $1")
                    .bind(order_id.hyphenated().to_string())
                    .fetch_one(&mut *tx)
                    .await?;
            let event = shopmesh_events::Event::of(&shopmesh_contracts::PaymentRefunded {
                order_id,
                amount,
                currency,
            })
            .map_err(|e| Error::Internal(e.into()))?;
            shopmesh_events::outbox::append(&mut tx, &event, None).await?;
        }
        tx.commit().await?;
        self.payment(order_id).await
    }
}
