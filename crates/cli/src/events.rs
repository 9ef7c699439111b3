//! `shopmesh events dlq list|redrive`: the events a consumer set aside after its handler kept
//! failing, and handling them again (after the cause is fixed).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;

/// Event operations.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Dead letters: events a consumer gave up on.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

/// What to do with the dead letters.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List them (producer, event, type, last error).
    List(Target),
    /// Handle each again; those that succeed leave the list.
    Redrive(Target),
}

/// Which consumer.
#[derive(Debug, Args)]
pub struct Target {
    /// Data directory of a running `shopmesh up` (its up.json says where notifications is)
    /// [default: ./data, or SHOPMESH_DATA_DIR].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The notifications service's URL (instead of up.json).
    #[arg(long)]
    url: Option<String>,
}

impl Target {
    fn url(&self) -> anyhow::Result<String> {
        if let Some(url) = &self.url {
            return Ok(url.trim_end_matches('/').to_owned());
        }
        let state = crate::verify::up_state(self.data_dir.as_ref(), "--url")?;
        state["processes"]["notifications"]["addr"]
            .as_str()
            .map(|a| format!("http://{a}"))
            .context("up.json has no notifications process")
    }
}

pub async fn run(command: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Dlq { command } = command;
    let client = reqwest::Client::new();
    match command {
        DlqCommand::List(target) => {
            let url = format!("{}/internal/dlq", target.url()?);
            let body: Value = client
                .get(&url)
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?
                .error_for_status()?
                .json()
                .await?;
            let letters = body["dead_letters"].as_array().cloned().unwrap_or_default();
            println!("{} dead letter(s)", letters.len());
            for letter in letters {
                println!(
                    "{}  {}  {}  #{}  {}",
                    letter["producer"].as_str().unwrap_or_default(),
                    letter["event"]["id"].as_str().unwrap_or_default(),
                    letter["event"]["type"].as_str().unwrap_or_default(),
                    letter["event"]["position"],
                    letter["error"].as_str().unwrap_or_default(),
                );
            }
        }
        DlqCommand::Redrive(target) => {
            let url = format!("{}/internal/dlq/redrive", target.url()?);
            let body: Value = client
                .post(&url)
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?
                .error_for_status()?
                .json()
                .await?;
            println!(
                "redrive: {} handled, {} still failing",
                body["handled"], body["still_failing"]
            );
            if body["still_failing"].as_u64().unwrap_or(0) > 0 {
                anyhow::bail!("some dead letters still fail; see `shopmesh events dlq list`");
            }
        }
    }
    Ok(())
}
