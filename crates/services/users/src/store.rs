//! SQL for the users service. Portable between SQLite and PostgreSQL (see shopmesh-db).

use anyhow::Context;
use shopmesh_db::Db;
use shopmesh_db::{is_unique_violation, micros};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{Email, Role, User, UserName};
use crate::error::Error;

/// The users database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: String,
    email: String,
    name: String,
    role: String,
    created_at: i64,
}

#[derive(sqlx::FromRow)]
struct CredentialRow {
    #[sqlx(flatten)]
    user: UserRow,
    password_hash: String,
}

/// The columns of [`UserRow`], as a literal so queries stay static strings.
macro_rules! user_columns {
    () => {
        "id, email, name, role, created_at"
    };
}

fn from_micros(us: i64) -> Result<OffsetDateTime, Error> {
    shopmesh_db::from_micros(us)
        .context("stored timestamp out of range")
        .map_err(Error::Internal)
}

impl UserRow {
    fn into_user(self) -> Result<User, Error> {
        let corrupt = |what: &str| Error::Internal(anyhow::anyhow!("stored user has a bad {what}"));
        Ok(User {
            id: Uuid::parse_str(&self.id).map_err(|_| corrupt("id"))?,
            email: Email::parse(&self.email).map_err(|_| corrupt("email"))?,
            name: UserName::parse(&self.name).map_err(|_| corrupt("name"))?,
            role: Role::parse(&self.role).ok_or_else(|| corrupt("role"))?,
            created_at: from_micros(self.created_at)?,
        })
    }
}

/// What `upsert_admin` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOutcome {
    /// A new admin account was created.
    Created,
    /// An existing account became admin (and took the given password).
    Promoted,
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

    /// Inserts a new account; [`Error::EmailTaken`] if the e-mail is registered.
    pub async fn insert_user(
        &self,
        email: &Email,
        name: &UserName,
        password_hash: &str,
        role: Role,
    ) -> Result<User, Error> {
        let now = OffsetDateTime::now_utc();
        let id = Uuid::now_v7();
        // The account and its `user.registered` event commit together or not at all.
        let mut tx = self.db.begin_write().await?;
        let result = sqlx::query(
            "INSERT INTO users (id, email, name, password_hash, role, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(id.hyphenated().to_string())
        .bind(email.as_str())
        .bind(name.as_str())
        .bind(password_hash)
        .bind(role.as_str())
        .bind(micros(now))
        .execute(&mut *tx)
        .await;
        let result = match result {
            Ok(_) => {
                let event = shopmesh_events::Event::of(&shopmesh_contracts::UserRegistered {
                    user_id: id,
                    email: email.as_str().to_owned(),
                    name: name.as_str().to_owned(),
                    role: role.as_str().to_owned(),
                })
                .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                match shopmesh_events::outbox::append(&mut tx, &event, None).await {
                    Ok(_) => tx.commit().await,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => Ok(User {
                id,
                email: email.clone(),
                name: name.clone(),
                role,
                // What was stored: microsecond precision.
                created_at: from_micros(micros(now))?,
            }),
            Err(e) if is_unique_violation(&e) => Err(Error::EmailTaken),
            Err(e) => Err(e.into()),
        }
    }

    /// The account and password hash for an e-mail.
    pub async fn credentials(&self, email: &Email) -> Result<Option<(User, String)>, Error> {
        let row: Option<CredentialRow> = sqlx::query_as(concat!(
            "SELECT ",
            user_columns!(),
            ", password_hash FROM users WHERE email = $1"
        ))
        .bind(email.as_str())
        .fetch_optional(self.db.reader())
        .await?;
        row.map(|r| Ok((r.user.into_user()?, r.password_hash)))
            .transpose()
    }

    /// One account by id.
    pub async fn user(&self, id: Uuid) -> Result<Option<User>, Error> {
        let row: Option<UserRow> = sqlx::query_as(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE id = $1"
        ))
        .bind(id.hyphenated().to_string())
        .fetch_optional(self.db.reader())
        .await?;
        row.map(UserRow::into_user).transpose()
    }

    /// Accounts in creation order (ids are UUIDv7), after the cursor, at most `limit`.
    pub async fn users(&self, after: Option<Uuid>, limit: u32) -> Result<Vec<User>, Error> {
        let rows: Vec<UserRow> = sqlx::query_as(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(
            after
                .map(|id| id.hyphenated().to_string())
                .unwrap_or_default(),
        )
        .bind(i64::from(limit))
        .fetch_all(self.db.reader())
        .await?;
        rows.into_iter().map(UserRow::into_user).collect()
    }

    /// Makes `email` an admin with this password: creates the account, or promotes it.
    pub async fn upsert_admin(
        &self,
        email: &Email,
        name: &UserName,
        password_hash: &str,
    ) -> Result<AdminOutcome, Error> {
        match self
            .insert_user(email, name, password_hash, Role::Admin)
            .await
        {
            Ok(_) => Ok(AdminOutcome::Created),
            Err(Error::EmailTaken) => {
                let now = micros(OffsetDateTime::now_utc());
                sqlx::query(
                    "UPDATE users SET role = 'admin', password_hash = $1, updated_at = $2 \
                     WHERE email = $3",
                )
                .bind(password_hash)
                .bind(now)
                .bind(email.as_str())
                .execute(self.db.pool())
                .await?;
                Ok(AdminOutcome::Promoted)
            }
            Err(e) => Err(e),
        }
    }

    /// Stored signing keys `(kid, base64 private key)`, oldest first.
    pub async fn signing_keys(&self) -> Result<Vec<(String, String)>, Error> {
        Ok(
            sqlx::query_as("SELECT kid, private_key FROM signing_keys ORDER BY created_at, kid")
                .fetch_all(self.db.pool())
                .await?,
        )
    }

    /// Stores a signing key (a no-op if the same key is already there).
    pub async fn insert_signing_key(&self, kid: &str, private_key: &str) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO signing_keys (kid, private_key, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (kid) DO NOTHING",
        )
        .bind(kid)
        .bind(private_key)
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(self.db.pool())
        .await?;
        Ok(())
    }
}
