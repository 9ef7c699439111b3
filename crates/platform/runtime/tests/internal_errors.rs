//! An internal error's cause is logged once, in the request's span (with its request id), and
//! never sent to the client, who gets the generic 500 problem.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use shopmesh_problem::Problem;
use shopmesh_runtime::App;

/// Every log line written, for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_cause_of_a_500_is_logged_once_with_the_request_id_and_never_sent() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let routes = Router::new().route(
        "/boom",
        get(|| async {
            Err::<(), _>(Problem::internal_caused_by(std::io::Error::other(
                "disk on fire",
            )))
        }),
    );
    let router = App::new("test").http(routes).into_router();
    let addr = common::serve(router).await;

    let response = reqwest::get(format!("http://{addr}/boom"))
        .await
        .expect("answer");
    assert_eq!(response.status(), 500);
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("a request id")
        .to_owned();
    let body = response.text().await.expect("body");
    assert!(body.contains("\"code\":\"internal\""), "{body}");
    assert!(!body.contains("disk on fire"), "the cause leaked: {body}");

    let log = String::from_utf8(captured.0.lock().expect("log").clone()).expect("utf-8");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("disk on fire")).collect();
    assert_eq!(lines.len(), 1, "logged once: {log}");
    assert!(lines[0].contains("internal error"), "{}", lines[0]);
    assert!(
        lines[0].contains(&request_id),
        "in the request's span: {}",
        lines[0]
    );
}

/// A handler that panics answers the generic 500 problem with the request's id, and the
/// process goes on serving.
#[tokio::test]
async fn a_panicking_handler_answers_the_500_problem_and_the_server_goes_on() {
    let routes = Router::new()
        .route(
            "/panics",
            get(|| async {
                if true {
                    panic!("handler bug");
                }
                "never"
            }),
        )
        .route("/fine", get(|| async { "fine" }));
    let router = App::new("test").http(routes).into_router();
    let addr = common::serve(router).await;

    let response = reqwest::get(format!("http://{addr}/panics"))
        .await
        .expect("answer");
    assert_eq!(response.status(), 500);
    assert!(response.headers().contains_key("x-request-id"));
    let body = response.text().await.expect("body");
    assert!(body.contains("\"code\":\"internal\""), "{body}");
    assert!(!body.contains("handler bug"), "the panic leaked: {body}");
    let fine = reqwest::get(format!("http://{addr}/fine"))
        .await
        .expect("answer");
    assert_eq!(fine.status(), 200);
}
