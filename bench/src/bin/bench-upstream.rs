//! A trivial upstream for the gateway-hop benchmark (`bench/hop.sh`): answers every path with
//! a small JSON body (an empty key set at `/.well-known/jwks.json`, so a gateway in front of
//! it becomes ready). The least a service can do, so what is measured is the proxy.

use axum::Router;
use axum::http::Uri;
use axum::response::IntoResponse;

async fn answer(uri: Uri) -> impl IntoResponse {
    let body = if uri.path() == "/.well-known/jwks.json" {
        r#"{"keys":[]}"#
    } else {
        r#"{"ok":true,"items":[]}"#
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
}

fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18600".to_owned());
    // One thread: the benchmark pins it to one core with the proxy in front of it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("bench-upstream listening on {addr}");
        axum::serve(listener, Router::new().fallback(answer)).await?;
        Ok(())
    })
}
