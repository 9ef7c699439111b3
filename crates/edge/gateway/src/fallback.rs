//! Stale answers where they beat none: the last good answer to an anonymous GET on a route
//! with `stale_fallback` (the product list and pages), kept a few minutes, served with
//! `Warning: 110` and `Age` when the service cannot answer (no endpoint, every circuit open,
//! unreachable, deadline passed, or a 502/503/504).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use shopmesh_mesh::CallError;

/// Answers larger than this are passed through, not kept.
const MAX_BODY: u64 = 512 * 1024;

struct Entry {
    stored: Instant,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

/// The cache of one route family.
pub struct StaleCache {
    entries: Mutex<HashMap<String, Entry>>,
    max_age: Duration,
    max_entries: usize,
}

impl StaleCache {
    /// Keeps up to `max_entries` answers for `max_age` each.
    pub fn new(max_age: Duration, max_entries: usize) -> Self {
        StaleCache {
            entries: Mutex::new(HashMap::new()),
            max_age,
            max_entries: max_entries.max(1),
        }
    }

    fn store(&self, key: &str, content_type: Option<HeaderValue>, body: Bytes) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= self.max_entries && !entries.contains_key(key) {
            let max_age = self.max_age;
            entries.retain(|_, e| e.stored.elapsed() < max_age);
            if entries.len() >= self.max_entries
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, e)| e.stored)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(
            key.to_owned(),
            Entry {
                stored: Instant::now(),
                content_type,
                body,
            },
        );
    }

    fn stale(&self, key: &str) -> Option<Response> {
        let entries = self.entries.lock().ok()?;
        let entry = entries.get(key)?;
        let age = entry.stored.elapsed();
        if age >= self.max_age {
            return None;
        }
        metrics::counter!("gateway_stale_answers_total").increment(1);
        let mut response = Response::new(Body::from(entry.body.clone()));
        let headers = response.headers_mut();
        if let Some(ct) = &entry.content_type {
            headers.insert(header::CONTENT_TYPE, ct.clone());
        }
        headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
        headers.insert(
            header::WARNING,
            HeaderValue::from_static("110 - \"Response is Stale\""),
        );
        headers.insert("x-cache", HeaderValue::from_static("stale"));
        Some(response)
    }

    /// The answer to give for `key`, given what the upstream call returned: a good answer is
    /// kept (and passed on), a failure is replaced by the kept answer if there is one.
    pub async fn answer(
        &self,
        key: &str,
        result: Result<http::Response<Incoming>, CallError>,
        error: impl FnOnce(CallError) -> Response,
    ) -> Response {
        let response = match result {
            Ok(response) => response,
            Err(e) => return self.stale(key).unwrap_or_else(|| error(e)),
        };
        let status = response.status();
        if matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) && let Some(stale) = self.stale(key)
        {
            return stale;
        }
        let (mut parts, body) = response.into_parts();
        crate::proxy::strip_hop_by_hop(&mut parts.headers);
        let length = content_length(&parts.headers);
        if status != StatusCode::OK || length.is_none_or(|l| l > MAX_BODY) {
            return Response::from_parts(parts, Body::new(body));
        }
        match body.collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                self.store(
                    key,
                    parts.headers.get(header::CONTENT_TYPE).cloned(),
                    bytes.clone(),
                );
                Response::from_parts(parts, Body::from(bytes))
            }
            Err(_) => self
                .stale(key)
                .unwrap_or_else(|| error(CallError::Transport(String::new()))),
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
