//! SQL for orders. Portable between SQLite and PostgreSQL. Saga steps are claimed with guarded
//! updates (`… WHERE step = 'idle'`), so two requests never run steps of one order at once.

use shopmesh_contracts::{OrderChange, OrderLine, OrderSnapshot};
pub use shopmesh_db::micros;
use shopmesh_db::{Db, Tx};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{Line, Status, Step};
use crate::error::Error;

/// A stored order with its lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// UUIDv7.
    pub id: Uuid,
    /// The customer.
    pub user_id: Uuid,
    /// What the customer sees.
    pub status: Status,
    /// The saga step in flight.
    pub step: Step,
    /// Sum of the lines, minor units.
    pub total: i64,
    /// ISO 4217.
    pub currency: String,
    /// When an unpaid order expires.
    pub expires_at: OffsetDateTime,
    /// The capture, once charged.
    pub payment_id: Option<String>,
    /// Last four digits of the card that paid.
    pub card_last4: Option<String>,
    /// Created.
    pub created_at: OffsetDateTime,
    /// Last changed.
    pub updated_at: OffsetDateTime,
    /// Priced lines, in the customer's order.
    pub lines: Vec<Line>,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: String,
    user_id: String,
    status: String,
    step: String,
    total: i64,
    currency: String,
    expires_at: i64,
    payment_id: Option<String>,
    card_last4: Option<String>,
    created_at: i64,
    updated_at: i64,
}

/// An order's row joined with one of its lines (`None`s: an order without lines).
#[derive(sqlx::FromRow)]
struct OrderWithLine {
    #[sqlx(flatten)]
    order: OrderRow,
    #[sqlx(flatten)]
    line: JoinedLine,
}

#[derive(sqlx::FromRow)]
struct JoinedLine {
    line_product_id: Option<String>,
    line_sku: Option<String>,
    line_name: Option<String>,
    line_unit_price: Option<i64>,
    line_quantity: Option<i64>,
}

impl JoinedLine {
    fn into_row(self) -> Option<LineRow> {
        Some(LineRow {
            product_id: self.line_product_id?,
            sku: self.line_sku?,
            name: self.line_name?,
            unit_price: self.line_unit_price?,
            quantity: self.line_quantity?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct LineRow {
    product_id: String,
    sku: String,
    name: String,
    unit_price: i64,
    quantity: i64,
}

macro_rules! order_columns {
    () => {
        "id, user_id, status, step, total, currency, expires_at, payment_id, card_last4, \
         created_at, updated_at"
    };
}

/// A stored answer to an idempotent request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
}

/// An order priced and ready to be stored as pending (see [`Store::claim_key_placing`]).
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// Priced lines, in the customer's order.
    pub lines: Vec<Line>,
    /// Their sum, minor units.
    pub total: i64,
    /// ISO 4217.
    pub currency: String,
    /// When it expires unpaid.
    pub expires_at: OffsetDateTime,
}

/// The answer an idempotency key gets in the transaction that places its order, so placing it
/// and answering the key are one commit (see [`Store::transition_answering`]).
pub struct KeyAnswer<'a> {
    /// The key's customer.
    pub user: Uuid,
    /// The key.
    pub key: &'a str,
    /// Renders the answer from the order as placed.
    pub render: &'a (dyn Fn(&Order) -> Result<StoredResponse, Error> + Send + Sync),
}

/// What storing a key's answer with its order's move did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answered {
    /// Stored: a retry replays this.
    Kept(StoredResponse),
    /// The key is no longer this order's (taken over while its request ran): nothing stored.
    TakenOver,
}

/// What claiming an idempotency key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours; run the request for this order id.
    Claimed(Uuid),
    /// The first request finished: answer the same.
    Replay(StoredResponse),
    /// The first request is still running.
    InFlight,
    /// The first request started long ago and never answered: its process died. The caller
    /// settles it from the state of this order id.
    Abandoned(Uuid),
    /// The key was used with another body.
    Mismatch,
}

fn from_micros(us: i64) -> OffsetDateTime {
    shopmesh_db::from_micros(us).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn id(uuid: Uuid) -> String {
    uuid.hyphenated().to_string()
}

fn corrupt(what: &str) -> Error {
    Error::Internal(anyhow::anyhow!("stored order has a bad {what}"))
}

impl LineRow {
    fn into_line(self) -> Result<Line, Error> {
        Ok(Line {
            product_id: Uuid::parse_str(&self.product_id).map_err(|_| corrupt("line"))?,
            sku: self.sku,
            name: self.name,
            unit_price: self.unit_price,
            quantity: self.quantity,
        })
    }
}

impl OrderRow {
    fn into_order(self, lines: Vec<LineRow>) -> Result<Order, Error> {
        let lines = lines
            .into_iter()
            .map(LineRow::into_line)
            .collect::<Result<_, Error>>()?;
        self.with_lines(lines)
    }

    fn with_lines(self, lines: Vec<Line>) -> Result<Order, Error> {
        Ok(Order {
            id: Uuid::parse_str(&self.id).map_err(|_| corrupt("id"))?,
            user_id: Uuid::parse_str(&self.user_id).map_err(|_| corrupt("user"))?,
            status: Status::parse(&self.status).ok_or_else(|| corrupt("status"))?,
            step: Step::parse(&self.step).ok_or_else(|| corrupt("step"))?,
            total: self.total,
            currency: self.currency,
            expires_at: from_micros(self.expires_at),
            payment_id: self.payment_id,
            card_last4: self.card_last4,
            created_at: from_micros(self.created_at),
            updated_at: from_micros(self.updated_at),
            lines,
        })
    }
}

/// A key whose first request has not answered after this long belongs to a dead process (every
/// downstream call has a deadline of a few seconds).
const ABANDONED_AFTER: time::Duration = time::Duration::seconds(60);

/// The owner of a key whose request gave it up: no instance has this id, so its lease is never
/// running and the key counts as abandoned.
const ABANDONED_OWNER: &str = "abandoned";

/// A step nobody alive runs: untouched since `$1`, or its owner (not this process, `$3`) has no
/// lease running past now (`$2`). An unknown owner (a row from before leases) is only judged by
/// age.
macro_rules! orphaned_step {
    () => {
        "step <> 'idle' AND (updated_at < $1 OR (owner IS NOT NULL AND owner <> $3 \
         AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = orders.owner \
         AND i.lease_until > $2)))"
    };
}
const ORPHANED_STEPS: &str = concat!(
    "SELECT id FROM orders WHERE ",
    orphaned_step!(),
    " ORDER BY id LIMIT 100"
);
const TAKE_OVER_STEP: &str = concat!(
    "UPDATE orders SET owner = $3, updated_at = $2 WHERE id = $4 AND ",
    orphaned_step!()
);

/// Order ids as rows of one text column.
fn order_ids(rows: Vec<(String,)>) -> Vec<Uuid> {
    rows.into_iter()
        .filter_map(|(s,)| Uuid::parse_str(&s).ok())
        .collect()
}

/// The orders database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    /// This process, as the owner of the steps and keys it runs (`instances`).
    instance: String,
}

/// How long a process's lease lasts after a renewal; renewed every [`LEASE_RENEW_EVERY`]. A
/// process silent for this long (killed, frozen, cut off) is dead to the others. Five renewals
/// long, so a renewal held up behind the database's writer does not make a live process look
/// dead; replicas on several hosts need clocks within a second or two of each other.
pub const LEASE: time::Duration = time::Duration::seconds(5);
/// How often a process renews its lease.
pub const LEASE_RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Store {
    /// A store over this database, for a new process (its own instance id).
    pub fn new(db: Db) -> Self {
        Store {
            db,
            instance: Uuid::now_v7().hyphenated().to_string(),
        }
    }

    /// This process's instance id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Renews this process's lease (creating it on the first call).
    pub async fn renew_lease(&self) -> Result<(), Error> {
        // The writer first, then the time: a wait for the writer must not shorten it.
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO instances (id, lease_until) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until",
        )
        .bind(&self.instance)
        .bind(micros(OffsetDateTime::now_utc() + LEASE))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets instances whose lease ran out a day ago (killed processes never retire).
    pub async fn forget_dead_instances(&self) -> Result<u64, Error> {
        Ok(sqlx::query("DELETE FROM instances WHERE lease_until < $1")
            .bind(micros(OffsetDateTime::now_utc() - time::Duration::DAY))
            .execute(self.db.pool())
            .await?
            .rows_affected())
    }

    /// Gives up this process's lease (a clean stop, after its requests drained), and forgets
    /// instances dead for a day.
    pub async fn retire(&self) -> Result<(), Error> {
        sqlx::query("DELETE FROM instances WHERE id = $1 OR lease_until < $2")
            .bind(&self.instance)
            .bind(micros(OffsetDateTime::now_utc() - time::Duration::DAY))
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Whether `user`'s `key` is still unanswered (a read: what a request waiting for the
    /// key's first attempt polls, instead of trying to claim it again and again).
    pub async fn key_pending(&self, user: Uuid, key: &str) -> Result<bool, Error> {
        let row: Option<(Option<i64>,)> = sqlx::query_as(
            "SELECT response_status FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2",
        )
        .bind(id(user))
        .bind(key)
        .fetch_optional(self.db.reader())
        .await?;
        Ok(matches!(row, Some((None,))))
    }

    /// Claims `(user, key)` for a request with this body hash.
    pub async fn claim_key(&self, user: Uuid, key: &str, hash: &str) -> Result<Claim, Error> {
        let order_id = Uuid::now_v7();
        if self
            .insert_key(self.db.pool(), user, key, hash, order_id)
            .await?
        {
            return Ok(Claim::Claimed(order_id));
        }
        self.existing_claim(user, key, hash).await
    }

    /// [`Store::claim_key`] for a request already priced: when the key is new, the pending
    /// order is stored with the claim, in one transaction (one commit less per order than
    /// claiming, then storing it). `Claim::Claimed` means both are stored.
    pub async fn claim_key_placing(
        &self,
        user: Uuid,
        key: &str,
        hash: &str,
        order: &NewOrder,
    ) -> Result<Claim, Error> {
        let order_id = Uuid::now_v7();
        let mut tx = self.db.begin_write().await?;
        if self.insert_key(&mut *tx, user, key, hash, order_id).await? {
            self.insert_order(&mut tx, order_id, user, order).await?;
            tx.commit().await?;
            return Ok(Claim::Claimed(order_id));
        }
        tx.rollback().await?;
        self.existing_claim(user, key, hash).await
    }

    /// Inserts the key's claim for `order_id`; `false` if the key exists.
    async fn insert_key<'e>(
        &self,
        conn: impl sqlx::Executor<'e, Database = sqlx::Any>,
        user: Uuid,
        key: &str,
        hash: &str,
        order_id: Uuid,
    ) -> Result<bool, Error> {
        // `ON CONFLICT DO NOTHING`, not a caught unique violation: on PostgreSQL an error
        // would end the transaction the claim may be part of.
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys \
             (user_id, idem_key, request_hash, order_id, created_at, owner) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id, idem_key) DO NOTHING",
        )
        .bind(id(user))
        .bind(key)
        .bind(hash)
        .bind(id(order_id))
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(&self.instance)
        .execute(conn)
        .await?;
        Ok(inserted.rows_affected() > 0)
    }

    /// What an existing claim of `(user, key)` means for a request with this body hash.
    async fn existing_claim(&self, user: Uuid, key: &str, hash: &str) -> Result<Claim, Error> {
        type KeyRow = (String, Option<i64>, Option<String>, String, i64, i64);
        // The last column: its owner's lease has run out (an unknown owner, from before
        // leases, is not dead by this rule).
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT request_hash, response_status, response_body, order_id, created_at, \
             CAST(CASE WHEN k.owner IS NOT NULL AND k.owner <> $4 AND NOT EXISTS \
             (SELECT 1 FROM instances i WHERE i.id = k.owner AND i.lease_until > $3) \
             THEN 1 ELSE 0 END AS BIGINT) \
             FROM idempotency_keys k WHERE user_id = $1 AND idem_key = $2",
        )
        .bind(id(user))
        .bind(key)
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(&self.instance)
        .fetch_optional(self.db.pool())
        .await?;
        let abandoned_before = micros(OffsetDateTime::now_utc() - ABANDONED_AFTER);
        Ok(match row {
            // Released between our insert and this read: the caller may simply retry.
            None => Claim::InFlight,
            Some((stored_hash, ..)) if stored_hash != hash => Claim::Mismatch,
            Some((_, Some(status), Some(body), _, _, _)) => Claim::Replay(StoredResponse {
                status: u16::try_from(status).unwrap_or(500),
                body,
            }),
            // Its first request died with its process (the owner's lease ran out), or, for a key
            // from before leases, it has been running for longer than any request may.
            Some((_, _, _, order_id, created_at, owner_dead))
                if owner_dead == 1 || created_at < abandoned_before =>
            {
                Claim::Abandoned(Uuid::parse_str(&order_id).map_err(|_| corrupt("key order id"))?)
            }
            Some(_) => Claim::InFlight,
        })
    }

    /// Takes over an abandoned key for a fresh attempt under a new order id; `None` if someone
    /// else took it over first.
    pub async fn retake_key(
        &self,
        user: Uuid,
        key: &str,
        abandoned: Uuid,
    ) -> Result<Option<Uuid>, Error> {
        let fresh = Uuid::now_v7();
        let done = sqlx::query(
            "UPDATE idempotency_keys SET order_id = $1, created_at = $2, owner = $6 \
             WHERE user_id = $3 AND idem_key = $4 AND order_id = $5 AND response_status IS NULL",
        )
        .bind(id(fresh))
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(id(user))
        .bind(key)
        .bind(id(abandoned))
        .bind(&self.instance)
        .execute(self.db.pool())
        .await?;
        Ok((done.rows_affected() > 0).then_some(fresh))
    }

    /// Stores the final answer for `(user, key)` as claimed for `order_id`; `false` (nothing
    /// written) if the key was answered, released or taken over under another order id since.
    pub async fn finish_key(
        &self,
        user: Uuid,
        key: &str,
        order_id: Uuid,
        response: &StoredResponse,
    ) -> Result<bool, Error> {
        self.store_answer(self.db.pool(), user, key, order_id, response)
            .await
    }

    async fn store_answer<'e>(
        &self,
        conn: impl sqlx::Executor<'e, Database = sqlx::Any>,
        user: Uuid,
        key: &str,
        order_id: Uuid,
        response: &StoredResponse,
    ) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE idempotency_keys SET response_status = $1, response_body = $2 \
             WHERE user_id = $3 AND idem_key = $4 AND order_id = $5 AND response_status IS NULL",
        )
        .bind(i64::from(response.status))
        .bind(&response.body)
        .bind(id(user))
        .bind(key)
        .bind(id(order_id))
        .execute(conn)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks `(user, key)`'s unanswered claim under `order_id` as given up by its request (a
    /// dropped request, a failure after its order was placed): the next claim finds it
    /// [`Claim::Abandoned`] at once, as if its owner had died, and answers with the order or
    /// starts afresh. Nothing changes if it was answered or taken over meanwhile.
    pub async fn abandon_key(&self, user: Uuid, key: &str, order_id: Uuid) -> Result<(), Error> {
        sqlx::query(
            "UPDATE idempotency_keys SET owner = $1 \
             WHERE user_id = $2 AND idem_key = $3 AND order_id = $4 AND response_status IS NULL",
        )
        .bind(ABANDONED_OWNER)
        .bind(id(user))
        .bind(key)
        .bind(id(order_id))
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Forgets `(user, key)` as claimed for `order_id`, so a retry starts afresh (after a
    /// failure worth retrying); a claim made since under another order id is left alone.
    pub async fn release_key(&self, user: Uuid, key: &str, order_id: Uuid) -> Result<(), Error> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2 \
             AND order_id = $3 AND response_status IS NULL",
        )
        .bind(id(user))
        .bind(key)
        .bind(id(order_id))
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Forgets keys of orders that never got an answer (their request died with a process).
    pub async fn release_keys_of(&self, order_id: Uuid) -> Result<(), Error> {
        sqlx::query("DELETE FROM idempotency_keys WHERE order_id = $1 AND response_status IS NULL")
            .bind(id(order_id))
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// Drops idempotency keys older than `before`, a thousand at a time (on SQLite a statement
    /// runs on the runtime's thread: a day's keys at once would stop the process meanwhile).
    pub async fn purge_keys(&self, before: OffsetDateTime) -> Result<u64, Error> {
        let mut purged = 0;
        loop {
            let done = sqlx::query(
                // The age again outside: on PostgreSQL a key retaken (made young) while this
                // waited for its row lock is re-checked against this, not the subquery's list.
                "DELETE FROM idempotency_keys WHERE created_at < $1 AND (user_id, idem_key) IN \
                 (SELECT user_id, idem_key FROM idempotency_keys WHERE created_at < $1 \
                  ORDER BY created_at LIMIT 1000)",
            )
            .bind(micros(before))
            .execute(self.db.pool())
            .await?
            .rows_affected();
            purged += done;
            if done < 1000 {
                return Ok(purged);
            }
        }
    }

    /// Stores a new order as `pending`, step `reserving`, with its lines.
    pub async fn insert_pending(
        &self,
        order_id: Uuid,
        user: Uuid,
        order: &NewOrder,
    ) -> Result<(), Error> {
        let mut tx = self.db.begin_write().await?;
        self.insert_order(&mut tx, order_id, user, order).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_order(
        &self,
        tx: &mut Tx,
        order_id: Uuid,
        user: Uuid,
        order: &NewOrder,
    ) -> Result<(), Error> {
        let now = micros(OffsetDateTime::now_utc());
        sqlx::query(
            "INSERT INTO orders (id, user_id, status, step, total, currency, expires_at, \
             created_at, updated_at, owner) \
             VALUES ($1, $2, 'pending', 'reserving', $3, $4, $5, $6, $6, $7)",
        )
        .bind(id(order_id))
        .bind(id(user))
        .bind(order.total)
        .bind(&order.currency)
        .bind(micros(order.expires_at))
        .bind(now)
        .bind(&self.instance)
        .execute(&mut **tx)
        .await?;
        for (position, line) in order.lines.iter().enumerate() {
            sqlx::query(
                "INSERT INTO order_lines (order_id, position, product_id, sku, name, unit_price, \
                 quantity) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(id(order_id))
            .bind(i64::try_from(position).unwrap_or(i64::MAX))
            .bind(id(line.product_id))
            .bind(&line.sku)
            .bind(&line.name)
            .bind(line.unit_price)
            .bind(line.quantity)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// One order with its lines, in one round trip (a row per line).
    pub async fn order(&self, order_id: Uuid) -> Result<Option<Order>, Error> {
        let rows: Vec<OrderWithLine> = sqlx::query_as(concat!(
            "SELECT ",
            order_columns!(),
            ", l.product_id AS line_product_id, l.sku AS line_sku, l.name AS line_name, \
             l.unit_price AS line_unit_price, l.quantity AS line_quantity \
             FROM orders LEFT JOIN order_lines l ON l.order_id = orders.id \
             WHERE orders.id = $1 ORDER BY l.position"
        ))
        .bind(id(order_id))
        .fetch_all(self.db.reader())
        .await?;
        let mut rows = rows.into_iter();
        let Some(first) = rows.next() else {
            return Ok(None);
        };
        let mut lines = Vec::new();
        let order = first.order;
        for line in std::iter::once(first.line).chain(rows.map(|r| r.line)) {
            // An order's lines are stored with it: no line means none to show, not a gap.
            if let Some(line) = line.into_row() {
                lines.push(line);
            }
        }
        Ok(Some(order.into_order(lines)?))
    }

    async fn lines(&self, order_id: Uuid) -> Result<Vec<LineRow>, Error> {
        Ok(sqlx::query_as(
            "SELECT product_id, sku, name, unit_price, quantity FROM order_lines \
             WHERE order_id = $1 ORDER BY position",
        )
        .bind(id(order_id))
        .fetch_all(self.db.reader())
        .await?)
    }

    /// A customer's placed orders (or everyone's, for `None`), newest first, before the cursor.
    pub async fn list(
        &self,
        user: Option<Uuid>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Order>, Error> {
        let rows: Vec<OrderRow> = sqlx::query_as(concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE status NOT IN ('pending', 'rejected')",
            " AND ($1 = '' OR user_id = $1) AND ($2 = '' OR id < $2)",
            " ORDER BY id DESC LIMIT $3"
        ))
        .bind(user.map(id).unwrap_or_default())
        .bind(before.map(id).unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(self.db.reader())
        .await?;
        let mut orders = Vec::with_capacity(rows.len());
        for row in rows {
            let order_id = Uuid::parse_str(&row.id).map_err(|_| corrupt("id"))?;
            let lines = self.lines(order_id).await?;
            orders.push(row.into_order(lines)?);
        }
        Ok(orders)
    }

    /// Every placed order (rejected ones excluded), oldest first: for reconciliation.
    pub async fn all_orders(&self) -> Result<Vec<Order>, Error> {
        let rows: Vec<OrderRow> = sqlx::query_as(concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE status <> 'rejected' ORDER BY id"
        ))
        .fetch_all(self.db.pool())
        .await?;
        let mut orders = Vec::with_capacity(rows.len());
        for row in rows {
            let order_id = Uuid::parse_str(&row.id).map_err(|_| corrupt("id"))?;
            let lines = self.lines(order_id).await?;
            orders.push(row.into_order(lines)?);
        }
        Ok(orders)
    }

    /// Moves an order from `(status, step)` to `(status, step)`, only if it is still in the
    /// first; `false` if someone else moved it. Records the payment when given. A change of
    /// status the customer cares about writes its event (`order.placed`, `order.paid`,
    /// `order.cancelled`, `order.expired`) in the same transaction: the guard makes it once.
    pub async fn transition(
        &self,
        order_id: Uuid,
        from: (Status, Step),
        to: (Status, Step),
        payment: Option<(&str, &str)>,
    ) -> Result<bool, Error> {
        Ok(self
            .moved(order_id, from, to, payment, false, None, None)
            .await?
            .is_some())
    }

    /// [`Store::transition`], answering with the order as it is after the move (read in the
    /// same transaction, so no second round trip is needed to show it); `None` if someone else
    /// moved it. `lines`: the order's lines when the caller has them (they never change once
    /// the order is stored), so they need not be read again.
    pub async fn transition_returning(
        &self,
        order_id: Uuid,
        from: (Status, Step),
        to: (Status, Step),
        payment: Option<(&str, &str)>,
        lines: Option<&[Line]>,
    ) -> Result<Option<Order>, Error> {
        Ok(self
            .moved(order_id, from, to, payment, true, None, lines)
            .await?
            .and_then(|(order, _)| order))
    }

    /// [`Store::transition_returning`] that also stores `answer` for its key, in the same
    /// transaction: `None` if someone else moved the order (nothing written), else the order
    /// and what became of the key's answer (the move stands either way).
    pub async fn transition_answering(
        &self,
        order_id: Uuid,
        from: (Status, Step),
        to: (Status, Step),
        answer: &KeyAnswer<'_>,
        lines: Option<&[Line]>,
    ) -> Result<Option<(Order, Answered)>, Error> {
        Ok(self
            .moved(order_id, from, to, None, true, Some(answer), lines)
            .await?
            .and_then(|(order, answered)| Some((order?, answered?))))
    }

    /// `None`: not moved; `Some((order, answered))`: moved, with the order when it was read
    /// (`want` or an event or an answer needs it) and the key's answer when one was given.
    /// `lines`, when given, are the order's (else they are read in the move's transaction).
    #[allow(clippy::too_many_arguments)]
    async fn moved(
        &self,
        order_id: Uuid,
        from: (Status, Step),
        to: (Status, Step),
        payment: Option<(&str, &str)>,
        want: bool,
        answer: Option<&KeyAnswer<'_>>,
        lines: Option<&[Line]>,
    ) -> Result<Option<(Option<Order>, Option<Answered>)>, Error> {
        let kind = match to.0 {
            _ if to.0 == from.0 => None,
            Status::AwaitingPayment => Some(OrderChange::Placed),
            Status::Paid => Some(OrderChange::Paid),
            Status::Cancelled => Some(OrderChange::Cancelled),
            Status::Expired => Some(OrderChange::Expired),
            Status::Pending | Status::Rejected => None,
        };
        macro_rules! guarded_move {
            ($query:expr) => {
                $query
                    .bind(to.0.as_str())
                    .bind(to.1.as_str())
                    .bind(micros(OffsetDateTime::now_utc()))
                    .bind(payment.map(|p| p.0.to_owned()))
                    .bind(payment.map(|p| p.1.to_owned()))
                    .bind(id(order_id))
                    .bind(from.0.as_str())
                    .bind(from.1.as_str())
                    .bind(&self.instance)
            };
        }
        macro_rules! move_sql {
            () => {
                "UPDATE orders SET status = $1, step = $2, updated_at = $3, \
                 payment_id = COALESCE($4, payment_id), card_last4 = COALESCE($5, card_last4), \
                 owner = $9 WHERE id = $6 AND status = $7 AND step = $8"
            };
        }
        if kind.is_none() && !want && answer.is_none() {
            // One guarded statement is atomic by itself: no transaction round trips.
            let done = guarded_move!(sqlx::query(move_sql!()))
                .execute(self.db.pool())
                .await?;
            return Ok((done.rows_affected() > 0).then_some((None, None)));
        }
        let mut tx = self.db.begin_write().await?;
        // The order as it is after the move comes back with it (`RETURNING`): one round trip
        // less than reading it again.
        let row: Option<OrderRow> = guarded_move!(sqlx::query_as(concat!(
            move_sql!(),
            " RETURNING ",
            order_columns!()
        )))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let order = match lines {
            Some(lines) => row.with_lines(lines.to_vec())?,
            None => {
                let lines: Vec<LineRow> = sqlx::query_as(
                    "SELECT product_id, sku, name, unit_price, quantity FROM order_lines \
                     WHERE order_id = $1 ORDER BY position",
                )
                .bind(id(order_id))
                .fetch_all(&mut *tx)
                .await?;
                row.into_order(lines)?
            }
        };
        if let Some(change) = kind {
            let event = OrderSnapshot {
                order_id: order.id,
                user_id: order.user_id,
                status: order.status.as_str().to_owned(),
                total: order.total,
                currency: order.currency.clone(),
                card_last4: order.card_last4.clone(),
                lines: order
                    .lines
                    .iter()
                    .map(|l| OrderLine {
                        product_id: l.product_id,
                        sku: l.sku.clone(),
                        name: l.name.clone(),
                        unit_price: l.unit_price,
                        quantity: l.quantity,
                    })
                    .collect(),
            }
            .event(change)
            .map_err(|e| Error::Internal(e.into()))?;
            shopmesh_events::outbox::append(&mut tx, &event, None).await?;
        }
        let answered = match answer {
            None => None,
            Some(answer) => {
                // (Rendering is serialising the order: it does not fail in practice. If it
                // did, the move would be undone with it and the resumer roll the order back.)
                let response = (answer.render)(&order)?;
                let kept = self
                    .store_answer(&mut *tx, answer.user, answer.key, order.id, &response)
                    .await?;
                Some(if kept {
                    Answered::Kept(response)
                } else {
                    Answered::TakenOver
                })
            }
        };
        tx.commit().await?;
        Ok(Some((Some(order), answered)))
    }

    /// Orders with a step in flight that nobody alive is running: its owner's lease has run
    /// out (killed, frozen, cut off), or it was last touched before `before` (a step no live
    /// process can still be in: calls have deadlines far shorter). A step a live process runs
    /// right now is never among them.
    pub async fn in_flight(&self, before: OffsetDateTime) -> Result<Vec<Uuid>, Error> {
        let rows: Vec<(String,)> = sqlx::query_as(ORPHANED_STEPS)
            .bind(micros(before))
            .bind(micros(OffsetDateTime::now_utc()))
            .bind(&self.instance)
            .fetch_all(self.db.pool())
            .await?;
        Ok(order_ids(rows))
    }

    /// This process's own steps in flight that have not moved since `before` (the worker
    /// finishes those that nothing in the process runs any more: see `Saga::is_running`).
    pub async fn own_steps_idle_since(&self, before: OffsetDateTime) -> Result<Vec<Uuid>, Error> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM orders WHERE step <> 'idle' AND owner = $1 AND updated_at < $2 \
             ORDER BY updated_at LIMIT 100",
        )
        .bind(&self.instance)
        .bind(micros(before))
        .fetch_all(self.db.pool())
        .await?;
        Ok(order_ids(rows))
    }

    /// Claims this process's own step of `order_id` for the worker if it is still in flight
    /// and still untouched since `before` (touching it): `false` if it moved meanwhile (a new
    /// request may have started another step since the list was read).
    pub async fn claim_abandoned_step(
        &self,
        order_id: Uuid,
        before: OffsetDateTime,
    ) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE orders SET updated_at = $1 WHERE id = $2 AND owner = $3 AND step <> 'idle' \
             AND updated_at < $4",
        )
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(id(order_id))
        .bind(&self.instance)
        .bind(micros(before))
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes over the step in flight of `order_id` if nobody alive runs it (as
    /// [`Store::in_flight`] decides, again, now): `true` if it is now this process's to finish.
    /// Two replicas resuming the same dead process's steps, or a step that a customer's new
    /// request started since the list was read, are thus never run twice.
    pub async fn take_over_step(
        &self,
        order_id: Uuid,
        before: OffsetDateTime,
    ) -> Result<bool, Error> {
        let done = sqlx::query(TAKE_OVER_STEP)
            .bind(micros(before))
            .bind(micros(OffsetDateTime::now_utc()))
            .bind(&self.instance)
            .bind(id(order_id))
            .execute(self.db.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether the step in flight of `order_id` is still this process's (it took it over and is
    /// still finishing it); touches it if so, so that it does not look abandoned.
    pub async fn keep_step(&self, order_id: Uuid) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE orders SET updated_at = $1 WHERE id = $2 AND owner = $3 AND step <> 'idle'",
        )
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(id(order_id))
        .bind(&self.instance)
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Unpaid orders past their expiry.
    pub async fn overdue(&self) -> Result<Vec<Uuid>, Error> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM orders WHERE status = 'awaiting_payment' AND step = 'idle' \
             AND expires_at <= $1 ORDER BY expires_at LIMIT 100",
        )
        .bind(micros(OffsetDateTime::now_utc()))
        .fetch_all(self.db.pool())
        .await?;
        Ok(order_ids(rows))
    }
}
