//! Binding, serving and stopping.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use http::Request;
use hyper::body::Incoming;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::settings::ServerSettings;

/// A process's router, bound to its port, not yet serving.
pub struct Server {
    service: &'static str,
    listener: TcpListener,
    router: Router,
    grace: Duration,
    limits: Limits,
}

/// What one client may hold of a server (from [`ServerSettings`]): a connection that sends no
/// complete request head within `header_read_timeout` (a slow client, or an idle kept-alive
/// one) is closed; a body that takes longer than `body_read_timeout` fails its request; past
/// `max_connections` new connections are closed at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to send a request's headers.
    pub header_read_timeout: Duration,
    /// Time to send a request's body.
    pub body_read_timeout: Duration,
    /// Connections at once.
    pub max_connections: usize,
}

impl Server {
    /// Binds `settings`' address for `router` (port 0 picks a free port, as tests do).
    pub async fn bind(
        service: &'static str,
        settings: &ServerSettings,
        router: Router,
    ) -> anyhow::Result<Server> {
        let router = if settings.fault_injection {
            if !settings.host.is_loopback() {
                anyhow::bail!(
                    "invalid configuration: server.fault_injection (SHOPMESH_SERVER__FAULT_INJECTION) \
                     is for local fault testing and is refused on {}: listen on a loopback address",
                    settings.host
                );
            }
            tracing::warn!(
                service,
                "fault injection is on: POST /internal/faults delays requests"
            );
            crate::faults::install(router)
        } else {
            router
        };
        Ok(Server {
            service,
            listener: bind(settings).await?,
            router,
            grace: settings.grace(),
            limits: settings.limits(),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then drains (see [`serve`]).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = self.local_addr()?;
        tracing::info!(service = self.service, %addr, "listening");
        serve(
            self.listener,
            self.router,
            shutdown,
            self.grace,
            self.limits,
        )
        .await
    }
}

/// Binds the configured address; the error names the address and keeps the `io::Error` as its
/// source (`shopmesh serve` tells an address in use apart by its exit status).
pub async fn bind(settings: &ServerSettings) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    let addr = settings.addr();
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Serves `router` on `listener` (HTTP/1.1 and HTTP/2, so gRPC too) within `limits`, until
/// `shutdown` completes; then stops accepting, lets in-flight requests finish for at most
/// `grace`, and returns. Written on hyper-util's connection builder rather than `axum::serve`,
/// which has no header-read timeout and no connection bound.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    limits: Limits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    // One timer for the whole body (not one per chunk: a byte every so often would never
    // trip that).
    // Around the router, not through `Router::layer` (which wraps each route in a boxed
    // service of its own, cloned per request).
    let router = tower::Layer::layer(
        &tower_http::timeout::RequestBodyDeadlineLayer::new(limits.body_read_timeout),
        router,
    );
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // HTTP/2 has no header timeout: an idle or silent peer is pinged, and dropped if it does
    // not answer in time.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    // Every connection's task, so those still running when the grace runs out are ended.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                // A connection that failed before we took it: nothing to do.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                ) => continue,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // Without it, a response written in two parts (gRPC's trailers after its message,
        // a body after its head) waits for the peer's delayed acknowledgement of the first
        // (Nagle's algorithm): milliseconds per call, on loopback too.
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("http_connections_shed_total").increment(1);
            drop(stream);
            continue;
        };
        let router = router.clone();
        let spoke = Arc::new(AtomicBool::new(false));
        let service = {
            let spoke = spoke.clone();
            hyper::service::service_fn(move |mut request: Request<Incoming>| {
                spoke.store(true, Ordering::Relaxed);
                request.extensions_mut().insert(ConnectInfo(peer));
                tower::ServiceExt::oneshot(router.clone(), request.map(axum::body::Body::new))
            })
        };
        let connection = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        let header_read_timeout = limits.header_read_timeout;
        connections.spawn(async move {
            // A connection that has not made one request within the header timeout is
            // dropped: hyper's own timer starts only once it knows the protocol, so a client
            // that connects and stays silent would otherwise hold its slot for good.
            let silent = async {
                tokio::time::sleep(header_read_timeout).await;
                if spoke.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                // An error here is the client's doing (gone, too slow): nothing to report.
                _ = connection => {}
                () = silent => {}
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => Ok(()),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over; dropping remaining connections");
            connections.abort_all();
            Ok(())
        }
    }
}

/// Completes on Ctrl-C or SIGTERM. On Unix the handlers are installed when this is called, not
/// when the future is first polled (elsewhere, Ctrl-C's on the first poll): a process that calls it first thing stops cleanly on a SIGTERM
/// that arrives while it is still starting (the default action would kill it outright).
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        async fn received(signal: Option<Signal>) {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        let term = received(signal(SignalKind::terminate()).ok());
        let interrupt = received(signal(SignalKind::interrupt()).ok());
        async move {
            tokio::select! {
                () = term => {},
                () = interrupt => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{App, ReadinessCheck};
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn start(app: App) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            app.into_router(),
            async {
                let _ = rx.await;
            },
            Duration::from_secs(1),
            ServerSettings::default().limits(),
        ));
        (addr, tx)
    }

    #[tokio::test]
    async fn healthz_readyz_and_metrics_are_served_and_unknown_routes_are_problems() {
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        let app = App::new("test")
            .http(Router::new().route("/hello/{name}", axum::routing::get(|| async { "hi" })))
            .readiness(ReadinessCheck::new("flag", move || {
                let ok = flag.load(Ordering::SeqCst);
                async move { if ok { Ok(()) } else { Err("down".into()) } }
            }));
        let (addr, _stop) = start(app).await;
        let client = reqwest::Client::new();
        let base = format!("http://{addr}");

        let r = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-request-id"));

        assert_eq!(
            client
                .get(format!("{base}/readyz"))
                .send()
                .await
                .expect("r")
                .status(),
            200
        );
        healthy.store(false, Ordering::SeqCst);
        assert_eq!(
            client
                .get(format!("{base}/readyz"))
                .send()
                .await
                .expect("r")
                .status(),
            503
        );

        client
            .get(format!("{base}/hello/x"))
            .send()
            .await
            .expect("hello");
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(metrics.contains("http_requests_total"), "{metrics}");
        assert!(metrics.contains(r#"route="/hello/{name}""#), "{metrics}");
        assert!(
            metrics.contains("http_request_duration_seconds_bucket"),
            "{metrics}"
        );

        let missing = client
            .get(format!("{base}/nope"))
            .send()
            .await
            .expect("404");
        assert_eq!(missing.status(), 404);
        assert_eq!(
            missing.headers()["content-type"],
            "application/problem+json"
        );
        let wrong_method = client
            .post(format!("{base}/healthz"))
            .send()
            .await
            .expect("405");
        assert_eq!(wrong_method.status(), 405);
        assert_eq!(
            wrong_method.headers()["content-type"],
            "application/problem+json"
        );
    }

    #[tokio::test]
    async fn a_client_supplied_request_id_is_kept() {
        let (addr, _stop) = start(App::new("test")).await;
        let r = reqwest::Client::new()
            .get(format!("http://{addr}/healthz"))
            .header("x-request-id", "abc-123")
            .send()
            .await
            .expect("send");
        assert_eq!(r.headers()["x-request-id"], "abc-123");
    }

    #[tokio::test]
    async fn the_server_stops_when_told_to() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(serve(
            listener,
            App::new("test").into_router(),
            async {
                let _ = rx.await;
            },
            Duration::from_secs(1),
            ServerSettings::default().limits(),
        ));
        tx.send(()).expect("send");
        let result = tokio::time::timeout(Duration::from_secs(5), handle).await;
        assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
    }
}
