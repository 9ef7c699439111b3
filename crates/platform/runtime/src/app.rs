//! One router per process: the service's HTTP routes and gRPC services, plus what every process
//! serves and does for every request.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderName, HeaderValue, StatusCode, header};
use serde_json::json;
use shopmesh_problem::{InternalCause, Kind, Problem};
use tonic::server::NamedService;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::telemetry;

/// The header that carries a request's id across every hop.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

type CheckFn = dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync;

/// One named readiness check, e.g. "database": can we run a query?
#[derive(Clone)]
pub struct ReadinessCheck {
    name: String,
    check: Arc<CheckFn>,
}

impl ReadinessCheck {
    /// A check named `name` that runs `check` on every `/readyz`.
    pub fn new<F, Fut>(name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        ReadinessCheck {
            name: name.into(),
            check: Arc::new(move || Box::pin(check())),
        }
    }
}

/// Builds a process's router.
pub struct App {
    service: &'static str,
    router: Router,
    checks: Vec<ReadinessCheck>,
    openapi: Option<utoipa::openapi::OpenApi>,
    mesh: Option<shopmesh_mesh::Mesh>,
    /// The routes of the gRPC services added (`/pkg.Service/{*method}`): the only ones whose
    /// concrete path may label a metric.
    grpc_routes: BTreeSet<String>,
}

impl App {
    /// An app for the service called `service` (used in logs and `/healthz`).
    pub fn new(service: &'static str) -> Self {
        App {
            service,
            router: Router::new(),
            checks: Vec::new(),
            openapi: None,
            mesh: None,
            grpc_routes: BTreeSet::new(),
        }
    }

    /// Adds HTTP routes.
    pub fn http(mut self, routes: Router) -> Self {
        self.router = self.router.merge(routes);
        self
    }

    /// Adds a gRPC service; it shares the port with HTTP (gRPC is HTTP/2 on its own paths).
    pub fn grpc<S>(mut self, service: S) -> Self
    where
        S: tower::Service<Request, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: IntoResponse,
        S::Future: Send + 'static,
    {
        let route = format!("/{}/{{*method}}", S::NAME);
        self.router = self.router.route_service(&route, service);
        self.grpc_routes.insert(route);
        self
    }

    /// Serves this OpenAPI document (of the routes added with it) at `/openapi.json`; the
    /// gateway merges the services' documents into the public one.
    pub fn openapi(mut self, doc: utoipa::openapi::OpenApi) -> Self {
        self.openapi = Some(doc);
        self
    }

    /// Serves this mesh's state (its upstreams, endpoints, breakers) at `/internal/mesh`; the
    /// gateway's cluster view gathers them.
    pub fn mesh(mut self, mesh: shopmesh_mesh::Mesh) -> Self {
        self.mesh = Some(mesh);
        self
    }

    /// Adds a readiness check run by `/readyz`.
    pub fn readiness(mut self, check: ReadinessCheck) -> Self {
        self.checks.push(check);
        self
    }

    /// The finished router, with the platform endpoints and middleware.
    pub fn into_router(self) -> Router {
        let service = self.service;
        let checks = Arc::new(self.checks);
        let platform = Router::new()
            .route(
                "/healthz",
                get(move || async move { axum::Json(json!({"status": "ok", "service": service})) }),
            )
            .route("/readyz", get(move || readyz(checks.clone())))
            .route("/metrics", get(metrics_text));
        let platform = match self.openapi {
            Some(doc) => {
                let doc = Arc::new(doc);
                platform.route(
                    "/openapi.json",
                    get(move || {
                        let doc = doc.clone();
                        async move { axum::Json(doc.as_ref().clone()) }
                    }),
                )
            }
            None => platform,
        };

        let platform = match self.mesh {
            Some(mesh) => platform.route(
                "/internal/mesh",
                get(move || {
                    let mesh = mesh.clone();
                    async move { axum::Json(mesh.snapshot()) }
                }),
            ),
            None => platform,
        };

        // Installs the recorder before the first request is counted.
        telemetry::prometheus();

        let routes = self
            .router
            .merge(platform)
            .fallback(|| async { Problem::route_not_found() })
            .method_not_allowed_fallback(|| async {
                Problem::new(
                    Kind::MethodNotAllowed,
                    "method_not_allowed",
                    "Method not allowed",
                )
            })
            // The one layer that needs the matched route (its metrics are labelled by it), so
            // the one inside the router. `Router::layer` wraps each route in its own boxed
            // service, cloned for every request at every level: one level, not one per concern
            // (metrics, deadline, cause), saves a boxed clone per concern and request.
            .layer(middleware::from_fn_with_state(
                Arc::new(self.grpc_routes),
                track_metrics,
            ));
        // The rest wraps the whole router once: built once, not per route, its clone per
        // request an `Arc`'s.
        let layered = ServiceBuilder::new()
            // Outermost first: the id is set before the span opens, so the span carries it.
            .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
            .layer(PropagateRequestIdLayer::new(REQUEST_ID))
            .layer(
                TraceLayer::new_for_http()
                    // A 5xx is logged where its cause is known (internal error, upstream
                    // failure); a second generic ERROR line per request is noise.
                    .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG))
                    .make_span_with(|req: &Request| {
                        let id = req
                            .headers()
                            .get(REQUEST_ID)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-");
                        tracing::info_span!(
                            "request",
                            method = %req.method(),
                            path = %req.uri().path(),
                            request_id = %id,
                        )
                    }),
            )
            .layer(CatchPanicLayer::custom(|_| {
                Problem::internal().into_response()
            }))
            .service(routes);
        Router::new().fallback_service(layered)
    }
}

/// Logs the cause of a 500 (`Problem::internal_caused_by`) once, inside the request's span,
/// so the line carries the request id; handlers and error types never log it themselves.
fn log_internal_cause(response: Response) -> Response {
    if let Some(InternalCause(cause)) = response.extensions().get::<InternalCause>() {
        tracing::error!(error = %cause, "internal error");
    }
    response
}

async fn readyz(checks: Arc<Vec<ReadinessCheck>>) -> Response {
    let mut results = BTreeMap::new();
    let mut ready = true;
    for check in checks.iter() {
        let outcome = match tokio::time::timeout(CHECK_TIMEOUT, (check.check)()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => {
                ready = false;
                format!("failing: {e}")
            }
            Err(_) => {
                ready = false;
                "failing: timed out".to_owned()
            }
        };
        results.insert(check.name.clone(), outcome);
    }
    let (status, word) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    (
        status,
        axum::Json(json!({"status": word, "checks": results})),
    )
        .into_response()
}

async fn metrics_text() -> Response {
    let body = telemetry::prometheus().render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

/// Stops working on a request once the deadline its caller sent (`grpc-timeout` or
/// `x-deadline-ms`) has passed, and hands what is left to every call made meanwhile: the
/// caller has given up, so finishing would only spend resources. A gRPC caller gets
/// `DEADLINE_EXCEEDED`, an HTTP caller a 504 problem. Handlers are written so that being
/// stopped between two awaits is safe (the saga resumes interrupted steps).
async fn enforce_deadline(req: Request, next: Next) -> Response {
    let Some(deadline) =
        shopmesh_mesh::deadline::from_headers(req.headers(), tokio::time::Instant::now())
    else {
        return log_internal_cause(next.run(req).await);
    };
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let run = shopmesh_mesh::deadline::scope(deadline, next.run(req));
    match tokio::time::timeout_at(deadline, run).await {
        Ok(response) => log_internal_cause(response),
        Err(_) => {
            metrics::counter!("http_deadline_exceeded_total").increment(1);
            tracing::info!("the caller's deadline passed; request abandoned");
            if is_grpc {
                let mut response = StatusCode::OK.into_response();
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                headers.insert("grpc-status", HeaderValue::from_static("4"));
                headers.insert(
                    "grpc-message",
                    HeaderValue::from_static("the caller's deadline passed"),
                );
                response
            } else {
                Problem::new(Kind::Timeout, "deadline_exceeded", "Deadline exceeded")
                    .with_detail("The caller's deadline passed before the request was done.")
                    .into_response()
            }
        }
    }
}

/// Counts requests and records their latency per route template (never per raw path, which
/// would let clients create unbounded label values).
/// A request method as a metric label: the standard ones, else `other` (a label per made-up
/// method would grow the series without bound).
fn method_label(method: &http::Method) -> &'static str {
    use http::Method as M;
    match *method {
        M::GET => "GET",
        M::HEAD => "HEAD",
        M::POST => "POST",
        M::PUT => "PUT",
        M::PATCH => "PATCH",
        M::DELETE => "DELETE",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
}

/// The counter and histogram of one (method, route, status), registered on first use and kept:
/// a registration hashes the name and labels and allocates them, per request where it is done
/// per request (a tenth of the gateway's instructions for a proxied request went to metrics).
/// Bounded as the series are: by the closed label sets (see [`track_metrics`]). A kept handle
/// relies on the recorder never dropping a series (no idle timeout is configured): one it
/// dropped would no longer be rendered.
struct RouteMetrics {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

type RouteMetricsCache = HashMap<(&'static str, u16), HashMap<Box<str>, RouteMetrics>>;

impl RouteMetrics {
    fn record(method: &'static str, route: &str, status: u16, seconds: f64) {
        // Read-locked once the set is known (every request but each series' first), so the
        // workers of a multi-thread process do not queue on it.
        static CACHE: LazyLock<RwLock<RouteMetricsCache>> = LazyLock::new(RwLock::default);
        if let Some(handles) = CACHE
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(method, status))
            .and_then(|by_route| by_route.get(route))
        {
            handles.requests.increment(1);
            handles.duration.record(seconds);
            return;
        }
        let mut cache = CACHE
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let by_route = cache.entry((method, status)).or_default();
        if !by_route.contains_key(route) {
            let labels = [
                ("method", method.to_owned()),
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ];
            let handles = RouteMetrics {
                requests: metrics::counter!("http_requests_total", &labels),
                duration: metrics::histogram!("http_request_duration_seconds", &labels),
            };
            by_route.insert(route.into(), handles);
        }
        if let Some(handles) = by_route.get(route) {
            handles.requests.increment(1);
            handles.duration.record(seconds);
        }
    }
}

/// Counts and times each request by method, route and status. Every label comes from a closed
/// set: a standard method or `other`, a route template or `unmatched`, and for a gRPC service's
/// route the concrete method only when the service has it (an unknown one answers
/// `UNIMPLEMENTED` and counts as `<route> unimplemented`). Series are never removed, so a label
/// taken from what a client sends would let anyone grow this process's memory.
async fn track_metrics(
    axum::extract::State(grpc_routes): axum::extract::State<Arc<BTreeSet<String>>>,
    req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let path = matched
        .as_ref()
        .filter(|m| is_grpc && grpc_routes.contains(m.as_str()))
        .map(|_| req.uri().path().to_owned());
    let template = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let response = enforce_deadline(req, next).await;
    let unimplemented;
    let route = match &path {
        // Trailers-only answers carry the status in the headers; 12 is UNIMPLEMENTED.
        Some(_)
            if response
                .headers()
                .get("grpc-status")
                .is_some_and(|s| s == "12") =>
        {
            unimplemented = format!("{template} unimplemented");
            unimplemented.as_str()
        }
        Some(path) => path.as_str(),
        None => template,
    };
    RouteMetrics::record(
        method,
        route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}
