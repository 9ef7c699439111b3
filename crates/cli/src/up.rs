//! `shopmesh up`: the whole shop on one machine, one process per service, supervised.
//!
//! The launcher re-executes its own binary as `shopmesh serve <service>` for each service, with
//! the port, data directory and upstream addresses in the child's environment. It
//!
//! - picks a free loopback port per service (the gateway gets `--port`, default 8080) and keeps
//!   it across restarts, so the gateway's upstream addresses stay true;
//! - prefixes each child's output with its name;
//! - waits until every child answers `/readyz`, then prints the table and `ready: <url>`;
//! - restarts a child that dies, after a back-off (0.5 s doubling to 10 s, reset after 30 s of
//!   uptime); a child that dies before ever becoming ready aborts `up` with its error;
//! - on Ctrl-C or SIGTERM sends SIGTERM to every child, waits for them (SIGKILL after the
//!   grace period) and exits. Children run in their own process group (so a terminal's Ctrl-C
//!   reaches only the launcher, which stops them in order) and stop by themselves if the
//!   launcher vanishes, because their stdin is a pipe from it.
//!
//! `<data-dir>/up.json` says which process listens where, while `up` runs.

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
];
/// Every process `up` runs.
const SERVICES: &[Service] = &[
    Service::Users,
    Service::Catalog,
    Service::Inventory,
    Service::Payments,
    Service::Cart,
    Service::Orders,
    Service::Gateway,
];
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A child that stayed up this long is healthy again: its next crash restarts it quickly.
const STABLE_AFTER: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);

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
}

impl Default for LauncherSettings {
    fn default() -> Self {
        LauncherSettings {
            port: 8080,
            ready_timeout_secs: 60,
            database_url_template: None,
        }
    }
}

/// One line of `up.json`.
#[derive(Debug, Clone, Serialize)]
struct ProcessInfo {
    pid: u32,
    addr: SocketAddr,
    restarts: u32,
}

#[derive(Debug, Serialize)]
struct UpState<'a> {
    launcher_pid: u32,
    gateway: String,
    processes: &'a BTreeMap<&'static str, ProcessInfo>,
}

enum Event {
    Ready(&'static str),
    Failed(&'static str, String),
}

struct Spec {
    service: Service,
    addr: SocketAddr,
    env: Vec<(String, String)>,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let config: LauncherConfig = Sources::from_process().load(Some("launcher"))?;
    let data_dir = args.data_dir.unwrap_or(config.data_dir.0);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
    let _lock = Lock::take(&data_dir)?;

    let gateway_addr = SocketAddr::new(args.host, args.port.unwrap_or(config.launcher.port));
    let specs = plan(
        &data_dir,
        gateway_addr,
        !args.no_demo,
        config.launcher.database_url_template.as_deref(),
    )?;
    let exe = std::env::current_exe().context("cannot find the shopmesh binary")?;
    println!("shopmesh up: data in {}", data_dir.display());

    let table: Arc<Mutex<BTreeMap<&'static str, ProcessInfo>>> = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (events_tx, mut events) = mpsc::channel(16);
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
    let deadline = tokio::time::sleep(Duration::from_secs(config.launcher.ready_timeout_secs));
    tokio::pin!(deadline);
    let mut waiting: Vec<&'static str> = SERVICES.iter().map(|s| s.name()).collect();
    let startup: anyhow::Result<()> = loop {
        if waiting.is_empty() {
            break Ok(());
        }
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Ready(name)) => waiting.retain(|w| *w != name),
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
        // Keep the state file true across restarts until we are told to stop.
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Ready(_)) => write_state(&state_file, &table, &gateway_url),
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
    startup?;
    println!("shopmesh up: stopped");
    Ok(())
}

/// Addresses and environments of every child.
fn plan(
    data_dir: &Path,
    gateway: SocketAddr,
    demo: bool,
    database_url_template: Option<&str>,
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
    let common = |addr: SocketAddr| {
        vec![
            (
                "SHOPMESH_DATA_DIR".to_owned(),
                data_dir.display().to_string(),
            ),
            ("SHOPMESH_SERVER__HOST".to_owned(), addr.ip().to_string()),
            ("SHOPMESH_SERVER__PORT".to_owned(), addr.port().to_string()),
        ]
    };
    let mut addrs = BTreeMap::new();
    for service in BACKENDS {
        addrs.insert(service.name(), free_loopback_addr()?);
    }
    let users = addrs
        .get("users")
        .copied()
        .context("users is always planned")?;
    let jwks = format!("http://{users}/.well-known/jwks.json");
    let mut specs = Vec::new();
    for service in BACKENDS {
        let addr = addrs[service.name()];
        let mut env = common(addr);
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
                let inventory = addrs.get("inventory").context("every backend is planned")?;
                env.push((
                    "SHOPMESH_CATALOG__INVENTORY_URL".to_owned(),
                    format!("http://{inventory}"),
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
                    let addr = addrs.get(target).context("every backend is planned")?;
                    env.push((format!("SHOPMESH_ORDERS__{key}"), format!("http://{addr}")));
                }
            }
            Service::Cart => {
                let catalog = addrs.get("catalog").context("every backend is planned")?;
                env.push((
                    "SHOPMESH_CART__CATALOG_URL".to_owned(),
                    format!("http://{catalog}"),
                ));
            }
            Service::Users | Service::Payments | Service::Gateway => {}
        }
        specs.push(Spec {
            service: *service,
            addr,
            env,
        });
    }
    let mut gateway_env = common(gateway);
    for (name, addr) in &addrs {
        gateway_env.push((
            format!("SHOPMESH_GATEWAY__UPSTREAMS__{}", name.to_ascii_uppercase()),
            format!("http://{addr}"),
        ));
    }
    specs.push(Spec {
        service: Service::Gateway,
        addr: gateway,
        env: gateway_env,
    });
    Ok(specs)
}

/// A free loopback port for a service. Chosen below Linux's ephemeral range (32768 and up),
/// where outgoing connections take their local ports: a port picked with `bind(0)` and released
/// can be taken by some client's connection before the child binds it; one from this range
/// cannot. Random, and checked by binding, so parallel launchers rarely even try the same one.
fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    const RANGE: std::ops::Range<u16> = 20_000..32_000;
    for _ in 0..200 {
        let port = RANGE.start + rand_below(RANGE.end - RANGE.start);
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        if TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    anyhow::bail!("no free port between 20000 and 32000 on 127.0.0.1")
}

/// A random number below `n`, from the standard library's randomly seeded hasher (good enough
/// to spread ports; not for anything secret).
fn rand_below(n: u16) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (hasher.finish() % u64::from(n)) as u16
}

/// Runs one child until told to stop, restarting it when it dies.
async fn supervise(
    spec: Spec,
    exe: PathBuf,
    table: Arc<Mutex<BTreeMap<&'static str, ProcessInfo>>>,
    mut stop: watch::Receiver<bool>,
    events: mpsc::Sender<Event>,
) {
    let name = spec.service.name();
    let mut backoff = FIRST_BACKOFF;
    let mut restarts = 0u32;
    let mut ever_ready = false;
    loop {
        let mut child = match spawn(&exe, &spec) {
            Ok(child) => child,
            Err(e) => {
                let _ = events
                    .send(Event::Failed(name, format!("cannot start: {e:#}")))
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
                name,
                ProcessInfo {
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
                        println!("shopmesh up: {name} is back (pid {pid})");
                    }
                    let _ = events.send(Event::Ready(name)).await;
                }
                _ = stop.changed() => {
                    terminate(name, &mut child).await;
                    return;
                }
            }
        };
        if *stop.borrow() {
            return;
        }
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        if !ever_ready {
            let _ = events
                .send(Event::Failed(
                    name,
                    format!("exited ({status}); see its log above"),
                ))
                .await;
            return;
        }
        if started.elapsed() >= STABLE_AFTER {
            backoff = FIRST_BACKOFF;
        }
        restarts += 1;
        eprintln!(
            "shopmesh up: {name} (pid {pid}) exited ({status}); restart #{restarts} in {:.1}s",
            backoff.as_secs_f64()
        );
        tokio::select! {
            () = tokio::time::sleep(backoff) => {},
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn spawn(exe: &Path, spec: &Spec) -> anyhow::Result<Child> {
    let name = spec.service.name();
    let mut child = Command::new(exe)
        .arg("serve")
        .arg(name)
        .arg("--exit-with-parent")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", exe.display()))?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(relay(name, out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(relay(name, err));
    }
    Ok(child)
}

async fn relay(name: &'static str, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{name:>9} | {line}");
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

fn print_table(table: &Mutex<BTreeMap<&'static str, ProcessInfo>>, gateway: &str) {
    let Ok(table) = table.lock() else { return };
    println!("{:<10} {:>8}  address", "service", "pid");
    for service in SERVICES {
        if let Some(info) = table.get(service.name()) {
            println!(
                "{:<10} {:>8}  http://{}",
                service.name(),
                info.pid,
                info.addr
            );
        }
    }
    println!(
        "the shop's API is at {gateway}/api/v1 (register, login, me, users, products, inventory, cart, orders)"
    );
}

fn write_state(path: &Path, table: &Mutex<BTreeMap<&'static str, ProcessInfo>>, gateway: &str) {
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
