//! The client stack every shopmesh process calls others with.
//!
//! ```text
//! call ─► in-flight cap (503 beyond) ─► choose an endpoint:
//!           discovery (static list, launcher registry, DNS, etcd watch)
//!           → healthy (GET /readyz every 2 s) → not ejected (5 failures in a row) → breaker
//!           not open → policy (peak-EWMA p2c, round robin, weighted random, least connections)
//!        ─► send with the time left (grpc-timeout / x-deadline-ms), under the deadline
//!        ─► record latency and outcome (EWMA, breaker window, failures in a row)
//!        ─► retry elsewhere if it failed, the call is safe to repeat (or nothing was sent),
//!           attempts remain and the retry budget (20% of calls + 10/s) allows
//! ```
//!
//! [`Mesh`] owns the upstreams of one process; [`Upstream::call`] is the HTTP entry (the
//! gateway), [`GrpcChannel`] the tonic one (services calling services). [`Mesh::snapshot`] is
//! what `/internal/mesh` and the gateway's `/api/v1/admin/cluster` show.

pub mod backoff;
pub mod balance;
pub mod breaker;
pub mod deadline;
pub mod discovery;
pub mod endpoint;
pub mod etcd;
pub mod grpc;
pub mod outlier;
pub mod register;
pub mod settings;
pub mod upstream;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

pub use discovery::{Registry, RegistryEntry, Source, SpecError};
pub use grpc::GrpcChannel;
pub use settings::{BreakerSettings, EjectionSettings, MeshSettings, Policy, RetrySettings};
pub use upstream::{CallError, CallOptions, Protocol, Upstream, UpstreamSnapshot};

use upstream::HttpClient;

/// A process's upstreams. Cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<MeshSettings>,
    http1: HttpClient,
    http2: HttpClient,
    upstreams: Mutex<BTreeMap<String, Arc<Upstream>>>,
}

/// Every upstream of a process, as the cluster view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MeshSnapshot {
    /// The upstreams, by name.
    pub upstreams: Vec<UpstreamSnapshot>,
}

fn client(settings: &MeshSettings, http2: bool) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(settings.connect_timeout()));
    let mut builder = Client::builder(TokioExecutor::new());
    // Idle connections are given up before a server closes them (it does after its header
    // timeout, 10 s by default): a call sent on one just as the server closes it would fail.
    builder
        .pool_idle_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(256);
    if http2 {
        builder.http2_only(true);
    }
    builder.build::<_, Full<Bytes>>(connector)
}

impl Mesh {
    /// A mesh with no upstreams yet.
    pub fn new(settings: MeshSettings) -> Self {
        let http1 = client(&settings, false);
        let http2 = client(&settings, true);
        Mesh {
            inner: Arc::new(Inner {
                settings: Arc::new(settings),
                http1,
                http2,
                upstreams: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &MeshSettings {
        &self.inner.settings
    }

    /// The upstream `name`, found through `spec` (see [`discovery`]); created, with its
    /// discovery and health-check tasks, on first use; later calls with the same name get that
    /// upstream whatever their spec and protocol (so one service spoken to over gRPC and HTTP
    /// needs two names, as the catalog's `inventory` and `inventory-events`). Needs a Tokio
    /// runtime.
    pub fn upstream(
        &self,
        name: &str,
        spec: &str,
        protocol: Protocol,
    ) -> Result<Arc<Upstream>, SpecError> {
        let mut upstreams = match self.inner.upstreams.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(existing) = upstreams.get(name) {
            return Ok(existing.clone());
        }
        let source = Source::parse(spec)?;
        let client = match protocol {
            Protocol::Http => self.inner.http1.clone(),
            Protocol::Grpc => self.inner.http2.clone(),
        };
        let upstream = Arc::new(Upstream::new(
            name,
            spec,
            protocol,
            self.inner.settings.clone(),
            client,
        ));
        discovery::spawn(
            source,
            &upstream,
            self.inner.settings.clone(),
            self.inner.http1.clone(),
        )?;
        tokio::spawn(health_checks(
            Arc::downgrade(&upstream),
            self.inner.http1.clone(),
            self.inner.settings.clone(),
        ));
        upstreams.insert(name.to_owned(), upstream.clone());
        Ok(upstream)
    }

    /// A tonic channel to the gRPC service `name` at `spec`; every call gets at most
    /// `timeout` (less if the request being handled has less left). The RPCs must be safe to
    /// repeat (ours are: reads, or idempotent by order id).
    pub fn grpc(
        &self,
        name: &str,
        spec: &str,
        timeout: Duration,
    ) -> Result<GrpcChannel, SpecError> {
        Ok(GrpcChannel::new(
            self.upstream(name, spec, Protocol::Grpc)?,
            timeout,
        ))
    }

    /// Every upstream's state.
    pub fn snapshot(&self) -> MeshSnapshot {
        let upstreams = match self.inner.upstreams.lock() {
            Ok(guard) => guard.values().cloned().collect::<Vec<_>>(),
            Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
        };
        MeshSnapshot {
            upstreams: upstreams.iter().map(|u| u.snapshot()).collect(),
        }
    }

    /// A plain HTTP/1.1 client with the mesh's connect timeout (for one-off calls such as
    /// fetching another process's cluster view).
    pub fn http_client(&self) -> Client<HttpConnector, Full<Bytes>> {
        self.inner.http1.clone()
    }
}

/// Asks every endpoint's `/readyz` at the configured interval; an endpoint that does not
/// answer 2xx in time is passed over while others are healthy.
async fn health_checks(upstream: Weak<Upstream>, client: HttpClient, settings: Arc<MeshSettings>) {
    let Some(interval) = settings.health_interval() else {
        return;
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(endpoints) = upstream.upgrade().map(|u| u.endpoints()) else {
            return;
        };
        let checks = endpoints.iter().map(|endpoint| {
            let client = client.clone();
            let timeout = settings.health_timeout();
            async move {
                let authority = endpoint.url.authority().map_or("", |a| a.as_str());
                let url = format!("http://{authority}/readyz");
                let healthy = match http::Request::get(url).body(Full::new(Bytes::new())) {
                    Ok(request) => matches!(
                        tokio::time::timeout(timeout, client.request(request)).await,
                        Ok(Ok(response)) if response.status().is_success()
                    ),
                    Err(_) => false,
                };
                endpoint.set_healthy(healthy);
            }
        });
        futures_util::future::join_all(checks).await;
    }
}
