//! SQLite on the caller's thread: the services' sqlx queries, run by rusqlite inline.
//!
//! sqlx runs each SQLite connection on a thread of its own and sends every statement there
//! and its rows back over channels: two thread wake-ups per statement. On the purchase path that
//! hand-off was most of a statement's cost: a write transaction (`BEGIN IMMEDIATE`, an update,
//! an insert, `COMMIT`) took 97 µs of CPU through sqlx's `Any` pool and 25 µs through rusqlite
//! on the calling thread, a point read 29 µs against 4 µs (`examples/sqlite_paths.rs`, one
//! core; bench/README, "The SQLite driver"). SQLite's own work on a local file is a few
//! microseconds, so it runs here without leaving the async task.
//!
//! The stores keep writing sqlx queries (`sqlx::query(..).bind(..)`, `query_as` into
//! `FromRow` types), and the same queries run on PostgreSQL through sqlx: [`Pool`] and
//! [`TxConn`] implement `sqlx::Executor` for the `Any` database and take the SQL and the bound
//! arguments out of the query; rows come back as `AnyRow`s. That uses `Any`'s
//! `#[doc(hidden)]` fields (its arguments, rows and values), which sqlx does not cover by
//! semver: the workspace pins sqlx to one version (`=0.9.0`), and this module's tests decode
//! every kind of value the stores use.
//!
//! Waiting: a connection here never sleeps in SQLite's busy handler (which would stop the
//! whole runtime thread): it is opened with no busy timeout, and a statement that finds the
//! database locked (another process writing the same file: replicas, `shopmesh admin`) is
//! retried after an async sleep, for up to [`BUSY_WAIT`]. Writers of one process queue on an
//! async mutex instead.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags};
use sqlx::any::{
    Any, AnyArguments, AnyQueryResult, AnyRow, AnyTypeInfo, AnyTypeInfoKind, AnyValue,
};
use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::{Either, Execute};
use sqlx_core::any::{AnyColumn, AnyValueKind};
use sqlx_core::ext::ustr::UStr;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// How long a statement waits for another process's write to end before failing as busy
/// (what `busy_timeout` was on sqlx's connections).
pub const BUSY_WAIT: Duration = Duration::from_secs(5);

/// Statements each connection keeps prepared (a service has a few dozen).
const STATEMENT_CACHE: usize = 128;

/// The one writing connection of a process.
#[derive(Debug)]
pub(crate) struct Writer {
    conn: Arc<Mutex<Connection>>,
    /// How long a caller waits for the writer before failing (`database.acquire_timeout_secs`,
    /// as for a pooled connection).
    acquire_timeout: Duration,
}

/// Read-only connections; a read takes whichever is free.
#[derive(Debug)]
pub(crate) struct Readers {
    conns: Vec<SyncMutex<Connection>>,
    next: AtomicUsize,
}

fn open(path: &Path, read_only: bool) -> Result<Connection, sqlx::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(error)?;
    // No busy timeout: see the module's doc (the wait is async, in `retrying`).
    conn.busy_timeout(Duration::ZERO).map_err(error)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
    )
    .map_err(error)?;
    if read_only {
        // A write sent to a reader fails loudly instead of contending.
        conn.execute_batch("PRAGMA query_only = ON;")
            .map_err(error)?;
    }
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

impl Writer {
    pub(crate) fn open(path: &Path, acquire_timeout: Duration) -> Result<Writer, sqlx::Error> {
        Ok(Writer {
            conn: Arc::new(Mutex::new(open(path, false)?)),
            acquire_timeout,
        })
    }

    /// The writer, once the transaction or statement holding it is over.
    async fn acquire(&self) -> Result<OwnedMutexGuard<Connection>, sqlx::Error> {
        if let Ok(conn) = self.conn.clone().try_lock_owned() {
            return Ok(conn);
        }
        tokio::time::timeout(self.acquire_timeout, self.conn.clone().lock_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }

    /// Begins a write transaction (`BEGIN IMMEDIATE`), holding the writer until it ends.
    pub(crate) async fn begin(&self) -> Result<Tx, sqlx::Error> {
        let mut conn = self.acquire().await?;
        let begin: &mut Connection = &mut conn;
        retrying(move || begin.execute_batch("BEGIN IMMEDIATE").map_err(error)).await?;
        Ok(Tx(TxConn(TxKind::Inline(InlineTx { conn, open: true }))))
    }
}

impl Readers {
    pub(crate) fn open(path: &Path, n: usize) -> Result<Readers, sqlx::Error> {
        Ok(Readers {
            conns: (0..n.max(1))
                .map(|_| open(path, true).map(SyncMutex::new))
                .collect::<Result<_, _>>()?,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on a free reader (or, all being taken by other threads, the next in turn).
    fn with<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.conns.len();
        for i in 0..n {
            if let Ok(conn) = self.conns[(start + i) % n].try_lock() {
                return f(&conn);
            }
        }
        let conn = self.conns[start % n]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&conn)
    }
}

/// Retries `op` while the database is locked by another process, sleeping (async) in between.
async fn retrying<T>(mut op: impl FnMut() -> Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
    let until = tokio::time::Instant::now() + BUSY_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        match op() {
            Err(e) if is_busy(&e) && tokio::time::Instant::now() < until => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn is_busy(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
    if db.try_downcast_ref::<SqliteError>().is_some_and(|e| {
        matches!(e.code & 0xff, rusqlite::ffi::SQLITE_BUSY | rusqlite::ffi::SQLITE_LOCKED)
    }))
}

/// What a statement gave: its rows, then its summary.
type Outcome = (Vec<AnyRow>, AnyQueryResult);

/// Runs one statement with its arguments (`$n` refers to the n-th bound value, wherever it
/// appears, as sqlx binds it), collecting every row.
fn run(conn: &Connection, sql: &str, args: Option<&AnyArguments>) -> Result<Outcome, sqlx::Error> {
    let mut stmt = conn.prepare_cached(sql).map_err(error)?;
    let values: &[AnyValueKind] = args.map_or(&[], |a| &a.values.0);
    for i in 1..=stmt.parameter_count() {
        let index = stmt
            .parameter_name(i)
            .and_then(|name| name.strip_prefix('$').or_else(|| name.strip_prefix('?')))
            .and_then(|n| n.parse::<usize>().ok())
            .map_or(i - 1, |n| n.saturating_sub(1));
        let value = values.get(index).ok_or_else(|| {
            sqlx::Error::Protocol(format!(
                "statement has parameter {i} but {} values were bound: {sql}",
                values.len()
            ))
        })?;
        let value = match value {
            AnyValueKind::Null(_) => ValueRef::Null,
            AnyValueKind::Bool(b) => ValueRef::Integer(i64::from(*b)),
            AnyValueKind::SmallInt(n) => ValueRef::Integer(i64::from(*n)),
            AnyValueKind::Integer(n) => ValueRef::Integer(i64::from(*n)),
            AnyValueKind::BigInt(n) => ValueRef::Integer(*n),
            AnyValueKind::Real(x) => ValueRef::Real(f64::from(*x)),
            AnyValueKind::Double(x) => ValueRef::Real(*x),
            AnyValueKind::Text(s) => ValueRef::Text(s.as_bytes()),
            AnyValueKind::TextSlice(s) => ValueRef::Text(s.as_bytes()),
            AnyValueKind::Blob(b) => ValueRef::Blob(b),
            other => {
                return Err(sqlx::Error::Protocol(format!(
                    "cannot bind {other:?} on SQLite"
                )));
            }
        };
        stmt.raw_bind_parameter(i, ToSqlOutput::Borrowed(value))
            .map_err(error)?;
    }
    let columns = stmt.column_count();
    let names: Vec<UStr> = (0..columns)
        .map(|c| UStr::new(stmt.column_name(c).unwrap_or_default()))
        .collect();
    let readonly = stmt.readonly();
    let mut out = Vec::new();
    {
        let mut rows = stmt.raw_query();
        let mut index: Option<Arc<sqlx_core::HashMap<UStr, usize>>> = None;
        while let Some(row) = rows.next().map_err(error)? {
            let mut values = Vec::with_capacity(columns);
            for c in 0..columns {
                values.push(AnyValue {
                    kind: match row.get_ref(c).map_err(error)? {
                        ValueRef::Null => AnyValueKind::Null(AnyTypeInfoKind::Null),
                        ValueRef::Integer(n) => AnyValueKind::BigInt(n),
                        ValueRef::Real(x) => AnyValueKind::Double(x),
                        ValueRef::Text(t) => AnyValueKind::Text(Arc::new(
                            String::from_utf8(t.to_vec())
                                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                        )),
                        ValueRef::Blob(b) => AnyValueKind::Blob(Arc::new(b.to_vec())),
                    },
                });
            }
            let column_names = index
                .get_or_insert_with(|| {
                    Arc::new(
                        names
                            .iter()
                            .cloned()
                            .enumerate()
                            .map(|(i, n)| (n, i))
                            .collect(),
                    )
                })
                .clone();
            out.push(AnyRow {
                column_names,
                columns: names
                    .iter()
                    .enumerate()
                    .zip(&values)
                    .map(|((ordinal, name), value)| AnyColumn {
                        ordinal,
                        name: name.clone(),
                        type_info: AnyTypeInfo {
                            kind: kind_of(&value.kind),
                        },
                    })
                    .collect(),
                values,
            });
        }
    }
    let rows_affected = if readonly { 0 } else { conn.changes() };
    Ok((
        out,
        AnyQueryResult {
            rows_affected,
            last_insert_id: Some(conn.last_insert_rowid()),
        },
    ))
}

fn kind_of(value: &AnyValueKind) -> AnyTypeInfoKind {
    match value {
        AnyValueKind::BigInt(_) => AnyTypeInfoKind::BigInt,
        AnyValueKind::Double(_) => AnyTypeInfoKind::Double,
        AnyValueKind::Text(_) => AnyTypeInfoKind::Text,
        AnyValueKind::Blob(_) => AnyTypeInfoKind::Blob,
        _ => AnyTypeInfoKind::Null,
    }
}

/// A query's SQL and arguments, taken out of it.
fn take<'q, E: Execute<'q, Any>>(
    mut query: E,
) -> Result<(sqlx::SqlStr, Option<AnyArguments>), sqlx::Error> {
    let args = query.take_arguments().map_err(sqlx::Error::Encode)?;
    Ok((query.sql(), args))
}

fn stream_of<'e>(
    outcome: Result<Outcome, sqlx::Error>,
) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>> {
    match outcome {
        Ok((rows, done)) => stream::iter(
            rows.into_iter()
                .map(|r| Ok(Either::Right(r)))
                .chain(std::iter::once(Ok(Either::Left(done)))),
        )
        .boxed(),
        Err(e) => stream::once(async move { Err(e) }).boxed(),
    }
}

/// Where a service's statements go: [`crate::Db::pool`] (writes) and [`crate::Db::reader`]
/// (reads). Use it as sqlx's executor: `sqlx::query(..).execute(db.pool())`.
#[derive(Debug, Clone)]
pub struct Pool(pub(crate) PoolKind);

#[derive(Debug, Clone)]
pub(crate) enum PoolKind {
    /// PostgreSQL, or an in-memory SQLite database: sqlx's pool.
    Sqlx(sqlx::AnyPool),
    /// The SQLite writer, on the caller's thread.
    Writer(Arc<Writer>),
    /// SQLite readers, on the caller's thread.
    Readers(Arc<Readers>),
}

impl Pool {
    async fn run(&self, sql: &str, args: Option<&AnyArguments>) -> Result<Outcome, sqlx::Error> {
        match &self.0 {
            PoolKind::Writer(writer) => {
                let mut guard = writer.acquire().await?;
                // A unique borrow, so the future stays `Send` (a connection is not `Sync`).
                let conn: &mut Connection = &mut guard;
                retrying(move || run(conn, sql, args)).await
            }
            PoolKind::Readers(readers) => retrying(|| readers.with(|c| run(c, sql, args))).await,
            // Not reached: `Executor` hands sqlx's pools their queries before this.
            PoolKind::Sqlx(_) => Err(unsupported("an inline run on sqlx's pool")),
        }
    }
}

impl<'c> sqlx::Executor<'c> for &'c Pool {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        if let PoolKind::Sqlx(pool) = &self.0 {
            return pool.fetch_many(query);
        }
        let taken = take(query);
        stream::once(async move {
            let outcome = match taken {
                Ok((sql, args)) => self.run(sql.as_str(), args.as_ref()).await,
                Err(e) => Err(e),
            };
            stream_of(outcome)
        })
        .flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        if let PoolKind::Sqlx(pool) = &self.0 {
            return pool.fetch_optional(query);
        }
        let taken = take(query);
        Box::pin(async move {
            let (sql, args) = taken?;
            let (rows, _) = self.run(sql.as_str(), args.as_ref()).await?;
            Ok(rows.into_iter().next())
        })
    }

    fn prepare_with<'e>(
        self,
        sql: sqlx::SqlStr,
        parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<sqlx::any::AnyStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        match &self.0 {
            PoolKind::Sqlx(pool) => pool.prepare_with(sql, parameters),
            _ => Box::pin(async { Err(unsupported("prepare")) }),
        }
    }

    fn describe<'e>(
        self,
        sql: sqlx::SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Any>, sqlx::Error>>
    where
        'c: 'e,
    {
        match &self.0 {
            PoolKind::Sqlx(pool) => pool.describe(sql),
            _ => Box::pin(async { Err(unsupported("describe")) }),
        }
    }
}

fn unsupported(what: &str) -> sqlx::Error {
    sqlx::Error::AnyDriverError(format!("{what} is not supported on shopmesh's SQLite path").into())
}

/// An open write transaction (see [`crate::Db::begin_write`]). Statements run on it through
/// `&mut *tx`; [`Tx::commit`] ends it, and dropping it uncommitted rolls it back.
#[derive(Debug)]
pub struct Tx(pub(crate) TxConn);

/// The connection of a [`Tx`]: what `&mut *tx` gives to sqlx's `execute`/`fetch_*`.
#[derive(Debug)]
pub struct TxConn(pub(crate) TxKind);

#[derive(Debug)]
pub(crate) enum TxKind {
    Sqlx(sqlx::Transaction<'static, Any>),
    Inline(InlineTx),
}

/// The SQLite writer, held for one transaction.
#[derive(Debug)]
pub(crate) struct InlineTx {
    conn: OwnedMutexGuard<Connection>,
    /// Not yet committed or rolled back.
    open: bool,
}

impl Drop for InlineTx {
    fn drop(&mut self) {
        if self.open {
            // A transaction dropped before its commit (an error, a cancelled request): undo.
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                log::warn!("rolling back an abandoned transaction failed: {e}");
            }
        }
    }
}

impl std::ops::Deref for Tx {
    type Target = TxConn;
    fn deref(&self) -> &TxConn {
        &self.0
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut TxConn {
        &mut self.0
    }
}

impl Tx {
    pub(crate) fn sqlx(tx: sqlx::Transaction<'static, Any>) -> Tx {
        Tx(TxConn(TxKind::Sqlx(tx)))
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self.0.0 {
            TxKind::Sqlx(tx) => tx.commit().await,
            TxKind::Inline(mut tx) => {
                // In WAL mode a writer holding the lock commits without waiting on others.
                tx.conn.execute_batch("COMMIT").map_err(error)?;
                tx.open = false;
                Ok(())
            }
        }
    }

    /// Rolls back (what dropping it does too).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self.0.0 {
            TxKind::Sqlx(tx) => tx.rollback().await,
            TxKind::Inline(mut tx) => {
                tx.open = false;
                tx.conn.execute_batch("ROLLBACK").map_err(error)
            }
        }
    }
}

impl<'c> sqlx::Executor<'c> for &'c mut TxConn {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match &mut self.0 {
            TxKind::Sqlx(tx) => (&mut **tx).fetch_many(query),
            TxKind::Inline(tx) => {
                let outcome =
                    take(query).and_then(|(sql, args)| run(&tx.conn, sql.as_str(), args.as_ref()));
                stream_of(outcome)
            }
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match &mut self.0 {
            TxKind::Sqlx(tx) => (&mut **tx).fetch_optional(query),
            TxKind::Inline(tx) => {
                let outcome = take(query)
                    .and_then(|(sql, args)| run(&tx.conn, sql.as_str(), args.as_ref()))
                    .map(|(rows, _)| rows.into_iter().next());
                Box::pin(async move { outcome })
            }
        }
    }

    fn prepare_with<'e>(
        self,
        sql: sqlx::SqlStr,
        parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<sqlx::any::AnyStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        match &mut self.0 {
            TxKind::Sqlx(tx) => (&mut **tx).prepare_with(sql, parameters),
            TxKind::Inline(_) => Box::pin(async { Err(unsupported("prepare")) }),
        }
    }

    fn describe<'e>(
        self,
        sql: sqlx::SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Any>, sqlx::Error>>
    where
        'c: 'e,
    {
        match &mut self.0 {
            TxKind::Sqlx(tx) => (&mut **tx).describe(sql),
            TxKind::Inline(_) => Box::pin(async { Err(unsupported("describe")) }),
        }
    }
}

/// An SQLite error, as sqlx's callers expect a database's (`kind()` tells a unique violation).
#[derive(Debug)]
pub(crate) struct SqliteError {
    code: i32,
    message: String,
}

impl std::fmt::Display for SqliteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for SqliteError {}

impl DatabaseError for SqliteError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(self.code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        use rusqlite::ffi;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// rusqlite's error as sqlx's: SQLite's own failures as database errors (with the extended
/// code), the rest as driver errors.
fn error(e: rusqlite::Error) -> sqlx::Error {
    match e {
        rusqlite::Error::SqliteFailure(failure, message) => {
            sqlx::Error::Database(Box::new(SqliteError {
                code: failure.extended_code,
                message: message.unwrap_or_else(|| failure.to_string()),
            }))
        }
        other => sqlx::Error::AnyDriverError(Box::new(other)),
    }
}
