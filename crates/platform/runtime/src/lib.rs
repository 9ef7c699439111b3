//! What every shopmesh process runs on.
//!
//! # Layout
//! - [`settings`]: the `server` and `log` configuration sections every process has.
//! - [`telemetry`]: structured logs (`tracing`, pretty or JSON) and the Prometheus recorder.
//! - [`app`]: [`App`] puts a service's HTTP routes and gRPC services on one router, with
//!   `/healthz`, `/readyz`, `/metrics`, request ids, per-route metrics, request logs and
//!   problem+json fallbacks for unknown routes and panics.
//! - [`grpc`]: channels to other services, with a deadline on every call.
//! - [`paging`]: `{"items", "next_cursor"}` pages with a bounded `limit`.
//! - [`server`]: binds the port and serves until a shutdown signal, then drains within a grace
//!   period. A server takes its listener and its shutdown future from the caller, so tests run
//!   it on port 0 and stop it when they like.
//! - [`faults`]: an injected delay for local fault testing, only when `server.fault_injection`
//!   is on (never on a non-loopback address).
//! - [`service`]: [`Service`], the skeleton of every service: the server, its background tasks
//!   and what to close, stopped in one order (drain, tasks last-added first, closers).
//!
//! A service's `run` therefore reads: load settings, init telemetry, build the app, bind, add
//! tasks and closers, serve.

pub mod app;
pub mod faults;
pub mod grpc;
pub mod paging;
pub mod server;
pub mod service;
pub mod settings;
pub mod telemetry;

pub use app::{App, ReadinessCheck};
pub use server::{Server, bind, serve, shutdown_signal};
pub use service::{Service, Stopping, stopped};
pub use settings::{LogFormat, LogSettings, ServerSettings};
