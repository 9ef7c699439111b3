//! `shopmesh`: the one binary of the shop.
//!
//! # Layout
//! - `up` ([`up`]): the local launcher. Starts every service as its own OS process (this same
//!   binary, re-executed as `shopmesh serve <service>`), waits until each is ready, restarts the
//!   ones that crash, and stops them all on Ctrl-C or SIGTERM.
//! - `serve` ([`serve`]): one service, configured from the environment; what a container runs.
//! - `verify` ([`verify`]): reconciles stock, orders and payments across services.
//! - `admin` ([`admin`]): operator tasks against a service's database (create an admin).
//! - `events` ([`events`]): dead letters of the event consumers (list, redrive).
//! - `load` ([`load`]): load generation and measurement against a running shop.
//! - `chaos` ([`chaos`]): faults against a running shop's instances under load, then `verify`.
//!
//! Everything a command needs comes from the service crates; this crate only wires them up.

mod admin;
mod chaos;
mod cores;
mod events;
mod load;
mod serve;
mod up;
mod verify;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// shopmesh: an online shop built as Rust microservices.
///
/// Run `shopmesh up` to start the whole shop on this machine (no Docker, nothing to install),
/// then open http://127.0.0.1:8080. Configuration comes from defaults, an optional TOML file
/// (SHOPMESH_CONFIG), a .env file and SHOPMESH_<SECTION>__<KEY> environment variables.
#[derive(Debug, Parser)]
#[command(name = "shopmesh", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole shop locally: every service its own process, data under ./data.
    Up(up::UpArgs),
    /// Run one service, configured from the environment (what a container runs).
    Serve(serve::ServeArgs),
    /// Check that stock, orders and payments agree across services; non-zero exit if not.
    Verify(verify::VerifyArgs),
    /// Operator tasks (run beside a running `shopmesh up`, from the same folder).
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// Generate load against a running shop: closed or open loop, latency, errors, CPU.
    Load(load::LoadArgs),
    /// Kill, freeze and restart a running shop's instances while customers buy; report what
    /// they saw, then check the books.
    Chaos(chaos::ChaosArgs),
    /// Event operations: `events dlq list`, `events dlq redrive`.
    Events {
        #[command(subcommand)]
        command: events::EventsCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before the runtime starts its threads, so that all of them inherit it; and the runtime
    // then sizes itself to the cores it may use.
    // A set that cannot be had (cores gone since the launcher planned) costs speed, not service.
    let mut one_core = false;
    if let Command::Serve(args) = &cli.command {
        match cores::confine_self(&args.cpus) {
            Ok(()) => one_core = args.cpus.len() == 1,
            Err(e) => eprintln!(
                "warning: cannot confine this process to cores {:?} ({e}); running on any",
                args.cpus
            ),
        }
    }
    // A process confined to one core runs tokio's current-thread scheduler: with one core
    // there is no other worker to share with, and the multi-thread scheduler's hand-offs (its
    // shared queues, a worker woken across threads while `block_on` parks the main one) cost
    // CPU on every wake-up (issue 9, bench/README).
    let mut builder = if one_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Serve(args) => serve::run(args).await,
            Command::Verify(args) => verify::run(args).await,
            Command::Admin { command } => admin::run(command).await,
            Command::Events { command } => events::run(command).await,
            Command::Load(args) => load::run(args).await,
            Command::Chaos(args) => chaos::run(args).await,
        }
    });
    // A blocked stdin reader (the parent watch of `serve`) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if serve::address_in_use(&e) {
                ExitCode::from(serve::EXIT_ADDRESS_IN_USE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
