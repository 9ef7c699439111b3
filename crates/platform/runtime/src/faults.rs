//! Injected latency, for `shopmesh chaos` on one machine. Present only in a process started
//! with `server.fault_injection` on a loopback address (see [`crate::Server::bind`]): then
//! `POST /internal/faults {"delay_ms": 200, "for_ms": 5000}` makes every other request to it
//! wait `delay_ms` first, for the next `for_ms`. Nothing of this is in the router otherwise.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use http::StatusCode;
use serde::Deserialize;
use tokio::time::Instant;

/// The longest delay and the longest time one may be asked for.
const MAX: Duration = Duration::from_secs(60);

/// A delay in force until a moment.
#[derive(Clone, Default)]
struct Delay(Arc<Mutex<Option<(Duration, Instant)>>>);

impl Delay {
    fn now(&self) -> Option<Duration> {
        let delay = self.0.lock().ok()?;
        let (delay, until) = (*delay)?;
        (Instant::now() < until).then_some(delay)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    delay_ms: u64,
    for_ms: u64,
}

/// Adds the fault route and the delaying middleware to `router`.
pub fn install(router: Router) -> Router {
    let delay = Delay::default();
    router
        .layer(middleware::from_fn_with_state(delay.clone(), delayed))
        .merge(
            Router::new()
                .route("/internal/faults", post(ask))
                .with_state(delay),
        )
}

async fn ask(State(delay): State<Delay>, axum::Json(ask): axum::Json<Ask>) -> StatusCode {
    let (length, lasting) = (
        Duration::from_millis(ask.delay_ms).min(MAX),
        Duration::from_millis(ask.for_ms).min(MAX),
    );
    if let Ok(mut current) = delay.0.lock() {
        *current = Some((length, Instant::now() + lasting));
    }
    tracing::warn!(
        delay_ms = ask.delay_ms,
        for_ms = ask.for_ms,
        "fault injected: requests delayed"
    );
    StatusCode::NO_CONTENT
}

async fn delayed(State(delay): State<Delay>, request: Request, next: Next) -> Response {
    if let Some(delay) = delay.now() {
        tokio::time::sleep(delay).await;
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Server;
    use crate::settings::ServerSettings;

    fn settings(host: &str, fault_injection: bool) -> ServerSettings {
        ServerSettings {
            host: host.parse().expect("an address"),
            port: 0,
            fault_injection,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_switch_is_refused_off_loopback_and_absent_when_off() {
        let refused = Server::bind("test", &settings("0.0.0.0", true), Router::new()).await;
        let error = refused.err().expect("refused").to_string();
        assert!(error.contains("server.fault_injection"), "{error}");

        let off = Server::bind("test", &settings("127.0.0.1", false), Router::new())
            .await
            .expect("bind");
        let addr = off.local_addr().expect("addr");
        tokio::spawn(off.run_until(std::future::pending()));
        let answer = reqwest::Client::new()
            .post(format!("http://{addr}/internal/faults"))
            .json(&serde_json::json!({"delay_ms": 200, "for_ms": 1000}))
            .send()
            .await
            .expect("post");
        assert_eq!(answer.status(), 404, "no such route when off");
    }

    #[tokio::test]
    async fn an_injected_delay_holds_every_request_for_its_time() {
        let router = Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
        let server = Server::bind("test", &settings("127.0.0.1", true), router)
            .await
            .expect("bind");
        let addr = server.local_addr().expect("addr");
        tokio::spawn(server.run_until(std::future::pending()));
        let client = reqwest::Client::new();
        let ping = || async {
            let sent = std::time::Instant::now();
            let answer = client
                .get(format!("http://{addr}/ping"))
                .send()
                .await
                .expect("ping");
            assert_eq!(answer.status(), 200);
            sent.elapsed()
        };
        assert!(ping().await < Duration::from_millis(200), "no delay yet");
        let asked = client
            .post(format!("http://{addr}/internal/faults"))
            .json(&serde_json::json!({"delay_ms": 400, "for_ms": 1500}))
            .send()
            .await
            .expect("ask");
        assert_eq!(asked.status(), 204);
        assert!(ping().await >= Duration::from_millis(400), "delayed");
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert!(
            ping().await < Duration::from_millis(200),
            "over after for_ms"
        );
    }
}
