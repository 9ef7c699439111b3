//! The public API's OpenAPI 3.1 document, assembled from the services' own documents.
//!
//! Each service builds its document from its handlers (`utoipa`, routes and documentation
//! registered together, so they cannot drift) and serves it at `/openapi.json`. The gateway
//! fetches them from its upstreams, merges them, adds the bearer-token security scheme and
//! serves the result at `/api/v1/openapi.json`, with a readable page at `/api/v1/docs`. A
//! complete document is cached for a few seconds; when a service does not answer, the
//! document says which part is missing instead of failing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use shopmesh_mesh::{CallOptions, Upstream};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi, OpenApiBuilder};

const CACHE_FOR: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the documents come from, and the last complete one.
pub struct Docs {
    sources: Vec<Arc<Upstream>>,
    cache: Mutex<Option<(Instant, OpenApi)>>,
}

impl Docs {
    /// Documents of these services.
    pub fn new(sources: Vec<Arc<Upstream>>) -> Arc<Self> {
        Arc::new(Docs {
            sources,
            cache: Mutex::new(None),
        })
    }

    async fn fetch(&self, upstream: &Upstream) -> Option<OpenApi> {
        let request = http::Request::get("/openapi.json")
            .body(Full::new(Bytes::new()))
            .ok()?;
        let options = CallOptions {
            deadline: tokio::time::Instant::now() + FETCH_TIMEOUT,
            retry_safe: true,
            cut_slow_attempts: true,
        };
        let response = upstream.call(request, options).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    }

    /// The merged document (cached while complete).
    pub async fn document(&self) -> OpenApi {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, doc)) = cache.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return doc.clone();
        }
        let mut missing = Vec::new();
        let mut doc = OpenApiBuilder::new()
            .info(
                InfoBuilder::new()
                    .title("shopmesh API")
                    .version(env!("CARGO_PKG_VERSION"))
                    .description(Some(
                        "The shop's public API, through the gateway. Errors are \
                         application/problem+json (RFC 9457) with a stable `code` and the \
                         offending `field`. Signed-in routes take `Authorization: Bearer <token>` \
                         from POST /api/v1/login.",
                    ))
                    .build(),
            )
            .build();
        for upstream in &self.sources {
            match self.fetch(upstream).await {
                Some(part) => doc.merge(part),
                None => missing.push(upstream.name().to_owned()),
            }
        }
        let components = doc.components.get_or_insert_with(Default::default);
        components.security_schemes.insert(
            "bearer".to_owned(),
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            )
            .into(),
        );
        if missing.is_empty() {
            if let Ok(mut cache) = self.cache.lock() {
                *cache = Some((Instant::now(), doc.clone()));
            }
        } else {
            let note = format!(
                " NOTE: incomplete: the documentation of {} could not be fetched just now.",
                missing.join(", ")
            );
            let description = doc.info.description.take().unwrap_or_default();
            doc.info.description = Some(description + &note);
        }
        doc
    }
}

/// `GET /api/v1/openapi.json`.
pub async fn openapi_json(State(docs): State<Arc<Docs>>) -> Response {
    axum::Json(docs.document().await).into_response()
}

/// `GET /api/v1/docs`: the document in a readable page (Scalar's viewer, loaded by the browser).
pub async fn page(State(docs): State<Arc<Docs>>) -> Html<String> {
    Html(
        utoipa_scalar::Scalar::new(docs.document().await)
            .title("shopmesh API")
            .to_html(),
    )
}
