//! SQL for notifications. Portable between SQLite and PostgreSQL. The writes run in the event
//! handler's transaction (the consumer's inbox entry is in it too); the reads are the admin
//! views'.

use shopmesh_db::{Db, TxConn, now_micros};
use uuid::Uuid;

/// A customer as `user.registered` told it (kept so order e-mails can be addressed).
pub async fn remember_customer(
    tx: &mut TxConn,
    user_id: Uuid,
    email: &str,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO customers (user_id, email, name) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, name = excluded.name",
    )
    .bind(user_id.hyphenated().to_string())
    .bind(email)
    .bind(name)
    .execute(tx)
    .await?;
    Ok(())
}

/// A customer's (e-mail, name), if their registration has arrived.
pub async fn customer(
    tx: &mut TxConn,
    user_id: Uuid,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT email, name FROM customers WHERE user_id = $1")
        .bind(user_id.hyphenated().to_string())
        .fetch_optional(tx)
        .await
}

/// A message as it went out: for the event it answers, to whom, where it went besides the
/// database (`smtp:<Message-ID>`, a file's path, or `""`) and its RFC 5322 text.
pub struct Sent<'a> {
    pub event_id: Uuid,
    pub kind: &'a str,
    pub to: &'a str,
    pub subject: &'a str,
    pub went: &'a str,
    pub text: &'a str,
}

/// Records a message sent (once per event: the event id is the key).
pub async fn record(tx: &mut TxConn, sent: &Sent<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO notifications (event_id, type, recipient, subject, file, message, \
         created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(sent.event_id.hyphenated().to_string())
    .bind(sent.kind)
    .bind(sent.to)
    .bind(sent.subject)
    .bind(sent.went)
    .bind(sent.text)
    .bind(now_micros())
    .execute(tx)
    .await?;
    Ok(())
}

/// One row of the admins' list.
pub struct Listed {
    pub event_id: String,
    pub kind: String,
    pub to: String,
    pub subject: String,
    /// Where it went besides the database (`""`: nowhere).
    pub went: String,
    /// Microseconds since the epoch.
    pub created_at: i64,
    /// Its text is kept (rows from before texts were kept have none).
    pub kept: bool,
}

/// The most recent `limit` messages, newest first.
pub async fn recent(db: &Db, limit: i64) -> Result<Vec<Listed>, sqlx::Error> {
    let rows: Vec<(String, String, String, String, String, i64, i64)> = sqlx::query_as(
        "SELECT event_id, type, recipient, subject, file, created_at, \
                CASE WHEN message IS NULL THEN 0 ELSE 1 END FROM notifications \
         ORDER BY created_at DESC, event_id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db.reader())
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(event_id, kind, to, subject, went, created_at, kept)| Listed {
                event_id,
                kind,
                to,
                subject,
                went,
                created_at,
                kept: kept != 0,
            },
        )
        .collect())
}

/// The text of the message answering `event_id`: `None` for no such message, `Some(None)`
/// for one recorded before texts were kept.
pub async fn text(db: &Db, event_id: &str) -> Result<Option<Option<String>>, sqlx::Error> {
    sqlx::query_scalar("SELECT message FROM notifications WHERE event_id = $1")
        .bind(event_id)
        .fetch_optional(db.reader())
        .await
}
