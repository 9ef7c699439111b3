//! An upstream (one service, all its endpoints) and a call to it: choose an endpoint, send
//! under the deadline, record the outcome, retry where safe and the budget allows.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::balance;
use crate::breaker::{Permit, State};
use crate::deadline;
use crate::endpoint::{Endpoint, EndpointSnapshot};
use crate::settings::{MeshSettings, Policy};

/// The pooled client calls go out on.
pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (the gateway's proxied requests).
    Http,
    /// gRPC over HTTP/2.
    Grpc,
}

/// Why a call failed without an answer from the service.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    /// Discovery knows no endpoint.
    #[error("no {0} endpoint is known")]
    NoEndpoints(String),
    /// Every endpoint's breaker is open (or it is ejected): failed fast, nothing was sent.
    #[error("every {0} endpoint's circuit is open")]
    CircuitOpen(String),
    /// Too many calls to this upstream are in flight: shed, nothing was sent.
    #[error("too many calls to {0} in flight")]
    Overloaded(String),
    /// The deadline passed.
    #[error("{0} did not answer before the deadline")]
    Timeout(String),
    /// No connection could be made.
    #[error("cannot connect to {0}")]
    Connect(String),
    /// The exchange broke off.
    #[error("the exchange with {0} broke off")]
    Transport(String),
}

impl CallError {
    /// Whether nothing reached the service (so the call certainly had no effect).
    pub fn nothing_sent(&self) -> bool {
        matches!(
            self,
            CallError::NoEndpoints(_)
                | CallError::CircuitOpen(_)
                | CallError::Overloaded(_)
                | CallError::Connect(_)
        )
    }

    fn label(&self) -> &'static str {
        match self {
            CallError::NoEndpoints(_) => "no_endpoints",
            CallError::CircuitOpen(_) => "circuit_open",
            CallError::Overloaded(_) => "overloaded",
            CallError::Timeout(_) => "timeout",
            CallError::Connect(_) => "connect",
            CallError::Transport(_) => "transport",
        }
    }
}

/// How one call may be handled.
#[derive(Debug, Clone, Copy)]
pub struct CallOptions {
    /// When the caller stops waiting.
    pub deadline: Instant,
    /// Whether sending the request twice is harmless (idempotent method, an idempotency key,
    /// or an RPC idempotent by contract). Unsafe calls are retried only when nothing was sent.
    pub retry_safe: bool,
    /// Whether a slow attempt may be abandoned after `mesh.attempt_timeout_ms` and the call
    /// tried elsewhere while it may still be running. Right for reads and RPCs idempotent by
    /// contract; wrong for a POST with an idempotency key, whose repeat would find the first
    /// still in progress (409) and which the service stops working on at the attempt's
    /// deadline.
    pub cut_slow_attempts: bool,
}

/// One service's endpoints and the state of calls to them.
pub struct Upstream {
    name: String,
    spec: String,
    policy: Policy,
    protocol: Protocol,
    settings: Arc<MeshSettings>,
    client: HttpClient,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    cursor: AtomicUsize,
    in_flight: AtomicUsize,
    budget: TpsBudget,
    calls: AtomicU64,
    retries: AtomicU64,
    shed: AtomicU64,
    fast_failures: AtomicU64,
    /// Bumped whenever discovery changes the endpoint set.
    generation: tokio::sync::watch::Sender<u64>,
    /// `mesh_calls_total` of answered calls, ok and failed, registered at the first: looking
    /// the series up (its name and labels hashed, the upstream's name copied) cost every call.
    /// Taken after the process installed its recorder (before serving), as every call is.
    answered: [std::sync::OnceLock<metrics::Counter>; 2],
}

/// How long a call waits for discovery when no endpoint is known yet (a process that has
/// just started, before its first registry read or DNS answer).
const DISCOVERY_WAIT: Duration = Duration::from_secs(1);

/// What the cluster view shows of an upstream.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamSnapshot {
    /// The service.
    pub name: String,
    /// Where its endpoints come from.
    pub source: String,
    /// The balancing policy.
    pub policy: &'static str,
    /// Calls in flight.
    pub in_flight: usize,
    /// Calls made (each call once, however many attempts).
    pub calls: u64,
    /// Extra attempts made.
    pub retries: u64,
    /// Calls refused for too many in flight.
    pub shed: u64,
    /// Calls failed fast because every circuit was open.
    pub fast_failures: u64,
    /// Its endpoints.
    pub endpoints: Vec<EndpointSnapshot>,
}

/// Counts a call in flight for the upstream's cap.
struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One attempt on one endpoint: if dropped unfinished (the caller went away), it neither
/// counts as a failure nor keeps a breaker trial slot.
struct Attempt {
    endpoint: Arc<Endpoint>,
    permit: Option<Permit>,
    started: Instant,
}

impl Attempt {
    /// Records the outcome; `true` when the endpoint should be ejected.
    fn finish(mut self, failed: bool, settings: &MeshSettings) -> bool {
        match self.permit.take() {
            Some(permit) => self.endpoint.end(permit, self.started, failed, settings),
            None => false,
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.endpoint.abandon(permit);
        }
    }
}

/// What became of one attempt.
enum Outcome {
    /// An answer that is not a failure.
    Answer(Response<Incoming>),
    /// A failure answer (5xx; gRPC UNAVAILABLE and the like): worth retrying if `retryable`.
    FailedAnswer(Response<Incoming>, bool),
    /// No answer; `always` if nothing was sent (retry even unsafe calls).
    Error(CallError, Retry),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    Never,
    IfSafe,
    Always,
}

/// The retry budget: a one-second window, so "20% of calls plus 10 per second" holds second
/// by second.
fn budget(retry: &crate::settings::RetrySettings) -> TpsBudget {
    TpsBudget::new(
        Duration::from_secs(1),
        retry.budget_per_sec,
        retry.budget_percent as f32 / 100.0,
    )
}

impl Upstream {
    pub(crate) fn new(
        name: &str,
        spec: &str,
        protocol: Protocol,
        settings: Arc<MeshSettings>,
        client: HttpClient,
    ) -> Self {
        let retry = &settings.retry;
        Upstream {
            name: name.to_owned(),
            spec: spec.to_owned(),
            policy: settings.policy(name),
            protocol,
            budget: budget(retry),
            settings,
            client,
            endpoints: RwLock::new(Arc::new(Vec::new())),
            cursor: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            answered: Default::default(),
            retries: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            fast_failures: AtomicU64::new(0),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        match self.endpoints.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the endpoint set with what discovery found, keeping what is known of the
    /// endpoints that stay.
    pub(crate) fn set_endpoints(&self, found: Vec<(Uri, u32)>) {
        let current = self.endpoints();
        let mut next = Vec::with_capacity(found.len());
        for (url, weight) in found {
            if next.iter().any(|e: &Arc<Endpoint>| e.url == url) {
                continue;
            }
            match current
                .iter()
                .find(|e| e.url == url && e.weight == weight.max(1))
            {
                Some(kept) => next.push(kept.clone()),
                None => next.push(Arc::new(Endpoint::new(url, weight, &self.settings))),
            }
        }
        let changed = next.len() != current.len()
            || next.iter().zip(current.iter()).any(|(a, b)| a.url != b.url);
        if changed {
            tracing::info!(
                upstream = %self.name,
                endpoints = ?next.iter().map(|e| e.url.to_string()).collect::<Vec<_>>(),
                "endpoints changed"
            );
        }
        match self.endpoints.write() {
            Ok(mut guard) => *guard = Arc::new(next),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
        }
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Waits (bounded) for discovery to find a first endpoint.
    async fn await_discovery(&self, deadline: Instant) {
        let mut changes = self.generation.subscribe();
        if !self.endpoints().is_empty() {
            return;
        }
        let until = deadline.min(Instant::now() + DISCOVERY_WAIT);
        let _ = tokio::time::timeout_at(until, async {
            while self.endpoints().is_empty() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// What the cluster view shows.
    pub fn snapshot(&self) -> UpstreamSnapshot {
        UpstreamSnapshot {
            name: self.name.clone(),
            source: self.spec.clone(),
            policy: self.policy.as_str(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            shed: self.shed.load(Ordering::Relaxed),
            fast_failures: self.fast_failures.load(Ordering::Relaxed),
            endpoints: self.endpoints().iter().map(|e| e.snapshot()).collect(),
        }
    }

    /// Sends `request` (its URI's path and query are kept; scheme and authority are the chosen
    /// endpoint's) and returns the answer, retrying where `options` allow.
    ///
    /// A failure answer (a 5xx, gRPC `UNAVAILABLE`) that is not retried is returned as the
    /// answer; `Err` means there was none.
    pub async fn call(
        &self,
        request: Request<Full<Bytes>>,
        options: CallOptions,
    ) -> Result<Response<Incoming>, CallError> {
        let _admitted = self.admit()?;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.budget.deposit();
        self.await_discovery(options.deadline).await;
        let (parts, body) = request.into_parts();
        // Kept as parsed (its bytes shared, not copied): each attempt's URI is made of it and
        // the endpoint's scheme and authority, without formatting or parsing one.
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut tried: Vec<Uri> = Vec::new();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let now = Instant::now();
            if now >= options.deadline {
                return self.fail(CallError::Timeout(self.name.clone()));
            }
            let (endpoint, permit) = match self.choose(&tried, now) {
                Ok(chosen) => chosen,
                Err(e) => return self.fail(e),
            };
            let attempt_deadline = if options.retry_safe && options.cut_slow_attempts {
                options.deadline.min(now + self.settings.attempt_timeout())
            } else {
                options.deadline
            };
            let outgoing = self.build(
                &parts.method,
                &parts.headers,
                &endpoint.url,
                &path,
                attempt_deadline,
                body.clone(),
            );
            let url = endpoint.url.clone();
            let guard = Attempt {
                endpoint,
                permit: Some(permit),
                started: now,
            };
            let outcome = match outgoing {
                Ok(outgoing) => self.classify(
                    tokio::time::timeout_at(attempt_deadline, self.client.request(outgoing)).await,
                    attempt_deadline < options.deadline,
                ),
                Err(()) => Outcome::Error(CallError::Transport(self.name.clone()), Retry::Never),
            };
            let failed = !matches!(outcome, Outcome::Answer(_));
            let endpoint = guard.endpoint.clone();
            if guard.finish(failed, &self.settings) {
                self.maybe_eject(&endpoint);
            }
            let retry = match &outcome {
                Outcome::Answer(_) => Retry::Never,
                Outcome::FailedAnswer(_, retryable) => {
                    if *retryable {
                        Retry::IfSafe
                    } else {
                        Retry::Never
                    }
                }
                Outcome::Error(_, retry) => *retry,
            };
            let allowed = match retry {
                Retry::Never => false,
                Retry::IfSafe => options.retry_safe,
                Retry::Always => true,
            };
            let backoff = self.backoff(attempt);
            // A call that reached no one (refused connection) is sent for the first time when
            // it is tried elsewhere: it adds no load, so it does not spend the retry budget.
            if !allowed
                || attempt >= self.settings.retry.max_attempts.max(1)
                || Instant::now() + backoff >= options.deadline
                || (retry != Retry::Always && !self.withdraw())
            {
                return match outcome {
                    Outcome::Answer(response) | Outcome::FailedAnswer(response, _) => {
                        self.answered[usize::from(failed)]
                            .get_or_init(|| {
                                let outcome = if failed { "failed" } else { "ok" };
                                metrics::counter!("mesh_calls_total", "upstream" => self.name.clone(), "outcome" => outcome)
                            })
                            .increment(1);
                        Ok(response)
                    }
                    Outcome::Error(e, _) => self.fail(e),
                };
            }
            tried.push(url);
            self.retries.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("mesh_retries_total", "upstream" => self.name.clone()).increment(1);
            tokio::time::sleep(backoff).await;
        }
    }

    fn fail<T>(&self, error: CallError) -> Result<T, CallError> {
        if matches!(error, CallError::CircuitOpen(_)) {
            self.fast_failures.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!("mesh_calls_total", "upstream" => self.name.clone(), "outcome" => error.label()).increment(1);
        Err(error)
    }

    fn withdraw(&self) -> bool {
        let ok = self.budget.withdraw();
        if !ok {
            metrics::counter!("mesh_retry_budget_exhausted_total", "upstream" => self.name.clone())
                .increment(1);
        }
        ok
    }

    fn admit(&self) -> Result<Admitted<'_>, CallError> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let admitted = Admitted(&self.in_flight);
        if before >= self.settings.max_in_flight.max(1) {
            self.shed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("mesh_calls_total", "upstream" => self.name.clone(), "outcome" => "overloaded").increment(1);
            return Err(CallError::Overloaded(self.name.clone()));
        }
        Ok(admitted)
    }

    /// Jittered exponential back-off before attempt `attempt + 1`.
    fn backoff(&self, attempt: u32) -> Duration {
        let retry = &self.settings.retry;
        let ceiling = retry
            .backoff_base_ms
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(retry.backoff_max_ms)
            .max(1);
        Duration::from_millis(rand::thread_rng().gen_range(ceiling / 2..=ceiling))
    }

    /// Chooses an endpoint and takes its breaker's leave. Prefers healthy endpoints not yet
    /// tried by this call; if none is left, tried ones; if the health checks fail everywhere,
    /// any endpoint whose breaker allows it (a failing health check must not take down a
    /// service that still answers).
    fn choose(&self, tried: &[Uri], now: Instant) -> Result<(Arc<Endpoint>, Permit), CallError> {
        let all = self.endpoints();
        if all.is_empty() {
            return Err(CallError::NoEndpoints(self.name.clone()));
        }
        let filters: [&dyn Fn(&Endpoint) -> bool; 4] = [
            &|e| e.is_healthy() && e.is_available(now) && !tried.contains(&e.url),
            &|e| e.is_healthy() && e.is_available(now),
            &|e| e.is_available(now),
            &|e| e.breaker_allows(now),
        ];
        for filter in filters {
            let mut candidates: Vec<Arc<Endpoint>> =
                all.iter().filter(|e| filter(e)).cloned().collect();
            while !candidates.is_empty() {
                let Some(chosen) =
                    balance::pick(self.policy, &candidates, &self.cursor, now).cloned()
                else {
                    break;
                };
                if let Some(permit) = chosen.begin(now) {
                    return Ok((chosen, permit));
                }
                candidates.retain(|e| !Arc::ptr_eq(e, &chosen));
            }
        }
        Err(CallError::CircuitOpen(self.name.clone()))
    }

    /// Ejects `endpoint` unless that would eject more than the allowed share.
    fn maybe_eject(&self, endpoint: &Arc<Endpoint>) {
        let all = self.endpoints();
        let now = Instant::now();
        let ejected = all.iter().filter(|e| e.is_ejected(now)).count();
        let allowed = all.len() * self.settings.ejection.max_percent.min(100) as usize / 100;
        if !endpoint.is_ejected(now) && ejected < allowed {
            endpoint.eject(&self.settings);
            metrics::counter!("mesh_ejections_total", "upstream" => self.name.clone()).increment(1);
        }
    }

    fn build(
        &self,
        method: &Method,
        headers: &HeaderMap,
        base: &Uri,
        path: &PathAndQuery,
        deadline: Instant,
        body: Full<Bytes>,
    ) -> Result<Request<Full<Bytes>>, ()> {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(base.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP));
        uri.authority = Some(base.authority().cloned().ok_or(())?);
        uri.path_and_query = Some(path.clone());
        let uri = Uri::from_parts(uri).map_err(|_| ())?;
        let mut request = Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers.clone();
        *request.version_mut() = match self.protocol {
            Protocol::Http => Version::HTTP_11,
            Protocol::Grpc => Version::HTTP_2,
        };
        deadline::set_headers(
            request.headers_mut(),
            deadline,
            self.protocol == Protocol::Grpc,
        );
        Ok(request)
    }

    fn classify(
        &self,
        result: Result<
            Result<Response<Incoming>, hyper_util::client::legacy::Error>,
            tokio::time::error::Elapsed,
        >,
        attempt_cut_short: bool,
    ) -> Outcome {
        let name = || self.name.clone();
        match result {
            Err(_) if attempt_cut_short => {
                Outcome::Error(CallError::Timeout(name()), Retry::IfSafe)
            }
            Err(_) => Outcome::Error(CallError::Timeout(name()), Retry::Never),
            Ok(Err(e)) if e.is_connect() => {
                tracing::debug!(upstream = %self.name, error = ?e, "connect failed");
                Outcome::Error(CallError::Connect(name()), Retry::Always)
            }
            Ok(Err(e)) => {
                tracing::debug!(upstream = %self.name, error = ?e, "exchange broke off");
                Outcome::Error(CallError::Transport(name()), Retry::IfSafe)
            }
            Ok(Ok(response)) => match self.protocol {
                Protocol::Http => match response.status() {
                    StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT => Outcome::FailedAnswer(response, true),
                    s if s.is_server_error() => Outcome::FailedAnswer(response, false),
                    _ => Outcome::Answer(response),
                },
                Protocol::Grpc => {
                    if response.status() != StatusCode::OK {
                        let retryable = response.status() == StatusCode::SERVICE_UNAVAILABLE;
                        return Outcome::FailedAnswer(response, retryable);
                    }
                    // A failure decided before the handler answered travels as trailers-only:
                    // its status is in the headers.
                    match response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                    {
                        // UNAVAILABLE
                        Some(14) => Outcome::FailedAnswer(response, true),
                        // UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, DATA_LOSS
                        Some(2 | 4 | 13 | 15) => Outcome::FailedAnswer(response, false),
                        _ => Outcome::Answer(response),
                    }
                }
            },
        }
    }

    /// Breaker states of the endpoints, for tests and logs.
    pub fn breaker_states(&self) -> Vec<State> {
        let now = Instant::now();
        self.endpoints()
            .iter()
            .map(|e| e.breaker_state(now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::RetrySettings;

    fn retries_allowed(budget: &TpsBudget) -> usize {
        (0..10_000).take_while(|_| budget.withdraw()).count()
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_a_fifth_of_calls_plus_ten_a_second() {
        let budget = budget(&RetrySettings::default());
        for _ in 0..100 {
            budget.deposit();
        }
        // 100 calls: 20 retries for them plus the 10 of this second, no more.
        assert_eq!(retries_allowed(&budget), 30);
        // Within the same second, no further allowance.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(retries_allowed(&budget), 0);
        // A second later the calls have aged out and the per-second allowance is back.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(retries_allowed(&budget), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn without_calls_only_the_per_second_allowance_remains() {
        let budget = budget(&RetrySettings {
            budget_per_sec: 0,
            ..RetrySettings::default()
        });
        assert_eq!(retries_allowed(&budget), 0);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(retries_allowed(&budget), 2);
    }
}
