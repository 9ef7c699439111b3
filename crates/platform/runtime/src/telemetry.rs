//! Logs and metrics.
//!
//! Logs go to stdout through `tracing`; every request runs in a span carrying its request id, so
//! every line logged while handling it can be found by that id. Metrics are recorded with the
//! `metrics` facade into one process-wide Prometheus recorder, rendered by `/metrics`.

use std::sync::OnceLock;
use std::time::Duration;

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

/// How often the recorder's histograms are drained into their buckets. The recorder keeps every
/// sample recorded since the last drain (16 bytes each, measured); it drains when `/metrics` is
/// rendered and when its upkeep runs, and a recorder built without an exporter never runs its
/// own upkeep. A shop nobody scrapes (every `shopmesh up` without a Prometheus) would otherwise
/// keep every latency it ever measured: at 1,000 requests/s, 55 MiB an hour in each process.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// The process-wide Prometheus recorder, installed on first use, with a thread draining its
/// histograms every [`UPKEEP_EVERY`].
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
        // A thread rather than a task: the recorder is installed before (and outside) any
        // runtime, and a drain is a few microseconds of work once a second.
        let upkept = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkept.run_upkeep();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms drain only when /metrics is read");
        }
        handle
    })
}
