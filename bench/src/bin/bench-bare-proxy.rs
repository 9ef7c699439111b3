//! The floor of the gateway's stack, for the gateway-hop benchmark (`bench/hop.sh`): a reverse
//! proxy with nothing but what the gateway is built on, hyper's HTTP/1.1 server connection and
//! hyper-util's pooled client (the one the mesh calls out with), on one current-thread
//! runtime. No router, no middleware, no deadline, no metrics, no logs. It tells how much of
//! the gateway's distance to nginx is its own layers and how much is the stack under them.
//!
//! `bench-bare-proxy LISTEN UPSTREAM`, e.g. `bench-bare-proxy 127.0.0.1:18603 127.0.0.1:18600`.

use std::convert::Infallible;

use bytes::Bytes;
use http::uri::{Authority, Parts, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Upstream = Client<HttpConnector, Full<Bytes>>;

async fn forward(
    client: Upstream,
    authority: Authority,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, StatusCode> {
    let (mut parts, body) = request.into_parts();
    // Bodies are buffered, as the gateway does.
    let body = body
        .collect()
        .await
        .map_err(|_| StatusCode::BAD_REQUEST)?
        .to_bytes();
    let mut uri = Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = Uri::from_parts(uri).map_err(|_| StatusCode::BAD_REQUEST)?;
    client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18603".to_owned());
    let upstream: Authority = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18600".to_owned())
        .parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        // As the mesh builds its client.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Upstream = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(5))
            .pool_max_idle_per_host(256)
            .build(connector);
        eprintln!("bench-bare-proxy listening on {listen}, forwarding to {upstream}");
        loop {
            // A passing failure (out of descriptors, a connection reset before it was
            // taken) ends only that connection, not the proxy.
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("bench-bare-proxy: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let (client, upstream) = (client.clone(), upstream.clone());
                    async move {
                        Ok::<_, Infallible>(match forward(client, upstream, request).await {
                            Ok(response) => response.map(http_body_util::Either::Left),
                            Err(status) => {
                                let mut response = Response::new(http_body_util::Either::Right(
                                    Full::new(Bytes::new()),
                                ));
                                *response.status_mut() = status;
                                response
                            }
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
