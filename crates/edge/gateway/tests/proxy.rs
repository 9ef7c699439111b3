//! The gateway in front of a scripted upstream on port 0.
//!
//! The upstream here is a fixture whose behaviour each test chooses (echo, hang, hang up), to
//! check what the gateway does for any service. The gateway in front of the real users service
//! is tested end to end in the launcher's system test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::routing::{any, get};
use serde_json::{Value, json};
use shopmesh_auth::signing::generate_seed;
use shopmesh_auth::{AuthSettings, Claims, JwkSet, Role, TokenSigner, now_secs};
use shopmesh_config::Sources;
use shopmesh_gateway::{Application, Config};
use tokio::net::TcpListener;

struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    signer: Arc<TokenSigner>,
}

/// An upstream that echoes what it received, hangs on `/api/v1/users/hang`, and publishes a
/// JWKS.
async fn upstream() -> Upstream {
    let signer = Arc::new(
        TokenSigner::from_seed(
            &generate_seed(),
            &AuthSettings::default(),
            Duration::from_secs(900),
        )
        .expect("signer"),
    );
    let hits = Arc::new(AtomicUsize::new(0));
    let jwks = JwkSet {
        keys: vec![signer.jwk()],
    };
    let counter = hits.clone();
    let app = Router::new()
        .route(
            "/.well-known/jwks.json",
            get(move || async move { axum::Json(jwks) }),
        )
        // The gateway's health checks: not requests of the tests.
        .route("/readyz", get(|| async { "ready" }))
        .route(
            "/api/v1/users/hang",
            any(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .fallback(any(move |req: Request| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX).await.expect("body");
                let headers: serde_json::Map<String, Value> = parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
                    .collect();
                axum::Json(json!({
                    "method": parts.method.as_str(),
                    "uri": parts.uri.to_string(),
                    "headers": headers,
                    "body_len": body.len(),
                }))
            }
        }));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Upstream { addr, hits, signer }
}

/// A gateway whose `users` upstream is `users`.
async fn gateway(users: &str, extra: &[(&str, &str)]) -> SocketAddr {
    let mut sources = Sources::empty()
        .set("SHOPMESH_SERVER__PORT", "0")
        .set("SHOPMESH_GATEWAY__UPSTREAMS__USERS", users)
        .set("SHOPMESH_GATEWAY__UPSTREAM_TIMEOUT_MS", "500");
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

async fn problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["code"], code, "{body}");
    body
}

#[tokio::test]
async fn a_public_route_is_forwarded_with_method_path_query_body_and_forwarding_headers() {
    let up = upstream().await;
    let gw = gateway(&format!("http://{}", up.addr), &[]).await;
    let response = reqwest::Client::new()
        .post(format!("http://{gw}/api/v1/register?x=1"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "hop")
        .json(&json!({"a": 1}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let echo: Value = response.json().await.expect("json");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["uri"], "/api/v1/register?x=1");
    assert_eq!(echo["body_len"], 7);
    assert_eq!(
        echo["headers"]["x-forwarded-for"], "127.0.0.1",
        "the client's claim is replaced"
    );
    assert_eq!(
        echo["headers"]["x-request-id"],
        request_id.as_str(),
        "the id travels upstream"
    );
    assert!(
        echo["headers"].get("x-private").is_none(),
        "hop-by-hop headers stay behind"
    );
    assert_eq!(echo["headers"]["content-type"], "application/json");
}

#[tokio::test]
async fn a_protected_route_needs_a_valid_token_before_anything_reaches_the_upstream() {
    let up = upstream().await;
    let gw = gateway(&format!("http://{}", up.addr), &[]).await;
    let client = reqwest::Client::new();
    let url = format!("http://{gw}/api/v1/me");

    let anonymous = client.get(&url).send().await.expect("send");
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    problem(anonymous, 401, "unauthenticated").await;
    let forged = client
        .get(&url)
        .bearer_auth("a.b.c")
        .send()
        .await
        .expect("send");
    problem(forged, 401, "invalid_token").await;
    let now = now_secs();
    let expired = up
        .signer
        .issue_claims(&Claims {
            sub: uuid::Uuid::now_v7(),
            role: Role::Customer,
            iss: "shopmesh".into(),
            aud: "shopmesh-api".into(),
            iat: now - 3600,
            exp: now - 120,
            jti: uuid::Uuid::now_v7(),
        })
        .expect("token");
    problem(
        client
            .get(&url)
            .bearer_auth(&expired)
            .send()
            .await
            .expect("send"),
        401,
        "token_expired",
    )
    .await;
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        0,
        "rejected requests never reach the service"
    );

    let token = up
        .signer
        .issue(uuid::Uuid::now_v7(), Role::Customer)
        .expect("token");
    let ok = client
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(ok.status(), 200);
    let echo: Value = ok.json().await.expect("json");
    assert_eq!(echo["headers"]["authorization"], format!("Bearer {token}"));
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_whether_declared_or_streamed() {
    let up = upstream().await;
    let gw = gateway(
        &format!("http://{}", up.addr),
        &[("SHOPMESH_GATEWAY__BODY_LIMIT_BYTES", "1024")],
    )
    .await;
    let client = reqwest::Client::new();
    let url = format!("http://{gw}/api/v1/register");
    let declared = client
        .post(&url)
        .body(vec![b'x'; 2048])
        .send()
        .await
        .expect("send");
    problem(declared, 413, "payload_too_large").await;
    let stream = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 512]))),
    );
    let streamed = client
        .post(&url)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("send");
    problem(streamed, 413, "payload_too_large").await;
    let small = client
        .post(&url)
        .body(vec![b'z'; 1000])
        .send()
        .await
        .expect("send");
    assert_eq!(small.status(), 200);
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn routes_match_whole_segments_and_unknown_paths_are_404_problems() {
    let up = upstream().await;
    let gw = gateway(&format!("http://{}", up.addr), &[]).await;
    let client = reqwest::Client::new();
    let token = up
        .signer
        .issue(uuid::Uuid::now_v7(), Role::Admin)
        .expect("token");
    let nested = client
        .get(format!("http://{gw}/api/v1/users/123"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(nested.status(), 200);
    let lookalike = client
        .get(format!("http://{gw}/api/v1/usersx"))
        .send()
        .await
        .expect("send");
    problem(lookalike, 404, "route_not_found").await;
    let unknown = client
        .get(format!("http://{gw}/api/v1/nothing"))
        .send()
        .await
        .expect("send");
    problem(unknown, 404, "route_not_found").await;
}

#[tokio::test]
async fn a_down_upstream_is_a_503_problem_with_retry_after_not_a_hang() {
    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let gw = gateway(&format!("http://{closed}"), &[]).await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("http://{gw}/api/v1/login"))
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.headers()["retry-after"], "1");
    problem(response, 503, "upstream_unavailable").await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_hung_upstream_is_a_504_at_the_deadline() {
    let up = upstream().await;
    let gw = gateway(&format!("http://{}", up.addr), &[]).await;
    let token = up
        .signer
        .issue(uuid::Uuid::now_v7(), Role::Customer)
        .expect("token");
    let started = Instant::now();
    let response = reqwest::Client::new()
        .get(format!("http://{gw}/api/v1/users/hang"))
        .bearer_auth(token)
        .send()
        .await
        .expect("send");
    let waited = started.elapsed();
    problem(response, 504, "upstream_timeout").await;
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
}

#[tokio::test]
async fn an_upstream_that_hangs_up_is_a_502() {
    // Accepts, reads a little, closes without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 64];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
            drop(socket);
        }
    });
    let gw = gateway(&format!("http://{addr}"), &[]).await;
    let response = reqwest::Client::new()
        .post(format!("http://{gw}/api/v1/login"))
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    problem(response, 502, "bad_gateway").await;
}

#[tokio::test]
async fn readyz_turns_ready_once_the_jwks_is_loaded() {
    let up = upstream().await;
    let gw = gateway(&format!("http://{}", up.addr), &[]).await;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = client
            .get(format!("http://{gw}/readyz"))
            .send()
            .await
            .expect("send")
            .status();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "gateway never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = client
        .get(format!("http://{gw}/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("http_requests_total"), "{metrics}");
}

#[tokio::test]
async fn three_times_the_login_limit_gets_exactly_the_limit_through_and_429s_with_headers() {
    let up = upstream().await;
    let gw = gateway(
        &format!("http://{}", up.addr),
        &[
            (
                "SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_ACCOUNT",
                "5",
            ),
            (
                "SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_IP",
                "100",
            ),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..15 {
        let response = client
            .post(format!("http://{gw}/api/v1/login"))
            .json(&json!({"email": "Victim@Example.com", "password": "guess"}))
            .send()
            .await
            .expect("send");
        statuses.push(response.status().as_u16());
        if response.status() == 429 && refused.is_none() {
            refused = Some(response);
        }
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        5,
        "refused attempts never reach the users service"
    );
    let refused = refused.expect("a refusal");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("secs");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        refused.headers()["ratelimit-policy"],
        "\"login-account\";q=5;w=60"
    );
    assert!(
        refused.headers()["ratelimit"]
            .to_str()
            .expect("ascii")
            .starts_with("\"login-account\";r=0;t=")
    );
    problem(refused, 429, "rate_limited").await;
    // Another account from the same address is not affected.
    let other = client
        .post(format!("http://{gw}/api/v1/login"))
        .json(&json!({"email": "someone.else@example.com", "password": "guess"}))
        .send()
        .await
        .expect("send");
    assert_eq!(other.status(), 200);
}

#[tokio::test]
async fn a_client_over_its_per_address_rate_is_refused_on_every_route() {
    let up = upstream().await;
    let gw = gateway(
        &format!("http://{}", up.addr),
        &[
            ("SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND", "5"),
            ("SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_BURST", "5"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut accepted = 0;
    let mut refused = 0;
    for _ in 0..15 {
        match client
            .post(format!("http://{gw}/api/v1/register"))
            .json(&json!({}))
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
        {
            200 => accepted += 1,
            429 => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    // A burst of 5 plus what refilled at 5/s while the loop ran.
    let refill = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        accepted >= 5 && accepted <= 5 + refill,
        "accepted {accepted}, refill {refill}"
    );
    assert_eq!(accepted + refused, 15);
    assert!(refused > 0);
}

/// Logins from the client at `forwarded_for`, through a proxy on this machine (the test).
async fn login_from(client: &reqwest::Client, gw: SocketAddr, forwarded_for: &str) -> u16 {
    client
        .post(format!("http://{gw}/api/v1/login"))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({"email": format!("{forwarded_for}@example.com"), "password": "guess"}))
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_limits_and_is_named_upstream() {
    let up = upstream().await;
    let limits = [
        ("SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_IP", "2"),
        (
            "SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_ACCOUNT",
            "0",
        ),
    ];
    let behind_proxy = gateway(
        &format!("http://{}", up.addr),
        &[
            limits[0],
            limits[1],
            ("SHOPMESH_GATEWAY__TRUSTED_PROXIES", "127.0.0.0/8"),
        ],
    )
    .await;
    let exposed = gateway(&format!("http://{}", up.addr), &limits).await;
    let client = reqwest::Client::new();

    // The proxy (this test, on 127.0.0.1) is trusted: the forwarded client is counted.
    assert_eq!(login_from(&client, behind_proxy, "198.51.100.7").await, 200);
    assert_eq!(login_from(&client, behind_proxy, "198.51.100.7").await, 200);
    assert_eq!(login_from(&client, behind_proxy, "198.51.100.7").await, 429);
    assert_eq!(
        login_from(&client, behind_proxy, "198.51.100.8").await,
        200,
        "another client behind the same proxy has its own allowance"
    );
    let echo: Value = client
        .post(format!("http://{behind_proxy}/api/v1/register"))
        .header("x-forwarded-for", "6.6.6.6, 198.51.100.9")
        .json(&json!({}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(
        echo["headers"]["x-forwarded-for"], "198.51.100.9",
        "the service is told the client the trusted proxy saw, not the client's own claim"
    );

    // No trusted proxies (the default): the header is anyone's claim, the peer is the client.
    assert_eq!(login_from(&client, exposed, "198.51.100.7").await, 200);
    assert_eq!(login_from(&client, exposed, "198.51.100.8").await, 200);
    assert_eq!(
        login_from(&client, exposed, "198.51.100.9").await,
        429,
        "a made-up X-Forwarded-For must not buy a fresh allowance"
    );
}

#[tokio::test]
async fn a_trusted_proxies_setting_that_is_not_addresses_stops_the_gateway_with_its_name() {
    let sources = Sources::empty().set("SHOPMESH_SERVER__PORT", "0").set(
        "SHOPMESH_GATEWAY__TRUSTED_PROXIES",
        "10.0.0.0/8,ingress.local",
    );
    let error = match Config::load(&sources) {
        Ok(_) => panic!("a host name is not an address"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("SHOPMESH_GATEWAY__TRUSTED_PROXIES") && error.contains("ingress.local"),
        "{error}"
    );
}
