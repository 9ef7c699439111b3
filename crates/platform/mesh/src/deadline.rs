//! Deadlines that travel with a request.
//!
//! A caller sends how long it will still wait: `grpc-timeout` on gRPC calls (the standard
//! header, e.g. `250m`), `x-deadline-ms` on HTTP. The receiving process (the runtime's layer)
//! turns it into an instant, stops working on the request when it passes, and keeps it in a
//! task-local so that every call it makes meanwhile gets no more than what is left.

use std::future::Future;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

/// The HTTP header carrying the caller's remaining time, in milliseconds.
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-deadline-ms");
/// gRPC's own.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `future` with `deadline` as the request's deadline.
pub async fn scope<F: Future>(deadline: Instant, future: F) -> F::Output {
    // A nested scope may only shorten it.
    let deadline = current().map_or(deadline, |outer| outer.min(deadline));
    DEADLINE.scope(deadline, future).await
}

/// The deadline of the request being handled, if its caller set one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// The earlier of `now + timeout` and the current request's deadline.
pub fn within(timeout: Duration) -> Instant {
    let own = Instant::now() + timeout;
    current().map_or(own, |d| d.min(own))
}

/// Reads the deadline a caller sent (`grpc-timeout` first, then `x-deadline-ms`).
pub fn from_headers(headers: &HeaderMap, now: Instant) -> Option<Instant> {
    if let Some(value) = headers.get(GRPC_TIMEOUT).and_then(|v| v.to_str().ok()) {
        return parse_grpc_timeout(value).map(|d| now + d);
    }
    headers
        .get(DEADLINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|ms| now + Duration::from_millis(ms))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Writes the time left until `deadline` as the header a callee reads, and removes the other
/// kind: a proxied request may carry a client's own `grpc-timeout` or `x-deadline-ms`, which
/// the callee would otherwise read (gRPC's first) instead of ours: a client could set its own
/// deadline past the gateway's.
pub(crate) fn set_headers(headers: &mut HeaderMap, deadline: Instant, grpc: bool) {
    let left = deadline.saturating_duration_since(Instant::now());
    // Whole milliseconds, at least one: zero would read as "no time" or be ignored.
    let ms = left.as_millis().clamp(1, 99_999_999) as u64;
    if grpc {
        headers.remove(DEADLINE_HEADER);
        if let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
            headers.insert(GRPC_TIMEOUT, v);
        }
    } else {
        headers.remove(GRPC_TIMEOUT);
        headers.insert(DEADLINE_HEADER, HeaderValue::from(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_reject_junk() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_nested_scope_only_shortens_and_calls_get_what_is_left() {
        let now = Instant::now();
        assert_eq!(current(), None);
        assert_eq!(within(Duration::from_secs(3)), now + Duration::from_secs(3));
        scope(now + Duration::from_secs(1), async {
            assert_eq!(within(Duration::from_secs(3)), now + Duration::from_secs(1));
            scope(now + Duration::from_secs(5), async {
                assert_eq!(current(), Some(now + Duration::from_secs(1)));
            })
            .await;
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn headers_round_trip() {
        let now = Instant::now();
        let mut headers = HeaderMap::new();
        set_headers(&mut headers, now + Duration::from_millis(1500), false);
        assert_eq!(headers[&DEADLINE_HEADER], "1500");
        assert_eq!(
            from_headers(&headers, now),
            Some(now + Duration::from_millis(1500))
        );
        set_headers(&mut headers, now + Duration::from_millis(700), true);
        assert_eq!(headers[&GRPC_TIMEOUT], "700m");
        assert!(!headers.contains_key(DEADLINE_HEADER), "one kind only");
        assert_eq!(
            from_headers(&headers, now),
            Some(now + Duration::from_millis(700))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_clients_own_deadline_headers_are_replaced_by_ours() {
        let now = Instant::now();
        let mut headers = HeaderMap::new();
        // A client through the gateway asks for an hour (gRPC's header is read first).
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("1H"));
        headers.insert(DEADLINE_HEADER, HeaderValue::from_static("3600000"));
        set_headers(&mut headers, now + Duration::from_secs(5), false);
        assert!(!headers.contains_key(GRPC_TIMEOUT));
        assert_eq!(
            from_headers(&headers, now),
            Some(now + Duration::from_secs(5))
        );
    }
}
