//! SQL for carts. Portable between SQLite and PostgreSQL.

use shopmesh_db::{Db, now_micros};
use uuid::Uuid;

use crate::domain::{MAX_LINES, MAX_QUANTITY, Quantity};
use crate::error::Error;

/// The carts database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

fn id(uuid: Uuid) -> String {
    uuid.hyphenated().to_string()
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

    /// A customer's lines, oldest first.
    pub async fn lines(&self, user: Uuid) -> Result<Vec<(Uuid, i64)>, Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT product_id, quantity FROM cart_lines WHERE user_id = $1 \
             ORDER BY added_at, product_id",
        )
        .bind(id(user))
        .fetch_all(self.db.reader())
        .await?;
        rows.into_iter()
            .map(|(p, q)| {
                Uuid::parse_str(&p)
                    .map(|p| (p, q))
                    .map_err(|_| Error::Internal(anyhow::anyhow!("stored cart line has a bad id")))
            })
            .collect()
    }

    /// Adds units of a product (to a line already there, or as a new line). One upsert, with
    /// the per-line cap in its condition, so concurrent adds neither collide nor exceed it.
    pub async fn add(&self, user: Uuid, product: Uuid, quantity: Quantity) -> Result<(), Error> {
        let mut tx = self.db.begin_write().await?;
        let (lines,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM cart_lines WHERE user_id = $1 AND product_id <> $2",
        )
        .bind(id(user))
        .bind(id(product))
        .fetch_one(&mut *tx)
        .await?;
        if lines >= MAX_LINES {
            return Err(Error::CartFull);
        }
        let done = sqlx::query(
            "INSERT INTO cart_lines (user_id, product_id, quantity, added_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_id, product_id) DO UPDATE \
             SET quantity = cart_lines.quantity + excluded.quantity \
             WHERE cart_lines.quantity + excluded.quantity <= $5",
        )
        .bind(id(user))
        .bind(id(product))
        .bind(quantity.get())
        .bind(now_micros())
        .bind(MAX_QUANTITY)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::TooMany);
        }
        tx.commit().await?;
        Ok(())
    }

    /// Sets a line's quantity; [`Error::NotInCart`] if the product is not in the cart.
    pub async fn set(&self, user: Uuid, product: Uuid, quantity: Quantity) -> Result<(), Error> {
        let done = sqlx::query(
            "UPDATE cart_lines SET quantity = $1 WHERE user_id = $2 AND product_id = $3",
        )
        .bind(quantity.get())
        .bind(id(user))
        .bind(id(product))
        .execute(self.db.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotInCart);
        }
        Ok(())
    }

    /// Removes a product's line (nothing if it is not there).
    pub async fn remove(&self, user: Uuid, product: Uuid) -> Result<(), Error> {
        sqlx::query("DELETE FROM cart_lines WHERE user_id = $1 AND product_id = $2")
            .bind(id(user))
            .bind(id(product))
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// Empties the cart.
    pub async fn clear(&self, user: Uuid) -> Result<(), Error> {
        sqlx::query("DELETE FROM cart_lines WHERE user_id = $1")
            .bind(id(user))
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// Removes these lines where their quantity is still the given one.
    pub async fn remove_lines(&self, user: Uuid, lines: &[(Uuid, i64)]) -> Result<(), Error> {
        let mut tx = self.db.begin_write().await?;
        for (product, quantity) in lines {
            sqlx::query(
                "DELETE FROM cart_lines WHERE user_id = $1 AND product_id = $2 AND quantity = $3",
            )
            .bind(id(user))
            .bind(id(*product))
            .bind(*quantity)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
