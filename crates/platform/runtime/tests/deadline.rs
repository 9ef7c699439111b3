//! A caller's deadline is kept: past it the process stops working on the request and says so;
//! before it, the handler sees how much time is left for its own calls.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use shopmesh_runtime::App;

async fn serve(finished: Arc<AtomicBool>) -> SocketAddr {
    let routes = Router::new()
        .route(
            "/slow",
            get(move || {
                let finished = finished.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(1_500)).await;
                    finished.store(true, Ordering::SeqCst);
                    "done"
                }
            }),
        )
        .route(
            "/left",
            get(|| async {
                let left = shopmesh_mesh::deadline::current().map(|d| {
                    d.saturating_duration_since(tokio::time::Instant::now())
                        .as_millis()
                });
                format!("{left:?}")
            }),
        )
        .route(
            "/pkg.Service/Slow",
            post(|| async {
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                "late"
            }),
        );
    let router = App::new("test").http(routes).into_router();
    common::serve(router).await
}

#[tokio::test]
async fn past_the_callers_deadline_the_work_stops_with_a_504_problem() {
    let finished = Arc::new(AtomicBool::new(false));
    let addr = serve(finished.clone()).await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/slow"))
        .header("x-deadline-ms", "200")
        .send()
        .await
        .expect("send");
    let waited = started.elapsed();
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["code"], "deadline_exceeded");
    assert!(waited < Duration::from_millis(1_000), "{waited:?}");
    // The handler was dropped, not left running.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    assert!(!finished.load(Ordering::SeqCst));

    // Without a deadline, the same request runs to its end.
    let response = reqwest::get(format!("http://{addr}/slow"))
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert!(finished.load(Ordering::SeqCst));
}

#[tokio::test]
async fn the_handler_sees_the_time_left_and_grpc_callers_get_deadline_exceeded() {
    let addr = serve(Arc::default()).await;
    let left = reqwest::Client::new()
        .get(format!("http://{addr}/left"))
        .header("grpc-timeout", "900m")
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    let ms: u128 = left
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .parse()
        .expect("a deadline in the handler");
    assert!(ms > 500 && ms <= 900, "{ms}");

    let response = reqwest::Client::new()
        .post(format!("http://{addr}/pkg.Service/Slow"))
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "100m")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "4");
}
