//! What one write transaction and one point read cost through each way of reaching SQLite
//! (issue 9, bench/README "The SQLite driver"): sqlx's `Any` pool (what the services use),
//! sqlx's typed SQLite pool, and rusqlite on a dedicated thread (one hand-off per transaction,
//! or several callers' transactions committed together) or on the caller's own thread.
//!
//! Run it confined to one core, as `shopmesh up` runs a service on two cores:
//!
//! ```sh
//! taskset -c 1 cargo run --release -p shopmesh-db --example sqlite_paths
//! ```
//!
//! Prints, per path, transactions per second and CPU microseconds per transaction (all threads
//! of the process: /proc/self/stat), with `TASKS` callers at once. The transaction is the
//! shape of a purchase's writes: `BEGIN IMMEDIATE`, a guarded `UPDATE` of one row, an `INSERT`
//! into an outbox, `COMMIT`; WAL and `synchronous = NORMAL`, as the services run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::any::AnyPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AnyPool, Executor, SqlitePool};

const TASKS: usize = 16;
const ROWS: i64 = 10_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let per_path: usize = std::env::var("TXS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    runtime.block_on(async move {
        println!(
            "{TASKS} callers, {per_path} transactions and {per_path} reads per path, {} core(s)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("{:<44} {:>10} {:>14}", "path", "per s", "CPU µs each");
        let dir = tempfile::tempdir().expect("temp dir");
        sqlx::any::install_default_drivers();

        let any = any_pool(&dir.path().join("any.db")).await;
        measure("sqlx Any pool, write transaction", per_path, {
            let pool = any.clone();
            move |i| {
                let pool = pool.clone();
                async move { any_write(&pool, i).await }
            }
        })
        .await;
        measure("sqlx Any pool, point read", per_path, {
            let pool = any.clone();
            move |i| {
                let pool = pool.clone();
                async move { any_read(&pool, i).await }
            }
        })
        .await;
        any.close().await;

        let typed = typed_pool(&dir.path().join("typed.db")).await;
        measure("sqlx SqlitePool, write transaction", per_path, {
            let pool = typed.clone();
            move |i| {
                let pool = pool.clone();
                async move { typed_write(&pool, i).await }
            }
        })
        .await;
        typed.close().await;

        let thread = Writer::start(open(&dir.path().join("thread.db")), false);
        measure("rusqlite thread, one transaction each", per_path, {
            let writer = thread.clone();
            move |i| {
                let writer = writer.clone();
                async move { writer.run(move |c| write(c, i)).await }
            }
        })
        .await;

        let grouped = Writer::start(open(&dir.path().join("grouped.db")), true);
        measure("rusqlite thread, transactions grouped", per_path, {
            let writer = grouped.clone();
            move |i| {
                let writer = writer.clone();
                async move { writer.run(move |c| write(c, i)).await }
            }
        })
        .await;

        let inline = Arc::new(tokio::sync::Mutex::new(open(&dir.path().join("inline.db"))));
        measure("rusqlite on the caller's thread, write", per_path, {
            let conn = inline.clone();
            move |i| {
                let conn = conn.clone();
                async move {
                    let mut c = conn.lock().await;
                    let tx = c
                        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                        .expect("begin");
                    update_and_append(&tx, i);
                    tx.commit().expect("commit");
                }
            }
        })
        .await;
        measure("rusqlite on the caller's thread, point read", per_path, {
            let conn = inline.clone();
            move |i| {
                let conn = conn.clone();
                async move {
                    let c = conn.lock().await;
                    read(&c, i);
                }
            }
        })
        .await;
    });
}

/// Runs `per_path` calls of `op` from `TASKS` tasks at once; prints the rate and CPU per call.
async fn measure<F, Fut>(name: &str, per_path: usize, op: F)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let cpu_before = cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < per_path {
                op(i).await;
                i += TASKS;
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let wall = started.elapsed();
    let cpu = cpu() - cpu_before;
    #[allow(clippy::cast_precision_loss)]
    let (rate, each) = (
        per_path as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / per_path as f64,
    );
    println!("{name:<44} {rate:>10.0} {each:>14.1}");
}

/// CPU time of the whole process (every thread) so far.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

const SCHEMA: &str = "CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL, \
                      version INTEGER NOT NULL, updated_at INTEGER NOT NULL); \
                      CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                      aggregate TEXT NOT NULL, payload TEXT NOT NULL, created_at INTEGER NOT NULL);";
const UPDATE: &str = "UPDATE orders SET version = version + 1, updated_at = $1 \
                      WHERE id = $2 AND status = $3";
const APPEND: &str = "INSERT INTO outbox (aggregate, payload, created_at) VALUES ($1, $2, $3)";
const READ: &str = "SELECT id, status, version, updated_at FROM orders WHERE id = $1";
const PAYLOAD: &str =
    r#"{"order_id":"00000000-0000-0000-0000-000000000000","total":1999,"currency":"EUR"}"#;

fn id(i: usize) -> String {
    format!("order-{:08}", (i as i64) % ROWS)
}

async fn any_pool(path: &std::path::Path) -> AnyPool {
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
                    .await?;
                Ok(())
            })
        })
        .connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .expect("any pool");
    pool.execute(SCHEMA).await.expect("schema");
    let mut tx = pool.begin().await.expect("begin");
    for i in 0..ROWS {
        sqlx::query("INSERT INTO orders VALUES ($1, 'awaiting_payment', 0, 0)")
            .bind(id(i as usize))
            .execute(&mut *tx)
            .await
            .expect("seed");
    }
    tx.commit().await.expect("commit");
    pool
}

async fn any_write(pool: &AnyPool, i: usize) {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
    let done = sqlx::query(UPDATE)
        .bind(i as i64)
        .bind(id(i))
        .bind("awaiting_payment")
        .execute(&mut *tx)
        .await
        .expect("update");
    assert_eq!(done.rows_affected(), 1);
    sqlx::query(APPEND)
        .bind(id(i))
        .bind(PAYLOAD)
        .bind(i as i64)
        .execute(&mut *tx)
        .await
        .expect("append");
    tx.commit().await.expect("commit");
}

async fn any_read(pool: &AnyPool, i: usize) {
    let row: (String, String, i64, i64) = sqlx::query_as(READ)
        .bind(id(i))
        .fetch_one(pool)
        .await
        .expect("read");
    assert_eq!(row.1, "awaiting_payment");
}

async fn typed_pool(path: &std::path::Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .expect("typed pool");
    pool.execute(SCHEMA).await.expect("schema");
    let mut tx = pool.begin().await.expect("begin");
    for i in 0..ROWS {
        sqlx::query("INSERT INTO orders VALUES ($1, 'awaiting_payment', 0, 0)")
            .bind(id(i as usize))
            .execute(&mut *tx)
            .await
            .expect("seed");
    }
    tx.commit().await.expect("commit");
    pool
}

async fn typed_write(pool: &SqlitePool, i: usize) {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
    let done = sqlx::query(UPDATE)
        .bind(i as i64)
        .bind(id(i))
        .bind("awaiting_payment")
        .execute(&mut *tx)
        .await
        .expect("update");
    assert_eq!(done.rows_affected(), 1);
    sqlx::query(APPEND)
        .bind(id(i))
        .bind(PAYLOAD)
        .bind(i as i64)
        .execute(&mut *tx)
        .await
        .expect("append");
    tx.commit().await.expect("commit");
}

fn open(path: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .expect("pragmas");
    conn.execute_batch(SCHEMA).expect("schema");
    conn.execute_batch("BEGIN").expect("begin");
    for i in 0..ROWS {
        conn.execute(
            "INSERT INTO orders VALUES ($1, 'awaiting_payment', 0, 0)",
            [id(i as usize)],
        )
        .expect("seed");
    }
    conn.execute_batch("COMMIT").expect("commit");
    conn
}

fn update_and_append(c: &rusqlite::Connection, i: usize) {
    let done = c
        .prepare_cached(UPDATE)
        .and_then(|mut s| s.execute(rusqlite::params![i as i64, id(i), "awaiting_payment"]))
        .expect("update");
    assert_eq!(done, 1);
    c.prepare_cached(APPEND)
        .and_then(|mut s| s.execute(rusqlite::params![id(i), PAYLOAD, i as i64]))
        .expect("append");
}

fn write(c: &mut rusqlite::Connection, i: usize) {
    update_and_append(c, i);
}

fn read(c: &rusqlite::Connection, i: usize) {
    let status: String = c
        .prepare_cached(READ)
        .and_then(|mut s| s.query_row([id(i)], |r| r.get(1)))
        .expect("read");
    assert_eq!(status, "awaiting_payment");
}

type Job = Box<dyn FnOnce(&mut rusqlite::Connection) + Send>;

/// One connection on its own thread, fed closures. Each closure runs inside a transaction:
/// its own, or (`grouped`) one shared with every closure queued at the time, each in a
/// savepoint.
#[derive(Clone)]
struct Writer {
    jobs: std::sync::mpsc::Sender<(Job, tokio::sync::oneshot::Sender<()>)>,
}

impl Writer {
    fn start(mut conn: rusqlite::Connection, grouped: bool) -> Writer {
        let (jobs, queue) = std::sync::mpsc::channel::<(Job, tokio::sync::oneshot::Sender<()>)>();
        std::thread::spawn(move || {
            while let Ok(first) = queue.recv() {
                let mut batch = vec![first];
                if grouped {
                    batch.extend(queue.try_iter());
                }
                conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
                let mut done = Vec::with_capacity(batch.len());
                for (job, reply) in batch {
                    if grouped {
                        conn.execute_batch("SAVEPOINT job").expect("savepoint");
                    }
                    job(&mut conn);
                    if grouped {
                        conn.execute_batch("RELEASE job").expect("release");
                    }
                    done.push(reply);
                }
                conn.execute_batch("COMMIT").expect("commit");
                for reply in done {
                    let _ = reply.send(());
                }
            }
        });
        Writer { jobs }
    }

    async fn run(&self, job: impl FnOnce(&mut rusqlite::Connection) + Send + 'static) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs.send((Box::new(job), reply)).expect("writer gone");
        answer.await.expect("writer dropped the job");
    }
}
