//! The service skeleton: what every shopmesh process has in common, written once.
//!
//! - [`service_config!`] declares a service's `Config`: the common sections every process
//!   accepts (`data_dir`, `[server]`, `[log]`, `[database]`, `[auth]`, `[mesh]`, `[events]`)
//!   plus the service's own section, with `load` and `database_url`. The common sections are
//!   the same types everywhere, so one environment serves every process (`shopmesh up` passes
//!   its own to all of them), and a key unknown to all of them is still refused.
//! - [`run`] is every process's entry point: load the configuration, start logging, build the
//!   service, serve until shut down ([`Service::run_until`] stops it in one order for all).
//!
//! The section types stay with the code that uses them (`shopmesh-runtime` owns `server` and
//! `log`, `shopmesh-db` owns `database`, ...); this crate only puts them together, and
//! re-exports them so the macro's expansion needs nothing from its caller but `serde`.

use std::future::Future;

pub use shopmesh_auth::AuthSettings;
pub use shopmesh_config::{ConfigError, DataDir, Sources};
pub use shopmesh_db::DatabaseSettings;
pub use shopmesh_events::EventsSettings;
pub use shopmesh_mesh::MeshSettings;
pub use shopmesh_runtime::{LogSettings, ServerSettings, Service};

#[doc(hidden)]
pub mod __private {
    pub use secrecy::SecretString;
}

/// A process's whole configuration, as [`run`] needs it.
pub trait Configuration: Sized {
    /// Loads it from these sources (defaults, file, `.env`, environment), or says which key is
    /// wrong and why.
    fn load(sources: &Sources) -> anyhow::Result<Self>;

    /// Its `[log]` section.
    fn log(&self) -> &LogSettings;
}

/// Declares `pub struct Config` for the service `$service`: the common sections plus, when a
/// settings type is given, the service's own section named after it (`[catalog]`). With
/// `load` (from [`Sources`], owning the section `$service`) and `database_url` (the configured
/// one, or `<data_dir>/<service>.db`).
///
/// ```
/// mod config {
///     #[derive(Debug, Clone, Default, serde::Deserialize)]
///     #[serde(deny_unknown_fields, default)]
///     pub struct ShelfSettings {
///         pub height: u32,
///     }
///     shopmesh_service::service_config!(shelf: ShelfSettings);
/// }
/// let sources = shopmesh_service::Sources::empty()
///     .set("SHOPMESH_SHELF__HEIGHT", "3")
///     .set("SHOPMESH_DATABASE__MAX_CONNECTIONS", "2");
/// let config = config::Config::load(&sources).expect("loads");
/// assert_eq!(config.shelf.height, 3);
/// assert_eq!(config.database.max_connections, 2);
/// ```
#[macro_export]
macro_rules! service_config {
    ($service:ident $(: $settings:ty)?) => {
        /// Everything this process reads: the sections every process shares, and its own.
        #[derive(Debug, Clone, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Config {
            /// Where SQLite files live when no database URL is set.
            pub data_dir: $crate::DataDir,
            /// `[server]`: address, port, limits of the one HTTP/gRPC listener.
            pub server: $crate::ServerSettings,
            /// `[log]`.
            pub log: $crate::LogSettings,
            /// `[database]`.
            pub database: $crate::DatabaseSettings,
            /// `[auth]`: how tokens are checked (`jwks_url` where the service has protected
            /// routes; accepted everywhere so one environment serves every process).
            pub auth: $crate::AuthSettings,
            /// `[mesh]`: how calls to other services find and treat their instances, and the
            /// registration of this one in etcd (`mesh.etcd_url`).
            pub mesh: $crate::MeshSettings,
            /// `[events]`: the event transport (RabbitMQ when `events.rabbitmq_url` is set,
            /// else the embedded one), the event log's retention.
            pub events: $crate::EventsSettings,
            $(
                #[doc = concat!("`[", stringify!($service), "]`.")]
                pub $service: $settings,
            )?
        }

        impl Config {
            /// Loads this process's configuration from these sources.
            pub fn load(sources: &$crate::Sources) -> Result<Self, $crate::ConfigError> {
                sources.load(Some(stringify!($service)))
            }

            /// The database URL: the configured one, or the service's SQLite file under
            /// `data_dir`.
            pub fn database_url(&self) -> $crate::__private::SecretString {
                self.database
                    .url_or_default(&self.data_dir, stringify!($service))
            }
        }

        impl $crate::Configuration for Config {
            fn load(sources: &$crate::Sources) -> anyhow::Result<Self> {
                Ok(Config::load(sources)?)
            }

            fn log(&self) -> &$crate::LogSettings {
                &self.log
            }
        }
    };
}

/// Runs a process configured from `sources` until `shutdown` completes: loads its
/// configuration, starts logging as it says, builds the service with `build` and serves.
pub async fn run<C, B, F>(
    sources: Sources,
    shutdown: impl Future<Output = ()> + Send + 'static,
    build: B,
) -> anyhow::Result<()>
where
    C: Configuration,
    B: FnOnce(C) -> F,
    F: Future<Output = anyhow::Result<Service>>,
{
    let config = C::load(&sources)?;
    shopmesh_runtime::telemetry::init_logging(config.log())?;
    build(config).await?.run_until(shutdown).await
}

#[cfg(test)]
mod tests {
    mod own {
        #[derive(Debug, Clone, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Settings {
            pub colour: String,
        }
        crate::service_config!(shelf: Settings);
    }

    mod common_only {
        crate::service_config!(drawer);
    }

    #[test]
    fn the_own_section_and_every_common_one_are_read() {
        let sources = crate::Sources::empty()
            .set("SHOPMESH_SHELF__COLOUR", "red")
            .set("SHOPMESH_SERVER__PORT", "9000")
            .set("SHOPMESH_EVENTS__RETENTION_SECS", "900")
            .set("SHOPMESH_DATA_DIR", "/var/lib/shelf");
        let config = own::Config::load(&sources).expect("loads");
        assert_eq!(config.shelf.colour, "red");
        assert_eq!(config.server.port, 9000);
        assert_eq!(config.events.retention_secs, 900);
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&config.database_url()),
            "sqlite:///var/lib/shelf/shelf.db?mode=rwc"
        );
    }

    #[test]
    fn unknown_keys_are_refused_and_other_processes_sections_set_aside() {
        let unknown = crate::Sources::empty().set("SHOPMESH_SHELF__COLOR", "red");
        let Err(error) = own::Config::load(&unknown) else {
            panic!("an unknown key was accepted");
        };
        let error = error.to_string();
        assert!(error.contains("SHOPMESH_SHELF__COLOR"), "{error}");

        let others = crate::Sources::empty().set("SHOPMESH_ORDERS__ORDER_TTL_SECS", "60");
        assert!(own::Config::load(&others).is_ok());

        // A service without a section of its own refuses one.
        let own_section = crate::Sources::empty().set("SHOPMESH_DRAWER__DEPTH", "3");
        assert!(common_only::Config::load(&own_section).is_err());
        let drawer = common_only::Config::load(&crate::Sources::empty()).expect("loads");
        let url = secrecy::ExposeSecret::expose_secret(&drawer.database_url()).to_owned();
        assert!(url.ends_with("/drawer.db?mode=rwc"), "{url}");
    }
}
