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
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use shopmesh_config::{DataDir, Sources};
use shopmesh_mesh::backoff::Backoff;
use shopmesh_mesh::{Registry, RegistryEntry};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::serve::Service;

/// The services behind the gateway, in start order (users first: the others fetch its JWKS).
const BACKENDS: &[Service] = &[
    Service::Users,
    Service::Catalog,
    Service::Inventory,
    Service::Payments,
    Service::Cart,
    Service::Orders,
    Service::Notifications,
];
/// Every process `up` runs.
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
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How many times one start may move to another port because its own was taken.
const MAX_MOVES: u32 = 10;
/// A child that stayed up this long is healthy again: its next crash restarts it quickly.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long a child may take to stop after SIGTERM before it is killed: its drain grace
/// (`server.shutdown_grace_secs`, 10 s) and its background tasks' (5 s), with a margin.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Runs every shopmesh service on this machine.
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

/// One line of `up.json`.
#[derive(Debug, Clone, Serialize)]
struct ProcessInfo {
    service: &'static str,
    pid: u32,
    addr: SocketAddr,
    restarts: u32,
}

/// Instances by name (`inventory`, `inventory-2`, ...).
type Table = BTreeMap<String, ProcessInfo>;

#[derive(Debug, Serialize)]
struct UpState<'a> {
    launcher_pid: u32,
    gateway: String,
    processes: &'a Table,
}

enum Event {
    /// An instance answers `/readyz` at this address.
    Ready(String, &'static str, SocketAddr),
    /// An instance exited (it will be restarted).
    Down(String),
    Failed(String, String),
}

struct Spec {
    service: Service,
    /// `inventory` for the first instance, `inventory-2` for the next...
    instance: String,
    addr: SocketAddr,
    /// The gateway keeps its port (it is the shop's address); services move on restart.
    fixed_port: bool,
    env: Vec<(String, String)>,
    /// Set once the first instance of the service is ready (it migrates the database).
    first_ready: Option<watch::Sender<bool>>,
    /// Started after the first instance is ready.
    after: Option<watch::Receiver<bool>>,
    /// The cores it may run on (empty: any).
    cores: Vec<usize>,
}

impl Spec {
    /// Moves a service instance to `addr` (its next start listens there).
    fn move_to(&mut self, addr: SocketAddr) {
        self.addr = addr;
        for (key, value) in &mut self.env {
            if key == "SHOPMESH_SERVER__PORT" {
                *value = addr.port().to_string();
            }
        }
    }
}

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

/// Addresses and environments of every instance.
fn plan(
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
fn free_loopback_addr(taken: &[u16]) -> anyhow::Result<SocketAddr> {
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

/// Runs one instance until told to stop, restarting it when it dies.
async fn supervise(
    mut spec: Spec,
    exe: PathBuf,
    table: Arc<Mutex<Table>>,
    mut stop: watch::Receiver<bool>,
    events: mpsc::Sender<Event>,
) {
    let name = spec.instance.clone();
    if let Some(mut first) = spec.after.take() {
        tokio::select! {
            _ = first.wait_for(|ready| *ready) => {},
            _ = stop.changed() => return,
        }
    }
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    let mut restarts = 0u32;
    let mut moves = 0u32;
    let mut ever_ready = false;
    loop {
        let mut child = match spawn(&exe, &spec) {
            Ok(child) => child,
            Err(e) => {
                let _ = events
                    .send(Event::Failed(name.clone(), format!("cannot start: {e:#}")))
                    .await;
                return;
            }
        };
        // `Child::wait` would close the child's stdin, which the child reads as "launcher gone":
        // hold it here for the child's whole life instead.
        let _stdin = child.stdin.take();
        let pid = child.id().unwrap_or_default();
        if let Ok(mut table) = table.lock() {
            table.insert(
                name.clone(),
                ProcessInfo {
                    service: spec.service.name(),
                    pid,
                    addr: spec.addr,
                    restarts,
                },
            );
        }
        let started = Instant::now();
        let ready = wait_ready(spec.addr);
        tokio::pin!(ready);
        let mut is_ready = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                () = &mut ready, if !is_ready => {
                    is_ready = true;
                    ever_ready = true;
                    if restarts > 0 {
                        println!("shopmesh up: {name} is back (pid {pid}, {})", spec.addr);
                    }
                    if let Some(first) = &spec.first_ready {
                        let _ = first.send(true);
                    }
                    let _ = events.send(Event::Ready(name.clone(), spec.service.name(), spec.addr)).await;
                }
                _ = stop.changed() => {
                    terminate(&name, &mut child).await;
                    return;
                }
            }
        };
        if *stop.borrow() {
            return;
        }
        let _ = events.send(Event::Down(name.clone())).await;
        if !ever_ready
            && !spec.fixed_port
            && moves < MAX_MOVES
            && status
                .as_ref()
                .ok()
                .and_then(std::process::ExitStatus::code)
                == Some(i32::from(crate::serve::EXIT_ADDRESS_IN_USE))
            && let Ok(addr) = free_loopback_addr(&[spec.addr.port()])
        {
            // Taken between our check and its bind (a parallel launcher, a client's port):
            // not a failure of the service, so straight to another port.
            moves += 1;
            eprintln!(
                "shopmesh up: {name}'s port {} was taken; starting it on {addr}",
                spec.addr.port()
            );
            spec.move_to(addr);
            continue;
        }
        // Stopped cleanly after it was ready (a SIGTERM: a rolling restart, an operator's
        // stop): not a crash loop, so no growing back-off.
        let clean = is_ready && status.as_ref().is_ok_and(|s| s.success());
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        if !ever_ready {
            let _ = events
                .send(Event::Failed(
                    name.clone(),
                    format!("exited ({status}); see its log above"),
                ))
                .await;
            return;
        }
        if clean || started.elapsed() >= STABLE_AFTER {
            backoff.reset();
        }
        restarts += 1;
        let wait = backoff.next_wait();
        eprintln!(
            "shopmesh up: {name} (pid {pid}) exited ({status}); restart #{restarts} in {:.1}s",
            wait.as_secs_f64()
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => {},
            _ = stop.changed() => return,
        }
        if !spec.fixed_port
            && let Ok(addr) = free_loopback_addr(&[spec.addr.port()])
        {
            // A new port: whoever still holds the old address must find it again.
            spec.move_to(addr);
        }
    }
}

fn spawn(exe: &Path, spec: &Spec) -> anyhow::Result<Child> {
    let mut child = Command::new(exe)
        .arg("serve")
        .arg(spec.service.name())
        .arg("--exit-with-parent")
        .args(crate::cores::args(&spec.cores))
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", exe.display()))?;
    let name: Arc<str> = spec.instance.as_str().into();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(relay(name.clone(), out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(relay(name, err));
    }
    Ok(child)
}

async fn relay(name: Arc<str>, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{name:>11} | {line}");
    }
}

/// Completes once `addr` answers `/readyz` with 200.
async fn wait_ready(addr: SocketAddr) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let url = format!("http://{addr}/readyz");
    loop {
        if let Ok(response) = client.get(&url).send().await
            && response.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM, then SIGKILL after the grace period.
async fn terminate(name: &str, child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            eprintln!("shopmesh up: {name} did not stop within {STOP_GRACE:?}; killing it");
            let _ = child.kill().await;
        }
    }
}

fn print_table(table: &Mutex<Table>, gateway: &str) {
    let Ok(table) = table.lock() else { return };
    println!("{:<12} {:>8}  address", "instance", "pid");
    for service in SERVICES {
        for (instance, info) in table.iter().filter(|(_, i)| i.service == service.name()) {
            println!("{instance:<12} {:>8}  http://{}", info.pid, info.addr);
        }
    }
    println!(
        "the shop's API is at {gateway}/api/v1 (register, login, me, users, products, inventory, cart, orders, admin/notifications, admin/cluster)"
    );
}

fn write_state(path: &Path, table: &Mutex<Table>, gateway: &str) {
    let Ok(table) = table.lock() else { return };
    let state = UpState {
        launcher_pid: std::process::id(),
        gateway: gateway.to_owned(),
        processes: &table,
    };
    if let Ok(json) = serde_json::to_vec_pretty(&state) {
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// One `up` per data directory: two launchers on the same SQLite files would fight.
struct Lock {
    path: PathBuf,
}

impl Lock {
    fn take(data_dir: &Path) -> anyhow::Result<Lock> {
        let path = data_dir.join("up.lock");
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(pid) = text.trim().parse::<i32>()
            && pid != std::process::id() as i32
            && kill(Pid::from_raw(pid), None).is_ok()
        {
            anyhow::bail!(
                "another `shopmesh up` (pid {pid}) is running on {}; stop it first or use \
                 --data-dir",
                data_dir.display()
            );
        }
        std::fs::write(&path, std::process::id().to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Lock { path })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
