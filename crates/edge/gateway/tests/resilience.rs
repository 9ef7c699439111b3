//! The gateway's client stack against scripted upstreams that fail in chosen ways: a breaker
//! that opens and closes, retries held to their budget, a hung upstream, stale answers,
//! deadlines passed on. (Killed and stopped replicas of real services: the launcher's cluster
//! tests.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{any, get};
use serde_json::{Value, json};
use shopmesh_auth::signing::generate_seed;
use shopmesh_auth::{AuthSettings, JwkSet, TokenSigner};
use shopmesh_config::Sources;
use shopmesh_gateway::{Application, Config};
use tokio::net::TcpListener;

/// What the scripted service does and saw.
#[derive(Default)]
struct Script {
    /// Answer 500 (or `fail_with`) to everything but health checks.
    failing: AtomicBool,
    /// The failure status, 500 unless set.
    fail_with: AtomicUsize,
    /// Requests seen, by kind.
    gets: AtomicUsize,
    posts_without_key: AtomicUsize,
    posts_with_key: AtomicUsize,
    /// When set, answers say `Cache-Control: public, max-age=<this>`.
    max_age: AtomicUsize,
}

async fn scripted(script: Arc<Script>) -> SocketAddr {
    let signer = TokenSigner::from_seed(
        &generate_seed(),
        &AuthSettings::default(),
        Duration::from_secs(900),
    )
    .expect("signer");
    let jwks = JwkSet {
        keys: vec![signer.jwk()],
    };
    let app = Router::new()
        .route(
            "/.well-known/jwks.json",
            get(move || async move { axum::Json(jwks) }),
        )
        .route("/readyz", get(|| async { "ready" }))
        .fallback(any(move |req: Request| {
            let script = script.clone();
            async move {
                let counter = match (
                    req.method().as_str(),
                    req.headers().contains_key("idempotency-key"),
                ) {
                    ("POST", false) => &script.posts_without_key,
                    ("POST", true) => &script.posts_with_key,
                    _ => &script.gets,
                };
                counter.fetch_add(1, Ordering::SeqCst);
                if script.failing.load(Ordering::SeqCst) {
                    let status = match script.fail_with.load(Ordering::SeqCst) {
                        0 => 500,
                        s => s as u16,
                    };
                    return (StatusCode::from_u16(status).expect("status"), "failing")
                        .into_response();
                }
                let deadline = req
                    .headers()
                    .get("x-deadline-ms")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let mut response =
                    axum::Json(json!({"path": req.uri().path(), "deadline_ms": deadline}))
                        .into_response();
                let max_age = script.max_age.load(Ordering::SeqCst);
                if max_age > 0 {
                    response.headers_mut().insert(
                        "cache-control",
                        format!("public, max-age={max_age}").parse().expect("value"),
                    );
                }
                response
            }
        }));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A gateway whose every upstream is `upstream`, with these extra settings.
async fn gateway(upstream: &str, extra: &[(&str, &str)]) -> SocketAddr {
    let mut sources = Sources::empty()
        .set("SHOPMESH_SERVER__PORT", "0")
        .set("SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND", "0");
    for service in ["USERS", "CATALOG", "INVENTORY", "ORDERS", "CART"] {
        sources = sources.set(format!("SHOPMESH_GATEWAY__UPSTREAMS__{service}"), upstream);
    }
    for (k, v) in extra {
        sources = sources.set(*k, *v);
    }
    let app = Application::build(Config::load(&sources).expect("config"))
        .await
        .expect("gateway");
    let addr = app.local_addr().expect("addr");
    tokio::spawn(app.run_until(std::future::pending()));
    addr
}

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i]
}

#[tokio::test]
async fn a_failing_upstream_opens_the_breaker_which_fails_fast_without_calling_it_then_closes() {
    let script = Arc::new(Script::default());
    let up = scripted(script.clone()).await;
    let gw = gateway(
        &format!("http://{up}"),
        &[
            ("SHOPMESH_MESH__BREAKER__OPEN_MS", "1000"),
            ("SHOPMESH_MESH__BREAKER__WINDOW", "20"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let url = format!("http://{gw}/api/v1/inventory/anything");
    script.failing.store(true, Ordering::SeqCst);

    // 20 failures fill the window: each reached the service (a 500 is not retried).
    for _ in 0..20 {
        let response = client.get(&url).send().await.expect("send");
        assert_eq!(response.status(), 500);
    }
    assert_eq!(script.gets.load(Ordering::SeqCst), 20);

    // Open: answered at once, the service sees nothing.
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let response = client.get(&url).send().await.expect("send");
        latencies.push(started.elapsed());
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], "circuit_open", "{body}");
    }
    assert_eq!(
        script.gets.load(Ordering::SeqCst),
        20,
        "an open breaker calls nobody"
    );
    let p99 = percentile(latencies, 0.99);
    println!("fast-fail through the gateway: p99 {p99:?}");
    assert!(p99 < Duration::from_millis(5), "fast fail p99 {p99:?}");

    // The service recovers; after the wait, trial calls pass and close the breaker.
    script.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for _ in 0..50 {
        let response = client.get(&url).send().await.expect("send");
        assert_eq!(response.status(), 200);
    }
    assert_eq!(script.gets.load(Ordering::SeqCst), 70);
}

#[tokio::test]
async fn retries_under_total_failure_stay_within_the_budget_and_never_repeat_an_unkeyed_post() {
    let script = Arc::new(Script::default());
    script.failing.store(true, Ordering::SeqCst);
    script.fail_with.store(503, Ordering::SeqCst);
    let up = scripted(script.clone()).await;
    // A breaker that never opens, so every request goes out and only the budget limits retries.
    let gw = gateway(
        &format!("http://{up}"),
        &[
            ("SHOPMESH_MESH__BREAKER__WINDOW", "1000000"),
            ("SHOPMESH_MESH__RETRY__BACKOFF_BASE_MS", "1"),
            ("SHOPMESH_MESH__RETRY__BACKOFF_MAX_MS", "2"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let url = format!("http://{gw}/api/v1/inventory/anything");

    let started = Instant::now();
    let requests = 400;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..requests / 8 {
                let response = client.get(&url).send().await.expect("send");
                assert_eq!(response.status(), 503);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let secs = started.elapsed().as_secs_f64().ceil();
    let attempts = script.gets.load(Ordering::SeqCst) as f64;
    let bound = 1.2 * requests as f64 + 10.0 * (secs + 1.0);
    println!("{requests} requests, {attempts} attempts in {secs} s (bound {bound})");
    assert!(attempts > requests as f64, "failed GETs are retried");
    assert!(attempts <= bound, "{attempts} attempts > {bound}");

    // POSTs: without a key, one attempt each, ever; with a key, retried.
    for _ in 0..30 {
        let response = client
            .post(&url)
            .json(&json!({}))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 503);
    }
    assert_eq!(script.posts_without_key.load(Ordering::SeqCst), 30);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for i in 0..5 {
        let response = client
            .post(&url)
            .header("idempotency-key", format!("k{i}"))
            .json(&json!({}))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 503);
    }
    assert!(script.posts_with_key.load(Ordering::SeqCst) > 5);
}

#[tokio::test]
async fn a_hung_upstream_gets_504s_at_the_deadline_and_connections_and_tasks_stay_bounded() {
    // Accepts, reads, never answers; counts connections still open.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let open = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let (open, accepted) = (open.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                open.fetch_add(1, Ordering::SeqCst);
                accepted.fetch_add(1, Ordering::SeqCst);
                let open = open.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
    }
    let gw = gateway(
        &format!("http://{addr}"),
        &[
            ("SHOPMESH_GATEWAY__UPSTREAM_TIMEOUT_MS", "300"),
            // Health checks would hang too: keep them out of the count.
            ("SHOPMESH_MESH__HEALTH_INTERVAL_MS", "600000"),
            // Keep the breaker closed so that every request waits out its deadline (an open
            // breaker would answer 503 at once, which the breaker test covers).
            ("SHOPMESH_MESH__BREAKER__WINDOW", "1000000"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let url = format!("http://{gw}/api/v1/inventory/anything");
    let alive_tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    // Tasks after the first round (the test's own keep-alive connections to the gateway and
    // their server side exist by then) must not grow with more rounds.
    let mut tasks_after_first = 0;

    for round in 0..5 {
        let mut calls = Vec::new();
        for _ in 0..20 {
            let client = client.clone();
            let url = url.clone();
            calls.push(tokio::spawn(async move {
                let started = Instant::now();
                let response = client.get(&url).send().await.expect("send");
                (response.status(), started.elapsed())
            }));
        }
        for call in calls {
            let (status, waited) = call.await.expect("call");
            assert_eq!(status, 504, "round {round}");
            assert!(waited >= Duration::from_millis(290), "{waited:?}");
            assert!(waited < Duration::from_secs(2), "{waited:?}");
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tasks_after_first = alive_tasks();
        }
    }
    // Every abandoned exchange closed its connection; nothing piles up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still_open = open.load(Ordering::SeqCst);
    let tasks_after = alive_tasks();
    println!(
        "accepted {} connections, {still_open} still open; tasks after one round \
         {tasks_after_first}, after five {tasks_after}",
        accepted.load(Ordering::SeqCst)
    );
    assert!(
        still_open <= 2,
        "{still_open} upstream connections left open"
    );
    assert!(
        tasks_after <= tasks_after_first + 5,
        "tasks grew from {tasks_after_first} to {tasks_after}"
    );
}

#[tokio::test]
async fn product_pages_are_served_stale_when_the_catalog_cannot_answer() {
    let script = Arc::new(Script::default());
    let up = scripted(script.clone()).await;
    let gw = gateway(&format!("http://{up}"), &[]).await;
    let client = reqwest::Client::new();
    let list = format!("http://{gw}/api/v1/products?limit=5");

    let fresh = client.get(&list).send().await.expect("send");
    assert_eq!(fresh.status(), 200);
    assert!(fresh.headers().get("warning").is_none());
    let fresh: Value = fresh.json().await.expect("json");

    script.failing.store(true, Ordering::SeqCst);
    script.fail_with.store(503, Ordering::SeqCst);
    let stale = client.get(&list).send().await.expect("send");
    assert_eq!(stale.status(), 200);
    assert_eq!(stale.headers()["warning"], "110 - \"Response is Stale\"");
    assert_eq!(stale.headers()["x-cache"], "stale");
    assert!(stale.headers().contains_key("age"));
    assert_eq!(stale.json::<Value>().await.expect("json"), fresh);

    // Never seen: nothing to fall back on. Signed-in: never from the shared cache.
    let other = client
        .get(format!("http://{gw}/api/v1/products?limit=6"))
        .send()
        .await
        .expect("send");
    assert_eq!(other.status(), 503);
    let signed_in = client
        .get(&list)
        .bearer_auth("whatever")
        .send()
        .await
        .expect("send");
    assert_eq!(signed_in.status(), 503);
    // Other routes have no fallback.
    assert_eq!(
        client
            .get(format!("http://{gw}/api/v1/inventory/x"))
            .send()
            .await
            .expect("send")
            .status(),
        503
    );
}

#[tokio::test]
async fn anonymous_product_reads_are_answered_by_the_gateway_while_the_catalog_says_they_are_fresh()
{
    let script = Arc::new(Script::default());
    script.max_age.store(60, Ordering::SeqCst);
    let up = scripted(script.clone()).await;
    let gw = gateway(&format!("http://{up}"), &[]).await;
    let client = reqwest::Client::new();
    let list = format!("http://{gw}/api/v1/products?limit=5");
    let calls = || script.gets.load(Ordering::SeqCst);

    let first = client.get(&list).send().await.expect("send");
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("x-cache").is_none());
    let first: Value = first.json().await.expect("json");
    let before = calls();
    let again = client.get(&list).send().await.expect("send");
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["x-cache"], "hit");
    assert!(again.headers().contains_key("age"));
    assert_eq!(again.json::<Value>().await.expect("json"), first);
    assert_eq!(calls(), before, "a fresh answer is not asked for again");

    // The service said `public`: a signed-in reader gets the same answer from the cache.
    let signed_in = client
        .get(&list)
        .bearer_auth("whatever")
        .send()
        .await
        .expect("send");
    assert_eq!(signed_in.headers()["x-cache"], "hit");
    assert_eq!(calls(), before);
    // Another query is asked of the service.
    let other = client
        .get(format!("http://{gw}/api/v1/products?limit=6"))
        .send()
        .await
        .expect("send");
    assert!(other.headers().get("x-cache").is_none());
    assert_eq!(calls(), before + 1);
    // A public answer a signed-in reader got is reused for the next reader.
    let seven = format!("http://{gw}/api/v1/products?limit=7");
    let first = client
        .get(&seven)
        .bearer_auth("whatever")
        .send()
        .await
        .expect("send");
    assert!(first.headers().get("x-cache").is_none());
    let next = client.get(&seven).send().await.expect("send");
    assert_eq!(next.headers()["x-cache"], "hit");
    assert_eq!(calls(), before + 2);

    // Without a max-age, every read goes through, anonymous or not.
    script.max_age.store(0, Ordering::SeqCst);
    let page = format!("http://{gw}/api/v1/products/p1");
    for token in [None, None, Some("whatever"), Some("whatever")] {
        let mut request = client.get(&page);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.expect("send");
        assert!(answer.headers().get("x-cache").is_none());
    }
    assert_eq!(calls(), before + 6);
}

#[tokio::test]
async fn the_route_deadline_is_passed_on_to_the_service() {
    let script = Arc::new(Script::default());
    let up = scripted(script.clone()).await;
    let gw = gateway(
        &format!("http://{up}"),
        &[("SHOPMESH_GATEWAY__UPSTREAM_TIMEOUT_MS", "1500")],
    )
    .await;
    let body: Value = reqwest::get(format!("http://{gw}/api/v1/inventory/x"))
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let ms: u64 = body["deadline_ms"]
        .as_str()
        .expect("a deadline header")
        .parse()
        .expect("ms");
    assert!(ms > 1_000 && ms <= 1_500, "{ms}");
}

#[tokio::test]
async fn a_post_its_route_declares_safe_to_repeat_is_retried_and_no_other_unkeyed_post() {
    let script = Arc::new(Script::default());
    script.failing.store(true, Ordering::SeqCst);
    script.fail_with.store(503, Ordering::SeqCst);
    let up = scripted(script.clone()).await;
    let file = std::env::temp_dir().join(format!("gateway-{}.toml", uuid_like()));
    std::fs::write(
        &file,
        "[[gateway.routes]]\nprefix = \"/api/v1/things\"\nservice = \"inventory\"\n\
         auth = \"public\"\nretry_safe_posts = [\"/api/v1/things/*/settle\"]\n",
    )
    .expect("config file");
    let sources = Sources::empty()
        .file(&file)
        .set("SHOPMESH_SERVER__PORT", "0")
        .set("SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND", "0")
        .set(
            "SHOPMESH_GATEWAY__UPSTREAMS__INVENTORY",
            format!("http://{up}"),
        )
        .set("SHOPMESH_GATEWAY__UPSTREAMS__USERS", format!("http://{up}"))
        .set("SHOPMESH_MESH__BREAKER__WINDOW", "1000000")
        .set("SHOPMESH_MESH__RETRY__BACKOFF_BASE_MS", "1")
        .set("SHOPMESH_MESH__RETRY__BACKOFF_MAX_MS", "2");
    let app = Application::build(Config::load(&sources).expect("config"))
        .await
        .expect("gateway");
    let _ = std::fs::remove_file(&file);
    let gw = app.local_addr().expect("addr");
    tokio::spawn(app.run_until(std::future::pending()));
    let client = reqwest::Client::new();
    let post = |path: &str| {
        client
            .post(format!("http://{gw}{path}"))
            .json(&json!({}))
            .send()
    };
    for _ in 0..5 {
        let response = post("/api/v1/things/7/other").await.expect("send");
        assert_eq!(response.status(), 503);
    }
    assert_eq!(
        script.posts_without_key.load(Ordering::SeqCst),
        5,
        "an unkeyed POST is sent once"
    );
    for _ in 0..5 {
        let response = post("/api/v1/things/7/settle").await.expect("send");
        assert_eq!(response.status(), 503);
    }
    assert!(
        script.posts_without_key.load(Ordering::SeqCst) > 10,
        "the declared POST is retried"
    );
}

fn uuid_like() -> String {
    format!(
        "{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    )
}
