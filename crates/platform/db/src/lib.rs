//! A service's own database: SQLite by default, PostgreSQL in production, one code path.
//!
//! # Layout
//! - [`DatabaseSettings`]: the `[database]` configuration section.
//! - [`Db`]: a pool over `sqlx::Any`, so a service writes its SQL once (`$1` placeholders and
//!   `RETURNING` work on both backends) and runs the same migrations on both. SQLite connections
//!   get WAL, `synchronous=NORMAL` (durable across a process crash, which is what `kill -9`
//!   tests), a busy timeout and foreign keys.
//! - [`testing`] (feature `testing`): a fresh database per test, a temp SQLite file or a new
//!   PostgreSQL database, dropped afterwards.
//!
//! Why `Any` and not one pool type per backend: the services' SQL is portable by design (ids as
//! text, money as integer minor units, times as integer microseconds), and one code path means
//! the PostgreSQL suite tests the very queries SQLite runs. The cost is that columns use the
//! types both understand; DESIGN notes in ARCHITECTURE.md say so.

mod inline;
#[cfg(feature = "testing")]
pub mod testing;

pub use inline::{Pool, Tx, TxConn};

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, ConnectOptions, Executor};

/// Which database a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file (or memory).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// `[database]`: where a service keeps its data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://path/file.db` or `postgres://user@host/db`. Unset: `<data_dir>/<service>.db`.
    pub url: Option<SecretString>,
    /// Upper bound of pooled connections (on SQLite: of the read-only ones, at most twice the
    /// cores; writes go through one connection).
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before failing.
    pub acquire_timeout_secs: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: None,
            max_connections: 10,
            acquire_timeout_secs: 5,
        }
    }
}

impl DatabaseSettings {
    /// The configured URL, or the service's SQLite file under `data_dir`.
    pub fn url_or_default(&self, data_dir: &Path, service: &str) -> SecretString {
        match &self.url {
            Some(url) => url.clone(),
            None => SecretString::from(sqlite_url(&data_dir.join(format!("{service}.db")))),
        }
    }
}

/// A time as stored: microseconds since the Unix epoch (an `i64` column on both backends, so
/// times compare and index the same way everywhere). Saturates far in the future.
pub fn micros(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

/// Now, as stored (see [`micros`]).
pub fn now_micros() -> i64 {
    micros(time::OffsetDateTime::now_utc())
}

/// A stored time back (see [`micros`]); `None` if it is out of `OffsetDateTime`'s range.
pub fn from_micros(us: i64) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000).ok()
}

/// Whether the statement broke a unique constraint (the same on SQLite and PostgreSQL).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// The URL of an SQLite file, created when missing.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is neither `sqlite:` nor `postgres:`/`postgresql:`.
    #[error("database.url (SHOPMESH_DATABASE__URL) must start with sqlite:// or postgres://")]
    UnsupportedUrl,
    /// The directory of the SQLite file could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to the {backend:?} database: {source}")]
    Connect {
        /// Which kind of database.
        backend: Backend,
        /// Why.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// A pool to one service's database.
///
/// On SQLite, [`Db::pool`] is **one** connection: every write of the process goes through it,
/// so writers queue in the process (cheap) instead of colliding on the database lock and
/// sleeping in SQLite's busy handler (the tail latency of issue 9); [`Db::reader`] is a pool of
/// read-only connections for the hot read paths, which WAL lets run beside the writer. On
/// PostgreSQL both are the same pool.
#[derive(Debug, Clone)]
pub struct Db {
    pool: Pool,
    reader: Pool,
    /// sqlx's pool to the same database: migrations (on SQLite, its one writing connection,
    /// idle afterwards).
    sqlx: AnyPool,
    /// Reads that may run long, on threads of their own (sqlx's SQLite readers).
    long_reader: AnyPool,
    backend: Backend,
}

impl Db {
    /// Connects (creating an SQLite file and its directory when needed).
    pub async fn connect(url: &SecretString, settings: &DatabaseSettings) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let url = url.expose_secret();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError::UnsupportedUrl);
        };
        match backend {
            Backend::Sqlite => ensure_sqlite_dir(url)?,
            Backend::Postgres => ensure_postgres_database(url).await,
        }
        let options: AnyConnectOptions = url
            .parse::<AnyConnectOptions>()
            .map_err(|source| DbError::Connect { backend, source })?
            // Statements are logged by our own spans; sqlx's per-statement INFO lines are noise.
            .log_statements(log::LevelFilter::Debug)
            .log_slow_statements(log::LevelFilter::Warn, Duration::from_millis(500));
        // An in-memory database lives as long as its one connection: never recycle it.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let connect = |max: u32, read_only: bool| {
            let options_for_pool = if in_memory {
                AnyPoolOptions::new().idle_timeout(None).max_lifetime(None)
            } else {
                AnyPoolOptions::new()
            };
            options_for_pool
                .max_connections(max.max(1))
                .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs))
                // A ping before every checkout doubles the round trips of a one-statement
                // query (each is a hop to the connection's worker thread on SQLite); a broken
                // connection shows up as the statement's own error instead.
                .test_before_acquire(false)
                .after_connect(move |conn, _meta| {
                    Box::pin(async move {
                        if backend == Backend::Sqlite {
                            conn.execute(
                                // No mmap: each connection's mapping of the file would
                                // count in the process's resident memory again (measured:
                                // 195 MiB "resident" for a 19 MiB orders.db, issue 9).
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                                 PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                            )
                            .await?;
                            if read_only {
                                // A write sent to a reader fails loudly instead of contending.
                                conn.execute("PRAGMA query_only = ON;").await?;
                            }
                        }
                        Ok(())
                    })
                })
                .connect_with(options.clone())
        };
        let (pool, reader, sqlx, long_reader) = match backend {
            Backend::Sqlite if in_memory => {
                // Another connection would be another database: one sqlx connection does all.
                let pool = connect(1, false)
                    .await
                    .map_err(|source| DbError::Connect { backend, source })?;
                let shared = Pool(inline::PoolKind::Sqlx(pool.clone()));
                (shared.clone(), shared, pool.clone(), pool)
            }
            Backend::Sqlite => {
                // sqlx's writer first: it creates the file and switches it to WAL.
                let sqlx = connect(1, false)
                    .await
                    .map_err(|source| DbError::Connect { backend, source })?;
                // Reads are CPU work on SQLite (no network to wait on): more readers than
                // twice the cores only add threads and page caches.
                let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                let readers = settings
                    .max_connections
                    .min(u32::try_from(cores * 2).unwrap_or(u32::MAX));
                let long_reader = connect(readers, true)
                    .await
                    .map_err(|source| DbError::Connect { backend, source })?;
                let path = Path::new(sqlite_path(url));
                let connect_error = |source| DbError::Connect { backend, source };
                let writer =
                    inline::Writer::open(path, Duration::from_secs(settings.acquire_timeout_secs))
                        .map_err(connect_error)?;
                let inline_readers =
                    inline::Readers::open(path, usize::try_from(readers).unwrap_or(1))
                        .map_err(connect_error)?;
                (
                    Pool(inline::PoolKind::Writer(std::sync::Arc::new(writer))),
                    Pool(inline::PoolKind::Readers(std::sync::Arc::new(
                        inline_readers,
                    ))),
                    sqlx,
                    long_reader,
                )
            }
            Backend::Postgres => {
                let pool = connect(settings.max_connections, false)
                    .await
                    .map_err(|source| DbError::Connect { backend, source })?;
                let shared = Pool(inline::PoolKind::Sqlx(pool.clone()));
                (shared.clone(), shared, pool.clone(), pool)
            }
        };
        Ok(Db {
            pool,
            reader,
            sqlx,
            long_reader,
            backend,
        })
    }

    /// Connects and applies the service's migrations: what every service does at start-up.
    pub async fn open(
        url: &SecretString,
        settings: &DatabaseSettings,
        migrator: &Migrator,
    ) -> Result<Db, DbError> {
        let db = Db::connect(url, settings).await?;
        db.migrate(migrator).await?;
        Ok(db)
    }

    /// A `/readyz` probe of this database (a trivial query; its error as text), for
    /// `shopmesh_runtime::ReadinessCheck::new("database", db.probe())`.
    pub fn probe(
        &self,
    ) -> impl Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync + 'static
    {
        let db = self.clone();
        move || {
            let db = db.clone();
            Box::pin(async move { db.ping().await.map_err(|e| e.to_string()) })
        }
    }

    /// Applies the service's migrations (idempotent; concurrent replicas serialise on a lock).
    pub async fn migrate(&self, migrator: &Migrator) -> Result<(), DbError> {
        migrator.run(&self.sqlx).await?;
        if let inline::PoolKind::Writer(writer) = &self.pool.0 {
            // Written through sqlx's connection, not another process's.
            writer.saw_own_writes().await;
        }
        Ok(())
    }

    /// Applies migrations of which some only one backend understands (a full-text index, say):
    /// `portable` first, then `sqlite` or `postgres`, whichever this database is. Each set may
    /// find the other's versions applied, so both run with sqlx's `ignore_missing`; give the
    /// backend-specific files versions of their own (1001, ...) so the sets never collide.
    pub async fn migrate_split(
        &self,
        mut portable: Migrator,
        mut sqlite: Migrator,
        mut postgres: Migrator,
    ) -> Result<(), DbError> {
        portable.set_ignore_missing(true);
        self.migrate(&portable).await?;
        let specific = match self.backend {
            Backend::Sqlite => &mut sqlite,
            Backend::Postgres => &mut postgres,
        };
        specific.set_ignore_missing(true);
        self.migrate(specific).await
    }

    /// A transaction that will write. On SQLite it takes the write lock at `BEGIN IMMEDIATE`:
    /// a deferred transaction that reads and then writes fails with `SQLITE_BUSY` when another
    /// writer committed in between, while an immediate one waits its turn (busy timeout). On
    /// PostgreSQL it is a plain `BEGIN`; row locks and guarded updates do the rest.
    pub async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        match (&self.pool.0, self.backend) {
            (inline::PoolKind::Writer(writer), _) => writer.begin().await,
            (_, Backend::Sqlite) => Ok(Tx::sqlx(self.sqlx.begin_with("BEGIN IMMEDIATE").await?)),
            (_, Backend::Postgres) => Ok(Tx::sqlx(self.sqlx.begin().await?)),
        }
    }

    /// Where writes go, and reads that must see the process's own latest writes in the same
    /// order (on SQLite, the one writer connection, run on the caller's thread: see
    /// [`Pool`]). An executor for sqlx's queries: `sqlx::query(..).execute(db.pool())`.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Read-only connections for reads that may run beside a write (on SQLite, WAL readers
    /// that see every committed transaction; on PostgreSQL, the same pool as [`Db::pool`]).
    /// A write sent here fails on SQLite (`query_only`). SQLite reads here run on the caller's
    /// thread: for reads that may take long (a search over a large table), use
    /// [`Db::long_reader`].
    pub fn reader(&self) -> &Pool {
        &self.reader
    }

    /// Read-only connections for reads that may run long (a scan, a full-text search over a
    /// large catalogue): on SQLite each on a thread of its own (sqlx's), so a slow read never
    /// holds up the requests sharing the caller's thread; on PostgreSQL the one pool.
    pub fn long_reader(&self) -> &AnyPool {
        &self.long_reader
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A trivial query, for `/readyz`.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map(|_| ())
    }

    /// Closes the pools, waiting for checked-out connections.
    pub async fn close(&self) {
        if let inline::PoolKind::Writer(writer) = &self.pool.0 {
            // Transactions waiting in a group for their commit are committed first.
            writer.flush().await;
        }
        self.long_reader.close().await;
        self.sqlx.close().await;
    }
}

/// Creates the PostgreSQL database named in `url` when the server does not have it yet, as
/// SQLite creates a missing file: `up` on PostgreSQL needs only a server. Concurrent replicas
/// racing to create it are fine (one wins, the others find it). Without the right to create
/// databases this logs why and leaves the connect to fail with the server's own message.
async fn ensure_postgres_database(url: &str) {
    use sqlx::migrate::MigrateDatabase;
    match sqlx::Postgres::database_exists(url).await {
        Ok(true) => {}
        Ok(false) => match sqlx::Postgres::create_database(url).await {
            Ok(()) => log::info!("created the PostgreSQL database"),
            Err(e) => match sqlx::Postgres::database_exists(url).await {
                Ok(true) => {}
                _ => log::warn!("cannot create the PostgreSQL database: {e}"),
            },
        },
        // The server is unreachable, or the maintenance database is not ours to read: the
        // connect that follows says so.
        Err(_) => {}
    }
}

/// The file an `sqlite:` URL names.
fn sqlite_path(url: &str) -> &str {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    path.split('?').next().unwrap_or_default()
}

fn ensure_sqlite_dir(url: &str) -> Result<(), DbError> {
    let path = sqlite_path(url);
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    if let Some(dir) = Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|source| DbError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows in `t`, as a reader sees them.
    async fn rows(db: &Db) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t")
            .fetch_one(db.reader())
            .await
            .expect("read");
        n
    }

    /// Runs a statement without parameters on the writer.
    async fn sql(db: &Db, statement: &'static str) {
        sqlx::query(statement)
            .execute(db.pool())
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }

    /// Inserts each of `ns` into `t`, each in a write transaction of its own, all at once.
    async fn insert_each_in_its_own_transaction(db: &Db, ns: impl Iterator<Item = i64>) {
        let tasks: Vec<_> = ns
            .map(|n| {
                let db = db.clone();
                tokio::spawn(async move {
                    let mut tx = db.begin_write().await.expect("begin");
                    sqlx::query("INSERT INTO t (n) VALUES ($1)")
                        .bind(n)
                        .execute(&mut *tx)
                        .await
                        .expect("insert");
                    tx.commit().await.expect("commit");
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    }

    async fn sqlite(dir: &tempfile::TempDir) -> Db {
        let url = SecretString::from(sqlite_url(&dir.path().join("t.db")));
        let db = Db::connect(&url, &DatabaseSettings::default())
            .await
            .expect("connect");
        sql(&db, "CREATE TABLE t (n INTEGER NOT NULL)").await;
        db
    }

    #[tokio::test]
    async fn readers_see_what_the_writer_committed_and_cannot_write() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        let mut tx = db.begin_write().await.expect("begin");
        sqlx::query("INSERT INTO t (n) VALUES (1)")
            .execute(&mut *tx)
            .await
            .expect("insert");
        // Uncommitted: a reader does not see it, and is not blocked by the writer (WAL).
        assert_eq!(rows(&db).await, 0);
        tx.commit().await.expect("commit");
        assert_eq!(rows(&db).await, 1);
        let write = sqlx::query("INSERT INTO t (n) VALUES (2)")
            .execute(db.reader())
            .await;
        assert!(write.is_err(), "a reader must refuse writes");
    }

    #[tokio::test]
    async fn writes_from_many_tasks_queue_for_the_one_writer_and_all_land() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        // One writer per process: writers queue here instead of on the file lock.
        insert_each_in_its_own_transaction(&db, 0..50).await;
        assert_eq!(rows(&db).await, 50);
    }

    #[tokio::test]
    async fn numbered_parameters_bind_by_number_and_values_decode_as_sqlx_decodes_them() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        let row: (String, i64, Option<String>, Option<i64>, String) =
            sqlx::query_as("SELECT $2, $1, $3, NULL, $2 || 'x'")
                .bind(7_i64)
                .bind("two")
                .bind(None::<String>)
                .fetch_one(db.reader())
                .await
                .expect("select");
        assert_eq!(row, ("two".into(), 7, None, None, "twox".into()));
        let mut tx = db.begin_write().await.expect("begin");
        let done = sqlx::query("INSERT INTO t (n) VALUES ($1), ($1), ($2)")
            .bind(5_i64)
            .bind(6_i64)
            .execute(&mut *tx)
            .await
            .expect("insert");
        assert_eq!(done.rows_affected(), 3);
        let (n,): (i64,) = sqlx::query_as("UPDATE t SET n = n + 1 WHERE n = $1 RETURNING n")
            .bind(6_i64)
            .fetch_one(&mut *tx)
            .await
            .expect("update returning");
        assert_eq!(n, 7);
        tx.commit().await.expect("commit");
        let summed: (i64, i64) = sqlx::query_as("SELECT COUNT(*), SUM(n) FROM t")
            .fetch_one(db.pool())
            .await
            .expect("sum");
        assert_eq!(summed, (3, 17));
    }

    #[tokio::test]
    async fn a_dropped_transaction_is_rolled_back_and_the_writer_serves_the_next() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        sql(&db, "CREATE UNIQUE INDEX t_n ON t (n)").await;
        {
            let mut tx = db.begin_write().await.expect("begin");
            sqlx::query("INSERT INTO t (n) VALUES (1)")
                .execute(&mut *tx)
                .await
                .expect("insert");
            // Dropped: an error or a cancelled request.
        }
        assert_eq!(rows(&db).await, 0);
        sql(&db, "INSERT INTO t (n) VALUES (1)").await;
        let again = sqlx::query("INSERT INTO t (n) VALUES (1)")
            .execute(db.pool())
            .await
            .expect_err("a duplicate");
        assert!(is_unique_violation(&again), "{again:?}");
        assert_eq!(rows(&db).await, 1);
    }

    async fn commits(db: &Db) -> u64 {
        match &db.pool().0 {
            inline::PoolKind::Writer(writer) => writer.commits().await,
            _ => panic!("not the inline writer"),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_transactions_share_a_commit_and_each_hears_of_it_once_it_is_durable() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        sql(&db, "CREATE UNIQUE INDEX t_n ON t (n)").await;
        sql(&db, "INSERT INTO t (n) VALUES (-1)").await;
        let before = commits(&db).await;
        let file = dir.path().join("t.db");
        let tasks: Vec<_> = (0..50_i64)
            .map(|i| {
                let db = db.clone();
                let file = file.clone();
                tokio::spawn(async move {
                    if i >= 40 {
                        // A single statement on the writer shares the commit too.
                        sqlx::query("INSERT INTO t (n) VALUES ($1)")
                            .bind(i)
                            .execute(db.pool())
                            .await
                            .expect("insert");
                        return true;
                    }
                    let mut tx = db.begin_write().await.expect("begin");
                    sqlx::query("INSERT INTO t (n) VALUES ($1)")
                        .bind(i)
                        .execute(&mut *tx)
                        .await
                        .expect("insert");
                    match i % 4 {
                        // Given up: rolled back, the others' work untouched.
                        0 => return false,
                        // Fails on a duplicate: its whole transaction is undone.
                        1 => {
                            let duplicate = sqlx::query("INSERT INTO t (n) VALUES (-1)")
                                .execute(&mut *tx)
                                .await
                                .expect_err("a duplicate");
                            assert!(is_unique_violation(&duplicate), "{duplicate:?}");
                            return false;
                        }
                        _ => {}
                    }
                    tx.commit().await.expect("commit");
                    // Told: it is in the file, for any other connection (another process).
                    let other = rusqlite::Connection::open(&file).expect("open");
                    let n: i64 = other
                        .query_row("SELECT COUNT(*) FROM t WHERE n = ?1", [i], |r| r.get(0))
                        .expect("read");
                    assert_eq!(n, 1, "transaction {i} was told it committed before it did");
                    true
                })
            })
            .collect();
        let mut committed = 0;
        for task in tasks {
            committed += u64::from(task.await.expect("task"));
        }
        assert_eq!(committed, 30);
        assert_eq!(rows(&db).await, 31);
        let shared = commits(&db).await - before;
        assert!(
            shared < committed,
            "{committed} transactions took {shared} commits"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn what_runs_after_a_commit_sees_it_durable_and_never_runs_after_a_rollback() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        let file = dir.path().join("t.db");
        let ran = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..12_i64)
            .map(|i| {
                let (db, file, ran) = (db.clone(), file.clone(), ran.clone());
                tokio::spawn(async move {
                    let mut tx = db.begin_write().await.expect("begin");
                    assert!(tx.is_sqlite());
                    sqlx::query("INSERT INTO t (n) VALUES ($1)")
                        .bind(i)
                        .execute(&mut *tx)
                        .await
                        .expect("insert");
                    tx.after_commit(move || {
                        // Run once the shared commit is done: another connection sees it.
                        let other = rusqlite::Connection::open(&file).expect("open");
                        let n: i64 = other
                            .query_row("SELECT COUNT(*) FROM t WHERE n = ?1", [i], |r| r.get(0))
                            .expect("read");
                        assert_eq!(n, 1, "ran before transaction {i} was committed");
                        ran.lock().expect("lock").push(i);
                    });
                    match i % 3 {
                        0 => drop(tx),
                        1 => tx.rollback().await.expect("rollback"),
                        _ => tx.commit().await.expect("commit"),
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        let mut ran = ran.lock().expect("lock").clone();
        ran.sort_unstable();
        assert_eq!(ran, vec![2, 5, 8, 11]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn single_writes_on_the_pool_share_commits_too() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        let before = commits(&db).await;
        let tasks: Vec<_> = (0..20_i64)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    sqlx::query("INSERT INTO t (n) VALUES ($1)")
                        .bind(i)
                        .execute(db.pool())
                        .await
                        .expect("insert")
                        .rows_affected()
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("task"), 1);
        }
        assert_eq!(rows(&db).await, 20);
        let shared = commits(&db).await - before;
        assert!(shared < 20, "20 statements took {shared} commits");
        // A read with no group open runs as it is and commits nothing.
        let before = commits(&db).await;
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t")
            .fetch_one(db.pool())
            .await
            .expect("read");
        assert_eq!((n, commits(&db).await - before), (20, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_transaction_that_read_the_groups_work_ends_only_once_that_is_durable() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        let other = rusqlite::Connection::open(dir.path().join("t.db")).expect("open");
        let in_file = |n: i64| -> i64 {
            other
                .query_row("SELECT COUNT(*) FROM t WHERE n = ?1", [n], |r| r.get(0))
                .expect("read")
        };
        let mut first = db.begin_write().await.expect("begin");
        sqlx::query("INSERT INTO t (n) VALUES (1)")
            .execute(&mut *first)
            .await
            .expect("insert");
        // Released into the group; its commit is scheduled, not done.
        assert!(futures_util::FutureExt::now_or_never(first.commit()).is_none());
        assert_eq!(in_file(1), 0);
        // A second transaction reads the first's work and ends without committing (an
        // idempotent retry that finds it done): before its caller can answer from what it
        // read, that is committed.
        let mut second = db.begin_write().await.expect("begin");
        let (seen,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t WHERE n = 1")
            .fetch_one(&mut *second)
            .await
            .expect("read");
        assert_eq!(seen, 1);
        drop(second);
        assert_eq!(in_file(1), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_writer_that_sees_another_process_write_its_file_commits_alone() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        // Another process (a replica on the same file) writes.
        let other = Db::connect(
            &SecretString::from(sqlite_url(&dir.path().join("t.db"))),
            &DatabaseSettings::default(),
        )
        .await
        .expect("connect");
        sqlx::query("INSERT INTO t (n) VALUES (0)")
            .execute(other.pool())
            .await
            .expect("insert");
        let before = commits(&db).await;
        insert_each_in_its_own_transaction(&db, 1..=10).await;
        assert_eq!(rows(&db).await, 11);
        // Each on its own: a group would hold the file's lock across turns of the scheduler.
        assert_eq!(commits(&db).await - before, 10);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_error_that_rolls_back_the_whole_transaction_fails_everyone_in_its_group() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        sql(&db, "CREATE UNIQUE INDEX t_n ON t (n)").await;
        sql(&db, "INSERT INTO t (n) VALUES (-1)").await;
        let mut first = db.begin_write().await.expect("begin");
        sqlx::query("INSERT INTO t (n) VALUES (1)")
            .execute(&mut *first)
            .await
            .expect("insert");
        let first = tokio::spawn(first.commit());
        // Waits for the writer, which the first lets go of once it waits in the group.
        let mut second = db.begin_write().await.expect("begin");
        // SQLite ends the whole shared transaction on this conflict (as on a full disk).
        sqlx::query("INSERT OR ROLLBACK INTO t (n) VALUES (-1)")
            .execute(&mut *second)
            .await
            .expect_err("a duplicate");
        sqlx::query("INSERT INTO t (n) VALUES (2)")
            .execute(&mut *second)
            .await
            .expect_err("nothing more runs in a transaction that is gone");
        second.commit().await.expect_err("it cannot commit");
        first
            .await
            .expect("task")
            .expect_err("the first's work went with the shared transaction");
        let (kept,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t WHERE n <> -1")
            .fetch_one(db.reader())
            .await
            .expect("read");
        assert_eq!(kept, 0);
        // The writer goes on.
        sql(&db, "INSERT INTO t (n) VALUES (3)").await;
        assert_eq!(rows(&db).await, 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_whose_caller_stopped_waiting_still_lands() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        let mut tx = db.begin_write().await.expect("begin");
        sqlx::query("INSERT INTO t (n) VALUES (1)")
            .execute(&mut *tx)
            .await
            .expect("insert");
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        tx.after_commit(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
        // The caller asks for the commit, then goes away (a request dropped at its deadline).
        let gave_up = futures_util::FutureExt::now_or_never(tx.commit());
        assert!(
            gave_up.is_none(),
            "the commit is shared, so it is not done at once"
        );
        for _ in 0..100 {
            if rows(&db).await == 1 {
                // What it asked to run after its commit ran too (the outbox's wake-up).
                assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the commit asked for never landed");
    }

    #[tokio::test]
    async fn the_wal_is_checkpointed_off_the_writers_thread_and_stays_bounded() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        sql(&db, "CREATE TABLE pages (body BLOB NOT NULL)").await;
        // 3,000 commits of a page each: 12 MB of WAL if nothing ever checkpointed it (the
        // writer's automatic checkpoint is off; the checkpointer's thread does it).
        for _ in 0..3_000 {
            let mut tx = db.begin_write().await.expect("begin");
            sqlx::query("INSERT INTO pages (body) VALUES ($1)")
                .bind(vec![7_u8; 3_000])
                .execute(&mut *tx)
                .await
                .expect("insert");
            tx.commit().await.expect("commit");
        }
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .expect("the WAL")
            .len();
        assert!(wal < 4 << 20, "the WAL grew to {wal} bytes");
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM pages")
            .fetch_one(db.reader())
            .await
            .expect("count");
        assert_eq!(n, 3_000);
        // The checkpoints are this process's own: they do not make the writer commit alone.
        let before = commits(&db).await;
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move {
                    sqlx::query("INSERT INTO pages (body) VALUES ($1)")
                        .bind(vec![1_u8; 10])
                        .execute(db.pool())
                        .await
                        .expect("insert");
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        let shared = commits(&db).await - before;
        assert!(shared < 20, "20 statements took {shared} commits");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_write_waits_for_another_process_without_stopping_its_thread() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sqlite(&dir).await;
        // Another process's connection holds the write lock for 300 ms.
        let other = rusqlite::Connection::open(dir.path().join("t.db")).expect("open");
        other
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO t (n) VALUES (1);")
            .expect("lock");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            other.execute_batch("COMMIT").expect("commit");
        });
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        sql(&db, "INSERT INTO t (n) VALUES (2)").await;
        ticker.abort();
        release.join().expect("other");
        assert_eq!(rows(&db).await, 2);
        // The one runtime thread kept running other tasks while the write waited.
        assert!(
            ticks.load(std::sync::atomic::Ordering::Relaxed) >= 3,
            "the runtime thread was blocked: {} ticks",
            ticks.load(std::sync::atomic::Ordering::Relaxed)
        );
    }

    #[tokio::test]
    async fn a_missing_postgres_database_is_created_on_connect() {
        use sqlx::migrate::MigrateDatabase;
        let configured = std::env::var("TEST_POSTGRES_URL").ok();
        let admin = configured
            .clone()
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        if configured.is_none()
            && !sqlx::Postgres::database_exists(&admin)
                .await
                .unwrap_or(false)
        {
            eprintln!("NOTICE: skipped: no PostgreSQL (set TEST_POSTGRES_URL to run it)");
            return;
        }
        let name = format!("shopmesh_test_{}_created", uuid::Uuid::new_v4().simple());
        let base = admin.split('?').next().unwrap_or(&admin);
        let url = format!(
            "{}/{name}",
            &base[..base.rfind('/').expect("a database path")]
        );
        assert!(
            !sqlx::Postgres::database_exists(&url)
                .await
                .expect("exists?")
        );
        let db = Db::connect(
            &SecretString::from(url.clone()),
            &DatabaseSettings::default(),
        )
        .await
        .expect("connect creates the database");
        db.ping().await.expect("ping");
        db.close().await;
        sqlx::Postgres::drop_database(&url).await.expect("drop");
    }

    #[tokio::test]
    async fn an_in_memory_database_is_one_database_for_reads_and_writes() {
        let url = SecretString::from("sqlite::memory:".to_owned());
        let db = Db::connect(&url, &DatabaseSettings::default())
            .await
            .expect("connect");
        sql(&db, "CREATE TABLE t (n INTEGER)").await;
        sql(&db, "INSERT INTO t (n) VALUES (1)").await;
        assert_eq!(rows(&db).await, 1);
    }

    #[test]
    fn stored_times_round_trip_to_the_microsecond() {
        let t = time::macros::datetime!(2026-11-28 13:05:06.123_456_789 UTC);
        let back = from_micros(micros(t)).expect("in range");
        assert_eq!(
            back,
            time::macros::datetime!(2026-11-28 13:05:06.123_456 UTC)
        );
        assert_eq!(micros(time::OffsetDateTime::UNIX_EPOCH), 0);
        assert_eq!(from_micros(i64::MAX), None);
    }
}
