//! `shopmesh chaos`: hits the instances of a running `shopmesh up` with faults while customers
//! buy (the `shopmesh load` journey), then checks the books (`verify`) and reports what the
//! customers saw.
//!
//! - **Faults**, one every `--every`, each on an instance drawn at random among the ready ones
//!   of services that have another ready instance to take over (of those named by
//!   `--services`, if given; never the gateway): `kill` (SIGKILL; `up`
//!   restarts it), `stop` (SIGSTOP, SIGCONT after `--stop-for`: a frozen process, as in a long
//!   GC pause or a host stall) and `term` (SIGTERM: a rolling restart; the instance leaves the
//!   registry, drains, and `up` starts it again), and `latency` (every request to the
//!   instance waits `--latency` for `--latency-for`, through the fault switch a process has
//!   only when started with `SHOPMESH_SERVER__FAULT_INJECTION=true` on a loopback address).
//!   Each is logged with its time in the run.
//! - **Load**: the `shopmesh load` closed or open loop, with the same options; a fault is
//!   first injected one `--every` into its measured window.
//! - **Report**: journeys that succeeded (no client retries), p99 in the seconds within
//!   `--stop-for` of a fault and in the others, and for each fault how long it went on
//!   costing errors; then `verify` until the books balance, for at most `--settle` (the saga
//!   settles steps the faults interrupted). `--min-success` turns the report into a verdict.
//!
//! Set `--faults kill,stop,term,latency` for the whole schedule; latency is not in the default
//! set because it needs the switch.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::seq::SliceRandom;
use tokio::time::Instant;

use crate::load::{self, LoadArgs, parse_duration};
use crate::verify;

/// Injects faults into a running `shopmesh up` while customers buy; reports what they saw.
#[derive(Debug, Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Time between faults.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    every: Duration,
    /// The faults to draw from, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Fault::Kill, Fault::Stop, Fault::Term])]
    faults: Vec<Fault>,
    /// Services whose instances may be hit, comma-separated [default: every service but the
    /// gateway]. An instance is hit only while another of its service is ready.
    #[arg(long, value_delimiter = ',')]
    services: Vec<String>,
    /// How long a stopped instance stays frozen; also what counts as "during a fault".
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    stop_for: Duration,
    /// The delay the `latency` fault adds to every request of the instance.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    latency: Duration,
    /// How long the `latency` fault lasts.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    latency_for: Duration,
    /// How long, after the load, `verify` may wait for the books to balance.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    settle: Duration,
    /// Fail unless at least this percentage of journeys succeeded.
    #[arg(long)]
    min_success: Option<f64>,
}

/// What is done to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    /// SIGKILL: the process dies at once.
    Kill,
    /// SIGSTOP, then SIGCONT after `--stop-for`: the process freezes.
    Stop,
    /// SIGTERM: the process leaves the registry, drains and exits (a rolling restart).
    Term,
    /// Every request waits `--latency` first, for `--latency-for` (needs the process's
    /// fault switch: `SHOPMESH_SERVER__FAULT_INJECTION=true`).
    Latency,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Stop => "stop",
            Fault::Term => "term",
            Fault::Latency => "latency",
        }
    }
}

/// One instance of `up.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Instance {
    name: String,
    service: String,
    pid: u32,
    addr: String,
}

/// A fault done: when (seconds into the measured window), what, to whom.
#[derive(Debug, Clone)]
struct Injected {
    at: f64,
    fault: Fault,
    instance: String,
    /// How long it counts as going on: its length (stop, latency), else `--stop-for`.
    lasts: Duration,
}

fn instances(data_dir: Option<&PathBuf>) -> anyhow::Result<Vec<Instance>> {
    let state = verify::up_state(data_dir, "--data-dir")?;
    Ok(state["processes"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, process)| {
            Some(Instance {
                name: name.clone(),
                service: process["service"].as_str()?.to_owned(),
                pid: u32::try_from(process["pid"].as_u64()?).ok()?,
                addr: process["addr"].as_str()?.to_owned(),
            })
        })
        .collect())
}

/// The instances a fault may hit, among the `ready` ones: of `services` (every one if empty),
/// and only where another instance of the same service is ready to take over (a fault that
/// takes a service's last instance down measures nothing but the outage). Never the gateway,
/// which `up` runs once.
fn eligible(ready: &[Instance], services: &[String]) -> Vec<Instance> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for instance in ready {
        *counts.entry(instance.service.as_str()).or_default() += 1;
    }
    ready
        .iter()
        .filter(|i| i.service != "gateway")
        .filter(|i| services.is_empty() || services.contains(&i.service))
        .filter(|i| counts[i.service.as_str()] >= 2)
        .cloned()
        .collect()
}

/// The instances whose `/readyz` answers 200 now (a frozen or restarting one does not).
async fn ready(all: Vec<Instance>, client: &reqwest::Client) -> Vec<Instance> {
    let mut probes = tokio::task::JoinSet::new();
    for instance in all {
        let probe = client.get(format!("http://{}/readyz", instance.addr));
        probes.spawn(async move {
            match probe.send().await {
                Ok(response) if response.status().is_success() => Some(instance),
                _ => None,
            }
        });
    }
    probes.join_all().await.into_iter().flatten().collect()
}

/// Asks `target`'s fault switch to delay its requests.
async fn slow_down(
    client: &reqwest::Client,
    target: &Instance,
    delay: Duration,
    lasting: Duration,
) -> Result<(), String> {
    let asked = client
        .post(format!("http://{}/internal/faults", target.addr))
        .json(&serde_json::json!({
            "delay_ms": delay.as_millis() as u64,
            "for_ms": lasting.as_millis() as u64,
        }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    match asked.status() {
        status if status.is_success() => Ok(()),
        reqwest::StatusCode::NOT_FOUND => {
            Err("no fault switch: start `up` with SHOPMESH_SERVER__FAULT_INJECTION=true".to_owned())
        }
        status => Err(format!("the fault switch answered {status}")),
    }
}

fn signal(pid: u32, signal: Signal) -> Result<(), String> {
    let pid = i32::try_from(pid).map_err(|e| e.to_string())?;
    kill(Pid::from_raw(pid), signal).map_err(|e| e.to_string())
}

/// The instances SIGSTOPped and not yet continued: whatever ends the run, they are thawed.
#[derive(Clone, Default)]
struct Frozen(Arc<Mutex<BTreeSet<u32>>>);

impl Frozen {
    fn add(&self, pid: u32) {
        if let Ok(mut frozen) = self.0.lock() {
            frozen.insert(pid);
        }
    }

    /// SIGCONTs `pid` if it is still frozen.
    fn thaw(&self, pid: u32) {
        let was_frozen = self.0.lock().is_ok_and(|mut frozen| frozen.remove(&pid));
        if was_frozen && let Err(e) = signal(pid, Signal::SIGCONT) {
            eprintln!("chaos: cannot continue pid {pid}: {e}");
        }
    }

    fn thaw_all(&self) {
        let pids: Vec<u32> = self
            .0
            .lock()
            .map(|frozen| frozen.iter().copied().collect())
            .unwrap_or_default();
        for pid in pids {
            self.thaw(pid);
        }
    }
}

/// Injects one fault every `every` from `opens + every` until `until`; SIGCONTs every frozen
/// instance before it returns.
async fn inject(
    args: &ChaosArgs,
    opens: Instant,
    until: Instant,
    frozen: &Frozen,
) -> Vec<Injected> {
    let mut done = Vec::new();
    let mut thaws = tokio::task::JoinSet::new();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("an HTTP client");
    let mut next = opens + args.every;
    while next < until {
        tokio::time::sleep_until(next).await;
        next += args.every;
        let candidates = match instances(args.load_data_dir()) {
            Ok(all) => eligible(&ready(all, &client).await, &args.services),
            Err(e) => {
                eprintln!("chaos: cannot read up.json: {e:#}");
                continue;
            }
        };
        let (Some(target), Some(&fault)) = (
            candidates.choose(&mut rand::thread_rng()).cloned(),
            args.faults.choose(&mut rand::thread_rng()),
        ) else {
            eprintln!(
                "chaos: +{:.1}s no instance to hit: none has another ready instance of its \
                 service (run `up --replicas SERVICE=2,...`)",
                opens.elapsed().as_secs_f64()
            );
            continue;
        };
        let at = opens.elapsed().as_secs_f64();
        let sent = match fault {
            Fault::Kill => signal(target.pid, Signal::SIGKILL),
            Fault::Term => signal(target.pid, Signal::SIGTERM),
            Fault::Stop => signal(target.pid, Signal::SIGSTOP).map(|()| {
                frozen.add(target.pid);
                let (pid, stop_for, frozen) = (target.pid, args.stop_for, frozen.clone());
                thaws.spawn(async move {
                    tokio::time::sleep(stop_for).await;
                    frozen.thaw(pid);
                });
            }),
            Fault::Latency => slow_down(&client, &target, args.latency, args.latency_for).await,
        };
        match sent {
            Ok(()) => {
                eprintln!(
                    "chaos: +{at:.1}s {} {} (pid {})",
                    fault.name(),
                    target.name,
                    target.pid
                );
                done.push(Injected {
                    at,
                    fault,
                    instance: target.name,
                    lasts: match fault {
                        Fault::Latency => args.latency_for,
                        _ => args.stop_for,
                    },
                });
            }
            Err(e) => eprintln!("chaos: +{at:.1}s {} {}: {e}", fault.name(), target.name),
        }
    }
    while thaws.join_next().await.is_some() {}
    done
}

impl ChaosArgs {
    fn load_data_dir(&self) -> Option<&PathBuf> {
        self.load.data_dir()
    }
}

/// Whether second `s` of the run overlaps a fault while it lasts.
fn during(s: usize, faults: &[Injected]) -> bool {
    let (from, to) = (s as f64, s as f64 + 1.0);
    faults
        .iter()
        .any(|f| from < f.at + f.lasts.as_secs_f64() && to > f.at)
}

fn p99_ms(histograms: &[&Histogram<u64>]) -> Option<f64> {
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok()?;
    for h in histograms {
        all.add(*h).ok()?;
    }
    (!all.is_empty()).then(|| all.value_at_quantile(0.99) as f64 / 1000.0)
}

/// For each fault, how long after it errors went on (up to the next fault): the end of the
/// last second with a failure, minus the fault's time; 0 if it cost none.
fn recovery_secs(faults: &[Injected], failed_per_second: &[u64], seconds: usize) -> Vec<f64> {
    faults
        .iter()
        .enumerate()
        .map(|(i, fault)| {
            let from = fault.at.floor() as usize;
            let to = faults
                .get(i + 1)
                .map_or(seconds, |next| next.at.floor() as usize)
                .max(from + 1);
            (from..to)
                .rev()
                .find(|s| failed_per_second.get(*s).copied().unwrap_or(0) > 0)
                .map_or(0.0, |s| (s as f64 + 1.0 - fault.at).max(0.0))
        })
        .collect()
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let (opens_tx, opens_rx) = tokio::sync::oneshot::channel();
    let load = load::run_with(&args.load, Some(opens_tx));
    let frozen = Frozen::default();
    let faults = async {
        let Ok(opens) = opens_rx.await else {
            return Vec::new();
        };
        inject(&args, opens, opens + args.load.duration(), &frozen).await
    };
    // Interrupted (Ctrl-C), it never leaves an instance frozen: `up` would not notice one.
    let interrupted = shopmesh_runtime::shutdown_signal();
    let (outcome, faults) = tokio::select! {
        both = async { tokio::join!(load, faults) } => both,
        () = interrupted => {
            frozen.thaw_all();
            anyhow::bail!("interrupted; every instance it froze was continued");
        }
    };
    frozen.thaw_all();
    let outcome = outcome?;

    let seconds = args.load.duration().as_secs() as usize;
    let ok = outcome.result.iterations;
    let failed = outcome.result.errors;
    let success = if ok + failed == 0 {
        0.0
    } else {
        100.0 * ok as f64 / (ok + failed) as f64
    };
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for (s, h) in outcome.per_second.iter().enumerate().take(seconds) {
        if during(s, &faults) {
            inside.push(h);
        } else {
            outside.push(h);
        }
    }
    let show = |p: Option<f64>| p.map_or("-".to_owned(), |p| format!("{p:.1} ms"));
    println!();
    println!("chaos: {} faults, one every {:?}", faults.len(), args.every);
    for (fault, recovered) in
        faults
            .iter()
            .zip(recovery_secs(&faults, &outcome.failed_per_second, seconds))
    {
        println!(
            "  +{:>5.1}s  {:<7}  {:<16} errors for {recovered:.1} s",
            fault.at,
            fault.fault.name(),
            fault.instance
        );
    }
    println!(
        "journeys: {ok} succeeded, {failed} failed: {success:.2}% success (no client retries)"
    );
    println!(
        "p99: {} during faults ({} s: a stop or latency while it lasts, {:?} after a kill or term), {} otherwise ({} s)",
        show(p99_ms(&inside)),
        inside.len(),
        args.stop_for,
        show(p99_ms(&outside)),
        outside.len()
    );

    // The books, once the saga has settled what the faults interrupted.
    let verify_args = verify::VerifyArgs::of_data_dir(args.load_data_dir().cloned());
    let started = Instant::now();
    let findings = loop {
        let findings = match verify::findings(&verify_args).await {
            Ok(findings) => findings,
            Err(e) => vec![format!("cannot check: {e:#}")],
        };
        if findings.is_empty() || started.elapsed() >= args.settle {
            break findings;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    if findings.is_empty() {
        println!(
            "verify: ok {:.1} s after the load (every order paid, cancelled, expired or payable; stock and captures balance)",
            started.elapsed().as_secs_f64()
        );
    } else {
        for finding in &findings {
            println!("verify FAIL: {finding}");
        }
        anyhow::bail!(
            "{} finding(s) {:?} after the load: the books do not balance",
            findings.len(),
            args.settle
        );
    }
    if let Some(min) = args.min_success
        && success < min
    {
        anyhow::bail!("{success:.2}% of journeys succeeded, under --min-success {min}%");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, service: &str) -> Instance {
        Instance {
            name: name.into(),
            service: service.into(),
            pid: 1,
            addr: "127.0.0.1:1".into(),
        }
    }

    #[test]
    fn faults_hit_an_instance_only_while_another_of_its_service_is_ready() {
        let ready = [
            instance("gateway", "gateway"),
            instance("orders", "orders"),
            instance("orders-2", "orders"),
            instance("cart", "cart"),
            instance("inventory-2", "inventory"),
            instance("inventory-3", "inventory"),
        ];
        let names = |v: Vec<Instance>| v.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(
            names(eligible(&ready, &[])),
            ["orders", "orders-2", "inventory-2", "inventory-3"]
        );
        assert_eq!(
            names(eligible(
                &ready,
                &["orders".into(), "cart".into(), "gateway".into()]
            )),
            ["orders", "orders-2"]
        );
        // orders-2 is restarting: orders is its service's last ready instance.
        assert_eq!(
            names(eligible(&ready[..2], &["orders".into()])),
            Vec::<String>::new()
        );
    }

    fn at(at: f64) -> Injected {
        Injected {
            at,
            fault: Fault::Kill,
            instance: "orders".into(),
            lasts: Duration::from_secs(3),
        }
    }

    #[test]
    fn a_fault_costs_errors_until_the_last_failing_second_before_the_next() {
        let faults = [at(5.5), at(10.2)];
        // Errors in seconds 5, 6 and 7 after the first fault; none after the second.
        let failed = [0, 0, 0, 0, 0, 3, 1, 2, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(recovery_secs(&faults, &failed, 15), [2.5, 0.0]);
    }

    #[test]
    fn seconds_while_a_fault_lasts_count_as_during() {
        let mut slow = at(10.0);
        slow.lasts = Duration::from_secs(5);
        let faults = [at(2.5), slow];
        let during: Vec<usize> = (0..20).filter(|s| during(*s, &faults)).collect();
        assert_eq!(during, [2, 3, 4, 5, 10, 11, 12, 13, 14]);
    }
}
