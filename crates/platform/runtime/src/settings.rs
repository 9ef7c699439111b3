//! The `server` and `log` sections of every process's configuration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

/// The longest a timeout may be set to, in seconds.
const DAY: u64 = 24 * 60 * 60;

/// `[server]`: where the process listens and how it stops.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Interface to bind; `0.0.0.0` in a container.
    pub host: IpAddr,
    /// Port for HTTP and gRPC; `0` picks a free one.
    pub port: u16,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace_secs: u64,
    /// For local fault testing (`shopmesh chaos`) only: serves `POST /internal/faults`, which
    /// delays every request for a while. Off by default; refused unless `host` is a loopback
    /// address, so a deployed service can never have it.
    pub fault_injection: bool,
    /// A client must send a request's headers within this many seconds of the connection
    /// becoming ready for one (also the longest a kept-alive connection may sit idle), or the
    /// connection is closed.
    pub header_read_timeout_secs: u64,
    /// A request's whole body must arrive within this many seconds, or reading it fails (the
    /// request is refused, or the connection reset).
    pub body_read_timeout_secs: u64,
    /// Connections held at once; beyond, a new one is closed at once (shed) rather than
    /// queued. Keep it under the process's descriptor limit (`ulimit -n`).
    pub max_connections: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8080,
            shutdown_grace_secs: 10,
            fault_injection: false,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            max_connections: 768,
        }
    }
}

impl ServerSettings {
    /// The address to bind.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// What one client may hold.
    pub fn limits(&self) -> crate::server::Limits {
        crate::server::Limits {
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.clamp(1, DAY)),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_secs.clamp(1, DAY)),
            max_connections: self
                .max_connections
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        }
    }

    /// The shutdown grace period.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// `[log]`: what is logged and how.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A `tracing` filter, e.g. `info` or `info,shopmesh_users=debug`.
    pub level: String,
    /// `pretty` for people, `json` for log collectors.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".to_owned(),
            format: LogFormat::Pretty,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Pretty,
    /// One JSON object per event.
    Json,
}
