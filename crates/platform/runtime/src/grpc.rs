//! A plain channel to one gRPC URL, for one-off tools (`shopmesh verify`). Services calling
//! services use `shopmesh_mesh::Mesh::grpc` instead: discovery, balancing, breakers, retries.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// How long connecting may take before a call fails as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A lazily connecting channel to `url`; every call on it fails with `DEADLINE_EXCEEDED` after
/// `deadline` (sent along as `grpc-timeout`, so the callee stops working on it too).
pub fn channel(url: &str, deadline: Duration) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| anyhow::anyhow!("{url:?} is not a valid service URL: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(deadline)
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}
