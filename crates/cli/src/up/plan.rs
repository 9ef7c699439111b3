//! The wiring plan: every instance's address, environment and cores, and the free ports
//! they get.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;

use tokio::sync::watch;

use super::BACKENDS;
use crate::serve::Service;

/// One instance to run: what it is, where it listens, what its environment says, and when
/// it may start.
pub(super) struct Spec {
    pub(super) service: Service,
    /// `inventory` for the first instance, `inventory-2` for the next...
    pub(super) instance: String,
    pub(super) addr: SocketAddr,
    /// The gateway keeps its port (it is the shop's address); services move on restart.
    pub(super) fixed_port: bool,
    pub(super) env: Vec<(String, String)>,
    /// Set once the first instance of the service is ready (it migrates the database).
    pub(super) first_ready: Option<watch::Sender<bool>>,
    /// Started after the first instance is ready.
    pub(super) after: Option<watch::Receiver<bool>>,
    /// The cores it may run on (empty: any).
    pub(super) cores: Vec<usize>,
}

impl Spec {
    /// Moves a service instance to `addr` (its next start listens there).
    pub(super) fn move_to(&mut self, addr: SocketAddr) {
        self.addr = addr;
        for (key, value) in &mut self.env {
            if key == "SHOPMESH_SERVER__PORT" {
                *value = addr.port().to_string();
            }
        }
    }
}

/// Addresses and environments of every instance.
pub(super) fn plan(
    data_dir: &Path,
    gateway: SocketAddr,
    demo: bool,
    database_url_template: Option<&str>,
    replicas: &BTreeMap<&'static str, u32>,
) -> anyhow::Result<Vec<Spec>> {
    if let Some(template) = database_url_template
        && !template.contains("{service}")
    {
        anyhow::bail!(
            "invalid configuration: launcher.database_url_template \
             (SHOPMESH_LAUNCHER__DATABASE_URL_TEMPLATE) must contain {{service}}: every service \
             needs its own database"
        );
    }
    // Fail now, clearly, rather than in a child's log.
    TcpListener::bind(gateway).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {gateway} for the gateway: {e}; choose another with --port"
        )
    })?;
    // The gateway serves the users service's public keys, from whichever instance is up.
    let gateway_local = if gateway.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), gateway.port())
    } else {
        gateway
    };
    let jwks = format!("http://{gateway_local}/.well-known/jwks.json");
    let common = |addr: SocketAddr| {
        vec![
            (
                "SHOPMESH_DATA_DIR".to_owned(),
                data_dir.display().to_string(),
            ),
            ("SHOPMESH_SERVER__HOST".to_owned(), addr.ip().to_string()),
            ("SHOPMESH_SERVER__PORT".to_owned(), addr.port().to_string()),
            (
                "SHOPMESH_MESH__REGISTRY_FILE".to_owned(),
                data_dir.join("registry.json").display().to_string(),
            ),
        ]
    };
    let mut specs = Vec::new();
    for service in BACKENDS {
        let mut env = Vec::new();
        if let Some(template) = database_url_template {
            env.push((
                "SHOPMESH_DATABASE__URL".to_owned(),
                template.replace("{service}", service.name()),
            ));
        }
        if *service != Service::Users {
            env.push(("SHOPMESH_AUTH__JWKS_URL".to_owned(), jwks.clone()));
        }
        match service {
            Service::Catalog => {
                env.push(("SHOPMESH_CATALOG__SEED_DEMO".to_owned(), demo.to_string()));
                env.push((
                    "SHOPMESH_CATALOG__INVENTORY_URL".to_owned(),
                    "registry:inventory".to_owned(),
                ));
            }
            Service::Inventory => {
                env.push(("SHOPMESH_INVENTORY__SEED_DEMO".to_owned(), demo.to_string()));
            }
            Service::Orders => {
                for (target, key) in [
                    ("catalog", "CATALOG_URL"),
                    ("inventory", "INVENTORY_URL"),
                    ("payments", "PAYMENTS_URL"),
                    ("cart", "CART_URL"),
                ] {
                    env.push((
                        format!("SHOPMESH_ORDERS__{key}"),
                        format!("registry:{target}"),
                    ));
                }
            }
            Service::Cart => {
                env.push((
                    "SHOPMESH_CART__CATALOG_URL".to_owned(),
                    "registry:catalog".to_owned(),
                ));
            }
            Service::Notifications => {
                for (target, key) in [("users", "USERS_URL"), ("orders", "ORDERS_URL")] {
                    env.push((
                        format!("SHOPMESH_NOTIFICATIONS__{key}"),
                        format!("registry:{target}"),
                    ));
                }
            }
            Service::Users | Service::Payments | Service::Gateway => {}
        }
        let count = replicas.get(service.name()).copied().unwrap_or(1);
        let (first_tx, first_rx) = watch::channel(false);
        for n in 1..=count {
            // The gateway's port is taken too: it is pushed last, but it is the shop's address.
            let taken: Vec<u16> = specs
                .iter()
                .map(|spec: &Spec| spec.addr.port())
                .chain([gateway.port()])
                .collect();
            let addr = free_loopback_addr(&taken)?;
            let mut instance_env = common(addr);
            instance_env.extend(env.iter().cloned());
            specs.push(Spec {
                service: *service,
                instance: if n == 1 {
                    service.name().to_owned()
                } else {
                    format!("{}-{n}", service.name())
                },
                addr,
                fixed_port: false,
                env: instance_env,
                first_ready: (n == 1).then(|| first_tx.clone()),
                after: (n > 1).then(|| first_rx.clone()),
                cores: Vec::new(),
            });
        }
    }
    let mut gateway_env = common(gateway);
    gateway_env.push(("SHOPMESH_AUTH__JWKS_URL".to_owned(), jwks));
    for service in BACKENDS {
        gateway_env.push((
            format!(
                "SHOPMESH_GATEWAY__UPSTREAMS__{}",
                service.name().to_ascii_uppercase()
            ),
            format!("registry:{}", service.name()),
        ));
    }
    specs.push(Spec {
        service: Service::Gateway,
        instance: Service::Gateway.name().to_owned(),
        addr: gateway,
        fixed_port: true,
        env: gateway_env,
        first_ready: None,
        after: None,
        cores: Vec::new(),
    });
    Ok(specs)
}

/// A free loopback port for a service. Chosen below Linux's ephemeral range (32768 and up),
/// where outgoing connections take their local ports: a port picked with `bind(0)` and released
/// can be taken by some client's connection before the child binds it; one from this range
/// cannot. Random, and checked by binding, so parallel launchers rarely even try the same one.
/// Not one of `taken` (ports this launcher already gave out but whose child may not listen yet).
/// A port taken anyway between this check and the child's bind makes the child exit with
/// [`crate::serve::EXIT_ADDRESS_IN_USE`], and `supervise` moves it to another.
pub(super) fn free_loopback_addr(taken: &[u16]) -> anyhow::Result<SocketAddr> {
    const RANGE: std::ops::Range<u16> = 20_000..32_000;
    for _ in 0..200 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), RANGE);
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        if !taken.contains(&port) && TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    anyhow::bail!("no free port between 20000 and 32000 on 127.0.0.1")
}
