//! A tonic transport over an [`Upstream`]: generated clients (`InventoryClient::new(channel)`)
//! get balancing, health, breakers, retries and deadlines without knowing.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::deadline;
use crate::upstream::{CallError, CallOptions, Upstream};

/// A cloneable gRPC channel to one upstream.
#[derive(Clone)]
pub struct GrpcChannel {
    upstream: Arc<Upstream>,
    timeout: Duration,
}

impl std::fmt::Debug for GrpcChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("upstream", &self.upstream.name())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl GrpcChannel {
    pub(crate) fn new(upstream: Arc<Upstream>, timeout: Duration) -> Self {
        GrpcChannel { upstream, timeout }
    }

    /// The upstream it calls.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

/// How a call that got no answer reads to the generated client.
fn status(error: &CallError) -> tonic::Status {
    match error {
        CallError::Timeout(_) => tonic::Status::deadline_exceeded(error.to_string()),
        _ => tonic::Status::unavailable(error.to_string()),
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl tower::Service<http::Request<tonic::body::Body>> for GrpcChannel {
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per call (endpoint choice, breakers, the in-flight cap).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let upstream = self.upstream.clone();
        let deadline = deadline::within(self.timeout);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // Unary messages are small; buffering lets a retry resend the same bytes.
            let body = body
                .collect()
                .await
                .map_err(|e| Box::new(e) as BoxError)?
                .to_bytes();
            let request = http::Request::from_parts(parts, Full::new(body));
            upstream
                .call(
                    request,
                    CallOptions {
                        deadline,
                        retry_safe: true,
                        cut_slow_attempts: true,
                    },
                )
                .await
                .map_err(|e| Box::new(status(&e)) as BoxError)
        })
    }
}
