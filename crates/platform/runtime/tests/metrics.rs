//! Metric labels come from a closed set, whatever a client sends: made-up methods and gRPC
//! paths must not become series (they are never removed, so each would be memory for good).

mod common;

use std::convert::Infallible;
use std::future::Ready;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use shopmesh_runtime::App;

/// A gRPC service with one method, `Known`; any other answers UNIMPLEMENTED the way tonic's
/// generated servers do (a trailers-only response, the status in the headers).
#[derive(Clone)]
struct Echo;

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl tower::Service<Request> for Echo {
    type Response = Response;
    type Error = Infallible;
    type Future = Ready<Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let status = if request.uri().path() == "/test.Echo/Known" {
            "0"
        } else {
            "12"
        };
        std::future::ready(Ok((
            [
                ("content-type", "application/grpc"),
                ("grpc-status", status),
            ],
            "",
        )
            .into_response()))
    }
}

#[tokio::test]
async fn made_up_methods_and_grpc_paths_do_not_become_series() {
    let routes = Router::new().route("/files/{*rest}", any(|| async { "file" }));
    let router = App::new("test").http(routes).grpc(Echo).into_router();
    let addr = common::serve(router).await;
    let client = reqwest::Client::new();
    let grpc = |path: String| {
        client
            .post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .send()
    };

    for i in 0..20 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).expect("method");
        let _ = client
            .request(method, format!("http://{addr}/files/x"))
            .send()
            .await
            .expect("made-up method");
        let _ = grpc(format!("/test.Echo/Random{i}"))
            .await
            .expect("unknown rpc");
        let _ = grpc(format!("/files/random{i}"))
            .await
            .expect("grpc to http");
        let _ = grpc(format!("/nothing.Here/Random{i}"))
            .await
            .expect("no service");
    }
    let _ = grpc("/test.Echo/Known".to_owned())
        .await
        .expect("known rpc");

    let metrics = common::metrics_text(&client, addr).await;
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .collect();
    for made_up in ["MADEUP", "Random", "random"] {
        assert!(
            !metrics.contains(made_up),
            "{made_up} became a label: {series:#?}"
        );
    }
    let has = |label: &str| series.iter().any(|s| s.contains(label));
    assert!(has(r#"method="other""#), "{series:#?}");
    assert!(has(r#"route="/test.Echo/Known""#), "{series:#?}");
    assert!(
        has(r#"route="/test.Echo/{*method} unimplemented""#),
        "{series:#?}"
    );
    assert!(has(r#"route="/files/{*rest}""#), "{series:#?}");
    assert!(series.len() <= 10, "a bounded set: {series:#?}");
}

/// Each request is counted once, under its own method, route and status (the handles are kept
/// per label set after their first use: a mix-up would count one status under another).
#[tokio::test]
async fn every_request_counts_under_its_own_route_and_status() {
    let routes = Router::new().route(
        "/counted/{id}",
        axum::routing::get(
            |axum::extract::Path(id): axum::extract::Path<String>| async move {
                if id == "missing" {
                    http::StatusCode::NOT_FOUND
                } else {
                    http::StatusCode::OK
                }
            },
        ),
    );
    let router = App::new("test").http(routes).into_router();
    let addr = common::serve(router).await;
    let client = reqwest::Client::new();
    for id in ["a", "b", "missing", "c"] {
        client
            .get(format!("http://{addr}/counted/{id}"))
            .send()
            .await
            .expect("request");
    }
    let metrics = common::metrics_text(&client, addr).await;
    let count = |status: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("http_requests_total{")
                    && l.contains(r#"route="/counted/{id}""#)
                    && l.contains(&format!(r#"status="{status}""#))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(count("200").as_deref(), Some("3"), "{metrics}");
    assert_eq!(count("404").as_deref(), Some("1"), "{metrics}");
}
