//! Calls through an upstream to real HTTP servers on loopback: dead endpoints are routed
//! around and ejected (never more than half), policies spread the load, DNS names resolve.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Full;
use shopmesh_mesh::{CallOptions, Mesh, MeshSettings, Policy, Protocol};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// A server answering 200 to everything, counting requests other than health checks.
async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new()
        .route("/readyz", get(|| async { "ready" }))
        .fallback(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

/// A loopback address where nothing listens.
async fn dead() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
}

async fn get_ok(upstream: &shopmesh_mesh::Upstream) -> bool {
    let request = http::Request::get("/thing")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let options = CallOptions {
        deadline: Instant::now() + Duration::from_secs(2),
        retry_safe: true,
        cut_slow_attempts: true,
    };
    matches!(upstream.call(request, options).await, Ok(r) if r.status() == 200)
}

fn settings() -> MeshSettings {
    MeshSettings {
        // Only passive detection here: the health checks would find the dead ports first.
        health_interval_ms: 0,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_dead_endpoint_is_routed_around_then_ejected_and_at_most_half_are_ejected() {
    let (live, hits) = server().await;
    let (dead_a, dead_b) = (dead().await, dead().await);
    let mesh = Mesh::new(settings());
    let spec = format!("http://{live},http://{dead_a},http://{dead_b}");
    let upstream = mesh
        .upstream("inventory", &spec, Protocol::Http)
        .expect("upstream");

    for _ in 0..100 {
        assert!(
            get_ok(&upstream).await,
            "every call reaches the live endpoint"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 100);
    let snapshot = upstream.snapshot();
    let ejected: Vec<_> = snapshot
        .endpoints
        .iter()
        .filter(|e| e.ejected)
        .map(|e| e.url.clone())
        .collect();
    assert_eq!(ejected.len(), 1, "at most half of three: {snapshot:?}");
    assert!(!ejected.contains(&format!("http://{live}")));
    assert!(snapshot.retries > 0);
}

#[tokio::test]
async fn round_robin_and_least_connections_spread_calls_over_every_endpoint() {
    for policy in [
        Policy::RoundRobin,
        Policy::LeastConnections,
        Policy::WeightedRandom,
        Policy::PeakEwma,
    ] {
        let servers = [server().await, server().await, server().await];
        let spec = servers
            .iter()
            .map(|(addr, _)| format!("http://{addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let mesh = Mesh::new(MeshSettings {
            balance: policy,
            ..settings()
        });
        let upstream = mesh
            .upstream("catalog", &spec, Protocol::Http)
            .expect("upstream");
        for _ in 0..300 {
            assert!(get_ok(&upstream).await);
        }
        let counts: Vec<usize> = servers
            .iter()
            .map(|(_, hits)| hits.load(Ordering::SeqCst))
            .collect();
        assert_eq!(counts.iter().sum::<usize>(), 300);
        match policy {
            Policy::RoundRobin => assert_eq!(counts, vec![100, 100, 100]),
            // Sequential calls: nothing in flight, so ties everywhere, broken at random.
            Policy::LeastConnections | Policy::WeightedRandom => {
                assert!(counts.iter().all(|c| *c >= 50), "{policy:?}: {counts:?}");
            }
            // Prefers the fastest; a slower first answer (a new connection) keeps an endpoint
            // aside until its estimate decays. Every endpoint is tried.
            Policy::PeakEwma => assert!(counts.iter().all(|c| *c >= 1), "{counts:?}"),
        }
    }
}

#[tokio::test]
async fn a_dns_name_resolves_to_its_addresses() {
    let (live, hits) = server().await;
    let mesh = Mesh::new(settings());
    let upstream = mesh
        .upstream(
            "users",
            &format!("dns:localhost:{}", live.port()),
            Protocol::Http,
        )
        .expect("upstream");
    // The first call waits for the first resolution.
    assert!(get_ok(&upstream).await);
    let urls: Vec<String> = upstream
        .snapshot()
        .endpoints
        .into_iter()
        .map(|e| e.url)
        .collect();
    assert!(urls.contains(&format!("http://{live}")), "{urls:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn calls_over_the_in_flight_cap_are_shed_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        "late"
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mesh = Mesh::new(MeshSettings {
        max_in_flight: 4,
        ..settings()
    });
    let upstream = mesh
        .upstream("orders", &format!("http://{addr}"), Protocol::Http)
        .expect("upstream");
    let mut slow = Vec::new();
    for _ in 0..4 {
        let upstream = upstream.clone();
        slow.push(tokio::spawn(async move { get_ok(&upstream).await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let request = http::Request::get("/x")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let shed = upstream
        .call(
            request,
            CallOptions {
                deadline: Instant::now() + Duration::from_secs(2),
                retry_safe: true,
                cut_slow_attempts: true,
            },
        )
        .await;
    assert_eq!(
        shed.err(),
        Some(shopmesh_mesh::CallError::Overloaded("orders".to_owned()))
    );
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(upstream.snapshot().shed, 1);
    for task in slow {
        task.abort();
    }
}
