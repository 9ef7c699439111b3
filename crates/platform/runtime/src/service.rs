//! The skeleton every service runs on: its bound [`Server`], the background tasks that run
//! beside it (workers, sweepers, event consumers, leases), and what must be closed after them
//! (the database, the event relay), stopped in one order by one piece of code.
//!
//! On shutdown: the server stops accepting and drains; then each task is told to stop, in the
//! reverse order it was added (a task added first, such as a lease, outlives the ones added
//! after it, such as the worker whose steps the lease covers), all of them within
//! [`TASK_GRACE`] together, past which the rest are aborted; then the closers run, in the order
//! added, whether the server failed or not. A process thus stops within the server's drain
//! grace plus [`TASK_GRACE`] plus its closers (`shopmesh up` waits longer than that before it
//! kills a child).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;

use crate::server::Server;

/// How long the background tasks may take, together, to stop once told to.
pub const TASK_GRACE: Duration = Duration::from_secs(5);

/// What a background task is given: it changes to `true` when the task must stop (finish what
/// it is doing, then return).
pub type Stopping = watch::Receiver<bool>;

/// Completes once `stopping` says stop (or its sender is gone).
pub async fn stopped(mut stopping: Stopping) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
type Start = Box<dyn FnOnce(Stopping) -> BoxFuture + Send + 'static>;

/// A service built and bound, not yet serving: see the module's documentation.
pub struct Service {
    server: Server,
    tasks: Vec<(&'static str, Start)>,
    closers: Vec<BoxFuture>,
    task_grace: Duration,
}

impl Service {
    /// A service of `server` alone.
    pub fn new(server: Server) -> Self {
        Service {
            server,
            tasks: Vec::new(),
            closers: Vec::new(),
            task_grace: TASK_GRACE,
        }
    }

    /// Runs `task` beside the server once it serves; it is told to stop after the drain.
    pub fn task<F, Fut>(mut self, name: &'static str, task: F) -> Self
    where
        F: FnOnce(Stopping) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks
            .push((name, Box::new(move |stopping| Box::pin(task(stopping)))));
        self
    }

    /// Runs `task`, which has nothing to finish (a cache sweeper, a key loader), beside the
    /// server; it is dropped where it stands when told to stop.
    pub fn cancellable(
        self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        self.task(name, move |stopping| async move {
            tokio::select! {
                () = task => {}
                () = stopped(stopping) => {}
            }
        })
    }

    /// Runs `close` after every task has stopped (closing the database, stopping the relay).
    pub fn on_stop(mut self, close: impl Future<Output = ()> + Send + 'static) -> Self {
        self.closers.push(Box::pin(close));
        self
    }

    /// How long the tasks may take to stop, together (tests shorten it).
    pub fn task_grace(mut self, grace: Duration) -> Self {
        self.task_grace = grace;
        self
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// Starts the tasks, serves until `shutdown` completes and the requests drained, then
    /// stops the tasks and runs the closers (see the module's documentation).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let running: Vec<_> = self
            .tasks
            .into_iter()
            .map(|(name, start)| {
                let (stop, stopping) = watch::channel(false);
                (name, stop, tokio::spawn(start(stopping)))
            })
            .collect();
        let result = self.server.run_until(shutdown).await;
        let deadline = tokio::time::Instant::now() + self.task_grace;
        for (name, stop, mut task) in running.into_iter().rev() {
            let _ = stop.send(true);
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "background task failed"),
                Err(_) => {
                    tracing::warn!(
                        task = name,
                        grace_secs = self.task_grace.as_secs_f64(),
                        "background task did not stop in time; aborted"
                    );
                    task.abort();
                }
            }
        }
        for close in self.closers {
            close.await;
        }
        Ok(result?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::settings::ServerSettings;

    async fn server() -> Server {
        let settings = ServerSettings {
            port: 0,
            ..Default::default()
        };
        Server::bind("test", &settings, axum::Router::new())
            .await
            .expect("bind")
    }

    /// A log of what happened, in order.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl Log {
        fn push(&self, what: impl Into<String>) {
            self.0.lock().expect("log").push(what.into());
        }
        fn entries(&self) -> Vec<String> {
            self.0.lock().expect("log").clone()
        }
    }

    #[tokio::test]
    async fn tasks_stop_after_the_drain_last_added_first_then_the_closers_run() {
        let log = Log::default();
        let (shut, shutdown) = tokio::sync::oneshot::channel::<()>();
        let task = |name: &'static str| {
            let log = log.clone();
            move |stopping: Stopping| async move {
                log.push(format!("{name} started"));
                stopped(stopping).await;
                log.push(format!("{name} stopped"));
            }
        };
        let closer = |name: &'static str| {
            let log = log.clone();
            async move { log.push(format!("{name} closed")) }
        };
        let service = Service::new(server().await)
            .task("lease", task("lease"))
            .task("worker", task("worker"))
            .on_stop(closer("relay"))
            .on_stop(closer("database"));
        let running = tokio::spawn(service.run_until(async move {
            let _ = shutdown.await;
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        log.push("shutdown");
        let _ = shut.send(());
        running.await.expect("join").expect("run");
        let entries = log.entries();
        assert_eq!(
            &entries[2..],
            [
                "shutdown",
                "worker stopped",
                "lease stopped",
                "relay closed",
                "database closed"
            ],
            "{entries:?}"
        );
        assert!(
            entries[..2].contains(&"lease started".to_owned()),
            "{entries:?}"
        );
        assert!(
            entries[..2].contains(&"worker started".to_owned()),
            "{entries:?}"
        );
    }

    #[tokio::test]
    async fn a_task_that_ignores_the_stop_is_aborted_and_the_closers_still_run() {
        let log = Log::default();
        let closed = log.clone();
        let service = Service::new(server().await)
            .task("stubborn", |_stopping| std::future::pending::<()>())
            .task_grace(Duration::from_millis(50))
            .on_stop(async move { closed.push("database closed") });
        tokio::time::timeout(Duration::from_secs(5), service.run_until(async {}))
            .await
            .expect("stops although a task does not")
            .expect("run");
        assert_eq!(log.entries(), ["database closed"]);
    }
}
