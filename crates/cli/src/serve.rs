//! `shopmesh serve <service>`: one service process.

use std::sync::Arc;

use clap::{Args, ValueEnum};
use serde::Deserialize;
use shopmesh_config::Sources;
use shopmesh_mesh::MeshSettings;
use shopmesh_mesh::register::{Registrar, Registration};
use shopmesh_runtime::ServerSettings;
use tokio::io::AsyncReadExt;

/// The services this binary can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    /// The API gateway (the public door; serves /api/v1).
    Gateway,
    /// Accounts, login, tokens, JWKS.
    Users,
    /// Products: search, listing, admin editing, prices.
    Catalog,
    /// Stock levels and reservations.
    Inventory,
    /// Charges and refunds (simulated card network).
    Payments,
    /// Checkout: orders, payment and cancellation as a resumable saga.
    Orders,
    /// One cart per customer.
    Cart,
    /// One e-mail per user and order event.
    Notifications,
}

impl Service {
    /// The service's name, as in configuration sections and logs.
    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Users => "users",
            Service::Catalog => "catalog",
            Service::Inventory => "inventory",
            Service::Payments => "payments",
            Service::Orders => "orders",
            Service::Cart => "cart",
            Service::Notifications => "notifications",
        }
    }
}

/// The exit status of a process that could not listen because its address is taken (98 is
/// Linux's `EADDRINUSE`): the launcher then moves the instance to another port instead of
/// giving up, since another program can take a port between its check and the child's bind.
pub const EXIT_ADDRESS_IN_USE: u8 = 98;

/// Whether `error` comes from an address already in use.
pub fn address_in_use(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
    })
}

/// Runs one service, configured from the environment: `SHOPMESH_SERVER__PORT`,
/// `SHOPMESH_DATABASE__URL`, ... (see the README's configuration section).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Which service to run.
    #[arg(value_enum)]
    service: Service,
    /// Stop when standard input closes (the launcher uses this so that its children never
    /// outlive it, even if it is killed with SIGKILL).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
    /// Run only on these cores, e.g. `--cpus 0` or `--cpus 2,3` (the launcher's share for
    /// this process, `launcher.pin_cores`); applied before any thread starts.
    #[arg(long, hide = true, value_delimiter = ',')]
    pub cpus: Vec<usize>,
}

/// The sections `serve` itself reads (each service checks its whole configuration).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Common {
    server: ServerSettings,
    mesh: MeshSettings,
}

/// The URL others reach this instance at: `mesh.advertise_url`, or the address it binds.
fn advertise_url(common: &Common) -> anyhow::Result<String> {
    if let Some(url) = &common.mesh.advertise_url {
        return Ok(url.clone());
    }
    if common.server.host.is_unspecified() {
        anyhow::bail!(
            "invalid configuration: mesh.advertise_url (SHOPMESH_MESH__ADVERTISE_URL) is needed \
             to register in etcd when server.host is {} (others cannot reach that address)",
            common.server.host
        );
    }
    Ok(format!("http://{}", common.server.addr()))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // First of all: a SIGTERM during start-up stops the process cleanly.
    let signal = shopmesh_runtime::shutdown_signal();
    let sources = Sources::from_process();
    let common: Common = sources.load(Some(args.service.name()))?;
    // In a fleet discovered through etcd, the instance announces itself under a lease once it
    // answers ready (never before, so no caller is sent to a port nobody listens on yet): if
    // it dies, the lease runs out and clients drop it; if it stops, it withdraws at once,
    // before it drains (new calls go elsewhere while the ones it has finish).
    let registration = Arc::new(tokio::sync::Mutex::new(Announcement::default()));
    if common.mesh.etcd_url.is_some() {
        if common.server.port == 0 {
            anyhow::bail!(
                "invalid configuration: server.port (SHOPMESH_SERVER__PORT) must be set to \
                 register in etcd (port 0 picks one that others could not be told)"
            );
        }
        let registrar = Registrar::new(&common.mesh, args.service.name(), &advertise_url(&common)?)
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        if let Some(registrar) = registrar {
            tokio::spawn(announce_when_ready(
                registration.clone(),
                registrar,
                probe_url(&common.server),
            ));
        }
    }
    let withdraw = registration.clone();
    let exit_with_parent = args.exit_with_parent;
    let shutdown = async move {
        if exit_with_parent {
            tokio::select! {
                () = signal => {},
                () = stdin_closed() => tracing::warn!("launcher gone; shutting down"),
            }
        } else {
            signal.await;
        }
        withdraw.lock().await.withdraw().await;
    };
    let result = match args.service {
        Service::Users => {
            shopmesh_service::run(sources, shutdown, shopmesh_users::Application::build).await
        }
        Service::Catalog => {
            shopmesh_service::run(sources, shutdown, shopmesh_catalog::Application::build).await
        }
        Service::Inventory => {
            shopmesh_service::run(sources, shutdown, shopmesh_inventory::Application::build).await
        }
        Service::Payments => {
            shopmesh_service::run(sources, shutdown, shopmesh_payments::Application::build).await
        }
        Service::Orders => {
            shopmesh_service::run(sources, shutdown, shopmesh_orders::Application::build).await
        }
        Service::Cart => {
            shopmesh_service::run(sources, shutdown, shopmesh_cart::Application::build).await
        }
        Service::Notifications => {
            shopmesh_service::run(
                sources,
                shutdown,
                shopmesh_notifications::Application::build,
            )
            .await
        }
        Service::Gateway => {
            shopmesh_service::run(sources, shutdown, shopmesh_gateway::Application::build).await
        }
    };
    // Stopped without a signal (a failure): withdraw now.
    registration.lock().await.withdraw().await;
    result
}

/// An instance's place in etcd: not yet announced, announced, or withdrawn for good.
#[derive(Default)]
struct Announcement {
    registration: Option<Registration>,
    withdrawn: bool,
}

impl Announcement {
    /// Gives up the registration, if any, and refuses any later one.
    async fn withdraw(&mut self) {
        self.withdrawn = true;
        if let Some(registration) = self.registration.take() {
            registration.stop().await;
        }
    }
}

/// Where the instance's own `/readyz` answers (the loopback when it binds every address).
fn probe_url(server: &ServerSettings) -> String {
    let host = match server.host {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!(
        "http://{}/readyz",
        std::net::SocketAddr::new(host, server.port)
    )
}

/// Registers the instance in etcd once its `/readyz` answers 200, unless it has withdrawn by
/// then.
async fn announce_when_ready(
    slot: Arc<tokio::sync::Mutex<Announcement>>,
    registrar: Registrar,
    probe: String,
) {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .build()
        .expect("an HTTP client");
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(50));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if slot.lock().await.withdrawn {
            return;
        }
        match client.get(&probe).send().await {
            Ok(response) if response.status().is_success() => break,
            _ => {}
        }
    }
    let mut slot = slot.lock().await;
    if slot.withdrawn {
        return;
    }
    tracing::info!(key = registrar.key(), "ready; registering in etcd");
    slot.registration = Some(registrar.start());
}

async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_probed_on_the_loopback_when_every_address_is_bound() {
        let server = |host: &str| ServerSettings {
            host: host.parse().expect("an address"),
            port: 8081,
            ..Default::default()
        };
        assert_eq!(
            probe_url(&server("0.0.0.0")),
            "http://127.0.0.1:8081/readyz"
        );
        assert_eq!(probe_url(&server("::")), "http://[::1]:8081/readyz");
        assert_eq!(
            probe_url(&server("10.1.2.3")),
            "http://10.1.2.3:8081/readyz"
        );
    }

    fn loads<T>(loaded: Result<T, shopmesh_config::ConfigError>) -> anyhow::Result<()> {
        Ok(loaded.map(drop)?)
    }

    /// `shopmesh up` hands one environment to every process: a key of each common section,
    /// set once for the whole shop, must start every process, whether it uses that section
    /// or not (the gateway has no database, the cart no events).
    #[test]
    fn every_process_accepts_a_key_of_every_common_section() {
        let sources = Sources::empty().env([
            ("SHOPMESH_DATA_DIR", "/var/lib/shopmesh"),
            ("SHOPMESH_SERVER__SHUTDOWN_GRACE_SECS", "5"),
            ("SHOPMESH_LOG__LEVEL", "info"),
            ("SHOPMESH_DATABASE__MAX_CONNECTIONS", "1"),
            ("SHOPMESH_AUTH__LEEWAY_SECS", "5"),
            ("SHOPMESH_MESH__LEASE_TTL_SECS", "10"),
            ("SHOPMESH_EVENTS__PREFETCH", "8"),
        ]);
        assert_eq!(
            shopmesh_config::COMMON_SECTIONS.len(),
            sources.env_map().len(),
            "one key per common section"
        );
        for service in Service::value_variants() {
            let name = service.name();
            let loaded = match service {
                Service::Gateway => shopmesh_gateway::Config::load(&sources).map(drop),
                Service::Users => loads(shopmesh_users::Config::load(&sources)),
                Service::Catalog => loads(shopmesh_catalog::Config::load(&sources)),
                Service::Inventory => loads(shopmesh_inventory::Config::load(&sources)),
                Service::Orders => loads(shopmesh_orders::Config::load(&sources)),
                Service::Payments => loads(shopmesh_payments::Config::load(&sources)),
                Service::Cart => loads(shopmesh_cart::Config::load(&sources)),
                Service::Notifications => loads(shopmesh_notifications::Config::load(&sources)),
            };
            if let Err(e) = loaded {
                panic!("{name} refused the shop's environment: {e:#}");
            }
            let common: Result<Common, _> = sources.load(Some(name));
            assert!(common.is_ok(), "serve {name}: {common:?}");
        }
        // A misspelt section is still refused, by every process.
        let typo = Sources::empty().env([("SHOPMESH_DATABSE__MAX_CONNECTIONS", "1")]);
        assert!(shopmesh_gateway::Config::load(&typo).is_err());
        assert!(shopmesh_orders::Config::load(&typo).is_err());
    }
}
