//! `GET /api/v1/admin/cluster` (admins only): what the gateway knows of every upstream (its
//! endpoints, health, ejection, breaker, in-flight calls, EWMA latency, request and error
//! counts), plus the same view from inside each service instance it can reach (their own
//! upstreams: orders → inventory, payments, catalog, cart; cart → catalog; ...), gathered from
//! their `/internal/mesh`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use shopmesh_auth::Role;
use shopmesh_auth::extract::AuthRejection;
use shopmesh_mesh::Mesh;
use shopmesh_problem::{Kind, Problem};

use crate::proxy::Shared;

/// How long one instance may take to describe itself.
const ASK_TIMEOUT: Duration = Duration::from_millis(800);

/// What the handler needs.
pub struct Cluster {
    /// The gateway's mesh.
    pub mesh: Mesh,
    /// Token checks.
    pub shared: Arc<Shared>,
}

/// The handler.
pub async fn cluster(
    State(cluster): State<Arc<Cluster>>,
    request: axum::extract::Request,
) -> Response {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let claims = match cluster.shared.verifier.verify_header(value).await {
        Ok(claims) => claims,
        Err(e) => return AuthRejection(e).into_response(),
    };
    if claims.role != Role::Admin {
        return Problem::new(Kind::Forbidden, "forbidden", "Forbidden")
            .with_detail("Only an administrator may see the cluster.")
            .into_response();
    }

    let gateway = cluster.mesh.snapshot();
    // Every instance the gateway knows, asked for its own view.
    let mut instances: BTreeSet<(String, String)> = BTreeSet::new();
    for upstream in &gateway.upstreams {
        for endpoint in &upstream.endpoints {
            instances.insert((upstream.name.clone(), endpoint.url.clone()));
        }
    }
    let client = cluster.mesh.http_client();
    let asks = instances.into_iter().map(|(service, url)| {
        let client = client.clone();
        async move {
            let view = async {
                let request = http::Request::get(format!("{url}/internal/mesh"))
                    .body(Full::new(Bytes::new()))
                    .ok()?;
                let response = tokio::time::timeout(ASK_TIMEOUT, client.request(request))
                    .await
                    .ok()?
                    .ok()?;
                if !response.status().is_success() {
                    return None;
                }
                let body = tokio::time::timeout(ASK_TIMEOUT, response.into_body().collect())
                    .await
                    .ok()?
                    .ok()?
                    .to_bytes();
                serde_json::from_slice::<Value>(&body).ok()
            }
            .await;
            (service, url, view)
        }
    });
    let answers = futures_util::future::join_all(asks).await;

    // Every service seen from anywhere, with its endpoints as the gateway or the services see
    // them (payments is reached only by orders, for example).
    let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for upstream in &gateway.upstreams {
        let urls = services.entry(upstream.name.clone()).or_default();
        urls.extend(upstream.endpoints.iter().map(|e| e.url.clone()));
    }
    let mut instances_view = Vec::new();
    for (service, url, view) in answers {
        match view {
            Some(view) => {
                if let Some(upstreams) = view.get("upstreams").and_then(Value::as_array) {
                    for upstream in upstreams {
                        let Some(name) = upstream.get("name").and_then(Value::as_str) else {
                            continue;
                        };
                        let urls = services.entry(name.to_owned()).or_default();
                        for endpoint in upstream
                            .get("endpoints")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            if let Some(u) = endpoint.get("url").and_then(Value::as_str) {
                                urls.insert(u.to_owned());
                            }
                        }
                    }
                }
                instances_view
                    .push(json!({"service": service, "url": url, "upstreams": view["upstreams"]}));
            }
            None => instances_view
                .push(json!({"service": service, "url": url, "error": "did not answer"})),
        }
    }
    axum::Json(json!({
        "services": services,
        "gateway": gateway,
        "instances": instances_view,
    }))
    .into_response()
}
