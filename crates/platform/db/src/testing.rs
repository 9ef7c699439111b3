//! Fresh databases for tests.
//!
//! - [`TestDb::sqlite`]: a file in a new temp directory.
//! - [`TestDb::postgres`]: a new database on the server named by `TEST_POSTGRES_URL` (default
//!   `postgres://postgres@127.0.0.1:5432/postgres`), dropped when the `TestDb` is dropped.
//!
//! PostgreSQL policy: when `TEST_POSTGRES_URL` is set (CI sets it), PostgreSQL must be reachable
//! or the test fails. When it is unset and no server answers at the default address, the
//! PostgreSQL variant is skipped with a printed notice (a laptop without PostgreSQL). When
//! `TEST_POSTGRES_MARKER_DIR` is set, each PostgreSQL database created leaves a file there, so CI
//! can prove the PostgreSQL tests really ran.

use secrecy::{ExposeSecret, SecretString};
// The database names in the dynamic SQL below are generated here (`shopmesh_test_<uuid>`),
// never taken from input, hence `AssertSqlSafe`.
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

/// Declares each listed `async fn name(db: TestDb)` as two tests, `sqlite::name` and
/// `postgres::name`, each with a fresh database. (CI's PostgreSQL coverage check counts the
/// `postgres::` ones.)
#[macro_export]
macro_rules! test_on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test($crate::testing::TestDb::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    if let Some(db) = $crate::testing::TestDb::postgres().await {
                        super::$test(db).await;
                    }
                }
            )*
        }
    };
}

/// Environment variable naming the PostgreSQL server for tests (an admin database URL).
pub const POSTGRES_URL_VAR: &str = "TEST_POSTGRES_URL";
/// Environment variable naming a directory where each PostgreSQL test database leaves a marker.
pub const MARKER_DIR_VAR: &str = "TEST_POSTGRES_MARKER_DIR";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A throw-away database.
pub struct TestDb {
    url: SecretString,
    cleanup: Cleanup,
}

enum Cleanup {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, name: String },
}

impl TestDb {
    /// A new SQLite database file.
    pub fn sqlite() -> TestDb {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("cannot create a temp dir for the test database: {e}"),
        };
        let url = crate::sqlite_url(&dir.path().join("test.db"));
        TestDb {
            url: SecretString::from(url),
            cleanup: Cleanup::Sqlite(dir),
        }
    }

    /// A new PostgreSQL database, or `None` (with a notice) when PostgreSQL is not configured and
    /// not reachable at the default address.
    pub async fn postgres() -> Option<TestDb> {
        let name = format!("shopmesh_test_{}", uuid::Uuid::new_v4().simple());
        TestDb::postgres_named(name).await
    }

    /// One new PostgreSQL database per service, named `<prefix>_<service>`, and the URL template
    /// (`…/<prefix>_{service}`) that names them, for `SHOPMESH_LAUNCHER__DATABASE_URL_TEMPLATE`.
    /// `None` under the same conditions as [`TestDb::postgres`].
    pub async fn postgres_family(services: &[&str]) -> Option<(String, Vec<TestDb>)> {
        let prefix = format!("shopmesh_test_{}", uuid::Uuid::new_v4().simple());
        let mut dbs = Vec::with_capacity(services.len());
        for service in services {
            dbs.push(TestDb::postgres_named(format!("{prefix}_{service}")).await?);
        }
        let admin =
            std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
        Some((with_database(&admin, &format!("{prefix}_{{service}}")), dbs))
    }

    async fn postgres_named(name: String) -> Option<TestDb> {
        let configured = std::env::var(POSTGRES_URL_VAR).ok();
        let admin_url = configured
            .clone()
            .unwrap_or_else(|| DEFAULT_POSTGRES_URL.to_owned());
        let mut admin = match PgConnection::connect(&admin_url).await {
            Ok(conn) => conn,
            Err(e) if configured.is_none() => {
                eprintln!(
                    "NOTICE: skipping the PostgreSQL variant of this test: no server at \
                     {DEFAULT_POSTGRES_URL} ({e}). Set {POSTGRES_URL_VAR} to run it."
                );
                return None;
            }
            Err(e) => panic!("{POSTGRES_URL_VAR} is set but PostgreSQL is unreachable: {e}"),
        };
        if let Err(e) = admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
        {
            panic!("cannot create test database {name}: {e}");
        }
        let _ = admin.close().await;
        if let Ok(dir) = std::env::var(MARKER_DIR_VAR) {
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(std::path::Path::new(&dir).join(&name), b"");
        }
        Some(TestDb {
            url: SecretString::from(with_database(&admin_url, &name)),
            cleanup: Cleanup::Postgres { admin_url, name },
        })
    }

    /// The database URL.
    pub fn url(&self) -> &SecretString {
        &self.url
    }

    /// The database URL in clear, to hand to a child process.
    pub fn url_string(&self) -> String {
        self.url.expose_secret().to_owned()
    }
}

/// `postgres://u@h:5432/admin?x=y` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Cleanup::Postgres { admin_url, name } = &self.cleanup else {
            return;
        };
        let (admin_url, name) = (admin_url.clone(), name.clone());
        // Drop runs inside the test's runtime, which may be shutting down: use a thread with its
        // own small runtime, and wait for it so databases do not pile up.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = admin
                        .execute(AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_keeping_the_query() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "t2"),
            "postgres://u:p@h/t2?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "t3"),
            "postgres://h:5432/t3"
        );
    }
}
