//! Forwarding one request to its upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, uri::PathAndQuery};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use shopmesh_auth::Verifier;
use shopmesh_auth::extract::AuthRejection;
use shopmesh_mesh::{CallError, CallOptions, Upstream};
use shopmesh_problem::{Kind, Problem};

use crate::client::TrustedProxies;
use crate::config::AuthPolicy;
use crate::fallback::StaleCache;
use crate::ratelimit::RateLimits;

/// What a route needs to forward a request.
pub struct Target {
    /// The service's name (for logs and metrics).
    pub service: String,
    /// Its endpoints and the state of calls to them.
    pub upstream: Arc<Upstream>,
    /// Whether a token is required.
    pub auth: AuthPolicy,
    /// The route's deadline.
    pub timeout: Duration,
    /// Where anonymous GETs are kept to answer, stale, when the service cannot.
    pub fallback: Option<Arc<StaleCache>>,
    /// The route, for its retry-safe POSTs.
    pub route: crate::config::RouteConfig,
    /// Shared by every route.
    pub shared: Arc<Shared>,
}

/// What every route shares.
pub struct Shared {
    /// Checks tokens on protected routes.
    pub verifier: Verifier,
    /// Largest accepted body.
    pub body_limit: usize,
    /// Rate limits.
    pub limits: Arc<RateLimits>,
    /// Whose `X-Forwarded-For` is believed.
    pub proxies: TrustedProxies,
}

/// The header a client sends to make a POST safe to repeat.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Whether sending the request twice is harmless: an idempotent method (RFC 9110 §9.2.2), or
/// a POST/PATCH carrying an `Idempotency-Key` (the service answers a repeat with the first
/// answer).
fn retry_safe(method: &Method, headers: &HeaderMap) -> bool {
    idempotent(method) || headers.contains_key(IDEMPOTENCY_KEY)
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// Headers that describe one connection, not the request, and must not be forwarded
/// (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there is none: one look at each name then, not a removal (a hash) per kind.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Forwards the request to the route's upstream.
pub async fn forward(
    State(target): State<Arc<Target>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    match try_forward(&target, peer, request).await {
        Ok(response) => response,
        Err(rejection) => rejection,
    }
}

async fn try_forward(
    target: &Target,
    peer: SocketAddr,
    request: Request,
) -> Result<Response, Response> {
    let shared = &target.shared;
    let (mut parts, body) = request.into_parts();
    let client = shared.proxies.client(peer.ip(), &parts.headers);
    shared
        .limits
        .check_ip(client)
        .map_err(IntoResponse::into_response)?;

    if target.auth == AuthPolicy::Required {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let claims = shared
            .verifier
            .verify_header(value)
            .await
            .map_err(|e| AuthRejection(e).into_response())?;
        shared
            .limits
            .check_user(claims.sub)
            .map_err(IntoResponse::into_response)?;
    }

    let too_large = || {
        Problem::new(
            Kind::PayloadTooLarge,
            "payload_too_large",
            "Request body too large",
        )
        .with_detail(format!(
            "The body must be at most {} bytes.",
            shared.body_limit
        ))
        .into_response()
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > shared.body_limit) {
        return Err(too_large());
    }
    // Bodies are small JSON documents: buffering them (bounded) keeps the upstream from ever
    // seeing half a request and lets a later retry resend the same bytes.
    let body = match Limited::new(body, shared.body_limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(_) => {
            return Err(Problem::new(
                Kind::BadRequest,
                "unreadable_body",
                "Could not read the request body",
            )
            .into_response());
        }
    };
    shared
        .limits
        .check_login(parts.uri.path(), client, &body)
        .map_err(IntoResponse::into_response)?;

    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // Origin form for the upstream: the path and query as they were parsed, no reparse.
    parts.uri = http::Uri::from(path_and_query.clone());
    parts.version = http::Version::HTTP_11;

    let original_host = parts.headers.remove(header::HOST);
    strip_hop_by_hop(&mut parts.headers);
    // The gateway is the edge: it states who the client is rather than passing on what the
    // client (or an untrusted hop) claims.
    parts.headers.insert(
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::from_str(&client.to_string())
            .map_err(|_| Problem::internal().into_response())?,
    );
    parts.headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    if let Some(host) = original_host {
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    // Reads on these routes may be answered from the cache while fresh: an entry is fresh only
    // if the service marked it `public`, which says it is the same for everyone (RFC 9111
    // §3.5), so a signed-in reader may get it, and give it, too. Otherwise only anonymous
    // answers are kept (as stale fallbacks): an answer for a signed-in user may be theirs alone.
    let read_key = target.fallback.as_ref().and_then(|_| {
        (parts.method == Method::GET).then(|| crate::fallback::key(path_and_query.as_str()))
    });
    if let (Some(cache), Some(key)) = (&target.fallback, &read_key)
        && let Some(hit) = cache.fresh(key)
    {
        return Ok(hit);
    }
    let anonymous = !parts.headers.contains_key(header::AUTHORIZATION);
    let writes = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);

    let options = CallOptions {
        deadline: tokio::time::Instant::now() + target.timeout,
        retry_safe: retry_safe(&parts.method, &parts.headers)
            || (parts.method == Method::POST && target.route.retry_safe_post(parts.uri.path())),
        cut_slow_attempts: idempotent(&parts.method),
    };
    let upstream = http::Request::from_parts(parts, Full::new(body));
    let result = target.upstream.call(upstream, options).await;

    if let (Some(cache), Some(key)) = (&target.fallback, &read_key) {
        return Ok(cache
            .answer(key, anonymous, result, |e| upstream_error(target, &e))
            .await);
    }
    let response = result.map_err(|e| upstream_error(target, &e))?;
    if let Some(cache) = &target.fallback
        && writes
        && !response.status().is_client_error()
        && !response.status().is_server_error()
    {
        // A write (an admin's PUT, PATCH or DELETE of a product) went through: what is kept
        // may be out of date (RFC 9111 §4.4).
        cache.expire_fresh();
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The problem for a call that got no answer.
pub(crate) fn upstream_error(target: &Target, error: &CallError) -> Response {
    let service = &target.service;
    let kind = match error {
        CallError::NoEndpoints(_) => "no_endpoints",
        CallError::CircuitOpen(_) => "circuit_open",
        CallError::Overloaded(_) => "overloaded",
        CallError::Timeout(_) => "timeout",
        CallError::Connect(_) => "connect",
        CallError::Transport(_) => "transport",
    };
    metrics::counter!("gateway_upstream_errors_total", "service" => service.clone(), "kind" => kind).increment(1);
    match error {
        CallError::Timeout(_) => {
            tracing::warn!(service = %service, timeout_ms = target.timeout.as_millis() as u64, "upstream timed out");
            Problem::new(Kind::Timeout, "upstream_timeout", "Upstream timed out")
                .with_detail(format!("The {service} service did not answer in time."))
                .into_response()
        }
        CallError::Transport(_) => {
            tracing::warn!(service = %service, "upstream broke off the exchange");
            Problem::new(Kind::BadGateway, "bad_gateway", "Bad gateway")
                .with_detail(format!("The {service} service broke off the exchange."))
                .into_response()
        }
        CallError::CircuitOpen(_) => {
            Problem::new(Kind::Unavailable, "circuit_open", "Service unavailable")
                .with_detail(format!(
                    "The {service} service is failing; calls are paused for a few seconds."
                ))
                .with_retry_after(1)
                .into_response()
        }
        CallError::Overloaded(_) => Problem::new(
            Kind::Unavailable,
            "upstream_overloaded",
            "Service overloaded",
        )
        .with_detail(format!(
            "Too many requests to the {service} service are in progress; retry shortly."
        ))
        .with_retry_after(1)
        .into_response(),
        CallError::NoEndpoints(_) | CallError::Connect(_) => {
            tracing::warn!(service = %service, error = %error, "upstream unreachable");
            Problem::new(
                Kind::Unavailable,
                "upstream_unavailable",
                "Service unavailable",
            )
            .with_detail(format!(
                "The {service} service is not reachable; retry shortly."
            ))
            .with_retry_after(1)
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pairs = &'static [(&'static str, &'static str)];

    fn headers(pairs: Pairs) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed_and_the_rest_kept() {
        const JSON: (&str, &str) = ("content-type", "application/json");
        let cases: [(Pairs, Pairs); 5] = [
            // None of them: kept as they are (the early return).
            (
                &[JSON, ("x-multi", "1"), ("x-multi", "2")],
                &[JSON, ("x-multi", "1"), ("x-multi", "2")],
            ),
            // One kind alone is found.
            (&[JSON, ("keep-alive", "timeout=5")], &[JSON]),
            (&[("transfer-encoding", "chunked"), JSON], &[JSON]),
            // `Connection` alone takes the headers it names with it.
            (
                &[("connection", "x-secret"), ("x-secret", "1"), JSON],
                &[JSON],
            ),
            (
                &[
                    ("connection", "keep-alive, x-secret"),
                    ("keep-alive", "timeout=5"),
                    ("x-secret", "1"),
                    ("transfer-encoding", "chunked"),
                    JSON,
                ],
                &[JSON],
            ),
        ];
        for (given, kept) in cases {
            let mut stripped = headers(given);
            strip_hop_by_hop(&mut stripped);
            assert_eq!(stripped, headers(kept), "from {given:?}");
        }
    }
}
