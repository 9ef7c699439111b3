//! Logs and metrics.
//!
//! Logs go to stdout through `tracing`; every request runs in a span carrying its request id, so
//! every line logged while handling it can be found by that id. Metrics are recorded with the
//! `metrics` facade into one process-wide Prometheus recorder, rendered by `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global log subscriber. Later calls (several servers in one test binary) keep the
/// first subscriber.
pub fn init_logging(settings: &LogSettings) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&settings.level).map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration: log.level (SHOPMESH_LOG__LEVEL) = {:?}: {e}; expected a \
             tracing filter such as `info` or `info,sqlx=warn`",
            settings.level
        )
    })?;
    // Colours only for a terminal: under the launcher, stdout is a pipe.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_target(true);
    // Ignoring the error is deliberate: it only says a subscriber is already installed.
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    Ok(())
}

/// Latency buckets in seconds: from sub-millisecond in-process work to the 5 s default deadline.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed; then ours still renders what it holds.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}
