//! The `server` and `log` sections of every process's configuration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

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
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8080,
            shutdown_grace_secs: 10,
            fault_injection: false,
        }
    }
}

impl ServerSettings {
    /// The address to bind.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
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
