//! One instance's life under `up`: started, watched until ready, restarted after a back-off
//! when it dies (moved to another port when its own was taken), stopped on shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shopmesh_mesh::backoff::Backoff;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use super::plan::{Spec, free_loopback_addr};
use super::state::{ProcessInfo, Table};

pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How many times one start may move to another port because its own was taken.
pub(super) const MAX_MOVES: u32 = 10;
/// A child that stayed up this long is healthy again: its next crash restarts it quickly.
pub(super) const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long a child may take to stop after SIGTERM before it is killed: its drain grace
/// (`server.shutdown_grace_secs`, 10 s) and its background tasks' (5 s), with a margin.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(20);

pub(super) enum Event {
    /// An instance answers `/readyz` at this address.
    Ready(String, &'static str, SocketAddr),
    /// An instance exited (it will be restarted).
    Down(String),
    Failed(String, String),
}

/// Runs one instance until told to stop, restarting it when it dies.
pub(super) async fn supervise(
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

pub(super) fn spawn(exe: &Path, spec: &Spec) -> anyhow::Result<Child> {
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

pub(super) async fn relay(name: Arc<str>, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{name:>11} | {line}");
    }
}

/// Completes once `addr` answers `/readyz` with 200.
pub(super) async fn wait_ready(addr: SocketAddr) {
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
pub(super) async fn terminate(name: &str, child: &mut Child) {
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
