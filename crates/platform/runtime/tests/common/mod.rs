//! What the runtime's tests share: a router served on a free port, its metrics page.

#![allow(dead_code)]

use std::net::SocketAddr;

use axum::Router;
use shopmesh_runtime::{Server, ServerSettings};

/// Serves `router` as every process does (the runtime's server, default limits) on a free
/// loopback port, until the test ends.
pub async fn serve(router: Router) -> SocketAddr {
    let settings = ServerSettings {
        port: 0,
        ..Default::default()
    };
    let server = Server::bind("test", &settings, router).await.expect("bind");
    let addr = server.local_addr().expect("addr");
    tokio::spawn(server.run_until(std::future::pending()));
    addr
}

/// The process's `/metrics` page, as served at `addr`.
pub async fn metrics_text(client: &reqwest::Client, addr: SocketAddr) -> String {
    client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}
