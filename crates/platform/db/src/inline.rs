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
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot};

/// How long a statement waits for another process's write to end before failing as busy
/// (what `busy_timeout` was on sqlx's connections).
pub const BUSY_WAIT: Duration = Duration::from_secs(5);

/// Statements each connection keeps prepared (a service has a few dozen).
const STATEMENT_CACHE: usize = 128;

/// Commits between two checkpoints of the WAL (a purchase's transaction writes a handful of
/// pages; SQLite's own automatic checkpoint comes at 1,000 pages).
const CHECKPOINT_EVERY: u32 = 128;

/// Transactions one commit carries at most (see [`WriterConn`]).
const GROUP_MAX: usize = 64;

/// The one writing connection of a process.
#[derive(Debug)]
pub(crate) struct Writer {
    conn: Arc<Mutex<WriterConn>>,
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

/// The writing connection, the transactions waiting for its next commit, and the commits
/// since the checkpointer was last woken.
///
/// **Group commit.** A commit is most of a small transaction's cost (its pages written to the
/// WAL, checksummed, the WAL index updated), and the transactions of one process mostly touch
/// the same few pages (the outbox's last leaf, an index's). So one SQLite transaction (`BEGIN
/// IMMEDIATE`) carries the transactions of several callers, each a savepoint in it: a caller's
/// [`Tx::commit`] releases its savepoint into the shared transaction, lets go of the writer and
/// waits; the first to commit schedules a task that, once the tasks ready to run have had their
/// turn (their transactions join), commits them all at once and tells each. A caller hears
/// "committed" only after that commit, so what it was told survives `kill -9`; a transaction
/// dropped uncommitted rolls back to its savepoint and leaves the others' work alone; one that
/// fails the shared commit fails every caller in it. After [`GROUP_MAX`] transactions the
/// caller commits the group itself. While a group is open, the writer's own reads
/// ([`crate::Db::pool`]) see its members' work before it is committed; readers never do.
///
/// **Checkpoints.** A checkpoint copies the WAL's pages into the database file and syncs it:
/// with SQLite's automatic checkpoint it runs inside the commit that crosses the threshold, so
/// here, on the caller's thread, a runtime thread would stop for the `fsync` (milliseconds on a
/// virtual disk) with every request it carries. The writer runs with automatic checkpoints off
/// (`wal_autocheckpoint = 0`) and wakes a thread of its own every [`CHECKPOINT_EVERY`] commits,
/// which checkpoints beside the writer (the long part: syncing the WAL, copying it), then takes
/// the writer (so that no write lands meanwhile and the checkpoint completes: a WAL written to
/// during every checkpoint is never started over and grows without end), commits the open
/// group and checkpoints what was written in the meantime. Writers wait for that short second
/// pass only; the runtime's threads do not.
#[derive(Debug)]
pub(crate) struct WriterConn {
    conn: Connection,
    /// The shared transaction, when one is open.
    group: Option<Group>,
    since_checkpoint: u32,
    checkpointer: std::sync::mpsc::SyncSender<()>,
    /// SQLite commits made (tests tell grouped commits by it).
    commits: u64,
    /// `PRAGMA data_version` when a group last began: it changes when another connection (a
    /// replica on the same file, `shopmesh admin`) has committed since.
    data_version: i64,
    /// Until then, each transaction commits on its own: another process writes to this file,
    /// and a group holds the file's write lock from its first transaction to its commit (one
    /// turn of the scheduler, most of the time under load), which would starve it.
    shared_until: Option<std::time::Instant>,
}

/// How long the writer commits alone after it saw another process write to its file.
const SHARED_FOR: Duration = Duration::from_secs(10);

/// The open shared transaction: who waits for its commit.
#[derive(Debug, Default)]
struct Group {
    waiting: Vec<oneshot::Sender<Result<(), Failure>>>,
    /// What its transactions asked to run once committed ([`TxConn::after_commit`]): run by
    /// the shared commit itself, so a caller that stops waiting for it loses nothing.
    after: AfterCommit,
}

/// Why a shared commit failed, for each transaction in it.
#[derive(Debug, Clone)]
struct Failure {
    code: i32,
    message: Arc<str>,
}

impl Failure {
    fn of(e: &sqlx::Error) -> Failure {
        let code = match e {
            sqlx::Error::Database(db) => db
                .try_downcast_ref::<SqliteError>()
                .map_or(rusqlite::ffi::SQLITE_ERROR, |e| e.code),
            _ => rusqlite::ffi::SQLITE_ERROR,
        };
        Failure {
            code,
            message: e.to_string().into(),
        }
    }

    fn error(&self) -> sqlx::Error {
        sqlx::Error::Database(Box::new(SqliteError {
            code: self.code,
            message: format!("the shared commit failed: {}", self.message),
        }))
    }
}

impl std::ops::Deref for WriterConn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for WriterConn {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// Runs a statement without parameters or rows (the transaction control), prepared once.
fn exec(conn: &Connection, sql: &str) -> Result<(), sqlx::Error> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.raw_execute())
        .map(|_| ())
        .map_err(error)
}

impl WriterConn {
    /// Counts a commit; every [`CHECKPOINT_EVERY`], wakes the checkpointer (if it is already
    /// due, once is enough), or checkpoints here should its thread be gone.
    fn committed(&mut self) {
        self.commits += 1;
        self.since_checkpoint += 1;
        if self.since_checkpoint < CHECKPOINT_EVERY {
            return;
        }
        self.since_checkpoint = 0;
        if let Err(std::sync::mpsc::TrySendError::Disconnected(())) = self.checkpointer.try_send(())
        {
            checkpoint(&self.conn);
        }
    }

    /// If the shared transaction ended under the group (an I/O error or a full disk makes
    /// SQLite roll back the whole transaction), tells everyone waiting in it.
    fn check_group(&mut self) {
        if self.group.is_some() && self.conn.is_autocommit() {
            let failure = Failure {
                code: rusqlite::ffi::SQLITE_ABORT,
                message: "the shared transaction was rolled back by an error".into(),
            };
            for waiter in self.group.take().into_iter().flat_map(|g| g.waiting) {
                let _ = waiter.send(Err(failure.clone()));
            }
        }
    }

    /// Ends a group no one waits in (its transactions rolled back, or none was released yet).
    fn end_if_empty(&mut self) {
        if self.group.as_ref().is_some_and(|g| g.waiting.is_empty()) {
            self.group = None;
            if let Err(e) = exec(&self.conn, "ROLLBACK") {
                log::warn!("ending an empty write transaction failed: {e}");
            }
        }
    }

    /// Opens a transaction of the caller's own: a savepoint in the open group, or in a new one.
    async fn begin(&mut self) -> Result<(), sqlx::Error> {
        self.check_group();
        if self.group.is_none() && !self.conn.is_autocommit() {
            // A ROLLBACK that failed earlier left a transaction open that no one owns.
            if let Err(e) = exec(&self.conn, "ROLLBACK") {
                log::warn!("ending an abandoned write transaction failed: {e}");
            }
        }
        if self.group.is_none() {
            let conn = &mut self.conn;
            retrying(move || exec(conn, "BEGIN IMMEDIATE")).await?;
            self.group = Some(Group::default());
            let version = data_version(&self.conn);
            if version != self.data_version {
                self.data_version = version;
                self.shared_until = Some(std::time::Instant::now() + SHARED_FOR);
            }
        }
        if let Err(e) = exec(&self.conn, "SAVEPOINT tx") {
            self.end_if_empty();
            return Err(e);
        }
        Ok(())
    }

    /// Whether another process wrote to the file lately (see `shared_until`).
    fn shared(&self) -> bool {
        self.shared_until
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    /// Undoes the caller's transaction, not the group's. If others wait in the group, commits
    /// it now: the caller may have read their work and is about to answer from it, which must
    /// not happen before that work is durable.
    ///
    /// Fails when the transaction could not be undone (then the whole group is rolled back and
    /// its waiters told, rather than commit what the caller dropped) or when that commit of the
    /// group failed (what the caller read of it is gone).
    fn roll_back(&mut self) -> Result<(), sqlx::Error> {
        if !self.conn.is_autocommit() {
            // (In autocommit an error already rolled the whole transaction back: `InlineTx::run`.)
            let undone =
                exec(&self.conn, "ROLLBACK TO tx").and_then(|()| exec(&self.conn, "RELEASE tx"));
            if let Err(e) = undone {
                let _ = exec(&self.conn, "ROLLBACK");
                let failure = Failure::of(&e);
                for waiter in self.group.take().into_iter().flat_map(|g| g.waiting) {
                    let _ = waiter.send(Err(failure.clone()));
                }
                return Err(e);
            }
        }
        self.check_group();
        if self.group.as_ref().is_some_and(|g| !g.waiting.is_empty()) {
            self.commit_group().map_err(|f| f.error())?;
        }
        self.end_if_empty();
        Ok(())
    }

    /// Commits the open group, telling everyone in it; returns the outcome.
    fn commit_group(&mut self) -> Result<(), Failure> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        let outcome = exec(&self.conn, "COMMIT").map_err(|e| Failure::of(&e));
        match &outcome {
            Ok(()) => self.committed(),
            Err(failure) => {
                log::error!("a shared commit failed: {}", failure.message);
                if !self.conn.is_autocommit() {
                    let _ = exec(&self.conn, "ROLLBACK");
                }
            }
        }
        if outcome.is_ok() {
            for f in group.after.0 {
                f();
            }
        }
        for waiter in group.waiting {
            let _ = waiter.send(outcome.clone());
        }
        outcome
    }
}

impl Drop for WriterConn {
    fn drop(&mut self) {
        // Transactions whose callers asked for their commit (the task that would have committed
        // them went with its runtime): honour it.
        self.check_group();
        if self.group.is_some() {
            let _ = self.commit_group();
        }
    }
}

/// The connection's `PRAGMA data_version` (0 if it cannot be read: then changes go unseen).
fn data_version(conn: &Connection) -> i64 {
    conn.prepare_cached("PRAGMA data_version")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .unwrap_or(0)
}

fn checkpoint(conn: &Connection) {
    // Busy only while another process checkpoints the same file: its checkpoint does the work.
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        log::debug!("WAL checkpoint: {e}");
    }
}

/// The checkpointer's thread, with a connection of its own; it ends with the writer.
fn spawn_checkpointer(
    path: &Path,
    writer: std::sync::Weak<Mutex<WriterConn>>,
    due: std::sync::mpsc::Receiver<()>,
) -> Result<(), sqlx::Error> {
    let conn = open(path, false)?;
    std::thread::Builder::new()
        .name("sqlite-checkpoint".to_owned())
        .spawn(move || {
            while due.recv().is_ok() {
                // The bulk first, beside the writer: SQLite checkpoints while others write,
                // and this pass is the long one (it syncs the WAL written since the last
                // checkpoint, 7–12 ms on this kind of disk after 128 commits, and copies its
                // pages into the database file). Then, holding the writer, the frames written
                // meanwhile, after which the WAL is wholly copied and the next write starts it
                // over. SQLite syncs the database file only in a pass that copied everything,
                // so that sync (~2 ms) is in the second pass, with the writer held. Held for
                // the whole checkpoint, the writer kept every write of the process waiting
                // ~14 ms, several times a second under load; now ~3 ms.
                checkpoint(&conn);
                let Some(writer) = writer.upgrade() else {
                    return;
                };
                let mut held = writer.blocking_lock();
                let _ = held.commit_group();
                checkpoint(&conn);
            }
        })
        .map_err(sqlx::Error::Io)?;
    Ok(())
}

/// Commits the open group once the tasks ready to run have had their turn.
fn schedule_commit(writer: Arc<Mutex<WriterConn>>) {
    tokio::spawn(async move {
        tokio::task::yield_now().await;
        let _ = writer.lock().await.commit_group();
    });
}

impl Writer {
    pub(crate) fn open(path: &Path, acquire_timeout: Duration) -> Result<Writer, sqlx::Error> {
        let conn = open(path, false)?;
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .map_err(error)?;
        let (wake, due) = std::sync::mpsc::sync_channel::<()>(1);
        let data_version = data_version(&conn);
        let conn = Arc::new(Mutex::new(WriterConn {
            conn,
            group: None,
            since_checkpoint: 0,
            checkpointer: wake,
            commits: 0,
            data_version,
            shared_until: None,
        }));
        spawn_checkpointer(path, Arc::downgrade(&conn), due)?;
        Ok(Writer {
            conn,
            acquire_timeout,
        })
    }

    /// The writer, once the transaction or statement holding it is over.
    async fn acquire(&self) -> Result<OwnedMutexGuard<WriterConn>, sqlx::Error> {
        if let Ok(conn) = self.conn.clone().try_lock_owned() {
            return Ok(conn);
        }
        tokio::time::timeout(self.acquire_timeout, self.conn.clone().lock_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }

    /// Begins a write transaction, holding the writer until it ends.
    pub(crate) async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Self::begin_on(self.acquire().await?).await
    }

    async fn begin_on(mut conn: OwnedMutexGuard<WriterConn>) -> Result<Tx, sqlx::Error> {
        conn.begin().await?;
        Ok(Tx(TxConn::new(TxKind::Inline(InlineTx {
            conn,
            open: true,
            lost: false,
        }))))
    }

    /// Runs one statement: a write as a transaction of its own in the group (so it shares a
    /// commit too); a read on its own when no group is open, else in it (it may see the
    /// group's work, so it answers only once that is committed).
    async fn run(&self, sql: &str, args: Option<&AnyArguments>) -> Result<Outcome, sqlx::Error> {
        let mut guard = self.acquire().await?;
        guard.check_group();
        let conn: &mut Connection = &mut guard;
        let read_only = retrying(move || {
            conn.prepare_cached(sql)
                .map(|s| s.readonly())
                .map_err(error)
        })
        .await?;
        if read_only && guard.group.is_none() {
            // A unique borrow, so the future stays `Send` (a connection is not `Sync`).
            let conn: &mut Connection = &mut guard;
            return retrying(move || run(conn, sql, args)).await;
        }
        let mut tx = Self::begin_on(guard).await?;
        let TxKind::Inline(inline) = &mut tx.0.kind else {
            return Err(unsupported("a writer's statement on sqlx"));
        };
        match inline.run(sql, args) {
            Ok(outcome) => {
                tx.commit().await?;
                Ok(outcome)
            }
            // Undone; if that had to commit the group and failed, that is the answer.
            Err(e) => tx.rollback().await.and(Err(e)),
        }
    }

    /// Takes what other connections of this process wrote (migrations, through sqlx's) for its
    /// own: not a sign of another process on the file.
    pub(crate) async fn saw_own_writes(&self) {
        let mut conn = self.conn.lock().await;
        conn.data_version = data_version(&conn.conn);
    }

    /// Commits the open group now (closing the database).
    pub(crate) async fn flush(&self) {
        let _ = self.conn.lock().await.commit_group();
    }

    /// SQLite commits made so far.
    #[cfg(test)]
    pub(crate) async fn commits(&self) -> u64 {
        self.conn.lock().await.commits
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
    let started = std::time::Instant::now();
    let outcome = run_timed(conn, sql, args);
    let elapsed = started.elapsed();
    // What sqlx logged for its statements: each at debug (`log.level = info,shopmesh_db=debug`),
    // a slow one as a warning.
    if elapsed >= SLOW_STATEMENT {
        log::warn!(target: "shopmesh_db::sql", "slow statement ({elapsed:?}): {sql}");
    } else if log::log_enabled!(target: "shopmesh_db::sql", log::Level::Debug) {
        let rows = outcome.as_ref().map_or(0, |(rows, _)| rows.len());
        log::debug!(target: "shopmesh_db::sql", "{elapsed:?}, {rows} rows: {sql}");
    }
    outcome
}

/// A statement this slow is logged as a warning (the threshold sqlx's connections have, in
/// `Db::connect`).
const SLOW_STATEMENT: Duration = Duration::from_millis(500);

fn run_timed(
    conn: &Connection,
    sql: &str,
    args: Option<&AnyArguments>,
) -> Result<Outcome, sqlx::Error> {
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
            PoolKind::Writer(writer) => writer.run(sql, args).await,
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
            tokio::task::consume_budget().await;
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
            tokio::task::consume_budget().await;
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
pub struct TxConn {
    pub(crate) kind: TxKind,
    /// What runs once the transaction is committed (see [`TxConn::after_commit`]).
    after_commit: AfterCommit,
}

/// Callbacks to run after a commit, never after a rollback.
#[derive(Default)]
struct AfterCommit(Vec<Box<dyn FnOnce() + Send>>);

impl std::fmt::Debug for AfterCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AfterCommit({})", self.0.len())
    }
}

impl TxConn {
    fn new(kind: TxKind) -> Self {
        TxConn {
            kind,
            after_commit: AfterCommit::default(),
        }
    }

    /// Runs `f` once this transaction is committed (on SQLite right after the group's shared
    /// `COMMIT`, by whoever runs it, even if this caller stopped waiting; before the caller
    /// hears of it), never if it rolls back or is dropped: to tell others what is now visible
    /// (the outbox wakes its readers this way). `f` must be quick, must not panic, and must not
    /// use the database (on SQLite it runs holding the writer, before the group's callers are
    /// told).
    pub fn after_commit(&mut self, f: impl FnOnce() + Send + 'static) {
        self.after_commit.0.push(Box::new(f));
    }

    /// Whether this is a SQLite transaction. Every SQLite write transaction holds the
    /// database's one write lock from its first statement to its end (`BEGIN IMMEDIATE`, or
    /// the process's one writer connection), so write transactions commit in the order they
    /// begin, and a value read here (a `MAX`) is still the latest when it commits.
    pub fn is_sqlite(&self) -> bool {
        match &self.kind {
            TxKind::Inline(_) => true,
            TxKind::Sqlx(tx) => tx.backend_name() == <sqlx::Sqlite as sqlx::Database>::NAME,
        }
    }
}

#[derive(Debug)]
pub(crate) enum TxKind {
    Sqlx(sqlx::Transaction<'static, Any>),
    Inline(InlineTx),
}

/// The SQLite writer, held for one transaction.
#[derive(Debug)]
pub(crate) struct InlineTx {
    conn: OwnedMutexGuard<WriterConn>,
    /// Not yet committed or rolled back.
    open: bool,
    /// An error rolled back the whole SQLite transaction under it: what it did is gone, and a
    /// statement run now would commit on its own, so none is.
    lost: bool,
}

/// The error for a transaction that an earlier error rolled back entirely.
fn lost() -> sqlx::Error {
    Failure {
        code: rusqlite::ffi::SQLITE_ABORT,
        message: "the transaction was rolled back by an earlier error".into(),
    }
    .error()
}

impl Drop for InlineTx {
    fn drop(&mut self) {
        if self.open {
            // A transaction dropped before its commit (an error, a cancelled request): undo.
            if let Err(e) = self.conn.roll_back() {
                log::warn!("rolling back an abandoned transaction failed: {e}");
            }
        }
    }
}

impl InlineTx {
    /// Runs a statement in the transaction.
    fn run(&mut self, sql: &str, args: Option<&AnyArguments>) -> Result<Outcome, sqlx::Error> {
        if self.lost {
            return Err(lost());
        }
        let outcome = run(&self.conn, sql, args);
        if outcome.is_err() && self.conn.is_autocommit() {
            // SQLite ended the whole transaction (a full disk, an I/O error): the group's
            // waiters hear it now, and this transaction runs nothing more.
            self.lost = true;
            self.conn.check_group();
        }
        outcome
    }

    /// Releases the transaction into the group and waits for the group's commit (see
    /// [`WriterConn`]); `after` runs once that commit is done, whether or not this caller
    /// still waits for it.
    async fn commit(mut self, after: AfterCommit) -> Result<(), sqlx::Error> {
        if self.lost {
            self.open = false;
            return Err(lost());
        }
        self.open = false;
        if let Err(e) = exec(&self.conn, "RELEASE tx") {
            let _ = self.conn.roll_back();
            return Err(e);
        }
        self.conn.check_group();
        // Another process writes to this file: commit at once rather than hold its lock.
        let alone = self.conn.shared();
        let Some(group) = self.conn.group.as_mut() else {
            return Err(Failure {
                code: rusqlite::ffi::SQLITE_ABORT,
                message: "the shared transaction was rolled back by an error".into(),
            }
            .error());
        };
        group.after.0.extend(after.0);
        if alone
            || group.waiting.len() + 1 >= GROUP_MAX
            || tokio::runtime::Handle::try_current().is_err()
        {
            return self.conn.commit_group().map_err(|f| f.error());
        }
        let (done, outcome) = oneshot::channel();
        group.waiting.push(done);
        if group.waiting.len() == 1 {
            schedule_commit(OwnedMutexGuard::mutex(&self.conn).clone());
        }
        // Lets go of the writer: the next transactions join the group.
        drop(self);
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => Err(failure.error()),
            Err(_) => Err(Failure {
                code: rusqlite::ffi::SQLITE_ABORT,
                message: "the writer closed before the commit".into(),
            }
            .error()),
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
        Tx(TxConn::new(TxKind::Sqlx(tx)))
    }

    /// Commits, then runs what [`TxConn::after_commit`] was given.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        let TxConn { kind, after_commit } = self.0;
        match kind {
            TxKind::Sqlx(tx) => {
                tx.commit().await?;
                for f in after_commit.0 {
                    f();
                }
                Ok(())
            }
            TxKind::Inline(tx) => tx.commit(after_commit).await,
        }
    }

    /// Rolls back (what dropping it does too).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self.0.kind {
            TxKind::Sqlx(tx) => tx.rollback().await,
            TxKind::Inline(mut tx) => {
                tx.open = false;
                tx.conn.roll_back()
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
        match self {
            TxConn {
                kind: TxKind::Sqlx(tx),
                ..
            } => (&mut **tx).fetch_many(query),
            TxConn {
                kind: TxKind::Inline(tx),
                ..
            } => {
                let taken = take(query);
                stream::once(async move {
                    tokio::task::consume_budget().await;
                    stream_of(taken.and_then(|(sql, args)| tx.run(sql.as_str(), args.as_ref())))
                })
                .flatten()
                .boxed()
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
        match self {
            TxConn {
                kind: TxKind::Sqlx(tx),
                ..
            } => (&mut **tx).fetch_optional(query),
            TxConn {
                kind: TxKind::Inline(tx),
                ..
            } => {
                let taken = take(query);
                Box::pin(async move {
                    // Statements here never wait, so a loop of them would never give the
                    // thread up: each spends the task's budget (tokio's cooperative yield).
                    tokio::task::consume_budget().await;
                    let (sql, args) = taken?;
                    Ok(tx.run(sql.as_str(), args.as_ref())?.0.into_iter().next())
                })
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
        match &mut self.kind {
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
        match &mut self.kind {
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
