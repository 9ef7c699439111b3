//! Kept answers to anonymous GETs on a route with `stale_fallback` (the product list and
//! pages):
//! - **fresh**: while the service said the answer stays fresh (`Cache-Control: public,
//!   max-age=N`), the next identical request is answered from here with `Age` and `x-cache:
//!   hit`, without a call (the HTTP caching a CDN or nginx's `proxy_cache` would do; browsing
//!   is most of a shop's traffic and the same pages are asked again and again);
//! - **stale**: the last good answer, kept a few minutes, served with `Warning: 110` and `Age`
//!   when the service cannot answer (no endpoint, every circuit open, unreachable, deadline
//!   passed, or a 502/503/504).
//!
//! Bounded twice: by entries and by bytes (keys and bodies). A key is the path and the query
//! with its parameters in name order (the order of parameters of one name kept), so
//! `?q=lamp&limit=20` and `?limit=20&q=lamp` are one entry, not two.

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
    /// How long the service said it stays fresh (zero: only ever a stale fallback).
    fresh_for: Duration,
    /// After that, how long it may still be served while one request fetches a new one
    /// (`stale-while-revalidate`), so an expiry sends one request to the service, not a herd.
    revalidate_for: Duration,
    /// One request is fetching a new answer.
    refreshing: bool,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl Entry {
    /// The kept answer, with its `Age`.
    fn response(&self, age: Duration) -> Response {
        let mut response = Response::new(Body::from(self.body.clone()));
        let headers = response.headers_mut();
        if let Some(ct) = &self.content_type {
            headers.insert(header::CONTENT_TYPE, ct.clone());
        }
        headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
        response
    }
}

/// What is kept, and how many bytes of keys and bodies that is.
#[derive(Default)]
struct Kept {
    entries: HashMap<String, Entry>,
    bytes: usize,
}

impl Kept {
    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.bytes -= key.len() + entry.body.len();
        }
    }
}

/// The cache of one route family.
pub struct StaleCache {
    kept: Mutex<Kept>,
    max_age: Duration,
    max_entries: usize,
    max_bytes: usize,
}

/// The cache key of a request target: the path, and the query's parameters in name order
/// (a stable sort: parameters of one name keep their order, which may matter to the service).
pub fn key(path_and_query: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    let mut parameters: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    parameters.sort_by_key(|p| p.split_once('=').map_or(*p, |(name, _)| name));
    if parameters.is_empty() {
        return path.to_owned();
    }
    format!("{path}?{}", parameters.join("&"))
}

impl StaleCache {
    /// Keeps up to `max_entries` answers, and up to `max_bytes` of keys and bodies, for
    /// `max_age` each.
    pub fn new(max_age: Duration, max_entries: usize, max_bytes: usize) -> Self {
        StaleCache {
            kept: Mutex::new(Kept::default()),
            max_age,
            max_entries: max_entries.max(1),
            max_bytes,
        }
    }

    /// Forgets what is kept under `key`.
    fn forget(&self, key: &str) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.remove(key);
        }
    }

    /// Bytes of keys and bodies kept.
    pub fn bytes(&self) -> usize {
        self.kept.lock().map_or(0, |kept| kept.bytes)
    }

    fn store(
        &self,
        key: &str,
        content_type: Option<HeaderValue>,
        body: Bytes,
        (fresh_for, revalidate_for): (Duration, Duration),
    ) {
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        // What was kept under this key is outdated by this answer, kept or not.
        kept.remove(key);
        let size = key.len() + body.len();
        if size > self.max_bytes {
            return;
        }
        let full = |kept: &Kept| {
            kept.entries.len() >= self.max_entries || kept.bytes + size > self.max_bytes
        };
        if full(&kept) {
            let max_age = self.max_age;
            let expired: Vec<String> = kept
                .entries
                .iter()
                .filter(|(_, e)| e.stored.elapsed() >= max_age)
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                kept.remove(&k);
            }
        }
        if full(&kept) {
            // Oldest first; one sort, however many go.
            let mut by_age: Vec<(Instant, String)> = kept
                .entries
                .iter()
                .map(|(k, e)| (e.stored, k.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, oldest) in by_age {
                if !full(&kept) {
                    break;
                }
                kept.remove(&oldest);
            }
        }
        kept.bytes += size;
        kept.entries.insert(
            key.to_owned(),
            Entry {
                stored: Instant::now(),
                fresh_for: fresh_for.min(self.max_age),
                revalidate_for: revalidate_for.min(self.max_age),
                refreshing: false,
                content_type,
                body,
            },
        );
    }

    /// Stops reusing every kept answer as fresh (they stay as stale fallbacks): a write went
    /// through this route family, so a product page or list may have changed. Replicas of the
    /// gateway each keep their own answers, for at most max-age + stale-while-revalidate.
    pub fn expire_fresh(&self) {
        if let Ok(mut kept) = self.kept.lock() {
            for entry in kept.entries.values_mut() {
                entry.fresh_for = Duration::ZERO;
                entry.revalidate_for = Duration::ZERO;
            }
        }
    }

    /// The kept answer for `key` if the service said it is still fresh, or if it may be served
    /// while another request is fetching a new one; `None` sends this request to the service
    /// (the first after an expiry, which becomes the one refreshing).
    pub fn fresh(&self, key: &str) -> Option<Response> {
        let mut kept = self.kept.lock().ok()?;
        let entry = kept.entries.get_mut(key)?;
        let age = entry.stored.elapsed();
        if age >= entry.fresh_for {
            if age >= entry.fresh_for + entry.revalidate_for {
                return None;
            }
            if !entry.refreshing {
                entry.refreshing = true;
                return None;
            }
            // Another request is fetching the new answer: this one gets the kept one.
        }
        metrics::counter!("gateway_cache_hits_total").increment(1);
        let mut response = entry.response(age);
        let headers = response.headers_mut();
        if let Ok(control) = HeaderValue::try_from(format!(
            "public, max-age={}",
            entry.fresh_for.saturating_sub(age).as_secs()
        )) {
            headers.insert(header::CACHE_CONTROL, control);
        }
        headers.insert("x-cache", HeaderValue::from_static("hit"));
        Some(response)
    }

    fn stale(&self, key: &str) -> Option<Response> {
        let kept = self.kept.lock().ok()?;
        let entry = kept.entries.get(key)?;
        let age = entry.stored.elapsed();
        if age >= self.max_age {
            return None;
        }
        metrics::counter!("gateway_stale_answers_total").increment(1);
        let mut response = entry.response(age);
        let headers = response.headers_mut();
        headers.insert(
            header::WARNING,
            HeaderValue::from_static("110 - \"Response is Stale\""),
        );
        headers.insert("x-cache", HeaderValue::from_static("stale"));
        Some(response)
    }

    /// The answer to give for `key`, given what the upstream call returned: a good answer is
    /// kept (and passed on), a failure is replaced by the kept answer if there is one. For a
    /// signed-in reader (`anonymous` false) only a `public` answer is kept, and a failure is
    /// passed on as it is.
    pub async fn answer(
        &self,
        key: &str,
        anonymous: bool,
        result: Result<http::Response<Incoming>, CallError>,
        error: impl FnOnce(CallError) -> Response,
    ) -> Response {
        let stale = |cache: &Self| if anonymous { cache.stale(key) } else { None };
        let response = match result {
            Ok(response) => response,
            Err(e) => return stale(self).unwrap_or_else(|| error(e)),
        };
        let status = response.status();
        if matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) && let Some(stale) = stale(self)
        {
            return stale;
        }
        let (mut parts, body) = response.into_parts();
        crate::proxy::strip_hop_by_hop(&mut parts.headers);
        let length = content_length(&parts.headers);
        let fresh_for = fresh_for(&parts.headers);
        if status == StatusCode::OK && length.is_none_or(|l| l > MAX_BODY) {
            // A newer answer, too large (or of unknown length) to keep: what is kept is
            // outdated by it.
            self.forget(key);
        }
        if status != StatusCode::OK
            || length.is_none_or(|l| l > MAX_BODY)
            || (!anonymous && fresh_for.is_zero())
        {
            return Response::from_parts(parts, Body::new(body));
        }
        match body.collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                // A copy: the body may be a slice of the connection's read buffer, which the
                // entry would otherwise keep whole (and the byte bound would not see).
                self.store(
                    key,
                    parts.headers.get(header::CONTENT_TYPE).cloned(),
                    Bytes::copy_from_slice(&bytes),
                    (fresh_for, revalidate_for(&parts.headers)),
                );
                Response::from_parts(parts, Body::from(bytes))
            }
            Err(_) => stale(self).unwrap_or_else(|| error(CallError::Transport(String::new()))),
        }
    }
}

/// How long a shared cache may reuse an answer: `max-age` of a `Cache-Control` that is
/// `public` and neither `private`, `no-store` nor `no-cache`; zero otherwise.
fn fresh_for(headers: &HeaderMap) -> Duration {
    let Some(control) = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
    else {
        return Duration::ZERO;
    };
    let mut public = false;
    let mut max_age = None;
    for directive in control.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        match lower.as_str() {
            "public" => public = true,
            "private" | "no-store" | "no-cache" => return Duration::ZERO,
            other => {
                if let Some(n) = other.strip_prefix("max-age=") {
                    max_age = n.parse::<u64>().ok();
                }
            }
        }
    }
    match (public, max_age) {
        (true, Some(seconds)) => Duration::from_secs(seconds),
        _ => Duration::ZERO,
    }
}

/// `stale-while-revalidate` of a reusable answer (zero if absent, or if the answer is not
/// reusable at all).
fn revalidate_for(headers: &HeaderMap) -> Duration {
    if fresh_for(headers).is_zero() {
        return Duration::ZERO;
    }
    headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .into_iter()
        .flat_map(|control| control.split(','))
        .find_map(|directive| {
            let lower = directive.trim().to_ascii_lowercase();
            lower
                .strip_prefix("stale-while-revalidate=")
                .and_then(|n| n.parse::<u64>().ok())
        })
        .map_or(Duration::ZERO, Duration::from_secs)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(value).expect("value"),
        );
        headers
    }

    #[test]
    fn only_a_public_max_age_makes_an_answer_reusable() {
        assert_eq!(
            fresh_for(&control("public, max-age=2")),
            Duration::from_secs(2)
        );
        assert_eq!(
            fresh_for(&control("Public, Max-Age=5")),
            Duration::from_secs(5)
        );
        assert_eq!(fresh_for(&control("max-age=2")), Duration::ZERO);
        assert_eq!(
            fresh_for(&control("public, max-age=2, no-store")),
            Duration::ZERO
        );
        assert_eq!(fresh_for(&control("private, max-age=2")), Duration::ZERO);
        assert_eq!(fresh_for(&control("public, max-age=soon")), Duration::ZERO);
        assert_eq!(fresh_for(&HeaderMap::new()), Duration::ZERO);
    }

    #[test]
    fn a_fresh_entry_is_served_until_its_age_passes_its_max_age() {
        let cache = StaleCache::new(Duration::from_secs(300), 10, 1 << 20);
        cache.store(
            "/a",
            None,
            Bytes::from_static(b"a"),
            (Duration::from_secs(60), Duration::ZERO),
        );
        cache.store(
            "/b",
            None,
            Bytes::from_static(b"b"),
            (Duration::ZERO, Duration::ZERO),
        );
        let hit = cache.fresh("/a").expect("fresh");
        assert_eq!(hit.headers()["x-cache"], "hit");
        assert!(
            cache.fresh("/b").is_none(),
            "no max-age: only a stale fallback"
        );
        assert!(cache.stale("/b").is_some());
        if let Ok(mut kept) = cache.kept.lock()
            && let Some(entry) = kept.entries.get_mut("/a")
        {
            entry.stored = entry
                .stored
                .checked_sub(Duration::from_secs(61))
                .expect("uptime");
        }
        assert!(cache.fresh("/a").is_none());
    }

    #[test]
    fn the_order_of_differently_named_parameters_makes_no_other_entry() {
        assert_eq!(key("/p?q=lamp&limit=20"), key("/p?limit=20&q=lamp"));
        assert_eq!(key("/p?q=lamp&limit=20"), "/p?limit=20&q=lamp");
        assert_ne!(
            key("/p?c=a&c=b"),
            key("/p?c=b&c=a"),
            "parameters of one name keep their order"
        );
        assert_eq!(key("/p?&"), "/p");
        assert_eq!(key("/p"), "/p");
        assert_eq!(key("/p?flag&a=1"), "/p?a=1&flag");
    }

    #[test]
    fn what_is_kept_stays_within_its_bytes_the_oldest_going_first() {
        let cache = StaleCache::new(Duration::from_secs(300), 1_000, 10_000);
        let body = Bytes::from(vec![b'x'; 3_000]);
        for i in 0..10 {
            cache.store(
                &format!("/p/{i}"),
                None,
                body.clone(),
                (Duration::from_secs(60), Duration::ZERO),
            );
            assert!(cache.bytes() <= 10_000, "{} bytes after {i}", cache.bytes());
        }
        assert!(cache.fresh("/p/9").is_some(), "the newest is kept");
        assert!(cache.fresh("/p/0").is_none(), "the oldest went first");
        // Keeping a key again replaces it, it does not count twice.
        let before = cache.bytes();
        cache.store(
            "/p/9",
            None,
            body.clone(),
            (Duration::from_secs(60), Duration::ZERO),
        );
        assert_eq!(cache.bytes(), before);
        // An answer larger than the whole budget is passed through, not kept.
        cache.store(
            "/huge",
            None,
            Bytes::from(vec![b'x'; 20_000]),
            (Duration::from_secs(60), Duration::ZERO),
        );
        assert!(cache.fresh("/huge").is_none());
        assert_eq!(cache.bytes(), before);
        // And an answer too large to keep replaces what was kept under its key.
        cache.store(
            "/p/9",
            None,
            Bytes::from(vec![b'x'; 20_000]),
            (Duration::from_secs(60), Duration::ZERO),
        );
        assert!(
            cache.fresh("/p/9").is_none(),
            "the outdated answer is not served"
        );
    }

    #[test]
    fn after_expiry_one_request_refreshes_while_the_others_get_the_kept_answer() {
        let cache = StaleCache::new(Duration::from_secs(300), 10, 1 << 20);
        cache.store(
            "/p",
            None,
            Bytes::from_static(b"p"),
            (Duration::from_secs(1), Duration::from_secs(1)),
        );
        let age = |by: u64| {
            if let Ok(mut kept) = cache.kept.lock()
                && let Some(entry) = kept.entries.get_mut("/p")
            {
                entry.stored = Instant::now()
                    .checked_sub(Duration::from_millis(by))
                    .expect("uptime");
            }
        };
        age(1_500);
        assert!(
            cache.fresh("/p").is_none(),
            "the first after expiry refreshes"
        );
        assert!(
            cache.fresh("/p").is_some(),
            "the next ones are served meanwhile"
        );
        assert!(cache.fresh("/p").is_some());
        age(2_100);
        assert!(cache.fresh("/p").is_none(), "past the grace, everyone asks");
        // The refresh stores a new answer: fresh again, for everyone.
        cache.store(
            "/p",
            None,
            Bytes::from_static(b"q"),
            (Duration::from_secs(1), Duration::from_secs(1)),
        );
        assert!(cache.fresh("/p").is_some());
    }

    #[test]
    fn stale_while_revalidate_counts_only_on_a_reusable_answer() {
        assert_eq!(
            revalidate_for(&control("public, max-age=1, stale-while-revalidate=2")),
            Duration::from_secs(2)
        );
        assert_eq!(
            revalidate_for(&control("max-age=1, stale-while-revalidate=2")),
            Duration::ZERO
        );
        assert_eq!(
            revalidate_for(&control("public, max-age=1")),
            Duration::ZERO
        );
    }

    #[test]
    fn a_write_stops_every_kept_answer_from_being_fresh_but_keeps_it_as_a_fallback() {
        let cache = StaleCache::new(Duration::from_secs(300), 10, 1 << 20);
        cache.store(
            "/p",
            None,
            Bytes::from_static(b"p"),
            (Duration::from_secs(60), Duration::from_secs(60)),
        );
        assert!(cache.fresh("/p").is_some());
        cache.expire_fresh();
        assert!(cache.fresh("/p").is_none());
        assert!(
            cache.fresh("/p").is_none(),
            "no stale-while-revalidate either"
        );
        assert!(cache.stale("/p").is_some());
    }
}
