//! The API gateway: the shop's one public door.
//!
//! # Layout
//! - [`config`]: `[gateway]`: upstream base URLs per service and the route table (path prefix →
//!   service, and whether a token is required), checked at start-up.
//! - [`proxy`]: forwarding: token check on protected routes, body cap (413), hop-by-hop headers
//!   removed, `X-Forwarded-*` set, a deadline on every upstream call (504), 503/502 problems when
//!   the upstream is down or breaks off, pooled keep-alive connections.
//! - [`client`]: who the client is (the peer, or behind `gateway.trusted_proxies` the first
//!   untrusted `X-Forwarded-For` address), and the key its limits count under (IPv6 by /64).
//! - [`ratelimit`]: per client IP, per user, and stricter per IP and account on `/login`;
//!   429 with `Retry-After` and `RateLimit` headers.
//! - [`docs`]: the public API's OpenAPI document, merged from the services' own, at
//!   `/api/v1/openapi.json`, and a readable page at `/api/v1/docs`.
//! - [`Application`]: the routes on the shared runtime (request ids, metrics, `/healthz`,
//!   `/readyz`), plus a background task that loads the users service's JWKS.
//!
//! Request path: client → runtime layers (request id, span, metrics) → route matched by prefix →
//! token verified (if required) → body read up to the limit → upstream call under the deadline →
//! response streamed back. Services verify the token again: in local mode they are reachable on
//! their own ports.

pub mod client;
pub mod cluster;
pub mod config;
pub mod docs;
pub mod fallback;
pub mod proxy;
pub mod ratelimit;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get};
use shopmesh_auth::Verifier;
use shopmesh_mesh::backoff::Backoff;
use shopmesh_mesh::{Mesh, Protocol};
use shopmesh_runtime::{App, ReadinessCheck, Server, Service};

pub use config::Config;
use proxy::{Shared, Target};

/// The gateway.
pub struct Application;

impl Application {
    /// Builds the routes and binds the port: a gateway ready to run.
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        config.gateway.validate()?;
        let jwks_url = config.jwks_url().ok_or_else(|| {
            anyhow::anyhow!(
                "invalid configuration: auth.jwks_url (SHOPMESH_AUTH__JWKS_URL) is unset and \
                 there is no users upstream to derive it from"
            )
        })?;
        let verifier = Verifier::from_jwks_url(&config.auth, jwks_url);
        let shared = Arc::new(Shared {
            verifier: verifier.clone(),
            body_limit: config.gateway.body_limit_bytes,
            limits: Arc::new(ratelimit::RateLimits::new(&config.gateway.rate_limit)),
            proxies: client::TrustedProxies::parse(&config.gateway.trusted_proxies)
                .map_err(|e| anyhow::anyhow!("gateway.trusted_proxies: {e}"))?,
        });
        let limits = shared.limits.clone();
        let mesh = Mesh::new(config.mesh.clone());
        let mut upstreams = std::collections::BTreeMap::new();
        for route in &config.gateway.routes {
            if !upstreams.contains_key(&route.service) {
                let spec = config
                    .gateway
                    .upstreams
                    .get(&route.service)
                    .map(String::as_str)
                    .unwrap_or_default();
                upstreams.insert(
                    route.service.clone(),
                    mesh.upstream(&route.service, spec, Protocol::Http)?,
                );
            }
        }
        let mut caches = std::collections::BTreeMap::new();

        let mut routes = Router::new();
        for route in &config.gateway.routes {
            let fallback = route.stale_fallback.then(|| {
                caches
                    .entry(route.service.clone())
                    .or_insert_with(|| {
                        Arc::new(fallback::StaleCache::new(
                            Duration::from_secs(config.gateway.stale_max_age_secs),
                            1_000,
                            config.gateway.cache_max_bytes,
                        ))
                    })
                    .clone()
            });
            let target = Arc::new(Target {
                service: route.service.clone(),
                upstream: upstreams[&route.service].clone(),
                auth: route.auth,
                timeout: route.timeout(config.gateway.upstream_timeout()),
                fallback,
                route: route.clone(),
                shared: shared.clone(),
            });
            let wildcard = if route.prefix == "/" {
                "/{*rest}".to_owned()
            } else {
                format!("{}/{{*rest}}", route.prefix)
            };
            routes = routes.merge(
                Router::new()
                    .route(&route.prefix, any(proxy::forward))
                    .route(&wildcard, any(proxy::forward))
                    .with_state(target),
            );
        }

        let docs = docs::Docs::new(upstreams.values().cloned().collect());
        routes = routes
            .merge(
                Router::new()
                    .route("/api/v1/openapi.json", get(docs::openapi_json))
                    .route("/api/v1/docs", get(docs::page))
                    .with_state(docs),
            )
            .merge(
                Router::new()
                    .route("/api/v1/admin/cluster", get(cluster::cluster))
                    .with_state(Arc::new(cluster::Cluster {
                        mesh: mesh.clone(),
                        shared: shared.clone(),
                    })),
            );

        let keys_loaded = Arc::new(AtomicBool::new(false));
        let ready_flag = keys_loaded.clone();
        let router = App::new("gateway")
            .http(routes)
            .mesh(mesh)
            .readiness(ReadinessCheck::new("signing_keys", move || {
                let loaded = ready_flag.load(Ordering::Relaxed);
                async move {
                    if loaded {
                        Ok(())
                    } else {
                        Err("the users service's JWKS has not been loaded yet".to_owned())
                    }
                }
            }))
            .into_router();
        let server = Server::bind("gateway", &config.server, router).await?;
        Ok(Service::new(server)
            .cancellable("signing-keys", load_keys(verifier, keys_loaded))
            .cancellable("rate-limit-sweeper", async move {
                let mut ticker = tokio::time::interval(Duration::from_secs(60));
                loop {
                    ticker.tick().await;
                    limits.sweep();
                }
            }))
    }
}

/// Fetches the JWKS until it works, so the first request does not wait for it and `/readyz`
/// tells when tokens can be checked. Later key changes are picked up on unknown `kid`s.
async fn load_keys(verifier: Verifier, loaded: Arc<AtomicBool>) {
    // The users service usually starts alongside: early failures are expected, lasting ones not.
    const PATIENCE: Duration = Duration::from_secs(5);
    let started = std::time::Instant::now();
    let mut warned = false;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        if verifier.refresh().await.is_ok() {
            loaded.store(true, Ordering::Relaxed);
            tracing::info!("signing keys loaded");
            return;
        }
        if !warned && started.elapsed() >= PATIENCE {
            warned = true;
            tracing::warn!(
                "still cannot fetch the users service's JWKS; protected routes answer 503"
            );
        }
        backoff.wait().await;
    }
}
