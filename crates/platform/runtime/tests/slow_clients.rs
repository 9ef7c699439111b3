//! Slow clients cannot hold a server: a connection that trickles its headers is closed within
//! the header timeout while others are served at once, and past the connection bound new
//! connections are shed rather than queued.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use shopmesh_runtime::{App, Server, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn serve(header_read_timeout_secs: u64, max_connections: usize) -> SocketAddr {
    let routes = Router::new().route("/ping", get(|| async { "pong" }));
    let settings = ServerSettings {
        port: 0,
        header_read_timeout_secs,
        max_connections,
        ..Default::default()
    };
    let server = Server::bind(
        "test",
        &settings,
        App::new("test").http(routes).into_router(),
    )
    .await
    .expect("bind");
    let addr = server.local_addr().expect("addr");
    tokio::spawn(server.run_until(std::future::pending()));
    addr
}

/// Waits until the server closes `stream` (EOF or reset); how long that took, or `None`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            stream.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            // A 408 or similar before the close is fine.
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn trickling_connections_are_closed_within_the_header_timeout_and_others_are_served() {
    let addr = serve(1, 1_000).await;
    let mut trickling = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // A request head that never ends.
        stream
            .write_all(b"GET /ping HTTP/1.1\r\nHost: shop\r\n")
            .await
            .expect("write");
        trickling.push(stream);
    }
    // A normal client is answered at once meanwhile.
    let client = reqwest::Client::new();
    let sent = Instant::now();
    let answer = client
        .get(format!("http://{addr}/ping"))
        .send()
        .await
        .expect("ping");
    assert_eq!(answer.status(), 200);
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );

    // Every trickling connection is closed: after the 1 s header timeout, well within 10 s.
    for stream in &mut trickling {
        let waited = closed_within(stream, Duration::from_secs(10)).await;
        assert!(waited.is_some(), "a trickling connection was left open");
    }
}

#[tokio::test]
async fn past_the_connection_bound_new_connections_are_shed() {
    let addr = serve(30, 3).await;
    // Three silent connections hold every slot (the header timeout, 30 s, has not run out).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = TcpStream::connect(addr)
        .await
        .expect("the kernel accepts it");
    let shed = closed_within(&mut fourth, Duration::from_secs(5)).await;
    assert!(
        shed.is_some(),
        "the fourth connection is closed at once, not queued"
    );

    // Once the others go, a new client is served again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = reqwest::get(format!("http://{addr}/ping"))
        .await
        .expect("ping");
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let addr = serve(1, 1_000).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /ping HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.expect("answer");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Kept alive, then silent: closed once the next request's head is overdue.
    let waited = closed_within(&mut stream, Duration::from_secs(10)).await;
    assert!(waited.is_some(), "an idle connection was kept open");
}

#[tokio::test]
async fn a_connection_that_never_speaks_is_closed_after_the_header_timeout() {
    let addr = serve(1, 1_000).await;
    // Not a byte: the server cannot even tell HTTP/1 from HTTP/2.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let waited = closed_within(&mut silent, Duration::from_secs(10)).await;
    assert!(waited.is_some(), "a silent connection was kept open");
}
