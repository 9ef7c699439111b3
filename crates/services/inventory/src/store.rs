//! SQL for the inventory. Every change of stock is one guarded statement inside a write
//! transaction: `reserved` grows only `WHERE on_hand - reserved >= quantity`, so two
//! concurrent reservations can never both take the last unit, on SQLite (one writer at a time,
//! `BEGIN IMMEDIATE`) or PostgreSQL (the row lock makes the second re-check the condition).

pub use shopmesh_db::micros;
use shopmesh_db::{Db, is_unique_violation};

use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{Lines, Quantity, State, StockLevel, Ttl};
use crate::error::Error;

/// The inventory database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

/// The columns of a [`StockRow`], in a `SELECT` or a `RETURNING`.
macro_rules! stock_columns {
    () => {
        "product_id, on_hand, reserved, added, removed, sold"
    };
}

#[derive(sqlx::FromRow)]
struct StockRow {
    product_id: String,
    on_hand: i64,
    reserved: i64,
    added: i64,
    removed: i64,
    sold: i64,
}

impl StockRow {
    fn into_level(self) -> Result<StockLevel, Error> {
        Ok(StockLevel {
            product_id: Uuid::parse_str(&self.product_id)
                .map_err(|_| Error::Internal(anyhow::anyhow!("stored stock has a bad id")))?,
            on_hand: self.on_hand,
            reserved: self.reserved,
            added: self.added,
            removed: self.removed,
            sold: self.sold,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ReservationRow {
    state: String,
    expires_at: i64,
}

/// Back from microseconds.
pub fn from_micros(us: i64) -> OffsetDateTime {
    shopmesh_db::from_micros(us).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn id(uuid: Uuid) -> String {
    uuid.hyphenated().to_string()
}

/// How often a commit or release re-reads a reservation that changed under it before giving up
/// (each retry means another writer finished a move; three in a row does not happen).
const RACE_RETRIES: usize = 3;

impl Store {
    /// A store over this database.
    pub fn new(db: Db) -> Self {
        Store { db }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// One product's stock (zero if it was never stocked).
    pub async fn stock(&self, product_id: Uuid) -> Result<StockLevel, Error> {
        stock_in(self.db.reader(), product_id).await
    }

    /// Several products' stock.
    pub async fn stocks(&self, product_ids: &[Uuid]) -> Result<Vec<StockLevel>, Error> {
        let mut levels = Vec::with_capacity(product_ids.len());
        for product_id in product_ids {
            levels.push(stock_in(self.db.reader(), *product_id).await?);
        }
        Ok(levels)
    }

    /// Every stocked product (for reconciliation).
    pub async fn all_stock(&self) -> Result<Vec<StockLevel>, Error> {
        let rows: Vec<StockRow> = sqlx::query_as(
            "SELECT product_id, on_hand, reserved, added, removed, sold FROM stock \
             ORDER BY product_id",
        )
        .fetch_all(self.db.pool())
        .await?;
        rows.into_iter().map(StockRow::into_level).collect()
    }

    /// Adds units to a product's stock.
    pub async fn add(&self, product_id: Uuid, quantity: Quantity) -> Result<StockLevel, Error> {
        let mut tx = self.db.begin_write().await?;
        add_in(&mut tx, product_id, quantity.get()).await?;
        let level = stock_in(&mut *tx, product_id).await?;
        stock_changed(&mut tx, &level).await?;
        tx.commit().await?;
        Ok(level)
    }

    /// Sets a product's initial stock unless it has some record already (demo seeding).
    pub async fn seed(&self, product_id: Uuid, quantity: Quantity) -> Result<bool, Error> {
        let mut tx = self.db.begin_write().await?;
        let done = sqlx::query(
            "INSERT INTO stock (product_id, on_hand, reserved, added, removed, sold, updated_at) \
             VALUES ($1, $2, 0, $2, 0, 0, $3) ON CONFLICT (product_id) DO NOTHING",
        )
        .bind(id(product_id))
        .bind(quantity.get())
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() > 0 {
            let level = stock_in(&mut *tx, product_id).await?;
            stock_changed(&mut tx, &level).await?;
        }
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Removes units, never below what is reserved.
    pub async fn remove(&self, product_id: Uuid, quantity: Quantity) -> Result<StockLevel, Error> {
        let mut tx = self.db.begin_write().await?;
        let done = sqlx::query(
            "UPDATE stock SET on_hand = on_hand - $1, removed = removed + $1, updated_at = $2 \
             WHERE product_id = $3 AND on_hand - reserved >= $1",
        )
        .bind(quantity.get())
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(id(product_id))
        .execute(&mut *tx)
        .await?;
        let level = stock_in(&mut *tx, product_id).await?;
        if done.rows_affected() == 0 {
            return Err(Error::InsufficientStock {
                field: "quantity".to_owned(),
                product_id,
                available: level.available(),
            });
        }
        stock_changed(&mut tx, &level).await?;
        tx.commit().await?;
        Ok(level)
    }

    /// Holds stock for an order: every line or none. Idempotent by order id.
    pub async fn reserve(
        &self,
        order_id: Uuid,
        lines: &Lines,
        ttl: Ttl,
    ) -> Result<OffsetDateTime, Error> {
        let mut tx = self.db.begin_write().await?;
        let now = OffsetDateTime::now_utc();
        let stamp = micros(now);
        let expires_at = now + ttl.get();
        // The reservation first, unless the order has one: a new order's costs one statement,
        // where a look for it and then an insert were two. (On PostgreSQL a copy of this
        // request in flight makes it wait for that one's outcome.) Everything below that fails
        // rolls it back with the transaction.
        let fresh = sqlx::query(
            "INSERT INTO reservations (order_id, state, expires_at, created_at, updated_at) \
             VALUES ($1, 'held', $2, $3, $3) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(id(order_id))
        .bind(micros(expires_at))
        .bind(stamp)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if !fresh {
            let existing = reservation_in(&mut tx, order_id)
                .await?
                .ok_or_else(|| Error::Internal(anyhow::anyhow!("reservation vanished")))?;
            // A retry or a resumed saga: answer as the first time, or say why not.
            return match existing.0 {
                State::Released => Err(Error::ReservationReleased),
                State::Held | State::Committed => {
                    if lines_in(&mut tx, order_id).await? == expected(lines) {
                        Ok(from_micros(existing.1))
                    } else {
                        Err(Error::ReservationMismatch)
                    }
                }
            };
        }
        // The levels after the change come back with it (`RETURNING`), for the events: one
        // round trip less per line than reading them again.
        let mut levels = Vec::new();
        for line in lines.iter() {
            let level: Option<StockRow> = sqlx::query_as(concat!(
                "UPDATE stock SET reserved = reserved + $1, updated_at = $2 \
                 WHERE product_id = $3 AND on_hand - reserved >= $1 RETURNING ",
                stock_columns!()
            ))
            .bind(line.quantity.get())
            .bind(stamp)
            .bind(id(line.product_id))
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(level) = level {
                levels.push(level.into_level()?);
            } else {
                let available = stock_in(&mut *tx, line.product_id).await?.available();
                // Dropping the transaction rolls back the reservation and the lines already
                // reserved.
                return Err(Error::InsufficientStock {
                    field: format!("lines[{}].quantity", line.position),
                    product_id: line.product_id,
                    available,
                });
            }
        }
        for line in lines.iter() {
            sqlx::query(
                "INSERT INTO reservation_lines (order_id, product_id, quantity) VALUES ($1, $2, $3)",
            )
            .bind(id(order_id))
            .bind(id(line.product_id))
            .bind(line.quantity.get())
            .execute(&mut *tx)
            .await?;
        }
        for level in &levels {
            stock_changed(&mut tx, level).await?;
        }
        tx.commit().await?;
        Ok(from_micros(micros(expires_at)))
    }

    /// Turns an order's held stock into sold stock. Idempotent.
    pub async fn commit(&self, order_id: Uuid) -> Result<(), Error> {
        const SELL: &str = concat!(
            "UPDATE stock SET on_hand = on_hand - $1, reserved = reserved - $1, \
             sold = sold + $1, updated_at = $2 WHERE product_id = $3 RETURNING ",
            stock_columns!()
        );
        for _ in 0..RACE_RETRIES {
            let mut tx = self.db.begin_write().await?;
            let now = micros(OffsetDateTime::now_utc());
            // The common case in one guarded move: a hold, still within its time. Only when
            // it does not apply is the reservation read, to say why.
            let held = sqlx::query(
                "UPDATE reservations SET state = 'committed', updated_at = $1 \
                 WHERE order_id = $2 AND state = 'held' AND expires_at > $1",
            )
            .bind(now)
            .bind(id(order_id))
            .execute(&mut *tx)
            .await?;
            if held.rows_affected() > 0 {
                move_stock(&mut tx, order_id, SELL, now).await?;
                tx.commit().await?;
                return Ok(());
            }
            let (state, expires_at) = reservation_in(&mut tx, order_id)
                .await?
                .ok_or(Error::ReservationNotFound)?;
            match state {
                State::Committed => return Ok(()),
                State::Released => return Err(Error::ReservationReleased),
                // Too late: give the stock back now rather than wait for the sweeper.
                State::Held if expires_at <= now => {
                    if finish_in(&mut tx, order_id, State::Held, now).await? {
                        tx.commit().await?;
                        return Err(Error::ReservationExpired);
                    }
                }
                // Held and in time, yet not moved above: the reservation appeared after
                // that statement (a `reserve` racing this commit, on PostgreSQL). Look again.
                State::Held => {}
            }
            // Someone else moved the reservation meanwhile: look again.
        }
        Err(Error::Internal(anyhow::anyhow!(
            "reservation {order_id} kept changing under a commit"
        )))
    }

    /// Gives an order's stock back (held: freed; committed: restocked). Idempotent. An order
    /// never reserved is recorded as released, so a late `reserve` for it is refused.
    pub async fn release(&self, order_id: Uuid) -> Result<(), Error> {
        for _ in 0..RACE_RETRIES {
            let mut tx = self.db.begin_write().await?;
            let now = micros(OffsetDateTime::now_utc());
            match reservation_in(&mut tx, order_id).await? {
                None => {
                    let tombstone = sqlx::query(
                        "INSERT INTO reservations (order_id, state, expires_at, created_at, updated_at) \
                         VALUES ($1, 'released', $2, $2, $2)",
                    )
                    .bind(id(order_id))
                    .bind(now)
                    .execute(&mut *tx)
                    .await;
                    match tombstone {
                        Ok(_) => {
                            tx.commit().await?;
                            return Ok(());
                        }
                        // A reservation for it appeared meanwhile: look again.
                        Err(e) if is_unique_violation(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Some((State::Released, _)) => return Ok(()),
                Some((state, _)) => {
                    if finish_in(&mut tx, order_id, state, now).await? {
                        tx.commit().await?;
                        return Ok(());
                    }
                }
            }
        }
        Err(Error::Internal(anyhow::anyhow!(
            "reservation {order_id} kept changing under a release"
        )))
    }

    /// Orders whose hold ran out, oldest first.
    pub async fn expired(&self, limit: i64) -> Result<Vec<Uuid>, Error> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT order_id FROM reservations WHERE state = 'held' AND expires_at <= $1 \
             ORDER BY expires_at LIMIT $2",
        )
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id,)| Uuid::parse_str(&id).ok())
            .collect())
    }

    /// Orders whose hold expired more than `grace` ago and is still held (for reconciliation:
    /// the sweeper should have released them).
    pub async fn overdue_holds(&self, grace: std::time::Duration) -> Result<Vec<Uuid>, Error> {
        let cutoff = OffsetDateTime::now_utc() - grace;
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT order_id FROM reservations WHERE state = 'held' AND expires_at <= $1 \
             ORDER BY order_id",
        )
        .bind(micros(cutoff))
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id,)| Uuid::parse_str(&id).ok())
            .collect())
    }

    /// Releases an order's hold if it is still held and has run out (a commit may have won).
    pub async fn release_if_expired(&self, order_id: Uuid) -> Result<bool, Error> {
        let mut tx = self.db.begin_write().await?;
        let now = micros(OffsetDateTime::now_utc());
        match reservation_in(&mut tx, order_id).await? {
            Some((State::Held, expires_at))
                if expires_at <= now && finish_in(&mut tx, order_id, State::Held, now).await? =>
            {
                tx.commit().await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

fn expected(lines: &Lines) -> Vec<(String, i64)> {
    lines
        .iter()
        .map(|l| (id(l.product_id), l.quantity.get()))
        .collect()
}

/// One product's stock, read on `on` (a reader, or a transaction's connection).
async fn stock_in<'e>(
    on: impl sqlx::Executor<'e, Database = sqlx::Any>,
    product_id: Uuid,
) -> Result<StockLevel, Error> {
    let row: Option<StockRow> = sqlx::query_as(
        "SELECT product_id, on_hand, reserved, added, removed, sold FROM stock WHERE product_id = $1",
    )
    .bind(id(product_id))
    .fetch_optional(on)
    .await?;
    match row {
        Some(row) => row.into_level(),
        None => Ok(StockLevel::empty(product_id)),
    }
}

async fn add_in(tx: &mut shopmesh_db::Tx, product_id: Uuid, quantity: i64) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO stock (product_id, on_hand, reserved, added, removed, sold, updated_at) \
         VALUES ($1, $2, 0, $2, 0, 0, $3) \
         ON CONFLICT (product_id) DO UPDATE SET on_hand = stock.on_hand + $2, \
         added = stock.added + $2, updated_at = $3",
    )
    .bind(id(product_id))
    .bind(quantity)
    .bind(micros(OffsetDateTime::now_utc()))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn reservation_in(
    tx: &mut shopmesh_db::Tx,
    order_id: Uuid,
) -> Result<Option<(State, i64)>, Error> {
    let row: Option<ReservationRow> =
        sqlx::query_as("SELECT state, expires_at FROM reservations WHERE order_id = $1")
            .bind(id(order_id))
            .fetch_optional(&mut **tx)
            .await?;
    row.map(|r| {
        let state = State::parse(&r.state)
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("bad stored state {}", r.state)))?;
        Ok((state, r.expires_at))
    })
    .transpose()
}

async fn lines_in(tx: &mut shopmesh_db::Tx, order_id: Uuid) -> Result<Vec<(String, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT product_id, quantity FROM reservation_lines WHERE order_id = $1 \
         ORDER BY product_id",
    )
    .bind(id(order_id))
    .fetch_all(&mut **tx)
    .await?)
}

/// Moves a reservation from `from` to `to` if it is still in `from`; whether it did. This
/// guarded update is what makes concurrent commits and releases safe: on PostgreSQL the row
/// lock makes a second writer wait and then find the state changed (a plain SELECT of the state
/// would let both go on and move the stock twice).
async fn transition(
    tx: &mut shopmesh_db::Tx,
    order_id: Uuid,
    from: State,
    to: State,
    now: i64,
) -> Result<bool, Error> {
    let done = sqlx::query(
        "UPDATE reservations SET state = $1, updated_at = $2 WHERE order_id = $3 AND state = $4",
    )
    .bind(to.as_str())
    .bind(now)
    .bind(id(order_id))
    .bind(from.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Marks a held or committed reservation released and gives its stock back; `false` (and
/// nothing done) if it was no longer in `from`.
async fn finish_in(
    tx: &mut shopmesh_db::Tx,
    order_id: Uuid,
    from: State,
    now: i64,
) -> Result<bool, Error> {
    let sql = match from {
        State::Held => concat!(
            "UPDATE stock SET reserved = reserved - $1, updated_at = $2 WHERE product_id = $3 \
             RETURNING ",
            stock_columns!()
        ),
        State::Committed => concat!(
            "UPDATE stock SET on_hand = on_hand + $1, sold = sold - $1, updated_at = $2 \
             WHERE product_id = $3 RETURNING ",
            stock_columns!()
        ),
        State::Released => return Ok(false),
    };
    if !transition(tx, order_id, from, State::Released, now).await? {
        return Ok(false);
    }
    move_stock(tx, order_id, sql, now).await?;
    Ok(true)
}

/// Applies `sql` (an update of one product's stock by `$1` units at `$2`, `RETURNING` its
/// levels) to each line of the reservation, and writes `stock.changed` with the levels it
/// returns: in the caller's transaction.
async fn move_stock(
    tx: &mut shopmesh_db::Tx,
    order_id: Uuid,
    sql: &'static str,
    now: i64,
) -> Result<(), Error> {
    for (product_id, quantity) in lines_in(tx, order_id).await? {
        let row: Option<StockRow> = sqlx::query_as(sql)
            .bind(quantity)
            .bind(now)
            .bind(&product_id)
            .fetch_optional(&mut **tx)
            .await?;
        let level = match row {
            Some(row) => row.into_level()?,
            // No stock row (never stocked): nothing moved; the event says so, as before.
            None => StockLevel::empty(Uuid::parse_str(&product_id).map_err(|_| {
                Error::Internal(anyhow::anyhow!("a stored product id is malformed"))
            })?),
        };
        stock_changed(tx, &level).await?;
    }
    Ok(())
}

/// Writes `stock.changed` with the product's levels after the change, in the change's
/// transaction. Consumers keep the latest by position (the catalog shows availability in lists).
async fn stock_changed(conn: &mut shopmesh_db::TxConn, level: &StockLevel) -> Result<(), Error> {
    let event = shopmesh_events::Event::of(&shopmesh_contracts::StockChanged {
        product_id: level.product_id,
        available: level.available(),
        reserved: level.reserved,
        on_hand: level.on_hand,
        sold: level.sold,
    })
    .map_err(|e| Error::Internal(e.into()))?;
    shopmesh_events::outbox::append(conn, &event, None).await?;
    Ok(())
}
