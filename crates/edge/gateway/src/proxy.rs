//! Forwarding one request to its upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, uri::PathAndQuery};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use shopmesh_auth::Verifier;
use shopmesh_auth::extract::AuthRejection;
use shopmesh_problem::{Kind, Problem};

use crate::config::AuthPolicy;
use crate::ratelimit::RateLimits;

/// The pooled HTTP/1.1 client the gateway forwards with.
pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// A client with keep-alive pooling, `TCP_NODELAY` and a connect deadline.
pub fn client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// What a route needs to forward a request.
pub struct Target {
    /// The service's name (for logs and metrics).
    pub service: String,
    /// `scheme://authority` of the upstream.
    pub base: Uri,
    /// Whether a token is required.
    pub auth: AuthPolicy,
    /// Shared by every route.
    pub shared: Arc<Shared>,
}

/// What every route shares.
pub struct Shared {
    /// The pooled client.
    pub client: UpstreamClient,
    /// Checks tokens on protected routes.
    pub verifier: Verifier,
    /// Largest accepted body.
    pub body_limit: usize,
    /// Upstream deadline.
    pub timeout: Duration,
    /// Rate limits.
    pub limits: Arc<RateLimits>,
}

/// Headers that describe one connection, not the request, and must not be forwarded
/// (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    shared
        .limits
        .check_ip(peer.ip())
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
        .check_login(parts.uri.path(), peer.ip(), &body)
        .map_err(IntoResponse::into_response)?;

    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = target.base.clone().into_parts();
    uri.path_and_query = Some(path_and_query);
    parts.uri = Uri::from_parts(uri).map_err(|_| Problem::internal().into_response())?;
    parts.version = http::Version::HTTP_11;

    let original_host = parts.headers.remove(header::HOST);
    strip_hop_by_hop(&mut parts.headers);
    // The gateway is the edge: it states who the client is rather than trusting what the client
    // claims.
    parts.headers.insert(
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::from_str(&peer.ip().to_string())
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

    let upstream = http::Request::from_parts(parts, Full::new(body));
    let response = match tokio::time::timeout(shared.timeout, shared.client.request(upstream)).await
    {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return Err(upstream_error(&target.service, &e)),
        Err(_) => {
            metrics::counter!("gateway_upstream_errors_total", "service" => target.service.clone(), "kind" => "timeout").increment(1);
            tracing::warn!(service = %target.service, timeout_ms = shared.timeout.as_millis() as u64, "upstream timed out");
            return Err(
                Problem::new(Kind::Timeout, "upstream_timeout", "Upstream timed out")
                    .with_detail(format!(
                        "The {} service did not answer in time.",
                        target.service
                    ))
                    .into_response(),
            );
        }
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

fn upstream_error(service: &str, error: &hyper_util::client::legacy::Error) -> Response {
    let connect = error.is_connect();
    metrics::counter!(
        "gateway_upstream_errors_total",
        "service" => service.to_owned(),
        "kind" => if connect { "connect" } else { "transport" }
    )
    .increment(1);
    tracing::warn!(service, error = ?error, "upstream request failed");
    if connect {
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
    } else {
        Problem::new(Kind::BadGateway, "bad_gateway", "Bad gateway")
            .with_detail(format!("The {service} service broke off the exchange."))
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }
}
