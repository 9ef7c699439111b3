//! `shopmesh up`: the whole shop on one machine, one process per service, supervised.
//!
//! The launcher re-executes its own binary as `shopmesh serve <service>` for each service, with
//! the port, data directory and upstream addresses in the child's environment. It
//!
//! - runs `--replicas` instances of a service if asked (`--replicas inventory=3,catalog=2`, or
//!   `launcher.replicas.<service>`), the first before the others (it migrates the database);
//! - confines each instance to its share of the cores when `launcher.pin_cores` is true (unset:
//!   only when `up` may use exactly 2 cores; see
//!   [`crate::cores`]), passed as `serve --cpus` so the child applies it before its threads start;
//! - picks a free loopback port per instance (the gateway gets `--port`, default 8080); an
//!   instance that restarts gets a new one;
//! - keeps `<data-dir>/registry.json` true: the ready instances of every service, which every
//!   process's mesh re-reads (`registry:<service>` upstreams), so instances that come, go or
//!   move are found;
//! - prefixes each child's output with its name;
//! - waits until every child answers `/readyz`, then prints the table and `ready: <url>`;
//! - restarts a child that dies, after a back-off (0.5 s doubling to 10 s, reset after 30 s of
//!   uptime); a child that dies before ever becoming ready aborts `up` with its error;
//! - on Ctrl-C or SIGTERM sends SIGTERM to every child, waits for them (SIGKILL after the
//!   grace period) and exits. Children run in their own process group (so a terminal's Ctrl-C
//!   reaches only the launcher, which stops them in order) and stop by themselves if the
//!   launcher vanishes, because their stdin is a pipe from it.
//!
//! `<data-dir>/up.json` says which process listens where, while `up` runs. Services fetch the
//! token keys through the gateway (`/.well-known/jwks.json`), whichever users instance serves.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use shopmesh_config::{DataDir, Sources};
use shopmesh_mesh::{Registry, RegistryEntry};
use tokio::sync::{mpsc, watch};

use crate::serve::Service;

/// Runs every shopmesh service on this machine.
/// Every process `up` runs: the services behind the gateway in start order (users first: the
/// others fetch its JWKS), then the gateway.
const SERVICES: &[Service] = &[
    Service::Users,
    Service::Catalog,
    Service::Inventory,
    Service::Payments,
    Service::Cart,
    Service::Orders,
    Service::Notifications,
    Service::Gateway,
];
/// The services behind the gateway, in start order: all but the last of [`SERVICES`].
pub(crate) const BACKENDS: &[Service] = match SERVICES.split_last() {
    Some((_, backends)) => backends,
    None => &[],
};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory for the services' SQLite files [default: ./data, or SHOPMESH_DATA_DIR].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Port of the gateway, the shop's address [default: 8080, or SHOPMESH_LAUNCHER__PORT].
    #[arg(long)]
    port: Option<u16>,
    /// Interface the gateway listens on (services always listen on loopback).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// Start with an empty catalog instead of the demo products and their stock.
    #[arg(long)]
    no_demo: bool,
    /// Instances per service, e.g. `inventory=3,catalog=2` [default: 1 each, or
    /// SHOPMESH_LAUNCHER__REPLICAS__<SERVICE>].
    #[arg(long, value_delimiter = ',', value_name = "SERVICE=N")]
    replicas: Vec<String>,
}

/// What the launcher itself reads from configuration. Other sections are the children's, who
/// check them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LauncherConfig {
    data_dir: DataDir,
    launcher: LauncherSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LauncherSettings {
    /// The gateway's port.
    port: u16,
    /// How long every service has to become ready.
    ready_timeout_secs: u64,
    /// Run the services on PostgreSQL (or any URL) instead of SQLite files: `{service}` is
    /// replaced by each service's name, e.g. `postgres://shop@db/shop_{service}`. Each
    /// service needs its own database.
    database_url_template: Option<String>,
    /// Instances per service, e.g. `replicas.inventory = 3`.
    replicas: BTreeMap<String, u32>,
    /// Confine each process to its own share of the cores (Linux; see `cores.rs`): its threads
    /// then hand work to each other on one core instead of waking each other across cores.
    /// Unset: on when `up` may use two cores (where it was measured), off otherwise.
    pin_cores: Option<bool>,
}

impl Default for LauncherSettings {
    fn default() -> Self {
        LauncherSettings {
            port: 8080,
            ready_timeout_secs: 60,
            database_url_template: None,
            replicas: BTreeMap::new(),
            pin_cores: None,
        }
    }
}

/// Most instances of one service `up` runs.
const MAX_REPLICAS: u32 = 16;

/// Instances per service: the configured ones, overridden by `--replicas`.
fn replicas(
    configured: &BTreeMap<String, u32>,
    args: &[String],
) -> anyhow::Result<BTreeMap<&'static str, u32>> {
    let mut counts: BTreeMap<&'static str, u32> = BACKENDS.iter().map(|s| (s.name(), 1)).collect();
    let mut set = |name: &str, n: u32, origin: &str| -> anyhow::Result<()> {
        let Some(service) = BACKENDS.iter().find(|s| s.name() == name) else {
            anyhow::bail!(
                "{origin}: {name:?} is not a service that can have replicas (one of: {})",
                BACKENDS
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if !(1..=MAX_REPLICAS).contains(&n) {
            anyhow::bail!("{origin}: {name} = {n}: expected 1 to {MAX_REPLICAS} instances");
        }
        counts.insert(service.name(), n);
        Ok(())
    };
    for (name, n) in configured {
        set(name, *n, &format!("launcher.replicas.{name}"))?;
    }
    for item in args {
        let (name, n) = item
            .split_once('=')
            .and_then(|(name, n)| Some((name.trim(), n.trim().parse::<u32>().ok()?)))
            .ok_or_else(|| {
                anyhow::anyhow!("--replicas {item:?}: expected SERVICE=N, e.g. inventory=3")
            })?;
        set(name, n, "--replicas")?;
    }
    Ok(counts)
}

mod plan;
mod state;
mod supervise;

use plan::plan;
use state::{Lock, Table, print_table, write_state};
use supervise::{Event, supervise};

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let config: LauncherConfig = Sources::from_process().load(Some("launcher"))?;
    let replicas = replicas(&config.launcher.replicas, &args.replicas)?;
    let data_dir = args.data_dir.unwrap_or(config.data_dir.0);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
    let _lock = Lock::take(&data_dir)?;

    let gateway_addr = SocketAddr::new(args.host, args.port.unwrap_or(config.launcher.port));
    let registry_file = data_dir.join("registry.json");
    // Instances of an earlier run are gone: nobody may find them.
    Registry::default()
        .write(&registry_file)
        .with_context(|| format!("cannot write {}", registry_file.display()))?;
    let mut specs = plan(
        &data_dir,
        gateway_addr,
        !args.no_demo,
        config.launcher.database_url_template.as_deref(),
        &replicas,
    )?;
    // The door opens last: the gateway starts once every service has a ready instance.
    let (backends_ready, gate) = watch::channel(false);
    for spec in &mut specs {
        if spec.service == Service::Gateway {
            spec.after = Some(gate.clone());
        }
    }
    let allowed = crate::cores::allowed();
    if allowed.len() > 1
        && config
            .launcher
            .pin_cores
            .unwrap_or_else(|| crate::cores::pin_by_default(&allowed))
    {
        let processes: Vec<(Service, u32)> = specs
            .iter()
            .map(|s| {
                (
                    s.service,
                    replicas.get(s.service.name()).copied().unwrap_or(1),
                )
            })
            .collect();
        for (spec, cores) in specs
            .iter_mut()
            .zip(crate::cores::assign(&processes, &allowed))
        {
            spec.cores = cores;
        }
        println!(
            "shopmesh up: each process confined to its share of {} cores \
             (SHOPMESH_LAUNCHER__PIN_CORES=false: any)",
            allowed.len()
        );
    }
    let exe = std::env::current_exe().context("cannot find the shopmesh binary")?;
    println!("shopmesh up: data in {}", data_dir.display());

    let table: Arc<Mutex<Table>> = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (events_tx, mut events) = mpsc::channel(64);
    let mut waiting: Vec<String> = specs.iter().map(|s| s.instance.clone()).collect();
    let mut supervisors = Vec::new();
    for spec in specs {
        supervisors.push(tokio::spawn(supervise(
            spec,
            exe.clone(),
            table.clone(),
            stop_rx.clone(),
            events_tx.clone(),
        )));
    }
    drop(events_tx);

    let gateway_url = format!("http://{gateway_addr}");
    let state_file = data_dir.join("up.json");
    let mut registry: BTreeMap<String, (&'static str, SocketAddr)> = BTreeMap::new();
    let publish = |registry: &BTreeMap<String, (&'static str, SocketAddr)>| {
        let mut file = Registry::default();
        for (instance, (service, addr)) in registry {
            file.services
                .entry((*service).to_owned())
                .or_default()
                .push(RegistryEntry {
                    instance: instance.clone(),
                    url: format!("http://{addr}"),
                });
        }
        if let Err(e) = file.write(&registry_file) {
            eprintln!("shopmesh up: cannot write {}: {e}", registry_file.display());
        }
    };
    let deadline = tokio::time::sleep(Duration::from_secs(config.launcher.ready_timeout_secs));
    tokio::pin!(deadline);
    let startup: anyhow::Result<()> = loop {
        if waiting.is_empty() {
            break Ok(());
        }
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Ready(instance, service, addr)) => {
                    waiting.retain(|w| *w != instance);
                    registry.insert(instance, (service, addr));
                    publish(&registry);
                    if waiting.iter().all(|w| w == Service::Gateway.name()) {
                        let _ = backends_ready.send(true);
                    }
                }
                Some(Event::Down(instance)) => {
                    registry.remove(&instance);
                    publish(&registry);
                }
                Some(Event::Failed(name, why)) => break Err(anyhow::anyhow!("{name} failed to start: {why}")),
                None => break Err(anyhow::anyhow!("every supervisor stopped")),
            },
            () = &mut deadline => break Err(anyhow::anyhow!(
                "not ready after {}s: {}", config.launcher.ready_timeout_secs, waiting.join(", ")
            )),
            () = shopmesh_runtime::shutdown_signal() => break Err(anyhow::anyhow!("interrupted during start-up")),
        }
    };

    if startup.is_ok() {
        print_table(&table, &gateway_url);
        write_state(&state_file, &table, &gateway_url);
        println!("ready: {gateway_url}");
        // Keep the registry and the state file true across restarts until we are told to stop.
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Ready(instance, service, addr)) => {
                        registry.insert(instance, (service, addr));
                        publish(&registry);
                        write_state(&state_file, &table, &gateway_url);
                    }
                    Some(Event::Down(instance)) => {
                        registry.remove(&instance);
                        publish(&registry);
                    }
                    Some(Event::Failed(name, why)) => eprintln!("shopmesh up: {name}: {why}"),
                    None => break,
                },
                () = shopmesh_runtime::shutdown_signal() => break,
            }
        }
    }

    println!("shopmesh up: stopping");
    let _ = stop_tx.send(true);
    for supervisor in supervisors {
        let _ = supervisor.await;
    }
    let _ = std::fs::remove_file(&state_file);
    let _ = std::fs::remove_file(&registry_file);
    startup?;
    println!("shopmesh up: stopped");
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_come_from_configuration_and_the_flag_overrides_it() {
        let configured = BTreeMap::from([("catalog".to_owned(), 2), ("inventory".to_owned(), 2)]);
        let counts = replicas(&configured, &["inventory=3".to_owned()]).expect("valid");
        assert_eq!(counts["inventory"], 3);
        assert_eq!(counts["catalog"], 2);
        assert_eq!(counts["orders"], 1);
        assert!(!counts.contains_key("gateway"));
    }

    #[test]
    fn bad_replica_counts_are_refused_naming_the_culprit() {
        let none = BTreeMap::new();
        for (arg, says) in [
            ("inventory", "expected SERVICE=N"),
            ("inventory=x", "expected SERVICE=N"),
            ("inventory=0", "expected 1 to 16"),
            ("inventory=17", "expected 1 to 16"),
            ("gateway=2", "not a service that can have replicas"),
            ("reviews=2", "not a service that can have replicas"),
        ] {
            let err = replicas(&none, &[arg.to_owned()]).expect_err(arg);
            assert!(err.to_string().contains(says), "{arg}: {err}");
        }
        let configured = BTreeMap::from([("inventory".to_owned(), 99)]);
        let err = replicas(&configured, &[]).expect_err("too many");
        assert!(
            err.to_string().contains("launcher.replicas.inventory"),
            "{err}"
        );
    }
}
